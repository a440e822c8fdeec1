"""Shading shared by the volume renderer and the mesh rasterizer (spec §5.1 material): albedo, CSD's textureless
normal map, or Lambertian shading with a point light (with ``soft_shading``, of a random intensity each step)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..config import RenderConfig

SHADINGS = ("albedo", "textureless", "diffuse")


def check_shading(shading: str) -> None:
    if shading not in SHADINGS:
        raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")


def shade(cfg: RenderConfig, shading: str, albedo: Optional[torch.Tensor], normal: Optional[torch.Tensor],
          points: torch.Tensor, lights: torch.Tensor, ambient_ratio: Optional[float] = None) -> torch.Tensor:
    """Colour ``[N, 3]`` of surface points ``[N, 3]`` with ``albedo`` / unit ``normal`` ``[N, 3]`` and point
    lights ``[N, 3]``: the albedo, the normal map ``n·0.5 + 0.5`` (textureless with ``textureless_normal``), or
    ``ambient + diffuse·max(0, n·l)`` times the albedo (diffuse) or grey (textureless), with ambient and diffuse
    ``cfg.ambient_light`` and ``cfg.diffuse_light``, or ``ambient_ratio`` and ``1 − ambient_ratio`` when given
    (threestudio's ``ambient_ratio``; soft shading draws it, ``soft_shading_ratio``)."""
    if shading == "albedo":
        return albedo
    if shading == "textureless" and cfg.textureless_normal:
        return normal * 0.5 + 0.5
    ambient, diffuse = ((cfg.ambient_light, cfg.diffuse_light) if ambient_ratio is None
                        else (float(ambient_ratio), 1.0 - float(ambient_ratio)))
    ldir = F.normalize(lights - points, dim=-1)
    lum = ambient + diffuse * (normal * ldir).sum(-1, keepdim=True).clamp_min(0)
    return lum.expand(-1, 3) if shading == "textureless" else albedo * lum


def shading_label(cfg: RenderConfig, shading: str) -> str:
    """What a render with ``shading`` shows, in words (previews are captioned with it: training switches between
    colour and shape-only renders, and a normal map's rainbow colours are not the object's)."""
    if shading == "albedo":
        return "colour (albedo)"
    if shading == "textureless":
        return "normal map (shape only)" if cfg.textureless_normal else "grey shading (shape only)"
    return "shaded colour"


def uses_light(cfg: RenderConfig, shading: str) -> bool:
    """Whether ``shade`` lights the render with the point light (diffuse, or grey textureless)."""
    return shading == "diffuse" or (shading == "textureless" and not cfg.textureless_normal)


def soft_shading_ratio(cfg: RenderConfig, shading: str, generator: Optional[torch.Generator] = None
                       ) -> Optional[float]:
    """The ambient ratio of one training step's renders: with ``cfg.soft_shading`` and a lit ``shading``,
    ``1 − d`` with the diffuse intensity ``d ~ U[0, 1]`` (one draw from ``generator`` for the whole batch, as
    threestudio's material draws one per call); otherwise None (no draw: the configured ambient and diffuse)."""
    if not cfg.soft_shading or not uses_light(cfg, shading):
        return None
    return 1.0 - float(torch.rand(1, generator=generator))


def needs_albedo(shading: str) -> bool:
    """Whether ``shade`` reads the albedo for this shading (a textureless render, normal map or grey, does not)."""
    return shading != "textureless"
