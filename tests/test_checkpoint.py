"""Checkpoints: atomic, complete, and a resumed run continues exactly as an uninterrupted one."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from csd_backend import io
from csd_backend.errors import Cancelled, CheckpointError, EmptySceneError, OutputExistsError
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


def test_a_vanished_object_stops_the_run_with_the_fix_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """A volume whose density underflows to 0 everywhere (a collapsed run) renders no sample, so nothing gets a
    gradient: a clear error, not torch's "element 0 of tensors does not require grad" from inside backward."""
    opt = Optimization(_cfg(steps=8), AnalyticPrior(16), out_dir=tmp_path)

    def collapse_after_step_4(info):
        if info.step == 4:  # softplus(raw + bias) is exactly 0 in float32 below ≈ -104
            monkeypatch.setattr(opt.scene.volume, "density_bias", lambda p: torch.full(p.shape[:-1], -1000.0))

    with pytest.raises(EmptySceneError) as e:
        opt.run(progress=collapse_after_step_4)
    msg = str(e.value)
    assert "vanished at step 4" in msg and "optim.seed" in msg and "loss.sparsity" in msg
    assert "last checkpoint is kept" in msg and str(tmp_path) in msg
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


@pytest.mark.parametrize("where", ["after_update", "between_steps"])
def test_ctrl_c_after_a_step_or_between_steps_saves_that_step_and_resumes_identically(tmp_path, monkeypatch, where):
    """A signal lands wherever the interpreter is: right after a step's update (before train_step returns) or in the
    loop between two steps. Both keep the complete step (before: the first saved the updated weights with the
    step's start RNGs, the second saved nothing)."""
    cfg = _cfg(steps=7)
    full = Optimization(cfg, AnalyticPrior(16))
    full.run()
    part = Optimization(cfg, AnalyticPrior(16), out_dir=tmp_path)
    if where == "after_update":
        real_tick = part._tick

        def tick(name, t0):
            if name == "densify" and part.step == 5:
                raise KeyboardInterrupt
            return real_tick(name, t0)

        monkeypatch.setattr(part, "_tick", tick)
        run = part.run
    else:
        def run():
            part.run(cancel=lambda: (_ for _ in ()).throw(KeyboardInterrupt) if part.step == 5 else False)

    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()
    assert io.load_checkpoint(tmp_path)["step"] == 5
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


# ------------------------------------------------------------------ checksums, rotation, file modes
def _small_run(folder, steps=2):
    opt = Optimization(_cfg(steps=steps, optim={"checkpoint_every": 1}), AnalyticPrior(16), out_dir=folder)
    opt.run()
    return opt


def _overwrite_middle(path, n=16):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes((b ^ 0xA5) for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def test_corrupted_checkpoint_is_refused_and_names_the_previous_one(tmp_path):
    _small_run(tmp_path, steps=3)  # checkpoints at steps 1, 2, 3: last = 3, previous = 2
    last = tmp_path / "checkpoints" / "last.ckpt"
    prev = tmp_path / "checkpoints" / "previous.ckpt"
    assert io.load_checkpoint(last)["step"] == 3 and io.load_checkpoint(prev)["step"] == 2
    assert io.load_checkpoint(last)["version"] == 2
    _overwrite_middle(last)
    with pytest.raises(CheckpointError) as e:
        io.load_checkpoint(tmp_path)
    msg = str(e.value)
    assert "damaged" in msg and "checksum" in msg
    assert f"python -m csd_backend generate --resume {prev}" in msg
    with pytest.raises(CheckpointError, match="damaged"):
        Optimization.resume(tmp_path, AnalyticPrior(16))
    # resume from previous.ckpt: the damaged last.ckpt is replaced, the good previous one is never replaced by it
    resumed = Optimization.resume(prev, AnalyticPrior(16), steps=4)
    assert resumed.step == 2 and resumed.out_dir == tmp_path
    resumed.save_checkpoint()
    assert io.load_checkpoint(prev)["step"] == 2
    resumed.run()
    assert io.load_checkpoint(last)["step"] == 4 and io.load_checkpoint(prev)["step"] == 3


def test_every_overwrite_of_16_bytes_inside_the_tensors_is_caught(tmp_path):
    path = tmp_path / "c.ckpt"
    io.save_checkpoint(path, {"step": 1, "scene": {"w": torch.arange(20000, dtype=torch.float32)}})
    good = path.read_bytes()
    for frac in (0.3, 0.5, 0.7):
        data = bytearray(good)
        at = int(len(data) * frac)
        data[at:at + 16] = b"\x00" * 16 if data[at:at + 16] != b"\x00" * 16 else b"\x01" * 16
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="damaged"):
            io.load_checkpoint(path)


def test_a_bad_write_never_replaces_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(path, {"step": 1, "w": torch.ones(5000)})
    real_save = torch.save

    def flaky_save(obj, f, *a, **kw):  # the bytes on disk differ from what was meant (disk or memory error)
        real_save(obj, f, *a, **kw)
        _overwrite_middle(Path(f))

    monkeypatch.setattr(io.torch, "save", flaky_save)
    with pytest.raises(CheckpointError, match="did not read back identically|could not be read back"):
        io.save_checkpoint(path, {"step": 2, "w": torch.zeros(5000)})
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp files, nothing rotated


def test_old_checkpoints_without_a_digest_still_load(tmp_path):
    opt = _small_run(tmp_path / "new")
    old = tmp_path / "old.ckpt"
    torch.save({"format": io.CHECKPOINT_FORMAT, "version": 1, **opt.state_dict()}, old)
    assert io.load_checkpoint(old)["step"] == 2
    resumed = Optimization.resume(old, AnalyticPrior(16), out_dir=tmp_path / "cont", steps=3)
    resumed.run()
    assert io.load_checkpoint(tmp_path / "cont")["version"] == io.CHECKPOINT_VERSION
    # a version-2 file whose digest was stripped is refused
    state = torch.load(tmp_path / "new" / "checkpoints" / "last.ckpt", weights_only=True)
    del state["digest"]
    torch.save(state, old)
    with pytest.raises(CheckpointError, match="no content checksum"):
        io.load_checkpoint(old)


def test_pickled_python_objects_are_refused_without_torchs_advice(tmp_path):
    import argparse

    path = tmp_path / "evil.ckpt"
    torch.save({"format": io.CHECKPOINT_FORMAT, "version": 2, "ns": argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointError) as e:
        io.load_checkpoint(path)
    msg = str(e.value)
    assert "argparse.Namespace" in msg and "refused" in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg
    assert "add_safe_globals" not in msg and "\x1b" not in msg
    try:
        torch.load(path, weights_only=True)
    except Exception as exc:  # the shared helper, as the model loader uses it
        text = io.describe_unsafe_pickle(path, exc, what="model checkpoint")
        assert text.startswith(f"{path} is not a plain-tensor model checkpoint") and "False" not in text
    assert io.describe_unsafe_pickle(path, RuntimeError("disk full")) is None
    # a damaged pickle stream is called damaged, again without the advice
    bad = tmp_path / "damaged.ckpt"
    torch.save({"t": torch.arange(10.0)}, bad)
    data = bytearray(bad.read_bytes())
    data[60:76] = b"\xff" * 16
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        io.load_checkpoint(bad)
    assert "weights_only" not in str(e.value) and "damaged" in str(e.value)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    import os
    import stat

    old = os.umask(umask)
    try:
        assert io.current_umask() == umask
        p = io.atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("a"))
        ck = io.save_checkpoint(tmp_path / "last.ckpt", {"step": 1})
        js = io.write_json(tmp_path / "c.json", {"a": 1})
    finally:
        os.umask(old)
    for path in (p, ck, js):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_write_json_is_strict(tmp_path):
    from csd_backend.errors import CSDError

    with pytest.raises(CSDError, match=r"prior.resolution is not a finite number"):
        io.write_json(tmp_path / "c.json", {"prior": {"resolution": float("inf")}})
    assert not (tmp_path / "c.json").exists()
