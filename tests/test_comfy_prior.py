"""CSD Prior from ComfyUI Model without ComfyUI: the σ/ᾱ/t arithmetic against hand-computed values, the refusal of
unsupported models, and the prior over ComfyUI-shaped stand-ins of the tiny SD (``comfy_stubs``) against the
engine's own Stable Diffusion prior over the same weights. The real ComfyUI is checked in test_comfy_prior_real.py.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

import comfy_stubs as cs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_sd):
    env = cs.install(monkeypatch, tmp_path)
    (env.models_dir / "diffusers" / "tiny-sd").symlink_to(tiny_sd["folder"], target_is_directory=True)
    return env


@pytest.fixture
def pack(env):
    return cs.load_pack()


@pytest.fixture
def sampling(pack):
    return sys.modules[f"{cs.PACK_MODULE}.nodes.comfy_sampling"]


@pytest.fixture
def comfy_prior(pack):
    return sys.modules[f"{cs.PACK_MODULE}.nodes.comfy_prior"]


def _sd_schedule():
    """SD's scaled-linear betas (0.00085 … 0.012, 1000 steps), by hand."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


# ------------------------------------------------------------------------------------------------ σ ↔ ᾱ ↔ t
def test_sigma_and_alphas_cumprod_hand_values(sampling):
    f = sampling.alphas_cumprod_from_sigmas
    assert f(0.0) == 1.0 and f(1.0) == 0.5 and f(math.sqrt(3.0)) == pytest.approx(0.25)
    g = sampling.sigmas_from_alphas_cumprod
    assert g(0.5) == pytest.approx(1.0) and g(0.25) == pytest.approx(math.sqrt(3.0)) and g(0.8) == pytest.approx(0.5)


def test_sd_sigmas_table_round_trips(sampling):
    """ComfyUI's SD sigmas (σ_min 0.0292, σ_max 14.6146 — the values its samplers print) ↔ the DDPM ᾱ."""
    ac = _sd_schedule()
    sigmas = sampling.sigmas_from_alphas_cumprod(ac)
    assert float(sigmas[0]) == pytest.approx(0.029168, abs=1e-5)
    assert float(sigmas[-1]) == pytest.approx(14.6146, abs=1e-3)
    assert torch.allclose(sampling.alphas_cumprod_from_sigmas(sigmas.float().double()), ac, rtol=1e-6)
    table = sigmas.float()
    for t in (0, 1, 20, 500, 998, 999):
        assert sampling.timestep_of_sigma(table, float(sampling.sigma_at(table, t))) == t
    between = math.sqrt(float(table[500]) * float(table[501])) * 1.0001  # log-midpoint, nudged up: 501
    assert sampling.timestep_of_sigma(table, between) == 501
    assert torch.equal(sampling.sigma_at(table, torch.tensor([3, 7])), table[[3, 7]])


def test_engine_z_t_is_comfy_x_scaled(sampling):
    """z = 2, ε = 1, ᾱ = 1/4 (σ = √3): engine z_t = ½·2 + √¾·1 = 1.8660; ComfyUI x = 2 + √3 = 3.7321 = 2·z_t;
    x0 = 2 gives ε = (x − x0)/σ = 1."""
    sigma = math.sqrt(3.0)
    z_t = 0.5 * 2.0 + math.sqrt(0.75) * 1.0
    assert z_t == pytest.approx(1.8660254)
    x = sampling.comfy_x_from_z_t(z_t, sigma)
    assert x == pytest.approx(2.0 + sigma) and x == pytest.approx(2 * z_t)
    assert sampling.z_t_from_comfy_x(x, sigma) == pytest.approx(z_t)
    assert sampling.eps_from_denoised(x, 2.0, sigma) == pytest.approx(1.0)


def test_per_item_sigmas_broadcast(sampling):
    z_t = torch.ones(2, 4, 3, 3)
    sigma = torch.tensor([1.0, math.sqrt(3.0)])
    x = sampling.comfy_x_from_z_t(z_t, sigma)
    assert torch.allclose(x[0], torch.full((4, 3, 3), math.sqrt(2.0))) and torch.allclose(x[1], torch.full((4, 3, 3), 2.0))
    assert torch.allclose(sampling.eps_from_denoised(x, torch.zeros_like(x), sigma)[1], torch.full((4, 3, 3), 2 / math.sqrt(3)))


def test_eps_model_sees_the_engine_input_and_gives_back_its_eps(sampling):
    """ComfyUI's EPS calculate_input on x = z_t·√(1+σ²) is exactly z_t; an ε-model output comes back unchanged."""
    g = torch.Generator().manual_seed(0)
    z_t, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigma = torch.tensor([0.0292, 1.0, 14.6])
    x = sampling.comfy_x_from_z_t(z_t, sigma)
    assert torch.allclose(sampling.comfy_model_input(x, sigma), z_t, atol=1e-6)
    denoised = sampling.comfy_denoised("EPS", x, eps, sigma)
    assert torch.allclose(sampling.eps_from_denoised(x, denoised, sigma), eps, atol=1e-4)
    # the stub's copy of ComfyUI's classes agrees with the helpers
    ms = cs.model_sampling_class("EPS")()
    assert torch.allclose(ms.calculate_input(sigma, x), z_t, atol=1e-6)
    assert torch.allclose(ms.calculate_denoised(sigma, eps, x), denoised)


def test_v_model_gives_the_engines_v_to_eps(sampling):
    """Hand values: z = 2, ε = 1, ᾱ = 1/4: v = √ᾱ ε − √(1−ᾱ) z = −1.2321; ComfyUI's V_PREDICTION denoised
    x/(σ²+1) − v σ/√(σ²+1) = 0.9330 + 1.0670 = 2 = z, so ε = 1. Random tensors: the same as the engine's
    v_to_eps (ε = √ᾱ v + √(1−ᾱ) z_t)."""
    from csd_backend.priors.stable_diffusion import v_to_eps

    sigma, a = math.sqrt(3.0), 0.25
    v = math.sqrt(a) * 1.0 - math.sqrt(1 - a) * 2.0
    assert v == pytest.approx(-1.2320508)
    x = 2.0 + sigma
    assert sampling.comfy_denoised("V_PREDICTION", x, v, sigma) == pytest.approx(2.0)
    assert sampling.eps_from_denoised(x, sampling.comfy_denoised("V_PREDICTION", x, v, sigma), sigma) == pytest.approx(1.0)

    g = torch.Generator().manual_seed(1)
    z_t, vv = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigmas = torch.tensor([0.05, 1.0, 14.6])
    acs = sampling.alphas_cumprod_from_sigmas(sigmas)
    x = sampling.comfy_x_from_z_t(z_t, sigmas)
    assert torch.allclose(sampling.comfy_model_input(x, sigmas), z_t, atol=1e-6)  # v-models see z_t too
    eps = sampling.eps_from_denoised(x, sampling.comfy_denoised("V_PREDICTION", x, vv, sigmas), sigmas)
    assert torch.allclose(eps, v_to_eps(vv, z_t, acs), atol=1e-4)
    ms = cs.model_sampling_class("V_PREDICTION")()
    assert torch.allclose(ms.calculate_denoised(sigmas, vv, x), sampling.comfy_denoised("V_PREDICTION", x, vv, sigmas))


def test_add_noise_with_derived_alphas_lands_on_comfys_noisy_latent(sampling):
    """The engine's add_noise with ᾱ = 1/(1+σ²) is ComfyUI's z + σ·ε divided by √(1+σ²)."""
    from csd_backend.priors.analytic import AnalyticPrior

    ac = sampling.alphas_cumprod_from_sigmas(cs.ModelSamplingDiscrete().sigmas.double()).float()
    prior = AnalyticPrior(resolution=4)
    prior.alphas_cumprod = ac
    g = torch.Generator().manual_seed(2)
    z, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([10, 900])
    sigma = cs.ModelSamplingDiscrete().sigmas[t]
    x = z + sigma.view(-1, 1, 1, 1) * eps
    assert torch.allclose(sampling.comfy_x_from_z_t(prior.add_noise(z, eps, t), sigma), x, atol=1e-5)


# ------------------------------------------------------------------------------------------ small helpers
def test_contexts_of_different_lengths_are_repeated_without_changing_attention(sampling):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(77, 8, generator=g), torch.randn(154, 8, generator=g)
    ra, rb = sampling.repeat_to_common_length([a, b])
    assert ra.shape == rb.shape == (154, 8) and torch.equal(ra[77:], a) and rb is b
    q = torch.randn(1, 5, 8, generator=g)
    one = torch.nn.functional.scaled_dot_product_attention(q, a[None], a[None])
    two = torch.nn.functional.scaled_dot_product_attention(q, ra[None], ra[None])
    assert torch.allclose(one, two, atol=1e-6)


def test_resolution_and_input_size(sampling):
    from csd_backend.errors import ConfigError
    from csd_backend.priors.resolution import choose_resolution  # one rule for the engine's priors and this one

    assert choose_resolution(512) == (512, None)
    assert choose_resolution(768, None, 256) == (256, None)
    assert choose_resolution(512, 256) == (256, None)
    res, warning = choose_resolution(512, 1024)
    assert res == 512 and "native size 512" in warning
    with pytest.raises(ConfigError, match="resolution"):
        choose_resolution(512, -1)
    from csd_backend.priors.base import scaled_input_size  # the engine's rule, shared by every prior

    assert scaled_input_size(64, 64, 512, 64, "VAE 8 × UNet 8") == (512, 512)
    assert scaled_input_size(64, 128, 256, 64, "VAE 8 × UNet 8") == (256, 512)
    with pytest.raises(ConfigError, match="multiples of 64.*448 or 512"):
        scaled_input_size(64, 64, 480, 64, "VAE 8 × UNet 8")


def test_posterior_sample(sampling):
    moments = torch.cat([torch.full((1, 4, 2, 2), 0.5), torch.full((1, 4, 2, 2), math.log(0.04))], 1)
    assert torch.equal(sampling.posterior_sample(moments), moments[:, :4])
    noise = torch.ones(1, 4, 2, 2)
    assert torch.allclose(sampling.posterior_sample(moments, noise), torch.full((1, 4, 2, 2), 0.7))


# ------------------------------------------------------------------------------------------------- support
@pytest.mark.parametrize("config,prediction,native,name", [
    ("SD15", "EPS", 512, "comfyui:SD15:eps"), ("SD20", "EPS", 512, "comfyui:SD20:eps"),
    ("SD20", "V_PREDICTION", 768, "comfyui:SD20:v")])
def test_supported_models(sampling, config, prediction, native, name):
    s = sampling.check_support(config, "BaseModel", prediction)
    assert (s.native_resolution, s.name) == (native, name)


@pytest.mark.parametrize("config,model_class,prediction,in_channels,extra,needle", [
    ("SDXL", "SDXL", "EPS", 4, (), "SDXL"),
    ("SD3", "SD3", "FLOW", 16, (), "SD3"),
    ("Flux", "Flux", "FLUX", 16, (), "Flux"),
    ("SD21UnclipL", "SD21UNCLIP", "V_PREDICTION", 4, (), "SD21UnclipL"),
    ("SD15_instructpix2pix", "SD15_instructpix2pix", "EPS", 8, (), "instructpix2pix"),
    ("SD15", "BaseModel", "EPS", 9, (), "9 input channels"),
    ("SD15", "BaseModel", "EPS", 4, ("mask", "masked_image"), "mask"),
    ("SD15", "BaseModel", "EDM", 4, (), "EDM"),
])
def test_unsupported_models_are_refused_naming_what_works(sampling, config, model_class, prediction, in_channels,
                                                          extra, needle):
    from csd_backend.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        sampling.check_support(config, model_class, prediction, in_channels, extra)
    text = str(info.value)
    assert text.startswith("model:") and needle in text
    assert "Stable Diffusion 1.x (SD15" in text and "2.x (SD20" in text


class _FakeConfig:
    unet_config = {"in_channels": 4, "adm_in_channels": 2816}


class _FakeSDXLModel:  # a model_base.SDXL as far as the node looks: class names, model type, conditioning inputs
    model_type = cs.ModelType("EPS")
    concat_keys = ()
    adm_channels = 2816

    def __init__(self):
        self.model_config = type("SDXL", (_FakeConfig,), {})()
        self.model_sampling = cs.model_sampling_class("EPS")()

    def apply_model(self, *args, **kwargs):
        raise AssertionError("never called")


def test_node_refuses_an_sdxl_model(env, pack):
    from csd_backend.errors import ConfigError

    model = cs.ModelPatcher(type("SDXL", (_FakeSDXLModel,), {})())
    node = pack.NODE_CLASS_MAPPINGS["CSDPriorFromComfyModel"]()
    with pytest.raises(ConfigError) as info:
        node.make(model, object(), object(), 0)
    text = str(info.value)
    assert "this MODEL is SDXL" in text and "SD15" in text and "SD20" in text and "Load Checkpoint" in text
    with pytest.raises(ConfigError, match="expected a MODEL"):
        node.make(object(), object(), object(), 0)


def test_node_refuses_a_patched_flow_sampling(env, pack, tiny_sd):
    from csd_backend.errors import ConfigError

    model, clip, vae = cs.load_stub_checkpoint(tiny_sd["folder"])
    model.model.model_sampling = type("ModelSampling", (), {"sigmas": torch.linspace(0.001, 1, 1000)})()  # no EPS
    with pytest.raises(ConfigError, match="model sampling was patched"):
        pack.NODE_CLASS_MAPPINGS["CSDPriorFromComfyModel"]().make(model, clip, vae, 0)


def test_pack_offers_the_node(pack):
    cls = pack.NODE_CLASS_MAPPINGS["CSDPriorFromComfyModel"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["CSDPriorFromComfyModel"] == "CSD Prior from ComfyUI Model"
    assert cls.RETURN_TYPES == ("CSD_PRIOR",) and cls.CATEGORY == "CSD 3D"
    req = cls.INPUT_TYPES()["required"]
    assert [req[k][0] for k in ("model", "clip", "vae")] == ["MODEL", "CLIP", "VAE"]
    assert all("tooltip" in v[1] for v in req.values()) and cls.DESCRIPTION


# ------------------------------------------------------------------ the prior over the stand-ins, vs the engine
def _both(tiny_sd, pack, prediction="EPS"):
    """The ComfyUI prior over stand-ins of the tiny SD, loaded in inference mode as ComfyUI's executor does,
    and the engine's SD prior over the same weights (with the matching prediction type)."""
    from csd_backend.priors.stable_diffusion import load_stable_diffusion

    with torch.inference_mode():
        model, clip, vae = cs.load_stub_checkpoint(tiny_sd["folder"], prediction)
        (prior,) = pack.NODE_CLASS_MAPPINGS["CSDPriorFromComfyModel"]().make(model, clip, vae, 64)
    engine = load_stable_diffusion(tiny_sd["folder"], device="cpu", dtype="float32", resolution=64)
    if prediction == "V_PREDICTION":
        engine.prediction_type = "v_prediction"
    return prior, engine


@pytest.mark.parametrize("prediction", ["EPS", "V_PREDICTION"])
def test_prior_over_comfy_objects_matches_the_engine_prior(env, pack, tiny_sd, prediction):
    prior, engine = _both(tiny_sd, pack, prediction)
    assert prior.name == ("comfyui:SD15:eps" if prediction == "EPS" else "comfyui:SD15:v")
    assert torch.allclose(prior.alphas_cumprod, engine.alphas_cumprod, rtol=1e-5)
    prompts = ["a red cube", "", "a red cube, side view"]
    emb = prior.encode_text(prompts)
    assert torch.allclose(emb, engine.encode_text(prompts), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([20, 500, 980])
    z_t = prior.add_noise(z, noise, t)
    assert torch.allclose(z_t, engine.add_noise(z, noise, t), atol=1e-6)
    eps, ref = prior.predict_noise(z_t, t, emb), engine.predict_noise(z_t, t, emb)
    assert eps.dtype == torch.float32 and eps.shape == ref.shape
    assert float((eps - ref).abs().max()) < 1e-4 * float(ref.abs().max()) + 1e-5
    calls = sys.modules["comfy.model_management"].load_calls
    assert ["BaseModel"] in calls and any("CLIPTextModel" in c for c in calls)


def test_encode_images_has_gradients_through_inference_mode_weights(env, pack, tiny_sd):
    prior, engine = _both(tiny_sd, pack)
    vae_weight = next(prior.vae.first_stage_model.parameters())
    assert vae_weight.is_inference()  # as after ComfyUI's Load Checkpoint
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    torch.manual_seed(5)
    z = prior.encode_images(images)
    torch.manual_seed(5)
    ref = engine.encode_images(images.detach())
    assert z.shape == (2, 4, 8, 8) and torch.allclose(z, ref, atol=1e-5)
    z.square().sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    assert vae_weight.grad is None  # never a gradient on ComfyUI's weights
    assert prior.decode(z.detach()).shape == (2, 64, 64, 3)
    assert prior.input_size(16, 16) == (64, 64)
    assert sys.modules["comfy.model_management"].load_calls[-1] == ["AutoencoderKL"]


def test_optimize_resumes_with_the_prior_of_the_same_node(env, pack):
    """The run records prior "comfyui:SD15:eps"; resume with the same node continues it; a CSD Load Diffusion
    Model prior is refused (a different model)."""
    classes = cs.node_classes(pack)
    api = cs.for_tests(cs.load_api(cs.TEMPLATES["checkpoint"]), classes)
    keep = {"CheckpointLoaderSimple", "CSDPriorFromComfyModel", "CSDGuidance", "CSDScene", "CSDCameras", "CSDOptimize"}
    prompt = {k: v for k, v in api.items() if v["class_type"] in keep}
    opt = next(k for k, v in prompt.items() if v["class_type"] == "CSDOptimize")
    prompt[opt]["inputs"].update({"steps": 1, "run_name": "comfy_resume"})
    prompt["99"] = {"class_type": "PreviewImage", "inputs": {"images": [opt, 1]}}
    cs.execute_prompt(prompt, classes, env)
    from csd_backend.io import load_checkpoint

    run = env.output_dir / "csd3d" / "runs" / "comfy_resume_00001"
    first = load_checkpoint(run)
    assert first["prior"] == "comfyui:SD15:eps" and first["config"]["prior"]["model"] == "comfyui:SD15:eps"
    assert first["config"]["prior"]["resolution"] == 32
    prompt[opt]["inputs"].update({"steps": 2, "resume": True})
    cs.execute_prompt(prompt, classes, env)
    assert load_checkpoint(run)["step"] == 2

    other = cs.for_tests({"1": {"class_type": "CSDLoadDiffusionModel", "inputs": {
        "model": cs.TINY_MODEL, "device": "cpu", "dtype": "float32", "resolution": 32, "config_from": "(auto)"}}},
        classes)
    prompt["1"] = other["1"]
    prompt[opt]["inputs"].update({"steps": 3, "prior": ["1", 0]})
    for k in [k for k, v in prompt.items() if v["class_type"] in ("CheckpointLoaderSimple", "CSDPriorFromComfyModel")
              and k != "1"]:
        del prompt[k]
    with pytest.raises(cs.NodeExecutionError, match="comfyui:SD15:eps"):
        cs.execute_prompt(prompt, classes, env)
