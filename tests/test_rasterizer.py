"""The differentiable rasterizer (csd_backend/render/rasterizer.py) against analytic geometry: coverage, depth,
normals and positions of a cube and a sphere, watertightness, gradients of interpolation and of the analytic
antialiasing (silhouette motion) against finite differences, bad input, backend selection. CPU; the torch
backend on CUDA and the nvdiffrast parity run only where CUDA (and nvdiffrast) are present."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from csd_backend.errors import ConfigError, CSDError
from csd_backend.render import rasterizer as R
from csd_backend.render.cameras import Cameras, get_rays, make_cameras, orbit_cameras
from csd_backend.render.rasterizer import antialias, interpolate, rasterize, rasterizer_backend

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------- helpers
def cube_mesh(half: float = 0.5):
    """A cube of 24 vertices (4 per side, so vertex normals are face normals) and 12 triangles."""
    verts, normals, faces = [], [], []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            n = torch.zeros(3)
            n[axis] = sign
            u, v = torch.zeros(3), torch.zeros(3)
            u[(axis + 1) % 3], v[(axis + 2) % 3] = half, half
            c = n * half
            base = len(verts)
            verts += [c - u - v, c + u - v, c + u + v, c - u + v]
            normals += [n] * 4
            faces += [[base, base + 1, base + 2], [base, base + 2, base + 3]]
    return torch.stack(verts), torch.stack(normals), torch.tensor(faces)


def uv_sphere(n_lat: int = 32, n_lon: int = 64):
    """A unit UV sphere with shared vertices (single poles): 2·n_lon·(n_lat − 1) triangles."""
    theta = torch.arange(1, n_lat, dtype=torch.float64) * math.pi / n_lat
    phi = torch.arange(n_lon, dtype=torch.float64) * 2 * math.pi / n_lon
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    ring = torch.stack([t.sin() * p.cos(), t.sin() * p.sin(), t.cos()], -1).reshape(-1, 3)
    verts = torch.cat([torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64), ring,
                       torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64)]).float()
    idx = lambda r, c: 1 + r * n_lon + c % n_lon  # noqa: E731
    faces = [[0, idx(0, c), idx(0, c + 1)] for c in range(n_lon)]
    for r in range(n_lat - 2):
        for c in range(n_lon):
            faces += [[idx(r, c), idx(r + 1, c), idx(r + 1, c + 1)], [idx(r, c), idx(r + 1, c + 1), idx(r, c + 1)]]
    last = len(verts) - 1
    faces += [[last, idx(n_lat - 2, c + 1), idx(n_lat - 2, c)] for c in range(n_lon)]
    return verts, torch.tensor(faces)


def grid_mesh(n: int, lo: float, hi: float, jitter: float = 0.0, seed: int = 0):
    """An n×n-quad grid in the plane z = 0, diagonals alternating, interior vertices optionally jittered."""
    g = torch.Generator().manual_seed(seed)
    s = torch.linspace(lo, hi, n + 1)
    y, x = torch.meshgrid(s, s, indexing="ij")
    verts = torch.stack([x, y, torch.zeros_like(x)], -1)
    step = (hi - lo) / n
    verts[1:-1, 1:-1, :2] += (torch.rand(n - 1, n - 1, 2, generator=g) - 0.5) * jitter * step
    faces = []
    for r in range(n):
        for c in range(n):
            a, b, cc, d = r * (n + 1) + c, r * (n + 1) + c + 1, (r + 1) * (n + 1) + c + 1, (r + 1) * (n + 1) + c
            faces += [[a, b, cc], [a, cc, d]] if (r + c) % 2 else [[a, b, d], [b, cc, d]]
    return verts.reshape(-1, 3), torch.tensor(faces)


def axis_camera(distance: float, fovy: float, H: int, W: int, dtype=torch.float32) -> Cameras:
    """A camera at (0, 0, distance) looking down −z, up +y: world x → columns, world y → rows upwards."""
    c2w = torch.eye(4, dtype=dtype)[None].clone()
    c2w[0, 2, 3] = distance
    z = torch.zeros(1)
    return Cameras(c2w, torch.tensor([fovy]), z, z, torch.tensor([distance]), c2w[:, :3, 3].float(), H, W)


def view_depth(t: torch.Tensor, rays_d: torch.Tensor, cams: Cameras) -> torch.Tensor:
    """Ray parameter → camera-space depth along the view axis."""
    forward = -cams.c2w[:, None, None, :3, 2]
    return t * (rays_d * forward).sum(-1)


def coverage_loss(verts, faces, cams, aa: bool = True):
    frags = rasterize(verts, faces, cams, "torch")
    m = frags.mask.to(verts.dtype).unsqueeze(-1)
    if aa:
        return antialias(m, frags, faces).sum()
    return interpolate(torch.ones(verts.shape[-2], 1, dtype=verts.dtype), frags, faces).sum()


# ------------------------------------------------------------------------------------- analytic geometry
def test_cube_coverage_depth_normals_and_positions():
    verts, normals, faces = cube_mesh(0.5)
    cams = orbit_cameras(3, elevation=25.0, distance=2.5, fovy=50.0, height=72, width=96)
    frags = rasterize(verts, faces, cams, "torch")
    rays_o, rays_d = get_rays(cams)
    # ray–box slab test
    inv = 1.0 / rays_d
    t0, t1 = (-0.5 - rays_o) * inv, (0.5 - rays_o) * inv
    t_near = torch.minimum(t0, t1).amax(-1)
    t_far = torch.maximum(t0, t1).amin(-1)
    hit = t_far > t_near
    margin = (t_far - t_near).abs()
    mismatch = hit != frags.mask
    assert hit.sum() > 2000
    assert bool((margin[mismatch] < 1e-4).all()), "coverage differs from the analytic cube away from its outline"
    both = hit & frags.mask
    assert torch.allclose(frags.depth[both], view_depth(t_near, rays_d, cams)[both], atol=1e-4)
    assert bool((frags.depth[~frags.mask] == 0).all()) and bool((frags.bary[~frags.mask] == 0).all())
    # interpolated normals are the normal of the side hit, interpolated positions lie on the ray and the cube
    n = interpolate(normals, frags, faces)
    p = rays_o + t_near.unsqueeze(-1) * rays_d
    analytic_n = torch.where(p.abs() >= p.abs().amax(-1, keepdim=True) - 1e-5, p.sign(), torch.zeros_like(p))
    inner = both & ((analytic_n != 0).sum(-1) == 1)  # not on the cube's own edges
    assert bool((F.cosine_similarity(n[inner], analytic_n[inner], dim=-1) > 0.9999).all())
    pos = interpolate(verts, frags, faces)
    assert torch.allclose(pos[both], p[both], atol=1e-4)
    assert torch.allclose(pos[frags.mask].abs().amax(-1), torch.tensor(0.5), atol=1e-5)
    b = frags.bary[frags.mask]
    assert bool((b >= -1e-5).all()) and torch.allclose(b.sum(-1), torch.ones(len(b)), atol=1e-5)


def test_sphere_coverage_depth_normals_and_positions():
    verts, faces = uv_sphere(32, 64)  # 3968 triangles
    cams = make_cameras([10.0, -30.0], [20.0, 135.0], [3.0, 2.2], [45.0, 60.0], 80, 80)
    frags = rasterize(verts, faces, cams, "torch")
    rays_o, rays_d = get_rays(cams)
    b = (rays_o * rays_d).sum(-1)
    disc = b * b - ((rays_o * rays_o).sum(-1) - 1)
    hit = disc > 0
    # the tessellation lies inside the sphere: mismatches only on the analytic outline (a pixel with both
    # inside and outside neighbours)
    h = hit.float()[:, None]
    near_outline = F.max_pool2d(h, 3, 1, 1)[:, 0] != -F.max_pool2d(-h, 3, 1, 1)[:, 0]
    mismatch = hit != frags.mask
    assert hit.sum() > 2000 and bool((~mismatch | near_outline).all())
    assert mismatch.sum() < 0.05 * near_outline.sum()
    t = -b - disc.clamp(min=0).sqrt()
    p = rays_o + t.unsqueeze(-1) * rays_d
    facing = hit & frags.mask & ((p * rays_d).sum(-1) < -0.3)  # away from grazing angles
    sagitta = 1 - math.cos(math.pi / 32)
    err = (frags.depth - view_depth(t, rays_d, cams))[facing]
    assert bool((err > -1e-4).all()) and bool((err < 4 * sagitta).all())
    normals = F.normalize(interpolate(verts, frags, faces), dim=-1)  # vertex normals of a unit sphere
    assert bool((F.cosine_similarity(normals[facing], p[facing], dim=-1) > 0.998).all())
    # interpolated positions: on the pixel's ray and on the plane of the triangle drawn there
    pos = interpolate(verts, frags, faces)
    m = frags.mask
    assert torch.linalg.cross(pos - rays_o, rays_d, dim=-1)[m].norm(dim=-1).max() < 1e-4
    tri = verts[faces[frags.face_id[m]]]
    nrm = F.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1), dim=-1)
    assert ((pos[m] - tri[:, 0]) * nrm).sum(-1).abs().max() < 1e-5
    assert pos[m].norm(dim=-1).min() > 1 - sagitta - 1e-5


@pytest.mark.parametrize("jitter", [0.0, 0.8])
def test_shared_edges_leave_no_cracks(jitter):
    # fovy 90° at distance 2 projects x to column 32 + 16·x exactly, so this grid's corners sit exactly on pixel
    # centres (every 4 pixels) and its edges and diagonals run through pixel centres: a sample exactly on a shared
    # edge must go to one of the two triangles (a plain `E > 0` test leaves 2560 holes here)
    H = W = 64
    cams = axis_camera(2.0, 90.0, H, W)
    assert cams.focal.item() == 32.0
    verts, faces = grid_mesh(19, (-7.5 - 32) / 16, (68.5 - 32) / 16, jitter)
    frags = rasterize(verts, faces, cams, "torch")
    assert bool(frags.mask.all())
    # and seen obliquely, a larger jittered plane fills the view too
    verts, faces = grid_mesh(40, -12.0, 12.0, jitter, seed=1)
    obl = rasterize(verts, faces, make_cameras([35.0, 60.0], [10.0, 200.0], [2.0, 3.0], [50.0, 40.0], 48, 64))
    assert bool(obl.mask.all())


@pytest.mark.parametrize("dense_max", [0, 2, 8])
def test_dense_and_large_triangle_paths_agree(monkeypatch, dense_max):
    verts, faces = uv_sphere(16, 32)
    cams = orbit_cameras(2, distance=2.2, height=64, width=80)
    ref = rasterize(verts, faces, cams, "torch")
    monkeypatch.setattr(R, "DENSE_MAX", dense_max)  # 0: every triangle sample by sample
    monkeypatch.setattr(R, "CHUNK", 1000)  # and in many small chunks
    other = rasterize(verts, faces, cams, "torch")
    assert torch.equal(ref.face_id, other.face_id) and torch.equal(ref.depth, other.depth)


def test_zbuffer_is_deterministic_and_keeps_the_nearest():
    cams = axis_camera(3.0, 40.0, 32, 32)
    tri = torch.tensor([[-1.0, -1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 1.0, 0.0]])
    verts = torch.cat([tri, tri, tri + torch.tensor([0.0, 0.0, 0.5])])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    frags = rasterize(verts, faces, cams, "torch")
    assert bool((frags.face_id[frags.mask] == 2).all())  # the nearer copy (z = 0.5) everywhere
    assert torch.allclose(frags.depth[frags.mask], torch.tensor(2.5))
    frags = rasterize(verts[:6], faces[:2], cams, "torch")  # coincident: the lower face id, every time
    assert bool((frags.face_id[frags.mask] == 0).all())


def test_batched_vertices_and_near_plane_culling():
    verts, _, faces = cube_mesh(0.5)
    cams = orbit_cameras(2, distance=2.5, height=40, width=40)
    batched = torch.stack([verts, verts + torch.tensor([0.2, 0.0, 0.1])])
    frags = rasterize(batched, faces, cams, "torch")
    for i in range(2):
        one = rasterize(batched[i], faces, cams[i], "torch")
        assert torch.equal(frags.face_id[i], one.face_id[0])
        assert torch.allclose(frags.depth[i], one.depth[0])
    out = interpolate(batched, frags, faces)
    assert out.shape == (2, 40, 40, 3)
    # a triangle reaching behind the camera is culled whole (documented), one in front is drawn
    cams = axis_camera(1.0, 60.0, 16, 16)
    behind = torch.tensor([[-0.1, -0.1, 0.0], [0.1, -0.1, 0.0], [0.0, 0.1, 1.5]])
    assert not rasterize(behind, torch.tensor([[0, 1, 2]]), cams, "torch").mask.any()
    assert rasterize(behind * torch.tensor([1.0, 1.0, 0.0]), torch.tensor([[0, 1, 2]]), cams, "torch").mask.any()


# ------------------------------------------------------------------------------------------------ gradients
def test_interpolate_gradient_wrt_attributes_is_exact():
    verts, faces = uv_sphere(6, 12)
    cams = orbit_cameras(2, distance=2.5, height=12, width=12)
    frags = rasterize(verts.double(), faces, cams, "torch")
    attr = torch.randn(len(verts), 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: interpolate(a, frags, faces), (attr,))
    batched = torch.randn(2, len(verts), 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: interpolate(a, frags, faces), (batched,))


def test_interpolated_positions_gradient_matches_finite_differences():
    # a tilted, non-planar fan of 4 triangles, seen obliquely; loss on interior pixels only
    verts = torch.tensor([[0.0, 0.0, 0.2], [-0.8, -0.7, 0.0], [0.8, -0.6, -0.1], [0.7, 0.8, 0.1], [-0.7, 0.6, 0.0]],
                         dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 1]])
    cams = make_cameras([40.0], [30.0], [2.5], [40.0], 48, 48)
    frags = rasterize(verts, faces, cams, "torch")
    fid = frags.face_id[0]
    same = torch.ones_like(fid, dtype=torch.bool)
    for dj in (-2, -1, 0, 1, 2):
        for di in (-2, -1, 0, 1, 2):
            same &= torch.roll(fid, (dj, di), (0, 1)) == fid
    interior = (same & (fid >= 0))[None, ..., None]
    assert interior.sum() > 200
    weights = torch.randn(1, 48, 48, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss(v):
        fr = rasterize(v, faces, cams, "torch")
        return (interpolate(v, fr, faces) * weights * interior).sum()

    v = verts.clone().requires_grad_(True)
    loss(v).backward()
    h = 1e-6
    fd = torch.zeros_like(verts)
    for idx in range(verts.numel()):
        d = torch.zeros(verts.numel(), dtype=torch.float64)
        d[idx] = h
        d = d.view_as(verts)
        fd.view(-1)[idx] = (loss(verts + d) - loss(verts - d)) / (2 * h)
    assert torch.allclose(v.grad, fd, rtol=1e-5, atol=1e-5 * fd.abs().max())


def test_antialias_moves_a_vertical_silhouette_exactly():
    # a square's right side at column 47.2 (not near a pixel centre), moving sideways over the background
    H = W = 64
    cams = axis_camera(3.0, 40.0, H, W, torch.float64)
    f = cams.focal.item() / 3.0  # pixels per world unit at the square's depth
    right = (47.2 - W / 2) / f
    verts = torch.tensor([[-0.5, -0.5, 0], [right, -0.5, 0], [right, 0.5, 0], [-0.5, 0.5, 0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    v = verts.clone().requires_grad_(True)
    coverage_loss(v, faces, cams).backward()
    grad = (v.grad[1, 0] + v.grad[2, 0]).item()
    centres = torch.arange(H) + 0.5
    rows = ((centres > H / 2 - 0.5 * f) & (centres < H / 2 + 0.5 * f)).sum().item()
    assert grad == pytest.approx(rows * f, rel=1e-6)  # d(covered area)/dx: one pixel per row per pixel moved
    h = 0.15 / f
    shift = torch.zeros_like(verts)
    shift[[1, 2], 0] = h
    fd = (coverage_loss(verts + shift, faces, cams) - coverage_loss(verts - shift, faces, cams)).item() / (2 * h)
    assert fd == pytest.approx(grad, rel=0.02)
    # without antialiasing, coverage carries no gradient to the silhouette
    v = verts.clone().requires_grad_(True)
    coverage_loss(v, faces, cams, aa=False).backward()
    assert v.grad.abs().max() < 1e-9


def test_antialias_gradient_of_a_slanted_triangle():
    H = W = 64
    cams = axis_camera(3.0, 40.0, H, W, torch.float64)
    f = cams.focal.item() / 3.0
    verts = torch.tensor([[-0.6, -0.5, 0], [0.55, -0.1, 0], [-0.2, 0.6, 0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    v = verts.clone().requires_grad_(True)
    loss = coverage_loss(v, faces, cams)
    loss.backward()
    a, c = verts[0, :2] * f, verts[2, :2] * f
    analytic = torch.tensor([0.5 * (c[1] - a[1]), -0.5 * (c[0] - a[0])]) * f  # d(area in pixels)/d(x, y) of vertex 1
    assert torch.allclose(v.grad[1, :2], analytic.double(), rtol=0.03)
    for k in (0, 1):
        h = 0.1 / f
        d = torch.zeros_like(verts)
        d[1, k] = h
        fd = (coverage_loss(verts + d, faces, cams) - coverage_loss(verts - d, faces, cams)).item() / (2 * h)
        assert fd == pytest.approx(v.grad[1, k].item(), rel=0.1)
    # the antialiased coverage is a good estimate of the area
    area = 0.5 * abs(((verts[1] - verts[0])[0] * (verts[2] - verts[0])[1]
                      - (verts[1] - verts[0])[1] * (verts[2] - verts[0])[0]).item()) * f * f
    assert loss.item() == pytest.approx(area, rel=0.01)


def test_antialias_colour_gradient_matches_finite_differences():
    # a red triangle over a blue background; a smooth weighting of the image; float64, small steps
    H = W = 48
    cams = make_cameras([20.0], [-40.0], [3.0], [40.0], H, W)
    cams.c2w = cams.c2w.double()
    verts = torch.tensor([[0.1, -0.7, -0.4], [0.0, 0.8, -0.2], [-0.1, 0.1, 0.7]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H, dtype=torch.float64), torch.linspace(-1, 1, W,
                                                                                            dtype=torch.float64),
                            indexing="ij")
    weight = torch.stack([1 + xx, 1 - yy * 0.5, 0.3 + xx * yy], -1)[None]
    colour = torch.tensor([[1.0, 0.1, 0.0], [0.2, 0.9, 0.1], [0.9, 0.0, 0.3]], dtype=torch.float64)

    def loss(v):
        fr = rasterize(v, faces, cams, "torch")
        rgb = interpolate(colour, fr, faces)
        m = fr.mask.to(v.dtype).unsqueeze(-1)
        image = rgb * m + torch.tensor([0.0, 0.0, 1.0], dtype=v.dtype) * (1 - m)
        return (antialias(image, fr, faces) * weight).sum()

    v = verts.clone().requires_grad_(True)
    loss(v).backward()
    h = 1e-5
    for idx in range(9):
        d = torch.zeros(9, dtype=torch.float64)
        d[idx] = h
        d = d.view(3, 3)
        fd = ((loss(verts + d) - loss(verts - d)) / (2 * h)).item()
        assert fd == pytest.approx(v.grad.view(-1)[idx].item(), rel=1e-3, abs=1e-3 * v.grad.abs().max().item())


def test_antialias_gradient_of_a_closed_sphere_outline(monkeypatch):
    # growing a finely tessellated sphere: d(antialiased coverage)/d(scale) is the growth of its projected disk
    H = W = 96
    verts, faces = uv_sphere(48, 96)
    verts = verts.double()
    cams = make_cameras([20.0, -50.0], [30.0, 100.0], [3.0, 3.0], [40.0, 40.0], H, W)
    f, d = cams.focal[0].item(), 3.0

    def loss(scale):
        fr = rasterize(verts * scale, faces, cams, "torch")
        return antialias(fr.mask.double().unsqueeze(-1), fr, faces).sum()

    def grad():
        s = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        loss(s).backward()
        return s.grad.item()

    disk = lambda r: 2 * math.pi * (f * r / math.sqrt(d * d - r * r)) ** 2  # noqa: E731  (two views)
    analytic = (disk(1 + 1e-6) - disk(1 - 1e-6)) / 2e-6
    h = 0.01
    fd = (loss(torch.tensor(1 + h, dtype=torch.float64)) - loss(torch.tensor(1 - h, dtype=torch.float64))).item()
    assert grad() == pytest.approx(analytic, rel=0.03)
    assert fd / (2 * h) == pytest.approx(analytic, rel=0.05)
    monkeypatch.setattr(R, "AA_WALK_STEPS", 0)  # nvdiffrast's rule misses most of such an outline
    assert grad() < 0.2 * analytic


def test_antialias_touches_only_silhouettes(monkeypatch):
    # a finely tessellated closed sphere: changed pixels border the background; a plane filling the view: nothing
    verts, faces = uv_sphere(48, 96)  # 9024 triangles, thinner than a pixel near the outline
    cams = orbit_cameras(2, distance=2.5, height=64, width=64)
    frags = rasterize(verts, faces, cams, "torch")
    image = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    changed = (antialias(image, frags, faces) != image).any(-1)
    bg = (~frags.mask).float()[:, None]
    near_bg = F.max_pool2d(bg, 3, 1, 1)[:, 0] > 0
    assert bool((~changed | near_bg).all())
    # most of the outline is antialiased: the search walks over the thin rim triangles to the silhouette edge;
    # nvdiffrast's rule (the front pixel's own triangle only) finds almost none of it on such a mesh
    outline = (frags.mask & near_bg).sum()
    assert changed.sum() > 0.6 * outline
    monkeypatch.setattr(R, "AA_WALK_STEPS", 0)
    frags.cache.clear()
    assert (antialias(image, frags, faces) != image).any(-1).sum() < 0.1 * outline
    verts, faces = grid_mesh(20, -12.0, 12.0, 0.5)
    cams = make_cameras([45.0], [0.0], [2.0], [50.0], 32, 32)
    frags = rasterize(verts, faces, cams, "torch")
    image = torch.rand(1, 32, 32, 3)
    assert torch.equal(antialias(image, frags, faces), image)


def test_nothing_in_view():
    verts, _, faces = cube_mesh()
    cams = axis_camera(3.0, 40.0, 16, 16)
    v = (verts + torch.tensor([0.0, 0.0, 5.0])).requires_grad_(True)  # behind the camera
    frags = rasterize(v, faces, cams, "torch")
    assert not frags.mask.any() and bool((frags.face_id == -1).all())
    image = torch.rand(1, 16, 16, 3)
    assert torch.equal(antialias(image, frags, faces), image)
    out = interpolate(v, frags, faces)
    assert out.shape == (1, 16, 16, 3) and not out.any()
    out.sum().backward()
    assert not v.grad.any()


def test_topology_is_reused_only_for_the_same_faces():
    _, _, cube = cube_mesh()
    _, sphere = uv_sphere(4, 8)
    for faces in (cube, cube.clone(), cube.flip(1), sphere[:12]):
        assert torch.equal(R._topology(faces), R.edge_neighbours(faces))
    tri = torch.tensor([[0, 1, 2], [2, 1, 3], [1, 2, 4], [5, 6, 7]])  # an edge of 3 faces, an isolated face
    assert R.edge_neighbours(tri).tolist() == [[-1, -1, -1]] * 4
    assert R.edge_neighbours(torch.tensor([[0, 1, 2], [1, 0, 3]])).tolist() == [[1, -1, -1], [0, -1, -1]]


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_meshes_are_refused_clearly():
    cams = orbit_cameras(1, height=8, width=8)
    verts, _, faces = cube_mesh()
    with pytest.raises(CSDError, match="faces index vertices"):
        rasterize(verts, torch.tensor([[0, 1, 24]]), cams)
    with pytest.raises(CSDError, match="faces index vertices"):
        rasterize(verts, torch.tensor([[0, -1, 2]]), cams)
    with pytest.raises(CSDError, match=r"faces must be an integer tensor \[F, 3\]"):
        rasterize(verts, torch.tensor([0, 1, 2]), cams)
    with pytest.raises(CSDError, match=r"faces must be an integer tensor"):
        rasterize(verts, faces.float(), cams)
    with pytest.raises(CSDError, match="no faces"):
        rasterize(verts, torch.zeros(0, 3, dtype=torch.long), cams)
    bad = verts.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(CSDError, match="NaN"):
        rasterize(bad, faces, cams)
    with pytest.raises(CSDError, match=r"vertices must be a float tensor"):
        rasterize(verts[:, :2], faces, cams)
    with pytest.raises(CSDError, match="batch of 3 but there are 1 cameras"):
        rasterize(verts.expand(3, -1, -1), faces, cams)
    frags = rasterize(verts, faces, cams)
    with pytest.raises(CSDError, match="antialias: the image must be"):
        antialias(torch.zeros(1, 4, 4, 3), frags, faces)
    with pytest.raises(CSDError, match="interpolate: attributes must be"):
        interpolate(torch.zeros(2, 24, 3), frags, faces)


def test_backend_selection():
    assert rasterizer_backend("torch", "cpu") == "torch"
    assert rasterizer_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ConfigError, match="is not one of") as e:
        rasterizer_backend("opengl", "cpu")
    assert e.value.field == "render.rasterizer"
    with pytest.raises(ConfigError, match=r"CUDA only.*github.com/NVlabs/nvdiffrast") as e:
        rasterizer_backend("nvdiffrast", "cpu")
    assert e.value.field == "render.rasterizer"
    verts, _, faces = cube_mesh()
    with pytest.raises(ConfigError, match="render.rasterizer"):
        rasterize(verts, faces, orbit_cameras(1, height=8, width=8), backend="nvdiffrast")


def test_missing_nvdiffrast_on_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(R, "nvdiffrast_available", lambda index=0: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(ConfigError, match=r"not usable here.*pip install git\+https://github.com/NVlabs/nvdiffrast"):
        rasterizer_backend("nvdiffrast", "cuda:0")
    assert rasterizer_backend("auto", "cuda:0") == "torch"


# ------------------------------------------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_torch_backend_on_cuda_matches_cpu():
    verts, faces = uv_sphere(32, 64)
    cams = orbit_cameras(2, distance=2.5, height=96, width=96)
    cpu = rasterize(verts, faces, cams, "torch")
    gpu = rasterize(verts.cuda(), faces.cuda(), cams.to("cuda"), "torch")
    assert (cpu.face_id == gpu.face_id.cpu()).float().mean() > 0.999
    same = cpu.face_id == gpu.face_id.cpu()
    assert torch.allclose(cpu.depth[same], gpu.depth.cpu()[same], atol=1e-4)
    image = torch.rand(2, 96, 96, 3)
    assert torch.allclose(antialias(image, cpu, faces)[same], antialias(image.cuda(), gpu, faces.cuda()).cpu()[same],
                          atol=1e-4)


@pytest.mark.skipif(not (torch.cuda.is_available() and R.nvdiffrast_available(0)), reason="needs nvdiffrast")
def test_nvdiffrast_parity(monkeypatch):
    verts, faces = uv_sphere(16, 32)  # triangles larger than pixels: both antialiasing rules agree
    verts, faces = verts.cuda(), faces.cuda()
    cams = orbit_cameras(3, distance=2.5, height=128, width=160).to("cuda")
    ref = rasterize(verts, faces, cams, "torch")
    dr = rasterize(verts, faces, cams, "nvdiffrast")
    assert dr.backend == "nvdiffrast"
    same = ref.face_id == dr.face_id
    assert same.float().mean() >= 0.995
    assert (ref.mask == dr.mask).float().mean() >= 0.995
    both = same & ref.mask
    assert torch.allclose(ref.bary[both], dr.bary[both], atol=1e-3)
    assert torch.allclose(ref.depth[both], dr.depth[both], atol=1e-3)
    x = torch.randn(len(verts), 4, device="cuda")
    assert torch.allclose(interpolate(x, ref, faces)[both], interpolate(x, dr, faces)[both], atol=1e-3)
    monkeypatch.setattr(R, "AA_WALK_STEPS", 0)  # nvdiffrast's rule
    image = torch.rand(3, 128, 160, 3, device="cuda")
    image = torch.where(ref.mask.unsqueeze(-1), image, 0.0)
    a_ref, a_dr = antialias(image, ref, faces), antialias(image, dr, faces)
    assert (a_ref - a_dr).abs().mean() < 2e-3
    assert ((a_ref - a_dr).abs().amax(-1) > 1e-3).float().mean() < 0.005
    # gradients of the antialiased coverage w.r.t. the vertices agree too
    grads = []
    for frags_backend in ("torch", "nvdiffrast"):
        v = verts.clone().requires_grad_(True)
        fr = rasterize(v, faces, cams, frags_backend)
        antialias(fr.mask.float().unsqueeze(-1), fr, faces).sum().backward()
        grads.append(v.grad)
    assert F.cosine_similarity(grads[0].reshape(1, -1), grads[1].reshape(1, -1)).item() > 0.95
