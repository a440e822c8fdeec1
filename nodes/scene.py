"""CSD 3D Scene: a new scene of the preset's kind (an implicit volume: hash grid + MLPs + background; or 3D Gaussian
splats for the Gaussian presets), or the scene of a saved run."""
from __future__ import annotations

import dataclasses

from csd_backend.config import BACKGROUNDS, SceneConfig
from csd_backend.presets import preset_names

from . import pack
from .execution import autograd_allowed, comfy_device
from .input_errors import error_text, named_error, validate_sections
from .run_folders import NEW_SCENE, UNTRAINED_ATTR, file_signature, runs_directory, saved_runs
from .widgets import check_widgets, combo_input, float_input, int_input

_DEFAULT_PRESET = "csd-coarse"
GAUSSIANS = "gaussians"  # the scene kind a Gaussian preset makes (csd_backend/scene_kinds.py)


class CSDScene:
    DESCRIPTION = ("The 3D representation to optimise: a new implicit volume (the preset's scene settings, with "
                   "radius and hash-grid size from the widgets), new 3D Gaussian splats when the preset is a Gaussian "
                   "one (csd-gaussian, sds-gaussian, gaussian-preview-cpu: its splat settings, radius and background "
                   "from the widgets, the hash-grid widgets unused), or the trained scene of a run saved under "
                   "output/csd3d/runs (then the widgets are ignored). Feed a trained scene and an edit-mode guidance "
                   "into CSD Optimize to edit it.")
    CATEGORY = pack.CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = (pack.SCENE,)
    RETURN_NAMES = ("scene",)
    OUTPUT_TOOLTIPS = ("A scene (never modified by the nodes that read it).",)

    @classmethod
    def INPUT_TYPES(cls):
        d = SceneConfig()
        return {"required": {
            "source": combo_input([NEW_SCENE] + saved_runs(), NEW_SCENE,
                                  "(new scene), or a run folder under output/csd3d/runs to load its last checkpoint"),
            "preset": combo_input(preset_names(), _DEFAULT_PRESET,
                                  "settings of the new scene that have no widget (MLP size, density blob, ...); a "
                                  "Gaussian preset (csd-gaussian, sds-gaussian, gaussian-preview-cpu) makes 3D "
                                  "Gaussian splats instead of a volume"),
            "radius": float_input(d.radius, 0.05, 100.0, 0.05, "half-size of the bounding box (spec: 2)"),
            "n_levels": int_input(d.n_levels, 1, 32, "hash-grid levels (spec: 16)"),
            "log2_hashmap_size": int_input(d.log2_hashmap_size, 4, 26, "log2 of the hash table size per level "
                                                                        "(spec: 19)"),
            "max_resolution": int_input(d.max_resolution, 16, 65536, "finest grid resolution (spec: 2048); the "
                                                                     "per-level scale is derived from it"),
            "background": combo_input(list(BACKGROUNDS), d.background,
                                      "neural_env: a learned environment map (spec); solid: a fixed colour"),
        }}

    @classmethod
    def IS_CHANGED(cls, source=None, **kwargs):
        if source and source != NEW_SCENE:
            return file_signature(runs_directory() / source / "checkpoints" / "last.ckpt")
        return ""

    @classmethod
    def VALIDATE_INPUTS(cls, preset=None, max_resolution=None):
        err = check_widgets(cls, {"preset": preset, "max_resolution": max_resolution})
        if err:
            return err
        if preset is None or max_resolution is None:
            return True
        return error_text(cls.scene_config, preset, max_resolution=max_resolution) or True

    @staticmethod
    def scene_config(preset: str, **widgets) -> SceneConfig:
        from csd_backend.errors import ConfigError
        from csd_backend.presets import get_preset

        try:
            base = get_preset(preset)
        except ConfigError as e:
            raise named_error(e, "CSD 3D Scene") from e
        over = {k: v for k, v in widgets.items() if v is not None}
        if "max_resolution" in over:
            over["per_level_scale"] = None  # derived from max_resolution
        cfg = base.replace(scene=over)
        validate_sections("CSD 3D Scene", scene=dataclasses.asdict(cfg.scene))
        return cfg.scene

    @autograd_allowed
    def make(self, source, preset, radius, n_levels, log2_hashmap_size, max_resolution, background):
        import torch

        if source != NEW_SCENE:
            from csd_backend.errors import ConfigError
            from csd_backend.optimize import load_scene

            folder = runs_directory() / source
            if not (folder / "checkpoints" / "last.ckpt").is_file():
                raise ConfigError("source", f"{folder} has no checkpoints/last.ckpt")
            scene, _ = load_scene(folder)
            scene = scene.to(comfy_device() or "cpu")  # Render Views / Extract Mesh run where the scene lives
            pack.log.info("CSD: loaded the scene of %s (the scene widgets are ignored)", folder)
            return (scene,)
        cfg = self.scene_config(preset, radius=radius, n_levels=n_levels, log2_hashmap_size=log2_hashmap_size,
                                max_resolution=max_resolution, background=background)
        from csd_backend.scene.volume import Scene
        from csd_backend.scene_kinds import make_scene

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a deterministic initial scene; Optimize re-initialises it from its own seed
            scene = make_scene(cfg) if cfg.kind == GAUSSIANS else Scene(cfg)
        setattr(scene, UNTRAINED_ATTR, True)
        return (scene.eval(),)


NODE_CLASS_MAPPINGS = {"CSDScene": CSDScene}
NODE_DISPLAY_NAME_MAPPINGS = {"CSDScene": "CSD 3D Scene"}
