"""What Gaussian runs turn into: the splats' density field, a textured mesh through the export, a DMTet grid for
stage 2, and Gaussians started from a volume or a mesh."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from csd_backend.config import SceneConfig
from csd_backend.convert.to_gaussians import from_mesh, from_volume
from csd_backend.convert.volume_to_dmtet import volume_to_dmtet
from csd_backend.export import ExportConfig, extract_textured_mesh
from csd_backend.gaussian_config import GaussianConfig
from csd_backend.render.cameras import orbit_cameras
from csd_backend.render.views import render_cameras_with_opacity
from csd_backend.scene.gaussians import GaussianScene
from test_stage2 import blob_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RED = (0.9, 0.1, 0.1)


def sphere_splats(n=3000, radius=0.3, seed=0) -> GaussianScene:
    """Opaque red splats on a sphere of ``radius``."""
    torch.manual_seed(seed)
    cfg = SceneConfig(kind="gaussians", radius=1.0, background="solid", n_levels=4, log2_hashmap_size=12,
                      base_resolution=8, max_resolution=64, mlp_width=16,
                      gaussians=GaussianConfig(num_points=n))
    scene = GaussianScene(cfg)
    points = torch.nn.functional.normalize(torch.randn(n, 3), dim=-1) * radius
    scene.set_gaussians(points, torch.tensor(RED).expand(n, 3), opacity=0.9)
    return scene.eval()


@pytest.mark.parametrize("bin_budget", [None, 2000], ids=["cells", "cells-grown-to-the-bin-budget"])
def test_the_density_field_sums_the_splats_exactly(bin_budget, monkeypatch):
    """The field against a brute-force sum over every splat; with one splat 30x the others' size, whose box would
    fill a grid of fine cells, and a bin budget small enough that the cells must grow to hold it."""
    import csd_backend.scene.gaussian_field as gaussian_field

    if bin_budget is not None:
        monkeypatch.setattr(gaussian_field, "BIN_BUDGET", bin_budget)
    scene = sphere_splats(400)
    with torch.no_grad():
        scene.log_scales[0] += math.log(30.0)
    field = scene.volume
    assert bin_budget is None or int(field.count.sum()) <= bin_budget
    pts = torch.rand(500, 3) * 0.8 - 0.4
    cov = scene.covariances()
    d = pts[:, None, :] - scene.means[None]  # [M, N, 3]
    exact = (scene.opacities() * torch.exp(-0.5 * torch.einsum("mni,nij,mnj->mn", d, torch.linalg.inv(cov), d)))
    # each splat is cut at 3 standard deviations per axis
    reach = 3 * torch.sqrt(torch.diagonal(cov, dim1=-2, dim2=-1))
    inside = (d.abs() <= reach[None]).all(-1)
    expected = torch.where(inside, exact, 0.0).sum(-1)
    got = field.density(pts)
    assert torch.allclose(got, expected, atol=1e-5) and float(got.max()) > 0.5
    assert torch.allclose(field.albedo(scene.means[:50]), torch.tensor(RED).expand(50, 3), atol=1e-5)
    assert scene.volume is field  # one index per state of the splats


def test_textured_mesh_of_splats_is_the_sphere(tmp_path):
    scene = sphere_splats()
    mesh = extract_textured_mesh(scene, ExportConfig(resolution=64, texture_size=128, face_budget=5000))
    r = np.linalg.norm(mesh.vertices @ np.diag([1, 1, 1]), axis=-1)
    assert mesh.num_faces > 200 and 0.27 < float(np.median(r)) < 0.36
    assert np.allclose(mesh.vertex_colors.mean(0), RED, atol=0.05)


def test_splats_refine_into_a_dmtet_grid_with_a_fitted_texture():
    scene = sphere_splats()
    out = volume_to_dmtet(scene, tet_resolution=32, threshold="auto", seed=0)
    verts, faces = out.mesh()
    r = verts.norm(dim=-1)
    assert faces.shape[0] > 100 and 0.25 < float(r.median()) < 0.38
    with torch.no_grad():
        colour = out.texture.albedo(verts).mean(0)
    assert torch.allclose(colour, torch.tensor(RED), atol=0.1), colour


def test_gaussians_from_a_volume_and_from_a_mesh_keep_shape_and_colour():
    volume = blob_scene()  # density crosses 10 on a sphere of radius about 0.25
    cfg = SceneConfig(kind="gaussians", background="solid", gaussians=GaussianConfig(num_points=800,
                                                                                      init_density_threshold=10.0))
    splats = from_volume(volume, cfg, seed=3)
    assert splats.kind == "gaussians" and splats.num_gaussians == 800
    assert float(splats.means.norm(dim=-1).max()) < 0.3 and splats.radius == volume.radius
    with torch.no_grad():
        colour = volume.albedo(splats.means[:20])
    assert torch.allclose(splats.colors(torch.zeros(1, 3))[0, :20], colour, atol=1e-4)
    again = from_volume(volume, cfg, seed=3)
    assert torch.equal(again.means, splats.means)  # the run's seed decides every draw
    dmtet = volume_to_dmtet(volume, tet_resolution=32, threshold=10.0)
    on_mesh = from_mesh(dmtet, cfg, seed=0)
    r = on_mesh.means.norm(dim=-1)
    assert on_mesh.num_gaussians == 800 and float((r - r.mean()).abs().max()) < 0.05
    cams = orbit_cameras(2, 15.0, 1.5, 45.0, 32, 32)
    _, op = render_cameras_with_opacity(on_mesh, cams)
    assert float(op.max()) > 0.5 and math.isfinite(float(op.sum()))


def test_generate_render_export_and_refine_a_gaussian_run(tmp_path, capsys):
    from csd_backend.cli import main
    from csd_backend.export.splats import load_splats
    from csd_backend.optimize import load_scene

    out = tmp_path / "splats"
    tiny = ["--set", "camera.height=16", "--set", "camera.width=16", "--set", "scene.gaussians.num_points=300"]
    args = ["generate", "--prompt", "a red ball", "--model", "analytic:16", "--preset", "gaussian-preview-cpu",
            "--steps", "4", "--out", str(out), "--views", "2", "--view-size", "16", "--quiet", "--mesh-resolution",
            "32", "--mesh-texture-size", "64", *tiny]
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "gaussians.ply").is_file() and (out / "mesh.glb").is_file()
    scene, config = load_scene(out)
    ply = load_splats(out / "gaussians.ply", scene.cfg)
    assert torch.equal(ply.means, scene.means) and config.scene.kind == "gaussians"
    assert main(["render", str(out), "--out", str(tmp_path / "views"), "--views", "2", "--size", "16",
                 "--quiet"]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "again.glb"), "--resolution", "32",
                 "--texture-size", "64", "--quiet"]) == 0
    # stage 2 from the Gaussian run, as from a volume run
    assert main(["refine", str(out), "--preset", "refine-cpu", "--steps", "2", "--out", str(tmp_path / "refined"),
                 "--views", "1", "--view-size", "16", "--no-mesh", "--quiet", "--set", "camera.height=16",
                 "--set", "camera.width=16", "--set", "scene.tet_resolution=16",
                 "--set", "scene.isosurface_threshold=auto"]) == 0, capsys.readouterr().err
    assert load_scene(tmp_path / "refined")[0].kind == "dmtet"
    # a run of another kind where splats are expected: refine's own error names the kinds
    capsys.readouterr()
    assert main(["refine", str(tmp_path / "refined"), "--preset", "refine-cpu", "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2
    assert "not a stage-1 volume or Gaussian splats" in capsys.readouterr().err


def test_init_scene_takes_a_splat_file_and_refuses_a_ply_that_is_not_one(tmp_path, capsys):
    """``generate --init-scene FILE.ply``: the splats of a 3DGS file train with the Gaussian preset's settings; a
    mesh .ply is refused naming what it lacks, and the output folder is left as it was (not created)."""
    import trimesh

    from csd_backend.cli import main
    from csd_backend.export.splats import write_splats
    from csd_backend.optimize import load_scene

    cfg = SceneConfig(kind="gaussians", background="solid")
    torch.manual_seed(0)
    splats = GaussianScene(dataclasses.replace(cfg, gaussians=dataclasses.replace(cfg.gaussians, num_points=64)))
    write_splats(splats, tmp_path / "in.ply")
    tiny = ["--set", "camera.height=16", "--set", "camera.width=16", "--quiet", "--views", "0", "--no-mesh"]
    base = ["generate", "--prompt", "a red ball", "--model", "analytic:16", "--preset", "gaussian-preview-cpu",
            "--steps", "1"]
    assert main([*base, "--init-scene", str(tmp_path / "in.ply"), "--out", str(tmp_path / "run"), *tiny]) == 0, \
        capsys.readouterr().err
    scene, config = load_scene(tmp_path / "run")
    assert scene.kind == "gaussians" and config.scene.gaussians.tile_size == 8  # the preset's splat settings
    assert config.scene.gaussians.num_points == 64 and scene.num_gaussians >= 64
    trimesh.creation.box().export(tmp_path / "mesh.ply")
    capsys.readouterr()
    assert main([*base, "--init-scene", str(tmp_path / "mesh.ply"), "--out", str(tmp_path / "nope"), *tiny]) == 2
    err = capsys.readouterr().err
    assert "is not a Gaussian-splat .ply: it lacks" in err and "f_dc_0" in err, err
    assert not (tmp_path / "nope").exists()
