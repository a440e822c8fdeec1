"""Perp-Neg (spec §1.3): the interpolated view embeddings and weights at the thresholds, and the guidance direction
against a hand computation on fixed noise predictions."""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from csd_backend.config import GuidanceConfig, RunConfig
from csd_backend.errors import ConfigError
from csd_backend.guidance import ScoreDistillation
from csd_backend.priors.base import DiffusionPrior
from csd_backend.prompts import perp_neg_views

F_FS, F_SB, F_FSB = [4.0, 0.5, -2.426], [1.0, 0.5, -0.606], [1.0, 0.5, 0.967]


def f(p, r):
    return p[0] * math.exp(-p[1] * r) + p[2]


@pytest.mark.parametrize("azimuth,elevation,mix,negs,weights", [
    (0.0, 0.0, {"front": 1.0, "side": 0.0}, ("front", "side"), (-f(F_FS, 1.0), -f(F_FS, 0.0))),
    (45.0, 10.0, {"front": 0.5, "side": 0.5}, ("front", "side"), (-f(F_FS, 0.5), -f(F_FS, 0.5))),
    (-45.0, 10.0, {"front": 0.5, "side": 0.5}, ("front", "side"), (-f(F_FS, 0.5), -f(F_FS, 0.5))),
    (89.999, 0.0, {"front": 0.0, "side": 1.0}, ("front", "side"), (-f(F_FS, 0.0), -f(F_FS, 1.0))),
    (90.0, 0.0, {"side": 1.0, "back": 0.0}, ("side", "front"), (-f(F_SB, 1.0), -f(F_FSB, 1.0))),
    (135.0, 0.0, {"side": 0.5, "back": 0.5}, ("side", "front"), (-f(F_SB, 0.5), -f(F_FSB, 0.5))),
    (180.0, 0.0, {"side": 0.0, "back": 1.0}, ("side", "front"), (-f(F_SB, 0.0), -f(F_FSB, 0.0))),
    (-180.0, 0.0, {"side": 0.0, "back": 1.0}, ("side", "front"), (-f(F_SB, 0.0), -f(F_FSB, 0.0))),
    (270.0, 0.0, {"side": 1.0, "back": 0.0}, ("side", "front"), (-f(F_SB, 1.0), -f(F_FSB, 1.0))),
    (30.0, 60.5, {"overhead": 1.0}, ("front", "side"), (0.0, 0.0)),
])
def test_view_interpolation_and_weights_at_the_thresholds(azimuth, elevation, mix, negs, weights):
    [(got_mix, got_negs, got_w)] = perp_neg_views(torch.tensor([elevation]), torch.tensor([azimuth]), F_FS, F_SB,
                                                  F_FSB, 60.0)
    assert got_negs == negs
    assert got_w == pytest.approx(weights, abs=1e-4)
    assert {k: v for k, v in got_mix.items() if abs(v) > 1e-3} == pytest.approx(
        {k: v for k, v in mix.items() if abs(v) > 1e-3}, abs=1e-4)


class FixedPrior(DiffusionPrior):
    """Text → a fixed random embedding per prompt; ε = a fixed linear function of (embedding, z_t): every branch
    gives a different, known prediction."""

    def __init__(self):
        super().__init__(torch.linspace(0.999, 0.01, 1000))
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(8, 3 * 4 * 4, generator=g)
        self.calls = []

    def _encode_text_uncached(self, prompts):
        return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                            for p in prompts])

    def input_size(self, height, width):
        return 4, 4

    def encode_images(self, images):
        return (images.permute(0, 3, 1, 2) * 2 - 1)

    def eps_of(self, emb, z_t):
        return (emb @ self.proj).view(-1, 3, 4, 4) + 0.1 * z_t

    def predict_noise(self, z_t, t, embeddings, control=None):
        self.calls.append(z_t.shape[0])
        return self.eps_of(embeddings, z_t)


def test_perp_neg_direction_matches_a_hand_computation():
    prior = FixedPrior()
    cfg = GuidanceConfig(prompt="a corgi", negative_prompt="ugly", mode="csd", guidance_weight=1.0,
                         negative_weight=0.4, weighting="uniform", grad_normalize=False, perp_neg=True,
                         perp_neg_scale=3.0, front_threshold=30.0, back_threshold=30.0)
    sd = ScoreDistillation(cfg, prior)
    images = torch.rand(2, 4, 4, 3)
    elevation, azimuth = torch.tensor([10.0, 20.0]), torch.tensor([30.0, 150.0])
    t = torch.tensor([300, 600])
    noise = torch.randn(2, 3, 4, 4)
    out = sd(images, elevation, azimuth, step=0, t=t, noise=noise)
    assert prior.calls == [10]  # 5B: positive, negative, null, two negative views

    # by hand, from the spec
    z_t = prior.add_noise(images.permute(0, 3, 1, 2) * 2 - 1, noise, t)
    e = {p: prior.encode_text([p])[0] for p in ["ugly", ""] + [f"a corgi, {d} view" for d in
                                                               ("front", "side", "back")]}
    r0, r1 = 1 - 30 / 90, 2 - 150 / 90
    pos = torch.stack([r0 * e["a corgi, front view"] + (1 - r0) * e["a corgi, side view"],
                       r1 * e["a corgi, side view"] + (1 - r1) * e["a corgi, back view"]])
    views = [torch.stack([e["a corgi, front view"], e["a corgi, side view"]]),
             torch.stack([e["a corgi, side view"], e["a corgi, front view"]])]
    w = torch.tensor([[-f(F_FS, r0), -f(F_FS, 1 - r0)], [-f(F_SB, r1), -f(F_FSB, r1)]])
    eps_pos = prior.eps_of(pos, z_t)
    eps_unc = prior.eps_of(e["ugly"].expand(2, 8), z_t)
    eps_null = prior.eps_of(e[""].expand(2, 8), z_t)
    e_pos = (eps_pos - eps_unc).flatten(1)
    perp = torch.zeros_like(e_pos)
    for i in range(2):
        x = (prior.eps_of(views[i], z_t) - eps_unc).flatten(1)
        perp += w[:, i:i + 1] * (x - (x * e_pos).sum(1, keepdim=True) / (e_pos * e_pos).sum(1, keepdim=True) * e_pos)
    expected = 1.0 * eps_pos - 0.4 * eps_unc - 0.6 * eps_null + 3.0 * perp.view(2, 3, 4, 4)
    torch.testing.assert_close(out.grad, expected, rtol=1e-5, atol=1e-5)


def test_sds_perp_neg_is_threestudios_form():
    """SDS with Perp-Neg as threestudio's stable-diffusion-guidance: ε̂ = ε_u + s·(ε_pos − ε_u + Σ_i w_i·perp(ε_i − ε_u,
    ε_pos − ε_u)), g = w(t)·(ε̂ − ε): the perpendicular term inside the guidance scale s (not ``perp_neg_scale``),
    ε_u (not ε_pos) as the base, 4B UNet inputs (no null branch)."""
    prior = FixedPrior()
    s = 7.5
    cfg = GuidanceConfig(prompt="a corgi", negative_prompt="ugly", mode="sds", cfg_scale=s, weighting="sds",
                         grad_normalize=False, perp_neg=True, perp_neg_scale=3.0)
    images = torch.rand(2, 4, 4, 3)
    elevation, azimuth = torch.tensor([10.0, 40.0]), torch.tensor([-60.0, 120.0])
    t, noise = torch.tensor([200, 700]), torch.randn(2, 3, 4, 4)
    out = ScoreDistillation(cfg, prior)(images, elevation, azimuth, step=0, t=t, noise=noise)
    assert prior.calls == [8]  # positive, negative, two negative views

    z_t = prior.add_noise(images.permute(0, 3, 1, 2) * 2 - 1, noise, t)
    e = {d: prior.encode_text([f"a corgi, {d} view"])[0] for d in ("front", "side", "back")}
    r0, r1 = 1 - 60 / 90, 2 - 120 / 90
    pos = torch.stack([r0 * e["front"] + (1 - r0) * e["side"], r1 * e["side"] + (1 - r1) * e["back"]])
    views = [torch.stack([e["front"], e["side"]]), torch.stack([e["side"], e["front"]])]
    w = [[-f(F_FS, r0), -f(F_FS, 1 - r0)], [-f(F_SB, r1), -f(F_FSB, r1)]]
    eps_u = prior.eps_of(prior.encode_text(["ugly"]).expand(2, 8), z_t)
    e_pos = prior.eps_of(pos, z_t) - eps_u
    expected = torch.zeros(2, 3, 4, 4)
    for b in range(2):  # one sample at a time, as written in threestudio
        accum = torch.zeros(3, 4, 4)
        for i in range(2):
            x, y = prior.eps_of(views[i], z_t)[b] - eps_u[b], e_pos[b]
            accum += w[b][i] * (x - (x * y).sum() / max(float((y * y).sum()), 1e-6) * y)
        eps_hat = eps_u[b] + s * (e_pos[b] + accum)
        expected[b] = (1 - prior.alphas_cumprod[t[b]]) * (eps_hat - noise[b])
    torch.testing.assert_close(out.grad, expected, rtol=1e-5, atol=1e-4)
    c = out.coefficients
    assert (c.c, c.u, c.n, c.k, c.p) == (s, 1 - s, 0.0, -1.0, s)


def test_without_perp_neg_the_direction_has_no_perpendicular_term():
    prior = FixedPrior()
    cfg = GuidanceConfig(prompt="a corgi", negative_prompt="ugly", negative_weight=0.4, grad_normalize=False)
    out = ScoreDistillation(cfg, prior)(torch.rand(1, 4, 4, 3), torch.tensor([10.0]), torch.tensor([0.0]), 0,
                                        t=torch.tensor([500]), noise=torch.zeros(1, 3, 4, 4))
    assert prior.calls == [3]
    e = prior.encode_text(["a corgi, front view", "ugly", ""])
    z_t = prior.add_noise(out.z.detach(), torch.zeros_like(out.z), torch.tensor([500]))
    expected = prior.eps_of(e[:1], z_t) - 0.4 * prior.eps_of(e[1:2], z_t) - 0.6 * prior.eps_of(e[2:], z_t)
    torch.testing.assert_close(out.grad, expected, rtol=1e-5, atol=1e-5)


def test_perp_neg_needs_view_dependent_prompts():
    cfg = RunConfig().replace(guidance={"prompt": "x", "perp_neg": True, "view_dependent": False})
    with pytest.raises(ConfigError, match="guidance.perp_neg"):
        cfg.validate(require_model=False)


def test_a_perp_neg_run_converges_with_the_analytic_prior():
    from csd_backend.optimize import Optimization
    from csd_backend.priors.analytic import AnalyticPrior
    from engine_helpers import small_config
    from test_convergence import mean_colour

    cfg = small_config("a red ball", steps=60, guidance={"prompt": "a red ball", "perp_neg": True,
                                                         "negative_prompt": "ugly", "negative_weight": 0.5})
    scene = Optimization(cfg, AnalyticPrior(resolution=16)).run()
    r, g, b = mean_colour(scene, cfg).tolist()
    assert r > 0.8 and g < 0.2 and b < 0.2, (r, g, b)
