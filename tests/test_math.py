"""Spec math against hand-computed values: schedules, CSD coefficients, the guidance gradient, cameras,
view labels and compositing of a known density."""
from __future__ import annotations

import math

import pytest
import torch

from csd_backend.config import GuidanceConfig, RenderConfig
from csd_backend.errors import ConfigError
from csd_backend.guidance import ScoreDistillation, coefficients, timestep_range, timestep_weight
from csd_backend.presets import get_preset
from csd_backend.priors.analytic import AnalyticPrior
from csd_backend.prompts import view_labels
from csd_backend.render.cameras import get_rays, make_cameras
from csd_backend.render.volume_renderer import VolumeRenderer, exclusive_sum_packed
from csd_backend.schedules import schedule_value, validate_schedule


# ---------------------------------------------------------------- schedules
def test_schedule_constant_and_linear():
    assert schedule_value(3, 123) == 3.0
    s = [1000, 2.0, 4.0, 3000]
    assert schedule_value(s, 0) == 2.0
    assert schedule_value(s, 1000) == 2.0
    assert schedule_value(s, 2000) == pytest.approx(3.0)
    assert schedule_value(s, 2500) == pytest.approx(3.5)
    assert schedule_value(s, 3000) == 4.0
    assert schedule_value(s, 99999) == 4.0


def test_schedule_three_elements_and_step_change():
    assert schedule_value([10.0, 1.0, 5000], 2500) == pytest.approx(5.5)
    # threestudio's step change [5000, 0.98, 0.5, 5001]
    assert schedule_value([5000, 0.98, 0.5, 5001], 5000) == pytest.approx(0.98)
    assert schedule_value([5000, 0.98, 0.5, 5001], 5001) == pytest.approx(0.5)
    assert schedule_value([200, 1.0, 2.0, 200], 199) == 1.0
    assert schedule_value([200, 1.0, 2.0, 200], 200) == 2.0


@pytest.mark.parametrize("bad", [[1, 2], [1, 2, 3, 4, 5], "x", [0, "a", 1, 2], True, [10, 0, 1, 5]])
def test_schedule_validation(bad):
    with pytest.raises(ConfigError, match="guidance.negative_weight"):
        validate_schedule(bad, "guidance.negative_weight")


# ------------------------------------------------------- CSD coefficients
STAGE1 = {0: (1, 0.0, -1.0), 2500: (1, -0.5, -0.5), 5000: (1, -1.0, 0.0), 10000: (1, -1.0, 0.0)}
STAGE2 = {0: (1, -1.0, 0.0), 2500: (1, -0.875, -0.125), 5000: (1, -0.75, -0.25), 10000: (1, -0.5, -0.5)}


@pytest.mark.parametrize("step", [0, 2500, 5000, 10000])
def test_csd_coefficients_stage1(step):
    cfg = get_preset("csd-coarse").guidance  # ω2: [0, 0, 1, 5000]
    c = coefficients(cfg, step)
    assert (c.c, c.u, c.n, c.k) == pytest.approx((*STAGE1[step], 0.0))


@pytest.mark.parametrize("step", [0, 2500, 5000, 10000])
def test_csd_coefficients_stage2(step):
    cfg = GuidanceConfig(prompt="x", negative_weight=[0, 1.0, 0.5, 10000])  # spec stage 2: ω2 1 → 0.5
    c = coefficients(cfg, step)
    assert (c.c, c.u, c.n, c.k) == pytest.approx((*STAGE2[step], 0.0))


def test_sds_and_edit_coefficients():
    # threestudio: ε_y + s(ε_y − ε_u) − ε  ⇒  c = 1 + s, u = −s, k = −1 (effective CFG scale s + 1)
    c = coefficients(GuidanceConfig(prompt="x", mode="sds", cfg_scale=7.5), 0)
    assert (c.c, c.u, c.n, c.k) == pytest.approx((8.5, -7.5, 0.0, -1.0))
    c = coefficients(get_preset("csd-edit").guidance, 1234)
    assert (c.c, c.u, c.n, c.k) == pytest.approx((1.0, -1.0, 0.0, 0.0))


def test_t_range_stage1_step_change():
    cfg = get_preset("csd-coarse").guidance
    assert timestep_range(cfg, 0, 1000) == (20, 980)
    assert timestep_range(cfg, 5000, 1000) == (20, 980)
    assert timestep_range(cfg, 5001, 1000) == (20, 500)


def test_t_range_at_the_top_is_a_valid_index():
    cfg = GuidanceConfig(prompt="x", min_step_percent=1.0, max_step_percent=1.0)
    assert timestep_range(cfg, 0, 1000) == (999, 999)


def test_weightings():
    a = torch.tensor([0.25, 0.81])
    assert torch.allclose(timestep_weight("uniform", a), torch.ones(2))
    assert torch.allclose(timestep_weight("sds", a), torch.tensor([0.75, 0.19]))
    assert torch.allclose(timestep_weight("fantasia3d", a), torch.tensor([0.5 * 0.75, 0.9 * 0.19]))


# ----------------------------------------------------- guidance gradient
def _guidance(**kw):
    prior = AnalyticPrior(resolution=8)
    cfg = GuidanceConfig(prompt="red", negative_prompt="green", view_dependent=False, **kw)
    return prior, ScoreDistillation(cfg, prior)


def _expected_eps(prior, z_t, t, prompt):
    emb = prior.encode_text([prompt])
    return prior.predict_noise(z_t, t, emb.expand(z_t.shape[0], *emb.shape[1:]))


@pytest.mark.parametrize("step", [0, 2500, 6000])
def test_csd_gradient_matches_hand_formula(step):
    prior, guid = _guidance(weighting="uniform", grad_normalize=False, negative_weight=[0, 0.0, 1.0, 5000])
    torch.manual_seed(0)
    images = torch.rand(2, 8, 8, 3, requires_grad=True)
    t = torch.tensor([100, 700])
    noise = torch.randn(2, 3, 8, 8)
    out = guid(images, torch.zeros(2), torch.zeros(2), step, t=t, noise=noise)
    z = images.detach().permute(0, 3, 1, 2) * 2 - 1
    z_t = prior.add_noise(z, noise, t)
    w2 = min(step / 5000, 1.0)
    e_y, e_neg, e_null = (_expected_eps(prior, z_t, t, p) for p in ("red", "green", ""))
    g = e_y - w2 * e_neg - (1 - w2) * e_null
    assert torch.allclose(out.grad, g, atol=1e-5)
    out.loss.backward()
    # ∂L/∂z = g / B and z = 2x − 1  ⇒  ∂L/∂x = 2g / B
    assert torch.allclose(images.grad, (2 * g / 2).permute(0, 2, 3, 1), atol=1e-5)


def test_normalisation_is_global_and_sds_weighting():
    prior, guid = _guidance(weighting="sds", grad_normalize=True)
    images = torch.rand(3, 8, 8, 3)
    t = torch.tensor([50, 400, 900])
    noise = torch.randn(3, 3, 8, 8)
    out = guid(images, torch.zeros(3), torch.zeros(3), 0, t=t, noise=noise)
    assert out.grad.norm().item() == pytest.approx(1.0, abs=1e-5)  # one norm over the whole B×C×H×W tensor
    raw = _guidance(weighting="sds", grad_normalize=False)[1](images, torch.zeros(3), torch.zeros(3), 0, t=t,
                                                              noise=noise)
    assert torch.allclose(out.grad, raw.grad / raw.grad.norm(), atol=1e-6)
    # w(t) = 1 − ᾱ_t multiplies each item
    unweighted = _guidance(weighting="uniform", grad_normalize=False)[1](images, torch.zeros(3), torch.zeros(3), 0,
                                                                         t=t, noise=noise)
    w = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
    assert torch.allclose(raw.grad, w * unweighted.grad, atol=1e-6)


def test_sds_gradient_formula_and_clip():
    prior, guid = _guidance(mode="sds", cfg_scale=10.0, weighting="uniform", grad_normalize=False, grad_clip=0.5)
    images = torch.rand(1, 8, 8, 3)
    t, noise = torch.tensor([500]), torch.randn(1, 3, 8, 8)
    out = guid(images, torch.zeros(1), torch.zeros(1), 0, t=t, noise=noise)
    z_t = prior.add_noise(images.permute(0, 3, 1, 2) * 2 - 1, noise, t)
    e_y, e_u = _expected_eps(prior, z_t, t, "red"), _expected_eps(prior, z_t, t, "green")
    g = (e_y + 10.0 * (e_y - e_u) - noise).clamp(-0.5, 0.5)  # threestudio's form, not ε_u + s(ε_y − ε_u)
    assert torch.allclose(out.grad, g, atol=1e-5)


def test_nan_and_inf_become_zero_and_the_largest_float():
    """As the official code, torch.nan_to_num with its defaults: NaN → 0, ±Inf → ± the largest float."""
    prior = AnalyticPrior(resolution=8)
    orig = prior.predict_noise

    def broken(z_t, t, emb):
        eps = orig(z_t, t, emb).clone()
        eps[:, 0, 0, 0] = float("nan")
        eps[:, 1, 0, 0] = float("inf")
        eps[:, 2, 0, 0] = float("-inf")
        return eps

    prior.predict_noise = broken
    # SDS with s = 0 and zero noise: g = ε_y (one branch), so the non-finite values reach the post-processing as is
    sds = ScoreDistillation(GuidanceConfig(prompt="red", negative_prompt="", view_dependent=False, mode="sds",
                                           cfg_scale=0.0, weighting="uniform", grad_normalize=False), prior)
    out = sds(torch.rand(1, 8, 8, 3), torch.zeros(1), torch.zeros(1), 0, t=torch.tensor([500]),
              noise=torch.zeros(1, 3, 8, 8))
    big = torch.finfo(torch.float32).max
    assert out.grad[0, 0, 0, 0].item() == 0.0
    assert out.grad[0, 1, 0, 0].item() == big
    assert out.grad[0, 2, 0, 0].item() == -big
    assert torch.isfinite(out.grad).all()


def test_zero_coefficient_branches_are_skipped():
    prior, guid = _guidance(negative_weight=[0, 0.0, 1.0, 5000])
    images = torch.rand(1, 8, 8, 3)
    calls = {}
    orig = prior.predict_noise

    def spy(z_t, t, emb):
        calls["n"] = z_t.shape[0]
        return orig(z_t, t, emb)

    prior.predict_noise = spy
    guid(images, torch.zeros(1), torch.zeros(1), 0)
    assert calls["n"] == 2  # ω2 = 0: positive and null only
    guid(images, torch.zeros(1), torch.zeros(1), 2500)
    assert calls["n"] == 3


def test_timesteps_are_per_item_and_inclusive():
    prior, guid = _guidance(min_step_percent=0.5, max_step_percent=0.502)
    g = torch.Generator().manual_seed(0)
    t = guid.sample_timesteps(2000, 0, g)
    assert set(t.tolist()) == {500, 501, 502}


# ------------------------------------------------------------ cameras
def test_camera_matrix_front_view():
    cams = make_cameras([0.0], [0.0], [2.0], [60.0], 4, 4)
    c2w = cams.c2w[0]
    # camera on +x looking at the origin; up = +z; OpenGL: columns right, up, back(−lookat)
    assert torch.allclose(c2w[:3, 3], torch.tensor([2.0, 0.0, 0.0]))
    assert torch.allclose(c2w[:3, 2], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)  # −lookat
    assert torch.allclose(c2w[:3, 1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)  # up
    assert torch.allclose(c2w[:3, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)  # right = lookat × up
    assert cams.focal[0].item() == pytest.approx(0.5 * 4 / math.tan(math.radians(30)))


def test_camera_elevation_azimuth_positions():
    cams = make_cameras([30.0], [90.0], [2.0], [60.0], 4, 4)
    assert torch.allclose(cams.c2w[0, :3, 3], torch.tensor([0.0, 2 * math.cos(math.radians(30)), 1.0]), atol=1e-6)


def test_rays_centre_pixel_points_at_origin():
    cams = make_cameras([20.0, -5.0], [45.0, 170.0], [1.8, 1.5], [50.0, 70.0], 3, 3)
    o, d = get_rays(cams)
    assert o.shape == (2, 3, 3, 3) and d.shape == (2, 3, 3, 3)
    centre = d[:, 1, 1]
    to_origin = -o[:, 1, 1] / o[:, 1, 1].norm(dim=-1, keepdim=True)
    assert torch.allclose(centre, to_origin, atol=1e-6)
    assert torch.allclose(d.norm(dim=-1), torch.ones(2, 3, 3))
    # top row looks up (+z component larger than the bottom row's)
    assert (d[0, 0, 1, 2] > d[0, 2, 1, 2]).item()


def test_view_labels():
    el = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 70.0, 0.0])
    az = torch.tensor([0.0, 44.0, 46.0, 136.0, -179.0, 0.0, 360.0])
    assert view_labels(el, az) == ["front", "front", "side", "back", "back", "overhead", "front"]
    assert view_labels(torch.tensor([0.0]), torch.tensor([35.0]), 30, 30) == ["side"]


# -------------------------------------------------------- compositing
class ConstantVolume(torch.nn.Module):
    def __init__(self, sigma, radius=1.0):
        super().__init__()
        self.sigma, self.radius = sigma, radius

    def density(self, p):
        inside = (p.abs() <= self.radius).all(-1)
        return torch.where(inside, torch.full_like(p[:, 0], self.sigma), torch.zeros_like(p[:, 0]))

    def forward(self, p, with_normal=False):
        out = {"density": self.density(p), "albedo": torch.tensor([1.0, 0.0, 0.0]).expand(p.shape[0], 3)}
        if with_normal:
            out["normal"] = torch.nn.functional.normalize(p, dim=-1)
        return out


def test_compositing_constant_density_slab():
    sigma, r = 1.5, 1.0
    cfg = RenderConfig(num_samples_per_ray=1732, alpha_threshold=0.0, early_stop_eps=0.0, stratified=False)
    renderer = VolumeRenderer(cfg, r).eval()
    vol = ConstantVolume(sigma, r)
    bg = torch.nn.Identity()
    rays_o = torch.tensor([[[[3.0, 0.0, 0.0]]]])
    rays_d = torch.tensor([[[[-1.0, 0.0, 0.0]]]])
    with torch.no_grad():
        out = renderer(vol, lambda d: torch.zeros_like(d), rays_o, rays_d,
                       bg_colors=torch.tensor([[0.0, 0.0, 1.0]]))
    L = 2 * r  # chord through the box
    opacity = 1 - math.exp(-sigma * L)
    assert out.opacity.item() == pytest.approx(opacity, abs=2e-3)
    # rgb = red · opacity + blue background · (1 − opacity)
    assert out.rgb[0, 0, 0].tolist() == pytest.approx([opacity, 0.0, 1 - opacity], abs=2e-3)
    # expected depth Σ w t = ∫ t σ e^{−σ(t−2)} dt over [2, 4]
    t0 = 2.0
    depth = (t0 * (1 - math.exp(-sigma * L)) + (1 - math.exp(-sigma * L) * (1 + sigma * L)) / sigma)
    assert out.depth.item() == pytest.approx(depth, abs=5e-3)
    del bg


def test_exclusive_sum_packed():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    rays = torch.tensor([0, 0, 0, 2, 2, 5])
    assert exclusive_sum_packed(x, rays).tolist() == [0.0, 1.0, 3.0, 0.0, 4.0, 0.0]
