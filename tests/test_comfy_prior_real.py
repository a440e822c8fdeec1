"""CSD Prior from ComfyUI Model against a real ComfyUI (skipped unless ``CSD_COMFYUI_ROOT`` is set).

A random-weight checkpoint with every tensor of the real Stable Diffusion 1.5 layout (built from diffusers SD 1.5
config modules, default random init with norms at 1, converted to LDM keys, stored as float16 to halve the 2.1 GB
write) is loaded

* by ComfyUI (``comfy.sd.load_checkpoint_guess_config`` under ``torch.inference_mode()``, as Load Checkpoint runs
  in the server), wrapped by ``nodes/comfy_prior.py`` — in a subprocess with ComfyUI's interpreter
  (``CSD_COMFYUI_PYTHON``), since ComfyUI parses its command line and sets up devices at import;
* by the engine's single-file loader (``csd_backend.priors.load_prior`` with ``model_config`` pointing at a diffusers
  folder of the same SD 1.5 architecture) — in a second subprocess with this interpreter,

both on the CPU in float32. The ComfyUI side also applies a small random LoRA through ComfyUI's own LoraLoader
and checks what ComfyUI's model management does with the models. The results are compared here.

The file is also the subprocess script: ``python test_comfy_prior_real.py comfy|engine WORKDIR``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_ROOT = os.environ.get("CSD_COMFYUI_ROOT", "")
COMFY_PYTHON = os.environ.get("CSD_COMFYUI_PYTHON", "") or sys.executable

#: the SD 1.5 architecture (diffusers configs of stable-diffusion-v1-5)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
#: a narrower UNet that ComfyUI still detects as SD15 (model_channels 320, context 768, conv proj_in): two levels,
#: one block each. With the full-size CLIP-L and VAE it is a 0.5 GB checkpoint for the server workflow test.
SD15_SMALL_UNET = dict(SD15_UNET, block_out_channels=(320, 640), layers_per_block=1,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512, act_fn="silu")
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

CHECKPOINT = "csd-sd15-random.safetensors"
PROMPT = "a DSLR photo of a corgi"
TIMESTEPS = [20, 250, 500, 750, 980]
#: ε parity tolerance: max |ε_comfy − ε_engine| / max |ε_engine| (two UNet implementations in float32)
EPS_TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------------- the checkpoint
def _tokenizer_files(comfy_root: Path, folder: Path) -> None:
    """The CLIP-L BPE vocabulary ComfyUI ships (comfy/sd1_tokenizer), as a diffusers tokenizer folder."""
    src = Path(comfy_root) / "comfy" / "sd1_tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copy2(src / name, folder / name)
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["model_max_length"] = 77
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def write_sd15_checkpoint(path: Path, comfy_root: Path, config_dir: Path = None, small_unet: bool = False,
                          dtype: str = "float16", seed: int = 0) -> dict:
    """Write a random-weight SD 1.5-layout LDM checkpoint ``path`` (and, with ``config_dir``, a diffusers folder with
    the matching configs and tokenizer, no weights). Returns timings and sizes."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_sd import clip_to_ldm, unet_to_ldm, vae_to_ldm

    t0 = time.perf_counter()
    dt = getattr(torch, dtype)
    torch.manual_seed(seed)
    if config_dir is not None:
        config_dir.mkdir(parents=True, exist_ok=True)
    sd = {}
    # one component at a time, converted and cast at once (the float32 SD 1.5 UNet alone is 3.4 GB)
    unet = UNet2DConditionModel(**(SD15_SMALL_UNET if small_unet else SD15_UNET))
    sd.update({f"model.diffusion_model.{k}": v.to(dt).contiguous()
               for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()})
    if config_dir is not None:
        unet.save_config(config_dir / "unet")
    del unet
    vae = AutoencoderKL(**SD15_VAE)
    sd.update({f"first_stage_model.{k}": v.to(dt).contiguous()
               for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()})
    if config_dir is not None:
        vae.save_config(config_dir / "vae")
    del vae
    clip_config = CLIPTextConfig(**SD15_CLIP)
    text = CLIPTextModel(clip_config)
    sd.update({k: v.to(dt).contiguous() for k, v in clip_to_ldm(text.state_dict()).items()})
    del text
    built = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    if config_dir is not None:
        clip_config.save_pretrained(config_dir / "text_encoder")
        DDIMScheduler(**SD15_SCHEDULER).save_config(config_dir / "scheduler")
        _tokenizer_files(comfy_root, config_dir / "tokenizer")
        (config_dir / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.27.0",
            "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
            "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}, indent=2), encoding="utf-8")
    n = sum(v.numel() for v in sd.values())
    return {"build_s": built, "total_s": time.perf_counter() - t0, "parameters": n,
            "bytes": path.stat().st_size, "tensors": len(sd)}


# -------------------------------------------------------------------------------------- subprocess sides
def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _inputs(work: Path):
    import torch

    return torch.load(work / "inputs.pt", weights_only=True)


def engine_side(work: Path) -> None:
    """The engine's single-file loader on the same checkpoint: ᾱ, text embeddings, ε, the VAE latent."""
    import torch

    sys.path.insert(0, str(ROOT))
    from csd_backend.config import PriorConfig
    from csd_backend.priors import load_prior

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    inp = _inputs(work)
    t0 = time.perf_counter()
    prior = load_prior(PriorConfig(model=str(work / CHECKPOINT), model_config=str(work / "sd15-config"),
                                   device="cpu", dtype="float32", resolution=64))
    load_s = time.perf_counter() - t0
    emb = prior.encode_text([PROMPT, ""])
    t0 = time.perf_counter()
    eps = prior.predict_noise(inp["z_t"], inp["t"], emb[:1].expand(len(inp["t"]), -1, -1))
    eps_s = time.perf_counter() - t0
    torch.manual_seed(inp["seed"])
    z = prior.encode_images(inp["images"])
    torch.save({"alphas_cumprod": prior.alphas_cumprod, "emb": emb, "eps": eps, "z": z.detach(),
                "timing": {"load_s": load_s, "eps_s": eps_s}, "name": prior.name}, work / "engine.pt")


def comfy_side(work: Path) -> None:
    """ComfyUI loads the checkpoint (in inference mode, as its executor does); the pack's prior wraps it."""
    comfy_root = Path(COMFY_ROOT).resolve()
    os.chdir(comfy_root)
    sys.path.insert(0, str(comfy_root))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import gc
    import weakref

    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    import comfy.lora
    import comfy.model_management as mm
    import folder_paths
    import nodes as comfy_nodes
    from safetensors.torch import save_file

    import importlib.util

    spec = importlib.util.spec_from_file_location("csd_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["csd_pack"] = pack
    spec.loader.exec_module(pack)
    node = pack.NODE_CLASS_MAPPINGS["CSDPriorFromComfyModel"]()
    inp = _inputs(work)
    engine = torch.load(work / "engine.pt", weights_only=True)
    out = {"timing": {}, "memory": {}}
    rss0 = _rss_mb()
    folder_paths.add_model_folder_path("checkpoints", str(work))

    t0 = time.perf_counter()
    with torch.inference_mode():  # what PromptExecutor does around every node
        model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)
        (prior,) = node.make(model, clip, vae, 64)
    out["timing"]["load_s"] = time.perf_counter() - t0
    out["memory"]["rss_loaded_mb"] = _rss_mb()
    out["config_class"] = type(model.model.model_config).__name__
    out["name"], out["source"], out["resolution"] = prior.name, prior.source, prior.resolution
    out["alphas_cumprod"] = prior.alphas_cumprod
    emb = prior.encode_text([PROMPT, ""])
    out["emb"] = emb
    n = len(inp["t"])
    t0 = time.perf_counter()
    out["eps"] = prior.predict_noise(inp["z_t"], inp["t"], emb[:1].expand(n, -1, -1))
    out["timing"]["eps_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["eps_again"] = prior.predict_noise(inp["z_t"], inp["t"], emb[:1].expand(n, -1, -1))
    out["timing"]["eps_again_s"] = time.perf_counter() - t0  # the models are loaded: load_models_gpu is a no-op
    out["eps_engine_emb"] = prior.predict_noise(inp["z_t"], inp["t"], engine["emb"][:1].expand(n, -1, -1))
    # renders → latents with gradients through ComfyUI's VAE weights (inference tensors)
    images = inp["images"].clone().requires_grad_(True)
    torch.manual_seed(inp["seed"])
    t0 = time.perf_counter()
    z = prior.encode_images(images)
    z.square().sum().backward()
    out["timing"]["encode_backward_s"] = time.perf_counter() - t0
    out["z"], out["image_grad_norm"] = z.detach(), float(images.grad.norm())
    out["image_grad_finite"] = bool(torch.isfinite(images.grad).all())
    # ComfyUI may unload the models between uses: the prior reloads them and gives the same ε
    mm.unload_all_models()
    out["memory"]["loaded_after_unload"] = len(mm.current_loaded_models)
    out["eps_reloaded"] = prior.predict_noise(inp["z_t"], inp["t"], emb[:1].expand(n, -1, -1))
    out["memory"]["loaded_after_use"] = [type(m.model.model).__name__ for m in mm.current_loaded_models]

    # a small random LoRA (kohya keys) on every attention projection, through ComfyUI's LoraLoader
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    lora, g = {}, torch.Generator().manual_seed(1)
    for key, target in sorted(key_map.items()):
        if not key.startswith("lora_unet_") or not target.endswith(("to_q.weight", "to_k.weight", "to_v.weight")):
            continue
        if not key.startswith("lora_unet_down_blocks") and not key.startswith("lora_unet_up_blocks") \
                and not key.startswith("lora_unet_mid_block"):
            continue  # the same module under its diffusers name only
        w = weights[target]
        rank = 4
        lora[f"{key}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.05
        lora[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.05
        lora[f"{key}.alpha"] = torch.tensor(float(rank))
    out["lora_modules"] = len(lora) // 3
    (work / "loras").mkdir(exist_ok=True)
    save_file(lora, str(work / "loras" / "csd-random-lora.safetensors"))
    folder_paths.add_model_folder_path("loras", str(work / "loras"))
    with torch.inference_mode():
        model_l, clip_l = comfy_nodes.LoraLoader().load_lora(model, clip, "csd-random-lora.safetensors", 1.0, 1.0)
        (prior_l,) = node.make(model_l, clip_l, vae, 64)
    out["lora_name"] = prior_l.name
    out["eps_lora"] = prior_l.predict_noise(inp["z_t"], inp["t"], emb[:1].expand(n, -1, -1))
    out["eps_base_after_lora"] = prior.predict_noise(inp["z_t"], inp["t"], emb[:1].expand(n, -1, -1))

    # memory: what ComfyUI's model management holds, and whether the prior keeps anything alive once dropped
    refs = [weakref.ref(m) for m in (model.model, vae.first_stage_model, clip.cond_stage_model)]
    out["memory"]["loaded_before_free"] = len(mm.current_loaded_models)
    mm.unload_all_models()
    out["memory"]["loaded_after_free"] = len(mm.current_loaded_models)
    out["memory"]["rss_before_drop_mb"] = _rss_mb()
    del prior, prior_l, model, clip, vae, model_l, clip_l, key_map, weights, z, images
    gc.collect()
    mm.soft_empty_cache()
    out["memory"]["alive_after_drop"] = sum(r() is not None for r in refs)
    out["memory"]["rss_after_drop_mb"] = _rss_mb()
    out["memory"]["rss_start_mb"] = rss0
    torch.save(out, work / "comfy.pt")



# --------------------------------------------------------------------------------------------------- tests
try:
    import pytest
except ImportError:  # the subprocess side runs in ComfyUI's interpreter
    pytest = None

if pytest is not None:
    pytestmark = pytest.mark.skipif(not COMFY_ROOT, reason="set CSD_COMFYUI_ROOT (and CSD_COMFYUI_PYTHON) to check "
                                                           "the ComfyUI prior against a real ComfyUI")

    def _run(python: str, side: str, work: Path) -> float:
        t0 = time.perf_counter()
        out = subprocess.run([python, str(Path(__file__).resolve()), side, str(work)], capture_output=True,
                             text=True, timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                           "TRANSFORMERS_OFFLINE": "1"})
        assert out.returncode == 0, f"{side} side failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
        return time.perf_counter() - t0

    @pytest.fixture(scope="module")
    def parity(tmp_path_factory):
        import torch

        work = tmp_path_factory.mktemp("comfy_prior_real")
        built = write_sd15_checkpoint(work / CHECKPOINT, Path(COMFY_ROOT), config_dir=work / "sd15-config")
        g = torch.Generator().manual_seed(0)
        torch.save({"z_t": torch.randn(len(TIMESTEPS), 4, 8, 8, generator=g), "t": torch.tensor(TIMESTEPS),
                    "images": torch.rand(1, 64, 64, 3, generator=g), "seed": 123}, work / "inputs.pt")
        engine_s = _run(sys.executable, "engine", work)
        comfy_s = _run(COMFY_PYTHON, "comfy", work)
        engine = torch.load(work / "engine.pt", weights_only=True)
        comfy = torch.load(work / "comfy.pt", weights_only=False)
        parity_numbers = {key: _rel(comfy[key], engine["eps"]) for key in ("eps", "eps_engine_emb")}
        parity_numbers.update(emb=_rel(comfy["emb"], engine["emb"]), z=_rel(comfy["z"], engine["z"]),
                              lora_change=_rel(comfy["eps_lora"], comfy["eps"]))
        summary = {"max_rel_diff": parity_numbers, "checkpoint": built, "engine_subprocess_s": engine_s,
                   "comfy_subprocess_s": comfy_s,
                   "engine": engine["timing"], "comfy": comfy["timing"], "memory": comfy["memory"]}
        print("\nComfyUI prior parity run:", json.dumps(summary, indent=1))
        yield engine, comfy
        shutil.rmtree(work, ignore_errors=True)  # 2 GB

    def _rel(a, b) -> float:
        return float((a - b).abs().max() / b.abs().max())

    def test_the_checkpoint_has_the_full_sd15_layout(parity):
        _, comfy = parity
        assert comfy["config_class"] == "SD15"
        assert comfy["name"] == comfy["source"] == "comfyui:SD15:eps" and comfy["resolution"] == 64

    def test_alphas_cumprod_from_comfy_sigmas_match_the_ddpm_schedule(parity):
        """ᾱ = 1 / (1 + σ²) of ComfyUI's sigmas table against diffusers' scaled-linear betas (float32)."""
        engine, comfy = parity
        a, b = comfy["alphas_cumprod"], engine["alphas_cumprod"]
        assert a.shape == b.shape == (1000,)
        assert float(((a - b).abs() / b).max()) < 1e-5

    def test_text_embeddings_match(parity):
        engine, comfy = parity
        assert comfy["emb"].shape == engine["emb"].shape == (2, 77, 768)
        assert _rel(comfy["emb"], engine["emb"]) < 1e-5

    def test_eps_matches_the_engine_single_file_loader(parity):
        """Same z_t, t and prompt: ComfyUI's UNet through apply_model (x = z_t·√(1+σ²), ε = (x − x0)/σ) against
        diffusers' UNet through the engine's loader, both float32 on the CPU. Measured: about 1e-6."""
        engine, comfy = parity
        for key in ("eps", "eps_engine_emb"):
            for i in range(len(TIMESTEPS)):
                assert _rel(comfy[key][i], engine["eps"][i]) < EPS_TOLERANCE, (key, TIMESTEPS[i])
        assert float(engine["eps"].std()) > 0.05  # a real prediction, not zeros
        assert torch_equal(comfy["eps_again"], comfy["eps"])

    def test_vae_latents_match_and_gradients_reach_the_renders(parity):
        """The same posterior sample (same seed) from ComfyUI's first stage, loaded in inference mode, with a
        finite, non-zero gradient on the input images."""
        engine, comfy = parity
        assert comfy["z"].shape == engine["z"].shape == (1, 4, 8, 8)
        assert _rel(comfy["z"], engine["z"]) < 1e-4
        assert comfy["image_grad_finite"] and comfy["image_grad_norm"] > 0

    def test_a_lora_patched_model_changes_eps_and_leaves_the_base_model_alone(parity):
        _, comfy = parity
        assert comfy["lora_modules"] == 96  # to_q/to_k/to_v of attn1 and attn2 in all 16 transformer blocks
        assert _rel(comfy["eps_lora"], comfy["eps"]) > 1e-2
        assert torch_equal(comfy["eps_base_after_lora"], comfy["eps"])  # ComfyUI unpatched the weights
        assert comfy["lora_name"] == comfy["name"]  # a run may be resumed with the LoRA-patched model

    def test_comfyui_can_unload_the_models_and_the_prior_reloads_them(parity):
        _, comfy = parity
        mem = comfy["memory"]
        assert mem["loaded_after_unload"] == 0 and mem["loaded_after_use"] == ["BaseModel"]
        assert torch_equal(comfy["eps_reloaded"], comfy["eps"])
        assert mem["loaded_before_free"] >= 1 and mem["loaded_after_free"] == 0

    def test_memory_is_released_once_the_prior_and_models_are_dropped(parity):
        """No reference cycle through the prior: once ComfyUI drops its outputs, the UNet, VAE and CLIP are
        freed (weak references dead) and the process gives most of the 4 GB back."""
        _, comfy = parity
        mem = comfy["memory"]
        assert mem["alive_after_drop"] == 0
        assert mem["rss_before_drop_mb"] - mem["rss_after_drop_mb"] > 2500, mem

    def torch_equal(a, b) -> bool:
        import torch

        return bool(torch.equal(a, b))


if __name__ == "__main__":
    side, work = sys.argv[1], Path(sys.argv[2])
    {"engine": engine_side, "comfy": comfy_side}[side](work)
