"""CSD Depth ControlNet: condition a loaded prior on the depth of every render (spec §4, texture synthesis)."""
from __future__ import annotations

import os

from . import pack
from .model_folders import folder_paths_module, model_folders
from .widgets import combo_input, float_input


def controlnet_choices():
    """Diffusers ControlNet folders (config.json + weights) under ComfyUI's ``models/controlnet``."""
    return model_folders("controlnet", "config.json")


def resolve_controlnet(choice: str) -> str:
    from csd_backend.errors import ConfigError

    fp = folder_paths_module()
    roots = fp.get_folder_paths("controlnet") if fp is not None else []
    for root in roots:
        path = os.path.join(root, *choice.split("/"))
        if os.path.isdir(path):
            return path
    raise ConfigError("controlnet", f"{choice!r} is not a diffusers ControlNet folder in {roots}; put one there "
                                    "(e.g. lllyasviel/control_v11f1p_sd15_depth saved with its config.json)")


class CSDDepthControlNet:
    DESCRIPTION = ("Attach a depth ControlNet to the diffusion model: every noise prediction is then conditioned on "
                   "the depth of the current render (near = bright), so the prior paints what fits the shape — "
                   "the paper's texture synthesis on a given mesh. Needs a diffusers ControlNet folder in "
                   "models/controlnet that matches the model (SD 1.5 depth with SD 1.5). The input prior is not "
                   "changed: a copy sharing its weights is returned.")
    CATEGORY = pack.CATEGORY
    FUNCTION = "attach"
    RETURN_TYPES = (pack.PRIOR,)
    RETURN_NAMES = ("prior",)
    OUTPUT_TOOLTIPS = ("The prior with the ControlNet, for CSD Texture Mesh (or Optimize / Refine Mesh).",)

    @classmethod
    def INPUT_TYPES(cls):
        choices = controlnet_choices()
        return {"required": {
            "prior": (pack.PRIOR, {"tooltip": "from CSD Load Diffusion Model (a Stable Diffusion model)"}),
            "controlnet": combo_input(choices, choices[0] if choices else None,
                                      "a diffusers ControlNet folder under models/controlnet"),
            "scale": float_input(1.0, 0.0, 10.0, 0.05, "conditioning scale (1 = as trained; 0 = no effect)"),
        }}

    def attach(self, prior, controlnet, scale):
        import copy

        from csd_backend.errors import ConfigError

        if not hasattr(prior, "attach_controlnet"):
            raise ConfigError("prior", f"a ControlNet conditions a Stable Diffusion model, not "
                                       f"{getattr(prior, 'name', type(prior).__name__)}")
        conditioned = copy.copy(prior)  # shares the UNet, VAE and text encoder; ComfyUI's cached prior is unchanged
        conditioned._text_cache = prior._text_cache
        conditioned.attach_controlnet(resolve_controlnet(controlnet), float(scale))
        return (conditioned,)


NODE_CLASS_MAPPINGS = {"CSDDepthControlNet": CSDDepthControlNet}
NODE_DISPLAY_NAME_MAPPINGS = {"CSDDepthControlNet": "CSD Depth ControlNet"}
