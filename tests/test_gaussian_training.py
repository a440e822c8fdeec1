"""Gaussian splats in the optimisation loop: adaptive density control (clone, split, prune, opacity reset, the cap),
per-parameter learning rates with the position decay, checkpoints of a changing number of Gaussians that resume
bit-identically, NaN parameters, and convergence with the analytic prior."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from csd_backend.errors import Cancelled, CSDError
from csd_backend.gaussian_config import position_lr
from csd_backend.optimize import Optimization, load_scene, scene_optimizer
from csd_backend.priors.analytic import AnalyticPrior
from csd_backend.render.cameras import orbit_cameras
from csd_backend.render.gaussian_renderer import GaussianRenderer
from csd_backend.render.views import render_cameras_with_opacity
from csd_backend.scene.gaussian_density import densify_and_prune, reset_opacity
from engine_helpers import small_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gaussian_run(steps=12, **gaussians):
    g = {"num_points": 150, "densify_every": 4, "densify_grad_threshold": 0.0, "tile_size": 8, **gaussians}
    return small_config("red", steps=steps, scene={"kind": "gaussians", "gaussians": g},
                        camera={"height": 16, "width": 16, "batch_size": 2})


def fake_stats(renderer, grads):
    n = grads.shape[0]
    renderer.grad_sum, renderer.grad_count, renderer.max_radius = grads.clone(), torch.ones(n), torch.zeros(n)


def test_clone_split_prune_as_3dgs():
    opt = Optimization(gaussian_run(opacity_reset_every=0), AnalyticPrior(16))
    scene, renderer, g = opt.scene, opt.renderer, opt.scene.cfg.gaussians
    with torch.no_grad():
        scene.means.data = scene.means.data[:4].clone()
        for name in ("sh_dc", "sh_rest", "opacity_logits", "log_scales", "quaternions"):
            getattr(scene, name).data = getattr(scene, name).data[:4].clone()
        scene.log_scales.data = torch.log(torch.tensor([[0.01] * 3, [0.2, 0.05, 0.05], [0.01] * 3, [0.5, 0.1, 0.1]]))
        scene.opacity_logits.data = torch.tensor([0.0, 0.0, -6.0, 0.0])  # the third is nearly transparent
    opt.optimizer = scene_optimizer(scene, opt.config.optim)
    fake_stats(renderer, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    before = {n: p.detach().clone() for n, p in scene.gaussian_parameters().items()}
    g.densify_grad_threshold = 0.5
    counts = densify_and_prune(renderer, 4, scene, opt.optimizer, torch.Generator().manual_seed(0))
    # 0: small and hot → cloned; 1: large (0.2 > 0.01·4) and hot → split in 2 with scales / 1.6, parent removed;
    # 2: opacity sigmoid(−6) < 0.01 → pruned; 3: 0.5 > 0.1·4 world size → pruned
    assert counts == {"cloned": 1, "split": 1, "pruned": 2, "gaussians": 4}
    assert torch.equal(scene.means[0], before["means"][0]) and torch.equal(scene.means[1], before["means"][0])
    assert torch.allclose(scene.scales()[2:], (torch.tensor([0.2, 0.05, 0.05]) / 1.6).expand(2, 3))
    assert torch.equal(scene.sh_dc[2:], before["sh_dc"][1].expand(2, 3))
    assert renderer.grad_sum.shape == (4,) and not renderer.grad_sum.any()
    for p in scene.gaussian_parameters().values():  # the optimiser follows the new rows
        assert opt.optimizer.state.get(p, {}).get("exp_avg", torch.zeros_like(p)).shape == p.shape


def test_optimizer_moments_follow_the_surviving_rows_and_opacity_reset():
    opt = Optimization(gaussian_run(), AnalyticPrior(16))
    opt.train_step()
    scene = opt.scene
    n = scene.num_gaussians
    exp_avg = opt.optimizer.state[scene.means]["exp_avg"].clone()
    fake_stats(opt.renderer, torch.zeros(n))
    scene.cfg.gaussians.densify_grad_threshold = 1.0  # nothing densifies
    with torch.no_grad():
        scene.opacity_logits.data[:5] = -10.0  # pruned
    densify_and_prune(opt.renderer, 4, scene, opt.optimizer, torch.Generator())
    assert scene.num_gaussians == n - 5 and torch.equal(opt.optimizer.state[scene.means]["exp_avg"], exp_avg[5:])
    reset_opacity(scene, opt.optimizer, 0.01)
    assert float(scene.opacities().detach().max()) <= 0.01 + 1e-6
    assert not opt.optimizer.state[scene.opacity_logits]["exp_avg"].any()


def test_per_parameter_rates_and_the_position_decay():
    opt = Optimization(gaussian_run(steps=6), AnalyticPrior(16))
    lrs = {grp["name"]: grp["lr"] for grp in opt.optimizer.param_groups}
    assert lrs == {"means": pytest.approx(1e-2), "sh_dc": 0.01, "sh_rest": 0.0005, "opacity_logits": 0.05,
                   "log_scales": 0.005, "quaternions": 0.005}
    opt.run()
    g = opt.scene.cfg.gaussians
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(position_lr(g, 6))


def test_density_grows_and_the_cap_holds_with_a_warning(caplog):
    opt = Optimization(gaussian_run(steps=12, max_gaussians=200), AnalyticPrior(16))
    with caplog.at_level(logging.WARNING, logger="csd_backend"):
        opt.run()
    assert opt.scene.num_gaussians <= 200
    warnings = [r.getMessage() for r in caplog.records if "max_gaussians" in r.getMessage()]
    assert len(warnings) == 1 and "raise scene.gaussians.max_gaussians" in warnings[0]


def test_resume_is_bit_identical_across_densification(tmp_path):
    cfg = gaussian_run(steps=13).replace(optim={"checkpoint_every": 0})
    full = Optimization(cfg, AnalyticPrior(16), out_dir=tmp_path / "full")
    full.run()
    part = Optimization(cfg, AnalyticPrior(16), out_dir=tmp_path / "part")
    with pytest.raises(Cancelled):
        part.run(cancel=lambda: part.step >= 6)  # mid-way between densifications (every 4 steps)
    torch.manual_seed(99)
    resumed = Optimization.resume(tmp_path / "part", AnalyticPrior(16))
    assert resumed.step == 6 and resumed.scene.num_gaussians == part.scene.num_gaussians != 150
    resumed.run()
    assert full.scene.num_gaussians == resumed.scene.num_gaussians
    for a, b in zip(full.scene.state_dict().values(), resumed.scene.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.renderer.state_dict().values(), resumed.renderer.state_dict().values()):
        assert torch.equal(a, b)
    scene, config = load_scene(tmp_path / "full")
    assert scene.kind == "gaussians" and scene.num_gaussians == full.scene.num_gaussians


def test_nan_parameters_stop_the_run_naming_the_learning_rate(tmp_path):
    opt = Optimization(gaussian_run(steps=4), AnalyticPrior(16), out_dir=tmp_path)
    opt.train_step()
    with torch.no_grad():
        opt.scene.log_scales.data[3] = float("nan")
    with pytest.raises(CSDError, match="log_scales became NaN.*scene.gaussians.scaling_lr"):
        opt.renderer.after_update(2, opt.scene, opt.optimizer, None, opt.generator)


def test_csd_turns_the_splats_red():
    cfg = gaussian_run(steps=40, densify_every=10, densify_grad_threshold=0.0002, feature_lr=0.05)
    cfg = cfg.replace(guidance={"prompt": "red"}, scene={"background_color": [0.5, 0.5, 0.5]})
    opt = Optimization(cfg, AnalyticPrior(16))
    cams = orbit_cameras(4, 15.0, 1.6, 50.0, 32, 32)

    def colour():
        img, op = render_cameras_with_opacity(opt.scene, cams, background=torch.zeros(3))
        return img.sum((0, 1, 2)) / op.sum()

    before = colour()
    opt.run()
    after = colour()
    assert after[0] - after[1:].max() > before[0] - before[1:].max() + 0.2, (before, after)
    assert isinstance(opt.renderer, GaussianRenderer) and math.isfinite(float(after.sum()))
