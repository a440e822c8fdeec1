"""Stage 2 and texturing end to end on the CPU: a stage-1 volume converted to a DMTet grid keeps its surface, the
mesh renderer trains geometry, texture and background through the one optimisation loop, a user's mesh is
textured without moving a vertex, and the CLI's refine / texture commands write runs that export meshes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from csd_backend.config import SceneConfig
from csd_backend.errors import CSDError, ConfigError
from csd_backend.export import ExportConfig, MeshError, extract_textured_mesh
from csd_backend.optimize import Optimization, load_scene
from csd_backend.priors.analytic import AnalyticPrior
from csd_backend.render.cameras import orbit_cameras
from csd_backend.render.views import render_cameras, render_cameras_with_opacity
from csd_backend.convert.volume_to_dmtet import volume_to_dmtet
from csd_backend.convert.mesh_file import mesh_scene
from csd_backend.scene.volume import Scene
from engine_helpers import small_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCENE = dict(radius=1.0, n_levels=4, log2_hashmap_size=12, base_resolution=8, max_resolution=64, mlp_width=16,
             background="solid", background_color=[0.5, 0.5, 0.5], random_background_prob=0.0,
             density_blob_scale=20.0, density_blob_std=0.5)


def blob_scene(seed: int = 0, **over) -> Scene:
    """A stage-1 volume whose density crosses τ = 10 on a sphere of radius ≈ 0.25 (blob bias 20·(1 − r/0.5));
    ``over``: other scene settings."""
    torch.manual_seed(seed)
    scene = Scene(SceneConfig(**{**SCENE, **over})).eval()
    with torch.no_grad():
        for p in scene.volume.density_mlp.parameters():
            p.zero_()  # the density is the blob alone: an exact sphere
    return scene


def stage2_config(prompt="a red ball", steps=30, kind="dmtet", **sections):
    over = {"scene": {**SCENE, "kind": kind, "tet_resolution": 32},
            "camera": {"height": 32, "width": 32, "batch_size": 2, "distance_range": [1.2, 1.4],
                       "fovy_range": [40.0, 45.0]},
            "render": {"ambient_only_steps": 0, "albedo_prob": 1.0},
            "loss": {"normal_consistency": 0.0},
            "optim": {"lr": 3e-2}}
    for k, v in sections.items():
        over.setdefault(k, {}).update(v)
    return small_config(prompt, steps=steps, **over)


def foreground_colour(scene, cfg):
    cams = orbit_cameras(4, 15.0, 1.3, 45.0, 32, 32)
    img, opacity = render_cameras_with_opacity(scene, cams, render_cfg=cfg.render, background=torch.zeros(3))
    assert opacity.mean() > 0.05, "the object vanished"
    return (img.sum((0, 1, 2)) / opacity.sum().clamp_min(1e-6)), opacity


# ------------------------------------------------------------------------------------------------ conversion
def test_conversion_keeps_the_stage1_surface():
    scene = blob_scene()
    refined = volume_to_dmtet(scene, tet_resolution=64, threshold=10.0)
    assert refined.kind == "dmtet" and refined.cfg.bbox is not None
    lo, hi = np.array(refined.cfg.bbox)
    assert (lo > -0.45).all() and (hi < 0.45).all() and (lo < -0.25).all(), refined.cfg.bbox  # the tight box
    v, f = refined.mesh()
    r = v.norm(dim=-1)
    assert f.shape[0] > 200
    r = r.detach()
    assert abs(float(r.mean()) - 0.25) < 0.01 and float(r.std()) < 0.01, (float(r.mean()), float(r.std()))
    # inherited texture and background, parameter for parameter
    for k, t in refined.texture.state_dict().items():
        assert torch.equal(t, scene.volume.state_dict()[k]), k
    # Chamfer distance to the marching-cubes export of the volume
    mc = extract_textured_mesh(scene, ExportConfig(resolution=96, threshold=10.0, texture_size=0))
    a, b = v.detach(), torch.from_numpy(np.array(mc.vertices))
    d = torch.cdist(a, b)
    chamfer = float(d.min(1).values.mean() + d.min(0).values.mean())
    assert chamfer < 0.02, chamfer


def test_conversion_starts_a_fresh_background_unless_kept():
    """The official refine configs convert the geometry and its texture field only: the stage-2 background is a new
    one, initialised from the run's seed (whatever torch's global RNG holds); ``scene.keep_background`` copies the
    volume's trained one."""
    from csd_backend.scene.volume import make_background
    from csd_backend.scene_kinds import starting_scene

    volume = blob_scene(background="neural_env")
    target = SceneConfig(**{**SCENE, "kind": "dmtet", "tet_resolution": 32, "isosurface_threshold": 10.0})
    assert target.keep_background is False  # the default: as the official configs
    torch.manual_seed(123)
    fresh = starting_scene(volume, target, seed=5)
    torch.manual_seed(456)
    again = starting_scene(volume, target, seed=5)
    other_seed = starting_scene(volume, target, seed=6)
    kept = starting_scene(volume, dataclasses.replace(target, keep_background=True), seed=5)
    torch.manual_seed(5)
    want = make_background(fresh.cfg).state_dict()
    stage1 = volume.background.state_dict()
    assert stage1.keys() == want.keys() and len(want) > 0
    for k in stage1:
        assert torch.equal(fresh.background.state_dict()[k], want[k]), k
        assert torch.equal(again.background.state_dict()[k], want[k]), k
        assert not torch.equal(fresh.background.state_dict()[k], stage1[k]), k
        assert torch.equal(kept.background.state_dict()[k], stage1[k]), k
    assert any(not torch.equal(other_seed.background.state_dict()[k], want[k]) for k in want)
    for k, t in fresh.texture.state_dict().items():  # the texture field is inherited either way
        assert torch.equal(t, volume.volume.state_dict()[k]), k
    assert (fresh.cfg.keep_background, kept.cfg.keep_background) == (False, True)  # recorded in the run's config


def test_auto_level_is_taken_again_over_the_grid_in_the_box():
    """threestudio's "auto" conversion (magic3d-refine-sd from magic3d-coarse-sd): the coarse pass over the whole box
    finds the tight box at the mean density, the fine pass takes the mean again over its own grid vertices (those in
    the box) and that is the surface: sdf = clamp(τ − σ, −1, 1) with that τ."""
    from csd_backend.convert.volume_to_dmtet import object_box
    from csd_backend.export.pipeline import SceneField

    scene = blob_scene()
    field = SceneField(scene)
    box, coarse_tau = object_box(field.density, scene.radius, "auto")
    refined = volume_to_dmtet(scene, tet_resolution=32, threshold="auto")
    assert np.allclose(np.array(refined.cfg.bbox), box)
    sigma = field.density(refined.geometry.grid_world_vertices().numpy()).astype(np.float64)
    tau = float(sigma[sigma > 1e-5].mean())
    assert refined.cfg.isosurface_threshold == pytest.approx(tau, rel=1e-9)
    assert tau > 1.2 * coarse_tau  # the box holds less empty space: a higher level (1.71 against 1.34 here)
    want = torch.from_numpy(np.clip(tau - sigma, -1.0, 1.0)).float()
    torch.testing.assert_close(refined.geometry.sdf.detach(), want, rtol=0, atol=1e-6)


def test_conversion_without_a_surface_says_what_to_do():
    scene = Scene(SceneConfig(**{**SCENE, "density_blob_scale": 5.0})).eval()
    with torch.no_grad():
        for p in scene.volume.density_mlp.parameters():
            p.zero_()
    with pytest.raises(CSDError, match="scene.isosurface_threshold: .*no surface at the density level 10"):
        volume_to_dmtet(scene, tet_resolution=32, threshold=10.0)


# ---------------------------------------------------------------------------------------------- refinement
def test_refinement_turns_the_mesh_the_prompt_colour_and_moves_the_geometry():
    cfg = stage2_config("a red ball", steps=30)
    start = volume_to_dmtet(blob_scene(), tet_resolution=32, threshold=10.0)
    before, _ = foreground_colour(start, cfg)
    opt = Optimization(cfg, AnalyticPrior(resolution=16), scene=start)
    infos = []
    scene = opt.run(progress=infos.append)
    r, g, b = foreground_colour(scene, cfg)[0].tolist()
    assert r > 0.75 and g < 0.25 and b < 0.25, (before.tolist(), (r, g, b))
    assert not torch.equal(scene.geometry.sdf, start.geometry.sdf)  # the shape trains too
    assert all(i.num_samples > 0 for i in infos)  # covered pixels every step


def test_mesh_regularisers_enter_the_loss():
    cfg = stage2_config(steps=2, loss={"normal_consistency": 10.0, "laplacian": 1.0})
    opt = Optimization(cfg, AnalyticPrior(resolution=16), scene=volume_to_dmtet(blob_scene(), 32, 10.0))
    info = opt.train_step()
    assert info.losses["normal_consistency"] > 0 and info.losses["laplacian"] > 0
    assert "sparsity" not in info.losses


def test_refine_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = stage2_config(steps=6, optim={"checkpoint_every": 3})
    start = volume_to_dmtet(blob_scene(), tet_resolution=32, threshold=10.0)
    full = Optimization(cfg, AnalyticPrior(resolution=16), scene=start, out_dir=tmp_path / "full")
    full.run()
    part = Optimization(cfg.replace(optim={"steps": 3}), AnalyticPrior(resolution=16), scene=start,
                        out_dir=tmp_path / "part")
    part.run()
    resumed = Optimization.resume(tmp_path / "part", AnalyticPrior(resolution=16), steps=6)
    resumed.run()
    a, b = full.scene.state_dict(), resumed.scene.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_refined_scene_exports_its_own_mesh():
    scene = volume_to_dmtet(blob_scene(), tet_resolution=32, threshold=10.0)
    mesh = extract_textured_mesh(scene, ExportConfig(texture_size=64))
    v, f = scene.mesh()
    assert mesh.num_faces == f.shape[0]  # the DMTet mesh itself, not a marching-cubes remesh
    assert mesh.info["watertight"] and mesh.has_texture


# ----------------------------------------------------------------------------------------------- texturing
def icosphere():
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=2, radius=3.0)
    return (np.asarray(m.vertices, np.float32) + np.array([10.0, 0.0, 0.0], np.float32),
            np.asarray(m.faces, np.int64))


def test_texturing_paints_without_moving_a_vertex():
    v, f = icosphere()
    cfg = stage2_config("a green ball", steps=30, kind="mesh")
    start = mesh_scene(v, f, cfg.scene)
    assert float(start.geometry.vertices.norm(dim=-1).max()) == pytest.approx(0.5, abs=1e-5)
    opt = Optimization(cfg, AnalyticPrior(resolution=16), scene=start)
    params = {n for n, _ in opt.scene.named_parameters()}
    assert not any(n.startswith("geometry") for n in params)
    scene = opt.run()
    assert torch.equal(scene.geometry.vertices, start.geometry.vertices)
    r, g, b = foreground_colour(scene, cfg)[0].tolist()
    assert g > 0.75 and r < 0.25 and b < 0.25, (r, g, b)
    mesh = extract_textured_mesh(scene, ExportConfig(texture_size=64))
    assert mesh.num_faces == len(f)
    assert mesh.y_up
    # the export is the user's mesh in its own units and frame (written Y up, as it came)
    np.testing.assert_allclose(np.sort(mesh.output_points(mesh.vertices), 0), np.sort(v, 0), atol=1e-5)


def test_bad_meshes_are_refused_clearly(tmp_path):
    cfg = stage2_config(kind="mesh").scene
    with pytest.raises(MeshError, match="no faces"):
        mesh_scene(np.zeros((4, 3)), np.zeros((0, 3)), cfg)
    with pytest.raises(MeshError, match="NaN"):
        mesh_scene(np.full((3, 3), np.nan), np.array([[0, 1, 2]]), cfg)
    with pytest.raises(MeshError, match="missing vertices"):
        mesh_scene(np.zeros((3, 3)), np.array([[0, 1, 5]]), cfg)
    from csd_backend.convert.mesh_file import read_mesh_file

    with pytest.raises(MeshError, match="not found"):
        read_mesh_file(tmp_path / "nope.glb")
    (tmp_path / "a.xyz").write_text("1 2 3\n")
    with pytest.raises(MeshError, match="unsupported mesh format"):
        read_mesh_file(tmp_path / "a.xyz")


def test_uninstalled_rasterizer_fails_before_training():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    cfg = stage2_config(render={"rasterizer": "nvdiffrast"})
    with pytest.raises(ConfigError, match="render.rasterizer"):
        Optimization(cfg, AnalyticPrior(resolution=16), scene=volume_to_dmtet(blob_scene(), 32, 10.0))


def test_tet_resolution_is_validated():
    cfg = stage2_config()
    with pytest.raises(ConfigError, match="scene.tet_resolution"):
        cfg.replace(scene={"tet_resolution": 33}).validate(require_model=False)
    with pytest.raises(ConfigError, match="scene.bbox"):
        cfg.replace(scene={"bbox": [[0, 0, 0], [0, 1, 1]]}).validate(require_model=False)


# ---------------------------------------------------------------------------------------------- command line
TINY_STAGE2 = ["--set", "camera.height=24", "--set", "camera.width=24", "--set", "scene.tet_resolution=32",
               "--views", "1", "--view-size", "24", "--quiet", "--mesh-texture-size", "64"]


def _stage1_run(tmp_path, capsys):
    from csd_backend.cli import main
    from csd_backend.io import save_checkpoint

    out = tmp_path / "stage1"
    args = ["generate", "--prompt", "a red ball", "--model", "analytic:16", "--preset", "preview-cpu", "--steps", "1",
            "--out", str(out), "--quiet", "--no-mesh", "--views", "1", "--view-size", "16",
            "--set", "camera.height=16", "--set", "camera.width=16", "--set", "render.num_samples_per_ray=16"]
    for k, v in SCENE.items():
        args += ["--set", f"scene.{k}={v}".replace("'", '"')]
    assert main(args) == 0, capsys.readouterr().err
    state = __import__("csd_backend.io", fromlist=["load_checkpoint"]).load_checkpoint(out)
    state["scene"] = {k: v.clone() for k, v in blob_scene().state_dict().items()}  # a known surface
    (out / "checkpoints" / "last.ckpt").unlink()
    save_checkpoint(out / "checkpoints" / "last.ckpt", state)
    return out


def test_cli_refine_writes_a_refined_run_with_its_mesh(tmp_path, capsys):
    from csd_backend.cli import main

    stage1 = _stage1_run(tmp_path, capsys)
    out = tmp_path / "refined"
    code = main(["refine", str(stage1), "--preset", "refine-cpu", "--steps", "2", "--out", str(out), *TINY_STAGE2])
    assert code == 0, capsys.readouterr().err
    scene, config = load_scene(out)
    assert scene.kind == "dmtet" and config.guidance.prompt == "a red ball" and config.prior.model == "analytic:16"
    assert (out / "mesh.glb").is_file() and (out / "renders" / "view_00.png").is_file()
    # a refine run resumes like any other
    assert main(["generate", "--resume", str(out), "--steps", "3", "--quiet", "--no-mesh", "--views", "1",
                 "--view-size", "16"]) == 0, capsys.readouterr().err
    # refining a refined run is refused with the way to continue it
    capsys.readouterr()
    assert main(["refine", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "generate --resume" in capsys.readouterr().err


def test_cli_texture_keeps_the_users_mesh(tmp_path, capsys):
    import trimesh

    from csd_backend.cli import main

    v, f = icosphere()
    src = tmp_path / "ball.obj"
    trimesh.Trimesh(v, f, process=False).export(src)
    out = tmp_path / "textured"
    code = main(["texture", str(src), "--prompt", "a green ball", "--model", "analytic:16", "--preset", "texture-cpu",
                 "--steps", "2", "--out", str(out), *TINY_STAGE2[:4], *TINY_STAGE2[6:]])
    assert code == 0, capsys.readouterr().err
    mesh = trimesh.load(out / "mesh.glb", force="mesh", process=False)
    assert len(mesh.faces) == len(f)
    d = torch.cdist(torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float64), torch.as_tensor(v).double())
    assert float(d.min(1).values.max()) < 1e-4 and float(d.min(0).values.max()) < 1e-4  # UV seams split vertices
    capsys.readouterr()
    empty = tmp_path / "points.ply"
    trimesh.PointCloud(v).export(empty)
    assert main(["texture", str(empty), "--prompt", "x", "--model", "analytic:16", "--out",
                 str(tmp_path / "t2")]) == 2
    err = capsys.readouterr().err
    assert "no faces" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- presets
#: spec §3.2 (csd-sd-refine.yaml), yaml path → (engine field, value)
CSD_SD_REFINE = {
    "data.batch_size": ("camera.batch_size", 1), "data.width": ("camera.width", 512),
    "data.height": ("camera.height", 512), "data.camera_distance_range": ("camera.distance_range", [1.5, 2.0]),
    "data.fovy_range": ("camera.fovy_range", [40.0, 70.0]), "data.elevation_range": ("camera.elevation_range",
                                                                                        [-10.0, 45.0]),
    "data.azimuth_range": ("camera.azimuth_range", [-180.0, 180.0]),
    "no front/back phase": ("camera.front_back_only_steps", 0), "data.eval_camera_distance": ("camera.eval_distance",
                                                                                              1.5),
    "data.eval_fovy_deg": ("camera.eval_fovy", 70.0),
    "isosurface_threshold": ("scene.isosurface_threshold", 10.0), "isosurface_resolution": ("scene.tet_resolution",
                                                                                            256),
    "geometry_type tetrahedra-sdf-grid": ("scene.kind", "dmtet"), "fix_geometry": ("scene.fix_geometry", False),
    "geometry.radius (character)": ("scene.radius", 1.0),
    "material.ambient_only_steps": ("render.ambient_only_steps", 0),
    "50% albedo renders": ("render.albedo_prob", 0.5), "the other 50% normal maps": ("render.textureless_prob", 1.0),
    "textureless = normal map": ("render.textureless_normal", True),
    "background random colour prob": ("scene.random_background_prob", 0.5),
    "background not converted (a fresh one)": ("scene.keep_background", False),
    "prompt thresholds 45/45/60": ("guidance.front_threshold", 45.0),
    "back threshold": ("guidance.back_threshold", 45.0), "overhead": ("guidance.overhead_threshold", 60.0),
    "c = ω1": ("guidance.guidance_weight", 1.0), "ω2 1 → 0.5 over 10k": ("guidance.negative_weight",
                                                                       [0, 1.0, 0.5, 10000]),
    "w = 1 − ᾱ": ("guidance.weighting", "sds"), "no normalisation": ("guidance.grad_normalize", False),
    "t_min": ("guidance.min_step_percent", 0.02), "t_max": ("guidance.max_step_percent", 0.5),
    "λ_sds": ("loss.guidance", 1.0), "λ_normal_consistency": ("loss.normal_consistency", 1000.0),
    "no Laplacian": ("loss.laplacian", 0.0), "lr": ("optim.lr", 1e-3), "betas": ("optim.betas", [0.9, 0.999]),
    "eps": ("optim.eps", 1e-15), "max_steps": ("optim.steps", 10000), "SD 2.1-base at 512": ("prior.max_resolution",
                                                                                            512),
}
#: threestudio @28d9d80 configs/magic3d-refine-sd.yaml (and the defaults of the classes it names:
#: RandomCameraDataModuleConfig, TetrahedraSDFGrid, DiffuseWithPointLightMaterial, NeuralEnvironmentMapBackground,
#: StableDiffusionPromptProcessor, StableDiffusionGuidance; the conversion level is magic3d-coarse-sd.yaml's)
MAGIC3D_REFINE_SD = {
    "data.batch_size (default)": ("camera.batch_size", 1),
    "data.width": ("camera.width", 512), "data.height": ("camera.height", 512),
    "data.camera_distance_range": ("camera.distance_range", [1.5, 2.0]),
    "data.elevation_range": ("camera.elevation_range", [-10.0, 45.0]), "data.fovy_range": ("camera.fovy_range",
                                                                                         [30.0, 45.0]),
    "data.azimuth_range (default)": ("camera.azimuth_range", [-180.0, 180.0]),
    "data.eval_camera_distance": ("camera.eval_distance", 2.0), "data.eval_fovy_deg": ("camera.eval_fovy", 70.0),
    "data.eval_elevation_deg (default)": ("camera.eval_elevation", 15.0),
    "data.camera_perturb (default)": ("camera.camera_perturb", 0.1),
    "data.center_perturb (default)": ("camera.center_perturb", 0.2),
    "data.up_perturb (default)": ("camera.up_perturb", 0.02),
    "data.batch_uniform_azimuth (default)": ("camera.stratified_azimuth", True),
    "data elevation sampling (collate)": ("camera.elevation_sampling", "threestudio"),
    "data.progressive_until (default 0)": ("camera.first_step_fixed_view", True),
    "no front/back phase": ("camera.front_back_only_steps", 0),
    "data.light_sample_strategy": ("camera.light_sampling", "magic3d"),
    "data.light_distance_range (default)": ("camera.light_distance_range", [0.8, 1.5]),
    "geometry_type tetrahedra-sdf-grid": ("scene.kind", "dmtet"),
    "geometry.radius": ("scene.radius", 2.0), "geometry.isosurface_resolution": ("scene.tet_resolution", 128),
    "geometry.fix_geometry": ("scene.fix_geometry", False),
    "coarse geometry isosurface_threshold (no geometry_convert_override)": ("scene.isosurface_threshold", "auto"),
    "background not converted (a fresh one)": ("scene.keep_background", False),
    "pos_encoding n_levels": ("scene.n_levels", 16), "n_features_per_level": ("scene.n_features_per_level", 2),
    "log2_hashmap_size": ("scene.log2_hashmap_size", 19), "base_resolution": ("scene.base_resolution", 16),
    "pos_encoding per_level_scale": ("scene.per_level_scale", 1.447269237440378),
    "no progressive band": ("scene.active_levels", None),
    "mlp_network_config (default VanillaMLP 64×1)": ("scene.mlp_width", 64),
    "mlp hidden layers": ("scene.mlp_hidden_layers", 1),
    "background neural env map": ("scene.background", "neural_env"),
    "background.random_aug (default false)": ("scene.random_background_prob", 0.0),
    "material.ambient_only_steps": ("render.ambient_only_steps", 0),
    "material.soft_shading": ("render.soft_shading", True),
    "material.diffuse_prob (default 0.75)": ("render.albedo_prob", 0.25),
    "material.textureless_prob (default)": ("render.textureless_prob", 0.5),
    "material textureless = grey Lambertian": ("render.textureless_normal", False),
    "material.ambient_light_color (default; eval)": ("render.ambient_light", 0.1),
    "material.diffuse_light_color (default; eval)": ("render.diffuse_light", 0.9),
    "prompt_processor thresholds (default 45/45/60)": ("guidance.front_threshold", 45.0),
    "prompt_processor back threshold": ("guidance.back_threshold", 45.0),
    "prompt_processor overhead threshold": ("guidance.overhead_threshold", 60.0),
    "prompt_processor.negative_prompt (default '')": ("guidance.negative_prompt", ""),
    "prompt_processor.use_perp_neg (default)": ("guidance.perp_neg", False),
    "view_dependent_prompting (default)": ("guidance.view_dependent", True),
    "guidance.guidance_scale": ("guidance.cfg_scale", 100.0), "guidance mode": ("guidance.mode", "sds"),
    "guidance.weighting_strategy": ("guidance.weighting", "sds"),
    "guidance.min_step_percent": ("guidance.min_step_percent", 0.02),
    "guidance.max_step_percent": ("guidance.max_step_percent", 0.5),
    "guidance (no normalisation)": ("guidance.grad_normalize", False),
    "guidance.grad_clip (default none)": ("guidance.grad_clip", None),
    "loss.lambda_sds": ("loss.guidance", 1.0),
    "loss.lambda_normal_consistency": ("loss.normal_consistency", 10000.0),
    "no Laplacian (magic3d-system)": ("loss.laplacian", 0.0),
    "optimizer.args.lr": ("optim.lr", 0.01), "optimizer.args.betas": ("optim.betas", [0.9, 0.99]),
    "optimizer.args.eps": ("optim.eps", 1e-15), "no optimizer.params": ("optim.group_lr", {}),
    "trainer.max_steps": ("optim.steps", 5000), "seed": ("optim.seed", 0),
    "guidance: SD 2.1-base, renders resized to 512": ("prior.max_resolution", 512),
}


@pytest.mark.parametrize("preset,table", [("csd-refine", CSD_SD_REFINE), ("sds-refine", MAGIC3D_REFINE_SD)])
def test_stage2_presets_reproduce_their_configs(preset, table):
    from csd_backend.presets import get_preset

    d = get_preset(preset).to_dict()
    wrong = []
    for key, (path, want) in table.items():
        section, name = path.split(".")
        got = d[section][name]
        same = got == pytest.approx(want) if isinstance(want, (int, float)) and not isinstance(want, bool) else \
            got == want
        if not same:
            wrong.append(f"{key}: config {want!r}, preset {path} = {got!r}")
    assert not wrong, "\n".join(wrong)
    assert get_preset("refine-cpu").scene.keep_background  # says otherwise: keeps the trained background
    object_cfg = get_preset("csd-refine-object").to_dict()
    assert object_cfg["scene"]["radius"] == 2.0 and {k: v for k, v in object_cfg["scene"].items() if k != "radius"} \
        == {k: v for k, v in get_preset("csd-refine").to_dict()["scene"].items() if k != "radius"}


def test_stage2_coefficients_at_both_ends():
    """Stage 2 at s = 0: ε_y − ε_neg; at 10k: ε_y − 0.5ε_neg − 0.5ε_∅ (spec §1.2)."""
    from csd_backend.guidance import coefficients
    from csd_backend.presets import get_preset

    g = get_preset("csd-refine").guidance
    c0, c1 = coefficients(g, 0), coefficients(g, 10000)
    assert (c0.c, c0.u, c0.n) == pytest.approx((1.0, -1.0, 0.0))
    assert (c1.c, c1.u, c1.n) == pytest.approx((1.0, -0.5, -0.5))


# ------------------------------------------------------------------------------- editing and more bad input
def test_edit_mode_works_on_a_refined_mesh():
    cfg = stage2_config("a blue ball", steps=25, guidance={"mode": "edit", "source_prompt": "a red ball",
                                                         "negative_weight": 1.0})
    start = volume_to_dmtet(blob_scene(), tet_resolution=32, threshold=10.0)
    scene = Optimization(cfg, AnalyticPrior(resolution=16), scene=start).run()
    r, g, b = foreground_colour(scene, cfg)[0].tolist()
    assert b > 0.7 and r < 0.3, (r, g, b)


def test_huge_meshes_are_decimated_and_said_so(monkeypatch, caplog):
    import csd_backend.convert.mesh_file as fm

    v, f = icosphere()
    monkeypatch.setattr(fm, "MAX_FACES", 100)
    monkeypatch.setattr(fm, "DECIMATE_TO", 60)
    with caplog.at_level("WARNING"):
        scene = mesh_scene(v, f, stage2_config(kind="mesh").scene, name="big.obj")
    assert scene.geometry.faces.shape[0] <= 60 and scene.info["decimated_to"] <= 60
    assert "big.obj has 320 faces; decimating it to 60 for texturing (the export writes that decimated mesh, " \
           "with all its faces)" in caplog.text


def test_a_decimated_users_mesh_is_exported_with_the_faces_the_warning_names(monkeypatch):
    # the export's face budget (100000 by default) never decimates a fixed mesh again: the warning said "200000"
    # and the exported mesh had 100000 faces
    import csd_backend.convert.mesh_file as fm

    v, f = icosphere()
    monkeypatch.setattr(fm, "MAX_FACES", 100)
    monkeypatch.setattr(fm, "DECIMATE_TO", 60)
    scene = mesh_scene(v, f, stage2_config(kind="mesh").scene, name="big.obj")
    mesh = extract_textured_mesh(scene, ExportConfig(texture_size=0, face_budget=30))
    assert mesh.num_faces == scene.info["decimated_to"] == scene.geometry.faces.shape[0]
    monkeypatch.setattr(fm, "MAX_FACES", 500)  # under MAX_FACES: every face of the file, whatever the budget
    small = mesh_scene(v, f, stage2_config(kind="mesh").scene)
    assert extract_textured_mesh(small, ExportConfig(texture_size=0, face_budget=30)).num_faces == len(f) == 320


def test_a_non_manifold_open_mesh_textures_fine():
    # three triangles on one edge (non-manifold) and open borders: texturing needs neither a closed nor a manifold
    v = np.array([[0, 0, 0], [0, 1, 0], [1, 0.5, 0], [-1, 0.5, 0], [0, 0.5, 1]], np.float32)
    f = np.array([[0, 1, 2], [1, 0, 3], [0, 1, 4]])
    cfg = stage2_config("a red ball", steps=2, kind="mesh")
    scene = Optimization(cfg, AnalyticPrior(resolution=16), scene=mesh_scene(v, f, cfg.scene)).run()
    mesh = extract_textured_mesh(scene, ExportConfig(texture_size=32))
    assert mesh.num_faces == 3


def test_silhouette_level_matches_the_volumes_silhouettes():
    """A soft volume (a blob whose density crosses 10 nowhere near its visible edge): the "silhouette" level gives
    a mesh whose silhouettes match the volume's opacity > 0.5 far better than the mean-density ("auto") level."""
    from csd_backend.export.pipeline import SceneField
    from csd_backend.convert.volume_to_dmtet import silhouette_level

    scene = Scene(SceneConfig(**{**SCENE, "density_blob_scale": 6.0, "density_blob_std": 0.6})).eval()
    with torch.no_grad():
        for p in scene.volume.density_mlp.parameters():
            p.zero_()
    tau, iou = silhouette_level(scene, SceneField(scene).density)
    assert iou > 0.9, (tau, iou)
    cams = orbit_cameras(4, 15.0, 2.0, 60.0, 48, 48)
    target = render_cameras_with_opacity(scene, cams)[1] > 0.5

    def iou_of(level):
        mesh = volume_to_dmtet(scene, 64, level)
        mask = render_cameras_with_opacity(mesh, cams)[1] > 0.5
        return float((mask & target).sum() / (mask | target).sum())

    assert iou_of("silhouette") > 0.9 and iou_of("silhouette") > iou_of("auto") + 0.1
