"""Stage 1 → stage 2: a trained volume becomes a deformable tetrahedral SDF grid (``dmtet``) over its surface
(spec §5.3).

The density level of the surface is a number, "auto" (the export's mean density) or "silhouette" (the level
whose mesh has the volume's silhouettes, found by rendering both); the grid fills that surface's tight box, its
SDF is ``clamp(τ − σ, −1, 1)``, and the texture field comes from the volume. The background starts afresh from the
run's seed, as in threestudio's refine configs (which convert the geometry and its texture field only), unless
``scene.keep_background`` keeps the volume's.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

from ..config import SceneConfig
from ..errors import ConfigError
from ..export.isosurface import COARSE_RESOLUTION, DensitySampler, Grid, resolve_threshold, tight_box
from ..export.pipeline import SceneField
from ..render.cameras import make_cameras
from ..render.rasterizer import rasterize
from ..render.views import render_cameras_with_opacity
from ..scene.mesh_scene import MeshScene
from ..scene.tetrahedra import marching_tetrahedra, tet_grid
from ..scene.volume import make_background

log = logging.getLogger(__name__)


def object_box(density_fn, radius: float, threshold: Union[float, str], chunk: int = 1 << 18
               ) -> Tuple[np.ndarray, float]:
    """``([2, 3], τ)``: the tight box of the surface ``σ = τ`` (the occupied cells of a coarse grid over ±radius,
    grown by a cell and 10 % a side: the export's coarse-to-fine box, spec §5.3) and τ itself (``"auto"``: the
    mean density where there is any, as the export)."""
    n = COARSE_RESOLUTION
    grid = Grid(np.full(3, -float(radius)), 2 * float(radius) / (n - 1), (n,) * 3)
    coarse = DensitySampler(density_fn, chunk, None)(grid).reshape(grid.shape)
    tau = resolve_threshold(threshold, coarse)
    if not (coarse > tau).any():
        raise ConfigError("scene.isosurface_threshold",
                          f"the stage-1 scene has no surface at the density level {tau:g}: its density peaks at "
                          f"{float(coarse.max()):.4g} on a {n}³ grid. Train stage 1 longer, or lower the level "
                          f"(e.g. {max(float(coarse.max()) / 2, 1e-3):.3g}, or \"auto\" or \"silhouette\")")
    return tight_box(coarse, grid, tau, float(radius)), tau


#: "silhouette" tries this many levels, geometric from the automatic level to 95 % of the peak density
SILHOUETTE_LEVELS = 12
#: ... each meshed on this tet grid over the automatic level's box and compared over this many views of this size
SILHOUETTE_TET_RESOLUTION = 64
SILHOUETTE_VIEWS = 8
SILHOUETTE_SIZE = 64


@torch.no_grad()
def silhouette_level(scene, density_fn, chunk: int = 1 << 18,
                     progress: Optional[Callable[[float], None]] = None) -> Tuple[float, float]:
    """``(τ, IoU)``: the density level whose surface has the volume's silhouettes — of ``SILHOUETTE_LEVELS``
    candidates, the one whose marching-tetrahedra mesh covers the pixels where the volume's opacity exceeds 0.5
    best (silhouette IoU over a ring of views at elevations ±15°). A soft volume (a short run) is opaque well inside
    its mean-density level, so "auto" bloats it; the spec's τ = 10 suits a fully trained one. ``progress(f)``: the
    fraction of the candidates tried."""
    radius = float(scene.radius)
    n = SILHOUETTE_VIEWS
    azimuth = torch.arange(n) * (720.0 / n) - 180.0  # two rings, the second turned by half a step
    elevation = torch.tensor([15.0 if i < n // 2 else -15.0 for i in range(n)])
    cams = make_cameras(elevation, azimuth, torch.full((n,), 2.0 * max(1.0, radius / 2.0)),
                        torch.full((n,), 60.0), SILHOUETTE_SIZE, SILHOUETTE_SIZE)
    tick = progress if progress is not None else (lambda f: None)
    target = render_cameras_with_opacity(scene, cams)[1] > 0.5
    tick(0.15)
    box, tau_auto = object_box(density_fn, radius, "auto", chunk)
    grid, tets = tet_grid(SILHOUETTE_TET_RESOLUTION)
    lo, hi = torch.from_numpy(box[0]).float(), torch.from_numpy(box[1]).float()
    points = lo + grid * (hi - lo)
    sigma = torch.from_numpy(density_fn(points.numpy()))
    tick(0.3)
    peak = float(sigma.max())
    if not target.any() or peak <= tau_auto:
        return tau_auto, 0.0
    best = (tau_auto, -1.0)
    for k, tau in enumerate(np.geomspace(tau_auto, 0.95 * peak, SILHOUETTE_LEVELS)):
        tick(0.3 + 0.7 * k / SILHOUETTE_LEVELS)
        verts, faces = marching_tetrahedra(points, float(tau) - sigma, tets)
        if faces.shape[0] == 0:
            continue
        mask = rasterize(verts, faces, cams, "torch").mask
        iou = float((mask & target).sum()) / max(float((mask | target).sum()), 1.0)
        if iou > best[1]:
            best = (float(tau), iou)
    return best


#: a scene without a texture field (Gaussian splats): the new one is fitted to its albedo in this many Adam steps
TEXTURE_FIT_STEPS = 200
TEXTURE_FIT_BATCH = 8192


def inherit_texture(scene, out, surface: torch.Tensor, seed: int) -> None:
    """The stage-2 texture field of ``out``: the volume's hash grid and albedo MLP, copied; for a scene without
    them (Gaussian splats) a fresh field fitted to the scene's albedo at the points ``surface`` ``[M, 3]`` near
    the surface (``TEXTURE_FIT_STEPS`` Adam steps of the squared error, batches drawn from ``seed``)."""
    volume = getattr(scene, "volume", None)
    if isinstance(volume, torch.nn.Module) and hasattr(volume, "feature_mlp"):
        texture = {k: v for k, v in volume.state_dict().items() if k.startswith(("encoding.", "feature_mlp."))}
        out.texture.load_state_dict(texture)
        return
    if surface.shape[0] == 0:
        return
    target = torch.from_numpy(SceneField(scene).albedo(surface.cpu().numpy())).to(surface.device)  # [M, 3]
    gen = torch.Generator().manual_seed(int(seed))
    adam = torch.optim.Adam(out.texture.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(TEXTURE_FIT_STEPS):  # a fit of the field: a loop over optimiser steps
            pick = torch.randint(0, surface.shape[0], (min(TEXTURE_FIT_BATCH, surface.shape[0]),), generator=gen)
            pick = pick.to(surface.device)
            loss = (out.texture.albedo(surface[pick]) - target[pick]).square().mean()
            adam.zero_grad()
            loss.backward()
            adam.step()


def fresh_background(cfg: SceneConfig, seed: int) -> torch.nn.Module:
    """A newly initialised background of ``cfg`` whose weights follow ``seed`` alone (torch's global RNG is left as
    it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return make_background(cfg)


@torch.no_grad()
def volume_to_dmtet(scene, tet_resolution: int = 256, threshold: Union[float, str, None] = None,
                    fix_geometry: bool = False, chunk: int = 1 << 18, keep_background: bool = False, seed: int = 0,
                    progress: Optional[Callable[[float], None]] = None):
    """A ``dmtet`` MeshScene converted from a stage-1 ``Scene`` or Gaussian splats (spec §5.3): the grid fills the
    tight box of the surface ``σ = τ`` (``threshold``: a number, "auto", "silhouette" (``silhouette_level``) or None
    for the scene's ``isosurface_threshold``; "auto" as threestudio's coarse-to-fine extraction: the box from the
    mean density where there is any over the whole box, then τ = that mean over the grid's vertices in the box),
    ``sdf = clamp(τ − σ, −1, 1)`` at the grid vertices, no deformation, the hash grid and albedo MLP copied from the
    volume (``inherit_texture``: fitted to the albedo of splats), and the background a fresh one from ``seed``
    (``keep_background``: the volume's, copied).
    ``progress(f)``: the fraction done (the level search is most of it)."""
    tick = progress if progress is not None else (lambda f: None)
    field = SceneField(scene, chunk)
    level = scene.cfg.isosurface_threshold if threshold is None else threshold
    if level == "silhouette":
        level, iou = silhouette_level(scene, field.density, chunk, lambda f: tick(0.8 * f))
        log.info("the density level %.4g has the volume's silhouettes (IoU %.3f)", level, iou)
    tick(0.8)
    box, tau = object_box(field.density, scene.radius, level, chunk)
    cfg = dataclasses.replace(scene.cfg, kind="dmtet", tet_resolution=int(tet_resolution),
                              bbox=[[float(x) for x in box[0]], [float(x) for x in box[1]]],
                              isosurface_threshold=tau, fix_geometry=bool(fix_geometry),
                              keep_background=bool(keep_background))
    device = next(scene.parameters()).device
    out = MeshScene(cfg, device).to(device)
    points = out.geometry.grid_world_vertices().cpu().numpy()
    sigma = torch.from_numpy(field.density(points)).to(device)
    if level == "auto":  # threestudio takes the automatic level again in its fine pass: over the grid in the box
        tau = resolve_threshold("auto", sigma.cpu().numpy())
        cfg.isosurface_threshold = tau
    out.geometry.sdf.copy_((tau - sigma).clamp(-1.0, 1.0))
    inside = int((sigma > tau).sum())
    if inside == 0:
        raise ConfigError("scene.isosurface_threshold",
                          f"no tetrahedral grid vertex of resolution {tet_resolution} lies inside the surface at "
                          f"the density level {tau:g} (the density peaks at {float(sigma.max()):.4g} there); raise "
                          "the tet grid's resolution (scene.tet_resolution) or lower the level")
    inherit_texture(scene, out, out.geometry.grid_world_vertices()[(tau - sigma).abs() < 1.0], seed)
    background = scene.background if keep_background else fresh_background(cfg, seed)
    out.background.load_state_dict(background.state_dict())
    tick(1.0)
    log.info("converted the volume to a %d tet grid in the box %s: %d of %d vertices inside", tet_resolution,
             box.round(3).tolist(), inside, points.shape[0])
    return out


def convert(scene, cfg: SceneConfig, seed: int = 0, progress: Optional[Callable[[float], None]] = None):
    """The ``dmtet`` scene a stage-2 run with scene settings ``cfg`` and seed ``seed`` starts from (the scene-kind
    table's entry)."""
    return volume_to_dmtet(scene, cfg.tet_resolution, cfg.isosurface_threshold, cfg.fix_geometry,
                           keep_background=cfg.keep_background, seed=seed, progress=progress)
