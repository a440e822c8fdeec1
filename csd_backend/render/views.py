"""Rendering a trained scene (of any kind) from given views (previews, rings, turntables)."""
from __future__ import annotations

from typing import Optional

import torch

from ..config import RenderConfig
from ..scene_kinds import make_renderer, scene_device
from .cameras import Cameras, orbit_cameras


def prepare_renderer(scene, render_cfg: Optional[RenderConfig] = None, renderer=None):
    """The renderer of ``scene``'s kind, fitted to it (a volume's occupancy grid gets one full update); a given
    ``renderer`` (e.g. the training run's, whose grid holds the EMA of the whole run) is used as is."""
    if renderer is not None:
        return renderer
    r = make_renderer(render_cfg or RenderConfig(), scene.cfg, scene_device(scene))
    r.eval()
    return r.prepare(scene)


@torch.no_grad()
def render_cameras_with_opacity(scene, cams: Cameras, shading: str = "albedo",
                                render_cfg: Optional[RenderConfig] = None, renderer=None,
                                background: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, H, W, 3]`` in [0, 1] and opacities ``[N, H, W]``, on the CPU. ``background``: an rgb ``[3]``
    instead of the env map."""
    was_training = scene.training
    scene.eval()
    try:
        renderer = prepare_renderer(scene, render_cfg, renderer)
        device = scene_device(scene)
        bg = background.to(device).expand(len(cams), 3) if background is not None else None
        out = renderer.render(scene, cams.to(device), shading, bg)
    finally:
        scene.train(was_training)
    return out.rgb.clamp(0, 1).cpu(), out.opacity[..., 0].cpu()


def render_cameras(scene, cams: Cameras, shading: str = "albedo", render_cfg: Optional[RenderConfig] = None,
                   renderer=None, background: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Images ``[N, H, W, 3]`` in [0, 1] on the CPU. ``background``: an rgb ``[3]`` instead of the env map."""
    return render_cameras_with_opacity(scene, cams, shading, render_cfg, renderer, background)[0]


def render_ring(scene, n_views: int = 8, size: int = 256, elevation: float = 15.0, distance: float = 2.0,
                fovy: float = 70.0, shading: str = "albedo", render_cfg: Optional[RenderConfig] = None,
                renderer=None) -> torch.Tensor:
    """A ring of ``n_views`` views around the scene: ``[n_views, size, size, 3]``."""
    cams = orbit_cameras(n_views, elevation, distance, fovy, size, size)
    return render_cameras(scene, cams, shading, render_cfg, renderer)
