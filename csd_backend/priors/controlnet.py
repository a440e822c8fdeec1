"""Depth ControlNet for score distillation (spec §4: texture synthesis with a depth condition).

A diffusers ``ControlNetModel`` attached to a Stable Diffusion prior adds its residuals to the UNet's skip
connections in every noise prediction, conditioned on the depth of the current render: camera-space depth,
normalised to [0, 1] over the foreground pixels of the batch (near = 1, far = 0) with the background 0 (as the
official code's ``render_depth``; SD 1.5's ``control_v11f1p_sd15_depth`` expects this near-is-bright map). The
condition image is resized to the prior's input size. The ControlNet must match the UNet (e.g. an SD 1.5
ControlNet with an SD 1.5 model).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ModelNotFoundError

#: what the CSD spec calls the depth ControlNet for SD 1.5
DEPTH_CONTROLNET_SD15 = "lllyasviel/control_v11f1p_sd15_depth"


def depth_condition(depth: torch.Tensor, opacity: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The ControlNet depth image ``[B, H, W, 3]`` in [0, 1] of renders with ``depth`` / ``opacity``
    ``[B, H, W, 1]``: near = 1, far = 0 over the foreground (opacity > ``threshold``) of the whole batch, background 0.
    A volume's composited depth is divided by its opacity first (the expected depth of the surface)."""
    d = (depth / opacity.clamp_min(1e-6)).detach()
    fg = opacity.detach() > threshold
    if not fg.any():
        return torch.zeros(*depth.shape[:3], 3, device=depth.device, dtype=torch.float32)
    lo, hi = d[fg].min(), d[fg].max()
    near = ((hi - d) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return torch.where(fg, near, torch.zeros_like(near)).float().expand(*depth.shape[:3], 3)


def load_controlnet(source: str | os.PathLike, device: torch.device, dtype: torch.dtype):
    """A frozen diffusers ``ControlNetModel`` from a local folder (``config.json`` + weights)."""
    path = Path(os.path.expanduser(str(source)))
    if not path.is_dir():
        raise ModelNotFoundError(
            f"ControlNet not found: {path} is not a folder. Give a diffusers ControlNet folder (config.json and "
            f"diffusion_pytorch_model.safetensors), e.g. a download of {DEPTH_CONTROLNET_SD15} "
            f"(`huggingface-cli download {DEPTH_CONTROLNET_SD15} --local-dir models/controlnet/sd15-depth`)")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is not a diffusers ControlNet folder: no config.json (a single-file "
                                 f"ControlNet checkpoint is not supported; use the diffusers folder of "
                                 f"{DEPTH_CONTROLNET_SD15} or save yours with ControlNetModel.save_pretrained)")
    from diffusers import ControlNetModel

    try:
        model = ControlNetModel.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelNotFoundError(f"cannot load the ControlNet in {path}: {e}") from None
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_compatible(controlnet, unet, where: str) -> None:
    """A ControlNet whose cross-attention or block widths differ from the UNet's cannot condition it."""
    from ..errors import ConfigError

    for key in ("cross_attention_dim", "block_out_channels", "in_channels"):
        a, b = getattr(controlnet.config, key, None), getattr(unet.config, key, None)
        if a is not None and b is not None and list(a if isinstance(a, (list, tuple)) else [a]) != \
                list(b if isinstance(b, (list, tuple)) else [b]):
            raise ConfigError(where, f"this ControlNet does not fit the diffusion model: its {key} is {a}, the "
                                     f"UNet's {b} (an SD 1.5 ControlNet needs an SD 1.5 model)")
