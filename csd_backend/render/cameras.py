"""Cameras with the spec's conventions (spec §3.1).

Camera position ``(r·cosφ·cosθ, r·cosφ·sinθ, r·sinφ)`` with elevation φ and azimuth θ in degrees, up = +z,
looking at the origin; OpenGL ``c2w = [right, up, −lookat | position]``; focal ``0.5·H / tan(fovy/2)``; ray
directions (normalised) ``[(i + 0.5 − W/2)/f, −(j + 0.5 − H/2)/f, −1]`` in camera space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import CameraConfig
from ..schedules import schedule_value


@dataclass
class Cameras:
    """A batch of B pinhole cameras."""

    c2w: torch.Tensor  # [B, 4, 4]
    fovy: torch.Tensor  # [B] degrees
    elevation: torch.Tensor  # [B] degrees
    azimuth: torch.Tensor  # [B] degrees
    distance: torch.Tensor  # [B]
    light_positions: torch.Tensor  # [B, 3]
    height: int
    width: int

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def focal(self) -> torch.Tensor:
        """Focal length in pixels ``[B]``."""
        return 0.5 * self.height / torch.tan(torch.deg2rad(self.fovy) / 2)

    def intrinsics(self) -> torch.Tensor:
        """``[B, 3, 3]`` pixel intrinsics (principal point at the image centre)."""
        K = torch.zeros(len(self), 3, 3, device=self.fovy.device, dtype=self.fovy.dtype)
        f = self.focal
        K[:, 0, 0] = f
        K[:, 1, 1] = f
        K[:, 0, 2] = self.width / 2
        K[:, 1, 2] = self.height / 2
        K[:, 2, 2] = 1
        return K

    def __getitem__(self, index) -> "Cameras":
        """The cameras ``index`` (an int or a slice) as a batch: ``cams[i]`` is a batch of one."""
        sl = slice(index, index + 1) if isinstance(index, int) else index
        return Cameras(self.c2w[sl], self.fovy[sl], self.elevation[sl], self.azimuth[sl], self.distance[sl],
                       self.light_positions[sl], self.height, self.width)

    def to(self, device) -> "Cameras":
        return Cameras(self.c2w.to(device), self.fovy.to(device), self.elevation.to(device), self.azimuth.to(device),
                       self.distance.to(device), self.light_positions.to(device), self.height, self.width)


def camera_positions(elevation: torch.Tensor, azimuth: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """``[B, 3]`` world positions for elevation/azimuth in degrees."""
    e, a = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    return torch.stack([distance * torch.cos(e) * torch.cos(a), distance * torch.cos(e) * torch.sin(a),
                        distance * torch.sin(e)], -1)


def look_at(positions: torch.Tensor, center: Optional[torch.Tensor] = None,
            up: Optional[torch.Tensor] = None) -> torch.Tensor:
    """OpenGL camera-to-world ``[B, 4, 4]`` looking from ``positions`` at ``center`` (default the origin) with the
    approximate ``up`` (default +z; it is orthogonalised)."""
    if center is None:
        center = torch.zeros_like(positions)
    if up is None:
        up = torch.tensor([0.0, 0.0, 1.0]).to(positions).expand_as(positions)
    lookat = F.normalize(center - positions, dim=-1)
    right = F.normalize(torch.cross(lookat, up, dim=-1), dim=-1)
    # straight up or down: any right vector perpendicular to z
    degenerate = right.norm(dim=-1) < 1e-6
    if degenerate.any():
        right[degenerate] = torch.tensor([0.0, 1.0, 0.0]).to(positions)
    cam_up = F.normalize(torch.cross(right, lookat, dim=-1), dim=-1)
    c2w = torch.zeros(positions.shape[0], 4, 4).to(positions)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = cam_up
    c2w[:, :3, 2] = -lookat
    c2w[:, :3, 3] = positions
    c2w[:, 3, 3] = 1
    return c2w


def make_cameras(elevation, azimuth, distance, fovy, height: int, width: int,
                 light_positions: Optional[torch.Tensor] = None) -> Cameras:
    elevation, azimuth, distance, fovy = (torch.as_tensor(v, dtype=torch.float32).reshape(-1)
                                          for v in (elevation, azimuth, distance, fovy))
    pos = camera_positions(elevation, azimuth, distance)
    if light_positions is None:
        light_positions = pos.clone()
    return Cameras(look_at(pos), fovy, elevation, azimuth, distance, light_positions, height, width)


def orbit_cameras(n_views: int, elevation: float = 15.0, distance: float = 2.0, fovy: float = 70.0,
                  height: int = 256, width: int = 256, start_azimuth: float = 0.0) -> Cameras:
    """A ring of ``n_views`` evenly spaced views (for previews and turntables)."""
    az = start_azimuth + torch.arange(n_views, dtype=torch.float32) * (360.0 / n_views)
    az = torch.remainder(az + 180.0, 360.0) - 180.0
    n = n_views
    return make_cameras(torch.full((n,), float(elevation)), az, torch.full((n,), float(distance)),
                        torch.full((n,), float(fovy)), height, width)


def _uniform(lo: float, hi: float, n: int, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def sample_elevation(cfg: CameraConfig, B: int, g: torch.Generator) -> torch.Tensor:
    """Elevations ``[B]`` in degrees by ``cfg.elevation_sampling`` (spec §3.1; one coin decides the whole batch)."""
    e0, e1 = cfg.elevation_range
    mode = cfg.elevation_sampling
    if mode == "uniform":
        return _uniform(e0, e1, B, g)
    if mode == "uniform-sphere":
        return torch.rad2deg(torch.asin(_uniform(math.sin(math.radians(e0)), math.sin(math.radians(e1)), B, g)))
    uniform = _uniform(e0, e1, B, g)
    if mode == "threestudio":  # half uniform in degrees, half uniform on the sphere (current threestudio)
        other = torch.rad2deg(torch.asin(_uniform(math.sin(math.radians(e0)), math.sin(math.radians(e1)), B, g)))
    else:  # csd-r1: half uniform in degrees, half asin(2·U[(e0+90)/180, (e1+90)/180] − 1) (the official quirk)
        u = _uniform((e0 + 90) / 180, (e1 + 90) / 180, B, g)
        other = torch.rad2deg(torch.asin((2 * u - 1).clamp(-1, 1)))
    return torch.where(torch.rand(1, generator=g) < 0.5, uniform, other)


def sample_azimuth(cfg: CameraConfig, step: int, B: int, g: torch.Generator) -> torch.Tensor:
    a0, a1 = cfg.azimuth_range
    if step < cfg.front_back_only_steps:
        back = torch.rand(B, generator=g) < 0.5
        azimuth = _uniform(-30.0, 30.0, B, g) + back.float() * 180.0
        return torch.remainder(azimuth + 180.0, 360.0) - 180.0
    if cfg.stratified_azimuth:
        return (torch.rand(B, generator=g) + torch.arange(B)) / B * (a1 - a0) + a0
    return _uniform(a0, a1, B, g)


def _jitter(spec, step: int) -> float:
    """A perturbation's magnitude at ``step``; None when the schedule is 0 throughout (no random draw then, so
    runs without jitter keep their random stream)."""
    if spec == 0 or spec == 0.0:
        return None
    return schedule_value(spec, step)


def multiview_azimuth(cfg: CameraConfig, groups: int, g: torch.Generator) -> torch.Tensor:
    """Azimuths ``[groups·n_views]`` in degrees: per object one random start in ``[a0, a0 + (a1 − a0)/n_views)`` and
    ``n_views`` views ``(a1 − a0)/n_views`` apart (threestudio-mvdream's random-multiview sampler:
    ``(rand + i)/n_view·(a1 − a0) + a0``); the views of one object are consecutive."""
    a0, a1 = cfg.azimuth_range
    views = cfg.n_views
    return ((torch.rand(groups, 1, generator=g) + torch.arange(views)).reshape(-1) / views * (a1 - a0) + a0)


def sample_cameras(cfg: CameraConfig, step: int, generator: torch.Generator) -> Cameras:
    """Random training cameras for ``step`` (spec §3.1 camera sampler, including its quirks, and threestudio's
    camera, look-at and up perturbations). ``elevation``/``azimuth`` are the unperturbed angles (they pick the
    view-dependent prompt); the pose and the light use the perturbed position.

    With ``cfg.n_views`` > 1 (MVDream) the batch is ``batch_size / n_views`` objects: for each, one draw of
    elevation, distance, field of view, jitter and light, and ``n_views`` consecutive cameras at equally spaced
    azimuths (:func:`multiview_azimuth`). ``cfg.relative_distance`` scales the distance by ``1/tan(fovy/2)``."""
    (B, height, width), g = cfg.size_at(step), generator
    views = cfg.n_views
    groups = B // views  # validate() makes the batch whole objects

    def per_view(x: torch.Tensor) -> torch.Tensor:  # [groups, ...] -> [B, ...]
        return x.repeat_interleave(views, dim=0)

    if cfg.first_step_fixed_view and step == 0:
        elevation = torch.full((B,), 15.0)
        azimuth = (torch.arange(views) * (cfg.azimuth_range[1] - cfg.azimuth_range[0]) / views).repeat(groups)
        azimuth = torch.remainder(azimuth + 180.0, 360.0) - 180.0
    else:
        elevation = per_view(sample_elevation(cfg, groups, g))
        azimuth = sample_azimuth(cfg, step, B, g) if views == 1 else multiview_azimuth(cfg, groups, g)
    distance = per_view(_uniform(*cfg.distance_range, groups, g))
    fovy = per_view(_uniform(*cfg.fovy_range, groups, g))
    if cfg.relative_distance:  # threestudio-mvdream relative_radius: the object fills the same part of the view
        distance = distance / torch.tan(torch.deg2rad(fovy) / 2)
    pos = camera_positions(elevation, azimuth, distance)
    center = up = None
    if (p := _jitter(cfg.camera_perturb, step)) is not None:
        pos = pos + per_view((torch.rand(groups, 3, generator=g) * 2 - 1) * p)
    if (p := _jitter(cfg.center_perturb, step)) is not None:
        center = per_view(torch.randn(groups, 3, generator=g) * p)
    if (p := _jitter(cfg.up_perturb, step)) is not None:
        up = torch.tensor([0.0, 0.0, 1.0]) + per_view(torch.randn(groups, 3, generator=g) * p)
    light = sample_lights(cfg, pos, step, g)
    return Cameras(look_at(pos, center, up), fovy, elevation, azimuth, distance, light, height, width)


def sample_lights(cfg: CameraConfig, positions: torch.Tensor, step: int, g: torch.Generator) -> torch.Tensor:
    """Point-light positions ``[B, 3]`` for cameras at ``positions`` ``[B, 3]`` by ``cfg.light_sampling``
    (threestudio's ``light_sample_strategy``), at a distance ``U[light_distance_range]``: dreamfusion: direction =
    normalise(camera position + N(0, light_position_perturb²)); magic3d: ``magic3d_light`` at a light azimuth
    ``U[−π, π]`` and elevation ``U[π/6, π/2]`` around the camera's direction. The random draws are made once per
    object of ``cfg.n_views`` views (threestudio-mvdream)."""
    views = cfg.n_views
    groups = positions.shape[0] // views

    def per_view(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(views, dim=0)

    if cfg.light_sampling == "magic3d":
        distance = per_view(_uniform(*cfg.light_distance_range, groups, g))
        light_azimuth = per_view(torch.rand(groups, generator=g) * 2 * math.pi - math.pi)
        light_elevation = per_view(torch.rand(groups, generator=g) * math.pi / 3 + math.pi / 6)
        return magic3d_light(positions, distance, light_azimuth, light_elevation)
    light_perturb = schedule_value(cfg.light_position_perturb, step)
    light_dir = F.normalize(positions + per_view(torch.randn(groups, 3, generator=g)) * light_perturb, dim=-1)
    return light_dir * per_view(_uniform(*cfg.light_distance_range, groups, g)).unsqueeze(-1)


def magic3d_light(positions: torch.Tensor, distance: torch.Tensor, azimuth: torch.Tensor,
                  elevation: torch.Tensor) -> torch.Tensor:
    """Magic3D's light ``[B, 3]``: ``distance·(cos e·cos a, cos e·sin a, sin e)`` (radians, ``[B]`` each) in the
    camera's frame ``z = normalise(position)``, ``x = normalise(z_y, −z_x, 0)``, ``y = normalise(z × x)``
    (threestudio ``light_sample_strategy: magic3d``; elevation ≥ π/6 keeps the light within 60° of the camera)."""
    z = F.normalize(positions, dim=-1)
    x = F.normalize(torch.stack([z[:, 1], -z[:, 0], torch.zeros_like(z[:, 0])], -1), dim=-1)
    y = F.normalize(torch.cross(z, x, dim=-1), dim=-1)
    local = distance.unsqueeze(-1) * torch.stack([torch.cos(elevation) * torch.cos(azimuth),
                                                  torch.cos(elevation) * torch.sin(azimuth), torch.sin(elevation)], -1)
    return (torch.stack([x, y, z], -1) @ local.unsqueeze(-1)).squeeze(-1)


def get_rays(cams: Cameras):
    """Ray origins and unit directions ``[B, H, W, 3]`` each (pixel centres)."""
    H, W = cams.height, cams.width
    device = cams.c2w.device
    j, i = torch.meshgrid(torch.arange(H, dtype=torch.float32, device=device) + 0.5,
                          torch.arange(W, dtype=torch.float32, device=device) + 0.5, indexing="ij")
    f = cams.focal.to(device).view(-1, 1, 1)
    x = (i - W / 2) / f  # [B, H, W]
    y = -(j - H / 2) / f
    dirs = torch.stack([x, y, -torch.ones_like(x)], -1)  # [B, H, W, 3] camera space
    rays_d = F.normalize(torch.einsum("bhwc,brc->bhwr", dirs, cams.c2w[:, :3, :3]), dim=-1)
    rays_o = cams.c2w[:, None, None, :3, 3].expand_as(rays_d)
    return rays_o, rays_d
