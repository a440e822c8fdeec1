"""Render-size phases (threestudio's ``resolution_milestones``): ProlificDreamer trains at 64² until step 5000, then
at 512². The size of each step, its stretching with the run, validation, the run's renders and resume across the
switch."""
from __future__ import annotations

import pytest
import torch

from csd_backend.config import CameraConfig
from csd_backend.errors import ConfigError
from csd_backend.optimize import Optimization
from csd_backend.presets import get_preset
from csd_backend.priors.analytic import AnalyticPrior
from csd_backend.render.cameras import sample_cameras

from engine_helpers import small_config


def test_size_switches_at_the_milestone_as_threestudio():
    """threestudio: size_ind = bisect_right([-1] + milestones, step) - 1, so step 4999 is 64² and 5000 is 512²."""
    cfg = CameraConfig(height=[64, 512], width=[64, 256], batch_size=[4, 1], resolution_milestones=[5000])
    assert cfg.size_at(0) == cfg.size_at(4999) == (4, 64, 64)
    assert cfg.size_at(5000) == cfg.size_at(10**6) == (1, 512, 256)
    assert cfg.sizes() == [(4, 64, 64), (1, 512, 256)]
    g = torch.Generator().manual_seed(0)
    before, after = sample_cameras(cfg, 4999, g), sample_cameras(cfg, 5000, g)
    assert (len(before), before.height, before.width) == (4, 64, 64)
    assert (len(after), after.height, after.width) == (1, 512, 256)
    one = CameraConfig(height=32, width=[16, 48], resolution_milestones=[3, 7], batch_size=2)
    with pytest.raises(ConfigError, match="camera.width"):
        small_config().replace(camera=vars(one)).validate(require_model=False)  # 3 phases, 2 widths
    assert CameraConfig(height=32, width=24).sizes() == [(4, 32, 24)]  # numbers: one phase


def test_milestones_stretch_with_the_run():
    cfg = get_preset("vsd-prolificdreamer")
    assert (cfg.camera.height, cfg.camera.width, cfg.camera.resolution_milestones) == ([64, 512], [64, 512], [5000])
    assert cfg.with_steps(2500).camera.resolution_milestones == [500]
    assert cfg.with_steps(2500, rescale_schedules=False).camera.resolution_milestones == [5000]
    assert get_preset("vsd-preview-cpu").camera.sizes() == [(1, 64, 64)]  # the CPU preview stays at 64²


@pytest.mark.parametrize("camera,field", [
    ({"height": [64, 512]}, "camera.height"),  # two heights, one phase
    ({"resolution_milestones": [50, 50], "height": [8, 16, 24]}, "camera.resolution_milestones"),
    ({"resolution_milestones": [-1]}, "camera.resolution_milestones"),
    ({"resolution_milestones": [5], "batch_size": [1, 0]}, "camera.batch_size"),
    ({"resolution_milestones": [5], "width": [16, 5000]}, "camera.width"),
])
def test_bad_phases_name_the_field(camera, field):
    with pytest.raises(ConfigError) as info:
        small_config(camera=camera).validate(require_model=False)
    assert info.value.field == field


def test_every_phase_size_is_checked_before_the_run():
    """A size the prior cannot take in a later phase fails at the start, not at the milestone hours later."""
    prior = AnalyticPrior(resolution=16)
    calls = []
    original = prior.input_size

    def input_size(h, w):
        calls.append((h, w))
        if h > 32:
            raise ConfigError("render size", f"{h}x{w} is too big for this test prior")
        return original(h, w)

    prior.input_size = input_size
    cfg = small_config(steps=6, camera={"height": [16, 48], "width": [16, 48], "resolution_milestones": [3]})
    with pytest.raises(ConfigError, match="48x48"):
        Optimization(cfg, prior)
    assert (48, 48) in calls


def _phased(steps=6, **optim):
    return small_config(steps=steps, camera={"height": [16, 24], "width": [16, 20], "batch_size": [2, 1],
                                             "resolution_milestones": [3]}, optim=optim)


def test_a_run_renders_each_phase_at_its_size():
    sizes = []
    opt = Optimization(_phased(), AnalyticPrior(resolution=16))
    opt.run(progress=lambda info: sizes.append(tuple(info.preview.shape[1:3])))
    assert sizes == [(16, 16)] * 3 + [(24, 20)] * 3


def test_resume_across_the_milestone_equals_an_uninterrupted_run(tmp_path):
    prior = AnalyticPrior(resolution=16)
    full = Optimization(_phased(checkpoint_every=2), prior, out_dir=tmp_path / "full")
    full.run()
    part = Optimization(_phased(steps=2, checkpoint_every=2), prior, out_dir=tmp_path / "part")
    part.run()  # stops in the first phase; the resumed run crosses the milestone
    resumed = Optimization.resume(tmp_path / "part", prior, steps=6)
    assert resumed.config.camera.resolution_milestones == [3]
    resumed.run()
    a, b = full.scene.state_dict(), resumed.scene.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
