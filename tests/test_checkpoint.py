"""Checkpoints: atomic, complete, and a resumed run continues exactly as an uninterrupted one."""
from __future__ import annotations

import pytest
import torch

from csd_backend import io
from csd_backend.errors import Cancelled, CheckpointError, OutputExistsError
from csd_backend.optimize import Optimization, load_scene
from csd_backend.priors.analytic import AnalyticPrior
from engine_helpers import small_config


def _cfg(steps=8, optim=None, **kw):
    return small_config("red", steps=steps, optim={"steps": steps, "lr": 3e-2, "checkpoint_every": 3,
                                                   "preview_every": 0, **(optim or {})},
                        render={"ambient_only_steps": 2, "grid_update_every": 2, "grid_warmup_steps": 3},
                        loss={"orient": 1.0, "sparsity": 0.5}, scene={"random_background_prob": 0.5}, **kw)


def _params(scene):
    return [p.detach().clone() for p in scene.state_dict().values()]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_resume_equals_uninterrupted(tmp_path):
    cfg = _cfg()
    full = Optimization(cfg, AnalyticPrior(16), out_dir=tmp_path / "full")
    full.run()
    # the same run cancelled after 5 steps, then resumed from its checkpoint in a new process-like object
    part = Optimization(cfg, AnalyticPrior(16), out_dir=tmp_path / "part")
    with pytest.raises(Cancelled, match="resume from"):
        part.run(cancel=lambda: part.step >= 5)
    assert (tmp_path / "part" / "checkpoints" / "last.ckpt").is_file()
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    resumed = Optimization.resume(tmp_path / "part", AnalyticPrior(16))
    assert resumed.step == 5
    # the restored state is bit-identical to the interrupted run's: weights, optimiser, grid and every RNG
    _assert_same(_params(part.scene), _params(resumed.scene))
    _assert_same([part.renderer.grid.occs, part.renderer.grid.binaries],
                 [resumed.renderer.grid.occs, resumed.renderer.grid.binaries])
    assert torch.equal(part.generator.get_state(), resumed.generator.get_state())
    sa, sb = part.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        _assert_same(list(sa["state"][k].values()), list(sb["state"][k].values()))
    rng_after_resume = torch.get_rng_state()
    resumed.run()
    assert resumed.step == 8
    # ... and it continues as the uninterrupted run did
    _assert_same(_params(full.scene), _params(resumed.scene))
    _assert_same([full.renderer.grid.occs], [resumed.renderer.grid.occs])
    assert not torch.equal(rng_after_resume, torch.manual_seed(1234).get_state())


def test_resume_with_stable_diffusion_prior(tmp_path, tiny_sd):
    from csd_backend.priors.stable_diffusion import load_stable_diffusion

    cfg = _cfg(steps=4, prior={"model": str(tiny_sd["folder"])}, camera={"height": 16, "width": 16, "batch_size": 1})
    prior = load_stable_diffusion(tiny_sd["folder"])
    full = Optimization(cfg, prior, out_dir=tmp_path / "a")
    full.run()
    part = Optimization(cfg, prior, out_dir=tmp_path / "b")
    with pytest.raises(Cancelled):
        part.run(cancel=lambda: part.step >= 2)
    torch.rand(100)  # the VAE samples from torch's global RNG, which must come back from the checkpoint
    resumed = Optimization.resume(tmp_path / "b", prior)
    resumed.run()
    _assert_same(_params(full.scene), _params(resumed.scene))


def test_checkpoint_contents_and_periodic_saves(tmp_path):
    cfg = _cfg(steps=7)
    opt = Optimization(cfg, AnalyticPrior(16), out_dir=tmp_path)
    steps_on_disk = []

    def on_step(info):
        ckpt = tmp_path / "checkpoints" / "last.ckpt"
        steps_on_disk.append(io.load_checkpoint(ckpt)["step"] if ckpt.exists() else None)

    opt.run(progress=on_step)
    assert steps_on_disk == [None, None, 3, 3, 3, 6, 6]  # every 3 steps; the final save follows the last step
    state = io.load_checkpoint(tmp_path)
    assert state["step"] == 7
    assert set(state) >= {"config", "scene", "renderer", "optimizer", "rng", "format", "version"}
    scene, config = load_scene(tmp_path)
    assert config.guidance.prompt == "red"
    _assert_same(_params(scene), _params(opt.scene))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # no leftovers of the atomic write


def test_interrupted_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(path, {"step": 1})

    def broken(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(path, broken, overwrite=True)
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_outputs_never_overwritten(tmp_path):
    p = tmp_path / "out.txt"
    io.atomic_write(p, lambda tmp: open(tmp, "w").write("a"))
    with pytest.raises(OutputExistsError, match="never overwritten"):
        io.atomic_write(p, lambda tmp: open(tmp, "w").write("b"))
    assert p.read_text() == "a"
    assert io.unique_path(tmp_path, "view", ".png").name == "view_00001.png"


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        io.load_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        io.load_checkpoint(tmp_path)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read"):
        io.load_checkpoint(bad)
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not a CSD run checkpoint"):
        io.load_checkpoint(other)


def test_same_seed_same_result_and_seed_matters():
    def train(seed):
        opt = Optimization(_cfg(steps=6, optim={"seed": seed}), AnalyticPrior(16))
        opt.run()
        return _params(opt.scene)

    a, b = train(3), train(3)
    _assert_same(a, b)  # bit-identical on a multi-threaded CPU: no order-dependent scatter anywhere in a step
    c = train(4)
    assert not torch.equal(a[0], c[0])


def test_out_of_memory_gives_the_fix_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    opt = Optimization(_cfg(steps=6), AnalyticPrior(16), out_dir=tmp_path)
    real_step = opt.train_step

    def step():
        if opt.step == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step()

    monkeypatch.setattr(opt, "train_step", step)
    with pytest.raises(Exception) as e:
        opt.run()
    msg = str(e.value)
    assert "out of memory at step 4" in msg and "batch_size" in msg and "num_samples_per_ray" in msg
    assert "last checkpoint is kept" in msg
    assert io.load_checkpoint(tmp_path)["step"] == 3


def test_a_failing_progress_callback_keeps_a_resumable_checkpoint(tmp_path):
    opt = Optimization(_cfg(steps=6), AnalyticPrior(16), out_dir=tmp_path)

    def progress(info):
        if info.step == 2:
            raise RuntimeError("host interrupted")

    with pytest.raises(RuntimeError, match="host interrupted"):
        opt.run(progress=progress)
    assert io.load_checkpoint(tmp_path)["step"] == 2


def test_ctrl_c_mid_step_saves_a_clean_state_and_resumes_identically(tmp_path, monkeypatch):
    cfg = _cfg(steps=7)
    full = Optimization(cfg, AnalyticPrior(16))
    full.run()
    part = Optimization(cfg, AnalyticPrior(16), out_dir=tmp_path)
    real_guidance = part.guidance.__call__.__func__

    def interrupted(self, *args, **kwargs):
        if part.step == 4:
            raise KeyboardInterrupt  # after the camera, shading and sample draws of step 5
        return real_guidance(self, *args, **kwargs)

    monkeypatch.setattr(type(part.guidance), "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        part.run()
    monkeypatch.undo()
    assert io.load_checkpoint(tmp_path)["step"] == 4
    resumed = Optimization.resume(tmp_path, AnalyticPrior(16))
    resumed.run()
    _assert_same(_params(full.scene), _params(resumed.scene))


def test_resume_refuses_fewer_steps_or_another_prior(tmp_path):
    from csd_backend.errors import ConfigError
    from csd_backend.priors.base import DiffusionPrior

    opt = Optimization(_cfg(steps=4), AnalyticPrior(16), out_dir=tmp_path)
    opt.run()
    with pytest.raises(ConfigError, match="already done 4 steps"):
        Optimization.resume(tmp_path, AnalyticPrior(16), steps=2)
    other = AnalyticPrior(16)
    other.name = "stable-diffusion"
    with pytest.raises(CheckpointError, match="trained with a 'analytic' prior"):
        Optimization.resume(tmp_path, other)
    assert isinstance(other, DiffusionPrior)
