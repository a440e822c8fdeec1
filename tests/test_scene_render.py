"""Scene and renderer parts: hash-grid layout and interpolation, normals, backgrounds, occupancy skipping,
regularisers and view-dependent embeddings."""
from __future__ import annotations

import math

import pytest
import torch

from csd_backend.config import RenderConfig, SceneConfig
from csd_backend.priors.analytic import AnalyticPrior
from csd_backend.prompts import PromptEmbeddings
from csd_backend.regularizers import opaque_loss, orientation_loss, sparsity_loss
from csd_backend.render.cameras import get_rays, make_cameras, orbit_cameras, sample_cameras
from csd_backend.render.volume_renderer import RenderOutput, VolumeRenderer
from csd_backend.config import CameraConfig
from csd_backend.scene.encoding import HashGridEncoding
from csd_backend.scene.volume import ImplicitVolume, NeuralEnvironmentMap, Scene, spherical_harmonics_deg3


def test_hash_grid_layout_matches_tinycudann():
    # character config: L=12, F=2, T=2^19, N_min=16, b=1.37035 → N_max≈512
    enc = HashGridEncoding(12, 2, 19, 16, 1.3703509847201883)
    assert enc.n_output_dims == 24
    assert enc.resolutions[0] == 16 and enc.resolutions[-1] == 513  # ceil(16·b^11 − 1) + 1
    sizes = [enc.offsets[i + 1] - enc.offsets[i] for i in range(12)]
    assert sizes[0] == 16 ** 3 and all(s % 8 == 0 for s in sizes) and max(sizes) == 2 ** 19
    assert enc.hashed[:3] == [False, False, False] and enc.hashed[-1]
    assert enc.params.numel() == sum(sizes) * 2
    assert float(enc.params.detach().abs().max()) <= 1e-4  # tcnn's initialisation range


def test_hash_grid_interpolates_trilinearly():
    enc = HashGridEncoding(1, 1, 12, 4, 1.0)  # one dense level, scale 3: vertices at (i − 0.5)/3
    with torch.no_grad():
        res = enc.resolutions[0]
        idx = torch.arange(res ** 3)
        xyz = torch.stack([idx % res, (idx // res) % res, idx // res // res], -1).float()
        enc.level_table(0)[: res ** 3, 0] = xyz @ torch.tensor([1.0, 10.0, 100.0])  # a linear field
    x = torch.rand(100, 3) * 0.6 + 0.2
    pos = x * enc.scales[0] + 0.5
    expected = pos @ torch.tensor([1.0, 10.0, 100.0])
    assert torch.allclose(enc(x)[:, 0], expected, atol=1e-3)


def test_blob_normals_point_outward_analytic_and_finite_difference():
    for normal_type in ("analytic", "finite_difference"):
        vol = ImplicitVolume(SceneConfig(radius=1.0, n_levels=2, log2_hashmap_size=10, max_resolution=32,
                                         normal_type=normal_type))
        torch.nn.init.zeros_(vol.density_mlp[-1].weight)  # density = softplus(blob bias) only
        g = torch.Generator().manual_seed(0)  # points 0.15–0.45 from the centre: near it central differences
        p = torch.nn.functional.normalize(torch.randn(64, 3, generator=g), dim=-1) * (  # of p/|p| lose accuracy
            0.15 + 0.3 * torch.rand(64, 1, generator=g))
        out = vol(p, with_normal=True)
        expected = p / p.norm(dim=-1, keepdim=True)
        tol = 1e-4 if normal_type == "analytic" else 5e-3  # central differences with eps 0.01
        assert torch.allclose(out["normal"], expected, atol=tol), normal_type
        assert torch.allclose(out["density"], torch.nn.functional.softplus(10 * (1 - p.norm(dim=-1) / 0.5)))


def test_analytic_normals_carry_second_order_gradients():
    vol = ImplicitVolume(SceneConfig(radius=1.0, n_levels=2, log2_hashmap_size=10, max_resolution=32))
    out = vol(torch.randn(32, 3) * 0.3, with_normal=True)
    out["normal"][:, 0].sum().backward()
    assert vol.density_mlp[0].weight.grad is not None and vol.density_mlp[0].weight.grad.abs().sum() > 0


def test_backgrounds():
    sh = spherical_harmonics_deg3(torch.tensor([[0.0, 0.0, 1.0]]))
    assert sh.shape == (1, 9) and sh[0, 0].item() == pytest.approx(0.2820948)
    env = NeuralEnvironmentMap()
    c = env(torch.nn.functional.normalize(torch.randn(10, 3), dim=-1))
    assert c.shape == (10, 3) and (c > 0).all() and (c < 1).all()
    scene = Scene(SceneConfig(background="solid", background_color=[0.2, 0.4, 0.6], n_levels=2,
                              log2_hashmap_size=10, max_resolution=32))
    assert torch.allclose(scene.background(torch.zeros(2, 3)), torch.tensor([[0.2, 0.4, 0.6]] * 2))


def test_occupancy_grid_skips_empty_space():
    cfg = SceneConfig(radius=1.0, n_levels=2, log2_hashmap_size=10, max_resolution=32, density_blob_std=0.25,
                      background="solid")
    scene = Scene(cfg)
    rcfg = RenderConfig(num_samples_per_ray=128, alpha_threshold=0.0, early_stop_eps=0.0, stratified=False)
    cams = orbit_cameras(1, 0.0, 2.5, 40.0, 32, 32)
    o, d = get_rays(cams)
    full = VolumeRenderer(rcfg, 1.0).eval()  # grid starts all-occupied
    skipping = VolumeRenderer(rcfg, 1.0).eval()
    skipping.update_grid(0, scene.volume, torch.Generator().manual_seed(0))
    occupied = skipping.grid.binaries.float().mean().item()
    assert 0.005 < occupied < 0.1  # only the blob's cells (radius 0.25 of a 2-wide box)
    with torch.no_grad():
        a = full(scene.volume, scene.background, o, d)
        b = skipping(scene.volume, scene.background, o, d)
    assert b.num_samples < 0.3 * a.num_samples
    assert torch.allclose(a.rgb, b.rgb, atol=2e-2) and torch.allclose(a.opacity, b.opacity, atol=2e-2)


def test_grid_update_schedule_and_ema():
    cfg = SceneConfig(radius=1.0, n_levels=2, log2_hashmap_size=10, max_resolution=32)
    scene = Scene(cfg)
    r = VolumeRenderer(RenderConfig(), 1.0)
    g = torch.Generator().manual_seed(0)
    assert r.update_grid(0, scene.volume, g) and not r.update_grid(5, scene.volume, g)
    assert r.update_grid(16, scene.volume, g)
    before = r.grid.occs.clone()
    assert r.grid.binaries.any()
    r.grid.update(300, lambda x: torch.zeros(x.shape[0]), r.step_size, g)  # past warm-up: a random subset
    visited = r.grid.occs != before
    assert 0 < visited.sum() < before.numel()
    # the new (zero) density only lets the occupancy decay by 0.95: EMA, never a jump to zero
    assert torch.allclose(r.grid.occs[visited], before[visited] * 0.95)


def test_a_grid_fitted_for_rendering_keeps_every_cell_the_object_touches():
    """``prepare`` (a given scene's views) tests 27 points per cell: a box that only grazes the cells on its border
    (half-size 0.3 in cells 0.125 wide) keeps all of them, and no empty one. One random point per cell (an ``update``)
    drops most border cells: it cut a fitted toy cube's rim from its renders (silhouette IoU 0.851 → 0.971)."""
    half, radius = 0.3, 2.0
    def box(x):
        return torch.where((x.abs() < half).all(-1), torch.full_like(x[:, 0], 100.0), torch.zeros_like(x[:, 0]))

    r = VolumeRenderer(RenderConfig(), radius)  # the official 32³ grid over ±2
    cell = 2 * radius / r.grid.resolution
    lo, hi = r.grid.cell_coords * cell - radius, (r.grid.cell_coords + 1) * cell - radius
    touched = ((hi > -half) & (lo < half)).all(-1)  # cells the box overlaps: 6 per axis
    assert int(touched.sum()) == 216

    class Volume:  # the renderer only asks a scene for its density
        density = staticmethod(box)
    r.prepare(type("S", (), {"volume": Volume()})())
    assert torch.equal(r.grid.binaries, touched)
    once = VolumeRenderer(RenderConfig(), radius)
    once.grid.update(0, box, once.step_size, torch.Generator().manual_seed(0))  # one random point per cell
    assert int((once.grid.binaries & touched).sum()) < 150


def test_regularisers():
    w = torch.tensor([0.5, 0.5])
    dirs = torch.tensor([[1.0, 0, 0], [1.0, 0, 0]])
    opacity = torch.tensor([[[[0.5]], [[0.0]]]])  # [1, 2, 1, 1]: one visible pixel
    def out(normals):
        return RenderOutput(rgb=torch.zeros(1, 2, 1, 3), opacity=opacity.view(1, 2, 1, 1), depth=opacity,
                            normal=torch.zeros(1, 2, 1, 3), weights=w, sample_normals=normals, sample_dirs=dirs,
                            num_samples=2)
    facing = torch.tensor([[-1.0, 0, 0], [-1.0, 0, 0]])  # normals towards the camera: no penalty
    away = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0]])
    assert orientation_loss(out(facing)).item() == 0.0
    assert orientation_loss(out(away)).item() == pytest.approx((0.5 * 1 + 0.5 * 0.36) / 1)
    assert sparsity_loss(out(facing)).item() == pytest.approx((math.sqrt(0.26) + math.sqrt(0.01)) / 2)
    assert opaque_loss(out(facing)).item() > 0


def test_view_dependent_embeddings_and_plain_negative():
    prior = AnalyticPrior(8)
    pe = PromptEmbeddings.build(prior, "red", "green", view_dependent=True)
    emb = pe.positive(torch.tensor([0.0, 0.0, 80.0]), torch.tensor([0.0, 180.0, 0.0]))
    expected = prior.encode_text(["red, front view", "red, back view", "red, overhead view"])
    assert torch.equal(emb, expected)
    assert torch.equal(pe.negative, prior.encode_text(["green"])[0])
    assert torch.equal(pe.null, prior.encode_text([""])[0])
    plain = PromptEmbeddings.build(prior, "red", "green", view_dependent=False)
    assert torch.equal(plain.positive(torch.zeros(2), torch.zeros(2)), prior.encode_text(["red", "red"]))


def test_camera_sampler_phases():
    g = torch.Generator().manual_seed(0)
    cfg = CameraConfig(batch_size=4, front_back_only_steps=10, first_step_fixed_view=True)
    first = sample_cameras(cfg, 0, g)
    assert first.elevation.tolist() == [15.0] * 4 and first.azimuth.tolist() == [0.0] * 4
    early = sample_cameras(CameraConfig(batch_size=64, front_back_only_steps=10), 5, g)
    a = early.azimuth.abs()
    assert ((a <= 30) | (a >= 150)).all()
    strat = sample_cameras(CameraConfig(batch_size=4), 20, g)
    bins = ((strat.azimuth + 180) // 90).long().tolist()
    assert bins == [0, 1, 2, 3]  # one azimuth per quarter
    el = torch.cat([sample_cameras(CameraConfig(batch_size=256, elevation_range=[-10.0, 45.0]), 20, g).elevation
                    for _ in range(20)])
    assert el.min() >= -10.0 and el.max() <= 45.0
    assert (el < -6.4).any()  # the uniform half reaches −10° ...
    d = sample_cameras(CameraConfig(batch_size=128), 3, g)
    assert d.distance.min() >= 1.5 and d.distance.max() <= 2.0 and d.fovy.min() >= 40 and d.fovy.max() <= 70
    c = make_cameras([0.0], [0.0], [2.0], [60.0], 8, 8)
    assert c.intrinsics()[0, 0, 2].item() == 4.0


@pytest.mark.parametrize("shading", ["albedo", "textureless", "diffuse"])
def test_one_pass_eval_render_equals_the_two_pass_render(shading):
    """The no-grad renderer (one pass, early termination) gives the image of the differentiable two-pass one."""
    from csd_backend.render.cameras import get_rays, make_cameras
    from csd_backend.render.volume_renderer import VolumeRenderer
    from csd_backend.scene.volume import Scene

    from engine_helpers import small_config

    cfg = small_config(render={"num_samples_per_ray": 96}, scene={"density_blob_scale": 60.0})
    torch.manual_seed(0)
    scene = Scene(cfg.scene)
    with torch.no_grad():  # a denser, more varied field than the blob: some rays terminate early
        scene.volume.encoding.params.uniform_(-1, 1)
    renderer = VolumeRenderer(cfg.render, cfg.scene.radius).eval()
    renderer.grid.update(0, scene.volume.density, renderer.step_size, torch.Generator().manual_seed(0))
    cams = make_cameras([15.0, -5.0], [0.0, 120.0], [1.8, 2.0], [60.0, 50.0], 12, 12)
    o, d = get_rays(cams)
    flat = (scene.volume, scene.background, o.reshape(-1, 3), d.reshape(-1, 3), shading, cams.light_positions
            .repeat_interleave(144, 0))
    ref = renderer.render_rays(*flat)
    fast = renderer.render_rays_eval(*flat, slab=7)  # a slab size that does not divide the ray length
    for key in ("rgb", "opacity", "depth", "normal"):
        assert torch.allclose(fast[key], ref[key].detach(), atol=1e-5), key
    assert fast["num_samples"] == ref["num_samples"]
    # some rays become opaque (early termination is exercised), others stay partly transparent
    assert (ref["opacity"] > 1 - 1e-4).any() and ((ref["opacity"] > 0.05) & (ref["opacity"] < 0.95)).any()
