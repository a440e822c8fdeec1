"""Other scene kinds → Gaussian splats (the scene-kind table's ``starts_from`` of ``gaussians``).

- ``from_volume``: a stage-1 volume's density on a ``GRID``³ lattice over its box; ``num_points`` Gaussians at
  lattice points inside the surface (σ above ``init_density_threshold``: a number, or "auto", the mesh export's
  mean level), jittered within their cell, coloured by the volume's albedo there.
- ``from_mesh``: a mesh scene (refined DMTet or a user's mesh): ``num_points`` area-uniform surface samples,
  coloured by its texture field.

Scales come from the nearest neighbours and opacities from ``init_opacity``, as for a random start; the Gaussian
settings are the run's (``cfg``), the radius the source's. Every draw follows the run's ``seed``; torch's global
RNG is left as it was.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
import torch

from ..config import SceneConfig
from ..errors import ConfigError
from ..export.isosurface import DensitySampler, Grid, resolve_threshold
from ..export.pipeline import SceneField
from ..scene.gaussians import GaussianScene

#: lattice points a side of the density grid a volume is sampled on
GRID = 64


def _new_scene(source, cfg: SceneConfig, seed: int) -> GaussianScene:
    cfg = dataclasses.replace(cfg, kind="gaussians", radius=float(source.radius))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        scene = GaussianScene(cfg)
    if cfg.keep_background and type(scene.background) is type(source.background):
        scene.background.load_state_dict(source.background.state_dict())
    device = next(iter(source.parameters()), torch.zeros(0)).device
    return scene.to(device)


@torch.no_grad()
def from_volume(scene, cfg: SceneConfig, seed: int = 0, progress: Optional[Callable[[float], None]] = None):
    """A Gaussian scene with ``cfg.gaussians.num_points`` splats inside the volume ``scene``'s surface."""
    g = cfg.gaussians
    field = SceneField(scene)
    r = float(scene.radius)
    grid = Grid(np.full(3, -r), 2 * r / (GRID - 1), (GRID,) * 3)
    sigma = DensitySampler(field.density, 1 << 18, progress)(grid)
    tau = resolve_threshold(g.init_density_threshold, sigma)
    inside = np.flatnonzero(sigma > tau)
    if inside.size == 0:
        raise ConfigError("scene.gaussians.init_density_threshold",
                          f"the stage-1 scene has no point above the density {tau:.4g} (it peaks at "
                          f"{float(sigma.max()):.4g}): lower the level or train stage 1 longer")
    gen = torch.Generator().manual_seed(int(seed))
    pick = torch.randint(0, inside.size, (g.num_points,), generator=gen).numpy()
    jitter = (torch.rand(g.num_points, 3, generator=gen).numpy() - 0.5) * grid.spacing
    points = (grid.points(inside[pick]) + jitter).astype(np.float32)
    colors = np.clip(field.albedo(points), 0.0, 1.0)
    out = _new_scene(scene, cfg, seed)
    return out.set_gaussians(torch.from_numpy(points), torch.from_numpy(colors))


@torch.no_grad()
def from_mesh(scene, cfg: SceneConfig, seed: int = 0, progress: Optional[Callable[[float], None]] = None):
    """A Gaussian scene with ``cfg.gaussians.num_points`` splats on the surface of the mesh scene ``scene``."""
    g = cfg.gaussians
    verts, faces = scene.mesh()
    if faces.shape[0] == 0:
        raise ConfigError("scene", "the mesh scene has no surface to put Gaussians on")
    v = verts.detach().float().cpu()
    tri = v[faces.cpu()]  # [F, 3, 3]
    area = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1).norm(dim=-1)
    gen = torch.Generator().manual_seed(int(seed))
    face = torch.multinomial(area / area.sum(), g.num_points, replacement=True, generator=gen)
    u, w = torch.rand(g.num_points, generator=gen), torch.rand(g.num_points, generator=gen)
    flip = u + w > 1
    u, w = torch.where(flip, 1 - u, u), torch.where(flip, 1 - w, w)
    t = tri[face]
    points = t[:, 0] + u.unsqueeze(-1) * (t[:, 1] - t[:, 0]) + w.unsqueeze(-1) * (t[:, 2] - t[:, 0])
    colors = SceneField(scene).albedo(points.numpy())
    if progress is not None:
        progress(1.0)
    out = _new_scene(scene, cfg, seed)
    return out.set_gaussians(points, torch.from_numpy(np.clip(colors, 0.0, 1.0)))
