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

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

from .errors import CSDError, ConfigError, ModelNotFoundError

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


def _parse_value(text: str, key: str = "--set"):
    """A --set value: JSON when it parses (numbers, lists, true/false, null), else the text itself. NaN and
    ±Infinity (which Python's JSON reader accepts) are refused, naming the field."""
    from .io import non_finite_path

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    bad = non_finite_path(value)
    if bad is not None:
        where = "" if bad == "value" else f" (at {bad})"
        raise ConfigError(key, f"{text!r} is not a finite number{where}; NaN and Infinity are not allowed")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m csd_backend",
                                description="Text-to-3D with Classifier Score Distillation (CSD), without ComfyUI.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="optimise a 3D scene from a text prompt", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_flags(g, "csd-coarse")
    g.add_argument("--resume", default=None,
                   help="a run folder or checkpoint to continue (checkpoints/previous.ckpt too). Other flags may be "
                        "repeated if their values equal the saved run's; --steps sets where it ends (more extends "
                        "it; fewer than planned ends it early, with a warning); --model/--device/--dtype may change. "
                        "A run stopped before its first checkpoint restarts from step 0 with its config.json")
    g.add_argument("--init-scene", default=None, help="start from the scene of a run folder or checkpoint (editing)")

    r = sub.add_parser("refine", help="stage 2: refine a stage-1 run as a mesh (DMTet + rasterizer)",
                       epilog=REFINE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("run", help="the stage-1 run folder or checkpoint to refine")
    _add_run_flags(r, "csd-refine-object")

    t = sub.add_parser("texture", help="paint a texture onto your own mesh (its geometry stays fixed)",
                       epilog=TEXTURE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("mesh", help="a .glb/.gltf/.obj/.ply/.stl/.off file")
    t.add_argument("--z-up", action="store_true",
                   help="the file is Z-up (default: Y-up, glTF's convention, which most OBJ/PLY files follow)")
    _add_run_flags(t, "csd-texture")

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
    _add_export_flags(x)

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
    _add_run_flags(b, "csd-coarse", batch=True)

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


def _add_run_flags(p: argparse.ArgumentParser, default_preset: str, batch: bool = False) -> None:
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
                        "architecture to take the component configs from")
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
    p.add_argument("--mesh-resolution", type=int, default=None, help="marching-cubes grid of that mesh (default 256)")
    p.add_argument("--mesh-texture-size", type=int, default=None,
                   help="its texture size (default 1024; 0: vertex colours only)")


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
        out.setdefault(section, {})[name] = _parse_value(value, key)
    return out


# ------------------------------------------------------------------------------------------ output helpers
#: previews (and tiny renders) are enlarged to at least this many pixels on their shorter side
MIN_PNG_SIDE = 256


def _save_png(image, path: Path, min_side: int = 0) -> None:
    """Save an ``[H, W, 3]`` image in [0, 1]; with ``min_side`` enlarged by the smallest integer factor that makes
    its shorter side at least that long (nearest neighbour: every render pixel becomes a k×k block)."""
    import numpy as np
    from PIL import Image

    from .io import atomic_write

    arr = (image.clamp(0, 1).numpy() * 255 + 0.5).astype("uint8")
    short = min(arr.shape[0], arr.shape[1])
    if min_side and 0 < short < min_side:
        k = -(-min_side // short)
        arr = np.repeat(np.repeat(arr, k, axis=0), k, axis=1)
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def _missing_dirs(path: Path) -> List[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    out = []
    p = path
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def _check_out_dir(path: Path, flag: str = "--out") -> List[Path]:
    """Make sure ``path`` is (or can become) a writable folder, before anything slow runs. Returns the folders it
    created (deepest first) so that a run that fails before it starts can remove them again."""
    if path.exists() and not path.is_dir():
        raise ConfigError(flag, f"{path} is a file, not a folder; give a folder (new or empty)")
    created = _missing_dirs(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(flag, f"cannot create the folder {path}: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".csd-write-test-", dir=str(path))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        _remove_empty(created)
        raise ConfigError(flag, f"cannot write into {path}: {e.strerror or e}") from None
    return created


def _remove_empty(folders: List[Path]) -> None:
    for p in folders:  # deepest first
        try:
            p.rmdir()
        except OSError:
            return


def _bar(quiet: bool, **kwargs):
    """A tqdm progress bar on stderr, or None with --quiet (or without tqdm)."""
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(file=sys.stderr, dynamic_ncols=True, **kwargs)


def _progress_printer(total: int, start: int, quiet: bool):
    bar = _bar(quiet, total=total, initial=start, unit="step", desc="training")
    if bar is None:
        return None, lambda info: None

    def update(info):
        bar.update(1)
        bar.set_postfix(loss=f"{info.losses['total']:.4f}", shading=info.shading)
    return bar, update


class _StageBars:
    """``progress(fraction, stage)`` for ``extract_textured_mesh``: one bar per export stage."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.stage = None

    def __call__(self, fraction: float, stage: str) -> None:
        from .export.pipeline import stage_fraction

        _raise_pending()

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = _bar(self.quiet, total=100, desc=stage, unit="%",
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}]")
        if self.bar is not None:
            n = int(round(100 * stage_fraction(fraction, stage)))
            if n > self.bar.n:
                self.bar.update(n - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(100 - self.bar.n)
            self.bar.close()
            self.bar = None


def _render_views(scene, n_views: int, size: int, camera_cfg, shading: str, render_cfg, renderer, quiet: bool,
                  save) -> int:
    """Render a ring of views one at a time (a tick of the "views" bar each) and ``save(index, image)`` each as
    soon as it is done."""
    from .render.cameras import orbit_cameras
    from .render.views import prepare_renderer, render_cameras

    c = camera_cfg
    cams = orbit_cameras(n_views, c.eval_elevation, c.eval_distance, c.eval_fovy, size, size)
    bar = _bar(quiet, total=n_views, desc="views", unit="view")
    try:
        renderer = prepare_renderer(scene, render_cfg, renderer)
        for i in range(n_views):
            _raise_pending()
            save(i, render_cameras(scene, cams[i], shading, render_cfg, renderer)[0])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return n_views


def _export(scene, config, quiet: bool):
    from .export import extract_textured_mesh

    bars = _StageBars(quiet)
    try:
        return extract_textured_mesh(scene, config, progress=bars)
    finally:
        bars.close()


# ------------------------------------------------------------------------------------------ signals
#: the signal that stopped the command; while ``defer()`` is true (the parameter update of a step) a signal is
#: only recorded ("pending") and raised at the end of the step, so that the checkpoint holds complete weights
_STOP = {"signal": None, "pending": False, "defer": None}


@contextlib.contextmanager
def _signals_interrupt():
    """While the command runs, SIGTERM (``timeout``, job schedulers, ``kill``) raises KeyboardInterrupt like
    Ctrl-C, so a run saves its checkpoint and exits with the one-line message; neither signal cuts a parameter
    update in half. The previous handlers come back afterwards."""
    _STOP.update(signal=None, pending=False, defer=None)
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        name = "SIGTERM" if signum == getattr(signal, "SIGTERM", None) else "SIGINT"
        first = _STOP["signal"] is None
        _STOP["signal"] = _STOP["signal"] or name
        # pending until the command reports the stop: if some library swallows the KeyboardInterrupt (a bare
        # except), the training loop raises it again at the end of the step
        _STOP["pending"] = True
        defer = _STOP["defer"]
        if (defer is not None and defer()) or _in_import(frame):
            return  # raised at the next safe point: the end of the step, or of the import
        if first or name == "SIGINT":  # a second SIGTERM does not break the checkpoint the first one saves
            raise KeyboardInterrupt

    installed = []
    try:
        for sig in (getattr(signal, "SIGTERM", None), signal.SIGINT):
            if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                installed.append((sig, signal.signal(sig, on_signal)))
        yield
    finally:
        for sig, previous in installed:
            signal.signal(sig, previous)
        _STOP.update(pending=False, defer=None)


def _in_import(frame) -> bool:
    """True while a module is being imported: an exception there can leave a half-initialised extension module
    behind (and some imports swallow it), so the signal waits for the next safe point."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _raise_pending() -> None:
    """Raise the interrupt a signal asked for during a parameter update, now that the step is complete."""
    if _STOP["pending"]:
        _STOP["pending"] = False
        raise KeyboardInterrupt


def _stopped(what: str) -> int:
    """Print how the command was stopped (one line) and return its exit code."""
    _STOP["pending"] = False
    by = "stopped by SIGTERM" if _STOP["signal"] == "SIGTERM" else "interrupted"
    print(f"\n{by} {what}", file=sys.stderr)
    return 143 if _STOP["signal"] == "SIGTERM" else 130


def _q(path) -> str:
    return shlex.quote(str(path))


# ------------------------------------------------------------------------------------------ generate
#: settings that may differ from the saved run on --resume (they do not change what is trained)
_RESUME_FREE = {"prior.model", "prior.model_config", "prior.device", "prior.dtype", "optim.steps"}
_FLAG_FIELDS = {"prompt": "guidance.prompt", "negative_prompt": "guidance.negative_prompt",
                "source_prompt": "guidance.source_prompt", "seed": "optim.seed",
                "preview_every": "optim.preview_every", "checkpoint_every": "optim.checkpoint_every",
                "resolution": "prior.resolution", "model": "prior.model", "model_config": "prior.model_config",
                "device": "prior.device", "dtype": "prior.dtype", "controlnet": "prior.controlnet",
                "controlnet_scale": "prior.controlnet_scale"}


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _build_config(args, preset: str, steps: Optional[int], init_scene_cfg=None):
    """The configuration the flags describe, built as for a new run: preset, --set, the flags, then --steps
    (stretching the schedules unless --no-rescale-schedules), then the scene settings of --init-scene."""
    from .presets import get_preset

    config = get_preset(preset)
    over = _overrides(args.set)
    guid = over.setdefault("guidance", {})
    for key in ("prompt", "negative_prompt", "source_prompt"):
        if getattr(args, key) is not None:
            guid[key] = getattr(args, key)
    pri = over.setdefault("prior", {})
    for key in ("model", "model_config", "device", "dtype", "resolution", "controlnet", "controlnet_scale"):
        if getattr(args, key) is not None:
            pri[key] = getattr(args, key)
    opt_over = over.setdefault("optim", {})
    for key in ("seed", "preview_every", "checkpoint_every"):
        if getattr(args, key) is not None:
            opt_over[key] = getattr(args, key)
    config = config.replace(**over)
    if steps is not None:
        config = config.with_steps(steps, rescale_schedules=not args.no_rescale_schedules)
    if init_scene_cfg is not None:  # an edited scene keeps its own settings (as Optimization does)
        config = config.replace(scene=dataclasses.asdict(init_scene_cfg))
    return config


def _given_fields(args) -> set:
    """The configuration fields the command line sets explicitly (a preset sets every field it names)."""
    from .config import SceneConfig
    from .presets import PRESETS

    fields = set()
    if args.preset:
        fields |= {"preset"} | set(_flatten(PRESETS[args.preset]))
    fields |= {field for flag, field in _FLAG_FIELDS.items() if getattr(args, flag) is not None}
    fields |= {item.split("=", 1)[0] for item in args.set}
    if args.init_scene:
        fields |= {f"scene.{f.name}" for f in dataclasses.fields(SceneConfig)}
    return fields


def _resume_target(path: Path):
    """(run folder, checkpoint or None) of ``--resume PATH``."""
    from .io import find_checkpoint
    from .optimize import RUN_CONFIG_FILE, run_checkpoint

    if path.is_dir():
        ckpt = run_checkpoint(path)
        if ckpt is None and not (path / RUN_CONFIG_FILE).is_file():
            raise ConfigError("--resume", f"{path} is not a run folder: it has no checkpoints/last.ckpt and no "
                                          f"{RUN_CONFIG_FILE}. Pass the folder written by `generate --out`.")
        return path, ckpt
    ckpt = find_checkpoint(path)
    return (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent), ckpt


def _check_resume_flags(args, run_dir: Path, saved) -> None:
    """Refuse flags whose values differ from the saved run (naming the field, the saved and the new value).

    The flags are turned into a configuration exactly as for a new run; schedules are stretched to the run's
    planned length (its config.json), which is what the original --steps did. Flags left out keep the saved
    values; --steps sets where the resumed run ends; the model, device and dtype may change."""
    from .optimize import load_scene
    from .presets import PRESETS

    if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
        raise ConfigError("--out", f"{args.out} is not the folder of the run being resumed ({run_dir}); a resumed "
                                   "run writes into its own folder. Leave --out out, or start a new run there "
                                   "without --resume.")
    given = _given_fields(args) - _RESUME_FREE
    if not given:
        return
    preset = args.preset or (saved.preset if saved.preset in PRESETS else "csd-coarse")
    init_cfg = load_scene(args.init_scene)[0].cfg if args.init_scene else None
    # --steps of the original command stretched the schedules to the run's planned length: do the same
    new = _flatten(_build_config(args, preset, saved.optim.steps, init_cfg).to_dict())
    old = _flatten(saved.to_dict())
    names = sorted(new, key=lambda name: name != "preset")  # the preset first: it explains the rest
    diffs = [f"{name}: saved {old.get(name)!r}, new {new[name]!r}" for name in names
             if name in given and old.get(name) != new[name]]
    if diffs:
        more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise ConfigError("--resume", f"these settings differ from the saved run {run_dir}: "
                                      f"{'; '.join(diffs[:6])}{more}. A resumed run keeps its saved settings: "
                                      "leave these flags out (or give the saved values), or start a new run "
                                      "in another --out folder.")


def _resume(args):
    """(Optimization, run folder) for ``generate --resume``; checks every flag before the model is loaded."""
    from .config import RunConfig
    from .io import load_checkpoint
    from .optimize import RUN_CONFIG_FILE, read_run_config
    from .priors import load_prior

    run_dir, ckpt = _resume_target(Path(args.resume))
    state_config = RunConfig.from_dict(load_checkpoint(ckpt)["config"]) if ckpt is not None else None
    try:  # the settings the run started with (config.json); the checkpoint's otherwise
        saved = read_run_config(run_dir) if (run_dir / RUN_CONFIG_FILE).is_file() else state_config
    except CSDError:
        if state_config is None:
            raise
        saved = state_config
    _check_resume_flags(args, run_dir, saved)
    _check_out_dir(run_dir)
    prior_over = {k: getattr(args, k) for k in ("model", "model_config", "device", "dtype")
                  if getattr(args, k) is not None}
    base = state_config if state_config is not None else saved
    prior = load_prior(base.replace(prior=prior_over).prior)
    _raise_pending()
    opt = continue_run(ckpt if ckpt is not None else run_dir, prior, steps=args.steps, prior_over=prior_over)
    print(f"resuming {run_dir} at step {opt.step} of {opt.config.optim.steps}", file=sys.stderr)
    return opt, run_dir


def _release_text_encoder(prior) -> None:
    """Every prompt of the run is encoded when the Optimization is built: a prior with a large text encoder
    (DeepFloyd IF's T5-XXL, ~10 GB) frees it then, as threestudio does."""
    release = getattr(prior, "release_text_encoder", None)
    if release is not None:
        release()


def _new_run(args):
    """(Optimization, run folder) for a new run; the folder is checked (and made) before the model loads."""
    from .optimize import load_scene
    from .priors import load_prior
    from .scene_kinds import starting_scene

    if not args.out:
        raise ConfigError("--out", "give an output folder (or --resume a run)")
    out = Path(args.out)
    config = _build_config(args, args.preset or "csd-coarse", args.steps)
    config.validate(require_model=True)
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError("--out", f"{out} exists and is not empty; outputs are never overwritten. "
                                   "Choose a new folder, or continue that run with --resume.")
    created = _check_out_dir(out)
    try:
        scene = getattr(args, "start_scene", None)
        if args.init_scene:
            scene = starting_scene(load_scene(args.init_scene)[0], config.scene)
        _raise_pending()
        prior = load_prior(config.prior)
        _raise_pending()
        opt = start_run(config, prior, out, scene=scene)
    except BaseException:
        _remove_empty(created)  # only what this command created, and only while empty
        raise
    return opt, out


# ------------------------------------------------------------------------------------------ one run
# A run folder is written by these functions, for ``generate`` (one run) and ``batch`` (many, in workers that
# load the prior once): start_run / continue_run, then train_run, then finish_run.
@dataclasses.dataclass
class RunOutputs:
    """What a run writes after training, besides its checkpoint: the ring of views and the mesh (the output flags
    of ``generate``; ``quiet``: no progress bars)."""

    views: int = 8
    view_size: int = 256
    mesh: bool = True
    mesh_format: str = "glb"
    mesh_resolution: Optional[int] = None
    mesh_texture_size: Optional[int] = None
    quiet: bool = False

    @classmethod
    def from_args(cls, args) -> "RunOutputs":
        d = cls()
        given = lambda name, default: default if getattr(args, name, None) is None else getattr(args, name)
        return cls(views=given("views", d.views), view_size=given("view_size", d.view_size),
                   mesh=not getattr(args, "no_mesh", False), mesh_format=given("mesh_format", d.mesh_format),
                   mesh_resolution=getattr(args, "mesh_resolution", None),
                   mesh_texture_size=getattr(args, "mesh_texture_size", None), quiet=bool(getattr(args, "quiet", False)))

    def expected_files(self, out: Path) -> List[Path]:
        """The files a finished run folder holds: its last view and (unless no mesh) its mesh."""
        files = [out / "renders" / f"view_{self.views - 1:02d}.png"] if self.views > 0 else []
        return files + ([out / f"mesh.{self.mesh_format}"] if self.mesh else [])


def start_run(config, prior, out: Path, scene=None, release_text_encoder: bool = True):
    """A new run in the existing, empty folder ``out`` with an already loaded ``prior``: the ``Optimization``, with
    ``config.json`` written (and a checkpoint of ``scene`` when one is given, so a stopped run can resume).
    ``release_text_encoder``: free a large text encoder once the run's prompts are encoded (not when the prior
    goes on to serve other prompts)."""
    from .io import write_json
    from .optimize import RUN_CONFIG_FILE, Optimization

    opt = Optimization(config, prior, scene=scene, out_dir=out)
    if release_text_encoder:
        _release_text_encoder(prior)
    _raise_pending()
    if scene is not None:  # the starting scene exists only here: keep it, so a stopped run can resume
        opt.save_checkpoint()
    write_json(out / RUN_CONFIG_FILE, opt.config.to_dict())
    return opt


def continue_run(target, prior, steps: Optional[int] = None, prior_over: Optional[dict] = None,
                 release_text_encoder: bool = True):
    """The ``Optimization`` of a run folder (or checkpoint) ``target``, continued with ``prior``: from its checkpoint,
    or from step 0 with its config.json when it stopped before the first one. ``prior_over``: the prior settings
    it continues with (model, device, ...), recorded in its next checkpoint."""
    from .optimize import Optimization

    opt = Optimization.resume(target, prior, steps=steps)
    if release_text_encoder:
        _release_text_encoder(prior)
    opt.config = opt.config.replace(prior=prior_over or {})  # the checkpoint records the model it continued with
    return opt


def train_run(opt, out: Path, quiet: bool, on_step=None):
    """Train ``opt`` to its last step and return the scene: a progress bar (unless ``quiet``), a preview PNG every
    ``optim.preview_every`` steps, ``on_step(info)`` after every step. Ctrl-C / SIGTERM raise KeyboardInterrupt
    once the last complete step is checkpointed (a signal inside a parameter update waits for its end)."""
    every = opt.config.optim.preview_every
    bar, update = _progress_printer(opt.config.optim.steps, opt.step, quiet)

    def progress(info):
        _raise_pending()  # a signal during this step's update: stop now (the engine saves the finished step)
        update(info)
        if every and (info.step % every == 0 or info.step == info.total):
            path = out / "previews" / f"step_{info.step:05d}.png"
            if not path.exists():
                _save_png(info.preview[0], path, MIN_PNG_SIDE)
        if on_step is not None:
            on_step(info)

    _STOP["defer"] = lambda: opt.updating
    try:
        _raise_pending()  # a signal that some library swallowed while the run was being set up
        return opt.run(progress=progress)
    finally:
        _STOP["defer"] = None
        if bar is not None:
            bar.close()


def _echo(message: str) -> None:
    print(message, file=sys.stderr)


def finish_run(scene, opt, out: Path, outputs: RunOutputs, echo=_echo, phase=None) -> dict:
    """Write the ring of views (``renders/view_NN.png``; new names when they exist) and the mesh of a trained run.
    Returns ``{"renders": [paths], "mesh": path or None}``. ``echo(line)`` gets the mesh line or the warning that no
    mesh was written; ``phase(text)`` is told what is being done ("while rendering the views", ...)."""
    from .io import unique_path

    written: dict = {"renders": [], "mesh": None}
    if phase is not None:
        phase("while rendering the views")
    _raise_pending()  # a signal during the last step's update

    def save_view(i, img):
        path = out / "renders" / f"view_{i:02d}.png"
        path = path if not path.exists() else unique_path(path.parent, path.stem, ".png")
        _save_png(img, path, MIN_PNG_SIDE)
        written["renders"].append(path)

    # render with the trained occupancy grid (EMA over the whole run), not one refitted from a single pass
    _render_views(scene, outputs.views, outputs.view_size, opt.config.camera, "albedo", opt.config.render,
                  opt.renderer, outputs.quiet, save_view)
    if outputs.mesh:
        if phase is not None:
            phase("while exporting the mesh")
        written["mesh"] = _generate_mesh(outputs, scene, out, echo)
    return written


def cmd_generate(args) -> int:
    try:
        opt, out = _resume(args) if args.resume else _new_run(args)
    except KeyboardInterrupt:
        return _stopped("before the run started; nothing was trained.")

    outputs = RunOutputs.from_args(args)
    t0 = time.time()
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
        return _stopped(f"at step {opt.step}; {kept}. Continue with: python -m csd_backend generate --resume "
                        f"{_q(out)}")
    phase = ["while rendering the views"]
    try:
        finish_run(scene, opt, out, outputs, phase=lambda text: phase.__setitem__(0, text))
    except KeyboardInterrupt:
        return _stopped(f"{phase[0]}; the run itself is complete and its checkpoint is saved in "
                        f"{opt.checkpoint_path}. Later: python -m csd_backend render {_q(out)} --out "
                        f"{_q(out / 'renders')} --views {args.views} --size {args.view_size}; "
                        f"python -m csd_backend export {_q(out)} --out {_q(out)}")
    print(f"done: {opt.step} steps in {time.time() - t0:.1f} s; checkpoint {opt.checkpoint_path}; "
          f"renders in {out / 'renders'}", file=sys.stderr)
    return 0


def cmd_refine(args) -> int:
    """Stage 2 from a stage-1 run: ``generate --init-scene RUN`` with a stage-2 preset (the volume is converted
    to a DMTet grid) and, unless given, the prompts and model of that run."""
    from .optimize import load_scene

    if not args.out:
        raise ConfigError("--out", "give an output folder for the refined run")
    scene, stage1 = load_scene(args.run)
    if scene.kind != "volume":
        raise ConfigError("run", f"{args.run} holds a {scene.kind} scene, not a stage-1 volume; refine a run made "
                                 f"by `generate` (continue a refine run with: generate --resume {_q(args.run)})")
    del scene
    g = stage1.guidance
    for flag, value in (("prompt", g.prompt), ("negative_prompt", g.negative_prompt),
                        ("model", stage1.prior.model), ("model_config", stage1.prior.model_config)):
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    args.preset = args.preset or "csd-refine-object"
    args.init_scene, args.resume, args.source_prompt = args.run, None, None
    return cmd_generate(args)


def cmd_texture(args) -> int:
    """Texture a user's mesh: a fixed-mesh scene optimised with a texturing preset (the same run as generate)."""
    from .presets import get_preset
    from .convert.mesh_file import mesh_scene, read_mesh_file

    if not args.out:
        raise ConfigError("--out", "give an output folder for the textured run")
    args.preset = args.preset or "csd-texture"
    cfg = get_preset(args.preset).replace(**_overrides(args.set)).scene
    vertices, faces = read_mesh_file(args.mesh)
    args.start_scene = mesh_scene(vertices, faces, cfg, y_up=not args.z_up, name=Path(args.mesh).name)
    args.init_scene, args.resume, args.source_prompt = None, None, None
    return cmd_generate(args)


def _generate_mesh(outputs: RunOutputs, scene, out: Path, echo=_echo) -> Optional[Path]:
    """Export the mesh of a finished run as ``out/mesh.<format>`` (a new name when it exists); None when the scene
    has no surface to export (a warning through ``echo`` says how to export later)."""
    from .errors import OutputExistsError
    from .export import ExportConfig, save_mesh, save_mesh_unique

    mesh_over = {k: v for k, v in (("resolution", outputs.mesh_resolution),
                                   ("texture_size", outputs.mesh_texture_size)) if v is not None}
    try:
        mesh = _export(scene, ExportConfig(**mesh_over), outputs.quiet)
        try:
            path = save_mesh(mesh, out / f"mesh.{outputs.mesh_format}", outputs.mesh_format)
        except OutputExistsError:  # a resumed run: keep the earlier mesh
            path = save_mesh_unique(mesh, out, "mesh", outputs.mesh_format)
        echo(f"mesh: {path} ({mesh.num_faces} faces)")
        return path
    except CSDError as e:  # the run itself succeeded; say how to export later
        echo(f"warning: no mesh written: {e}. Export later with: python -m csd_backend export {_q(out)} "
             f"--out {_q(out)} --threshold <value>")
        return None


# ------------------------------------------------------------------------------------------ render, export
def cmd_render(args) -> int:
    from .io import unique_path
    from .optimize import load_scene

    out = Path(args.out)
    created = _check_out_dir(out)
    try:
        scene, config = load_scene(args.checkpoint)
        _raise_pending()
    except BaseException:
        _remove_empty(created)
        raise
    written = []

    def save(i, img):
        path = unique_path(out, "view", ".png")
        _save_png(img, path)
        written.append(path)

    try:
        _render_views(scene, args.views, args.size, config.camera, args.shading, config.render, None, args.quiet,
                      save)
    except KeyboardInterrupt:
        return _stopped(f"after {len(written)} of {args.views} views (written to {out}).")
    print(f"wrote {len(written)} views to {out}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from .export import save_mesh, save_mesh_unique
    from .optimize import load_scene

    cfg = _export_config(args)
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
    created = _check_out_dir(out.parent if is_file else out)
    try:
        scene, _config = load_scene(args.checkpoint)
        _raise_pending()
    except BaseException:
        _remove_empty(created)
        raise
    t0 = time.time()
    try:
        mesh = _export(scene, cfg, args.quiet)
        path = save_mesh(mesh, out, fmt) if is_file else save_mesh_unique(mesh, out, "mesh", fmt)
    except KeyboardInterrupt:
        return _stopped("before the mesh was written; nothing was written.")
    print(f"wrote {path}: {mesh.num_vertices} vertices, {mesh.num_faces} faces, threshold {mesh.threshold:.4g}, "
          f"{time.time() - t0:.1f} s", file=sys.stderr)
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


def quiet_third_party() -> None:
    """``--quiet``: no "Loading weights" bars or advice from diffusers / transformers / huggingface_hub."""
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dl

        dl.set_verbosity_error()
        dl.disable_progress_bar()
    except Exception:  # pragma: no cover - an old or missing diffusers: nothing to silence
        pass
    try:
        import transformers.utils.logging as tl

        tl.set_verbosity_error()
        tl.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class _LevelFormatter(logging.Formatter):
    def format(self, record):
        return f"{record.levelname.lower()}: {record.getMessage()}"


@contextlib.contextmanager
def _engine_warnings():
    """The engine's warnings (logger ``csd_backend``) as ``warning: ...`` lines on stderr."""
    logger = logging.getLogger("csd_backend")
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_LevelFormatter())
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = {"generate": cmd_generate, "refine": cmd_refine, "texture": cmd_texture, "render": cmd_render,
               "export": cmd_export, "batch": cmd_batch, "presets": cmd_presets}[args.command]
    if getattr(args, "quiet", False):
        quiet_third_party()
    with _engine_warnings(), _signals_interrupt():
        if os.environ.get("CSD_DEBUG"):
            return command(args)
        try:
            return command(args)
        except CSDError as e:
            print(f"error: {e}", file=sys.stderr)
            if isinstance(e, ModelNotFoundError):
                print(f"hint: {try_without_weights()}", file=sys.stderr)
            return 2
        except OSError as e:  # a full disk, a permission changed meanwhile, ...
            print(f"error: {e} (set CSD_DEBUG=1 for the traceback)", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return _stopped("before the command finished.")
