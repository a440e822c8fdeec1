"""UV atlas and texture baking (spec §5.5): xatlas unwrap, UV-space rasterisation, albedo queries at each texel's
surface point, and gutter filling so that no empty (black) texel is ever sampled at a seam.

* **Unwrap.** xatlas' charting slows down sharply with mesh size (a 100k-face mesh: ~45 s on this CPU, mostly
  packing thousands of small charts). The mesh is therefore cut into spatially compact parts of at most
  ``UV_PART_FACES`` faces (a k-d split of face centroids) that are charted separately into one atlas: the same
  100k faces unwrap in ~3 s with a few hundred charts. Part borders become chart borders (seams), which the
  gutter fill below keeps invisible.
* **Rasterise.** Every texel centre within ``GUTTER`` texels of a UV triangle gets the nearest triangle and the
  barycentric coordinates of the nearest point on it (inside: the point itself). All triangles at once, in
  chunks of candidate texels (torch, vectorised).
* **Bake.** World position = barycentric mix of the triangle's vertices; colour = the scene's albedo there.
* **Fill.** Texels farther from every triangle take the colour of the nearest baked texel (an exact Euclidean
  distance transform), so bilinear filtering and mip-mapping across chart borders never mix in black.

UV convention (OBJ / trimesh): ``u`` to the right, ``v`` upwards; texel ``(row i, column j)`` has its centre at
``u = (j + 0.5) / T``, ``v = 1 − (i + 0.5) / T`` (row 0 is the top of the image).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .mesh import MeshError

AlbedoFn = Callable[[np.ndarray], np.ndarray]  # [N, 3] float32 → [N, 3] in [0, 1]
ProgressFn = Callable[[float], None]

#: faces per separately charted part (see the module docstring)
UV_PART_FACES = 4000
#: texels within this distance (in texels) of a triangle are baked from the nearest point on it
GUTTER = 1.5
#: candidate texels per rasterisation chunk (memory bound)
RASTER_CHUNK = 1 << 22


def _require_xatlas():
    try:
        import xatlas
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MeshError("texture baking needs xatlas for the UV unwrap: pip install xatlas (or set the texture "
                        "size to 0 for vertex colours only)") from e
    return xatlas


# ---------------------------------------------------------------------------------------------------- unwrap
def spatial_parts(vertices: np.ndarray, faces: np.ndarray, max_faces: int) -> List[np.ndarray]:
    """Face index sets of at most ``max_faces`` faces each: recursive median splits of the face centroids along
    the longest side of each part's extent."""
    centroids = vertices[faces].mean(1)
    todo, parts = [np.arange(len(faces))], []
    while todo:
        g = todo.pop()
        if len(g) <= max_faces:
            parts.append(g)
            continue
        c = centroids[g]
        axis = int(np.argmax(c.max(0) - c.min(0)))
        half = len(g) // 2
        order = np.argpartition(c[:, axis], half)
        todo += [g[order[:half]], g[order[half:]]]
    return parts


@dataclass
class UVAtlas:
    uv: np.ndarray  # [W, 2] float32 in [0, 1]
    uv_faces: np.ndarray  # [F, 3] int64, face i of the mesh
    uv_vertex: np.ndarray  # [W] int64: the mesh vertex of each UV vertex
    charts: int
    parts: int
    utilization: float


def unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding: int = 2,
           part_faces: int = UV_PART_FACES) -> UVAtlas:
    """One xatlas atlas for the mesh, charted part by part; ``uv_faces`` keeps the mesh's face order."""
    xatlas = _require_xatlas()
    parts = spatial_parts(vertices, faces, part_faces)
    atlas = xatlas.Atlas()
    local = []
    for g in parts:
        used, inv = np.unique(faces[g], return_inverse=True)
        lf = inv.reshape(-1, 3).astype(np.uint32)
        atlas.add_mesh(np.ascontiguousarray(vertices[used], np.float32), lf)
        local.append((used, lf))
    chart_opts = xatlas.ChartOptions()
    pack_opts = xatlas.PackOptions()
    pack_opts.resolution = int(texture_size)
    pack_opts.padding = int(padding)
    pack_opts.bilinear = True
    atlas.generate(chart_opts, pack_opts)
    if atlas.atlas_count != 1:  # pragma: no cover - resolution without texels_per_unit gives one atlas
        raise MeshError(f"the UV unwrap produced {atlas.atlas_count} atlases instead of one")
    uv_faces = np.empty((len(faces), 3), np.int64)
    uvs, owners, offset = [], [], 0
    for i, (g, (used, lf)) in enumerate(zip(parts, local)):
        vmap, idx, uv = atlas[i]
        if idx.shape != lf.shape or not np.array_equal(vmap[idx], lf):
            raise MeshError("the UV unwrap (xatlas) changed the faces of the mesh; try another face budget")
        uv_faces[g] = idx.astype(np.int64) + offset
        uvs.append(uv.astype(np.float32))
        owners.append(used[vmap])
        offset += len(vmap)
    return UVAtlas(np.clip(np.concatenate(uvs), 0.0, 1.0), uv_faces, np.concatenate(owners).astype(np.int64),
                   int(atlas.chart_count), len(parts), float(atlas.utilization))


# ------------------------------------------------------------------------------------------------- rasterise
@dataclass
class UVRaster:
    texel: np.ndarray  # [K] flat texel index (row * T + column), texels within the gutter of some triangle
    face: np.ndarray  # [K] nearest triangle
    bary: np.ndarray  # [K, 3] float32, barycentric coordinates of the nearest point on it
    inside: np.ndarray  # [K] bool: the texel centre lies inside that triangle
    size: int


def _cross(u, v):
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _segment(p, a, b):
    """Distance from ``p`` to segment ``ab`` and the parameter of the nearest point."""
    d = b - a
    t = (((p - a) * d).sum(-1) / (d * d).sum(-1).clamp_min(1e-20)).clamp(0.0, 1.0)
    return (p - (a + t[:, None] * d)).norm(dim=-1), t


def rasterize_uv(uv: np.ndarray, uv_faces: np.ndarray, size: int, gutter: float = GUTTER,
                 chunk: int = RASTER_CHUNK) -> UVRaster:
    """Nearest UV triangle (and point on it) for every texel within ``gutter`` texels of one."""
    import torch

    T = int(size)
    uvt = torch.from_numpy(np.ascontiguousarray(uv, np.float32)).double()
    pix = torch.stack([uvt[:, 0] * T - 0.5, (1.0 - uvt[:, 1]) * T - 0.5], -1)
    tri = pix[torch.from_numpy(np.ascontiguousarray(uv_faces, np.int64))]  # [F, 3, 2] texel coordinates
    area2 = _cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # twice the signed area
    # length of the edge opposite each corner: the distance to that edge's line is -λ_i·|2A|/|edge_i|
    opposite = torch.stack([(tri[:, 2] - tri[:, 1]).norm(dim=-1), (tri[:, 0] - tri[:, 2]).norm(dim=-1),
                            (tri[:, 1] - tri[:, 0]).norm(dim=-1)], -1)
    lo = torch.floor(tri.amin(1) - gutter).clamp(0, T - 1).long()
    hi = torch.ceil(tri.amax(1) + gutter).clamp(0, T - 1).long()
    wh = hi - lo + 1  # [F, 2]
    count = wh[:, 0] * wh[:, 1]
    count[area2.abs() < 1e-12] = 0  # zero area in UV: its neighbours cover it
    tri, area2, opposite = tri.float(), area2.float(), opposite.float()
    best = torch.full((T * T,), float("inf"))
    face_of = torch.full((T * T,), -1, dtype=torch.int32)
    bary_of = torch.zeros((T * T, 3))
    first = torch.full((T * T,), np.iinfo(np.int64).max, dtype=torch.long)
    csum = torch.cumsum(count, 0)
    total = int(csum[-1]) if len(csum) else 0
    # face ranges holding about ``chunk`` candidate texels each
    cuts = np.searchsorted(csum.numpy(), np.arange(chunk, total, chunk)).tolist() if total > chunk else []
    bounds = sorted(set([0] + [c + 1 for c in cuts if c + 1 < len(count)] + [len(count)]))
    for f0, f1 in zip(bounds[:-1], bounds[1:]):
        cnt = count[f0:f1]
        n = int(cnt.sum())
        if n == 0:
            continue
        # every texel of every face's (grown) bounding box
        fid = torch.repeat_interleave(torch.arange(f0, f1), cnt)
        k = torch.arange(n) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
        w = wh[fid, 0]
        x = lo[fid, 0] + k % w
        y = lo[fid, 1] + k // w
        p = torch.stack([x, y], -1).float()
        a, b, c = tri[fid, 0], tri[fid, 1], tri[fid, 2]
        ar = area2[fid]
        lam = torch.stack([_cross(b - p, c - p) / ar, _cross(c - p, a - p) / ar], -1)
        lam = torch.cat([lam, 1.0 - lam.sum(-1, keepdim=True)], -1)  # [n, 3] barycentric coordinates
        inside = (lam >= -1e-6).all(-1)
        # outside: a lower bound of the distance (to the farthest violated edge line) rejects most candidates
        bound = (-lam * ar.abs()[:, None] / opposite[fid].clamp_min(1e-12)).amax(-1)
        near = torch.nonzero(~inside & (bound <= gutter)).squeeze(1)
        ins = torch.nonzero(inside).squeeze(1)
        bary_in = lam[ins].clamp_min(0.0)
        bary_in = bary_in / bary_in.sum(-1, keepdim=True).clamp_min(1e-12)
        # exact nearest point on the triangle's boundary for the near-outside ones
        pn, an, bn, cn = p[near], a[near], b[near], c[near]
        d_ab, t_ab = _segment(pn, an, bn)
        d_bc, t_bc = _segment(pn, bn, cn)
        d_ca, t_ca = _segment(pn, cn, an)
        dist_out, which = torch.stack([d_ab, d_bc, d_ca], -1).min(-1)
        zero = torch.zeros_like(t_ab)
        bary_out = torch.where((which == 0)[:, None], torch.stack([1 - t_ab, t_ab, zero], -1),
                               torch.where((which == 1)[:, None], torch.stack([zero, 1 - t_bc, t_bc], -1),
                                           torch.stack([t_ca, zero, 1 - t_ca], -1)))
        keep_out = dist_out <= gutter
        sel = torch.cat([ins, near[keep_out]])
        dist = torch.cat([torch.zeros(len(ins)), dist_out[keep_out]])
        bary = torch.cat([bary_in, bary_out[keep_out]])
        texel = y[sel] * T + x[sel]
        fsel = fid[sel]
        best.scatter_reduce_(0, texel, dist, reduce="amin")
        win = torch.nonzero(dist <= best[texel]).squeeze(1)
        if win.numel() == 0:
            continue
        # one winner per texel (ties: the first candidate), so its face and barycentrics go together
        tw = texel[win]
        first.scatter_reduce_(0, tw, win, reduce="amin")
        pick = win[first[tw] == win]
        first[tw] = np.iinfo(np.int64).max
        face_of[texel[pick]] = fsel[pick].int()
        bary_of[texel[pick]] = bary[pick]
    covered = torch.nonzero(face_of >= 0).squeeze(1)
    return UVRaster(covered.numpy().astype(np.int64), face_of[covered].numpy().astype(np.int64),
                    bary_of[covered].numpy(), (best[covered] == 0).numpy(), T)


# ------------------------------------------------------------------------------------------------------ bake
def fill_empty(texture: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Every texel not ``covered`` takes the value of the nearest covered texel (Euclidean)."""
    try:
        from scipy.ndimage import distance_transform_edt
    except ImportError as e:  # pragma: no cover
        raise MeshError("texture baking needs scipy: pip install scipy") from e
    if not covered.any():
        raise MeshError("the UV atlas covers no texel; raise the texture size")
    if covered.all():
        return texture
    rows, cols = distance_transform_edt(~covered, return_distances=False, return_indices=True)
    return texture[rows, cols]


def surface_points(vertices: np.ndarray, faces: np.ndarray, face: np.ndarray, bary: np.ndarray,
                   chunk: int = 1 << 20) -> np.ndarray:
    """``Σ bary_i · vertex_i`` of the given faces → ``[K, 3]`` float32."""
    out = np.empty((len(face), 3), np.float32)
    for s in range(0, len(face), chunk):
        corners = vertices[faces[face[s:s + chunk]]]  # [n, 3, 3]
        out[s:s + chunk] = np.einsum("nc,ncd->nd", bary[s:s + chunk], corners)
    return out


def bake_texture(vertices: np.ndarray, faces: np.ndarray, atlas: UVAtlas, size: int, albedo_fn: AlbedoFn,
                 progress: Optional[ProgressFn] = None) -> Tuple[np.ndarray, Dict[str, float]]:
    """The ``[size, size, 3]`` uint8 base-colour texture of the mesh in ``atlas``."""
    t0 = time.perf_counter()
    raster = rasterize_uv(atlas.uv, atlas.uv_faces, size)
    t1 = time.perf_counter()
    if progress:
        progress(0.1)
    points = surface_points(vertices, faces, raster.face, raster.bary)
    colours = np.clip(np.asarray(albedo_fn(points), np.float32).reshape(-1, 3), 0.0, 1.0)
    t2 = time.perf_counter()
    tex = np.zeros((size * size, 3), np.float32)
    tex[raster.texel] = colours
    covered = np.zeros(size * size, bool)
    covered[raster.texel] = True
    filled = fill_empty(tex.reshape(size, size, 3), covered.reshape(size, size))
    texture = np.clip(filled * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if progress:
        progress(1.0)
    stats = {"texels_inside": int(raster.inside.sum()), "texels_baked": int(len(raster.texel)),
             "rasterize_seconds": t1 - t0, "albedo_seconds": t2 - t1, "fill_seconds": time.perf_counter() - t2}
    return texture, stats


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup (clamp to edge) of a ``[H, W, C]`` uint8 texture at ``uv [N, 2]`` → float32 ``[N, C]`` in
    [0, 1], with the texel-centre convention above (as OpenGL / three.js sample)."""
    H, W = texture.shape[:2]
    x = uv[:, 0].astype(np.float64) * W - 0.5
    y = (1.0 - uv[:, 1].astype(np.float64)) * H - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    xs = np.clip([x0, x0 + 1], 0, W - 1)
    ys = np.clip([y0, y0 + 1], 0, H - 1)
    t = texture.astype(np.float32) / 255.0
    top = t[ys[0], xs[0]] * (1 - fx) + t[ys[0], xs[1]] * fx
    bottom = t[ys[1], xs[0]] * (1 - fx) + t[ys[1], xs[1]] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)
