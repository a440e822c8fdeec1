"""The ``compiled`` backends (issue 12 item 2) against the torch reference on the CPU, where torch.compile runs
too: the hash-grid encoding (forward, gradients, second-order gradients through analytic normals, varying point
counts without recompiling, the progressive band), the packed compositing (including empty rays), a few training
steps, backend selection and its errors; and the loop's host-sync-free mode (the deferred non-finite-loss check).

Compiling takes seconds on this CPU: one small encoding config is shared by the module, and inductor compiles in
this process (``compile_threads = 1``: on 2 cores a worker pool costs more than it saves). CUDA variants of the
parity checks are in tests/test_cuda_parity.py.
"""
from __future__ import annotations

import logging

import pytest
import torch

from csd_backend.config import RenderConfig, SceneConfig
from csd_backend.errors import ConfigError, CSDError
from csd_backend.optimize import Optimization
from csd_backend.priors.analytic import AnalyticPrior
from csd_backend.render import volume_renderer as vr
from csd_backend.render.cameras import get_rays, orbit_cameras
from csd_backend import compiling
from csd_backend.scene import backends
from csd_backend.scene.backends import CompiledHashGridEncoding
from csd_backend.scene.encoding import HashGridEncoding
from csd_backend.scene.volume import Scene
from engine_helpers import small_config

# two levels: a dense one (res 5) and a hashed one (res 17 > 2^10 entries); the run tests use the same layout, so
# every test of this module shares the compiled graphs
LEVELS = dict(n_levels=2, log2_hashmap_size=10, base_resolution=5, max_resolution=17)
ENC_ARGS = (2, 2, 10, 5, SceneConfig(**LEVELS).level_scale())
RTOL, ATOL = 1e-5, 1e-6


def graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module", autouse=True)
def compile_in_process(one_torch_thread):
    import torch._inductor.config as inductor_config

    before = inductor_config.compile_threads
    inductor_config.compile_threads = 1
    yield
    inductor_config.compile_threads = before


@pytest.fixture(scope="module")
def encodings():
    torch.manual_seed(0)
    ref = HashGridEncoding(*ENC_ARGS)
    with torch.no_grad():
        ref.params.normal_(0, 0.1)  # away from the tiny initialisation, so gradients w.r.t. the points matter
    comp = CompiledHashGridEncoding(*ENC_ARGS)
    comp.load_state_dict(ref.state_dict())
    assert ref.hashed == [False, True]
    return ref, comp


def _encode(enc, x, normals: bool):
    """Features, parameter gradient and point gradient of a loss that, with ``normals``, includes the squared
    gradient of the features w.r.t. the points (second order, as analytic normals in a training step)."""
    enc.params.grad = None
    x = x.clone().requires_grad_(normals)
    y = enc(x)
    loss = (y * torch.linspace(-1, 2, y.shape[1])).sin().sum()
    if normals:
        gx = torch.autograd.grad(y.square().sum(), x, create_graph=True)[0]
        loss = loss + gx.square().sum()
    loss.backward()
    return y.detach(), enc.params.grad.clone()


def _close(a, b, what):
    torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL * max(1.0, a.abs().max().item()), msg=what)


def test_encoding_matches_reference_forward_gradients_and_second_order(encodings):
    ref, comp = encodings
    torch.manual_seed(1)
    for i, n in enumerate((1000, 777, 1500)):
        x = torch.rand(n, 3)
        for normals in (False, True):
            a, b = _encode(ref, x, normals), _encode(comp, x, normals)
            _close(a[0], b[0], f"features, {n} points")
            _close(a[1], b[1], f"parameter gradient, {n} points, normals={normals}")
        with torch.no_grad():
            _close(ref(x), comp(x), f"no-grad features, {n} points")
        if i == 0:
            compiled_after_first = graphs()  # training, training with the Jacobian, and no-grad graphs
    assert graphs() == compiled_after_first, "a new number of points recompiled the encoding"
    assert comp(torch.rand(1, 3)).shape == (1, 4) and comp(torch.rand(0, 3)).shape == (0, 4)  # the reference


def test_encoding_progressive_band_masks_without_recompiling(encodings):
    ref, comp = encodings
    x = torch.rand(600, 3)
    _encode(comp, x, True)
    before = graphs()
    try:
        for enc in (ref, comp):
            enc.set_active_levels(1)
        a, b = _encode(ref, x, True), _encode(comp, x, True)
        assert torch.equal(b[0][:, 2:], torch.zeros_like(b[0][:, 2:]))  # the inactive level outputs zeros ...
        hashed = slice(comp.offsets[1] * 2, None)
        assert torch.equal(b[1][hashed], torch.zeros_like(b[1][hashed]))  # ... and gets no gradient
        _close(a[0], b[0], "features with one active level")
        _close(a[1], b[1], "gradients with one active level")
    finally:
        for enc in (ref, comp):
            enc.set_active_levels(2)
    assert graphs() == before


def test_compiled_encoding_shares_the_reference_state_dict(encodings):
    ref, comp = encodings
    assert list(comp.state_dict()) == list(ref.state_dict()) == ["params"]
    other = HashGridEncoding(*ENC_ARGS)
    other.load_state_dict(comp.state_dict())  # a compiled-trained checkpoint loads into torch, and back
    assert torch.equal(other.params, ref.params)


def _packed_rays(n_rays: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 9, (n_rays,), generator=g)
    counts[::5] = 0  # empty rays, including the first
    ray_idx = torch.repeat_interleave(torch.arange(n_rays), counts)
    n = ray_idx.shape[0]
    sigma = torch.rand(n, generator=g) * 20
    dt = torch.rand(n, generator=g) * 0.05 + 0.01
    values = (torch.rand(n, 3, generator=g), torch.rand(n, 1, generator=g), torch.randn(n, 3, generator=g))
    return sigma, dt, ray_idx, values


def _composite(compositor, sigma, dt, ray_idx, values, n_rays):
    sigma = sigma.clone().requires_grad_(True)
    values = tuple(v.clone().requires_grad_(True) for v in values)
    weights, acc = compositor.composite(sigma, dt, ray_idx, values, n_rays)
    w = torch.linspace(0.5, 1.5, acc.shape[1])
    ((acc * w).sin().sum() + weights.square().sum()).backward()
    return [weights.detach(), acc.detach(), sigma.grad] + [v.grad for v in values]


def test_compositing_matches_reference_with_empty_rays_and_varying_sizes():
    torch_c, comp_c = vr.Compositor("torch"), vr.Compositor("compiled")
    for i, n_rays in enumerate((300, 211, 450)):
        sigma, dt, ray_idx, values = _packed_rays(n_rays, i)
        a = _composite(torch_c, sigma, dt, ray_idx, values, n_rays)
        b = _composite(comp_c, sigma, dt, ray_idx, values, n_rays)
        for name, x, y in zip(("weights", "sums", "sigma grad", "colour grad", "depth grad", "normal grad"), a, b):
            _close(x, y, f"{name}, {n_rays} rays")
        assert torch.equal(b[1][::5], torch.zeros_like(b[1][::5]))  # empty rays sum to exactly zero
        with torch.no_grad():
            for x, y in zip(torch_c.march_weights(sigma, dt, ray_idx), comp_c.march_weights(sigma, dt, ray_idx)):
                _close(x, y, "transmittance / alpha of the pruning pass")
        if i == 0:
            compiled_after_first = graphs()
    assert graphs() == compiled_after_first, "a new number of samples or rays recompiled the compositing"


def test_sync_free_accumulate_and_exclusive_sum_match_hand_values():
    rays = torch.tensor([1, 1, 3, 3, 3])  # rays 0, 2 and 4 are empty
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert vr.exclusive_sum_packed(x, rays).tolist() == [0.0, 1.0, 0.0, 3.0, 7.0]
    assert vr.accumulate(x.unsqueeze(-1), rays, 5)[:, 0].tolist() == [0.0, 3.0, 0.0, 12.0, 0.0]


def test_renderer_with_compiled_backends_matches_torch():
    torch.manual_seed(0)
    scenes = {}
    for backend in ("torch", "compiled"):
        torch.manual_seed(0)
        scenes[backend] = Scene(SceneConfig(radius=1.0, **LEVELS, background="solid", encoding_backend=backend))
    assert type(scenes["compiled"].volume.encoding) is CompiledHashGridEncoding
    scenes["compiled"].load_state_dict(scenes["torch"].state_dict())
    o, d = get_rays(orbit_cameras(2, 15.0, 2.0, 60.0, 16, 16))
    results = {}
    for backend, scene in scenes.items():
        r = vr.VolumeRenderer(RenderConfig(num_samples_per_ray=64, backend=backend), 1.0).train()
        assert r.compositor.backend == backend
        r.grid.update(0, scene.volume.density, r.step_size, torch.Generator().manual_seed(0))
        out = r(scene.volume, scene.background, o, d, "textureless", need_normals=True,
                generator=torch.Generator().manual_seed(1))
        (out.rgb.square().sum() + out.depth.sum()).backward()
        results[backend] = (out.rgb.detach(), out.depth.detach(), out.num_samples,
                            scene.volume.encoding.params.grad, scene.volume.density_mlp[0].weight.grad)
    a, b = results["torch"], results["compiled"]
    assert a[2] == b[2] and a[2] > 100
    for name, x, y in zip(("rgb", "depth", "", "encoding grad", "density MLP grad"), a, b):
        if name:
            _close(x, y, name)


def _run_config(steps, **render):
    # orient > 0: analytic normals every step (the Jacobian graph, as the renderer test: no further compile)
    return small_config("red", steps=steps, scene={**LEVELS}, render={"grid_update_every": 2, **render},
                        loss={"orient": 1.0}, optim={"steps": steps, "lr": 1e-2, "checkpoint_every": 0,
                                                     "preview_every": 0})


def test_training_steps_with_compiled_backends_match_torch():
    params = {}
    for backend in ("torch", "compiled"):
        compiling.compile_problem.cache_clear()  # the trial compile runs while the scene is built: same weights
        cfg = _run_config(3, backend=backend).replace(scene={"encoding_backend": backend})
        opt = Optimization(cfg, AnalyticPrior(16))
        assert opt.renderer.compositor.backend == backend
        opt.run()
        params[backend] = opt.scene.state_dict()
    assert type(opt.scene.volume.encoding) is CompiledHashGridEncoding
    for k, v in params["torch"].items():
        torch.testing.assert_close(params["compiled"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_trial_compile_leaves_the_seeded_generators_alone():
    """The first trial compile happens while a run builds its scene: a random draw there would give the same seed
    other initial weights with ``compiled`` than with ``torch``."""
    compiling.compile_problem.cache_clear()
    state = torch.get_rng_state()
    assert compiling.compile_problem("cpu") is None
    assert torch.equal(torch.get_rng_state(), state)


def test_backend_selection_and_errors(monkeypatch, caplog):
    assert compiling.resolve_compiled_backend("render.backend", "auto", "cpu") == "torch"  # CPU: auto is torch
    assert compiling.resolve_compiled_backend("render.backend", "compiled", "cpu") == "compiled"
    assert type(Scene(SceneConfig(**LEVELS)).volume.encoding) is HashGridEncoding
    with pytest.raises(ConfigError, match="render.backend"):
        _run_config(2, backend="triton").validate()
    _run_config(2).replace(scene={"encoding_backend": "compiled"}).validate()
    # CUDA without tinycudann and without a working compile: auto falls back to torch with one warning ...
    with caplog.at_level(logging.WARNING, logger="csd_backend.compiling"):
        enc = backends.make_hash_grid(*ENC_ARGS, backend="auto", device="cuda:0")
        backends.make_hash_grid(*ENC_ARGS, backend="auto", device="cuda:0")
    assert type(enc) is HashGridEncoding
    warnings = [r for r in caplog.records if "torch.compile does not work" in r.getMessage()]
    assert len(warnings) == 1 and "CUDA is not available" in warnings[0].getMessage()
    # ... and an explicit compiled is refused naming the field, the cause and the fix
    with pytest.raises(ConfigError, match="CUDA is not available") as e:
        backends.make_hash_grid(*ENC_ARGS, backend="compiled", device="cuda:0")
    assert e.value.field == "scene.encoding_backend" and "'torch'" in str(e.value)
    monkeypatch.setattr(compiling, "compile_problem", lambda device: "BackendCompilerFailed: no C++ compiler")
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler") as e:
        vr.VolumeRenderer(RenderConfig(backend="compiled"), 1.0)
    assert e.value.field == "render.backend"


# --------------------------------------------------------------------------------- the host-sync-free loop
class _NaNAt:
    """The guidance, with a non-finite loss from step ``step`` on."""

    def __init__(self, guidance, opt, step):
        self._g, self._opt, self._step = guidance, opt, step

    def __call__(self, *args, **kwargs):
        out = self._g(*args, **kwargs)
        if self._opt.step >= self._step:
            out.loss = out.loss * float("nan")
        return out

    def __getattr__(self, name):
        return getattr(self._g, name)


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, sync_free):
    from csd_backend import io

    cfg = _run_config(12).replace(optim={"checkpoint_every": 4})
    opt = Optimization(cfg, AnalyticPrior(16), out_dir=tmp_path)
    opt.sync_free, opt.finite_check_every = sync_free, 3  # as on CUDA: recorded on the device, read every 3 steps
    opt.guidance = _NaNAt(opt.guidance, opt, 5)
    seen = []
    with pytest.raises(CSDError, match="the loss became nan at step 5") as e:
        opt.run(progress=seen.append)
    assert "last checkpoint is kept" in str(e.value)
    # without sync_free the bad step never updates the weights; with it, the run stops at the next check (step 6)
    assert opt.step == (5 if not sync_free else 6)
    assert [i.step for i in seen] == [1, 2, 3, 4, 5]
    if sync_free:  # the weights were updated from the bad step: they are never saved
        with pytest.raises(CSDError, match="at step 5"):
            opt.save_checkpoint()
    ckpt = io.load_checkpoint(tmp_path)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["scene"].values())
    losses = seen[0].losses  # read from the device on first use when sync_free; the same keys and values
    assert list(losses) == ["guidance", "orient", "total", "grad_norm"] and len(seen[0].timesteps) == 2
    assert losses["total"] == pytest.approx(losses["guidance"] + losses["orient"])
    assert seen[0].preview.shape == (1, 24, 24, 3) and seen[0].preview.device.type == "cpu"


# --------------------------------------------------------------------------------- auto on a CPU: compiled when it pays
def test_planned_ray_samples_follow_the_size_phases():
    from csd_backend.auto_backends import planned_ray_samples
    from csd_backend.presets import get_preset

    assert planned_ray_samples(get_preset("preview-cpu")) == 150 * 4 * 64 * 64 * 96
    cfg = small_config(steps=10, camera={"height": [8, 16], "width": [8, 16], "batch_size": [2, 1],
                                         "resolution_milestones": [4]}, render={"num_samples_per_ray": 10})
    assert planned_ray_samples(cfg) == 4 * 2 * 8 * 8 * 10 + 6 * 1 * 16 * 16 * 10


def test_auto_takes_the_compiled_cpu_path_only_where_it_pays(monkeypatch, caplog):
    from csd_backend import auto_backends as ab
    from csd_backend.presets import get_preset

    monkeypatch.setattr(ab, "compile_problem", lambda device: None)  # no trial compile in this test
    short, coarse = small_config(steps=60), get_preset("csd-coarse")
    assert ab.resolve_auto_backends(short, "cpu") is short  # tests and the demos: the torch reference
    assert ab.resolve_auto_backends(get_preset("preview-cpu"), "cpu").scene.encoding_backend == "auto"
    long_run = ab.resolve_auto_backends(coarse, "cpu")  # 10k steps at batch 4: compiled
    assert (long_run.scene.encoding_backend, long_run.render.backend) == ("compiled", "compiled")
    assert coarse.scene.encoding_backend == "auto"  # the run's own config keeps "auto"
    assert ab.resolve_auto_backends(coarse, "cuda:0") is coarse  # CUDA decides per backend (trial compile)
    explicit = coarse.replace(scene={"encoding_backend": "torch"})
    assert ab.resolve_auto_backends(explicit, "cpu").scene.encoding_backend == "torch"
    assert ab.resolve_auto_backends(explicit, "cpu").render.backend == "compiled"
    splats = get_preset("csd-gaussian")
    assert ab.resolve_auto_backends(splats, "cpu") is splats
    # no C++ compiler: the torch path with one warning that says what would help
    monkeypatch.setattr(ab, "compile_problem", lambda device: "CalledProcessError: g++ not found")
    with caplog.at_level(logging.WARNING, logger="csd_backend.auto_backends"):
        assert ab.resolve_auto_backends(coarse, "cpu") is coarse
    (record,) = [r for r in caplog.records if r.name == "csd_backend.auto_backends"]
    assert "g++ not found" in record.getMessage() and "C++ compiler" in record.getMessage()


def test_a_long_cpu_run_builds_the_compiled_path_and_records_it(monkeypatch):
    from csd_backend import auto_backends as ab

    monkeypatch.setattr(ab, "compile_problem", lambda device: None)
    cfg = small_config(steps=100000)  # 5.5 G ray samples: past the break-even
    opt = Optimization(cfg, AnalyticPrior(resolution=16))
    assert type(opt.scene.volume.encoding) is CompiledHashGridEncoding and opt.compiles_kernels
    assert opt.config.scene.encoding_backend == "auto"
    assert opt.resolved()["scene.encoding_backend"] == "compiled"
    short = Optimization(small_config(steps=60), AnalyticPrior(resolution=16))
    assert type(short.scene.volume.encoding) is HashGridEncoding and not short.compiles_kernels


def test_the_progress_bar_says_when_the_first_step_compiles(tmp_path, capsys):
    from csd_backend.runs.life import train_run

    opt = Optimization(small_config(steps=2), AnalyticPrior(resolution=16))
    opt.compiles_kernels = True  # as "auto" sets it for a long CPU run
    train_run(opt, tmp_path, quiet=False)
    err = capsys.readouterr().err
    assert "compiling CPU kernels first" in err and "training: 100%" in err
