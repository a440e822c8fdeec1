"""The toy prior's ground truth: five objects defined analytically (signed distance + albedo), and a torch
sphere tracer that renders them with the engine's cameras, shadings and backgrounds.

World frame as the engine's (``csd_backend.render.cameras``): z up, the *front* of an object faces +x (the camera
at azimuth 0), the back faces −x. Every object is centred at the origin and fits in a sphere of radius ~0.5, the
size of the engine's starting blob (``density_blob_std`` 0.5).

| name  | prompt           | shape                                                            | why                      |
|-------|------------------|------------------------------------------------------------------|--------------------------|
| cube  | "a red cube"     | axis-aligned cube, side 0.6                                      | sharp edges, flat faces  |
| ball  | "a blue ball"    | sphere, radius 0.4                                               | the blob's own shape     |
| cone  | "a green cone"   | cone, base radius 0.38 at z = −0.32, apex at z = +0.42           | apex, thin top           |
| mug   | "a yellow mug"   | open cylinder (walls 0.045) with a bottom, handle at the back (−x) | not symmetric: front/back |
| ring  | "a purple ring"  | upright torus (R 0.3, r 0.1) facing the front (axis x)           | a hole; thin from the side |

Signed distances are exact outside each part (solids of revolution use the exact 2-D distance to their profile
polygon); unions take the minimum (exact outside, a bound inside), which is what sphere tracing needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------ 2-D helpers


def polygon_sdf(q: torch.Tensor, poly: torch.Tensor) -> torch.Tensor:
    """Signed distance of 2-D points ``q`` ``[N, 2]`` to a closed polygon ``poly`` ``[K, 2]`` (negative inside)."""
    a = poly  # [K, 2]
    b = torch.roll(poly, -1, 0)
    e = (b - a)[None]  # [1, K, 2]
    w = q[:, None, :] - a[None]  # [N, K, 2]
    t = ((w * e).sum(-1) / (e * e).sum(-1)).clamp(0, 1)
    d = (w - e * t.unsqueeze(-1)).norm(dim=-1).amin(1)  # [N]
    # even-odd crossing test along +x
    ay, by = a[None, :, 1], b[None, :, 1]
    qy, qx = q[:, 1:2], q[:, 0:1]
    straddle = (ay > qy) != (by > qy)
    x_cross = a[None, :, 0] + (qy - ay) / (by - ay + 1e-30) * (b[None, :, 0] - a[None, :, 0])
    inside = (straddle & (qx < x_cross)).sum(1) % 2 == 1
    return torch.where(inside, -d, d)


def revolve(points: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
    """SDF of the solid of revolution about the z axis whose (ρ, z) cross-section is ``profile`` (touching ρ = 0)."""
    rho = points[:, :2].norm(dim=-1)
    return polygon_sdf(torch.stack([rho, points[:, 2]], -1), profile)


def box_sdf(p: torch.Tensor, half: Sequence[float]) -> torch.Tensor:
    q = p.abs() - torch.tensor(half, dtype=p.dtype, device=p.device)
    return q.clamp_min(0).norm(dim=-1) + q.amax(-1).clamp_max(0)


def torus_sdf(p: torch.Tensor, major: float, minor: float) -> torch.Tensor:
    """Torus around the z axis."""
    rho = p[:, :2].norm(dim=-1)
    return torch.stack([rho - major, p[:, 2]], -1).norm(dim=-1) - minor


# ------------------------------------------------------------------------------------------------ objects


@dataclass
class ToyObject:
    name: str
    prompt: str  # the plain caption, "a red cube"
    color: Tuple[float, float, float]  # albedo (constant over the surface)
    sdf_fn: Callable[[torch.Tensor], torch.Tensor]
    #: a sphere around the origin that contains the object (sphere tracing starts on it)
    bound: float = 0.6
    #: axis-aligned box containing the object (for surface sampling)
    box: Tuple[Tuple[float, float, float], Tuple[float, float, float]] = ((-0.6,) * 3, (0.6,) * 3)
    #: the view-independent description of the shape (README and reports)
    description: str = ""
    extra: Dict[str, float] = field(default_factory=dict)

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        """Signed distance ``[N]`` at world points ``[N, 3]``."""
        return self.sdf_fn(p)

    def albedo(self, p: torch.Tensor) -> torch.Tensor:
        """Albedo ``[N, 3]`` in [0, 1] at surface points ``[N, 3]``."""
        return torch.tensor(self.color, dtype=p.dtype, device=p.device).expand(p.shape[0], 3)


_CUBE_HALF = 0.3
_BALL_R = 0.4
_CONE = torch.tensor([[0.0, -0.32], [0.38, -0.32], [0.0, 0.42]])
# mug: outer radius 0.3, wall 0.045, bottom 0.05, from z = −0.3 to z = +0.3 (open at the top)
_MUG_PROFILE = torch.tensor([[0.0, -0.3], [0.3, -0.3], [0.3, 0.3], [0.255, 0.3], [0.255, -0.25], [0.0, -0.25]])
_MUG_HANDLE = dict(center=-0.3, major=0.15, minor=0.04)
_RING = dict(major=0.3, minor=0.1)


def _cube(p):
    return box_sdf(p, (_CUBE_HALF,) * 3)


def _ball(p):
    return p.norm(dim=-1) - _BALL_R


def _cone(p):
    return revolve(p, _CONE.to(p))


def _mug(p):
    body = revolve(p, _MUG_PROFILE.to(p))
    h = _MUG_HANDLE
    # handle: a torus in the x-z plane (axis y) centred on the back wall, its inner half hidden in the body
    q = torch.stack([p[:, 0] - h["center"], p[:, 2], p[:, 1]], -1)
    handle = torus_sdf(q, h["major"], h["minor"])
    # keep only the part of the handle outside the cylinder (x < −0.25) so nothing pokes into the cup
    handle = torch.maximum(handle, p[:, 0] + 0.26)
    return torch.minimum(body, handle)


def _ring(p):
    # upright torus facing the front: its axis is x
    q = torch.stack([p[:, 1], p[:, 2], p[:, 0]], -1)
    return torus_sdf(q, _RING["major"], _RING["minor"])


OBJECTS: List[ToyObject] = [
    ToyObject("cube", "a red cube", (0.86, 0.12, 0.10), _cube, bound=0.55,
              box=((-0.3,) * 3, (0.3,) * 3), description="axis-aligned cube, side 0.6"),
    ToyObject("ball", "a blue ball", (0.12, 0.28, 0.88), _ball, bound=0.45,
              box=((-0.4,) * 3, (0.4,) * 3), description="sphere, radius 0.4"),
    ToyObject("cone", "a green cone", (0.12, 0.68, 0.18), _cone, bound=0.5,
              box=((-0.38, -0.38, -0.32), (0.38, 0.38, 0.42)),
              description="cone, base radius 0.38 at z=-0.32, apex at z=+0.42"),
    ToyObject("mug", "a yellow mug", (0.95, 0.78, 0.10), _mug, bound=0.6,
              box=((-0.5, -0.3, -0.3), (0.3, 0.3, 0.3)),
              description="open cylinder r 0.3, h 0.6, walls 0.045, handle at the back (-x)"),
    ToyObject("ring", "a purple ring", (0.58, 0.22, 0.78), _ring, bound=0.45,
              box=((-0.1, -0.4, -0.4), (0.1, 0.4, 0.4)),
              description="upright torus R 0.3, r 0.1, hole facing the front (+x)"),
]
BY_NAME: Dict[str, ToyObject] = {o.name: o for o in OBJECTS}


def get_object(name: str) -> ToyObject:
    if name not in BY_NAME:
        raise KeyError(f"unknown toy object {name!r}; choose from {', '.join(BY_NAME)}")
    return BY_NAME[name]


def object_for_prompt(prompt: str) -> Optional[ToyObject]:
    """The object whose plain caption starts ``prompt`` (view suffixes allowed), else None."""
    for o in OBJECTS:
        if prompt == o.prompt or prompt.startswith(o.prompt + ","):
            return o
    return None


# ------------------------------------------------------------------------------------------- sphere tracing


def sdf_normal(obj: ToyObject, p: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Outward unit normals ``[N, 3]`` by central differences of the SDF."""
    offs = torch.eye(3, dtype=p.dtype, device=p.device) * eps
    pts = torch.cat([p.unsqueeze(1) + offs, p.unsqueeze(1) - offs], 1).reshape(-1, 3)
    d = obj.sdf(pts).view(-1, 6)
    return F.normalize(d[:, :3] - d[:, 3:], dim=-1)


@torch.no_grad()
def sphere_trace(obj: ToyObject, rays_o: torch.Tensor, rays_d: torch.Tensor, max_iter: int = 96,
                 eps: float = 1e-3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hit mask ``[R]`` and hit points ``[R, 3]`` of unit rays ``[R, 3]`` with the object's surface.

    Rays start where they enter the bounding sphere; only unfinished rays are advanced (compacted every step).
    """
    R = rays_o.shape[0]
    # entry into the bounding sphere
    b = (rays_o * rays_d).sum(-1)
    c = (rays_o * rays_o).sum(-1) - obj.bound ** 2
    disc = b * b - c
    enters = disc > 0
    sq = disc.clamp_min(0).sqrt()
    t = (-b - sq).clamp_min(0)
    t_far = -b + sq
    hit = torch.zeros(R, dtype=torch.bool, device=rays_o.device)
    t_hit = torch.zeros(R, dtype=rays_o.dtype, device=rays_o.device)
    active = torch.nonzero(enters & (t_far > 0)).squeeze(-1)
    ta = t[active]
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        p = rays_o[active] + rays_d[active] * ta.unsqueeze(-1)
        d = obj.sdf(p)
        done = d < eps
        hit[active[done]] = True
        t_hit[active[done]] = ta[done]
        ta = ta + d.clamp_min(0) * 0.95 + 1e-5  # slight under-relaxation: safe near unions
        keep = ~done & (ta < t_far[active])
        active, ta = active[keep], ta[keep]
    points = rays_o + rays_d * t_hit.unsqueeze(-1)
    return hit, points


# --------------------------------------------------------------------------------------------- backgrounds


def sh9(d: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics of bands 0–2 (9 values) of unit directions ``[N, 3]``."""
    x, y, z = d.unbind(-1)
    return torch.stack([torch.full_like(x, 0.2820948), 0.4886025 * y, 0.4886025 * z, 0.4886025 * x,
                        1.0925484 * x * y, 1.0925484 * y * z, 0.9461747 * z * z - 0.3153916,
                        1.0925484 * x * z, 0.5462742 * (x * x - y * y)], -1)


# ------------------------------------------------------------------------------------------------- render

SHADINGS = ("albedo", "textureless", "diffuse", "grey")


@torch.no_grad()
def render_object(obj: ToyObject, cams, shading: str = "albedo", background: Optional[torch.Tensor] = None,
                  env_coeffs: Optional[torch.Tensor] = None, supersample: int = 2, ambient: float = 0.1,
                  diffuse: float = 0.9) -> Dict[str, torch.Tensor]:
    """Render ``obj`` from a batch of engine ``Cameras`` (``csd_backend.render.cameras``).

    ``shading`` as the engine's renderer: ``albedo``; ``textureless`` = the world normal map n·0.5+0.5 (CSD);
    ``diffuse`` = albedo·(ambient + diffuse·max(0, n·l)) with the light at ``cams.light_positions``;
    ``grey`` = the engine's textureless without normal maps (the grey Lambertian value, SDS presets).
    Background per image: ``background`` ``[B, 3]`` solid colours, else ``env_coeffs`` ``[B, 3, 9]`` (a smooth
    environment map ``sigmoid(coeffs · SH(d))`` of the ray direction), else white.

    Every pixel averages ``supersample²`` rays on a regular sub-pixel grid (anti-aliasing). Returns ``rgb``
    ``[B, H, W, 3]``, ``mask`` ``[B, H, W]`` (coverage in [0, 1]) and ``albedo`` ``[B, H, W, 3]`` (the albedo
    averaged over covered sub-samples, zero where uncovered).
    """
    from csd_backend.render.cameras import Cameras, get_rays

    if shading not in SHADINGS:
        raise ValueError(f"shading must be one of {SHADINGS}")
    s = int(supersample)
    B, H, W = len(cams), cams.height, cams.width
    # a camera s× larger with the same field of view: its rays are the sub-pixel grid of the original pixels
    big = Cameras(cams.c2w, cams.fovy, cams.elevation, cams.azimuth, cams.distance, cams.light_positions,
                  H * s, W * s)
    rays_o, rays_d = get_rays(big)  # [B, Hs, Ws, 3]
    o, d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    hit, pts = sphere_trace(obj, o, d)
    n_rays = o.shape[0]
    color = torch.zeros(n_rays, 3)
    alb = torch.zeros(n_rays, 3)
    idx = torch.nonzero(hit).squeeze(-1)
    if idx.numel():
        p = pts[idx]
        a = obj.albedo(p)
        alb[idx] = a
        if shading == "albedo":
            color[idx] = a
        else:
            n = sdf_normal(obj, p)
            if shading == "textureless":
                color[idx] = n * 0.5 + 0.5
            else:
                per_ray_light = cams.light_positions.repeat_interleave(H * s * W * s, 0)[idx]
                ldir = F.normalize(per_ray_light - p, dim=-1)
                lum = ambient + diffuse * (n * ldir).sum(-1, keepdim=True).clamp_min(0)
                color[idx] = lum.expand(-1, 3) if shading == "grey" else a * lum
    if background is not None:
        bg = background.repeat_interleave(H * s * W * s, 0)
    elif env_coeffs is not None:
        coeffs = env_coeffs.repeat_interleave(H * s * W * s, 0)  # [R, 3, 9]
        bg = torch.sigmoid((coeffs * sh9(d).unsqueeze(1)).sum(-1))
    else:
        bg = torch.ones(n_rays, 3)
    m = hit.float().unsqueeze(-1)
    rgb = color * m + bg * (1 - m)

    def pool(x, c):
        x = x.view(B, H * s, W * s, c).permute(0, 3, 1, 2)
        return F.avg_pool2d(x, s).permute(0, 2, 3, 1)

    mask = pool(m, 1)[..., 0]
    return {"rgb": pool(rgb, 3), "mask": mask, "albedo": pool(alb * m, 3)}


# ------------------------------------------------------------------------------------------ surface samples


def surface_points(obj: ToyObject, n: int, seed: int = 0, resolution: int = 192) -> torch.Tensor:
    """``n`` points uniformly distributed (by area) on the true surface ``[n, 3]``.

    Marching cubes of the exact SDF on a fine grid over the object's box, then area-weighted sampling of the
    triangles and one Newton projection onto the zero level set (error far below a grid cell).
    """
    import numpy as np
    from skimage.measure import marching_cubes

    lo = torch.tensor(obj.box[0]) - 0.03
    hi = torch.tensor(obj.box[1]) + 0.03
    step = float((hi - lo).max()) / (resolution - 1)
    axes = [torch.arange(float(lo[i]), float(hi[i]) + step, step) for i in range(3)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    vol = torch.cat([obj.sdf(c) for c in grid.reshape(-1, 3).split(1 << 20)]).view(grid.shape[:3])
    verts, faces, _, _ = marching_cubes(vol.numpy(), 0.0, spacing=(step,) * 3)
    verts = verts + lo.numpy()
    tri = verts[faces]  # [F, 3, 3]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(faces), size=n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    t = tri[pick]
    pts = torch.from_numpy(t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])).float()
    nrm = sdf_normal(obj, pts)
    return pts - obj.sdf(pts).unsqueeze(-1) * nrm


def mesh_volume_sanity(obj: ToyObject) -> float:
    """Volume of the object by Monte Carlo over its box (a check that the SDF sign is right)."""
    g = torch.Generator().manual_seed(0)
    lo, hi = torch.tensor(obj.box[0]), torch.tensor(obj.box[1])
    p = lo + (hi - lo) * torch.rand(200_000, 3, generator=g)
    return float((obj.sdf(p) < 0).float().mean() * (hi - lo).prod())


def expected_volume(obj: ToyObject) -> float:
    if obj.name == "cube":
        return (2 * _CUBE_HALF) ** 3
    if obj.name == "ball":
        return 4 / 3 * math.pi * _BALL_R ** 3
    if obj.name == "cone":
        return math.pi * 0.38 ** 2 * 0.74 / 3
    if obj.name == "ring":
        return 2 * math.pi ** 2 * _RING["major"] * _RING["minor"] ** 2
    return float("nan")
