"""One run folder's life, shared by ``generate`` (one run) and ``batch`` (many, in workers that load the prior
once): ``open_new_run`` / ``open_resumed_run`` (or ``start_run`` / ``continue_run`` with a loaded prior), then
``train_run``, then ``outputs.finish_run``.

A run folder holds ``config.json`` (the resolved configuration, written when the run starts),
``checkpoints/last.ckpt`` and ``previous.ckpt``, ``previews/step_NNNNN.png``, ``renders/view_NN.png`` and
``mesh.<format>``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from .flags import build_config, check_resume_flags
from .folders import check_out_dir, load_init_scene, remove_empty, resume_target
from .lock import RunLock
from .outputs import MIN_PNG_SIDE, save_png
from .progress import echo, training_bar
from .stopping import deferred, raise_pending

log = logging.getLogger("csd_backend")


def release_text_encoder(prior) -> None:
    """Every prompt of the run is encoded when the Optimization is built: a prior with a large text encoder
    (DeepFloyd IF's T5-XXL, ~10 GB) frees it then, as threestudio does."""
    release = getattr(prior, "release_text_encoder", None)
    if release is not None:
        release()


def start_run(config, prior, out: Path, scene=None, release_encoder: bool = True):
    """A new run in the existing, empty folder ``out`` with an already loaded ``prior``: the ``Optimization``, with
    ``config.json`` written (and a checkpoint of ``scene`` when one is given, so a stopped run can resume).
    ``release_encoder``: free a large text encoder once the run's prompts are encoded (not when the prior goes on
    to serve other prompts)."""
    from ..optimize import Optimization

    opt = Optimization(config, prior, scene=scene, out_dir=out)
    if release_encoder:
        release_text_encoder(prior)
    raise_pending()
    if scene is not None:  # the starting scene exists only here: keep it, so a stopped run can resume
        opt.save_checkpoint()
    opt.write_config(out)
    return opt


def continue_run(target, prior, steps: Optional[int] = None, prior_over: Optional[dict] = None,
                 release_encoder: bool = True):
    """The ``Optimization`` of a run folder (or checkpoint) ``target``, continued with ``prior``: from its checkpoint,
    or from step 0 with its config.json when it stopped before the first one. ``prior_over``: the prior settings
    it continues with (model, device, ...), recorded in its next checkpoint."""
    from ..optimize import Optimization

    opt = Optimization.resume(target, prior, steps=steps)
    if release_encoder:
        release_text_encoder(prior)
    opt.config = opt.config.replace(prior=prior_over or {})  # the checkpoint records the model it continued with
    return opt


def train_run(opt, out: Path, quiet: bool, on_step=None):
    """Train ``opt`` to its last step and return the scene: a progress bar (unless ``quiet``), a preview PNG every
    ``optim.preview_every`` steps, ``on_step(info)`` after every step. Ctrl-C / SIGTERM raise KeyboardInterrupt
    once the last complete step is checkpointed (a signal inside a parameter update waits for its end)."""
    from ..render.shading import shading_label

    every = opt.config.optim.preview_every
    bar, update = training_bar(opt.config.optim.steps, opt.step, quiet)
    compiling = bar is not None and opt.compiles_kernels
    if compiling:
        bar.set_description("training (compiling CPU kernels first: about a minute, seconds once cached)")

    def progress(info):
        nonlocal compiling
        raise_pending()  # a signal during this step's update: stop now (the engine saves the finished step)
        if compiling:  # the first step compiled its kernels
            compiling = False
            bar.desc = "training"
        update(info)
        if every and (info.step % every == 0 or info.step == info.total):
            path = out / "previews" / f"step_{info.step:05d}.png"
            if not path.exists():  # captioned: training switches between colour and shape-only renders
                label = shading_label(opt.config.render, info.shading)
                save_png(info.preview[0], path, MIN_PNG_SIDE, caption=f"step {info.step}: {label}")
        if on_step is not None:
            on_step(info)

    try:
        with deferred(lambda: opt.updating):
            raise_pending()  # a signal that some library swallowed while the run was being set up
            return opt.run(progress=progress)
    finally:
        if bar is not None:
            bar.close()


#: the GPU presets that are a command's default, with the preset of the same stage sized for a CPU and the seconds
#: a step they take on a CPU (measured with the toy prior on the 2-core development machine, 1 torch thread)
CPU_ALTERNATIVES = {"csd-coarse": ("preview-cpu", 80.0), "csd-refine-object": ("refine-cpu", 3.4),
                    "csd-texture": ("texture-cpu", 2.4)}


def duration(seconds: float) -> str:
    """``"about 9 days"``, ``"about 3 hours"``, ``"about 5 minutes"``, ``"under a minute"``."""
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"about {seconds / size:.0f} {unit}"
    return "about a minute" if seconds >= 60 else "under a minute"


def warn_if_gpu_preset_on_cpu(preset: str, config) -> None:
    """No ``--preset`` given and the command's default is a GPU preset while the run goes to the CPU: say at once
    how long that takes and which preset suits a CPU (the run goes on: the user may mean it)."""
    if preset not in CPU_ALTERNATIVES or config.prior.device not in ("auto", "cpu"):
        return
    import torch

    if config.prior.device == "auto" and torch.cuda.is_available():
        return
    alternative, seconds = CPU_ALTERNATIVES[preset]
    steps = config.optim.steps
    took = (f"{duration(steps * seconds)} ({seconds:.0f} s a step measured on a 2-core CPU)" if seconds
            else "many hours")
    log.warning("no --preset given: %s (%d steps) is sized for a GPU and takes %s on this CPU; for a CPU use "
                "--preset %s (stop with Ctrl-C)", preset, steps, took, alternative)


def open_new_run(args):
    """(Optimization, run folder, lock) for a new run of ``generate``'s flags; the folder is checked (and made)
    and locked before the model loads. ``args.start_scene(config)``: makes the scene to start from (``texture``);
    ``args.init_scene``: a run whose scene it starts from (``refine``, editing). Release the lock when done."""
    from ..priors import load_prior
    from ..scene_kinds import starting_scene
    from .progress import conversion_bar

    if not args.out:
        raise ConfigError("--out", "give an output folder (or --resume a run)")
    out = Path(args.out)
    preset = args.preset or "csd-coarse"
    config = build_config(args, preset, args.steps)
    config.validate(require_model=True)
    if not getattr(args, "preset_given", args.preset is not None):
        warn_if_gpu_preset_on_cpu(preset, config)
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError("--out", f"{out} exists and is not empty; outputs are never overwritten. "
                                   "Choose a new folder, or continue that run with --resume.")
    created = check_out_dir(out)
    lock = RunLock(out, f"{args.command} --out {out}")
    try:
        lock.acquire()
        make_scene = getattr(args, "start_scene", None)
        scene = make_scene(config) if make_scene is not None else None
        if args.init_scene:
            scene = load_init_scene(args.init_scene, config.scene)
            progress = conversion_bar(scene, config.scene, args.quiet)
            try:
                scene = starting_scene(scene, config.scene, config.optim.seed, progress=progress)
            finally:
                if progress is not None:
                    progress.close()
        raise_pending()
        prior = load_prior(config.prior)
        raise_pending()
        opt = start_run(config, prior, out, scene=scene)
    except BaseException:
        lock.release()
        remove_empty(created)  # only what this command created, and only while empty
        raise
    return opt, out, lock


def open_resumed_run(args):
    """(Optimization, run folder, lock) for ``generate --resume``; checks every flag and locks the folder before the
    model is loaded. Release the lock when done."""
    from ..config import RunConfig
    from ..io import load_checkpoint
    from ..optimize import RUN_CONFIG_FILE, read_run_config
    from ..priors import load_prior

    run_dir, ckpt = resume_target(Path(args.resume))
    state_config = RunConfig.from_dict(load_checkpoint(ckpt)["config"]) if ckpt is not None else None
    # the settings the run started with (config.json); the checkpoint's when there is none (a damaged one is
    # refused: it is the run's record, and continuing would hide that it was lost)
    saved = read_run_config(run_dir) if (run_dir / RUN_CONFIG_FILE).is_file() else state_config
    check_resume_flags(args, run_dir, saved)
    check_out_dir(run_dir)
    lock = RunLock(run_dir, f"generate --resume {run_dir}").acquire()
    try:
        prior_over = {k: getattr(args, k) for k in ("model", "model_config", "device", "dtype")
                      if getattr(args, k) is not None}
        base = state_config if state_config is not None else saved
        prior = load_prior(base.replace(prior=prior_over).prior)
        raise_pending()
        opt = continue_run(ckpt if ckpt is not None else run_dir, prior, steps=args.steps, prior_over=prior_over)
    except BaseException:
        lock.release()
        raise
    echo(f"resuming {run_dir} at step {opt.step} of {opt.config.optim.steps}")
    return opt, run_dir, lock
