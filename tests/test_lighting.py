"""Light sampling and soft shading (threestudio's ``light_sample_strategy: magic3d`` and the diffuse-with-point-light
material's ``soft_shading``, used by magic3d-refine-sd.yaml = preset sds-refine) against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from csd_backend.config import CameraConfig, RenderConfig
from csd_backend.errors import ConfigError
from csd_backend.render.cameras import magic3d_light, sample_cameras
from csd_backend.render.shading import shade, soft_shading_ratio
from engine_helpers import small_config

C30, S30 = math.sqrt(3) / 2, 0.5


# ------------------------------------------------------------------------------------------------ magic3d light
@pytest.mark.parametrize("position, azimuth, elevation, distance, want", [
    # camera on +x: z = (1, 0, 0), x = normalise(z_y, −z_x, 0) = (0, −1, 0), y = z × x = (0, 0, −1)
    ((2.0, 0.0, 0.0), 0.0, math.pi / 6, 1.0, (S30, -C30, 0.0)),  # 0.866·x + 0.5·z
    ((2.0, 0.0, 0.0), math.pi / 2, math.pi / 6, 1.0, (S30, 0.0, -C30)),  # 0.866·y + 0.5·z
    ((2.0, 0.0, 0.0), 0.0, math.pi / 2, 1.3, (1.3, 0.0, 0.0)),  # straight along the camera's direction
    # camera on −y: z = (0, −1, 0), x = (−1, 0, 0), y = z × x = (0, 0, −1)
    ((0.0, -1.5, 0.0), math.pi, math.pi / 3, 2.0, (2 * S30, -2 * C30, 0.0)),  # 2·(0.5·(−x) + 0.866·z)
    ((0.0, -1.5, 0.0), -math.pi / 2, math.pi / 6, 1.0, (0.0, -S30, C30)),  # −0.866·y + 0.5·z
])
def test_magic3d_light_in_the_cameras_frame(position, azimuth, elevation, distance, want):
    got = magic3d_light(torch.tensor([position]), torch.tensor([distance]), torch.tensor([azimuth]),
                        torch.tensor([elevation]))
    torch.testing.assert_close(got, torch.tensor([want]), rtol=0, atol=1e-6)


def test_magic3d_light_sampling_keeps_the_light_within_60_degrees_of_the_camera():
    cfg = CameraConfig(batch_size=512, light_sampling="magic3d", light_distance_range=[0.8, 1.5],
                       elevation_range=[-10.0, 45.0], camera_perturb=0.1)
    cams = sample_cameras(cfg, 10, torch.Generator().manual_seed(0))
    distance = cams.light_positions.norm(dim=-1)
    assert distance.min() >= 0.8 - 1e-5 and distance.max() <= 1.5 + 1e-5
    cos = F.cosine_similarity(cams.light_positions, cams.c2w[:, :3, 3], dim=-1)
    assert cos.min() >= 0.5 - 1e-5  # elevation ≥ 30° in the camera's frame: within 60° of its direction
    assert cos.max() > 0.99 and cos.min() < 0.55  # the whole [30°, 90°] band is used
    # dreamfusion's light (the default) spreads beyond 60°: jitter 1.0 around a camera ~1.75 away
    wide = sample_cameras(CameraConfig(batch_size=512, light_position_perturb=1.0, light_distance_range=[0.8, 1.5]),
                          10, torch.Generator().manual_seed(0))
    assert F.cosine_similarity(wide.light_positions, wide.c2w[:, :3, 3], dim=-1).min() < 0.3


def test_light_sampling_is_validated():
    with pytest.raises(ConfigError, match="camera.light_sampling"):
        small_config(camera={"light_sampling": "magic"}).validate(require_model=False)
    with pytest.raises(ConfigError, match="render.soft_shading|soft_shading"):
        small_config(render={"soft_shading": "yes"}).validate(require_model=False)


# -------------------------------------------------------------------------------------------------- soft shading
def _surface():
    """Three surface points with normal +z at the origin, lit from straight above, the side and 45°."""
    normal = torch.tensor([[0.0, 0.0, 1.0]] * 3)
    points = torch.zeros(3, 3)
    lights = torch.tensor([[0.0, 0.0, 2.0], [2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    albedo = torch.tensor([[0.2, 0.4, 0.8]] * 3)
    return albedo, normal, points, lights


def test_shading_with_an_ambient_ratio():
    albedo, normal, points, lights = _surface()
    cos = torch.tensor([[1.0], [0.0], [math.sqrt(0.5)]])
    cfg = RenderConfig(textureless_normal=False)  # ambient 0.1, diffuse 0.9
    torch.testing.assert_close(shade(cfg, "diffuse", albedo, normal, points, lights), albedo * (0.1 + 0.9 * cos))
    # threestudio's ambient_ratio a: ambient a, diffuse 1 − a
    torch.testing.assert_close(shade(cfg, "diffuse", albedo, normal, points, lights, 0.3), albedo * (0.3 + 0.7 * cos))
    torch.testing.assert_close(shade(cfg, "textureless", albedo, normal, points, lights, 0.3),
                               (0.3 + 0.7 * cos).expand(-1, 3))
    # renders without the light ignore it
    assert torch.equal(shade(cfg, "albedo", albedo, normal, points, lights, 0.3), albedo)
    normal_map = RenderConfig(textureless_normal=True)
    torch.testing.assert_close(shade(normal_map, "textureless", albedo, normal, points, lights, 0.3),
                               normal * 0.5 + 0.5)


def test_soft_shading_draws_one_ratio_per_lit_step():
    soft = RenderConfig(soft_shading=True, textureless_normal=False)
    d = float(torch.rand(1, generator=torch.Generator().manual_seed(7)))
    assert soft_shading_ratio(soft, "diffuse", torch.Generator().manual_seed(7)) == pytest.approx(1.0 - d)
    assert soft_shading_ratio(soft, "textureless", torch.Generator().manual_seed(7)) == pytest.approx(1.0 - d)
    g = torch.Generator().manual_seed(7)
    assert soft_shading_ratio(soft, "albedo", g) is None
    assert soft_shading_ratio(RenderConfig(soft_shading=True, textureless_normal=True), "textureless", g) is None
    assert soft_shading_ratio(RenderConfig(soft_shading=False), "diffuse", g) is None
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(7).get_state())  # no draw without a use


@pytest.mark.parametrize("kind", ["volume", "dmtet"])
def test_the_loop_lights_its_renders_with_the_drawn_ratio(kind, monkeypatch):
    """Each training step hands its drawn ratio to the renderer (both scene kinds); with ratio 1 a lit render is the
    albedo itself, with the configured ratio it is darker."""
    from csd_backend.optimize import Optimization
    from csd_backend.priors.analytic import AnalyticPrior

    render = {"soft_shading": True, "ambient_only_steps": 0, "albedo_prob": 0.0, "textureless_prob": 0.0,
              "textureless_normal": False}
    if kind == "volume":
        cfg, scene = small_config(steps=3, render=render), None
    else:
        from test_stage2 import blob_scene, stage2_config
        from csd_backend.convert.volume_to_dmtet import volume_to_dmtet

        cfg = stage2_config(steps=3, render=render)
        scene = volume_to_dmtet(blob_scene(), 32, 10.0)
    opt = Optimization(cfg, AnalyticPrior(resolution=16), scene=scene)
    seen, original = [], opt.renderer.render

    def spy(*args, **kwargs):
        seen.append(kwargs.get("ambient_ratio"))
        return original(*args, **kwargs)

    monkeypatch.setattr(opt.renderer, "render", spy)
    for _ in range(3):
        opt.train_step()
    assert len(seen) == 3 and all(r is not None and 0.0 <= r <= 1.0 for r in seen) and len(set(seen)) == 3

    from csd_backend.render.cameras import orbit_cameras

    cams = orbit_cameras(1, 15.0, 1.3 if kind == "dmtet" else 2.0, 45.0, 16, 16)
    with torch.no_grad():
        albedo = original(opt.scene, cams, "albedo", torch.zeros(1, 3)).rgb
        full = original(opt.scene, cams, "diffuse", torch.zeros(1, 3), ambient_ratio=1.0).rgb
        fixed = original(opt.scene, cams, "diffuse", torch.zeros(1, 3)).rgb
    torch.testing.assert_close(full, albedo, rtol=0, atol=1e-5)
    assert fixed.sum() < albedo.sum() - 1e-3
