"""A tiny random-weight MVDream model for tests (no pytest here; see ``conftest.py``).

``build_tiny_mvdream(root)`` writes, under ``root``:

* ``tiny-mvdream.pt``: one checkpoint in the **original key layout** of ``sd-v2.1-base-4view.pt`` (a plain
  ``torch.save`` of a state dict, as MVDream's ``LatentDiffusionInterface`` holds it): ``model.diffusion_model.*``
  (an SD-2.x-style UNet with the camera MLP ``camera_embed.{0,2}``), ``first_stage_model.*`` (the LDM VAE),
  ``cond_stage_model.model.*`` (an OpenCLIP text tower of 3 layers, read at the penultimate, with its projection and
  logit scale) and the 12 schedule buffers; next to it ``tiny-mvdream.yaml``, its architecture in the format of the
  published ``sd-v2-base.yaml``;
* ``tiny-mvdream-tokenizer/tokenizer``: the tiny SD fixture's CLIP tokenizer (the checkpoint has none; the loader
  takes it from ``config=`` this folder, as a user passes a Stable Diffusion 2.x folder);
* ``tiny-mvdream-diffusers``: the same weights as a diffusers-style folder in the layout of the published conversion
  (``ashawkey/mvdream-sd2.1-diffusers``: ``model_index.json`` naming ``MVDreamPipeline``, an LDM-named
  ``MultiViewUNetModel`` UNet whose ``config.json`` is the yaml's UNet parameters, diffusers VAE / CLIP text encoder
  of the kept layers / tokenizer / DDIM scheduler).

The reference components (diffusers UNet with the camera as a projection class embedding, VAE, the full 3-layer
``CLIPTextModel``) are returned too; the LDM keys come from them through ``tiny_sd``'s diffusers → LDM maps (checked
there against diffusers' own single-file conversion), so the engine's LDM → diffusers conversion is tested against an
independent inverse. Shapes: 64² renders → 4×8×8 latents, UNet widths 32/64 with 8-channel heads, attention at the
first level and in the middle, text width 64 (one 64-wide head).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tiny_sd import TINY_RESOLUTION, _build_tokenizer, unet_to_ldm, vae_to_ldm

TEXT_WIDTH = 64
TEXT_LAYERS = 3  # the model reads layer 2's output (the penultimate), as SD 2.x

#: the yaml of the tiny model, in sd-v2-base.yaml's format
TINY_YAML = {"model": {"target": "mvdream.ldm.interface.LatentDiffusionInterface", "params": {
    "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "scale_factor": 0.18215,
    "parameterization": "eps",
    "unet_config": {"target": "mvdream.ldm.modules.diffusionmodules.openaimodel.MultiViewUNetModel", "params": {
        "image_size": TINY_RESOLUTION // 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "attention_resolutions": [1], "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 8,
        "use_spatial_transformer": True, "use_linear_in_transformer": True, "transformer_depth": 1,
        "context_dim": TEXT_WIDTH, "use_checkpoint": False, "legacy": False, "camera_dim": 16}},
    "first_stage_config": {"target": "mvdream.ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": TINY_RESOLUTION, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}},
    "cond_stage_config": {"target": "mvdream.ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                          "params": {"freeze": True, "layer": "penultimate"}},
}}}


def build_components(tmp: Path, seed: int = 0) -> dict:
    """The reference components with seeded random weights: ``unet`` (camera embedding as class embedding), ``vae``,
    ``text_encoder`` (all ``TEXT_LAYERS`` layers), ``tokenizer``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, n_tokens = _build_tokenizer(tmp)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=[4, 8], use_linear_projection=True, class_embed_type="projection",
        projection_class_embeddings_input_dim=16, norm_num_groups=32)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make sure every part matters
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                        layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=TINY_RESOLUTION)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=TEXT_WIDTH, intermediate_size=96, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=1, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    assert n_tokens <= 1000
    for m in (unet, vae, text_encoder):
        m.eval()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def _text_state(text_encoder) -> dict:
    """transformers 4 names its keys text_model.*, 5 without the prefix."""
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def open_clip_keys(text_encoder, seed: int = 0) -> dict:
    """The transformers CLIP text model in OpenCLIP's key layout (``cond_stage_model.model.*`` without the prefix):
    q/k/v fused into ``in_proj``, plus a random ``text_projection`` and the ``logit_scale`` that OpenCLIP holds."""
    sd = _text_state(text_encoder)
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"]}
    for i in range(TEXT_LAYERS):
        a = f"encoder.layers.{i}."
        b = f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            out[b + f"attn.in_proj_{param}"] = torch.cat([sd[a + f"self_attn.{p}_proj.{param}"] for p in "qkv"])
            for new, old in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[b + f"{new}.{param}"] = sd[a + f"{old}.{param}"]
    g = torch.Generator().manual_seed(seed)
    out["text_projection"] = torch.randn(TEXT_WIDTH, TEXT_WIDTH, generator=g)
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def schedule_buffers(params: dict) -> dict:
    """LatentDiffusionInterface.register_schedule's buffers for the yaml's linear schedule (float64, then float32)."""
    n = int(params["timesteps"])
    betas = np.linspace(params["linear_start"] ** 0.5, params["linear_end"] ** 0.5, n, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    prev = np.append(1.0, ac[:-1])
    post = betas * (1.0 - prev) / (1.0 - ac)
    tables = {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": np.sqrt(ac),
              "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ac), "log_one_minus_alphas_cumprod": np.log(1 - ac),
              "sqrt_recip_alphas_cumprod": np.sqrt(1 / ac), "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ac - 1),
              "posterior_variance": post, "posterior_log_variance_clipped": np.log(np.maximum(post, 1e-20)),
              "posterior_mean_coef1": betas * np.sqrt(prev) / (1 - ac),
              "posterior_mean_coef2": (1 - prev) * np.sqrt(alphas) / (1 - ac)}
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tables.items()}


def unet_ldm_keys(unet) -> dict:
    """The UNet's LDM keys (no prefix): tiny_sd's map, and the class embedding as MVDream's ``camera_embed``."""
    sd = unet.state_dict()
    plain = {k: v for k, v in sd.items() if not k.startswith("class_embedding.")}
    out = unet_to_ldm(plain, unet.config)
    for i, j in (("1", "0"), ("2", "2")):
        for param in ("weight", "bias"):
            out[f"camera_embed.{j}.{param}"] = sd[f"class_embedding.linear_{i}.{param}"]
    return out


def to_original_checkpoint(parts: dict) -> dict:
    """The state dict of MVDream's LatentDiffusionInterface for the reference components."""
    sd = {f"model.diffusion_model.{k}": v for k, v in unet_ldm_keys(parts["unet"]).items()}
    vae = vae_to_ldm(parts["vae"].state_dict(), parts["vae"].config)
    sd.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    sd.update({f"cond_stage_model.model.{k}": v for k, v in open_clip_keys(parts["text_encoder"]).items()})
    sd.update(schedule_buffers(TINY_YAML["model"]["params"]))
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def kept_text_encoder(text_encoder):
    """A CLIPTextModel of the first TEXT_LAYERS − 1 layers of ``text_encoder`` (what SD 2.x reads)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(**{**text_encoder.config.to_dict(), "num_hidden_layers": TEXT_LAYERS - 1})
    kept = CLIPTextModel(cfg).eval()
    prefix = "text_model." if any(k.startswith("text_model.") for k in kept.state_dict()) else ""
    state = {prefix + k: v for k, v in _text_state(text_encoder).items()
             if not k.startswith(f"encoder.layers.{TEXT_LAYERS - 1}.")}
    kept.load_state_dict(state, strict=True)
    return kept


def _scheduler():
    from diffusers import DDIMScheduler

    p = TINY_YAML["model"]["params"]
    return DDIMScheduler(num_train_timesteps=1000, beta_start=p["linear_start"], beta_end=p["linear_end"],
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type="epsilon")


def write_diffusers_folder(folder: Path, parts: dict) -> Path:
    """The published conversion's layout: an LDM-named MultiViewUNetModel, the rest as diffusers saves it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "MVDreamPipeline", "_diffusers_version": "0.25.0", "feature_extractor": [None, None],
             "image_encoder": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["mv_unet", "MultiViewUNetModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    unet_dir = folder / "unet"
    unet_dir.mkdir(exist_ok=True)
    params = {k: v for k, v in TINY_YAML["model"]["params"]["unet_config"]["params"].items()
              if k not in ("legacy", "use_linear_in_transformer", "use_spatial_transformer")}
    (unet_dir / "config.json").write_text(json.dumps({"_class_name": "MultiViewUNetModel", **params}), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in unet_ldm_keys(parts["unet"]).items()},
              str(unet_dir / "diffusion_pytorch_model.safetensors"))
    parts["vae"].save_pretrained(folder / "vae")
    kept_text_encoder(parts["text_encoder"]).save_pretrained(folder / "text_encoder")
    parts["tokenizer"].save_pretrained(folder / "tokenizer")
    _scheduler().save_pretrained(folder / "scheduler")
    return folder


def build_tiny_mvdream(root: Path, seed: int = 0) -> dict:
    """Build the tiny MVDream under ``root``: ``{"checkpoint", "yaml", "tokenizer_folder", "folder", "parts"}``."""
    import yaml

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    parts = build_components(root / "_tokenizer_src", seed)
    ckpt = root / "tiny-mvdream.pt"
    torch.save(to_original_checkpoint(parts), ckpt)
    yaml_path = ckpt.with_suffix(".yaml")
    yaml_path.write_text(yaml.safe_dump(TINY_YAML, sort_keys=False), encoding="utf-8")
    tok = root / "tiny-mvdream-tokenizer"
    parts["tokenizer"].save_pretrained(tok / "tokenizer")
    folder = write_diffusers_folder(root / "tiny-mvdream-diffusers", parts)
    return dict(checkpoint=ckpt, yaml=yaml_path, tokenizer_folder=tok, folder=folder, parts=parts)
