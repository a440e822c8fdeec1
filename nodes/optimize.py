"""CSD Optimize: runs one optimisation stage (text-to-3D, the SDS baseline, or an edit) with live progress,
cancellation and resumable checkpoints under ``output/csd3d/runs``."""
from __future__ import annotations

import dataclasses

from csd_backend.config import OptimConfig
from csd_backend.presets import PRESETS

from . import pack
from .execution import Progress, autograd_allowed, is_interrupt, processing_interrupted, raise_interrupt
from .input_errors import error_text, named_error, validate_config
from .previews import preview_render_size
from .run_folders import (UNTRAINED_ATTR, check_run_name, file_signature, latest_checkpoint, new_run_folder,
                          run_folders, runs_directory)
from .specs import GuidanceSpec, camera_overrides
from .widgets import bool_input, combo_input, float_input, int_input, string_input

_SEED_MAX = 2**63 - 1


def presets_of(*kinds: str) -> list:
    """The presets whose scene is of one of ``kinds`` (volume: stage 1 and editing; gaussians: Gaussian splats;
    dmtet: stage 2; mesh: texturing)."""
    return sorted(name for name, p in PRESETS.items() if p.get("scene", {}).get("kind", "volume") in kinds)


#: the kinds of new scene that CSD 3D Scene makes and a run initialises afresh from its seed
NEW_KINDS = ("volume", "gaussians")


class CSDOptimize:
    DISPLAY = "CSD Optimize"  # the node's name as users see it (errors and the log name it)
    KINDS = NEW_KINDS  # the presets listed: those of these scene kinds (see presets_of)
    DEFAULT_PRESET = "csd-coarse"
    DEFAULT_RUN_NAME = "csd_run"
    PRESET_TOOLTIP = ("csd-coarse: the paper's stage 1; sds-dreamfusion: the baseline; csd-edit: editing (also of "
                      "refined and textured meshes); preview-cpu: a small fast run; csd-gaussian / sds-gaussian / "
                      "gaussian-preview-cpu: 3D Gaussian splats (a new scene from CSD 3D Scene with the same "
                      "preset, or a trained volume converted to splats)")
    DESCRIPTION = ("Optimises the scene against the diffusion prior with the guidance (one stage). The preset gives "
                   "every setting without a widget (renderer, loss weights, warm-ups); its step-valued schedules are "
                   "stretched to `steps`. The input scene is never modified: a trained copy is returned. While it "
                   "runs, the progress bar shows a live render; Cancel stops it within a step, keeping a checkpoint "
                   "in output/csd3d/runs/<run_name>_NNNNN, and `resume` continues the latest run of that name.")
    CATEGORY = pack.CATEGORY
    FUNCTION = "optimize"
    RETURN_TYPES = (pack.SCENE, "IMAGE")
    RETURN_NAMES = ("scene", "preview")
    OUTPUT_TOOLTIPS = ("The trained scene.",
                       "A render of the trained scene from the evaluation view, at 4× the training render size "
                       "(64² → 256², at most 512²). Use CSD Render Views for other sizes and views.")

    @classmethod
    def INPUT_TYPES(cls):
        d = OptimConfig()
        return {
            "required": {
                "prior": (pack.PRIOR, {"tooltip": "from CSD Load Diffusion Model"}),
                "guidance": (pack.GUIDANCE, {"tooltip": "from CSD Guidance"}),
                "scene": (pack.SCENE, {"tooltip": "a new scene, or a trained one to continue or edit (not modified)"}),
                "cameras": (pack.CAMERAS, {"tooltip": "from CSD Cameras"}),
                "preset": combo_input(presets_of(*cls.KINDS), cls.DEFAULT_PRESET, cls.PRESET_TOOLTIP),
                "steps": int_input(d.steps, 1, 10_000_000, "optimisation steps (spec: 10000); the preset's "
                                                           "schedules are stretched to this length"),
                "lr": float_input(d.lr, 1e-6, 10.0, 0.0001, "Adam learning rate (CSD: 0.001, SDS: 0.01)",
                                  round=False),
                "seed": int_input(d.seed, 0, _SEED_MAX, "seed of every random draw (cameras, timesteps, noise, "
                                                        "initial weights of a new scene)",
                                  control_after_generate=False),
                "checkpoint_every": int_input(d.checkpoint_every, 0, 10_000_000,
                                              "save a resumable checkpoint every N steps (0: only at the end "
                                              "and on cancel)"),
                "preview_every": int_input(10, 0, 10_000_000, "send a live preview of the current render every "
                                                              "N steps (0: never); it is enlarged (nearest "
                                                              "neighbour, 64² → 512²) to be viewable"),
                "run_name": string_input(cls.DEFAULT_RUN_NAME,
                                         "runs are saved in output/csd3d/runs/<run_name>_NNNNN"),
                "resume": bool_input(False, "continue the latest checkpoint of run_name (its saved settings are "
                                            "used; steps may extend it) instead of starting a new run"),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, resume=False, run_name=None, **kwargs):
        if resume and run_name:  # the checkpoint on disk is an input too
            return file_signature(latest_checkpoint(run_name))
        return ""

    @classmethod
    def VALIDATE_INPUTS(cls, run_name=None, resume=None):
        if run_name is None:
            return True
        err = error_text(check_run_name, run_name)
        if err:
            return err
        if resume and latest_checkpoint(run_name) is None:
            folders = run_folders(run_name)
            where = (f"its newest run {folders[-1]} has no checkpoint (it stopped before the first one)" if folders
                     else f"there is no run '{run_name}' in {runs_directory()}")
            return f"resume: {where}; turn resume off to start a new run"
        return True

    # ------------------------------------------------------------------------------------------------ config
    @staticmethod
    def preset_config(preset, steps, where: str):
        """The preset's RunConfig stretched to ``steps`` (an error names the node input)."""
        from csd_backend.errors import ConfigError
        from csd_backend.presets import get_preset

        try:
            return get_preset(preset).with_steps(int(steps))
        except ConfigError as e:
            raise named_error(e, where) from e

    @classmethod
    def run_config(cls, prior, guidance, scene, cameras, preset, steps, lr, seed, checkpoint_every, preview_every,
                   where: str = "CSD Optimize"):
        """The full RunConfig of a new run (validated; errors name the node input)."""
        from csd_backend.errors import ConfigError

        cfg = cls.preset_config(preset, steps, where)
        if not isinstance(guidance, GuidanceSpec):
            raise ConfigError("guidance", f"expected the output of CSD Guidance, got {type(guidance).__name__}")
        guidance.validate()
        cfg = cfg.replace(
            guidance=guidance.overrides(int(steps)),
            camera=camera_overrides(cameras, int(steps)) if cameras is not None else {},
            scene=dataclasses.asdict(scene.cfg),
            optim={"lr": float(lr), "seed": int(seed), "checkpoint_every": int(checkpoint_every),
                   "preview_every": int(preview_every)},
            prior={"model": str(getattr(prior, "source", "") or getattr(prior, "name", "")),
                   "resolution": getattr(prior, "resolution", None),
                   "controlnet": getattr(prior, "controlnet_source", None),
                   "lora_base_model": getattr(getattr(prior, "lora_prior", None), "source", None),
                   "controlnet_scale": float(getattr(prior, "controlnet_scale", 1.0))},
        )
        return validate_config(cfg, where)

    # --------------------------------------------------------------------------------------------------- run
    @staticmethod
    def start_scene(scene, preset: str, seed: int = 0):
        """The scene the run starts from: a trained volume becomes a DMTet grid for a stage-2 preset (what it
        initialises afresh, the background, follows ``seed``) and Gaussian splats for a Gaussian preset; a mesh from
        Load Mesh gets the texture field and background of the preset, drawn from ``seed``; a new scene must be of
        the preset's kind (CSD 3D Scene makes the kind of its own preset)."""
        from csd_backend.convert.mesh_file import with_scene_settings
        from csd_backend.errors import ConfigError
        from csd_backend.presets import get_preset
        from csd_backend.scene_kinds import starting_scene

        target = get_preset(preset).scene
        untrained = bool(getattr(scene, UNTRAINED_ATTR, False))
        if scene.kind == "mesh" and untrained and target.kind == "mesh":
            return with_scene_settings(scene, target, seed)
        if target.kind not in NEW_KINDS and scene.kind in NEW_KINDS and untrained:
            raise ConfigError("scene", f"preset {preset} refines or textures a surface, but this scene is new "
                                       "(untrained): train it with CSD Optimize first, or load a mesh with CSD "
                                       "Load Mesh")
        if target.kind in NEW_KINDS and scene.kind in NEW_KINDS and untrained and scene.kind != target.kind:
            made = "Gaussian splats" if scene.kind == "gaussians" else "a volume"
            wanted = ("Gaussian splats (keep a Gaussian preset here and choose the same one in CSD 3D Scene)"
                      if target.kind == "gaussians" else "a volume (choose a volume preset such as csd-coarse or "
                      "preview-cpu in CSD 3D Scene, or a Gaussian preset here: " + ", ".join(presets_of("gaussians"))
                      + ")")
            raise ConfigError("scene", f"this new scene is {made} (the preset of CSD 3D Scene), but preset "
                                       f"{preset} trains {wanted}")
        if target.kind == "mesh" and scene.kind != "mesh":
            raise ConfigError("scene", f"preset {preset} textures a fixed mesh: connect CSD Load Mesh (to paint a "
                                       f"{scene.kind} scene use CSD Optimize with csd-edit)")
        return starting_scene(scene, target, int(seed))

    def open_run(self, prior, guidance, scene, preset, steps, lr, seed, checkpoint_every, preview_every, run_name,
                 resume, cameras):
        """(Optimization, lock) of a new run folder, or of the latest run of ``run_name`` to resume; the folder is
        locked (``csd_backend/runs/lock.py``) so that no other process writes it meanwhile."""
        from csd_backend.errors import ConfigError
        from csd_backend.optimize import Optimization
        from csd_backend.runs.lock import RunLock

        if resume:
            ckpt = latest_checkpoint(run_name)
            if ckpt is None:
                raise ConfigError("resume", f"there is no checkpoint of run '{run_name}' in {runs_directory()}")
            lock = RunLock(ckpt.parent.parent, f"ComfyUI {self.DISPLAY} (resume {run_name})").acquire()
            try:
                opt = Optimization.resume(ckpt, prior, steps=int(steps))
            except BaseException:
                lock.release()
                raise
            pack.log.info("%s: resuming %s at step %d of %d (the run's saved settings are used)", self.DISPLAY,
                          opt.out_dir, opt.step, opt.config.optim.steps)
            return opt, lock
        scene = self.start_scene(scene, preset, int(seed))
        cfg = self.run_config(prior, guidance, scene, cameras, preset, steps, lr, seed, checkpoint_every,
                              preview_every, where=self.DISPLAY)
        untrained = bool(getattr(scene, UNTRAINED_ATTR, False)) and scene.kind in NEW_KINDS
        out_dir = new_run_folder(run_name)
        lock = RunLock(out_dir, f"ComfyUI {self.DISPLAY} ({run_name})").acquire()
        # an untrained scene is re-initialised from the seed (like the command line); a trained one is copied
        try:
            opt = Optimization(cfg, prior, scene=None if untrained else scene, out_dir=out_dir)
            opt.write_config(out_dir)
        except BaseException:
            lock.release()
            if not any(out_dir.iterdir()):
                out_dir.rmdir()  # leave no run folder behind for a run that never started
            raise
        pack.log.info("%s: run %s, %d steps", self.DISPLAY, out_dir, cfg.optim.steps)
        return opt, lock

    @autograd_allowed
    def optimize(self, prior, guidance, scene, preset, steps, lr, seed, checkpoint_every, preview_every,
                 run_name, resume, cameras=None, unique_id=None):
        from csd_backend.errors import ConfigError

        check_run_name(run_name)
        try:
            opt, lock = self.open_run(prior, guidance, scene, preset, steps, lr, seed, checkpoint_every,
                                      preview_every, run_name, resume, cameras)
        except ConfigError as e:
            named = named_error(e, self.DISPLAY)
            if named is e:
                raise
            raise named from e
        try:
            return self.train(opt, int(preview_every), unique_id)
        finally:
            lock.release()

    def train(self, opt, every: int, unique_id=None):
        """Run ``opt`` to its last step with the progress bar and live previews: ``(trained scene, preview)``."""
        from csd_backend.errors import Cancelled
        from csd_backend.render.shading import shading_label
        from csd_backend.render.views import render_ring

        total = opt.config.optim.steps
        bar = Progress(total, node_id=unique_id)
        if opt.step > 0:
            bar.update(opt.step, total)

        def on_step(info):
            # the step test first: on CUDA reading the preview waits for the GPU (a host sync)
            show = every > 0 and (info.step % every == 0 or info.step == info.total) and info.preview is not None
            caption = f"step {info.step}: {shading_label(opt.config.render, info.shading)}" if show else None
            bar.update(info.step, info.total, info.preview[0] if show else None, caption)

        try:
            opt.run(progress=on_step, cancel=processing_interrupted)
        except Cancelled:  # the engine saved its checkpoint before raising
            pack.log.info("%s: cancelled at step %d; resume from %s", self.DISPLAY, opt.step, opt.checkpoint_path)
            raise_interrupt()
            raise
        except BaseException as e:
            if is_interrupt(e):  # raised by ComfyUI's progress hook; the engine saved the checkpoint already
                pack.log.info("%s: cancelled at step %d; resume from %s", self.DISPLAY, opt.step,
                              opt.checkpoint_path)
            raise
        trained = opt.trained_scene()  # a detached copy: no gradients held while ComfyUI caches the output
        cam = opt.config.camera
        _, height, width = cam.sizes()[-1]
        size = preview_render_size(height, width)  # 64² training renders → a 256² render
        preview = render_ring(trained, 1, size, cam.eval_elevation, cam.eval_distance, cam.eval_fovy,
                              render_cfg=opt.config.render)
        return (trained, preview)


class CSDRefineMesh(CSDOptimize):
    DISPLAY = "CSD Refine Mesh"
    KINDS = ("dmtet",)
    DEFAULT_PRESET = "csd-refine-object"
    DEFAULT_RUN_NAME = "csd_refine"
    PRESET_TOOLTIP = ("csd-refine-object / csd-refine: the paper's stage 2 (512², tet grid 256, normal consistency "
                      "1000; a GPU, time not measured yet); sds-refine: Magic3D's refinement; refine-cpu: a 64 tet "
                      "grid at 64² for a CPU (150 steps in about 30 s with the toy prior, measured)")
    SCENE_TOOLTIP = "a trained stage-1 scene (CSD Optimize), or a refined one to continue"
    DESCRIPTION = ("Stage 2: converts a trained stage-1 scene into a deformable tetrahedral SDF grid (DMTet) over "
                   "its surface (density 10) and refines the mesh itself through a differentiable rasterizer, with "
                   "the texture it inherits and a new background from the seed (refine-cpu keeps the volume's). "
                   "Without cameras the preset's are used (512² for the paper's presets). Live preview, Cancel and "
                   "resume as CSD Optimize. Extract Mesh then exports the refined mesh itself.")
    OUTPUT_TOOLTIPS = ("The refined mesh scene.", "A render of it from the evaluation view.")

    @classmethod
    def INPUT_TYPES(cls):
        types = super().INPUT_TYPES()
        types["required"]["scene"] = (pack.SCENE, {"tooltip": cls.SCENE_TOOLTIP})
        cameras = types["required"].pop("cameras")
        types["optional"] = {"cameras": (cameras[0], {"tooltip": "optional: the preset's cameras when not "
                                                                 "connected"})}
        return types


class CSDTextureMesh(CSDRefineMesh):
    DISPLAY = "CSD Texture Mesh"
    KINDS = ("mesh",)
    DEFAULT_PRESET = "csd-texture"
    DEFAULT_RUN_NAME = "csd_texture"
    PRESET_TOOLTIP = ("csd-texture: 512², stage-2 CSD, 5000 steps (a GPU); texture-cpu: 64², 150 steps for a CPU "
                      "(about 25 s with the toy prior, measured)")
    SCENE_TOOLTIP = "a mesh from CSD Load Mesh"
    DESCRIPTION = ("Paints a texture onto a fixed mesh from CSD Load Mesh with CSD (stage-2 coefficients): only the "
                   "texture field and the background train, every vertex stays where it is. Extract Mesh then "
                   "exports your mesh, in its own units and orientation, with the baked texture. Connect CSD Depth "
                   "ControlNet before it to condition the prior on the mesh's depth.")
    OUTPUT_TOOLTIPS = ("The textured mesh scene.", "A render of it from the evaluation view.")


NODE_CLASS_MAPPINGS = {"CSDOptimize": CSDOptimize, "CSDRefineMesh": CSDRefineMesh, "CSDTextureMesh": CSDTextureMesh}
NODE_DISPLAY_NAME_MAPPINGS = {"CSDOptimize": "CSD Optimize", "CSDRefineMesh": "CSD Refine Mesh",
                              "CSDTextureMesh": "CSD Texture Mesh"}
