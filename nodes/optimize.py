"""CSD Optimize: runs one optimisation stage (text-to-3D, the SDS baseline, or an edit) with live progress,
cancellation and resumable checkpoints under ``output/csd3d/runs``."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from csd_backend.config import OptimConfig
from csd_backend.presets import preset_names

from . import _common as c

_DEFAULT_PRESET = "csd-coarse"
_SEED_MAX = 2**63 - 1


class CSDOptimize:
    DESCRIPTION = ("Optimises the scene against the diffusion prior with the guidance (one stage). The preset gives "
                   "every setting without a widget (renderer, loss weights, warm-ups); its step-valued schedules are "
                   "stretched to `steps`. The input scene is never modified: a trained copy is returned. While it "
                   "runs, the progress bar shows a live render; Cancel stops it within a step, keeping a checkpoint "
                   "in output/csd3d/runs/<run_name>_NNNNN, and `resume` continues the latest run of that name.")
    CATEGORY = c.CATEGORY
    FUNCTION = "optimize"
    RETURN_TYPES = (c.SCENE, "IMAGE")
    RETURN_NAMES = ("scene", "preview")
    OUTPUT_TOOLTIPS = ("The trained scene.",
                       "A render of the trained scene from the evaluation view, at 4× the training render size "
                       "(64² → 256², at most 512²). Use CSD Render Views for other sizes and views.")

    @classmethod
    def INPUT_TYPES(cls):
        d = OptimConfig()
        return {
            "required": {
                "prior": (c.PRIOR, {"tooltip": "from CSD Load Diffusion Model"}),
                "guidance": (c.GUIDANCE, {"tooltip": "from CSD Guidance"}),
                "scene": (c.SCENE, {"tooltip": "a new scene, or a trained one to continue or edit (not modified)"}),
                "cameras": (c.CAMERAS, {"tooltip": "from CSD Cameras"}),
                "preset": c.combo_input(preset_names(), _DEFAULT_PRESET,
                                        "csd-coarse: the paper's stage 1; sds-dreamfusion: the baseline; csd-edit: "
                                        "editing; preview-cpu: a small fast run"),
                "steps": c.int_input(d.steps, 1, 10_000_000, "optimisation steps (spec: 10000); the preset's "
                                                             "schedules are stretched to this length"),
                "lr": c.float_input(d.lr, 1e-6, 10.0, 0.0001, "Adam learning rate (CSD: 0.001, SDS: 0.01)",
                                    round=False),
                "seed": c.int_input(d.seed, 0, _SEED_MAX, "seed of every random draw (cameras, timesteps, noise, "
                                                          "initial weights of a new scene)",
                                    control_after_generate=False),
                "checkpoint_every": c.int_input(d.checkpoint_every, 0, 10_000_000,
                                                "save a resumable checkpoint every N steps (0: only at the end "
                                                "and on cancel)"),
                "preview_every": c.int_input(10, 0, 10_000_000, "send a live preview of the current render every "
                                                                "N steps (0: never); it is enlarged (nearest "
                                                                "neighbour, 64² → 512²) to be viewable"),
                "run_name": c.string_input("csd_run", "runs are saved in output/csd3d/runs/<run_name>_NNNNN"),
                "resume": c.bool_input(False, "continue the latest checkpoint of run_name (its saved settings are "
                                              "used; steps may extend it) instead of starting a new run"),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, resume=False, run_name=None, **kwargs):
        if resume and run_name:  # the checkpoint on disk is an input too
            return c.file_signature(c.latest_checkpoint(run_name))
        return ""

    @classmethod
    def VALIDATE_INPUTS(cls, run_name=None, resume=None):
        if run_name is None:
            return True
        err = c.error_text(c.check_run_name, run_name)
        if err:
            return err
        if resume and c.latest_checkpoint(run_name) is None:
            folders = c.run_folders(run_name)
            where = (f"its newest run {folders[-1]} has no checkpoint (it stopped before the first one)" if folders
                     else f"there is no run '{run_name}' in {c.runs_directory()}")
            return f"resume: {where}; turn resume off to start a new run"
        return True

    # ------------------------------------------------------------------------------------------------ config
    @staticmethod
    def run_config(prior, guidance, scene, cameras, preset, steps, lr, seed, checkpoint_every, preview_every):
        """The full RunConfig of a new run (validated; errors name the node input)."""
        from csd_backend.errors import ConfigError
        from csd_backend.presets import get_preset

        where = "CSD Optimize"
        try:
            cfg = get_preset(preset).with_steps(int(steps))
        except ConfigError as e:
            raise c.named_error(e, where) from e
        if not isinstance(guidance, c.GuidanceSpec):
            raise ConfigError("guidance", f"expected the output of CSD Guidance, got {type(guidance).__name__}")
        guidance.validate()
        cfg = cfg.replace(
            guidance=guidance.overrides(int(steps)),
            camera={k: getattr(cameras, k) for k in c.CAMERA_FIELDS},
            scene=dataclasses.asdict(scene.cfg),
            optim={"lr": float(lr), "seed": int(seed), "checkpoint_every": int(checkpoint_every),
                   "preview_every": int(preview_every)},
            prior={"model": str(getattr(prior, "source", "") or getattr(prior, "name", "")),
                   "resolution": getattr(prior, "resolution", None)},
        )
        return c.validate_config(cfg, where)

    # --------------------------------------------------------------------------------------------------- run
    @c.autograd_allowed
    def optimize(self, prior, guidance, scene, cameras, preset, steps, lr, seed, checkpoint_every, preview_every,
                 run_name, resume, unique_id=None):
        from csd_backend.errors import Cancelled, ConfigError
        from csd_backend.io import atomic_write
        from csd_backend.optimize import Optimization
        from csd_backend.render.views import render_ring

        c.check_run_name(run_name)
        try:
            if resume:
                ckpt = c.latest_checkpoint(run_name)
                if ckpt is None:
                    raise ConfigError("resume", f"there is no checkpoint of run '{run_name}' in {c.runs_directory()}")
                opt = Optimization.resume(ckpt, prior, steps=int(steps))
                c.log.info("CSD Optimize: resuming %s at step %d of %d (the run's saved settings are used)",
                           opt.out_dir, opt.step, opt.config.optim.steps)
            else:
                cfg = self.run_config(prior, guidance, scene, cameras, preset, steps, lr, seed, checkpoint_every,
                                      preview_every)
                untrained = bool(getattr(scene, c.UNTRAINED_ATTR, False))
                out_dir = c.new_run_folder(run_name)
                # an untrained scene is re-initialised from the seed (like the command line); a trained one is copied
                try:
                    opt = Optimization(cfg, prior, scene=None if untrained else scene, out_dir=out_dir)
                except BaseException:
                    out_dir.rmdir()  # still empty: leave no run folder behind for a run that never started
                    raise
                text = json.dumps(opt.config.to_dict(), indent=2, allow_nan=False)  # strict JSON
                atomic_write(out_dir / "config.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
                c.log.info("CSD Optimize: run %s, %d steps", out_dir, cfg.optim.steps)
        except ConfigError as e:
            named = c.named_error(e, "CSD Optimize")
            if named is e:
                raise
            raise named from e

        total = opt.config.optim.steps
        bar = c.Progress(total, node_id=unique_id)
        every = int(preview_every)
        if opt.step > 0:
            bar.update(opt.step, total)

        def on_step(info):
            show = every > 0 and info.preview is not None and (info.step % every == 0 or info.step == info.total)
            bar.update(info.step, info.total, info.preview[0] if show else None)

        try:
            trained = opt.run(progress=on_step, cancel=c.processing_interrupted)
        except Cancelled:  # the engine saved its checkpoint before raising
            c.log.info("CSD Optimize: cancelled at step %d; resume from %s", opt.step, opt.checkpoint_path)
            c.raise_interrupt()
            raise
        except BaseException as e:
            if c.is_interrupt(e):  # raised by ComfyUI's progress hook; the engine saved the checkpoint already
                c.log.info("CSD Optimize: cancelled at step %d; resume from %s", opt.step, opt.checkpoint_path)
            raise
        trained = opt.trained_scene()  # a detached copy: no gradients held while ComfyUI caches the output
        cam = opt.config.camera
        size = c.preview_render_size(cam.height, cam.width)  # 64² training renders → a 256² render
        preview = render_ring(trained, 1, size, cam.eval_elevation, cam.eval_distance, cam.eval_fovy,
                              render_cfg=opt.config.render)
        return (trained, preview)


NODE_CLASS_MAPPINGS = {"CSDOptimize": CSDOptimize}
NODE_DISPLAY_NAME_MAPPINGS = {"CSDOptimize": "CSD Optimize"}
