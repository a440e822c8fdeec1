"""Errors in the node user's words: an engine ``ConfigError`` names a configuration field; a node error names the
widget (and node) that sets it, or says that the preset sets it."""
from __future__ import annotations

from typing import Any, Dict, Optional

from csd_backend.config import RunConfig
from csd_backend.errors import ConfigError

#: engine config fields (as ConfigError names them) → the node inputs that set them
INPUT_NAMES: Dict[str, str] = {
    "model": "model", "device": "device", "dtype": "dtype", "resolution": "resolution",
    "render size": "width/height (CSD Cameras) with the model's resolution (CSD Load Diffusion Model)",
    "prompt": "prompt", "source_prompt": "source_prompt", "guidance.mode": "mode",
    "guidance.weighting": "weighting", "guidance.guidance_weight": "guidance_weight",
    "guidance.negative_weight": "negative_weight_start/negative_weight_end/negative_weight_anneal_until",
    "guidance.min_step_percent": "t_min", "guidance.max_step_percent": "t_max_start/t_max_end/t_max_switch_at",
    "guidance.min_step_percent/max_step_percent": "t_min/t_max_start/t_max_end",
    "guidance.cfg_scale": "cfg_scale", "guidance.lora_lr": "lora_lr",
    "guidance.camera_condition_drop": "camera_condition_drop", "prior.lora_base_model": "vsd_lora_base_model",
    "scene.radius": "radius", "scene.n_levels": "n_levels", "scene.log2_hashmap_size": "log2_hashmap_size",
    "scene.max_resolution": "max_resolution", "scene.background": "background",
    "camera.height": "height", "camera.width": "width", "camera.batch_size": "batch_size",
    "camera.elevation_range": "elevation_min/elevation_max", "camera.azimuth_range": "azimuth_min/azimuth_max",
    "camera.distance_range": "distance_min/distance_max", "camera.fovy_range": "fovy_min/fovy_max",
    "steps": "steps", "optim.lr": "lr", "seed": "seed", "optim.checkpoint_every": "checkpoint_every",
    "preset": "preset",
}


#: fields that already are node input names (errors the nodes raise themselves)
_NODE_INPUTS = {"resume", "run_name", "source", "guidance", "t_min"}


def named_error(err: ConfigError, where: str = "") -> ConfigError:
    """The same error with the engine's field replaced by the node input(s) that set it (once)."""
    if getattr(err, "named", False) or err.field in _NODE_INPUTS:
        return err
    name = INPUT_NAMES.get(err.field)
    text = str(err)
    prefix = f"{err.field}: "
    message = text[len(prefix):] if text.startswith(prefix) else text
    if name is None:  # a setting without a widget: it comes from the preset
        name, message = err.field, f"{message} (this setting comes from the preset)"
    out = ConfigError(name, message + (f" [{where}]" if where else ""))
    out.named = True
    out.__cause__ = err
    return out


def validate_config(config: RunConfig, where: str = "") -> RunConfig:
    try:
        return config.validate(require_model=False)
    except ConfigError as e:
        raise named_error(e, where) from e


def validate_sections(where: str = "", **sections: Dict[str, Any]) -> None:
    """Validate some sections of a run config on their own (the other sections keep valid defaults)."""
    sections.setdefault("guidance", {})
    sections["guidance"] = {"prompt": "-", **sections["guidance"]}  # the prompt is checked where it is set
    validate_config(RunConfig().replace(**sections), where)


def error_text(fn, *args, **kwargs) -> Optional[str]:
    """Run a validation; the error message (naming the input) or None. For ``VALIDATE_INPUTS``."""
    try:
        fn(*args, **kwargs)
    except ConfigError as e:
        return str(e)
    return None
