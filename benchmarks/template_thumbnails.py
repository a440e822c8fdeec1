"""The thumbnails of the Templates dialog: ``example_workflows/<name>.jpg`` for every example workflow, each a render
of what that template makes.

ComfyUI's frontend shows ``/api/workflow_templates/<pack>/<name>.jpg`` on the template's card (a 256 px box, the
image scaled to fit). This script runs each template's API twin (``example_workflows/api/<name>.json``) through the
tests' graph runner (``tests/comfy_stubs.py``: ComfyUI's folder_paths / progress bar / interrupt stubbed, every node
run as ComfyUI runs it) and renders the scenes it trains from a few views with the engine's renderer:

* the CPU demo runs **as shipped** (it already uses the toy prior);
* every other template needs Stable Diffusion on a GPU, which cannot run here, so it runs **CPU-sized with the toy
  prior** shipped with the pack: the same graph, model ``toy``, a prompt the toy knows, the CPU presets
  (``preview-cpu`` / ``vsd-preview-cpu`` / ``refine-cpu`` / ``texture-cpu`` / ``gaussian-preview-cpu``, ``csd-edit``
  with fewer steps) with their scene sizes, 64² renders at batch 1 (``cpu_sized``; the Gaussian template also gets
  the view ranges the toy was trained on). Load Checkpoint (the checkpoint template) loads the toy weights wrapped
  as ComfyUI's MODEL / CLIP / VAE by the tests' stand-ins, so CSD Prior from ComfyUI Model is what runs. Each
  thumbnail says so in its caption, and each template's Note says what its thumbnail shows.

Nodes that only save or show results (Render Views, Extract/Save Mesh, Save/Preview Image, Preview 3D) are left
out; the scene outputs are rendered at 192² (2 × 2 views from elevation 20°, white background; a mesh also as its
normal map; two stages or generate-then-edit as a row each) and composed into a 384 × 384 JPEG with a caption.
Deterministic for a given torch version and thread count (the templates' seed 0).

    python benchmarks/template_thumbnails.py                      # all templates, into example_workflows/
    python benchmarks/template_thumbnails.py --only 01-CPU-demo-text-to-3D-with-the-toy-prior --threads 1
    python benchmarks/template_thumbnails.py --out /tmp/thumbs --json /tmp/thumbs/times.json

Prints the time of each template's run (training and rendering) and the size of each JPEG.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import comfy_stubs as cs  # noqa: E402

#: the thumbnail: 2 × 2 renders of CELL² pixels
CELL = 192
SIZE = 2 * CELL
JPEG_QUALITY = 85
SAMPLES_PER_RAY = 128
#: the name Load Checkpoint offers for the toy weights (the checkpoint template's thumbnail)
TOY_CHECKPOINT = "toy (the toy prior as a ComfyUI checkpoint)"

#: what stands in for each paper preset of CSD Optimize / Refine Mesh / Texture Mesh: (CPU preset, learning rate or
#: None for the CPU preset's own, steps). The edit runs its edit guidance on preview-cpu's small renderer (csd-edit
#: renders 512 samples per ray: 5 s a step here) at a lower learning rate than generation's 0.01
CPU_STAGES = {
    "csd-coarse": ("preview-cpu", None, 150),
    "sds-dreamfusion": ("preview-cpu", None, 150),
    "vsd-prolificdreamer": ("vsd-preview-cpu", None, 150),
    "csd-refine-object": ("refine-cpu", None, 150),
    "csd-refine": ("refine-cpu", None, 150),
    "csd-texture": ("texture-cpu", None, 150),
    "csd-edit": ("preview-cpu", 0.002, 150),
    # a random MVDream makes no shape in any number of steps: a short run shows the graph runs
    "csd-mvdream": ("mvdream-cpu", None, 40),
    "csd-gaussian": ("gaussian-preview-cpu", None, 120),
    "sds-gaussian": ("gaussian-preview-cpu", None, 120),
}
#: the scene preset of a new scene on the CPU (its radius and hash-grid size go into CSD 3D Scene's widgets)
CPU_SCENES = {"csd-coarse": "preview-cpu", "sds-dreamfusion": "preview-cpu", "vsd-prolificdreamer": "vsd-preview-cpu",
              "csd-gaussian": "gaussian-preview-cpu", "sds-gaussian": "gaussian-preview-cpu"}
#: what only saves or shows results: not needed for the renders
LEFT_OUT = {"CSDRenderViews", "CSDExtractMesh", "CSDSaveMesh", "CSDSaveGaussians", "SaveImage", "PreviewImage",
            "Preview3D"}
TRAINERS = ("CSDOptimize", "CSDRefineMesh", "CSDTextureMesh", "CSDMVDream")
#: the model a multi-view node gets: no MVDream weights ship with the pack, so the tests' tiny random MVDream
TINY_MVDREAM = "diffusers/tiny-mvdream"


@dataclass
class Recipe:
    """How a template's thumbnail is made. ``prompt``: the toy prompt of its (non-edit) guidance nodes (None: as
    shipped); ``edit_to``: the edit's target prompt (its source is ``prompt``); ``rows``: one label per row of the
    thumbnail, the scenes of the trainer nodes in graph order (one row: the last scene in all four cells);
    ``cameras``: CSD Cameras widgets set on the CPU (the view ranges the toy prior was trained on, where the
    template's differ)."""
    prompt: Optional[str]
    caption: str
    edit_to: Optional[str] = None
    rows: Tuple[str, ...] = ()
    distance: float = 2.0
    fovy: float = 40.0
    cameras: Optional[Dict[str, float]] = None


CPU_DEMO = "01-CPU-demo-text-to-3D-with-the-toy-prior"
RECIPES: Dict[str, Recipe] = {
    CPU_DEMO: Recipe(None, "as shipped: toy prior, 'a green cone', 150 steps"),
    "02-text-to-3D-CSD-paper-settings-GPU": Recipe("a yellow mug",
                                                   "toy prior, 'a yellow mug', preview-cpu, 150 steps"),
    "03-two-stage-CSD-then-mesh-refinement-GPU": Recipe("a blue ball",
                                                        "toy prior, 'a blue ball', preview-cpu + refine-cpu",
                                                        rows=("stage 1", "refined mesh")),
    "04-edit-a-generated-scene-GPU": Recipe("a yellow mug", "toy prior, 'a yellow mug' edited to 'a red cube'",
                                            edit_to="a red cube", rows=("generated", "edited")),
    "05-texture-your-own-mesh-GPU": Recipe("a yellow mug",
                                           "toy prior, the vase painted 'a yellow mug', texture-cpu, t up to 0.98",
                                           distance=1.8, fovy=40.0),
    "06-your-checkpoint-and-LoRAs-as-prior-GPU": Recipe("a yellow mug",
                                                        "toy weights as the checkpoint, 'a yellow mug', preview-cpu"),
    "07-SDS-baseline-DreamFusion-GPU": Recipe("a green cone", "toy prior, SDS, 'a green cone', preview-cpu"),
    "08-VSD-ProlificDreamer-GPU": Recipe("a yellow mug", "toy prior, VSD, 'a yellow mug', 150 steps: still a blob",
                                         distance=1.6, fovy=50.0),
    # MVDream is multi-view: the single-view toy prior cannot stand in. A tiny random MVDream runs the graph.
    "09-text-to-3D-CSD-MVDream-multi-view-GPU": Recipe(
        "an astronaut riding a horse", "tiny RANDOM MVDream (no weights here): the run, not a shape",
        distance=1.6, fovy=50.0),
    # DreamGaussian's cameras (distance 2.5, fovy 49.1, elevation ±30°) are not what the toy saw: preview-cpu's
    "10-text-to-3D-Gaussian-splats-GPU": Recipe(
        "a green cone", "toy prior, 'a green cone', gaussian-preview-cpu, 120 steps",
        cameras={"elevation_min": -10.0, "elevation_max": 90.0, "distance_min": 1.5, "distance_max": 2.0,
                 "fovy_min": 40.0, "fovy_max": 70.0}),
}


# ------------------------------------------------------------------------------------------------ the graph
def cpu_sized(api: dict, recipe: Recipe) -> dict:
    """``api`` with the toy prior, the recipe's prompts and the CPU presets (the template's graph otherwise)."""
    from csd_backend.presets import get_preset

    out = copy.deepcopy(api)
    for key, node in out.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CSDLoadDiffusionModel":
            multiview = any(n["class_type"] == "CSDMVDream" and n["inputs"].get("prior") == [key, 0]
                            for n in api.values())
            inputs.update({"model": TINY_MVDREAM if multiview else "toy", "resolution": 0})
        elif kind == "CSDMVDream":
            inputs["prompt"] = recipe.prompt
        elif kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = TOY_CHECKPOINT
        elif kind == "CSDPriorFromComfyModel":
            inputs["resolution"] = 64  # the toy's native size (the stand-ins report SD 1.5's 512)
        elif kind == "CSDGuidance":
            if inputs["mode"] == "edit":
                inputs.update({"prompt": recipe.edit_to, "source_prompt": recipe.prompt})
            else:
                inputs["prompt"] = recipe.prompt
        elif kind == "CSDScene" and inputs.get("source", "(new scene)") == "(new scene)":
            preset = CPU_SCENES[inputs["preset"]]
            s = get_preset(preset).scene
            inputs.update({"preset": preset, "radius": s.radius, "n_levels": s.n_levels,
                           "log2_hashmap_size": s.log2_hashmap_size, "max_resolution": s.max_resolution})
        elif kind == "CSDCameras":
            inputs.update({"width": 64, "height": 64, "batch_size": 1, "later_width": 0, "later_height": 0})
            inputs.update(recipe.cameras or {})
        if kind in TRAINERS:
            preset, lr, steps = CPU_STAGES[inputs["preset"]]
            inputs.update({"preset": preset, "steps": steps})
            if "lr" in inputs:  # CSD MVDream takes its learning rate from the preset
                inputs["lr"] = lr if lr is not None else get_preset(preset).optim.lr
    return out


def trimmed(api: dict) -> dict:
    """``api`` without the nodes that only save or show results; the trainers become the outputs."""
    return {k: v for k, v in api.items() if v["class_type"] not in LEFT_OUT}


def _toy_checkpoint_loader():
    """Load Checkpoint offering the toy weights as ComfyUI's MODEL / CLIP / VAE (the tests' stand-ins of
    ``comfy_stubs``, given the toy's own latent scale, VAE factor 4 and 32-token text encoder)."""
    from csd_backend.priors import toy_model_path

    class ToyCheckpointLoader(cs.CheckpointLoaderSimple):
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"ckpt_name": ([TOY_CHECKPOINT], {})}}

        def load_checkpoint(self, ckpt_name):
            folder = toy_model_path()
            model, clip, vae = cs.load_stub_checkpoint(folder)
            scaling = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))["scaling_factor"]
            model.model.latent_format.scale_factor = float(scaling)
            vae.downscale_ratio = 2 ** (len(vae.first_stage_model.config.block_out_channels) - 1)
            length = clip.tokenizer.model_max_length
            tokenizer = clip.tokenizer

            def tokenize(text, return_word_ids=False, **kwargs):
                ids = tokenizer(text, padding="max_length", max_length=length, truncation=True).input_ids
                return {"l": [[(int(i), 1.0) for i in ids]]}

            clip.tokenize = tokenize
            return model, clip, vae

    return ToyCheckpointLoader


class _AsOutput:
    """Marks a trainer class as an output node, so the runner runs it (its scene is what the thumbnail shows)."""

    @staticmethod
    def wrap(cls):
        return type(cls.__name__, (cls,), {"OUTPUT_NODE": True})


# ------------------------------------------------------------------------------------------------ renders
def render(scene, n: int, start_azimuth: float, shading: str, recipe: Recipe):
    """``n`` views of ``scene`` around it from ``start_azimuth`` (elevation 20°), white background: [n, H, W, 3]."""
    import torch

    from csd_backend.config import RenderConfig
    from csd_backend.render.cameras import orbit_cameras
    from csd_backend.render.views import prepare_renderer, render_cameras

    cfg = RenderConfig(num_samples_per_ray=SAMPLES_PER_RAY)
    cams = orbit_cameras(n, 20.0, recipe.distance, recipe.fovy, CELL, CELL, start_azimuth=start_azimuth)
    renderer = prepare_renderer(scene, cfg)
    white = torch.ones(3)
    with torch.no_grad():
        return torch.cat([render_cameras(scene, cams[i], shading, cfg, renderer, background=white)
                          for i in range(len(cams))], 0)


def compose(cells: List, caption: str, labels: List[Optional[str]]):
    """Four [H, W, 3] renders as a 2 × 2 PIL image with a caption band, and a label on each row."""
    from PIL import Image, ImageDraw, ImageFont

    sheet = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    for i, cell in enumerate(cells):
        arr = (cell.clamp(0, 1).numpy() * 255 + 0.5).astype("uint8")
        sheet.paste(Image.fromarray(arr), ((i % 2) * CELL, (i // 2) * CELL))
    draw = ImageDraw.Draw(sheet, "RGBA")

    def font(size):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one fixed size
            return ImageFont.load_default()

    small, band = font(15), 26
    for row, label in enumerate(labels):
        if label:
            w = draw.textlength(label, font=small)
            draw.rectangle([0, row * CELL, w + 10, row * CELL + 20], fill=(0, 0, 0, 150))
            draw.text((5, row * CELL + 2), label, fill=(255, 255, 255, 255), font=small)
    draw.rectangle([0, SIZE - band, SIZE, SIZE], fill=(0, 0, 0, 175))
    size = 15
    while size > 9 and draw.textlength(caption, font=font(size)) > SIZE - 10:
        size -= 1
    draw.text((5, SIZE - band + (band - size) // 2 - 1), caption, fill=(255, 255, 255, 255), font=font(size))
    return sheet


def cells_for(scenes: List, recipe: Recipe) -> Tuple[List, List[Optional[str]]]:
    """The four cells. One scene: four albedo views around it (azimuth 30°, 120°, 210°, 300°), the last one the
    normal map for a mesh (its geometry is a surface; a volume's normal map is mostly noise). Two scenes: a row
    each, two albedo views (the second a normal map for a mesh)."""
    def is_mesh(scene):
        return getattr(scene, "kind", "volume") in ("dmtet", "mesh")

    if len(scenes) == 1:
        scene = scenes[0]
        albedo = render(scene, 4, 30.0, "albedo", recipe)
        cells = list(albedo)
        if is_mesh(scene):
            cells[3] = render(scene, 1, 300.0, "textureless", recipe)[0]
        return cells, [None, None]
    cells = []
    for scene in scenes:
        first = render(scene, 1, 30.0, "albedo", recipe)[0]
        second = render(scene, 1, 30.0 if is_mesh(scene) else 120.0, "textureless" if is_mesh(scene) else "albedo",
                        recipe)[0]
        cells += [first, second]
    return cells, list(recipe.rows)


# ------------------------------------------------------------------------------------------------ one template
def make_thumbnail(name: str, out_dir: Path, work: Path, steps: Optional[int] = None) -> dict:
    import pytest

    recipe = RECIPES[name]
    mp = pytest.MonkeyPatch()
    try:
        env = cs.install(mp, work / name)
        if any(n["class_type"] == "CSDMVDream" for n in cs.load_api(name).values()):
            from tiny_mvdream import build_tiny_mvdream

            tiny = build_tiny_mvdream(work / "tiny-mvdream")
            (env.models_dir / "diffusers" / "tiny-mvdream").symlink_to(tiny["folder"], target_is_directory=True)
        classes = cs.node_classes(cs.load_pack())
        classes["CheckpointLoaderSimple"] = _toy_checkpoint_loader()
        for kind in TRAINERS:
            if kind in classes:
                classes[kind] = _AsOutput.wrap(classes[kind])
        api = cs.load_api(name)
        prompt = trimmed(api if recipe.prompt is None else cpu_sized(api, recipe))
        if steps:  # a quick look, not a thumbnail
            for node in prompt.values():
                if node["class_type"] in TRAINERS:
                    node["inputs"]["steps"] = steps
        t0 = time.perf_counter()
        run = cs.execute_prompt(prompt, classes, env)
        train_s = time.perf_counter() - t0
        trainers = [k for k in sorted(prompt, key=int) if prompt[k]["class_type"] in TRAINERS]
        shown = trainers[-1:] if len(recipe.rows) < 2 else trainers[-len(recipe.rows):]
        t1 = time.perf_counter()
        cells, labels = cells_for([run.results[k][0] for k in shown], recipe)
        render_s = time.perf_counter() - t1
        sheet = compose(cells, recipe.caption, labels)
        path = out_dir / f"{name}.jpg"
        sheet.save(path, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        nodes = {f"{k} {prompt[k]['class_type']}": round(s, 1) for k, s in run.seconds.items()}
        return {"name": name, "jpg": str(path), "bytes": path.stat().st_size, "pixels": list(sheet.size),
                "train_s": round(train_s, 1), "render_s": round(render_s, 1), "nodes_s": nodes,
                "steps": {k: prompt[k]["inputs"]["steps"] for k in trainers},
                "presets": {k: prompt[k]["inputs"]["preset"] for k in trainers}}
    finally:
        mp.undo()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="template names (default: all)")
    ap.add_argument("--out", default=str(cs.UI_DIR), help="folder for the JPEGs (default: example_workflows)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the times and sizes to this JSON file")
    ap.add_argument("--steps", type=int, default=None, help="train every stage this many steps (a quick check of "
                                                            "the script; the thumbnails use the recipes' steps)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only or cs.workflow_names()
    unknown = sorted(set(names) - set(RECIPES))
    missing = sorted(set(cs.workflow_names()) - set(RECIPES))
    if unknown or missing:
        print(f"no recipe for {unknown or missing}; RECIPES must name every template", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="csd3d-thumbs-") as work:
        for name in names:
            t0 = time.perf_counter()
            r = make_thumbnail(name, out, Path(work), args.steps)
            r["total_s"] = round(time.perf_counter() - t0, 1)
            results.append(r)
            print(f"{name}: {r['pixels'][0]}x{r['pixels'][1]} {r['bytes'] / 1024:.0f} KB, run {r['train_s']:.0f} s "
                  f"({', '.join(f'{p} {s} steps' for p, s in zip(r['presets'].values(), r['steps'].values()))}), "
                  f"renders {r['render_s']:.0f} s, total {r['total_s']:.0f} s ({torch.get_num_threads()} threads)",
                  flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
