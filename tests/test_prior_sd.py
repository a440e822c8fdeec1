"""StableDiffusionPrior on a tiny random SD model (built at test time, offline)."""
from __future__ import annotations

import pytest
import torch

from csd_backend.errors import ConfigError, ModelNotFoundError
from csd_backend.priors.base import DiffusionPrior
from csd_backend.priors.stable_diffusion import StableDiffusionPrior, load_stable_diffusion, v_to_eps


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prior(tiny_sd):
    return load_stable_diffusion(tiny_sd["folder"], device="cpu")


@pytest.fixture(scope="module")
def prior_single(tiny_sd):
    return load_stable_diffusion(tiny_sd["single_file"], device="cpu", config=str(tiny_sd["folder"]))


def _count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


# ------------------------------------------------------------------------------------------ (a) loading
def test_folder_loads_frozen_with_sd_schedule(prior, tiny_sd):
    assert isinstance(prior, DiffusionPrior)
    assert prior.source == str(tiny_sd["folder"])
    assert prior.device == torch.device("cpu")
    for m in (prior.unet, prior.vae, prior.text_encoder):
        assert not m.training
        assert all(not p.requires_grad for p in m.parameters())
        assert next(m.parameters()).dtype == torch.float32  # dtype auto on CPU
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0).float()
    assert prior.num_train_timesteps == 1000
    torch.testing.assert_close(prior.alphas_cumprod, expected, rtol=1e-5, atol=1e-6)
    assert prior.prediction_type == "epsilon"
    assert prior.resolution == 64  # vae.config.sample_size


def test_text_embeddings_shape_and_cache(prior):
    calls, handle = _count_calls(prior.text_encoder)
    try:
        prior._text_cache.clear()
        emb = prior.encode_text(["a cat", "", "the cat"])
        assert emb.shape == (3, 77, 32)
        assert emb.dtype == torch.float32 and not emb.requires_grad
        assert len(calls) == 1  # one batched text-encoder call for the three prompts
        again = prior.encode_text(["the cat", "a cat", "a cat"])
        assert len(calls) == 1  # all cached: the text encoder is not called again
        torch.testing.assert_close(again[1], emb[0])
        torch.testing.assert_close(again[0], emb[2])
        assert not torch.allclose(emb[0], emb[1])
        prior.encode_text(["a dog", "a cat"])
        assert len(calls) == 2  # only the new prompt is encoded
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------- (b) encode_images
def test_encode_images_is_differentiable(prior):
    img = torch.rand(2, 64, 64, 3, requires_grad=True)
    torch.manual_seed(1)
    z = prior.encode_images(img)
    assert z.shape == (2, 4, 64 // 8, 64 // 8) and z.dtype == torch.float32
    (z * torch.randn_like(z)).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert all(p.grad is None for p in prior.vae.parameters())  # VAE stays frozen
    torch.manual_seed(1)
    z2 = prior.encode_images(img.detach())
    torch.testing.assert_close(z.detach(), z2)  # posterior sample reproducible under the global seed


def test_encode_images_resizes_to_input_size(prior):
    assert prior.input_size(32, 48) == (64, 96)
    z = prior.encode_images(torch.rand(1, 32, 48, 3))
    assert z.shape == (1, 4, 64 // 8, 96 // 8)
    out = prior.decode(z)
    assert out.shape == (1, 64, 96, 3) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1


# -------------------------------------------------------------------------------------- (c) predict_noise
def test_predict_noise_batched_without_graph(prior):
    emb = prior.encode_text(["a cat", "", "a dog"])
    z_t = torch.randn(3, 4, 8, 8, requires_grad=True)
    t = torch.tensor([10, 500, 980])
    calls, handle = _count_calls(prior.unet)
    try:
        eps = prior.predict_noise(z_t, t, emb)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert eps.shape == (3, 4, 8, 8) and eps.dtype == torch.float32
    assert not eps.requires_grad and eps.grad_fn is None
    assert torch.isfinite(eps).all()
    one = prior.predict_noise(z_t[1:2], t[1:2], emb[1:2])
    torch.testing.assert_close(one, eps[1:2], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------- (d) single file
def test_single_file_matches_folder(prior, prior_single, tiny_sd):
    assert prior_single.source == str(tiny_sd["single_file"])
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(prior, name).state_dict(), getattr(prior_single, name).state_dict()
        assert set(a) == set(b), name
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=f"{name}.{k}")
    torch.testing.assert_close(prior.alphas_cumprod, prior_single.alphas_cumprod)
    prompts = ["a cat", "", "the cat sat"]
    e1, e2 = prior._encode_text_uncached(prompts), prior_single._encode_text_uncached(prompts)
    torch.testing.assert_close(e1, e2, rtol=0, atol=1e-5)
    img = torch.rand(2, 64, 64, 3)
    torch.manual_seed(3)
    z1 = prior.encode_images(img)
    torch.manual_seed(3)
    z2 = prior_single.encode_images(img)
    torch.testing.assert_close(z1, z2, rtol=0, atol=1e-5)
    t = torch.tensor([1, 400, 999])
    z_t = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(prior.predict_noise(z_t, t, e1), prior_single.predict_noise(z_t, t, e2), rtol=0, atol=1e-5)
    torch.testing.assert_close(prior.decode(z1), prior_single.decode(z2), rtol=0, atol=1e-5)


def test_ckpt_loads_weights_only(tiny_sd, tmp_path, prior):
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_sd["single_file"])), "global_step": 7}, ckpt)
    p = load_stable_diffusion(ckpt, device="cpu", config=tiny_sd["folder"])
    torch.testing.assert_close(p.unet.conv_in.weight, prior.unet.conv_in.weight)

    import argparse

    bad = tmp_path / "lightning.ckpt"  # arbitrary Python objects (here a Namespace) must be refused
    torch.save({"state_dict": load_file(str(tiny_sd["single_file"])), "hparams": argparse.Namespace(lr=1)}, bad)
    with pytest.raises(ModelNotFoundError, match="weights_only") as info:
        load_stable_diffusion(bad, device="cpu", config=tiny_sd["folder"])
    msg = str(info.value)
    assert "argparse.Namespace" in msg and "refused" in msg
    assert "weights_only=False" not in msg and "add_safe_globals" not in msg  # never torch's advice to turn it off


# -------------------------------------------------------------------------------- (e) single file, no config
def test_single_file_without_config_offline(tiny_sd, tmp_path):
    empty_cache = tmp_path / "hf-cache"
    empty_cache.mkdir()
    with pytest.raises(ModelNotFoundError) as info:
        load_stable_diffusion(tiny_sd["single_file"], device="cpu", cache_dir=empty_cache)
    msg = str(info.value)
    assert "--model-config" in msg
    assert str(tiny_sd["single_file"]) in msg
    assert str(empty_cache) in msg  # where it looked
    assert "stable-diffusion-v1-5" in msg  # what it looked for
    assert info.value.__cause__ is not None


def test_single_file_with_bad_config_folder(tiny_sd, tmp_path):
    with pytest.raises(ModelNotFoundError, match="--model-config") as info:
        load_stable_diffusion(tiny_sd["single_file"], device="cpu", config=tmp_path)
    assert "model_index.json" in str(info.value) and "unet" in str(info.value)


# -------------------------------------------------------------------------------------- (f) clear errors
def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(ModelNotFoundError) as info:
        load_stable_diffusion(missing, device="cpu")
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError) as info:
        load_stable_diffusion(tmp_path, device="cpu")
    msg = str(info.value)
    assert str(tmp_path) in msg and "model_index.json" in msg
    missing_part = msg.split("missing sub-folders", 1)[1].split(".")[0]
    for name in ("vae", "text_encoder", "scheduler"):
        assert name in missing_part
    assert "unet" not in missing_part and "tokenizer" not in missing_part


def test_folder_with_broken_component(tiny_sd, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd["folder"], broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError) as info:
        load_stable_diffusion(broken, device="cpu")
    assert "'unet'" in str(info.value) and str(broken) in str(info.value)
    assert info.value.__cause__ is not None


def test_hub_id_not_cached_offline(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        load_stable_diffusion("csd-tests/not-a-cached-model", device="cpu", cache_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert "huggingface-cli download csd-tests/not-a-cached-model" in msg
    assert "local" in msg


def test_hub_id_not_cached_and_no_network_fails_fast(tmp_path, monkeypatch):
    """Not offline by setting, but offline in fact: say so at once instead of retrying for 40 s."""
    import time

    import csd_backend.priors.hub as hub

    monkeypatch.setattr(hub, "hf_offline", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        load_stable_diffusion("csd-tests/not-a-cached-model", device="cpu", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 10
    msg = str(info.value)
    assert "not in the Hugging Face cache" in msg and "no network" in msg and str(tmp_path) in msg
    assert "huggingface-cli download csd-tests/not-a-cached-model" in msg
    assert "scheduler_config" not in msg


def test_hub_probe_is_bounded_in_time(monkeypatch):
    import time

    import csd_backend.priors.hub as hub

    def hang(*args, **kwargs):  # a resolver that never answers
        time.sleep(3)
        raise OSError("no answer")

    monkeypatch.setattr(hub.socket, "create_connection", hang)
    t0 = time.perf_counter()
    assert hub.hub_reachable(timeout=0.3) is False
    assert time.perf_counter() - t0 < 2


def test_long_prompt_warns_where_it_is_cut(prior, caplog):
    words = " ".join(f"w{i}" for i in range(60))  # far more than 77 byte-level tokens
    with caplog.at_level("WARNING", logger="csd_backend"):
        prior.encode_text([words])
    text = " ".join(r.getMessage() for r in caplog.records)
    assert len(caplog.records) == 1 and "Token indices" not in text  # ours only, not the tokenizer's own
    squeezed = text.replace(" ", "")  # the tiny test tokenizer decodes byte by byte, with spaces
    assert "cutafter" in squeezed and "ignored" in text and "29w30w31" in squeezed and "w0w1" not in squeezed
    assert "more characters" in text and "w59" not in squeezed and len(text) < 400  # the tail is not repeated
    caplog.clear()
    # a 5000-character prompt and its view-dependent variants (cut at the same place): one short warning
    long = "a " + "very " * 1000 + "red ball"
    with caplog.at_level("WARNING", logger="csd_backend"):
        prior.encode_text([long, long + ", front view", long + ", side view", long + ", back view"])
        prior.encode_text([long + ", overhead view"])
    assert len(caplog.records) == 1 and len(caplog.records[0].getMessage()) < 500
    caplog.clear()
    with caplog.at_level("WARNING", logger="csd_backend"):
        prior.encode_text(["a short prompt"])
    assert not caplog.records


def test_unsupported_extension(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError) as info:
        load_stable_diffusion(f, device="cpu")
    assert str(f) in str(info.value) and ".gguf" in str(info.value) and ".safetensors" in str(info.value)


def test_single_file_that_is_not_sd(tmp_path, tiny_sd):
    from safetensors.torch import save_file

    f = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(f))
    with pytest.raises(ModelNotFoundError, match="model.diffusion_model"):
        load_stable_diffusion(f, device="cpu", cache_dir=tmp_path)


def test_bad_device_and_dtype(tiny_sd):
    with pytest.raises(ConfigError, match="dtype"):
        load_stable_diffusion(tiny_sd["folder"], device="cpu", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device"):
            load_stable_diffusion(tiny_sd["folder"], device="cuda")


# -------------------------------------------------------------------------------------------- (g) sizes
def test_input_size_rules(tiny_sd, prior):
    assert prior.size_multiple == 16  # VAE factor 8 × one UNet downsampling
    assert prior.input_size(128, 128) == (64, 64)
    for h, w in [(0, 64), (64, -1)]:
        with pytest.raises(ConfigError) as info:
            prior.input_size(h, w)
        assert info.value.field == "render size"
    with pytest.raises(ConfigError, match="multiples of 16") as info:
        prior.input_size(64, 72)  # width 72 is not a multiple of 16
    assert info.value.field == "render size"
    odd = load_stable_diffusion(tiny_sd["folder"], device="cpu", resolution=40)
    with pytest.raises(ConfigError, match="32 or 48"):
        odd.input_size(64, 64)
    with pytest.raises(ConfigError):
        odd.encode_images(torch.rand(1, 64, 64, 3))
    assert load_stable_diffusion(tiny_sd["folder"], device="cpu", resolution=32).input_size(64, 64) == (32, 32)


# ------------------------------------------------------------------------------------- (h) v-prediction
def test_v_to_eps_formula():
    torch.manual_seed(0)
    z0, eps = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    a = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64)
    ab = a.view(-1, 1, 1, 1)
    z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
    v = ab.sqrt() * eps - (1 - ab).sqrt() * z0
    torch.testing.assert_close(v_to_eps(v, z_t, a), eps)
    # scalar check by hand: ᾱ = 0.25, v = 2, z_t = 4 → ε = 0.5·2 + sqrt(0.75)·4
    got = v_to_eps(torch.tensor([[2.0]]), torch.tensor([[4.0]]), torch.tensor([0.25]))
    torch.testing.assert_close(got, torch.tensor([[1.0 + 0.75**0.5 * 4]]))


def test_v_prediction_prior_returns_eps(prior):
    sched = dict(prior.scheduler.config)
    sched["prediction_type"] = "v_prediction"
    vp = StableDiffusionPrior.from_components(
        prior.unet, prior.vae, prior.text_encoder, prior.tokenizer, sched, device="cpu", source="v-test"
    )
    assert vp.prediction_type == "v_prediction" and vp.source == "v-test"
    emb = prior.encode_text(["a cat", ""])
    z_t, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 900])
    v = prior.predict_noise(z_t, t, emb)  # the ε-prior returns the raw UNet output
    expected = prior.alphas_cumprod[t].view(-1, 1, 1, 1).sqrt() * v + (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1).sqrt() * z_t
    torch.testing.assert_close(vp.predict_noise(z_t, t, emb), expected)


def test_single_file_text_encoder_guard(tiny_sd, prior):
    """A text encoder that did not receive the file's weights (diffusers loads it with strict=False) is caught."""
    import copy

    from csd_backend.priors.stable_diffusion import _verify_text_encoder

    _verify_text_encoder(tiny_sd["single_file"], prior.text_encoder)  # the right weights pass
    fresh = copy.deepcopy(prior.text_encoder)
    with torch.no_grad():
        fresh.get_input_embeddings().weight.normal_()
    with pytest.raises(ModelNotFoundError, match="text encoder weights"):
        _verify_text_encoder(tiny_sd["single_file"], fresh)


def test_resolution_defaults_to_native_and_never_exceeds_it(tiny_sd, caplog):
    """A preset may lower the prior's input size for speed, never raise it above the model's native size."""
    p = load_stable_diffusion(tiny_sd["folder"], device="cpu")
    assert p.native_resolution == 64 and p.resolution == 64  # UNet latent sample_size 8 × VAE factor 8
    with caplog.at_level("WARNING", logger="csd_backend"):
        big = load_stable_diffusion(tiny_sd["folder"], device="cpu", resolution=256)
    assert big.resolution == 64
    assert any("above this model's native size 64" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="csd_backend"):
        small = load_stable_diffusion(tiny_sd["folder"], device="cpu", resolution=32)
    assert small.resolution == 32 and not caplog.records


def test_a_presets_resolution_cap_lowers_the_native_size_and_never_raises_it(tiny_sd, caplog):
    """``prior.max_resolution`` (what presets set): a cap on the native size, silent either way."""
    from csd_backend.config import PriorConfig
    from csd_backend.presets import get_preset
    from csd_backend.priors import load_prior

    with caplog.at_level("WARNING", logger="csd_backend"):
        capped = load_stable_diffusion(tiny_sd["folder"], device="cpu", max_resolution=32)
        above = load_stable_diffusion(tiny_sd["folder"], device="cpu", max_resolution=512)
    assert capped.resolution == 32 and above.resolution == 64 and not caplog.records
    preset = get_preset("preview-cpu").prior
    assert preset.resolution is None and preset.max_resolution == 256
    with caplog.at_level("WARNING", logger="csd_backend"):
        p = load_prior(PriorConfig(model=str(tiny_sd["folder"]), device="cpu", max_resolution=preset.max_resolution))
    assert p.resolution == 64 and not caplog.records
