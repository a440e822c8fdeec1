"""A tiny random-weight Stable-Diffusion-shaped model for tests (no pytest here; see ``conftest.py``).

``build_tiny_sd(root)`` writes two things under ``root``:

* ``root/tiny-sd``: a diffusers folder (``model_index.json`` + unet / vae / text_encoder / tokenizer / scheduler),
  saved with ``StableDiffusionPipeline.save_pretrained``;
* ``root/tiny-sd.safetensors``: the same weights as one file in the original LDM/CompVis key layout
  (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``), the
  layout of SD 1.x checkpoints in ComfyUI's ``models/checkpoints``.

The diffusers → LDM key mapping below is the inverse of diffusers' single-file conversion; it only covers what
SD 1.x-style models contain (CLIP text encoder, no class/addition embeddings) and raises on any key it does not
know, so a silent partial conversion cannot happen.

Shapes: the UNet works on 4×8×8 latents (two levels, one downsampling), the VAE has four levels (factor 8, as in
SD), so a 64×64 render becomes 4×8×8 latents. Text embeddings are ``[N, 77, 32]``.

``build_tiny_sd(root, name="tiny-sd-v", seed=1, prediction_type="v_prediction", resolution=96)`` makes the
counterpart of SD 2.1 (768, v-prediction) to SD 2.1-base: the same shapes and schedule, other weights, v-prediction
and a larger native size.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Dict

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(_BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(_BENCHMARKS))
from toy_prior.train import byte_alphabet  # noqa: E402  (one CLIP byte alphabet for both tiny tokenizers)

import torch

TINY_RESOLUTION = 64
TINY_EMBED_DIM = 32
TINY_MAX_LENGTH = 77


# --------------------------------------------------------------------------------------------- tokenizer
def _write_tokenizer_files(folder: Path) -> None:
    """A hand-written byte-level CLIP vocabulary (+ a few merges) in the vocab.json / merges.txt format."""
    chars = list(byte_alphabet().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges = [("a", "n</w>"), ("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("c", "a"), ("ca", "t</w>")]
    tokens += [a + b for a, b in merges]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def _build_tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    _write_tokenizer_files(tmp)
    vocab = json.loads((tmp / "vocab.json").read_text(encoding="utf-8"))
    merge_lines = (tmp / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in merge_lines if line.strip()]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY_MAX_LENGTH), len(vocab)


# ------------------------------------------------------------------------------------------------ models
def build_tiny_components(tmp: Path, seed: int = 0, prediction_type: str = "epsilon",
                          resolution: int = TINY_RESOLUTION) -> dict:
    """The five SD components with random weights from ``seed`` (not saved), predicting ``prediction_type``
    (epsilon or v_prediction), native size ``resolution``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, n_tokens = _build_tokenizer(tmp)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_EMBED_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000,
            hidden_size=TINY_EMBED_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TINY_MAX_LENGTH,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    assert n_tokens <= text_encoder.config.vocab_size
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    for m in (unet, vae, text_encoder):
        m.eval()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


# --------------------------------------------------------------------------------- diffusers → LDM keys
_UNET_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
]
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet_rest(rest: str, table) -> str:
    head, _, tail = rest.partition(".")
    for new, old in table:
        if head == new:
            return f"{old}.{tail}"
    raise KeyError(rest)


def unet_to_ldm(state: Dict[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict → LDM ``UNetModel`` keys (without the prefix)."""
    layers = config.layers_per_block
    if not isinstance(layers, int):
        raise NotImplementedError("per-block layers_per_block")
    n_levels = len(config.block_out_channels)
    has_attn_up = ["CrossAttn" in t for t in config.up_block_types]

    # flat LDM block index of every diffusers (level, layer)
    down_index, downsample_index, i = {}, {}, 1
    for level in range(n_levels):
        for layer in range(layers):
            down_index[(level, layer)] = i
            i += 1
        if level < n_levels - 1:
            downsample_index[level] = i
            i += 1

    out = {}
    for key, value in state.items():
        prefix, dot, param = key.rpartition(".")
        if prefix in _UNET_TOP:
            out[f"{_UNET_TOP[prefix]}.{param}"] = value
            continue
        m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            level, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = down_index[(level, layer)]
            new = f"input_blocks.{idx}.0.{_resnet_rest(rest, _UNET_RESNET)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
            out[new] = value
            continue
        m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key)
        if m:
            out[f"input_blocks.{downsample_index[int(m[1])]}.0.op.{m[2]}"] = value
            continue
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            kind, j, rest = m[1], int(m[2]), m[3]
            if kind == "resnets":
                out[f"middle_block.{2 * j}.{_resnet_rest(rest, _UNET_RESNET)}"] = value
            else:
                out[f"middle_block.1.{rest}"] = value
            continue
        m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            level, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = level * (layers + 1) + layer
            new = f"output_blocks.{idx}.0.{_resnet_rest(rest, _UNET_RESNET)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
            out[new] = value
            continue
        m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key)
        if m:
            level = int(m[1])
            idx = level * (layers + 1) + layers
            slot = 2 if has_attn_up[level] else 1
            out[f"output_blocks.{idx}.{slot}.conv.{m[2]}"] = value
            continue
        raise KeyError(f"no LDM name for UNet key {key!r}")
    return out


_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def vae_to_ldm(state: Dict[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict → LDM ``AutoencoderKL`` keys (without the prefix)."""
    n_up = len(config.up_block_types)
    out = {}
    for key, value in state.items():
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            out[key] = value
            continue
        side, _, rest = key.partition(".")
        if side not in ("encoder", "decoder"):
            raise KeyError(f"no LDM name for VAE key {key!r}")
        m = re.fullmatch(r"(conv_in|conv_out|conv_norm_out)\.(\w+)", rest)
        if m:
            name = "norm_out" if m[1] == "conv_norm_out" else m[1]
            out[f"{side}.{name}.{m[2]}"] = value
            continue
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
        if m:
            level = int(m[2]) if m[1] == "down" else n_up - 1 - int(m[2])
            tail = m[4].replace("conv_shortcut", "nin_shortcut")
            out[f"{side}.{m[1]}.{level}.block.{m[3]}.{tail}"] = value
            continue
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(\w+)", rest)
        if m:
            level = int(m[2]) if m[1] == "down" else n_up - 1 - int(m[2])
            sampler = "downsample" if m[1] == "down" else "upsample"
            out[f"{side}.{m[1]}.{level}.{sampler}.conv.{m[4]}"] = value
            continue
        m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
        if m:
            out[f"{side}.mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}"] = value
            continue
        m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest)
        if m:
            name = dict(_VAE_ATTN).get(m[1])
            if name is None:
                raise KeyError(f"no LDM name for VAE key {key!r}")
            if m[2] == "weight" and name != "norm":
                value = value.reshape(*value.shape, 1, 1)  # LDM uses 1×1 convolutions
            out[f"{side}.mid.attn_1.{name}.{m[2]}"] = value
            continue
        raise KeyError(f"no LDM name for VAE key {key!r}")
    return out


def clip_to_ldm(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` state dict → SD 1.x ``cond_stage_model.transformer.text_model.*`` keys.

    transformers 5 flattened ``CLIPTextModel`` (no ``text_model.`` prefix); transformers 4 keeps it."""
    out = {}
    for key, value in state.items():
        inner = key if key.startswith("text_model.") else f"text_model.{key}"
        out[f"cond_stage_model.transformer.{inner}"] = value
    return out


def to_ldm_checkpoint(unet, vae, text_encoder) -> Dict[str, torch.Tensor]:
    sd = {}
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()})
    sd.update(clip_to_ldm(text_encoder.state_dict()))
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------- build
def build_tiny_sd(root: Path, name: str = "tiny-sd", seed: int = 0, prediction_type: str = "epsilon",
                  resolution: int = TINY_RESOLUTION) -> dict:
    """Build the tiny model under ``root``: ``{"folder": diffusers folder, "single_file": LDM .safetensors}`` named
    ``name`` (the other arguments: ``build_tiny_components``)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    parts = build_tiny_components(root / "_tokenizer_src", seed, prediction_type, resolution)
    folder = root / name
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder)
    single = root / f"{name}.safetensors"
    save_file(to_ldm_checkpoint(parts["unet"], parts["vae"], parts["text_encoder"]), str(single))
    return dict(folder=folder, single_file=single)


def build_tiny_controlnet(root: Path, sd_folder: Path) -> Path:
    """A random ControlNet shaped after the tiny UNet in ``sd_folder`` (as a depth ControlNet is after SD 1.5), saved
    as a diffusers folder ``root/tiny-controlnet``. Its zero-initialised convolutions (condition embedding output,
    residual outputs) get small random values so that the condition changes the prediction (a freshly made
    ControlNet has no effect)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(sd_folder) / "unet")
    torch.manual_seed(1)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    with torch.no_grad():
        for block in list(net.controlnet_down_blocks) + [net.controlnet_mid_block]:
            block.weight.normal_(0, 0.05)
        net.controlnet_cond_embedding.conv_out.weight.normal_(0, 0.5)
    folder = Path(root) / "tiny-controlnet"
    net.save_pretrained(folder)
    return folder
