"""Shared pytest fixtures. Tests never touch the network: the Hugging Face hub is switched off before any import."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random-weight SD model: ``{"folder": diffusers folder, "single_file": LDM .safetensors}``."""
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    """The tiny model's SD-2.1-768 counterpart (VSD's LoRA base model): the same shapes and schedule, other weights,
    v-prediction, 96 px native: ``{"folder": diffusers folder, "single_file": LDM .safetensors}``."""
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), name="tiny-sd-v", seed=1,
                         prediction_type="v_prediction", resolution=96)


@pytest.fixture(scope="session")
def tiny_if(tmp_path_factory):
    """A tiny random-weight DeepFloyd-IF-shaped stage-I model: ``{"folder": diffusers folder (IFPipeline)}``."""
    from tiny_if import build_tiny_if

    return build_tiny_if(tmp_path_factory.mktemp("tiny_if"))


@pytest.fixture(scope="session")
def tiny_controlnet(tiny_sd, tmp_path_factory):
    """A tiny random ControlNet shaped after the tiny SD's UNet (a diffusers folder)."""
    from tiny_sd import build_tiny_controlnet

    return build_tiny_controlnet(tmp_path_factory.mktemp("controlnet"), tiny_sd["folder"])


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module: tiny models gain nothing from threads, and on a loaded 2-core
    machine OpenMP's spinning threads make such tests many times slower (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_mvdream(tmp_path_factory):
    """A tiny random-weight MVDream: the original checkpoint layout (``checkpoint`` .pt + its ``yaml``), a
    ``tokenizer_folder`` for it, the diffusers-style ``folder``, and the reference ``parts`` (``tests/tiny_mvdream.py``)."""
    from tiny_mvdream import build_tiny_mvdream

    return build_tiny_mvdream(tmp_path_factory.mktemp("tiny_mvdream"))


@pytest.fixture(autouse=True)
def signal_handlers_restored(request):
    """Every test leaves SIGINT / SIGTERM as it found them. A test that left SIGINT ignored in the pytest process
    (something in a full run did: Ray or an in-process command) made every later CLI subprocess inherit "ignored",
    so the Ctrl-C tests' runs never stopped (found in a full CI run with the CLI's SIGUSR1 stack dump)."""
    import signal

    names = [s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None]
    before = {s: signal.getsignal(s) for s in names}
    yield
    for s, handler in before.items():
        if signal.getsignal(s) is not handler and handler is not None:
            if os.environ.get("CSD_SIGNAL_LOG"):
                with open(os.environ["CSD_SIGNAL_LOG"], "a") as f:
                    f.write(f"{request.node.nodeid}: {s} {handler} -> {signal.getsignal(s)}\n")
            try:
                signal.signal(s, handler)
            except ValueError:  # not the main thread
                pass
