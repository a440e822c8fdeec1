"""A differentiable triangle rasterizer (spec §5.4): ``rasterize`` → ``interpolate`` → ``antialias``.

Conventions (those of :func:`~csd_backend.render.cameras.get_rays`): ``Cameras.c2w`` is OpenGL-style (columns
right, up, −lookat, position), the focal length is ``f = 0.5·H / tan(fovy/2)`` pixels, and a camera-space point
``(x, y, z)`` with ``z < 0`` lands at the continuous screen position

    column ``sx = W/2 + f·x/w``,   row ``sy = H/2 − f·y/w``,   with ``w = −z`` (the depth along the view axis),

so pixel ``(row j, column i)`` has its centre at ``(i + 0.5, j + 0.5)``: exactly where ``get_rays`` shoots.

Two backends produce the same :class:`Fragments`:

``torch`` (the reference; CPU and CUDA, fully vectorised)
    1. Project the vertices. Cull triangles with a vertex at or behind the near plane ``w ≤ NEAR`` (no clipping:
       a triangle crossing the near plane disappears whole, which only matters with the camera inside the
       mesh), degenerate ones (zero screen area) and those whose pixel bounding box misses the image.
    2. Enumerate, for every remaining triangle, the pixel centres of its clipped bounding box, and keep those
       inside all three edges. Triangles are grouped by box size: boxes up to ``DENSE_MAX`` pixels a side
       (nearly all, on a fine mesh) are drawn as dense ``[triangles, cw·ch]`` blocks, their sides rounded up to
       powers of two (broadcasting, no per-sample gathers); larger ones sample by sample (``repeat_interleave``);
       both in chunks of about ``CHUNK`` samples so memory stays bounded. Edge functions are evaluated from the edge's endpoints taken in
       a canonical order (lexicographic in screen space), so the two triangles sharing an edge compute exactly
       negated values; a sample exactly on the edge goes to the triangle on the edge's positive side. Shared
       edges therefore leave neither cracks nor double coverage.
    3. Z-buffer with ``scatter_reduce(amin)`` on the key ``float32 depth bits << 32 | face id`` (positive floats
       order like their bit patterns), which is deterministic: on equal depths the lower face id wins.
    4. For each covered pixel recompute the barycentrics *differentiably* from the projected vertices: screen
       barycentrics ``λ_k``, then perspective correction ``b_k = (λ_k/w_k) / Σ λ_j/w_j``; the depth is
       ``Σ b_k w_k``. Gradients flow to the vertex positions through these (not through visibility: that is
       what ``antialias`` adds at silhouettes). Triangles are rendered two-sided (no back-face culling).

``nvdiffrast`` (CUDA, optional)
    ``dr.rasterize`` on clip-space positions built from the same cameras (near ``NEAR``, far ``FAR``;
    triangles are clipped, not culled, at the near plane); ``face_id = triangle_id − 1``, barycentrics
    ``(u, v, 1 − u − v)`` for the face's vertices 0, 1, 2, and ``antialias`` is ``dr.antialias``. nvdiffrast
    is not on PyPI: ``pip install git+https://github.com/NVlabs/nvdiffrast`` on a machine with CUDA (add
    ``--no-build-isolation`` if its build cannot find torch). ``auto`` takes it when the mesh is on CUDA and a
    guarded trial call succeeds, else ``torch``.

Antialiasing (``torch``; the method of Laine et al. 2020, "Modular Primitives for High-Performance
Differentiable Rendering", as in ``nvdiffrast.antialias``): for every pair of horizontally or vertically
adjacent pixels with different face ids, take the triangle of the nearer pixel (background is infinitely far)
and find where it leaves the segment between the two pixel centres. If that exit edge is a silhouette edge
(an open edge, or one whose neighbouring triangle folds back onto the same side in screen space; an edge
shared with a triangle that continues the surface is interior) and is more perpendicular to the segment than
parallel to it (steep edges are handled by horizontal pairs, flat ones by vertical pairs, so no edge counts
twice), blend the two colours: with ``t`` the crossing's distance from the front pixel's centre (in pixels),
the front pixel moves towards the back colour by ``0.5 − t`` when ``t < 0.5``, else the back pixel moves
towards the front colour by ``t − 0.5``. That is the exact box-filtered coverage of a straight edge, and ``t``
is computed from the differentiable projected edge endpoints, so silhouettes carry gradients to the vertices.
Unlike nvdiffrast, when the exit edge is interior the search continues into the neighbouring triangle across
it (up to ``AA_WALK_STEPS`` of them), still along the segment: near the silhouette of a finely tessellated
surface the triangles are thinner than a pixel, so the outline edge rarely belongs to the triangle that covers
the last pixel centre, and nvdiffrast's rule (``AA_WALK_STEPS = 0``) would leave most of such an outline
without antialiasing and without gradients.
Silhouette detection uses the face topology (shared vertex indices): a mesh with duplicated vertices along
its edges (split for UV seams) has every edge open, as in nvdiffrast.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import ConfigError, CSDError
from .cameras import Cameras

NEAR = 1e-2  # triangles with a vertex nearer than this (camera-space depth) are culled (torch) / clipped
FAR = 1e3  # far plane of the nvdiffrast projection (the torch backend has none)
CHUNK = 1 << 20  # pixel samples evaluated at once by the torch rasterizer (~100 MB of temporaries)
DENSE_MAX = 32  # triangles with boxes up to this many pixels a side are drawn as dense blocks
AA_EPS = 1.0 / 16  # tolerance (pixels) on the crossing position, as nvdiffrast
AA_WALK_STEPS = 64  # interior edges antialiasing may cross to reach the silhouette (0: nvdiffrast's rule)
RASTERIZER_BACKENDS = ("auto", "torch", "nvdiffrast")
_EMPTY = torch.iinfo(torch.int64).max
NVDIFFRAST_HINT = ("nvdiffrast is optional and needs CUDA; it is not on PyPI: install it on a CUDA machine with "
                   "`pip install git+https://github.com/NVlabs/nvdiffrast` (add --no-build-isolation if the build "
                   "cannot find torch), or set render.rasterizer to 'torch' (always available)")


@dataclass
class Fragments:
    """What a rasterization leaves per pixel (``B`` cameras, ``H×W`` pixels)."""

    face_id: torch.Tensor  # [B, H, W] int64, −1 where no triangle
    bary: torch.Tensor  # [B, H, W, 3] perspective-correct barycentrics (differentiable); 0 where empty
    depth: torch.Tensor  # [B, H, W] camera-space depth −z_cam (differentiable); 0 where empty
    mask: torch.Tensor  # [B, H, W] bool
    screen: torch.Tensor  # [B, V, 3] projected vertices (column, row, depth), with grad: antialias uses them
    backend: str = "torch"
    raster: Optional[torch.Tensor] = None  # nvdiffrast only: its raw [B, H, W, 4] output
    clip: Optional[torch.Tensor] = None  # nvdiffrast only: the clip-space positions [B, V, 4]
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # antialiasing work, per faces


# ------------------------------------------------------------------------------------------------- backends
@functools.lru_cache(maxsize=None)
def _nvdiffrast_context(device_index: int):
    import nvdiffrast.torch as dr

    return dr.RasterizeCudaContext(device=torch.device("cuda", device_index))


@functools.lru_cache(maxsize=None)
def nvdiffrast_available(device_index: int = 0) -> bool:
    """nvdiffrast imports, rasterizes and antialiases one triangle on this CUDA device (cached)."""
    if not torch.cuda.is_available():
        return False
    try:
        import nvdiffrast.torch as dr

        device = torch.device("cuda", device_index)
        pos = torch.tensor([[[-0.8, -0.8, 0.0, 1.0], [0.8, -0.8, 0.0, 1.0], [0.0, 0.8, 0.0, 1.0]]], device=device)
        tri = torch.tensor([[0, 1, 2]], dtype=torch.int32, device=device)
        rast, _ = dr.rasterize(_nvdiffrast_context(device_index), pos, tri, resolution=[8, 8])
        dr.antialias((rast[..., 3:] > 0).float(), rast, pos, tri)
        torch.cuda.synchronize(device)
        return True
    except Exception:  # ImportError, build/JIT failures, arch mismatch
        return False


def rasterizer_backend(name: str, device) -> str:
    """Resolve ``render.rasterizer`` (``auto`` | ``torch`` | ``nvdiffrast``) for meshes on ``device``; raises a
    ConfigError with the install hint when nvdiffrast is asked for but cannot run here."""
    if name not in RASTERIZER_BACKENDS:
        raise ConfigError("render.rasterizer", f"{name!r} is not one of {', '.join(map(repr, RASTERIZER_BACKENDS))}")
    if name == "torch":
        return "torch"
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    index = device.index if device.index is not None else (torch.cuda.current_device() if on_cuda else 0)
    if name == "nvdiffrast":
        if not on_cuda:
            raise ConfigError("render.rasterizer", f"'nvdiffrast' runs on CUDA only, but the mesh is on {device}; "
                                                   f"use 'torch' or 'auto'. {NVDIFFRAST_HINT}")
        if not nvdiffrast_available(index):
            raise ConfigError("render.rasterizer", f"'nvdiffrast' was asked for but is not usable here: "
                                                   f"{NVDIFFRAST_HINT}")
        return "nvdiffrast"
    return "nvdiffrast" if on_cuda and nvdiffrast_available(index) else "torch"


# ----------------------------------------------------------------------------------------- input and camera
def _check_mesh(verts: torch.Tensor, faces: torch.Tensor, B: int):
    """``verts`` as ``[B, V, 3]`` and ``faces`` as int64 on its device, or a CSDError saying what is wrong."""
    if not torch.is_tensor(verts) or not verts.is_floating_point() or verts.dim() not in (2, 3) \
            or verts.shape[-1] != 3:
        raise CSDError(f"rasterize: vertices must be a float tensor [V, 3] or [B, V, 3], got "
                       f"{getattr(verts, 'dtype', type(verts).__name__)} {tuple(getattr(verts, 'shape', ()))}")
    if verts.dim() == 3 and verts.shape[0] not in (1, B):
        raise CSDError(f"rasterize: vertices have a batch of {verts.shape[0]} but there are {B} cameras")
    if not torch.is_tensor(faces) or faces.is_floating_point() or faces.is_complex() or faces.dim() != 2 \
            or faces.shape[1] != 3:
        raise CSDError(f"rasterize: faces must be an integer tensor [F, 3] of vertex indices, got "
                       f"{getattr(faces, 'dtype', type(faces).__name__)} {tuple(getattr(faces, 'shape', ()))}")
    if faces.shape[0] == 0:
        raise CSDError("rasterize: the mesh has no faces")
    V = verts.shape[-2]
    lo, hi = int(faces.min()), int(faces.max())
    if lo < 0 or hi >= V:
        raise CSDError(f"rasterize: faces index vertices {lo}..{hi} but the mesh has {V} vertices (0..{V - 1})")
    if not bool(torch.isfinite(verts).all()):
        raise CSDError("rasterize: vertex positions contain NaN or infinity")
    verts = verts if verts.dim() == 3 else verts.unsqueeze(0)
    return verts.expand(B, -1, -1), faces.to(device=verts.device, dtype=torch.long)


def _camera_space(verts: torch.Tensor, cams: Cameras) -> torch.Tensor:
    """World ``[B, V, 3]`` → camera space (OpenGL: the camera looks down −z)."""
    w2c = torch.linalg.inv(cams.c2w.to(device=verts.device, dtype=torch.float64)).to(verts.dtype)
    return verts @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]


def _project(cam_pts: torch.Tensor, cams: Cameras) -> torch.Tensor:
    """Camera space ``[B, V, 3]`` → screen ``[B, V, 3]``: (column, row, depth w = −z). Points nearer than NEAR
    are projected as if at NEAR (their triangles are culled; this only keeps the values finite)."""
    f = cams.focal.to(cam_pts)[:, None]
    w = -cam_pts[..., 2]
    wc = w.clamp(min=NEAR)
    return torch.stack([cams.width / 2 + f * cam_pts[..., 0] / wc, cams.height / 2 - f * cam_pts[..., 1] / wc, w], -1)


def rasterize(verts: torch.Tensor, faces: torch.Tensor, cams: Cameras, backend: str = "auto") -> Fragments:
    """Rasterize world-space ``verts`` ``[V, 3]`` (or ``[B, V, 3]``, one mesh per camera) with ``faces``
    ``[F, 3]`` for the ``B`` cameras ``cams`` (``cams.height × cams.width`` pixels). See the module docstring."""
    verts, faces = _check_mesh(verts, faces, len(cams))
    which = rasterizer_backend(backend, verts.device)
    cams = cams.to(verts.device)
    cam_pts = _camera_space(verts, cams)
    screen = _project(cam_pts, cams)
    if which == "nvdiffrast":
        return _rasterize_nvdiffrast(cam_pts, screen, faces, cams)
    face_id = _visible_faces(screen.detach(), faces, cams.height, cams.width)
    bary, depth = _fragment_geometry(screen, faces, face_id)
    return Fragments(face_id, bary, depth, face_id >= 0, screen)


# ----------------------------------------------------------------------------------- torch: visibility pass
@dataclass
class _Triangles:
    """The drawable triangles of a batch (no grad, float32), ``T`` of them."""

    base: torch.Tensor  # [T] int64: batch index · H · W (offset of the triangle's image in the z-buffer)
    face: torch.Tensor  # [T] int64 face index
    box: torch.Tensor  # [T, 4] int64 pixel bounding box: first column, first row, width, height
    a: torch.Tensor  # [T, 4] coefficients of x of the 3 edge functions and of the inverse depth 1/w
    b: torch.Tensor  # [T, 4] coefficients of y
    c: torch.Tensor  # [T, 4] constants
    thresh: torch.Tensor  # [T, 3] a sample is inside edge k when E_k > thresh_k (0, or −tiny: E_k ≥ 0 on ties)

    def take(self, idx: torch.Tensor) -> "_Triangles":
        return _Triangles(*(t[idx] for t in (self.base, self.face, self.box, self.a, self.b, self.c, self.thresh)))


def _triangle_setup(screen: torch.Tensor, faces: torch.Tensor, H: int, W: int) -> _Triangles:
    """Cull (near plane, zero area, outside the image) and set up the edge functions of the rest."""
    B, F = screen.shape[0], faces.shape[0]
    tri = screen.float()[:, faces].reshape(B * F, 3, 3)  # [B·F, vertex, (x, y, w)]
    x, y, w = tri.unbind(-1)
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    col0 = (x.amin(-1) - 0.5).clamp(-1, W).ceil().clamp(min=0)
    col1 = (x.amax(-1) - 0.5).clamp(-1, W).floor().clamp(max=W - 1)
    row0 = (y.amin(-1) - 0.5).clamp(-1, H).ceil().clamp(min=0)
    row1 = (y.amax(-1) - 0.5).clamp(-1, H).floor().clamp(max=H - 1)
    keep = (w > NEAR).all(-1) & (area.abs() > 1e-10) & (col0 <= col1) & (row0 <= row1)
    idx = keep.nonzero().squeeze(1)
    x, y, w, area = x[idx], y[idx], w[idx], area[idx]
    box = torch.stack([col0[idx], row0[idx], col1[idx] - col0[idx] + 1, row1[idx] - row0[idx] + 1], -1).long()
    coef, tie = _edge_functions(x, y, area)  # [T, 3 edges, (a, b, c)]
    plane = (coef * (1.0 / (area.abs()[:, None] * w))[..., None]).sum(1, keepdim=True)  # Σ λ_k / w_k
    coef = torch.cat([coef, plane], 1)
    thresh = torch.where(tie, -torch.finfo(torch.float32).tiny, 0.0)
    return _Triangles(idx // F * (H * W), idx % F, box, coef[..., 0].contiguous(), coef[..., 1].contiguous(),
                      coef[..., 2].contiguous(), thresh)


def _edge_functions(x: torch.Tensor, y: torch.Tensor, area: torch.Tensor):
    """Edge k joins vertices k+1 and k+2 (so its function is λ_k·area). Coefficients ``[T, 3, 3]`` of
    ``E_k(p) = a·px + b·py + c``, signed so that the interior is ``E_k > 0``; computed from the endpoints in
    canonical (lexicographic) order, so a shared edge gives exactly negated values in its two triangles. Tie flag:
    a sample with ``E_k == 0`` belongs to the triangle on the canonical edge's positive side."""
    p_x, p_y = x.roll(-1, 1), y.roll(-1, 1)  # vertex k+1
    q_x, q_y = x.roll(-2, 1), y.roll(-2, 1)  # vertex k+2
    swap = (p_x > q_x) | ((p_x == q_x) & (p_y > q_y))
    p_x, q_x = torch.where(swap, q_x, p_x), torch.where(swap, p_x, q_x)
    p_y, q_y = torch.where(swap, q_y, p_y), torch.where(swap, p_y, q_y)
    a = p_y - q_y
    b = q_x - p_x
    c = -(a * p_x + b * p_y)
    sign = torch.where(swap, -1.0, 1.0) * area.sign()[:, None]  # λ_k·area = ±E_canonical; interior: λ_k > 0
    return torch.stack([a, b, c], -1) * sign[..., None], sign > 0


@torch.no_grad()
def _visible_faces(screen: torch.Tensor, faces: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Z-buffered face ids ``[B, H, W]`` (−1: background). Triangles are drawn in classes of bounding-box
    size: boxes up to DENSE_MAX pixels a side as dense ``[triangles, cw·ch]`` blocks (``cw``, ``ch`` the box
    sides rounded up to powers of two: cheap broadcasting, some padding), larger ones sample by sample."""
    B = screen.shape[0]
    zbuf = torch.full((B * H * W,), _EMPTY, dtype=torch.int64, device=screen.device)
    tris = _triangle_setup(screen, faces, H, W)
    if tris.face.numel() == 0:
        return torch.full((B, H, W), -1, dtype=torch.int64, device=screen.device)
    cls_w, cls_h = _pow2_class(tris.box[:, 2]), _pow2_class(tris.box[:, 3])
    dense = (cls_w <= DENSE_MAX) & (cls_h <= DENSE_MAX)
    key = torch.where(dense, cls_w * (2 * DENSE_MAX) + cls_h, -1)
    for k in key.unique().tolist():
        idx = (key == k).nonzero().squeeze(1)
        if k < 0:
            _draw_large(zbuf, tris.take(idx), W)
            continue
        cw, ch = divmod(k, 2 * DENSE_MAX)
        for part in idx.split(max(1, CHUNK // (cw * ch))):
            _draw_dense(zbuf, tris.take(part), cw, ch, W)
    face_id = torch.where(zbuf == _EMPTY, -1, zbuf & 0xFFFFFFFF)
    return face_id.view(B, H, W)


def _pow2_class(n: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ≥ n (n ≥ 1)."""
    return torch.pow(2, torch.ceil(torch.log2(n.double()))).long()


def _draw_dense(zbuf, tris: _Triangles, cw: int, ch: int, W: int) -> None:
    """Triangles whose boxes fit ``cw × ch``: all their candidate pixel centres as a ``[T, cw·ch]`` block."""
    dev = zbuf.device
    ox = torch.arange(cw, device=dev).repeat(ch)
    oy = torch.arange(ch, device=dev).repeat_interleave(cw)
    x = (tris.box[:, :1] + ox).float() + 0.5  # [T, S] pixel-centre coordinates
    y = (tris.box[:, 1:2] + oy).float() + 0.5
    inside = (ox < tris.box[:, 2:3]) & (oy < tris.box[:, 3:4])
    for k in range(3):
        inside &= tris.a[:, k:k + 1] * x + tris.b[:, k:k + 1] * y + tris.c[:, k:k + 1] > tris.thresh[:, k:k + 1]
    t, s = inside.nonzero(as_tuple=True)
    px, py = tris.box[t, 0] + ox[s], tris.box[t, 1] + oy[s]
    _depth_test(zbuf, tris, t, px, py, W)


def _draw_large(zbuf, tris: _Triangles, W: int) -> None:
    """Large triangles: their boxes' pixel centres enumerated one by one (``repeat_interleave``), in chunks of
    about CHUNK samples."""
    counts = tris.box[:, 2] * tris.box[:, 3]
    starts = counts.cumsum(0) - counts
    _, sizes = torch.unique_consecutive(starts // CHUNK, return_counts=True)
    bounds = [0] + sizes.cumsum(0).tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # a range holds at most CHUNK + one triangle's samples
        n = counts[lo:hi]
        total = int(n.sum())
        t = torch.repeat_interleave(torch.arange(lo, hi, device=zbuf.device), n, output_size=total)
        local = torch.arange(total, device=t.device) + (starts[lo] - starts[t])
        box = tris.box[t]
        row = local // box[:, 2]
        px, py = box[:, 0] + local - row * box[:, 2], box[:, 1] + row
        x, y = px.float() + 0.5, py.float() + 0.5
        inside = torch.ones_like(x, dtype=torch.bool)
        for k in range(3):
            inside &= tris.a[t, k] * x + tris.b[t, k] * y + tris.c[t, k] > tris.thresh[t, k]
        _depth_test(zbuf, tris, t[inside], px[inside], py[inside], W)


def _depth_test(zbuf, tris: _Triangles, t, px, py, W: int) -> None:
    """Z-buffer the inside samples (triangle ``t`` at pixel ``px, py``): keep the least (depth bits, face id)."""
    inv_w = tris.a[t, 3] * (px.float() + 0.5) + tris.b[t, 3] * (py.float() + 0.5) + tris.c[t, 3]
    depth = 1.0 / inv_w.clamp(min=1e-30)
    key = (depth.view(torch.int32).long() << 32) | tris.face[t]
    zbuf.scatter_reduce_(0, tris.base[t] + py * W + px, key, "amin")


# ---------------------------------------------------------------------------- torch: differentiable geometry
def _fragment_geometry(screen: torch.Tensor, faces: torch.Tensor, face_id: torch.Tensor):
    """Perspective-correct barycentrics ``[B, H, W, 3]`` and depth ``[B, H, W]`` of the covered pixels, as
    differentiable functions of ``screen``."""
    B, H, W = face_id.shape
    pix = (face_id.reshape(-1) >= 0).nonzero().squeeze(1)
    fid = face_id.reshape(-1)[pix]
    b, rem = pix // (H * W), pix % (H * W)
    centre = torch.stack([rem % W, rem // W], -1).to(screen.dtype) + 0.5
    v = screen[b[:, None], faces[fid]]  # [N, 3, 3]
    d = v[..., :2] - centre[:, None]  # vertices relative to the pixel centre
    d1, d2 = d.roll(-1, 1), d.roll(-2, 1)
    lam = d1[..., 0] * d2[..., 1] - d1[..., 1] * d2[..., 0]  # λ_k · area (any sign, cancels)
    q = lam / v[..., 2]
    qs = q.sum(1, keepdim=True)
    bary = q / qs
    depth = lam.sum(1) / qs.squeeze(1)
    out_b = screen.new_zeros(B * H * W, 3).index_put((pix,), bary).view(B, H, W, 3)
    out_d = screen.new_zeros(B * H * W).index_put((pix,), depth).view(B, H, W)
    return out_b, out_d


# ------------------------------------------------------------------------------------------------ nvdiffrast
def _rasterize_nvdiffrast(cam_pts, screen, faces, cams) -> Fragments:
    import nvdiffrast.torch as dr

    H, W = cams.height, cams.width
    f = cams.focal.to(cam_pts)[:, None]
    w = -cam_pts[..., 2]
    z = (w * (FAR + NEAR) - 2 * FAR * NEAR) / (FAR - NEAR)  # OpenGL depth: −1 at NEAR, +1 at FAR
    clip = torch.stack([2 * f / W * cam_pts[..., 0], -2 * f / H * cam_pts[..., 1], z, w], -1)
    clip = clip.float().contiguous()
    tri = faces.int().contiguous()
    index = cam_pts.device.index if cam_pts.device.index is not None else torch.cuda.current_device()
    rast, _ = dr.rasterize(_nvdiffrast_context(index), clip, tri, resolution=[H, W])
    face_id = rast[..., 3].round().long() - 1
    mask = face_id >= 0
    u, v = rast[..., 0], rast[..., 1]
    bary = torch.stack([u, v, 1 - u - v], -1) * mask.unsqueeze(-1)
    w_tri = w.float()[torch.arange(len(cams), device=w.device)[:, None, None, None], faces[face_id.clamp(min=0)]]
    depth = (bary * w_tri).sum(-1) * mask
    return Fragments(face_id, bary.to(screen.dtype), depth.to(screen.dtype), mask, screen, "nvdiffrast", rast, clip)


# ----------------------------------------------------------------------------------------------- interpolate
def interpolate(attr: torch.Tensor, frags: Fragments, faces: torch.Tensor) -> torch.Tensor:
    """Per-vertex attributes ``[V, C]`` (or ``[B, V, C]``) interpolated at the pixels → ``[B, H, W, C]``, 0
    outside the mask; differentiable w.r.t. ``attr`` and (through the barycentrics) the vertex positions."""
    B, H, W = frags.face_id.shape
    if not torch.is_tensor(attr) or attr.dim() not in (2, 3) or (attr.dim() == 3 and attr.shape[0] not in (1, B)):
        raise CSDError(f"interpolate: attributes must be [V, C] or [{B}, V, C], got "
                       f"{tuple(getattr(attr, 'shape', ()))}")
    faces = faces.to(device=frags.face_id.device, dtype=torch.long)
    flat = frags.face_id.reshape(-1)
    pix = (flat >= 0).nonzero().squeeze(1)
    vid = faces[flat[pix]]  # [N, 3]
    if attr.dim() == 3 and attr.shape[0] == B and B > 1:
        a = attr[(pix // (H * W))[:, None], vid]
    else:
        a = (attr[0] if attr.dim() == 3 else attr)[vid]  # [N, 3, C]
    bary = frags.bary.reshape(-1, 3)[pix]
    dtype = torch.promote_types(attr.dtype, bary.dtype)
    val = (bary.to(dtype).unsqueeze(-1) * a.to(dtype)).sum(1)
    return val.new_zeros(B * H * W, attr.shape[-1]).index_put((pix,), val).view(B, H, W, -1)


# ------------------------------------------------------------------------------------------------- antialias
def antialias(image: torch.Tensor, frags: Fragments, faces: torch.Tensor) -> torch.Tensor:
    """Analytic silhouette antialiasing of ``image`` ``[B, H, W, C]`` (see the module docstring): the blend
    weights carry gradients to the vertex positions, so silhouettes move under a loss on the result."""
    if not torch.is_tensor(image) or image.dim() != 4 or image.shape[:3] != frags.face_id.shape:
        raise CSDError(f"antialias: the image must be [B, H, W, C] = [{', '.join(map(str, frags.face_id.shape))}, "
                       f"C], got {tuple(getattr(image, 'shape', ()))}")
    given = faces
    faces = faces.to(device=frags.face_id.device, dtype=torch.long)
    if frags.backend == "nvdiffrast":
        import nvdiffrast.torch as dr

        tri = faces.int().contiguous()
        topology = _cached(frags, "nvdiffrast_topology", given, lambda: dr.antialias_construct_topology_hash(tri))
        return dr.antialias(image.float().contiguous(), frags.raster, frags.clip, tri,
                            topology_hash=topology).to(image.dtype)
    pairs = _cached(frags, "aa_pairs", given, lambda: _aa_pairs(frags, faces))
    if pairs["target"].numel() == 0:
        return image
    alpha = _aa_alpha(frags.screen, pairs)
    C = image.shape[-1]
    flat = image.reshape(-1, C)
    delta = alpha.to(image.dtype)[:, None] * (flat[pairs["source"]] - flat[pairs["target"]])
    return flat.index_add(0, pairs["target"], delta).view_as(image)


def _cached(frags: Fragments, name: str, faces: torch.Tensor, make):
    """``make()`` once per fragments and faces tensor (the mesh renderer antialiases several images per
    rasterization). The entry holds ``faces``, so its memory cannot be reused by another tensor meanwhile."""
    key = (name, faces.data_ptr(), tuple(faces.shape), faces.dtype, faces._version)
    if key not in frags.cache:
        frags.cache[key] = (faces, make())
    return frags.cache[key][1]


def edge_neighbours(faces: torch.Tensor) -> torch.Tensor:
    """``[F, 3]``: the face on the other side of edge k (vertices k and k+1) of each face, or −1 when the edge
    is open or shared by more than two faces (then it always counts as a silhouette)."""
    F = faces.shape[0]
    a, b = faces, faces.roll(-1, 1)
    key = (torch.minimum(a, b) * (int(faces.max()) + 1) + torch.maximum(a, b)).reshape(-1)
    sorted_key, order = key.sort()
    no = torch.zeros(2, dtype=torch.bool, device=faces.device)
    eq = torch.cat([no[:1], sorted_key[1:] == sorted_key[:-1], no])  # eq[i + 1]: slots i, i + 1 share the edge
    i = torch.arange(3 * F, device=faces.device)
    # slot i has exactly one partner when its edge occurs twice: at i + 1 or at i − 1
    first = eq[i + 1] & ~eq[i] & ~eq[i + 2]
    second = eq[i] & ~eq[i + 1] & ~eq[(i - 1).clamp(min=0)]
    partner = torch.where(first, i + 1, torch.where(second, i - 1, 0))
    nb_sorted = torch.where(first | second, order[partner] // 3, -1)
    return torch.empty_like(nb_sorted).index_put_((order,), nb_sorted).view(F, 3)


_TOPOLOGY: dict = {}  # device → (faces, their edge_neighbours): a fixed mesh is analysed once


def _topology(faces: torch.Tensor) -> torch.Tensor:
    hit = _TOPOLOGY.get(faces.device)
    if hit is not None and hit[0].shape == faces.shape and torch.equal(hit[0], faces):
        return hit[1]
    neighbours = edge_neighbours(faces)
    _TOPOLOGY[faces.device] = (faces.clone(), neighbours)
    return neighbours


def _cross2(o: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[..., 0] - o[..., 0]) * (b[..., 1] - o[..., 1]) - (a[..., 1] - o[..., 1]) * (b[..., 0] - o[..., 0])


def _is_silhouette(s2, b, va, vb, own, neighbour, faces) -> torch.Tensor:
    """Whether edges ``va–vb`` (of faces whose third vertex is ``own``, with ``neighbour`` across) are
    silhouettes in view ``b``: open, or the neighbour lies on the same side as the face (the surface folds)."""
    off_edge = faces[neighbour.clamp(min=0)].sum(-1) - va - vb  # the neighbour's third vertex, in any order
    other = torch.where(neighbour >= 0, off_edge, own)
    pa, pb = s2[b, va], s2[b, vb]
    side_own, side_other = _cross2(pa, pb, s2[b, own]), _cross2(pa, pb, s2[b, other])
    opposite = ((side_own > 0) & (side_other < 0)) | ((side_own < 0) & (side_other > 0))
    return (neighbour < 0) | ~opposite


@torch.no_grad()
def _aa_pairs(frags: Fragments, faces: torch.Tensor) -> dict:
    """The antialiasing work, found once per rasterization (no grad): for each pixel pair where a silhouette edge
    crosses, the pixel whose colour changes (``target``), the other (``source``), the crossing edge's vertex ids,
    and the geometry needed to recompute the crossing differentiably in :func:`_aa_alpha`."""
    screen = frags.screen.detach()
    neighbours = _topology(faces)
    depth = torch.where(frags.mask, frags.depth.detach(), torch.inf)
    parts = [_aa_axis(axis, frags.face_id, depth, screen, faces, neighbours) for axis in (0, 1)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _aa_axis(axis, face_id, depth, screen, faces, neighbours) -> dict:
    """Pairs along ``axis`` (0: a pixel and its right neighbour, 1: a pixel and the one below)."""
    B, H, W = face_id.shape
    fid, depth = face_id.reshape(-1), depth.reshape(-1)
    differ = face_id[:, :, :-1] != face_id[:, :, 1:] if axis == 0 else face_id[:, :-1, :] != face_id[:, 1:, :]
    b, j, i = differ.nonzero(as_tuple=True)
    p0 = (b * H + j) * W + i
    p1 = p0 + (1 if axis == 0 else W)
    back_first = depth[p1] < depth[p0]  # the right/lower pixel is the front one
    front, back = torch.where(back_first, p1, p0), torch.where(back_first, p0, p1)
    seg = {"batch": b, "axis": axis,
           "fixed": (j if axis == 0 else i).to(screen.dtype) + 0.5,  # the segment's other coordinate
           "origin": (i if axis == 0 else j).to(screen.dtype) + 0.5 + back_first.to(screen.dtype),  # front centre
           "direction": torch.where(back_first, -1.0, 1.0).to(screen.dtype)}  # from the front towards the back
    ok, t_exit, va, vb = _find_silhouette(seg, fid[front], fid[back], screen, faces, neighbours)
    front_changes = t_exit < 0.5
    target = torch.where(front_changes, front, back)[ok]
    return {"target": target, "source": torch.where(front_changes, back, front)[ok], "batch": b[ok],
            "va": va[ok], "vb": vb[ok], "axis": torch.full_like(target, axis), "fixed": seg["fixed"][ok],
            "origin": seg["origin"][ok], "direction": seg["direction"][ok],
            "sign": torch.where(front_changes, 1.0, -1.0).to(screen.dtype)[ok]}


def _find_silhouette(seg, tri, back_tri, screen, faces, neighbours):
    """Walk from the front triangle ``tri`` along each segment, through up to ``AA_WALK_STEPS`` neighbours
    across interior edges, to the silhouette edge where the front surface ends. Returns, per segment, whether
    one was found that antialiasing uses (steep for this axis, crossing within the segment), the crossing
    ``t`` (pixels from the front centre) and the edge's vertex ids."""
    P = tri.shape[0]
    s2 = screen[..., :2]
    ok = torch.zeros(P, dtype=torch.bool, device=tri.device)
    t_exit = torch.full((P,), -1.0, dtype=screen.dtype, device=tri.device)
    va_out, vb_out = torch.zeros_like(tri), torch.zeros_like(tri)
    live, cur = torch.arange(P, device=tri.device), tri
    for _ in range(AA_WALK_STEPS + 1):
        b, f = seg["batch"][live], faces[cur]
        va, vb = f, f.roll(-1, 1)  # [L, 3] edges
        t, steep = _crossings(s2[b[:, None], va], s2[b[:, None], vb], seg["axis"], seg["fixed"][live, None],
                              seg["origin"][live, None], seg["direction"][live, None])
        te, k = t.max(1)  # where the segment leaves the current triangle
        sel = lambda x: x.gather(1, k[:, None]).squeeze(1)  # noqa: E731
        va, vb, nxt = sel(va), sel(vb), sel(neighbours[cur])
        within = (te > -AA_EPS) & (te < 1 + AA_EPS)
        silhouette = _is_silhouette(s2, b, va, vb, sel(f.roll(-2, 1)), nxt, faces)
        found = silhouette & within & sel(steep)
        idx = live[found]
        ok[idx], t_exit[idx], va_out[idx], vb_out[idx] = True, te[found], va[found], vb[found]
        go_on = ~silhouette & within & (te < 1) & (nxt != back_tri[live])
        live, cur = live[go_on], nxt[go_on]
        if live.numel() == 0:
            break
    return ok, t_exit.clamp(0, 1), va_out, vb_out


def _crossings(a, b, axis, fixed, origin, direction):
    """Distance ``t`` (pixels, from the front pixel's centre towards the back one) where the edges ``a→b``
    cross the line ``coordinate[1 − axis] = fixed`` (−inf where an edge does not span it), and whether each
    edge is steep for this axis (at least as long across the segment as along it)."""
    al_a, al_b, fx_a, fx_b = a[..., axis], b[..., axis], a[..., 1 - axis], b[..., 1 - axis]
    spans = (fx_a >= fixed) != (fx_b >= fixed)
    denom = torch.where(spans, fx_b - fx_a, 1.0)
    cross = al_a + (fixed - fx_a) * (al_b - al_a) / denom
    t = torch.where(spans, (cross - origin) * direction, -torch.inf)
    return t, (fx_b - fx_a).abs() >= (al_b - al_a).abs()


def _aa_alpha(screen: torch.Tensor, pairs: dict) -> torch.Tensor:
    """Blend weights ``[P]`` of the AA pairs, differentiable w.r.t. ``screen``."""
    b, axis = pairs["batch"], pairs["axis"][:, None]
    a, c = screen[b, pairs["va"], :2], screen[b, pairs["vb"], :2]
    al_a, al_c = a.gather(1, axis).squeeze(1), c.gather(1, axis).squeeze(1)
    fx_a, fx_c = a.gather(1, 1 - axis).squeeze(1), c.gather(1, 1 - axis).squeeze(1)
    cross = al_a + (pairs["fixed"] - fx_a) * (al_c - al_a) / (fx_c - fx_a)
    t = ((cross - pairs["origin"]) * pairs["direction"]).clamp(0, 1)
    return pairs["sign"] * (0.5 - t)
