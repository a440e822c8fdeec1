"""Named configurations (data, not code branches). Each is a set of overrides on ``RunConfig``'s defaults.

- ``csd-coarse``: spec stage 1 (object config, `csd-if-object.yaml`) coefficients with an SD prior; renders at
  64² upsampled to 512 for the VAE; batch 1 (DESIGN §6).
- ``csd-coarse-character``: the character config (`csd-if.yaml`): radius 1, 12 levels up to 512, front/back
  warm-up for 1000 steps, thresholds 30°, orientation 1→100 and sparsity 10→1 over 5000 steps. Perp-Neg of the
  official character config is not implemented (noted in the README).
- ``sds-dreamfusion``: the DreamFusion baseline as threestudio's `dreamfusion-sd.yaml` (CFG 100, w = 1 − ᾱ,
  view thresholds 45°).
- ``csd-edit``: edit an existing scene: the source description in the negative slot, ω1 = ω2 = 1, stage-2-like
  t-range and weighting, short.
- ``preview-cpu``: a small grid, few samples and a few hundred steps that converge on a laptop CPU.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

from .config import RunConfig
from .errors import ConfigError

_STAGE1_OBJECT: Dict[str, Any] = {
    "guidance": {"mode": "csd", "guidance_weight": 1.0, "negative_weight": [0, 0.0, 1.0, 5000],
                 "weighting": "uniform", "grad_normalize": True, "min_step_percent": 0.02,
                 "max_step_percent": [5000, 0.98, 0.5, 5001], "front_threshold": 30.0, "back_threshold": 30.0},
    "scene": {"radius": 2.0, "n_levels": 16, "n_features_per_level": 2, "log2_hashmap_size": 19,
              "base_resolution": 16, "per_level_scale": 1.381912879967776, "max_resolution": 2048,
              "random_background_prob": 0.5},
    "camera": {"height": 64, "width": 64, "batch_size": 1, "elevation_range": [-10.0, 90.0],
               "stratified_azimuth": True, "front_back_only_steps": 0},
    "render": {"num_samples_per_ray": 512, "ambient_only_steps": 2001, "albedo_prob": 0.5, "textureless_prob": 1.0,
               "textureless_normal": True},
    "loss": {"orient": [5000, 1.0, 20.0, 5001], "sparsity": 1.0, "opaque": 0.0},
    "optim": {"steps": 10000, "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-15, "checkpoint_every": 500,
              "preview_every": 200},
    "prior": {"resolution": 512},
}


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


PRESETS: Dict[str, Dict[str, Any]] = {
    "csd-coarse": _STAGE1_OBJECT,
    "csd-coarse-character": _merge(_STAGE1_OBJECT, {
        "scene": {"radius": 1.0, "n_levels": 12, "per_level_scale": 1.3703509847201883, "max_resolution": 512},
        "camera": {"elevation_range": [-10.0, 45.0], "stratified_azimuth": False, "front_back_only_steps": 1000},
        "render": {"ambient_only_steps": 5001},
        "loss": {"orient": [0, 1.0, 100.0, 5000], "sparsity": [0, 10.0, 1.0, 5000]},
    }),
    "sds-dreamfusion": _merge(_STAGE1_OBJECT, {
        "guidance": {"mode": "sds", "cfg_scale": 100.0, "weighting": "sds", "grad_normalize": False,
                     "front_threshold": 45.0, "back_threshold": 45.0,
                     "negative_prompt": "", "min_step_percent": 0.02, "max_step_percent": 0.98},
        "scene": {"per_level_scale": 1.447269237440378, "max_resolution": 4096},
        "camera": {"elevation_range": [-10.0, 45.0], "stratified_azimuth": False},
        "render": {"ambient_only_steps": 2001, "albedo_prob": 0.25, "textureless_prob": 0.5,
                   "textureless_normal": False},
        "loss": {"orient": [0, 10.0, 1000.0, 5000], "sparsity": 1.0},
        "optim": {"lr": 1e-2, "betas": [0.9, 0.99]},
    }),
    "csd-edit": _merge(_STAGE1_OBJECT, {
        "guidance": {"mode": "edit", "guidance_weight": 1.0, "negative_weight": 1.0, "weighting": "sds",
                     "grad_normalize": False, "min_step_percent": 0.02, "max_step_percent": 0.5},
        "render": {"ambient_only_steps": 0},
        "loss": {"orient": 20.0, "sparsity": 1.0},
        "optim": {"steps": 2000},
    }),
    "preview-cpu": _merge(_STAGE1_OBJECT, {
        "guidance": {"negative_weight": [0, 0.0, 1.0, 200], "max_step_percent": [200, 0.98, 0.5, 201]},
        "scene": {"n_levels": 8, "log2_hashmap_size": 16, "per_level_scale": None, "max_resolution": 256},
        "camera": {"height": 64, "width": 64, "batch_size": 1},
        "render": {"num_samples_per_ray": 96, "ambient_only_steps": 150, "grid_warmup_steps": 32,
                   "grid_update_every": 8},
        "loss": {"orient": [200, 1.0, 20.0, 201], "sparsity": 1.0},
        "optim": {"steps": 400, "lr": 1e-2, "checkpoint_every": 50, "preview_every": 25},
        "prior": {"resolution": 256},
    }),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> RunConfig:
    """The ``RunConfig`` of a named preset (without model or prompt)."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    cfg = RunConfig.from_dict(PRESETS[name])
    cfg.preset = name
    return cfg
