"""The command line's flags: ``build_parser`` (every command and flag, with help texts and examples) and the export
settings the ``export`` flags give. ``cli.py`` runs the commands."""
from __future__ import annotations

import argparse

from .errors import ConfigError

EPILOG = """examples:
  python -m csd_backend generate --prompt "a DSLR photo of a corgi" --model ./models/sd21-base \\
      --preset csd-coarse --out runs/corgi
  python -m csd_backend generate --resume runs/corgi            # continue an interrupted run
  python -m csd_backend generate --prompt "a red ball" --model analytic --preset preview-cpu --out runs/demo
  python -m csd_backend generate --preset csd-edit --init-scene runs/corgi --source-prompt "a corgi" \\
      --prompt "a corgi made of gold" --model ./models/sd21-base --out runs/gold-corgi
"""


REFINE_EPILOG = """examples:
  python -m csd_backend refine runs/corgi --out runs/corgi-refined            # prompt and model of the run
  python -m csd_backend refine runs/cone --preset refine-cpu --out runs/cone-refined
  python -m csd_backend generate --resume runs/corgi-refined                  # continue an interrupted refine
"""


TEXTURE_EPILOG = """examples:
  python -m csd_backend texture chair.glb --prompt "a wooden chair" --model ./models/sd21-base --out runs/chair
  python -m csd_backend texture bunny.obj --prompt "a green cone" --model toy --preset texture-cpu --out runs/bunny
The exported mesh is your mesh (same units and orientation) with a baked texture.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m csd_backend",
                                description="Text-to-3D with Classifier Score Distillation (CSD), without ComfyUI.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="optimise a 3D scene from a text prompt", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(g, "csd-coarse")
    g.add_argument("--resume", default=None,
                   help="a run folder or checkpoint to continue (checkpoints/previous.ckpt too). Other flags may be "
                        "repeated if their values equal the saved run's; --steps sets where it ends (more extends "
                        "it; fewer than planned ends it early, with a warning); --model/--device/--dtype may change. "
                        "A run stopped before its first checkpoint restarts from step 0 with its config.json")
    g.add_argument("--init-scene", default=None,
                   help="start from the scene of a run folder or checkpoint (editing), or from 3D Gaussian splats in "
                        "a 3DGS .ply (a Gaussian preset trains them; another converts them)")

    r = sub.add_parser("refine", help="stage 2: refine a stage-1 run as a mesh (DMTet + rasterizer)",
                       epilog=REFINE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("run", help="the stage-1 run folder or checkpoint to refine")
    add_run_flags(r, "csd-refine-object")

    t = sub.add_parser("texture", help="paint a texture onto your own mesh (its geometry stays fixed)",
                       epilog=TEXTURE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("mesh", help="a .glb/.gltf/.obj/.ply/.stl/.off file")
    t.add_argument("--z-up", action="store_true",
                   help="the file is Z-up (default: Y-up, glTF's convention, which most OBJ/PLY files follow)")
    add_run_flags(t, "csd-texture")

    v = sub.add_parser("render", help="render a ring of views of a saved run")
    v.add_argument("checkpoint", help="run folder or checkpoint")
    v.add_argument("--out", required=True, help="folder for the PNGs (files are never overwritten)")
    v.add_argument("--views", type=int, default=8)
    v.add_argument("--size", type=int, default=256)
    v.add_argument("--shading", default="albedo", choices=["albedo", "textureless", "diffuse"])
    v.add_argument("--quiet", action="store_true", help="no progress bar")

    x = sub.add_parser("export", help="export the mesh of a saved run as GLB, OBJ (+MTL+PNG) or PLY")
    x.add_argument("checkpoint", help="run folder or checkpoint")
    x.add_argument("--out", required=True, help="a .glb/.obj/.ply file (never overwritten) or a folder "
                                                "(mesh_NNNNN_.<format> inside it)")
    x.add_argument("--format", default=None, choices=["glb", "obj", "ply"],
                   help="default: from the suffix of --out, else glb")
    x.add_argument("--quiet", action="store_true", help="no progress bars")
    add_export_flags(x)

    b = sub.add_parser("batch", help="many prompts, one run folder each, on every local device or a Ray cluster",
                       epilog=BATCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("prompts", nargs="?", metavar="PROMPTS",
                   help="a text file (one prompt a line; blank lines and lines starting with # are skipped) or a "
                        ".jsonl file (one JSON object a line: prompt, and optionally negative_prompt, seed, preset, "
                        "steps, set)")
    b.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the batch in DIR: finished runs are skipped, unfinished ones resume from their "
                        "checkpoints (only --workers/--ray/--retries/--cpus-per-run/--quiet and --model/"
                        "--model-config/--device/--dtype may be given)")
    b.add_argument("--seeds", type=int, default=None, metavar="K",
                   help="K runs per prompt, with seeds S, S+1, ... S+K-1 (S: the line's seed, --seed or the preset's)")
    b.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local worker processes (default: one per GPU, else 1); each loads the model once")
    b.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster: 'auto' (the cluster this machine belongs to), an address such as "
                        "ray://head:10001, or 'local' (start one on this machine); needs pip install \".[ray]\"")
    b.add_argument("--retries", type=int, default=None, metavar="N",
                   help="times a run is restarted from its checkpoint when its worker dies (default 2)")
    b.add_argument("--cpus-per-run", type=int, default=None, metavar="N",
                   help="with --ray on a cluster without GPUs: CPUs (and torch threads) per run (default 1)")
    add_run_flags(b, "csd-coarse", batch=True)

    sub.add_parser("presets", help="list the presets and their settings")
    return p


BATCH_EPILOG = """examples:
  python -m csd_backend batch prompts.txt --preset csd-coarse --model ./models/sd21-base --out runs/batch1
  python -m csd_backend batch prompts.jsonl --preset preview-cpu --model analytic --out runs/b --workers 2 --seeds 3
  python -m csd_backend batch prompts.txt --preset csd-coarse --model ./models/sd21-base --out /shared/b --ray auto
  python -m csd_backend batch --resume runs/batch1          # skip finished runs, resume the others
a .jsonl line: {"prompt": "a red ball", "negative_prompt": "blurry", "seed": 3, "preset": "preview-cpu",
                "steps": 200, "set": {"render.num_samples_per_ray": 64}}
exit code: 0 every run finished, 1 some run failed, 2 bad input (nothing ran), 130/143 stopped (resumable)
"""


def add_run_flags(p: argparse.ArgumentParser, default_preset: str, batch: bool = False) -> None:
    """The flags of a run (generate, refine, texture). ``batch``: those of ``batch``, whose prompts come from a
    file (no --prompt/--source-prompt) and whose output flags default to None, so --resume can tell a given flag
    (the defaults are applied by ``RunOutputs``)."""
    from .presets import preset_names

    if not batch:
        p.add_argument("--prompt", help="what to generate (required unless --resume; refine: default the run's)")
    p.add_argument("--negative-prompt", default=None,
                   help="negative prompt (default: the preset's, 'oversaturated color, ugly, tiling, low quality, noisy')"
                        + ("; for the lines of PROMPTS that give none" if batch else ""))
    if not batch:
        p.add_argument("--source-prompt", default=None,
                       help="edit mode: a description of the scene given by --init-scene")
    p.add_argument("--model", help="diffusers folder, single-file .safetensors checkpoint, hub id (from the local "
                                   "cache), or 'analytic[:RES]' for the exact test prior")
    p.add_argument("--model-config", default=None,
                   help="for single-file checkpoints offline: a diffusers folder (or cached hub id) of the same "
                        "architecture to take the component configs from; for an MVDream checkpoint its yaml "
                        "(sd-v2-base.yaml), or a Stable Diffusion 2.x folder to take the tokenizer from")
    p.add_argument("--preset", default=None, choices=preset_names(),
                   help=f"named configuration (default {default_preset})")
    p.add_argument("--steps", type=int, default=None, help="number of steps (default: the preset's)")
    p.add_argument("--no-rescale-schedules", action="store_true",
                   help="with --steps: keep the preset's schedules in absolute steps instead of stretching them")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed (default: the preset's, 0)" + ("; a line's own seed wins" if batch else ""))
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default=None, help="auto | float16 | float32 | bfloat16 (default auto: fp16 on CUDA)")
    p.add_argument("--resolution", type=int, default=None, help="image size fed to the prior (default: the preset's)")
    p.add_argument("--controlnet", default=None,
                   help="a diffusers ControlNet folder (depth, e.g. lllyasviel/control_v11f1p_sd15_depth with an "
                        "SD 1.5 model) conditioning the prior on the depth of each render; mostly for texture")
    p.add_argument("--controlnet-scale", type=float, default=None, help="its conditioning scale (default 1.0)")
    p.add_argument("--lora-base-model", default=None,
                   help="VSD: a second model (folder, file or hub id) whose UNet carries the LoRA, as threestudio's "
                        "pretrained_model_name_or_path_lora (ProlificDreamer: stabilityai/stable-diffusion-2-1, "
                        "768 v); default: a LoRA of --model's own UNet")
    p.add_argument("--out", help="output folder (must be new or empty unless --resume)" +
                   ("; it holds one run folder per run, manifest.jsonl and batch.json" if batch else ""))
    p.add_argument("--preview-every", type=int, default=None, help="write a preview PNG every K steps (0: never)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps (0: only at the end)")
    out_default = (lambda value: None) if batch else (lambda value: value)  # batch: RunOutputs applies them
    p.add_argument("--views", type=int, default=out_default(8),
                   help="number of views in the final ring of renders (default 8)")
    p.add_argument("--view-size", type=int, default=out_default(256), help="size of the final renders (default 256)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any configuration field, e.g. --set render.num_samples_per_ray=256 "
                        "--set guidance.negative_weight='[0,0,1,5000]' (JSON values)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--mesh-format", default=out_default("glb"), choices=["glb", "obj", "ply"],
                   help="format of the mesh written into --out at the end (default glb)")
    p.add_argument("--no-mesh", action="store_true", help="do not export a mesh at the end of the run")
    p.add_argument("--mesh-resolution", type=int, default=None,
                   help=f"marching-cubes grid of that mesh (default: the preset's, {export_default('resolution')})")
    p.add_argument("--mesh-texture-size", type=int, default=None,
                   help="its texture size (default 1024; 0: vertex colours only)")
    p.add_argument("--mesh-face-budget", type=int, default=None,
                   help=f"simplify it to at most this many faces; 0: keep all (default: the preset's, "
                        f"{export_default('face_budget')})")


def export_default(name: str) -> str:
    """The default of an export setting in words: the export's, and the CPU presets' where they differ."""
    from .export.config import ExportConfig
    from .presets import CPU_EXPORT

    return f"{getattr(ExportConfig(), name)}; {CPU_EXPORT[name]} for the *-cpu presets"


def add_export_flags(p: argparse.ArgumentParser) -> None:
    """The ``ExportConfig`` settings as flags (defaults taken from the dataclass; resolution, texture size and face
    budget default to the run's, ``runs.outputs.run_export_config``)."""
    from .export.config import ExportConfig

    d = ExportConfig()
    p.add_argument("--resolution", type=int, default=None,
                   help=f"grid samples along the longest side of the object's box (default: the run's preset's, "
                        f"{export_default('resolution')})")
    p.add_argument("--threshold", default=str(d.threshold),
                   help="surface density: 'auto' (mean density where there is any) or a number (threestudio 25, "
                        "CSD 10); default %(default)s")
    p.add_argument("--texture-size", type=int, default=None,
                   help=f"texture side in pixels; 0: vertex colours only (default {d.texture_size})")
    p.add_argument("--face-budget", type=int, default=None,
                   help=f"simplify to at most this many faces; 0: keep all (default: the run's preset's, "
                        f"{export_default('face_budget')})")
    p.add_argument("--floater-area", type=float, default=d.floater_area,
                   help="drop the parts with less than this share of the largest part's area, and bubbles inside "
                        "the object (default %(default)s: a fifth; lower it to keep a small separate part)")
    p.add_argument("--keep-floaters", action="store_true", help="keep every part")
    p.add_argument("--no-vertex-colors", action="store_true", help="no per-vertex colours")
    p.add_argument("--no-coarse-to-fine", action="store_true", help="extract over the whole box, not the object's")
    p.add_argument("--dense", action="store_true", help="query every grid point (no narrow band; slower)")
    p.add_argument("--z-up", action="store_true", help="keep the scene's Z-up frame instead of glTF's Y-up")


def export_settings(args) -> dict:
    """The export settings the flags give (``ExportConfig`` fields), checked; the run's fill in the rest."""
    from .export.config import ExportConfig

    threshold = args.threshold
    if str(threshold).strip().lower() != "auto":
        try:
            threshold = float(threshold)
        except ValueError:
            raise ConfigError("--threshold", f"must be 'auto' or a number, got {threshold!r}") from None
    given = dict(threshold=threshold, remove_floaters=not args.keep_floaters, floater_area=args.floater_area,
                 vertex_colors=not args.no_vertex_colors, coarse_to_fine=not args.no_coarse_to_fine,
                 narrow_band=not args.dense, y_up=not args.z_up,
                 **{k: v for k, v in (("resolution", args.resolution), ("texture_size", args.texture_size),
                                      ("face_budget", args.face_budget)) if v is not None})
    ExportConfig(**given).validate()  # a bad value fails before the run is loaded
    return given
