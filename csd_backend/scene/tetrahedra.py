"""Tetrahedral grids, differentiable marching tetrahedra and the mesh regularisers of DMTet (spec §5.3).

Conventions
-----------
* **Grid frame.** Every grid lives in the unit cube [0, 1]³; the caller maps it into its own bounding box
  (``dmtet.TetSDFGeometry.world``). A positive per-axis scale keeps every orientation below.
* **Resolution.** ``tet_grid(res)`` matches the vertex density of threestudio's ``load/tets/{res}_tets.npz``
  (made by Quartet with cell size 1/res on a body-centred lattice, whose vertices sit ``2/res`` apart on each
  axis: 32 → 5 034 vertices, 24 444 tets; 64 → 36 562, 192 492). Here the cube is cut into ``n = res/2``
  cells per axis, each cell into 6 tetrahedra (Freudenthal/Kuhn: the 6 paths along the cell's diagonal from
  its ``(0,0,0)`` to its ``(1,1,1)`` corner, every cell cut the same way, so the grid is conforming):
  ``(n+1)³`` vertices and ``6 n³`` tets (32 → 4 913 / 24 576, 64 → 35 937 / 196 608, 128 → 274 625 /
  1 572 864, 256 → 2 146 689 / 12 582 912). The deformation ``tanh(δ)/res`` is thus at most half a cell.
* **Orientation.** Every tet ``(a, b, c, d)`` is positively oriented: ``det[b−a, c−a, d−a] > 0`` (Quartet's
  npz files use the same sign). ``marching_tetrahedra`` relies on it for the winding of its faces.
* **SDF.** Negative inside, positive outside; an exact zero counts as *outside* (positive). A surface vertex is
  the linear zero crossing ``(p_a·(−s_b) + p_b·s_a) / (s_a − s_b)`` of a sign-changing edge, one per edge
  (shared by every tet around the edge), so a level set closed inside the grid gives a watertight mesh. Faces
  are wound counter-clockwise seen from outside: their normals point towards positive SDF. A level set that
  meets the grid's boundary gives an open mesh there.
* **Normals.** A vertex normal is the normalised sum of the unnormalised (area-weighted) normals of its faces;
  a degenerate sum (squared length ≤ 1e-20) becomes +z, as in threestudio's ``Mesh``.
"""
from __future__ import annotations

import functools
import itertools
import numbers
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

#: the 6 edges of a tet as pairs of its local vertices; an edge "slot" below is a row of this table
TET_EDGES = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], dtype=torch.long)


# ------------------------------------------------------------------------------------------------- the grid
def _kuhn_cell() -> Tensor:
    """``[6, 4, 3]`` corner offsets of the 6 Kuhn tets of the unit cell, each positively oriented."""
    eye = torch.eye(3, dtype=torch.long)
    tets = []
    for perm in itertools.permutations(range(3)):
        path = torch.stack([torch.zeros(3, dtype=torch.long), eye[perm[0]], eye[perm[0]] + eye[perm[1]],
                            torch.ones(3, dtype=torch.long)])
        if torch.linalg.det((path[1:] - path[0]).double()) < 0:
            path = path[[0, 1, 3, 2]]
        tets.append(path)
    return torch.stack(tets)


def _check_resolution(resolution) -> int:
    if not isinstance(resolution, numbers.Integral) or isinstance(resolution, bool) or resolution % 2 \
            or not 8 <= resolution <= 512:
        raise ConfigError("scene.tet_resolution", f"must be an even integer in [8, 512] (threestudio's 32, 64, "
                                                  f"128 or 256), got {resolution!r}")
    return int(resolution)


def tet_grid(resolution: int) -> Tuple[Tensor, Tensor]:
    """The tetrahedral grid of ``resolution`` (even, 8…512): vertices ``[V, 3]`` float32 in [0, 1]³ and tets
    ``[T, 4]`` int64, ``V = (res/2 + 1)³``, ``T = 6 (res/2)³`` (see the module docstring).

    Deterministic; vertex ``(i, j, k)`` (cell-corner indices along x, y, z) has index ``(i·(n+1) + j)·(n+1) + k``.
    Grids up to resolution 128 (≤ 51 MB) are cached and shared between calls: never modify the result in place
    (clone it first). Larger ones (256: 409 MB, built in about 0.3 s) are built afresh, not held by a cache.
    """
    resolution = _check_resolution(resolution)
    return _cached_grid(resolution) if resolution <= MAX_CACHED_RESOLUTION else _build_grid(resolution)


#: the largest resolution whose grid ``tet_grid`` keeps in its cache
MAX_CACHED_RESOLUTION = 128


@functools.lru_cache(maxsize=4)
def _cached_grid(resolution: int) -> Tuple[Tensor, Tensor]:
    return _build_grid(resolution)


def _build_grid(resolution: int) -> Tuple[Tensor, Tensor]:
    n = resolution // 2
    axis = torch.arange(n + 1, dtype=torch.float32) / n
    vertices = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    stride = torch.tensor([(n + 1) ** 2, n + 1, 1], dtype=torch.long)
    corner = (_kuhn_cell() * stride).sum(-1)  # [6, 4] index offsets of a cell's tets from its (0,0,0) corner
    cell = torch.arange(n, dtype=torch.long)
    base = (cell[:, None, None] * stride[0] + cell[None, :, None] * stride[1] + cell[None, None, :]).reshape(-1)
    tets = (base[:, None, None] + corner).reshape(-1, 4)
    return vertices, tets


def deformed_vertices(grid_vertices: Tensor, deformation: Tensor, resolution: int) -> Tensor:
    """``grid_vertices + tanh(deformation)/resolution`` (``[V, 3]``, grid frame): each vertex moves at most half
    a cell (cells are ``2/resolution`` wide)."""
    return grid_vertices + torch.tanh(deformation) / resolution


# ---------------------------------------------------------------------------------------- marching tetrahedra
def _triangle_table() -> Tensor:
    """``[16, 2, 3]`` edge slots (rows of ``TET_EDGES``) of the 0, 1 or 2 triangles of each sign case (bit i set
    when local vertex i is outside), −1 where there is no triangle; wound so that their normals point to the
    outside vertices of a positively oriented tet."""
    ref = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    table = torch.full((16, 2, 3), -1, dtype=torch.long)
    edges = TET_EDGES.tolist()
    for case in range(1, 15):
        out = [(case >> i) & 1 for i in range(4)]
        slots = [s for s, (a, b) in enumerate(edges) if out[a] != out[b]]
        if len(slots) == 4:  # a quad: order its slots around it (neighbours share a tet vertex), split it
            s0 = slots[0]
            near = [s for s in slots[1:] if set(edges[s]) & set(edges[s0])]
            far = [s for s in slots[1:] if s not in near]
            tris = [[s0, near[0], far[0]], [s0, far[0], near[1]]]
        else:
            tris = [slots]
        outside = ref[[i for i in range(4) if out[i]]].mean(0)
        for t, tri in enumerate(tris):
            p = ref[TET_EDGES[tri]].mean(1)  # edge midpoints
            if torch.dot(torch.linalg.cross(p[1] - p[0], p[2] - p[0]), outside - p.mean(0)) < 0:
                tri = [tri[0], tri[2], tri[1]]
            table[case, t] = torch.tensor(tri)
    return table


TRIANGLE_TABLE = _triangle_table()


def _check_inputs(vertices: Tensor, sdf: Tensor, tets: Tensor) -> Tensor:
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must be [V, 3], got {tuple(vertices.shape)}")
    if sdf.numel() != vertices.shape[0] or sdf.ndim > 2 or (sdf.ndim == 2 and sdf.shape[1] != 1):
        raise ValueError(f"sdf must be [V] (or [V, 1]) with V = {vertices.shape[0]}, got {tuple(sdf.shape)}")
    if tets.ndim != 2 or tets.shape[1] != 4:
        raise ValueError(f"tets must be [T, 4], got {tuple(tets.shape)}")
    return sdf.reshape(-1)


def _crossing_topology(outside: Tensor, tets: Tensor, n_vertices: int):
    """Index work of marching tets (no gradients): ``(ends [M, 2] grid vertices of each crossing edge,
    faces [F, 3] indices into the crossing edges)``. Only tets with mixed signs ever build their edges."""
    weights = torch.tensor([1, 2, 4, 8], dtype=torch.uint8, device=tets.device)
    case = (outside.to(torch.uint8)[tets] * weights).sum(1, dtype=torch.uint8)  # [T] sign case, 1 byte a tet
    mixed = ((case > 0) & (case < 15)).nonzero().squeeze(1)
    tets, case = tets[mixed], case[mixed].long()
    edge_slots = TET_EDGES.to(tets.device)
    ends = tets[:, edge_slots]  # [Tm, 6, 2]
    occ = outside[tets]
    crossing = occ[:, edge_slots[:, 0]] != occ[:, edge_slots[:, 1]]  # [Tm, 6]
    key = ends.min(-1).values * n_vertices + ends.max(-1).values  # one int64 per undirected edge
    unique_keys, inverse = torch.unique(key[crossing], return_inverse=True)
    edge_vertex = torch.full_like(key, -1)
    edge_vertex[crossing] = inverse
    tri = TRIANGLE_TABLE.to(tets.device)[case]  # [Tm, 2, 3]
    faces = torch.gather(edge_vertex, 1, tri.clamp_min(0).reshape(-1, 6)).reshape(-1, 2, 3)
    faces = faces[tri[:, :, 0] >= 0]
    ends = torch.stack([unique_keys // n_vertices, unique_keys % n_vertices], 1)
    return ends, faces


def marching_tetrahedra(vertices: Tensor, sdf: Tensor, tets: Tensor) -> Tuple[Tensor, Tensor]:
    """The zero level set of ``sdf`` on a tet grid: ``(mesh vertices [M, 3], faces [F, 3] int64)``.

    ``vertices`` ``[V, 3]`` (any frame, e.g. deformed or in world units), ``sdf`` ``[V]`` (or ``[V, 1]``; negative
    inside, zero counts as outside), ``tets`` ``[T, 4]`` positively oriented. Each sign-changing edge gives one
    vertex (shared by its tets: watertight for a level set closed inside the grid); faces are wound CCW seen
    from outside. Differentiable w.r.t. ``vertices`` and ``sdf``; the sign pattern (topology) is not.
    No surface → empty ``[0, 3]`` tensors. An sdf exactly 0 at a vertex puts all its crossings on that vertex:
    coincident mesh vertices and zero-area faces, which are still connected consistently.
    """
    sdf = _check_inputs(vertices, sdf, tets)
    with torch.no_grad():
        ends, faces = _crossing_topology(sdf.detach() >= 0, tets, vertices.shape[0])
    if faces.shape[0] == 0:
        dtype = torch.promote_types(vertices.dtype, sdf.dtype)
        return vertices.new_zeros((0, 3), dtype=dtype), faces.new_zeros((0, 3))
    p_a, p_b = vertices[ends[:, 0]], vertices[ends[:, 1]]
    s_a, s_b = sdf[ends[:, 0], None], sdf[ends[:, 1], None]
    return (p_a * -s_b + p_b * s_a) / (s_a - s_b), faces


# ----------------------------------------------------------------------------------------- mesh quantities
def face_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """``[F, 3]`` unnormalised face normals ``(v1 − v0) × (v2 − v0)`` (length = twice the area)."""
    v0, v1, v2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    return torch.linalg.cross(v1 - v0, v2 - v0, dim=-1)


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """``[M, 3]`` unit vertex normals: the sum of the unnormalised normals of the faces around each vertex,
    normalised; +z where that sum is degenerate (squared length ≤ 1e-20) or the vertex is in no face."""
    n = face_normals(vertices, faces).repeat_interleave(3, dim=0)
    summed = vertices.new_zeros(vertices.shape).index_add(0, faces.reshape(-1), n)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=summed.dtype, device=summed.device)
    summed = torch.where((summed * summed).sum(-1, keepdim=True) > 1e-20, summed, up)
    return F.normalize(summed, dim=-1)


def _edge_keys(faces: Tensor) -> Tuple[Tensor, int]:
    """``([3F] int64 key of each face edge, in face order: (0,1), (1,2), (2,0) of face 0, then face 1…, n)``
    where ``key = min·n + max`` and ``n`` is one more than the largest vertex index."""
    e = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    n = int(faces.max()) + 1 if faces.numel() else 1
    return e.min(1).values * n + e.max(1).values, n


def mesh_edges(faces: Tensor) -> Tensor:
    """``[E, 2]`` int64 the unique undirected edges of a triangle mesh, ``a < b``, sorted."""
    keys, n = _edge_keys(faces)
    keys = torch.unique(keys)
    return torch.stack([keys // n, keys % n], 1)


def edge_face_pairs(faces: Tensor) -> Tensor:
    """``[E2, 2]`` int64: for each edge with exactly two adjacent faces, those two faces (ascending). Boundary
    edges (one face) and non-manifold edges (three or more) are left out."""
    keys, _ = _edge_keys(faces)
    keys, order = torch.sort(keys, stable=True)
    face_of = order // 3
    _, counts = torch.unique_consecutive(keys, return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    start = start[counts == 2]
    return torch.stack([face_of[start], face_of[start + 1]], 1)


def normal_consistency(vertices: Tensor, faces: Tensor) -> Tensor:
    """Mean over the mesh's unique edges of ``1 − cos`` between the *vertex* normals at its two ends
    (threestudio's ``Mesh.normal_consistency``). 0 for an empty mesh."""
    if faces.shape[0] == 0:
        return vertices.new_zeros(())
    normals = vertex_normals(vertices, faces)
    e = mesh_edges(faces)
    return (1 - F.cosine_similarity(normals[e[:, 0]], normals[e[:, 1]], dim=-1)).mean()


def uniform_laplacian(vertices: Tensor, faces: Tensor) -> Tensor:
    """``[M, 3]`` the uniform (graph) Laplacian ``L v``: ``Σ_{j ∈ N(i)} (v_i − v_j)`` over each vertex's distinct
    mesh neighbours, i.e. ``deg(i)·(v_i − mean of its neighbours)``."""
    e = mesh_edges(faces)
    d = vertices[e[:, 0]] - vertices[e[:, 1]]
    return vertices.new_zeros(vertices.shape).index_add(0, e[:, 0], d).index_add(0, e[:, 1], -d)


def laplacian_smoothing(vertices: Tensor, faces: Tensor) -> Tensor:
    """threestudio's ``Mesh.laplacian``: the mean over all vertices of ``‖L v‖`` (the uniform Laplacian above:
    unnormalised by the degree, the norm not squared). 0 for an empty mesh."""
    if faces.shape[0] == 0:
        return vertices.new_zeros(())
    return uniform_laplacian(vertices, faces).norm(dim=-1).mean()
