"""Command line: ``python -m csd_backend generate|refine|texture|render|export|batch|presets``.

``generate`` runs one optimisation stage and writes into ``--out``:
  checkpoints/last.ckpt      the resumable run state (atomically replaced every --checkpoint-every steps)
  checkpoints/previous.ckpt  the checkpoint before it (kept in case last.ckpt is damaged)
  previews/step_NNNNN.png    the current render every --preview-every steps
  renders/view_NN.png        a ring of views of the final scene
  config.json                the full resolved configuration
  mesh.glb                   the textured mesh of the final scene (--mesh-format glb|obj|ply, --no-mesh)

``refine RUN`` is stage 2: the volume of a ``generate`` run becomes a deformable tetrahedral grid whose mesh is
refined through the rasterizer (writes the same files; its mesh is the refined mesh itself).
``texture MESH`` paints a texture onto a user's mesh (fixed geometry); its mesh is that mesh, in its own units.
``export`` writes the textured mesh of a saved run (GLB, OBJ + MTL + PNG, or PLY); ``render`` a ring of views.
``batch PROMPTS`` turns a file of prompts into one such run folder each, in local worker processes or on a Ray
cluster, with a manifest and ``--resume`` (``csd_backend/batch``).

Every phase shows a progress bar on stderr (training, views, and the export stages extraction, simplification,
vertex colors, UVs, baking); ``--quiet`` hides them. Errors are one ``error: ...`` line, engine warnings
``warning: ...`` lines. Ctrl-C and SIGTERM stop a command with a one-line message (training keeps a checkpoint).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

from .cli_parser import build_parser, export_settings
from .errors import CSDError, ConfigError, DiskFullError, ModelNotFoundError
from .runs.flags import flag_hint
from .runs.folders import check_out_dir, quoted, remove_empty
from .runs.life import open_new_run, open_resumed_run, train_run
from .runs.outputs import (RunOutputs, export_mesh, finish_run, render_views, run_export_config, save_png,
                           view_name)
from .runs.progress import echo, engine_warnings, quiet_third_party
from .runs.stopping import raise_pending, signals_interrupt, stopped

def cmd_generate(args) -> int:
    outputs = RunOutputs.from_args(args).validate()  # every output flag before anything slow runs
    try:
        opt, out, lock = open_resumed_run(args) if args.resume else open_new_run(args)
    except KeyboardInterrupt:
        return stopped("before the run started; nothing was trained.")
    try:
        return _train_and_finish(args, opt, out, outputs)
    finally:
        lock.release()


def _train_and_finish(args, opt, out: Path, outputs: RunOutputs) -> int:
    t0, start = time.time(), opt.step
    try:
        scene = train_run(opt, out, args.quiet)
    except KeyboardInterrupt:
        ckpt = opt.checkpoint_path
        if opt.saved_step is not None:
            kept = f"checkpoint at step {opt.saved_step} kept in {ckpt}"
        elif ckpt.is_file():
            kept = f"the last checkpoint is kept in {ckpt}"
        else:
            kept = "no checkpoint yet: --resume restarts it from step 0 with its config.json"
        return stopped(f"at step {opt.step}; {kept}. Continue with: python -m csd_backend generate --resume "
                       f"{quoted(out)}")
    except DiskFullError as e:
        raise DiskFullError(f"{e}: python -m csd_backend generate --resume {quoted(out)}", e.path, e.free) from e
    phase = ["while rendering the views"]
    try:  # a resumed run with nothing left to train only writes what is missing
        written = finish_run(scene, opt, out, outputs, phase=lambda text: phase.__setitem__(0, text),
                             only_missing=opt.step == start)
    except KeyboardInterrupt:
        return stopped(f"{phase[0]}; the run itself is complete and its checkpoint is saved in "
                       f"{opt.checkpoint_path}. Write the missing views and mesh later with: python -m csd_backend "
                       f"generate --resume {quoted(out)}")
    except DiskFullError as e:
        raise DiskFullError(f"{e}. The training is complete and its checkpoint is saved in {opt.checkpoint_path}; "
                            f"once there is space, write the missing views and mesh with: python -m csd_backend "
                            f"generate --resume {quoted(out)}", e.path, e.free) from e
    trained = f"{opt.step - start} steps in {time.time() - t0:.1f} s" if opt.step > start else "nothing to train"
    echo(f"done: {trained}; checkpoint {opt.checkpoint_path}; " + (
        f"renders in {out / 'renders'}" if outputs.views else "no renders (--views 0)")
        + ("" if written["renders"] or not outputs.views else " (already there)"))
    return 0


def cmd_refine(args) -> int:
    """Stage 2 from a stage-1 run: ``generate --init-scene RUN`` with a stage-2 preset (the volume is converted
    to a DMTet grid) and, unless given, the prompts and model of that run."""
    from .optimize import load_scene

    if not args.out:
        raise ConfigError("--out", "give an output folder for the refined run")
    scene, stage1 = load_scene(args.run)
    if scene.kind not in ("volume", "gaussians"):
        raise ConfigError("run", f"{args.run} holds a {scene.kind} scene, not a stage-1 volume or Gaussian splats; "
                                 f"refine a run made by `generate` (continue a refine run with: generate --resume "
                                 f"{quoted(args.run)})")
    del scene
    g = stage1.guidance
    for flag, value in (("prompt", g.prompt), ("negative_prompt", g.negative_prompt),
                        ("model", stage1.prior.model), ("model_config", stage1.prior.model_config)):
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    args.preset_given, args.preset = args.preset is not None, args.preset or "csd-refine-object"
    args.init_scene, args.resume, args.source_prompt = args.run, None, None
    return cmd_generate(args)


def cmd_texture(args) -> int:
    """Texture a user's mesh: a fixed-mesh scene optimised with a texturing preset (the same run as generate)."""
    from .convert.mesh_file import mesh_scene, read_mesh_file

    if not args.out:
        raise ConfigError("--out", "give an output folder for the textured run")
    args.preset_given, args.preset = args.preset is not None, args.preset or "csd-texture"

    def start_scene(config):  # once the output folder is checked; the texture's first weights follow the seed
        size = Path(args.mesh).stat().st_size if Path(args.mesh).is_file() else 0
        if size > 10e6 and not args.quiet:
            echo(f"reading {args.mesh} ({size / 1e6:.0f} MB) ...")
        vertices, faces = read_mesh_file(args.mesh)
        return mesh_scene(vertices, faces, config.scene, y_up=not args.z_up, name=Path(args.mesh).name,
                          seed=config.optim.seed)

    args.start_scene = start_scene
    args.init_scene, args.resume, args.source_prompt = None, None, None
    return cmd_generate(args)


# ------------------------------------------------------------------------------------------ render, export
def cmd_render(args) -> int:
    from .optimize import load_scene

    out = Path(args.out)
    RunOutputs(views=args.views, view_size=args.size).validate(flags={"views": "--views", "view_size": "--size"},
                                                              at_least_one_view=True)
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError("--out", f"{out} exists and is not empty; outputs are never overwritten. Give a new or "
                                   "empty folder.")
    created = check_out_dir(out)
    try:
        scene, config = load_scene(args.checkpoint)
        raise_pending()
    except BaseException:
        remove_empty(created)
        raise
    written = []

    def save(i, img):
        path = out / view_name(i)
        save_png(img, path)
        written.append(path)

    try:
        render_views(scene, args.views, args.size, config.camera, args.shading, config.render, None, args.quiet,
                     save)
    except KeyboardInterrupt:
        return stopped(f"after {len(written)} of {args.views} views (written to {out}).")
    echo(f"wrote {len(written)} views to {out}")
    return 0


def cmd_export(args) -> int:
    from .export import save_mesh, save_mesh_unique
    from .optimize import load_scene

    given = export_settings(args)
    out = Path(args.out)
    suffix = out.suffix.lower().lstrip(".")
    is_file = suffix in ("glb", "obj", "ply") and not out.is_dir()
    fmt = args.format or (suffix if is_file else "glb")
    if is_file and args.format and args.format != suffix:
        raise ConfigError("--format", f"{args.format} does not match the suffix of --out {out.name}")
    if is_file and out.exists():  # fail before the (long) extraction
        raise ConfigError("--out", f"{out} exists; outputs are never overwritten. Choose another name or a folder.")
    if is_file:
        from .export.writers import check_portable_name

        check_portable_name(out.name, "--out")
    created = check_out_dir(out.parent if is_file else out)
    try:
        scene, config = load_scene(args.checkpoint)
        raise_pending()
    except BaseException:
        remove_empty(created)
        raise
    t0 = time.time()
    try:
        mesh = export_mesh(scene, run_export_config(config.preset, **given), args.quiet)
        path = save_mesh(mesh, out, fmt) if is_file else save_mesh_unique(mesh, out, "mesh", fmt)
    except KeyboardInterrupt:
        return stopped("before the mesh was written; nothing was written.")
    echo(f"wrote {path}: {mesh.num_vertices} vertices, {mesh.num_faces} faces, threshold {mesh.threshold:.4g}, "
         f"{time.time() - t0:.1f} s")
    return 0


def cmd_batch(args) -> int:
    """Many prompts, one run folder each (``csd_backend/batch``)."""
    from .batch.driver import cmd_batch as run_batch

    return run_batch(args)


def cmd_presets(args) -> int:
    from .presets import PRESETS

    print(json.dumps(PRESETS, indent=2, allow_nan=False))
    return 0


def try_without_weights() -> str:
    """What a user without model weights can run (printed under every "model not found" error)."""
    from .priors import TOY_PROMPTS

    known = ", ".join(f'"{p}"' for p in TOY_PROMPTS)
    return ("to try the tool without downloading weights, use the small prior shipped with it: --model toy (it knows "
            f"{known}; e.g. --prompt \"a green cone\" --preset preview-cpu), or --model analytic (an exact test "
            "prior that only knows colours)")


def entry() -> None:
    """The process's entry (``python -m csd_backend``, ``csd3d``): ``main``, then exit with its code. ``kill -USR1
    PID`` prints every thread's stack to stderr and the command goes on (to see where a run that seems stuck is)."""
    import faulthandler

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    sys.exit(main(exiting=True))


def main(argv: Optional[List[str]] = None, exiting: bool = False) -> int:
    """Run one command; returns its exit code. ``exiting``: the process ends with it (``entry``), so a Ctrl-C that
    arrives once the command is over is ignored."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = {"generate": cmd_generate, "refine": cmd_refine, "texture": cmd_texture, "render": cmd_render,
               "export": cmd_export, "batch": cmd_batch, "presets": cmd_presets}[args.command]
    if getattr(args, "quiet", False):
        quiet_third_party()
    with engine_warnings(), signals_interrupt(exiting=exiting):
        if os.environ.get("CSD_DEBUG"):
            return command(args)
        try:
            return command(args)
        except DiskFullError as e:  # not bad input: the command failed on the way
            print(f"error: {e}", file=sys.stderr)
            return 1
        except CSDError as e:
            print(f"error: {e}{flag_hint(e)}", file=sys.stderr)
            if isinstance(e, ModelNotFoundError):
                print(f"hint: {try_without_weights()}", file=sys.stderr)
            return 2
        except OSError as e:  # a full disk, a permission changed meanwhile, ...
            print(f"error: {e} (set CSD_DEBUG=1 for the traceback)", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return stopped("before the command finished.")
