"""Random-weight Stable-Diffusion-2.1-base-shaped models, built from the published architecture numbers (no
download): UNet 865.9 M parameters, VAE 83.7 M, OpenCLIP ViT-H/14 text tower 340.4 M. For the benchmarks
(GPU steps; the CPU template, which loads them from a saved diffusers folder like the real model)."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024, use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
           block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_sd21_base_components() -> dict:
    """The five SD-2.1-base-shaped components with seeded random weights (not saved): unet, vae, text_encoder,
    tokenizer (the tests' small BPE vocabulary, 77 tokens) and scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny_sd import _build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET)
    vae = AutoencoderKL(**VAE)
    text = CLIPTextModel(CLIPTextConfig(**TEXT))
    tokenizer, _ = _build_tokenizer(Path(tempfile.mkdtemp()))
    tokenizer.model_max_length = 77
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=DDIMScheduler(**SCHEDULER))


def build_sd21_base_prior(device: str = "cuda", dtype: str = "auto"):
    """A ``StableDiffusionPrior`` with SD-2.1-base-shaped random weights (epsilon prediction, as 2.1-base)."""
    from csd_backend.priors.stable_diffusion import StableDiffusionPrior

    p = build_sd21_base_components()
    return StableDiffusionPrior.from_components(p["unet"], p["vae"], p["text_encoder"], p["tokenizer"],
                                                p["scheduler"], device=device, dtype=dtype, resolution=512,
                                                source="random SD-2.1-base-shaped")


def save_sd21_base_folder(folder: Path) -> Path:
    """A diffusers folder (``model_index.json`` + unet / vae / text_encoder / tokenizer / scheduler, float32
    safetensors, about 5.2 GB) with SD-2.1-base-shaped random weights, loadable like the real model. Kept and
    reused when ``folder/model_index.json`` exists."""
    import shutil

    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(**build_sd21_base_components(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def parameter_counts(prior) -> dict:
    return {name: sum(p.numel() for p in getattr(prior, name).parameters())
            for name in ("unet", "vae", "text_encoder")}


if __name__ == "__main__":
    p = build_sd21_base_prior("cpu", "float32")
    print({k: f"{v / 1e6:.1f} M" for k, v in parameter_counts(p).items()})
