"""Command line: ``python -m csd_backend generate|export-views|presets``.

``generate`` runs one optimisation stage and writes into ``--out``:
  checkpoints/last.ckpt      the resumable run state (atomically replaced every --checkpoint-every steps)
  previews/step_NNNNN.png    the current render every --preview-every steps
  renders/view_NN.png        a ring of views of the final scene
  config.json                the full resolved configuration
  mesh.glb                   the textured mesh of the final scene (--mesh-format glb|obj|ply, --no-mesh)

``export`` writes the textured mesh of a saved run (GLB, OBJ + MTL + PNG, or PLY).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from .errors import CSDError, ConfigError

EPILOG = """examples:
  python -m csd_backend generate --prompt "a DSLR photo of a corgi" --model ./models/sd21-base \\
      --preset csd-coarse --out runs/corgi
  python -m csd_backend generate --resume runs/corgi            # continue an interrupted run
  python -m csd_backend generate --prompt "a red ball" --model analytic --preset preview-cpu --out runs/demo
  python -m csd_backend generate --preset csd-edit --init-scene runs/corgi --source-prompt "a corgi" \\
      --prompt "a corgi made of gold" --model ./models/sd21-base --out runs/gold-corgi
"""


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    from .presets import preset_names

    p = argparse.ArgumentParser(prog="python -m csd_backend",
                                description="Text-to-3D with Classifier Score Distillation (CSD), without ComfyUI.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="optimise a 3D scene from a text prompt", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--prompt", help="what to generate (required unless --resume)")
    g.add_argument("--negative-prompt", default=None,
                   help="negative prompt (default: the preset's, 'oversaturated color, ugly, tiling, low quality, noisy')")
    g.add_argument("--source-prompt", default=None, help="edit mode: a description of the scene given by --init-scene")
    g.add_argument("--model", help="diffusers folder, single-file .safetensors checkpoint, hub id (from the local "
                                   "cache), or 'analytic[:RES]' for the exact test prior")
    g.add_argument("--model-config", default=None,
                   help="for single-file checkpoints offline: a diffusers folder (or cached hub id) of the same "
                        "architecture to take the component configs from")
    g.add_argument("--preset", default=None, choices=preset_names(), help="named configuration (default csd-coarse)")
    g.add_argument("--steps", type=int, default=None, help="number of steps (default: the preset's)")
    g.add_argument("--no-rescale-schedules", action="store_true",
                   help="with --steps: keep the preset's schedules in absolute steps instead of stretching them")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's, 0)")
    g.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--dtype", default=None, help="auto | float16 | float32 | bfloat16 (default auto: fp16 on CUDA)")
    g.add_argument("--resolution", type=int, default=None, help="image size fed to the prior (default: the preset's)")
    g.add_argument("--out", help="output folder (must be new or empty unless --resume)")
    g.add_argument("--resume", default=None, help="a run folder or checkpoint to continue")
    g.add_argument("--init-scene", default=None, help="start from the scene of a run folder or checkpoint (editing)")
    g.add_argument("--preview-every", type=int, default=None, help="write a preview PNG every K steps (0: never)")
    g.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--views", type=int, default=8, help="number of views in the final ring of renders (default 8)")
    g.add_argument("--view-size", type=int, default=256, help="size of the final renders (default 256)")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any configuration field, e.g. --set render.num_samples_per_ray=256 "
                        "--set guidance.negative_weight='[0,0,1,5000]' (JSON values)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--mesh-format", default="glb", choices=["glb", "obj", "ply"],
                   help="format of the mesh written into --out at the end (default %(default)s)")
    g.add_argument("--no-mesh", action="store_true", help="do not export a mesh at the end of the run")
    g.add_argument("--mesh-resolution", type=int, default=None, help="marching-cubes grid of that mesh (default 256)")
    g.add_argument("--mesh-texture-size", type=int, default=None,
                   help="its texture size (default 1024; 0: vertex colours only)")

    v = sub.add_parser("render", help="render a ring of views of a saved run")
    v.add_argument("checkpoint", help="run folder or checkpoint")
    v.add_argument("--out", required=True, help="folder for the PNGs (files are never overwritten)")
    v.add_argument("--views", type=int, default=8)
    v.add_argument("--size", type=int, default=256)
    v.add_argument("--shading", default="albedo", choices=["albedo", "textureless", "diffuse"])

    x = sub.add_parser("export", help="export the mesh of a saved run as GLB, OBJ (+MTL+PNG) or PLY")
    x.add_argument("checkpoint", help="run folder or checkpoint")
    x.add_argument("--out", required=True, help="a .glb/.obj/.ply file (never overwritten) or a folder "
                                                "(mesh_NNNNN_.<format> inside it)")
    x.add_argument("--format", default=None, choices=["glb", "obj", "ply"],
                   help="default: from the suffix of --out, else glb")
    _add_export_flags(x)

    sub.add_parser("presets", help="list the presets and their settings")
    return p


def _add_export_flags(p: argparse.ArgumentParser) -> None:
    """The ``ExportConfig`` settings as flags (defaults taken from the dataclass)."""
    from .export.config import ExportConfig

    d = ExportConfig()
    p.add_argument("--resolution", type=int, default=d.resolution,
                   help="grid samples along the longest side of the object's box (default %(default)s)")
    p.add_argument("--threshold", default=str(d.threshold),
                   help="surface density: 'auto' (mean density where there is any) or a number (threestudio 25, "
                        "CSD 10); default %(default)s")
    p.add_argument("--texture-size", type=int, default=d.texture_size,
                   help="texture side in pixels; 0: vertex colours only (default %(default)s)")
    p.add_argument("--face-budget", type=int, default=d.face_budget,
                   help="simplify to at most this many faces; 0: keep all (default %(default)s)")
    p.add_argument("--keep-floaters", action="store_true", help="keep small disconnected parts")
    p.add_argument("--no-vertex-colors", action="store_true", help="no per-vertex colours")
    p.add_argument("--no-coarse-to-fine", action="store_true", help="extract over the whole box, not the object's")
    p.add_argument("--dense", action="store_true", help="query every grid point (no narrow band; slower)")
    p.add_argument("--z-up", action="store_true", help="keep the scene's Z-up frame instead of glTF's Y-up")


def _export_config(args):
    from .export.config import ExportConfig

    threshold = args.threshold
    if str(threshold).strip().lower() != "auto":
        try:
            threshold = float(threshold)
        except ValueError:
            raise ConfigError("--threshold", f"must be 'auto' or a number, got {threshold!r}") from None
    return ExportConfig(resolution=args.resolution, threshold=threshold, texture_size=args.texture_size,
                        face_budget=args.face_budget, remove_floaters=not args.keep_floaters,
                        vertex_colors=not args.no_vertex_colors, coarse_to_fine=not args.no_coarse_to_fine,
                        narrow_band=not args.dense, y_up=not args.z_up).validate()


def _overrides(items: List[str]) -> dict:
    out: dict = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError("--set", f"'{item}' is not SECTION.FIELD=VALUE, e.g. optim.lr=0.01")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = _parse_value(value)
    return out


def _save_png(image, path: Path) -> None:
    from PIL import Image

    from .io import atomic_write

    arr = (image.clamp(0, 1).numpy() * 255 + 0.5).astype("uint8")
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def _progress_printer(total: int, start: int, quiet: bool):
    if quiet:
        return None, lambda info: None
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

        def update(info):
            bar.update(1)
            bar.set_postfix(loss=f"{info.losses['total']:.4f}", shading=info.shading)
        return bar, update
    except ImportError:  # pragma: no cover
        def update(info):
            print(f"step {info.step}/{info.total} loss {info.losses['total']:.4f}", flush=True)
        return None, update


def cmd_generate(args) -> int:
    from .config import RunConfig
    from .optimize import Optimization, load_scene
    from .presets import get_preset
    from .priors import load_prior
    from .render.views import render_ring

    if args.resume:
        from .io import load_checkpoint

        fixed = [flag for flag, value in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt),
                                          ("--source-prompt", args.source_prompt), ("--preset", args.preset),
                                          ("--seed", args.seed), ("--resolution", args.resolution),
                                          ("--init-scene", args.init_scene), ("--set", args.set or None),
                                          ("--preview-every", args.preview_every),
                                          ("--checkpoint-every", args.checkpoint_every), ("--out", args.out))
                 if value is not None]
        if fixed:
            raise ConfigError("--resume", f"{', '.join(fixed)} cannot change on resume: a resumed run keeps the "
                                          "settings saved in its checkpoint (only --steps, --model, --model-config, "
                                          "--device and --dtype may change). Start a new run to change them.")
        state = load_checkpoint(args.resume)
        config = RunConfig.from_dict(state["config"])
        prior_over = {k: getattr(args, k) for k in ("model", "model_config", "device", "dtype")
                      if getattr(args, k) is not None}
        config = config.replace(prior=prior_over)
        prior = load_prior(config.prior)
        opt = Optimization.resume(args.resume, prior, steps=args.steps)
        opt.config = opt.config.replace(prior=prior_over)  # the checkpoint records the model it continued with
        out = opt.out_dir
        print(f"resuming {out} at step {opt.step} of {opt.config.optim.steps}", file=sys.stderr)
    else:
        if not args.out:
            raise ConfigError("--out", "give an output folder (or --resume a run)")
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise ConfigError("--out", f"{out} exists and is not empty; outputs are never overwritten. "
                                       "Choose a new folder, or continue that run with --resume.")
        config = get_preset(args.preset or "csd-coarse")
        over = _overrides(args.set)
        guid = over.setdefault("guidance", {})
        if args.prompt is not None:
            guid["prompt"] = args.prompt
        if args.negative_prompt is not None:
            guid["negative_prompt"] = args.negative_prompt
        if args.source_prompt is not None:
            guid["source_prompt"] = args.source_prompt
        pri = over.setdefault("prior", {})
        for key in ("model", "model_config", "device", "dtype", "resolution"):
            if getattr(args, key) is not None:
                pri[key] = getattr(args, key)
        opt_over = over.setdefault("optim", {})
        for key in ("seed", "preview_every", "checkpoint_every"):
            if getattr(args, key) is not None:
                opt_over[key] = getattr(args, key)
        config = config.replace(**over)
        if args.steps is not None:
            config = config.with_steps(args.steps, rescale_schedules=not args.no_rescale_schedules)
        config.validate(require_model=True)
        scene = None
        if args.init_scene:
            scene, _ = load_scene(args.init_scene)
        prior = load_prior(config.prior)
        opt = Optimization(config, prior, scene=scene, out_dir=out)
        out.mkdir(parents=True, exist_ok=True)
        from .io import atomic_write

        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(opt.config.to_dict(), indent=2)))

    every = opt.config.optim.preview_every
    bar, update = _progress_printer(opt.config.optim.steps, opt.step, args.quiet)

    def progress(info):
        update(info)
        if every and (info.step % every == 0 or info.step == info.total):
            path = out / "previews" / f"step_{info.step:05d}.png"
            if not path.exists():
                _save_png(info.preview[0], path)

    t0 = time.time()
    try:
        scene = opt.run(progress=progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {opt.step}; checkpoint kept in {opt.checkpoint_path}. "
              f"Continue with: python -m csd_backend generate --resume {out}", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    c = opt.config.camera
    # render with the trained occupancy grid (EMA over the whole run), not one refitted from a single pass
    ring = render_ring(scene, args.views, args.view_size, c.eval_elevation, c.eval_distance, c.eval_fovy,
                       renderer=opt.renderer,
                       render_cfg=opt.config.render)
    from .io import unique_path

    for i, img in enumerate(ring):
        path = out / "renders" / f"view_{i:02d}.png"
        _save_png(img, path if not path.exists() else unique_path(path.parent, path.stem, ".png"))
    if not args.no_mesh:
        from .export import ExportConfig, extract_textured_mesh, save_mesh, save_mesh_unique
        from .errors import OutputExistsError

        mesh_over = {k: v for k, v in (("resolution", args.mesh_resolution), ("texture_size", args.mesh_texture_size))
                if v is not None}
        try:
            mesh = extract_textured_mesh(scene, ExportConfig(**mesh_over))
            try:
                path = save_mesh(mesh, out / f"mesh.{args.mesh_format}", args.mesh_format)
            except OutputExistsError:  # a resumed run: keep the earlier mesh
                path = save_mesh_unique(mesh, out, "mesh", args.mesh_format)
            print(f"mesh: {path} ({mesh.num_faces} faces)", file=sys.stderr)
        except CSDError as e:  # the run itself succeeded; say how to export later
            print(f"warning: no mesh written: {e}. Export later with: python -m csd_backend export {out} "
                  f"--out {out} --threshold <value>", file=sys.stderr)
    print(f"done: {opt.step} steps in {time.time() - t0:.1f} s; checkpoint {opt.checkpoint_path}; "
          f"renders in {out / 'renders'}", file=sys.stderr)
    return 0


def cmd_render(args) -> int:
    from .optimize import load_scene
    from .render.views import render_ring
    from .io import unique_path

    scene, config = load_scene(args.checkpoint)
    c = config.camera
    ring = render_ring(scene, args.views, args.size, c.eval_elevation, c.eval_distance, c.eval_fovy, args.shading,
                       render_cfg=config.render)
    for img in ring:
        _save_png(img, unique_path(Path(args.out), "view", ".png"))
    print(f"wrote {len(ring)} views to {args.out}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from .export import extract_textured_mesh, save_mesh, save_mesh_unique
    from .optimize import load_scene

    cfg = _export_config(args)
    out = Path(args.out)
    suffix = out.suffix.lower().lstrip(".")
    is_file = suffix in ("glb", "obj", "ply")
    fmt = args.format or (suffix if is_file else "glb")
    if is_file and args.format and args.format != suffix:
        raise ConfigError("--format", f"{args.format} does not match the suffix of --out {out.name}")
    if is_file and out.exists():  # fail before the (long) extraction
        raise ConfigError("--out", f"{out} exists; outputs are never overwritten. Choose another name or a folder.")
    scene, _config = load_scene(args.checkpoint)
    t0 = time.time()
    mesh = extract_textured_mesh(scene, cfg)
    path = save_mesh(mesh, out, fmt) if is_file else save_mesh_unique(mesh, out, "mesh", fmt)
    print(f"wrote {path}: {mesh.num_vertices} vertices, {mesh.num_faces} faces, threshold {mesh.threshold:.4g}, "
          f"{time.time() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_presets(args) -> int:
    from .presets import PRESETS

    print(json.dumps(PRESETS, indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("CSD_DEBUG"):
        return {"generate": cmd_generate, "render": cmd_render, "export": cmd_export,
                "presets": cmd_presets}[args.command](args)
    try:
        return {"generate": cmd_generate, "render": cmd_render, "export": cmd_export,
                "presets": cmd_presets}[args.command](args)
    except CSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
