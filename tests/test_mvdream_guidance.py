"""Multi-view cameras and the MVDream guidances (issue 24 items 3–4): whole objects of equally spaced views per
batch, the R2 direction ε_y − ε_neg with the per-(render, channel) std normalisation, R2's shared t and its
schedule, and threestudio-mvdream's SDS in its x0-reconstruction form, each against a hand computation on fixed ε."""
from __future__ import annotations

import math

import pytest
import torch

from csd_backend.config import CameraConfig, RunConfig
from csd_backend.errors import ConfigError
from csd_backend.guidance import ScoreDistillation, timestep_range
from csd_backend.presets import get_preset
from csd_backend.priors.base import DiffusionPrior
from csd_backend.render.cameras import sample_cameras


# ------------------------------------------------------------------------------------------- cameras
def test_a_batch_is_whole_objects_of_equally_spaced_views():
    cfg = get_preset("csd-mvdream").camera
    g = torch.Generator().manual_seed(3)
    for step, (batch, size) in ((10, (8, 64)), (5000, (4, 256))):
        for _ in range(20):
            cams = sample_cameras(cfg, step, g)
            assert len(cams) == batch and cams.height == cams.width == size
            for obj in range(batch // 4):
                v = slice(4 * obj, 4 * obj + 4)
                for name in ("elevation", "fovy", "distance"):
                    values = getattr(cams, name)[v]
                    assert torch.all(values == values[0]), name  # one draw per object
                az = cams.azimuth[v]
                assert -180.0 <= az[0] < -90.0  # a random start in the first quarter of [-180, 180)
                assert torch.allclose(az[1:] - az[:-1], torch.full((3,), 90.0), atol=1e-4)
                assert 0.0 <= cams.elevation[v][0] <= 30.0 and 15.0 <= cams.fovy[v][0] <= 60.0
                # the distance is 0.8–1.0 relative to the field of view: d / tan(fovy / 2)
                d = cams.distance[v][0] * math.tan(math.radians(cams.fovy[v][0]) / 2)
                assert 0.8 - 1e-5 <= d <= 1.0 + 1e-5
                assert torch.allclose(cams.c2w[v, :3, 3].norm(dim=-1), cams.distance[v], atol=1e-4)
                light = cams.light_positions[v].norm(dim=-1)
                assert torch.allclose(light, light[0].expand(4), atol=1e-5)  # one light distance per object
    # the objects of one batch differ
    cams = sample_cameras(cfg, 10, torch.Generator().manual_seed(0))
    assert cams.elevation[0] != cams.elevation[4] or cams.azimuth[0] != cams.azimuth[4]


def test_views_per_object_must_divide_every_batch():
    base = RunConfig().replace(guidance={"prompt": "x"}).to_dict()
    for camera, field in (({"n_views": 4, "batch_size": [8, 6], "height": [64, 64], "width": [64, 64],
                            "resolution_milestones": [10]}, "camera.n_views"),
                          ({"n_views": 4, "batch_size": 4, "front_back_only_steps": 100},
                           "camera.front_back_only_steps"),
                          ({"n_views": 0}, "camera.n_views")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            RunConfig.from_dict({**base, "camera": {**base["camera"], **camera}}).validate(require_model=False)


def test_single_view_cameras_keep_their_draws():
    """n_views 1 draws per camera in the order the sampler always had: the same cameras as before the option."""
    cfg = CameraConfig(batch_size=3, stratified_azimuth=False, camera_perturb=0.1, first_step_fixed_view=False)
    g = torch.Generator().manual_seed(5)
    cams = sample_cameras(cfg, 3, g)
    g = torch.Generator().manual_seed(5)
    from csd_backend.render.cameras import _uniform, sample_elevation  # noqa: the draw order written out

    elevation = sample_elevation(cfg, 3, g)
    azimuth = _uniform(-180.0, 180.0, 3, g)
    distance = _uniform(1.5, 2.0, 3, g)
    fovy = _uniform(40.0, 70.0, 3, g)
    assert torch.equal(cams.elevation, elevation) and torch.equal(cams.azimuth, azimuth)
    assert torch.equal(cams.distance, distance) and torch.equal(cams.fovy, fovy)


# ------------------------------------------------------------------------------------------ guidance
class FixedPrior(DiffusionPrior):
    """A multi-view stand-in with fixed ε per prompt (z = 2x − 1 at 8², no VAE): ``eps[prompt]`` ``[B, 3, 8, 8]``.
    Records what each prediction was given."""

    name = "fixed"
    multiview = True

    def __init__(self, eps: dict):
        super().__init__(torch.linspace(0.999, 0.01, 1000))
        self.eps, self.calls = eps, []
        self.prompts = list(eps)

    def _encode_text_uncached(self, prompts):
        self.prompts += [p for p in prompts if p not in self.prompts]  # e.g. the view-suffixed ones: ε = 0
        return torch.stack([torch.full((1, 2), float(self.prompts.index(p))) for p in prompts])

    def input_size(self, height, width):
        return 8, 8

    def encode_images(self, images):
        return images.permute(0, 3, 1, 2) * 2 - 1

    def predict_noise(self, z_t, t, embeddings, control=None, cameras=None, num_views=1):
        """The branch of each item is its prompt; item i of a branch gets ``eps[prompt][i]``."""
        self.calls.append(dict(n=z_t.shape[0], t=t.clone(), cameras=cameras, num_views=num_views))
        batch = len(next(iter(self.eps.values())))
        keys = [self.prompts[int(e[0, 0])] for e in embeddings]
        zero = torch.zeros_like(next(iter(self.eps.values()))[0])
        return torch.stack([self.eps[key][i % batch] if key in self.eps else zero for i, key in enumerate(keys)])


def _guidance(preset: str, eps: dict, prompt="a cat", negative="ugly"):
    cfg = get_preset(preset).guidance
    cfg.prompt, cfg.negative_prompt = prompt, negative
    prior = FixedPrior(eps)
    return ScoreDistillation(cfg, prior), prior


def test_csd_mvdream_direction_by_hand():
    """g = 0.9·d/std(d) + 0.1·d with d = ε_y − ε_neg, std per render and channel over H, W (unbiased)."""
    gen = torch.Generator().manual_seed(0)
    eps_y, eps_n = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen) * 2
    guidance, prior = _guidance("csd-mvdream", {"a cat": eps_y, "ugly": eps_n, "": torch.zeros(4, 3, 8, 8)})
    images = torch.rand(4, 8, 8, 3, generator=gen, requires_grad=True)
    c2w = torch.eye(4).expand(4, 4, 4)
    out = guidance(images, torch.zeros(4), torch.zeros(4), step=100, generator=gen, c2w=c2w, n_views=4)
    want = torch.empty(4, 3, 8, 8)
    for b in range(4):
        for c in range(3):
            d = eps_y[b, c] - eps_n[b, c]
            mean = d.sum() / 64
            std = math.sqrt(float(((d - mean) ** 2).sum()) / 63)
            want[b, c] = 0.9 * d / (std + 1e-8) + 0.1 * d
    torch.testing.assert_close(out.grad, want, rtol=1e-5, atol=1e-6)
    # two branches (positive, negative; no null), the cameras and the views per object passed, one t for all
    (call,) = prior.calls
    assert call["n"] == 8 and call["num_views"] == 4 and call["cameras"].shape == (8, 4, 4)
    assert len(set(out.t.tolist())) == 1
    (out.loss).backward()
    torch.testing.assert_close(images.grad, (2 * want / 4).permute(0, 2, 3, 1), rtol=1e-5, atol=1e-6)


def test_csd_mvdream_timestep_schedule():
    """R2: min [0, 0.98, 0.02, 8000], max [0, 0.98, 0.50, 8000]; t = int(1000·p) inclusive, one draw per step."""
    cfg = get_preset("csd-mvdream").guidance

    def c(v0, v1, step):  # threestudio's C() for [0, v0, v1, 8000]
        return v0 + (v1 - v0) * max(min(1.0, step / 8000), 0.0)

    for step in (0, 1, 2000, 4000, 7999, 8000, 9999):
        assert timestep_range(cfg, step, 1000) == (int(1000 * c(0.98, 0.02, step)), int(1000 * c(0.98, 0.5, step)))
    guidance, _ = _guidance("csd-mvdream", {"a cat": torch.zeros(8, 3, 8, 8), "ugly": torch.zeros(8, 3, 8, 8)})
    t = guidance.sample_timesteps(8, 4000, torch.Generator().manual_seed(1))
    assert len(set(t.tolist())) == 1 and 500 <= t[0] <= 740


def test_sds_mvdream_reconstruction_by_hand():
    """threestudio-mvdream: ε̂ = ε_u + 50(ε_y − ε_u); x̂0 = (z_t − sqrt(1−ᾱ)ε̂)/sqrt(ᾱ), x̂0_y from ε_y; per object of
    4 views f = (std x̂0_y + 1e-8)/(std x̂0 + 1e-8); x̂0 ← 0.5·f·x̂0 + 0.5·x̂0; the gradient on z is (z − x̂0)/B."""
    gen = torch.Generator().manual_seed(2)
    eps_y, eps_u = torch.randn(8, 3, 8, 8, generator=gen), torch.randn(8, 3, 8, 8, generator=gen)
    guidance, prior = _guidance("sds-mvdream", {"a cat": eps_y, "ugly": eps_u})
    images = torch.rand(8, 8, 8, 3, generator=gen)
    noise = torch.randn(8, 3, 8, 8, generator=gen)
    t = torch.full((8,), 600)
    out = guidance(images, torch.zeros(8), torch.zeros(8), step=100, t=t, noise=noise,
                   c2w=torch.eye(4).expand(8, 4, 4), n_views=4)
    a = prior.alphas_cumprod[600]
    z = images.permute(0, 3, 1, 2) * 2 - 1
    z_t = a.sqrt() * z + (1 - a).sqrt() * noise
    eps_hat = eps_u + 50 * (eps_y - eps_u)
    x0 = (z_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    x0_y = (z_t - (1 - a).sqrt() * eps_y) / a.sqrt()
    want = torch.empty_like(x0)
    for obj in range(2):
        v = slice(4 * obj, 4 * obj + 4)
        f = (x0_y[v].std() + 1e-8) / (x0[v].std() + 1e-8)
        want[v] = z[v] - (0.5 * f * x0[v] + 0.5 * x0[v])
    torch.testing.assert_close(out.grad, want, rtol=1e-4, atol=1e-4)
    assert prior.calls[0]["num_views"] == 4


def test_guidance_refuses_broken_groups_and_missing_cameras():
    guidance, _ = _guidance("csd-mvdream", {"a cat": torch.zeros(6, 3, 8, 8), "ugly": torch.zeros(6, 3, 8, 8)})
    with pytest.raises(ValueError, match="whole objects of 4 views"):
        guidance(torch.rand(6, 8, 8, 3), torch.zeros(6), torch.zeros(6), 0, c2w=torch.eye(4).expand(6, 4, 4),
                 n_views=4)
    with pytest.raises(ValueError, match="multi-view prior needs the cameras"):
        guidance(torch.rand(4, 8, 8, 3), torch.zeros(4), torch.zeros(4), 0, n_views=4)


def test_l2_normalisation_is_unchanged_by_the_new_options():
    """grad_normalize_by l2 with scale 1 is the spec's g / (‖g‖ + 1e-8) over the whole batch tensor."""
    from csd_backend.guidance import normalize_direction

    g = torch.randn(3, 4, 5, 5)
    n = g.norm()
    assert torch.equal(normalize_direction(g, n, "l2", 1.0), g / (n + 1e-8))
    torch.testing.assert_close(normalize_direction(g, n, "l2", 0.9), 0.9 * g / (n + 1e-8) + 0.1 * g)
