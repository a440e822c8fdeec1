"""Rendering a trained scene from given views (previews, rings, turntables)."""
from __future__ import annotations

from typing import Optional

import torch

from ..config import RenderConfig
from ..scene.volume import Scene
from .cameras import Cameras, get_rays, orbit_cameras
from .volume_renderer import VolumeRenderer


def prepare_renderer(scene: Scene, render_cfg: Optional[RenderConfig] = None,
                     renderer: Optional[VolumeRenderer] = None) -> VolumeRenderer:
    """A renderer whose occupancy grid is fitted to ``scene`` (one full update of every cell)."""
    if renderer is not None:
        return renderer
    r = VolumeRenderer(render_cfg or RenderConfig(), scene.radius).to(next(scene.parameters()).device)
    r.eval()
    r.grid.update(0, scene.volume.density, r.step_size, torch.Generator().manual_seed(0))
    return r


@torch.no_grad()
def render_cameras_with_opacity(scene: Scene, cams: Cameras, shading: str = "albedo",
                                render_cfg: Optional[RenderConfig] = None, renderer: Optional[VolumeRenderer] = None,
                                background: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, H, W, 3]`` in [0, 1] and opacities ``[N, H, W]``, on the CPU. ``background``: an rgb ``[3]``
    instead of the env map."""
    was_training = scene.training
    scene.eval()
    try:
        renderer = prepare_renderer(scene, render_cfg, renderer)
        device = next(scene.parameters()).device
        cams = cams.to(device)
        rays_o, rays_d = get_rays(cams)
        bg = background.to(device).expand(len(cams), 3) if background is not None else None
        out = renderer(scene.volume, scene.background, rays_o, rays_d, shading, cams.light_positions, bg)
    finally:
        scene.train(was_training)
    return out.rgb.clamp(0, 1).cpu(), out.opacity[..., 0].cpu()


def render_cameras(scene: Scene, cams: Cameras, shading: str = "albedo", render_cfg: Optional[RenderConfig] = None,
                   renderer: Optional[VolumeRenderer] = None, background: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """Images ``[N, H, W, 3]`` in [0, 1] on the CPU. ``background``: an rgb ``[3]`` instead of the env map."""
    return render_cameras_with_opacity(scene, cams, shading, render_cfg, renderer, background)[0]


def render_ring(scene: Scene, n_views: int = 8, size: int = 256, elevation: float = 15.0, distance: float = 2.0,
                fovy: float = 70.0, shading: str = "albedo", render_cfg: Optional[RenderConfig] = None,
                renderer: Optional[VolumeRenderer] = None) -> torch.Tensor:
    """A ring of ``n_views`` views around the scene: ``[n_views, size, size, 3]``."""
    cams = orbit_cameras(n_views, elevation, distance, fovy, size, size)
    return render_cameras(scene, cams, shading, render_cfg, renderer)
