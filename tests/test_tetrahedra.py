"""Tetrahedral grids and marching tetrahedra (``csd_backend/scene/tetrahedra.py``): the grid is a conforming,
positively oriented tiling of the unit cube; the extracted mesh of a sphere is watertight, outward-wound and
accurate; the mesh is differentiable w.r.t. the SDF and the vertex positions; the mesh regularisers."""
from __future__ import annotations

import math

import pytest
import torch

from csd_backend.errors import ConfigError
from csd_backend.scene.tetrahedra import (deformed_vertices, edge_face_pairs, face_normals, laplacian_smoothing,
                                          marching_tetrahedra, mesh_edges, normal_consistency, tet_grid,
                                          uniform_laplacian, vertex_normals)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

R, C = 0.3, 0.5  # the test sphere: radius 0.3 centred in the unit cube


def sphere_sdf(v: torch.Tensor, radius: float = R) -> torch.Tensor:
    return (v - C).norm(dim=-1) - radius


def tet_volumes(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    p = v.double()[t]
    return torch.linalg.det(p[:, 1:] - p[:, :1]) / 6


def area_volume(v: torch.Tensor, f: torch.Tensor):
    n = face_normals(v, f)
    return n.norm(dim=-1).sum() / 2, (v[f[:, 0]] * n).sum() / 6  # divergence theorem


def assert_closed_manifold(v: torch.Tensor, f: torch.Tensor, euler: int = 2):
    e = mesh_edges(f)
    assert len(edge_face_pairs(f)) == len(e), "an edge is not in exactly two faces"
    directed = f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    assert len(torch.unique(directed, dim=0)) == len(directed), "inconsistent winding (a directed edge twice)"
    assert len(v) - len(e) + len(f) == euler
    assert torch.equal(torch.unique(f), torch.arange(len(v))), "unreferenced or missing vertices"


# ----------------------------------------------------------------------------------------------------- grid
@pytest.mark.parametrize("res", [32, 64])
def test_grid_counts_and_frame(res):
    v, t = tet_grid(res)
    n = res // 2
    assert v.shape == ((n + 1) ** 3, 3) and v.dtype == torch.float32
    assert t.shape == (6 * n ** 3, 4) and t.dtype == torch.int64
    assert v.min() == 0 and v.max() == 1
    assert t.min() == 0 and t.max() == len(v) - 1
    edge = (v[t[:, 0]] - v[t[:, 1]]).norm(dim=-1)  # the (0,0,0)→first-step edge: one cell side
    assert torch.allclose(edge, torch.full_like(edge, 2 / res))
    assert tet_grid(res)[1] is t  # cached


@pytest.mark.parametrize("res", [8, 16])
def test_grid_is_a_conforming_positive_tiling(res):
    v, t = tet_grid(res)
    vol = tet_volumes(v, t)
    assert (vol > 0).all()
    assert torch.allclose(vol.sum(), torch.tensor(1.0, dtype=torch.float64))
    faces = torch.sort(t[:, [1, 2, 3, 0, 2, 3, 0, 1, 3, 0, 1, 2]].reshape(-1, 3), dim=1).values
    uniq, counts = torch.unique(faces, dim=0, return_counts=True)
    assert counts.max() == 2
    boundary = v[uniq[counts == 1]]  # [Fb, 3 corners, 3]
    on_side = ((boundary == 0).all(1) | (boundary == 1).all(1)).any(-1)
    assert on_side.all(), "a face of only one tet inside the cube"
    n = res // 2
    assert (counts == 1).sum() == 6 * 2 * n * n  # the cube's 6 sides, 2 triangles a cell square


@pytest.mark.parametrize("bad", [7, 33, 6, 514, 0, -32, True, 32.0, "64", None])
def test_grid_resolution_validated(bad):
    with pytest.raises(ConfigError, match="scene.tet_resolution"):
        tet_grid(bad)


# ------------------------------------------------------------------------------------- marching tetrahedra
@pytest.mark.parametrize("res", [64, 128])
def test_sphere_mesh_is_watertight_accurate_and_outward(res):
    v, t = tet_grid(res)
    mv, f = marching_tetrahedra(v, sphere_sdf(v), t)
    assert mv.dtype == torch.float32 and f.dtype == torch.int64
    assert_closed_manifold(mv, f)
    area, volume = area_volume(mv.double(), f)
    assert abs(area / (4 * math.pi * R ** 2) - 1) < 0.02
    assert abs(volume / (4 / 3 * math.pi * R ** 3) - 1) < 0.02  # positive: faces wound CCW seen from outside
    radial = (mv - C) / (mv - C).norm(dim=-1, keepdim=True)
    assert ((vertex_normals(mv, f) * radial).sum(-1) > 0.9).all()
    cell = 2 / res
    assert ((mv - C).norm(dim=-1) - R).abs().max() < 0.05 * cell


def test_exact_zeros_count_as_outside_and_stay_watertight():
    v, t = tet_grid(16)  # vertices at multiples of 1/8: the box |x − 0.5|∞ = 0.25 passes through grid vertices
    sdf = (v - C).abs().max(-1).values - 0.25
    assert (sdf == 0).sum() > 0
    mv, f = marching_tetrahedra(v, sdf, t)
    assert_closed_manifold(mv, f)
    inside = v[sdf < 0]
    assert (mv - C).abs().max() <= 0.25 + 1e-6 and len(inside) == 27  # the surface hugs the 3³ negative vertices
    _, volume = area_volume(mv.double(), f)
    assert volume > 0


def test_no_surface_gives_an_empty_mesh():
    v, t = tet_grid(8)
    for sdf in (torch.ones(len(v)), -torch.ones(len(v)), torch.zeros(len(v))):
        mv, f = marching_tetrahedra(v, sdf.requires_grad_(), t)
        assert mv.shape == (0, 3) and f.shape == (0, 3) and f.dtype == torch.int64
        assert normal_consistency(mv, f) == 0 and laplacian_smoothing(mv, f) == 0
        assert mesh_edges(f).shape == (0, 2) and edge_face_pairs(f).shape == (0, 2)


def test_bad_shapes_rejected():
    v, t = tet_grid(8)
    with pytest.raises(ValueError, match="sdf"):
        marching_tetrahedra(v, torch.zeros(len(v) + 1), t)
    with pytest.raises(ValueError, match="tets"):
        marching_tetrahedra(v, torch.zeros(len(v)), t[:, :3])
    mv, f = marching_tetrahedra(v, sphere_sdf(v)[:, None], t)  # [V, 1] as threestudio passes it
    assert len(f) > 0


# ---------------------------------------------------------------------------------------------- gradients
def small_problem(seed=0):
    v, t = tet_grid(8)
    g = torch.Generator().manual_seed(seed)
    sdf = sphere_sdf(v.double(), 0.32) + 0.02 * torch.rand(len(v), generator=g, dtype=torch.float64)
    assert sdf.abs().min() > 1e-3  # the sign pattern survives the finite differences
    delta = 0.3 * torch.randn(len(v), 3, generator=g, dtype=torch.float64)
    return v.double(), t, sdf, delta


def test_volume_gradient_wrt_sdf_matches_finite_differences():
    v, t, sdf, _ = small_problem()
    volume = lambda s: area_volume(*marching_tetrahedra(v, s, t))[1]  # noqa: E731
    assert torch.autograd.gradcheck(volume, (sdf.requires_grad_(),), eps=1e-6, atol=1e-8)  # central differences
    assert (torch.autograd.grad(volume(sdf), sdf)[0] <= 0).all()  # raising the SDF shrinks the inside


def test_area_gradient_wrt_deformation_matches_finite_differences():
    v, t, sdf, delta = small_problem(1)

    def area(d):
        return area_volume(*marching_tetrahedra(deformed_vertices(v, d, 8), sdf, t))[0]

    assert torch.autograd.gradcheck(area, (delta.requires_grad_(),), eps=1e-6, atol=1e-8)


def test_deformation_and_sdf_get_gradients_through_the_losses():
    v, t = tet_grid(16)
    sdf = sphere_sdf(v).requires_grad_()
    delta = torch.zeros_like(v, requires_grad=True)
    mv, f = marching_tetrahedra(deformed_vertices(v, delta, 16), sdf, t)
    loss = area_volume(mv, f)[0] + normal_consistency(mv, f) + laplacian_smoothing(mv, f)
    loss.backward()
    assert delta.grad.abs().sum() > 0 and sdf.grad.abs().sum() > 0
    assert torch.isfinite(delta.grad).all() and torch.isfinite(sdf.grad).all()
    moved = deformed_vertices(v, torch.full_like(v, 100.0), 16) - v
    assert torch.allclose(moved, torch.full_like(v, 1 / 16))  # at most 1/res: half a cell


# ------------------------------------------------------------------------------------------ regularisers
def plane_mesh(noise=0.0, res=32):
    v, t = tet_grid(res)
    g = torch.Generator().manual_seed(0)
    sdf = v[:, 2] - 0.513 + noise * (torch.rand(len(v), generator=g) - 0.5)
    return marching_tetrahedra(v, sdf, t)


def test_flat_plane_has_zero_normal_consistency_and_no_normal_laplacian():
    mv, f = plane_mesh()
    assert (face_normals(mv, f)[:, 2] > 0).all()  # normals towards positive SDF (+z)
    assert torch.allclose(vertex_normals(mv, f), torch.tensor([0.0, 0.0, 1.0]).expand_as(mv))
    assert normal_consistency(mv, f) < 1e-6
    interior = ((mv[:, :2] > 0.1) & (mv[:, :2] < 0.9)).all(-1)
    lap = uniform_laplacian(mv, f)[interior]
    assert lap[:, 2].abs().max() < 1e-6  # only the in-plane part of an irregular planar mesh's uniform Laplacian
    noisy_v, noisy_f = plane_mesh(noise=0.05)
    assert normal_consistency(noisy_v, noisy_f) > 0.01
    noisy_interior = ((noisy_v[:, :2] > 0.1) & (noisy_v[:, :2] < 0.9)).all(-1)
    assert uniform_laplacian(noisy_v, noisy_f)[noisy_interior][:, 2].abs().mean() > 1e-3


def test_noisy_sphere_is_penalised_more_than_a_smooth_one():
    v, t = tet_grid(32)
    smooth = marching_tetrahedra(v, sphere_sdf(v), t)
    g = torch.Generator().manual_seed(0)
    noisy = marching_tetrahedra(v, sphere_sdf(v) + 0.05 * (torch.rand(len(v), generator=g) - 0.5), t)
    assert normal_consistency(*noisy) > 4 * normal_consistency(*smooth)  # measured ≈ 8×
    # the uniform Laplacian of even the smooth mesh is dominated by its irregular in-plane spacing (measured ≈ 1.3×)
    assert laplacian_smoothing(*noisy) > 1.15 * laplacian_smoothing(*smooth)


def test_regularisers_match_their_definitions():
    # a unit square pyramid's side faces: apex 4 above the square 0-1-2-3, normals outward
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0.5, 0.5, 1]])
    f = torch.tensor([[0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])
    e = mesh_edges(f)
    assert e.tolist() == [[0, 1], [0, 3], [0, 4], [1, 2], [1, 4], [2, 3], [2, 4], [3, 4]]
    pairs = edge_face_pairs(f)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 1), (0, 3), (1, 2), (2, 3)]  # the 4 slanted edges
    n = vertex_normals(v, f)
    assert torch.allclose(n[4], torch.tensor([0.0, 0, 1]))
    expected_nc = (1 - torch.nn.functional.cosine_similarity(n[e[:, 0]], n[e[:, 1]], dim=-1)).mean()
    assert torch.allclose(normal_consistency(v, f), expected_nc)
    lap = uniform_laplacian(v, f)
    assert torch.allclose(lap[4], torch.zeros(3) + 4 * v[4] - v[:4].sum(0))  # apex: 4 neighbours
    assert torch.allclose(lap[0], 3 * v[0] - v[1] - v[3] - v[4])
    assert torch.allclose(laplacian_smoothing(v, f), lap.norm(dim=-1).mean())
    degenerate = vertex_normals(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]))
    assert torch.equal(degenerate, torch.tensor([[0.0, 0, 1]]).expand(3, 3))
