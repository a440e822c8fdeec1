"""Rendering a mesh scene (spec §5.4): rasterize → interpolate world positions and vertex normals → shade the
covered pixels (albedo from the texture field, the normal map, or Lambertian light) → composite over the
background → antialias, so the silhouette carries gradients to the vertices.

Same interface and output as the volume renderer (``prepare``, ``update``, ``render`` → ``RenderOutput``), so
the optimisation loop, the previews and the nodes do not care which scene kind they hold.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RenderConfig
from ..errors import CSDError
from .cameras import Cameras, get_rays
from .rasterizer import antialias, interpolate, rasterize, rasterizer_backend
from .shading import check_shading, needs_albedo, shade
from .volume_renderer import RenderOutput


class MeshRenderer(nn.Module):
    def __init__(self, cfg: RenderConfig, radius: float = 1.0, device=None):
        super().__init__()
        self.cfg = cfg
        self.radius = float(radius)
        # resolve (and check) the rasterizer now: an uninstalled backend fails before any training
        self.backend = rasterizer_backend(cfg.rasterizer, torch.device(device) if device is not None else
                                          torch.device("cpu"))

    @property
    def resolved_backends(self) -> dict:
        """The backends this renderer runs on, by config field (recorded in a run's config.json)."""
        return {"render.rasterizer": self.backend}

    def prepare(self, scene) -> "MeshRenderer":
        return self

    def update(self, step: int, scene, generator: torch.Generator) -> bool:
        return False

    def after_update(self, step: int, scene, optimizer, out: RenderOutput, generator: torch.Generator) -> bool:
        return False

    def render(self, scene, cams: Cameras, shading: str = "albedo", bg_colors: Optional[torch.Tensor] = None,
               need_normals: bool = False, generator: Optional[torch.Generator] = None,
               ambient_ratio: Optional[float] = None) -> RenderOutput:
        """Images of ``scene`` from ``cams``; ``bg_colors`` ``[B, 3]`` replace the background; ``ambient_ratio``:
        the light's ambient share for lit shadings (``shading.shade``; None: the configured one)."""
        from ..scene.tetrahedra import vertex_normals

        check_shading(shading)
        B, H, W = len(cams), cams.height, cams.width
        verts, faces = scene.mesh()
        device = verts.device
        _, rays_d = get_rays(cams)
        bg = bg_colors[:, None, None, :].expand(B, H, W, 3) if bg_colors is not None else \
            scene.background(rays_d.reshape(-1, 3)).view(B, H, W, 3)
        if faces.shape[0] == 0:  # no surface: the background alone (previews); training cannot go on
            if torch.is_grad_enabled():
                raise CSDError("the mesh has no surface any more (the SDF has no zero crossing in the grid), so no "
                               "gradient reaches the geometry; lower optim.lr, or refine again from the stage-1 "
                               "run (the last checkpoint is kept)")
            zeros = bg.new_zeros(B, H, W, 1)
            return RenderOutput(rgb=bg, opacity=zeros, depth=zeros, normal=bg.new_zeros(B, H, W, 3),
                                weights=bg.new_zeros(0), sample_normals=None, sample_dirs=bg.new_zeros(0, 3),
                                num_samples=0, mesh=(verts, faces))
        frags = rasterize(verts, faces, cams, self.backend)
        mask = frags.mask
        normals = F.normalize(interpolate(vertex_normals(verts, faces), frags, faces), dim=-1)
        points = interpolate(verts, frags, faces)
        sel_n, sel_p = normals[mask], points[mask]
        lights = cams.light_positions.to(device)[:, None, None, :].expand(B, H, W, 3)[mask]
        albedo = scene.albedo(sel_p) if needs_albedo(shading) else None
        color = shade(self.cfg, shading, albedo, sel_n, sel_p, lights, ambient_ratio)
        m = mask.unsqueeze(-1).to(bg.dtype)
        fg = torch.zeros_like(bg).masked_scatter(mask.unsqueeze(-1).expand(B, H, W, 3), color)
        rgb = antialias(fg * m + bg * (1 - m), frags, faces)
        opacity = antialias(m, frags, faces)
        normal_map = antialias((normals + 1) / 2 * m, frags, faces)
        return RenderOutput(rgb=rgb, opacity=opacity, depth=frags.depth.unsqueeze(-1), normal=normal_map,
                            weights=bg.new_zeros(0), sample_normals=None, sample_dirs=bg.new_zeros(0, 3),
                            num_samples=int(mask.sum()), mesh=(verts, faces))
