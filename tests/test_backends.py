"""Encoding backend selection and the tinycudann adapter's parameter layout (CPU; a stand-in module replaces
tinycudann, which needs CUDA), and the compile plumbing shared by the compiled backends. Real parity runs in
tests/test_cuda_parity.py on a CUDA machine; the compiled backends' parity on the CPU in tests/test_compiled.py."""
from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

from csd_backend.config import SceneConfig
from csd_backend.errors import ConfigError
from csd_backend import compiling, transfer
from csd_backend.scene import backends
from csd_backend.scene.encoding import HashGridEncoding
from csd_backend.scene.volume import Scene

SMALL = dict(n_levels=4, log2_hashmap_size=12, base_resolution=8, max_resolution=64)


def test_auto_is_torch_without_cuda_and_tcnn_is_refused_clearly():
    scene = Scene(SceneConfig(encoding_backend="auto", **SMALL))
    assert type(scene.volume.encoding) is HashGridEncoding
    with pytest.raises(ConfigError, match="'tcnn' runs on CUDA only") as e:
        Scene(SceneConfig(encoding_backend="tcnn", **SMALL))
    assert e.value.field == "scene.encoding_backend"


@pytest.fixture
def fake_tcnn(monkeypatch):
    """A stand-in ``tinycudann`` whose Encoding follows tcnn's API and parameter layout (emulated in torch)."""
    created = []

    class Encoding(torch.nn.Module):
        def __init__(self, n_input_dims, config, seed=1337, dtype=torch.float16):
            super().__init__()
            assert n_input_dims == 3 and config["otype"] == "HashGrid"
            self.ref = HashGridEncoding(config["n_levels"], config["n_features_per_level"],
                                        config["log2_hashmap_size"], config["base_resolution"],
                                        config["per_level_scale"])
            self.params = torch.nn.Parameter(torch.zeros_like(self.ref.params))  # tcnn initialises its own
            created.append(config)

        def forward(self, x):
            self.ref.params = self.params
            return self.ref(x).half()  # tcnn returns half precision by default

    monkeypatch.setitem(sys.modules, "tinycudann", types.SimpleNamespace(Encoding=Encoding))
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    return created


def test_tcnn_adapter_shares_layout_and_state_dict_with_torch(fake_tcnn):
    cfg = SceneConfig(**SMALL)
    torch.manual_seed(0)
    reference = HashGridEncoding(cfg.n_levels, 2, cfg.log2_hashmap_size, cfg.base_resolution, cfg.level_scale())
    adapter = backends.TcnnHashGridEncoding(cfg.n_levels, 2, cfg.log2_hashmap_size, cfg.base_resolution,
                                            cfg.level_scale(), torch.device("cpu"))
    assert fake_tcnn[0]["per_level_scale"] == pytest.approx(cfg.level_scale())
    assert list(adapter.state_dict()) == list(reference.state_dict()) == ["params"]
    assert [n for n, _ in adapter.named_parameters()] == ["params"]  # one parameter, for the optimiser
    adapter.load_state_dict(reference.state_dict())  # a torch-trained checkpoint loads into tcnn ...
    x = torch.rand(50, 3)
    out = adapter(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(x), atol=1e-3, rtol=1e-3)  # half-precision output of tcnn
    reference.load_state_dict(adapter.state_dict())  # ... and back


def test_tcnn_available_is_false_without_cuda():
    backends.tcnn_available.cache_clear()
    assert backends.tcnn_available(0) is False


def test_compiled_functions_are_cached_per_static_arguments_with_their_own_code():
    def f(x, k):
        return x * k

    a, b = compiling.compiled(f, k=2), compiling.compiled(f, k=3)
    assert compiling.compiled(f, k=2) is a and a is not b  # nothing is compiled until a call
    codes = [c.source_function.__code__ for c in (a, b)]  # dynamo keeps graphs per code object
    assert codes[0] is not codes[1] and codes[0] is not f.__code__ and codes[0].co_code == f.__code__.co_code


def test_to_device_async_is_a_plain_move_on_the_cpu():
    t = torch.arange(4)
    assert transfer.to_device_async(t, "cpu") is t


def test_a_failing_compile_is_a_config_error_naming_the_setting(monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    def broken(fn):
        def call(*args):
            raise BackendCompilerFailed(fn, RuntimeError("Cannot find a working triton installation"), None)
        return call

    monkeypatch.setattr(compiling.torch, "compile", broken)
    monkeypatch.setattr(compiling, "_COMPILED", {})

    def f(x):
        return x + 1

    with pytest.raises(ConfigError, match="triton") as e:
        compiling.compiled(f, "render.backend")(torch.zeros(2))
    assert e.value.field == "render.backend" and "'torch'" in str(e.value)
