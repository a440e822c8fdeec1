"""DeepFloydIFPrior on a tiny random IF-shaped model (built at test time, offline), the IF presets against the
official stage-1 configs (spec §3.1), and those presets' guidance on the analytic prior (issue 10, items 3, 4, 6).

Nothing here runs the real DeepFloyd/IF-I-XL-v1.0 weights: the tiny model checks shapes, the pixel-space input, the
dropped variance channels, the T5 path and the loader; the analytic prior checks the presets' coefficients."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import weakref

import pytest
import torch
import torch.nn.functional as F

from csd_backend.config import PriorConfig
from csd_backend.errors import ConfigError, CSDError, ModelNotFoundError
from csd_backend.guidance import ScoreDistillation, coefficients, timestep_range
from csd_backend.optimize import Optimization
from csd_backend.presets import get_preset
from csd_backend.priors import load_prior
from csd_backend.priors.analytic import AnalyticPrior
from csd_backend.priors.base import DiffusionPrior
from csd_backend.priors.deepfloyd_if import DeepFloydIFPrior, is_deepfloyd_if, load_deepfloyd_if
from engine_helpers import small_config
from test_convergence import mean_colour

pytestmark = pytest.mark.usefixtures("one_torch_thread")

T5_WIDTH = 24  # tiny_if.TINY_T5_WIDTH


@pytest.fixture(scope="module")
def prior(tiny_if):
    """Loaded the way the CLI and the nodes load it: ``load_prior`` picks the IF loader from model_index.json."""
    return load_prior(PriorConfig(model=str(tiny_if["folder"]), device="cpu"))


def _count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(args[0].shape[0]),
                                              with_kwargs=True)
    return calls, handle


def _cosine_alphas_cumprod(n: int = 1000) -> torch.Tensor:
    """``squaredcos_cap_v2`` by hand: ᾱ(s) = cos²((s + 0.008)/1.008 · π/2), β_i = min(1 − ᾱ((i+1)/n)/ᾱ(i/n), 0.999)."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


# ------------------------------------------------------------------------------------------------ loading
def test_load_prior_picks_the_if_loader(prior, tiny_if):
    assert isinstance(prior, DeepFloydIFPrior) and isinstance(prior, DiffusionPrior)
    assert prior.name == "deepfloyd-if" and prior.source == str(tiny_if["folder"])
    assert prior.device == torch.device("cpu")
    for m in (prior.unet, prior.text_encoder):
        assert not m.training
        assert all(not p.requires_grad for p in m.parameters())
        assert next(m.parameters()).dtype == torch.float32  # dtype auto on the CPU
    assert prior.num_train_timesteps == 1000
    torch.testing.assert_close(prior.alphas_cumprod, _cosine_alphas_cumprod().float(), rtol=1e-4, atol=1e-6)
    assert prior.native_resolution == 64 and prior.resolution == 64
    assert prior.unet.config.out_channels == 6 and prior.eps_channels == 3
    assert is_deepfloyd_if(tiny_if["folder"])


def test_input_size_is_the_unets_and_impossible_sizes_are_config_errors(prior, tiny_if, caplog):
    for hw in [(64, 64), (128, 128), (32, 32), (512, 512)]:
        assert prior.input_size(*hw) == (64, 64)
    assert prior.input_size(64, 128) == (64, 128)  # the aspect ratio is kept
    for h, w in [(0, 64), (64, -1)]:
        with pytest.raises(ConfigError) as info:
            prior.input_size(h, w)
        assert info.value.field == "render size"
    with pytest.raises(ConfigError, match="multiples of 4") as info:  # the tiny UNet downsamples 4×
        prior.input_size(64, 66)
    assert "square" in str(info.value)
    with caplog.at_level("WARNING", logger="csd_backend"):
        big = load_deepfloyd_if(tiny_if["folder"], device="cpu", resolution=256)
        capped = load_deepfloyd_if(tiny_if["folder"], device="cpu", max_resolution=32)
    assert big.resolution == 64 and capped.resolution == 32
    assert len(caplog.records) == 1 and "above this model's native size 64" in caplog.records[0].getMessage()
    with pytest.raises(ConfigError, match="render size"):
        load_deepfloyd_if(tiny_if["folder"], device="cpu", resolution=30).input_size(64, 64)


# ------------------------------------------------------------------------------------------ encode_images
def test_encode_images_is_2x_minus_1_without_a_vae(prior):
    img = torch.rand(2, 64, 64, 3)
    z = prior.encode_images(img)
    assert z.shape == (2, 3, 64, 64) and z.dtype == torch.float32
    torch.testing.assert_close(z, img.permute(0, 3, 1, 2) * 2 - 1)
    torch.testing.assert_close(prior.decode(z), img)


def test_encode_images_gradient_is_twice_the_resize_jacobian(prior):
    from torch.autograd.functional import jacobian

    x = torch.rand(1, 5, 5, 3, dtype=torch.float32)
    j_enc = jacobian(prior.encode_images, x, vectorize=True, strategy="forward-mode")
    resize = lambda v: F.interpolate(v.permute(0, 3, 1, 2), size=(64, 64), mode="bilinear",  # noqa: E731
                                     align_corners=False)
    j_resize = jacobian(resize, x, vectorize=True, strategy="forward-mode")
    assert j_enc.shape == (1, 3, 64, 64, 1, 5, 5, 3)
    torch.testing.assert_close(j_enc, 2 * j_resize)
    assert j_resize.abs().sum() > 0


# ------------------------------------------------------------------------------------------ predict_noise
def test_predict_noise_keeps_eps_and_drops_the_learned_variance(prior):
    emb = prior.encode_text(["a red ball", "", "a dog"])
    torch.manual_seed(0)
    z_t = torch.randn(3, 3, 64, 64, requires_grad=True)
    t = torch.tensor([10, 500, 980])
    calls, handle = _count_calls(prior.unet)
    try:
        eps = prior.predict_noise(z_t, t, emb)
    finally:
        handle.remove()
    assert calls == [3]  # one batched UNet call
    assert eps.shape == (3, 3, 64, 64) and eps.dtype == torch.float32
    assert not eps.requires_grad and eps.grad_fn is None and torch.isfinite(eps).all()
    with torch.no_grad():
        raw = prior.unet(z_t.detach(), t, encoder_hidden_states=emb).sample
    assert raw.shape == (3, 6, 64, 64)
    torch.testing.assert_close(eps, raw[:, :3])  # ε = the first three channels
    assert not torch.allclose(eps, raw[:, 3:], atol=1e-3)  # the variance channels are not what comes back
    # the control keyword of the interface is accepted and ignored (IF has no ControlNet)
    torch.testing.assert_close(prior.predict_noise(z_t, t, emb, control=torch.rand(3, 64, 64, 3)), eps)
    torch.testing.assert_close(prior.predict_noise(z_t[1:2], t[1:2], emb[1:2]), eps[1:2], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------- text
def test_t5_embeddings_are_cached_and_use_the_attention_mask(prior):
    calls, handle = _count_calls(prior.text_encoder)
    try:
        prior._text_cache.clear()
        emb = prior.encode_text(["a red ball", "", "the cat"])
        assert emb.shape == (3, 77, T5_WIDTH) and emb.dtype == torch.float32 and not emb.requires_grad
        assert len(calls) == 1  # one batched T5 call for the three prompts
        again = prior.encode_text(["the cat", "a red ball", "a red ball"])
        assert len(calls) == 1  # all cached
        torch.testing.assert_close(again[0], emb[2])
        torch.testing.assert_close(again[1], emb[0])
        prior.encode_text(["a dog", "a red ball"])
        assert len(calls) == 2  # only the new prompt is encoded
    finally:
        handle.remove()
    tok = prior.tokenizer(["a red ball"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert tok.input_ids[0, -1] == prior.tokenizer.pad_token_id and tok.attention_mask.sum() < 77
    with torch.no_grad():
        masked = prior.text_encoder(tok.input_ids, attention_mask=tok.attention_mask)[0][0]
        unmasked = prior.text_encoder(tok.input_ids)[0][0]
    torch.testing.assert_close(emb[0], masked)  # as threestudio's prompt processor and IFPipeline.encode_prompt
    assert not torch.allclose(emb[0], unmasked, atol=1e-4)


def test_release_text_encoder_keeps_the_cache_and_frees_t5(tiny_if):
    p = load_deepfloyd_if(tiny_if["folder"], device="cpu")
    before = p.encode_text(["a red ball", ""])
    ref = weakref.ref(p.text_encoder)
    p.release_text_encoder()
    assert p.text_encoder is None and p.text_encoder_released
    import gc

    gc.collect()
    assert ref() is None  # nothing else holds the (T5-XXL: ~10 GB) encoder
    torch.testing.assert_close(p.encode_text(["", "a red ball"]), before.flip(0))  # cached prompts still work
    with pytest.raises(CSDError, match="released") as info:
        p.encode_text(["a red ball", "a dog"])
    assert "'a dog'" in str(info.value) and "reload" in str(info.value)
    p.release_text_encoder()  # twice is harmless
    cfg = get_preset("csd-coarse-if").replace(guidance={"prompt": "a red ball"})
    with pytest.raises(CSDError, match="released"):  # its view-dependent prompts were never encoded
        ScoreDistillation(cfg.guidance, p)
    # a run encodes all its prompts when it is set up: the encoder can go right after, for the whole run
    fresh = load_deepfloyd_if(tiny_if["folder"], device="cpu")
    opt = Optimization(small_config("a red ball", steps=2, render={"num_samples_per_ray": 16}), fresh)
    fresh.release_text_encoder()
    opt.run()
    assert opt.step == 2


def test_long_prompt_warns_where_t5_cuts_it(prior, caplog):
    words = " ".join(["red"] * 90)  # 90 word tokens + </s> > 77
    with caplog.at_level("WARNING", logger="csd_backend"):
        prior.encode_text([words])
    assert len(caplog.records) == 1
    text = caplog.records[0].getMessage()
    assert "91 tokens" in text and "reads 77" in text and "ignored" in text


# ------------------------------------------------------------------------------------------------ errors
def test_folder_with_missing_parts_names_them(tiny_if, tmp_path):
    broken = tmp_path / "if-broken"
    shutil.copytree(tiny_if["folder"], broken)
    shutil.rmtree(broken / "text_encoder")
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(ModelNotFoundError) as info:
        load_prior(PriorConfig(model=str(broken), device="cpu"))  # still recognised as IF by model_index.json
    msg = str(info.value)
    missing = msg.split("missing", 1)[1].split(".")[0]
    assert str(broken) in msg and "text_encoder" in missing and "scheduler" in missing
    assert "unet" not in missing and "tokenizer" not in missing
    assert "safety_checker" in msg  # says what is not needed


def test_folder_with_a_broken_component(tiny_if, tmp_path):
    broken = tmp_path / "if-no-unet-weights"
    shutil.copytree(tiny_if["folder"], broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError) as info:
        load_deepfloyd_if(broken, device="cpu")
    assert "'unet'" in str(info.value) and str(broken) in str(info.value)
    assert info.value.__cause__ is not None


def test_not_an_if_folder_and_sd_still_goes_to_sd(tiny_sd, tmp_path):
    from csd_backend.priors.stable_diffusion import StableDiffusionPrior

    with pytest.raises(ModelNotFoundError) as info:
        load_deepfloyd_if(tiny_sd["folder"], device="cpu")
    assert "StableDiffusionPipeline" in str(info.value) and "not a DeepFloyd IF folder" in str(info.value)
    assert not is_deepfloyd_if(tiny_sd["folder"])
    assert isinstance(load_prior(PriorConfig(model=str(tiny_sd["folder"]), device="cpu")), StableDiffusionPrior)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not is_deepfloyd_if(empty)
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_deepfloyd_if(empty, device="cpu")
    single = tmp_path / "if.safetensors"
    single.write_bytes(b"\0" * 8)
    with pytest.raises(ModelNotFoundError, match="single file"):
        load_deepfloyd_if(single, device="cpu")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_deepfloyd_if(tmp_path / "nope" / "if", device="cpu")


def test_super_resolution_stage_is_refused(tiny_if, tmp_path):
    sr = tmp_path / "if-ii"
    shutil.copytree(tiny_if["folder"], sr)
    index = json.loads((sr / "model_index.json").read_text())
    index["_class_name"] = "IFSuperResolutionPipeline"
    (sr / "model_index.json").write_text(json.dumps(index))
    assert is_deepfloyd_if(sr)
    with pytest.raises(ModelNotFoundError, match="super-resolution") as info:
        load_prior(PriorConfig(model=str(sr), device="cpu"))
    assert "IF-I-XL" in str(info.value)


def test_hub_id_not_cached_offline_says_it_is_gated(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError) as info:
        load_deepfloyd_if("DeepFloyd/IF-I-XL-v1.0", device="cpu", cache_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "HF_HUB_OFFLINE" in msg
    assert "huggingface-cli download DeepFloyd/IF-I-XL-v1.0" in msg
    assert "gated" in msg and "license" in msg and "huggingface-cli login" in msg
    # load_prior sends an uncached DeepFloyd id to the IF loader (not to Stable Diffusion)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="gated"):
        load_prior(PriorConfig(model="DeepFloyd/IF-I-XL-v1.0", device="cpu"))


def test_hub_id_without_network_fails_fast(tmp_path, monkeypatch):
    import time

    import csd_backend.priors.hub as hub

    monkeypatch.setattr(hub, "hf_offline", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        load_deepfloyd_if("DeepFloyd/IF-I-M-v1.0", device="cpu", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 10
    msg = str(info.value)
    assert "no network" in msg and str(tmp_path) in msg and "gated" in msg


def test_cached_hub_id_loads_offline(tiny_if, tmp_path):
    """A hub id resolved through the Hugging Face cache layout (refs/main → snapshots/<commit>), offline."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--csd-tests--tiny-if"
    shutil.copytree(tiny_if["folder"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert is_deepfloyd_if("csd-tests/tiny-if", cache_dir=tmp_path)
    p = load_deepfloyd_if("csd-tests/tiny-if", device="cpu", cache_dir=tmp_path)
    assert isinstance(p, DeepFloydIFPrior) and p.source == "csd-tests/tiny-if"
    ref = load_deepfloyd_if(tiny_if["folder"], device="cpu")
    torch.testing.assert_close(p.unet.conv_in.weight, ref.unet.conv_in.weight)


def test_fp16_weight_variants(tiny_if, tmp_path):
    """The official repos ship ``*.fp16*`` files next to the fp32 ones: fp16 loads read them; a folder with only the
    fp16 files still loads at fp32 (cast)."""
    from diffusers import UNet2DConditionModel
    from transformers import T5EncoderModel

    from csd_backend.priors.deepfloyd_if import _variants

    half = tmp_path / "if-fp16-only"
    shutil.copytree(tiny_if["folder"], half)
    for sub, cls in (("unet", UNet2DConditionModel), ("text_encoder", T5EncoderModel)):
        model = cls.from_pretrained(half / sub)
        for f in (half / sub).glob("*.safetensors"):
            f.unlink()
        model.to(torch.float16).save_pretrained(half / sub, variant="fp16", max_shard_size="10KB")
    names = sorted(f.name for f in (half / "text_encoder").iterdir())
    assert any("fp16" in n and "00001" in n for n in names), names  # sharded, as T5-XXL
    assert _variants(half, "unet", torch.float16) == ["fp16", None]
    assert _variants(half, "unet", torch.float32) == [None, "fp16"]
    assert _variants(tiny_if["folder"], "unet", torch.float16) == [None]
    assert _variants(None, "unet", torch.float16) == ["fp16", None]  # a hub download fetches only the fp16 files
    p16 = load_deepfloyd_if(half, device="cpu", dtype="fp16")
    assert next(p16.unet.parameters()).dtype == torch.float16 and next(p16.text_encoder.parameters()).dtype == torch.float16
    p32 = load_deepfloyd_if(half, device="cpu", dtype="fp32")
    assert next(p32.unet.parameters()).dtype == torch.float32
    ref = load_deepfloyd_if(tiny_if["folder"], device="cpu")
    torch.testing.assert_close(p32.unet.conv_in.weight, ref.unet.conv_in.weight.half().float())


def test_bad_device_dtype_and_controlnet(tiny_if):
    with pytest.raises(ConfigError, match="dtype"):
        load_deepfloyd_if(tiny_if["folder"], device="cpu", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device"):
            load_deepfloyd_if(tiny_if["folder"], device="cuda")
    with pytest.raises(ConfigError, match="ControlNet"):
        load_prior(PriorConfig(model=str(tiny_if["folder"]), device="cpu", controlnet="/nowhere"))


# ------------------------------------------------------------------------------------- guidance end to end
def test_guidance_gradient_on_the_render_is_2g_over_b(prior):
    """Spec §1.4: z = 2x − 1 at 64², so ∂L/∂x = 2g/B; one batched UNet call of 2B at step 0 (ω2 = 0)."""
    cfg = get_preset("csd-coarse-if").replace(guidance={"prompt": "a red ball"}).guidance
    sd = ScoreDistillation(cfg, prior)
    B = 2
    images = torch.rand(B, 64, 64, 3, requires_grad=True)
    calls, handle = _count_calls(prior.unet)
    try:
        out = sd(images, torch.tensor([10.0, 20.0]), torch.tensor([0.0, 120.0]), step=0,
                 generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert calls == [2 * B]  # positive and null (the negative's weight is 0 at step 0)
    assert out.grad.shape == (B, 3, 64, 64)
    assert out.grad.norm().item() == pytest.approx(1.0, rel=1e-5)  # global L2 normalisation
    assert 20 <= out.t.min() and out.t.max() <= 980
    out.loss.backward()
    torch.testing.assert_close(images.grad, (2 * out.grad / B).permute(0, 2, 3, 1))


def test_perp_neg_guidance_runs_on_the_if_prior(prior):
    cfg = get_preset("csd-coarse-character-if").replace(guidance={"prompt": "a corgi"}).guidance
    assert cfg.perp_neg
    sd = ScoreDistillation(cfg, prior)
    calls, handle = _count_calls(prior.unet)
    try:
        out = sd(torch.rand(1, 64, 64, 3), torch.tensor([10.0]), torch.tensor([45.0]), step=0,
                 generator=torch.Generator().manual_seed(1))
    finally:
        handle.remove()
    assert calls == [5]  # positive, negative, null and the two negative views (spec §1.3: 5B)
    assert torch.isfinite(out.grad).all() and out.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_short_csd_run_with_the_tiny_if_prior(prior):
    """The real loop on the CPU: 24² renders resized to the prior's 64², a few steps, a changed scene."""
    cfg = small_config("a red ball", steps=3, camera={"height": 24, "width": 24, "batch_size": 2},
                       render={"num_samples_per_ray": 16})
    opt = Optimization(cfg, prior)
    before = [p.detach().clone() for p in opt.scene.parameters()]
    seen = []
    scene = opt.run(progress=lambda info: seen.append(info))
    assert len(seen) == 3 and all(math.isfinite(i.losses["total"]) for i in seen)
    assert all(20 <= t <= 980 for i in seen for t in i.timesteps)
    assert any(not torch.equal(a, b) for a, b in zip(before, scene.parameters()))
    assert opt.state_dict()["prior"] == "deepfloyd-if"


# ------------------------------------------------------------------------------------------ the nodes
def test_the_load_node_lists_and_loads_an_if_folder(tiny_if, tmp_path, monkeypatch):
    import comfy_stubs as cs

    env = cs.install(monkeypatch, tmp_path)
    pack = cs.load_pack()
    (env.models_dir / "diffusers" / "IF-I-tiny").symlink_to(tiny_if["folder"], target_is_directory=True)
    node = pack.NODE_CLASS_MAPPINGS["CSDLoadDiffusionModel"]
    assert "diffusers/IF-I-tiny" in node.INPUT_TYPES()["required"]["model"][0]
    (p,) = node().load("diffusers/IF-I-tiny", "cpu", "auto", 0, "(auto)")
    assert type(p).__name__ == "DeepFloydIFPrior" and p.resolution == 64


# ------------------------------------------------------------------- presets = the official stage-1 configs
#: spec §3.1, `csd-if-object.yaml` (and the defaults of the classes it names), keyed by the yaml → the engine field
CSD_IF_OBJECT = {
    "data.batch_size": ("camera.batch_size", 4),
    "data.width / height": ("camera.width", 64),
    "data.height": ("camera.height", 64),
    "data.camera_distance_range": ("camera.distance_range", [1.5, 2.0]),
    "data.fovy_range": ("camera.fovy_range", [40.0, 70.0]),
    "data.elevation_range": ("camera.elevation_range", [-10.0, 90.0]),
    "data.azimuth_range": ("camera.azimuth_range", [-180.0, 180.0]),
    "data stratified azimuth ((rand + i)/B·360 − 180)": ("camera.stratified_azimuth", True),
    "data: no front/back-only phase": ("camera.front_back_only_steps", 0),
    "data elevation sampling (R1 asin quirk)": ("camera.elevation_sampling", "csd-r1"),
    "data.camera_perturb": ("camera.camera_perturb", 0.0),
    "data.center_perturb": ("camera.center_perturb", 0.0),
    "data.up_perturb": ("camera.up_perturb", 0.0),
    "data.light_position_perturb": ("camera.light_position_perturb", 0.1),
    "data.light_distance_range": ("camera.light_distance_range", [1.5, 2.0]),
    "data.eval_camera_distance": ("camera.eval_distance", 2.0),
    "data.eval_fovy_deg": ("camera.eval_fovy", 70.0),
    "data.eval_elevation_deg": ("camera.eval_elevation", 15.0),
    "data.progressive_until 0 (step 0 at elevation 15°, azimuth 0)": ("camera.first_step_fixed_view", True),
    "geometry: implicit-volume": ("scene.kind", "volume"),
    "geometry.radius": ("scene.radius", 2.0),
    "geometry.normal_type": ("scene.normal_type", "analytic"),
    "geometry.density_bias blob_magic3d": ("scene.density_bias", "blob_magic3d"),
    "geometry.density_blob_scale": ("scene.density_blob_scale", 10.0),
    "geometry.density_blob_std": ("scene.density_blob_std", 0.5),
    "pos_encoding_config.n_levels": ("scene.n_levels", 16),
    "pos_encoding_config.n_features_per_level": ("scene.n_features_per_level", 2),
    "pos_encoding_config.log2_hashmap_size": ("scene.log2_hashmap_size", 19),
    "pos_encoding_config.base_resolution": ("scene.base_resolution", 16),
    "pos_encoding_config.per_level_scale": ("scene.per_level_scale", 1.381913),
    "N_max": ("scene.max_resolution", 2048),
    "MLPs: 64 neurons": ("scene.mlp_width", 64),
    "MLPs: 1 hidden layer": ("scene.mlp_hidden_layers", 1),
    "material.ambient_only_steps": ("render.ambient_only_steps", 2001),
    "material: 50% albedo after the warm-up": ("render.albedo_prob", 0.5),
    "material.textureless_prob": ("render.textureless_prob", 1.0),
    "material.textureless_normal (normal-map renders)": ("render.textureless_normal", True),
    "background: neural-environment-map": ("scene.background", "neural_env"),
    "background.random_aug (prob 0.5)": ("scene.random_background_prob", 0.5),
    "renderer.num_samples_per_ray": ("render.num_samples_per_ray", 512),
    "prompt_processor.front_threshold": ("guidance.front_threshold", 30.0),
    "prompt_processor.back_threshold": ("guidance.back_threshold", 30.0),
    "prompt_processor overhead threshold (default)": ("guidance.overhead_threshold", 60.0),
    "prompt_processor.negative_prompt": ("guidance.negative_prompt",
                                         "oversaturated color, ugly, tiling, low quality, noisy"),
    "prompt_processor.use_perp_neg": ("guidance.perp_neg", False),
    "view-dependent prompting": ("guidance.view_dependent", True),
    "guidance: CSD": ("guidance.mode", "csd"),
    "guidance_scale (ω1)": ("guidance.guidance_weight", 1.0),
    "ω2 = −u: [0, -0.0, -1, 5000]": ("guidance.negative_weight", [0, 0.0, 1.0, 5000]),
    "weighting_strategy": ("guidance.weighting", "uniform"),
    "grad_normalize": ("guidance.grad_normalize", True),
    "grad_clip": ("guidance.grad_clip", None),
    "min_step_percent": ("guidance.min_step_percent", 0.02),
    "max_step_percent": ("guidance.max_step_percent", [5000, 0.98, 0.5, 5001]),
    "loss.lambda_sds": ("loss.guidance", 1.0),
    "loss.lambda_orient": ("loss.orient", [5000, 1.0, 20.0, 5001]),
    "loss.lambda_sparsity": ("loss.sparsity", 1.0),
    "loss.lambda_opaque": ("loss.opaque", 0.0),
    "optimizer: Adam lr": ("optim.lr", 1e-3),
    "optimizer betas": ("optim.betas", [0.9, 0.999]),
    "optimizer eps": ("optim.eps", 1e-15),
    "optimizer: one group for all parameters": ("optim.group_lr", {}),
    "trainer.max_steps": ("optim.steps", 10000),
    "seed": ("optim.seed", 0),
    "guidance: IF stage I at 64² (no upsampling)": ("prior.max_resolution", 64),
    "prior: the model's own size under that cap": ("prior.resolution", None),
}

#: `csd-if.yaml` (the character config): the object config's values except these
CSD_IF_CHARACTER = {
    **{k: v for k, v in CSD_IF_OBJECT.items()
       if k not in ("data stratified azimuth ((rand + i)/B·360 − 180)", "data: no front/back-only phase")},
    "data.batch_size": ("camera.batch_size", 1),
    "data.elevation_range": ("camera.elevation_range", [-10.0, 45.0]),
    "data.batch_uniform_azimuth false (azimuth U[−180, 180])": ("camera.stratified_azimuth", False),
    "data.front_back_only_iters": ("camera.front_back_only_steps", 1000),
    "geometry.radius": ("scene.radius", 1.0),
    "pos_encoding_config.n_levels": ("scene.n_levels", 12),
    "pos_encoding_config.per_level_scale": ("scene.per_level_scale", 1.37035),
    "N_max": ("scene.max_resolution", 512),
    "material.ambient_only_steps": ("render.ambient_only_steps", 5001),
    "loss.lambda_orient": ("loss.orient", [0, 1.0, 100.0, 5000]),
    "loss.lambda_sparsity": ("loss.sparsity", [0, 10.0, 1.0, 5000]),
    "prompt_processor.use_perp_neg": ("guidance.perp_neg", True),
    "guidance.perpneg_scale": ("guidance.perp_neg_scale", 3.0),
    "perp-neg f_fs = f_sf (a, b, c)": ("guidance.perp_neg_f_fs", [4.0, 0.5, -2.426]),
    "perp-neg f_sb": ("guidance.perp_neg_f_sb", [1.0, 0.5, -0.606]),
    "perp-neg f_fsb": ("guidance.perp_neg_f_fsb", [1.0, 0.5, 0.967]),
}


def _differences(preset: str, table: dict) -> list:
    d = get_preset(preset).to_dict()
    wrong = []
    for key, (path, want) in table.items():
        section, name = path.split(".")
        got = d[section][name]
        if isinstance(want, float) and not isinstance(want, bool):
            same = isinstance(got, (int, float)) and got == pytest.approx(want, rel=1e-6)
        elif isinstance(want, list):
            same = isinstance(got, list) and len(got) == len(want) and all(
                g == pytest.approx(w, rel=1e-6) for g, w in zip(got, want))
        else:
            same = got == want
        if not same:
            wrong.append(f"{key}: yaml {want!r}, preset {path} = {got!r}")
    return wrong


@pytest.mark.parametrize("preset, table", [("csd-coarse-if", CSD_IF_OBJECT),
                                           ("csd-coarse-character-if", CSD_IF_CHARACTER)])
def test_if_presets_reproduce_the_official_stage1_configs(preset, table):
    wrong = _differences(preset, table)
    assert not wrong, "\n".join(wrong)
    get_preset(preset).replace(guidance={"prompt": "x"}, prior={"model": "m"}).validate()


def test_if_presets_are_the_sd_stage1_presets_with_the_if_prior():
    for ours, base in [("csd-coarse-if", "csd-coarse"), ("csd-coarse-character-if", "csd-coarse-character")]:
        a, b = get_preset(ours).to_dict(), get_preset(base).to_dict()
        for section in a:
            if section not in ("prior", "preset"):
                assert a[section] == b[section], (ours, section)
        assert a["prior"]["max_resolution"] == 64 and b["prior"]["max_resolution"] == 512


def test_if_presets_schedules_follow_spec_1_2():
    """ω2 0 → 1 over steps 0–5000 (u = −ω2, n = −(1 − ω2)); t ∈ [20, 980] while s ≤ 5000, then [20, 500]."""
    for name in ("csd-coarse-if", "csd-coarse-character-if"):
        g = get_preset(name).guidance
        for s in (0, 1250, 2500, 4999, 5000, 5001, 9999):
            c = coefficients(g, s)
            w2 = min(s / 5000, 1.0)
            assert (c.c, c.k) == (1.0, 0.0) and c.u == pytest.approx(-w2) and c.n == pytest.approx(-(1 - w2))
        assert timestep_range(g, 0, 1000) == (20, 980)
        assert timestep_range(g, 5000, 1000) == (20, 980)
        assert timestep_range(g, 5001, 1000) == (20, 500)


# --------------------------------------------------------- the IF presets' guidance on the analytic prior
@pytest.mark.parametrize("preset, steps", [("csd-coarse-if", 12), ("csd-coarse-character-if", 16)])
def test_if_preset_guidance_turns_the_scene_red(preset, steps):
    """The preset's guidance (ω2 ramp, t schedule, uniform w, global L2 normalisation, thresholds 30°, Perp-Neg for
    the character config) and cameras (64², batch 4 stratified / batch 1 with the front/back phase), stretched to a
    short run, on the exact analytic prior at 64²: CSD with "a red ball" must make the object red. The scene,
    shading and learning rate are the small test ones (the preset's lr 1e-3 needs thousands of steps)."""
    small = small_config("a red ball", steps=steps, render={"num_samples_per_ray": 24})
    cfg = get_preset(preset).with_steps(steps)
    cfg = cfg.replace(guidance={"prompt": "a red ball"}, scene=dataclasses.asdict(small.scene),
                      render=dataclasses.asdict(small.render), loss={"orient": 0.0, "sparsity": 0.0},
                      optim={"lr": 5e-2, "checkpoint_every": 0, "preview_every": 0})
    assert (cfg.camera.height, cfg.camera.width) == (64, 64)
    assert cfg.camera.batch_size == get_preset(preset).camera.batch_size
    prior = AnalyticPrior(resolution=cfg.prior.max_resolution)
    assert prior.input_size(64, 64) == (64, 64)
    opt = Optimization(cfg, prior)
    seen = []
    scene = opt.run(progress=lambda info: seen.append(info))
    assert [i.coefficients.u for i in seen][-1] == pytest.approx(-1.0)  # ω2 reached 1 (the ramp was stretched)
    r, g, b = mean_colour(scene, cfg).tolist()
    assert r > 0.8 and g < 0.2 and b < 0.2, (r, g, b)


def test_cli_runs_on_if_and_releases_t5_after_the_prompts_are_encoded(tiny_if, tmp_path, capsys, monkeypatch):
    """The command line encodes every prompt when the run is built, then frees T5 (as threestudio does)."""
    from csd_backend import cli
    from csd_backend.priors.deepfloyd_if import DeepFloydIFPrior

    released = []
    original = DeepFloydIFPrior.release_text_encoder
    monkeypatch.setattr(DeepFloydIFPrior, "release_text_encoder",
                        lambda self: (released.append(True), original(self))[1])
    out = tmp_path / "run"
    code = cli.main(["generate", "--prompt", "a red ball", "--model", str(tiny_if["folder"]), "--preset",
                     "csd-coarse-if", "--steps", "2", "--out", str(out), "--quiet", "--no-mesh", "--views", "1",
                     "--view-size", "16", "--set", "camera.batch_size=1", "--set", "render.num_samples_per_ray=16",
                     "--set", "scene.n_levels=4", "--set", "scene.log2_hashmap_size=12"])
    assert code == 0, capsys.readouterr().err
    assert released == [True] and (out / "checkpoints" / "last.ckpt").is_file()
