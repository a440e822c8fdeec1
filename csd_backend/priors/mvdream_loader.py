"""Loading MVDream (``mvdream.py``): ``load_mvdream(source)`` takes

* **the original checkpoint**, ``sd-v2.1-base-4view.pt`` (or any ``.pt/.ckpt/.pth/.safetensors`` in its LDM key
  layout: ``model.diffusion_model.*`` with ``camera_embed.*``, ``first_stage_model.*``, ``cond_stage_model.model.*``
  and the schedule buffers of MVDream's ``LatentDiffusionInterface``), read with ``weights_only=True``. Its
  architecture is the yaml published with it (``sd-v2-base.yaml``): ``config=`` a yaml file, else a yaml next to the
  checkpoint (same name, or ``sd-v2-base.yaml``), else the published values (:data:`SD_V2_BASE`), checked against
  the checkpoint's shapes. Every key is converted (``ldm_layout.py``) or listed as unused with the reason; an
  unknown key is an error. The file holds no tokenizer: its text encoder reads the tokens of
  ``stabilityai/stable-diffusion-2-1-base`` (what the official runs' prompt processor uses), taken from ``config=``
  (a diffusers SD 2.x or MVDream folder), else the Hugging Face cache, else downloaded;
* **a diffusers-style folder**: ``model_index.json`` naming an MVDream pipeline with ``unet/ vae/ text_encoder/
  tokenizer/ scheduler/``. The UNet is either the LDM-named ``MultiViewUNetModel`` of the published conversion
  (``ashawkey/mvdream-sd2.1-diffusers``: ``unet/config.json`` holds the yaml's UNet parameters) or a diffusers
  ``UNet2DConditionModel`` with the camera embedding as a projection class embedding;
* **a hub id**: a cached diffusers-style repo, or ``MVDream/MVDream`` (the original checkpoint file
  ``sd-v2.1-base-4view.pt``, from the cache or downloaded).

Failures are :class:`ModelNotFoundError` saying what was looked for, where, and how to fix it (missing file, wrong
layout, a model that is not MVDream, a gated or unreachable download).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from ..errors import ModelNotFoundError
from . import hub
from .base import read_checkpoint_keys, read_state_dict, unreadable_checkpoint
from .deepfloyd_if import model_index_class
from .ldm_layout import LayoutError, open_clip_text_from_ldm, unet_from_ldm, vae_from_ldm
from .mvdream import CAMERA_DIM, MVDreamPrior
from .stable_diffusion import SINGLE_FILE_SUFFIXES, load_diffusers_parts, resolve_device, resolve_dtype

__all__ = ["load_mvdream", "is_mvdream", "SD_V2_BASE", "MVDREAM_HUB_ID", "MVDREAM_FILE", "TOKENIZER_REPO",
           "unet_config_from_ldm", "vae_config_from_ldm"]

#: the hub repo and file of the published checkpoint (mvdream/model_zoo.py: "sd-v2.1-base-4view")
MVDREAM_HUB_ID = "MVDream/MVDream"
MVDREAM_FILE = "sd-v2.1-base-4view.pt"
#: whose tokenizer the OpenCLIP text encoder reads (the official runs' stable-diffusion-prompt-processor)
TOKENIZER_REPO = "stabilityai/stable-diffusion-2-1-base"
#: the published sd-v2-base.yaml (bytedance/MVDream mvdream/configs), the values the loader reads
SD_V2_BASE = {"model": {"params": {
    "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "scale_factor": 0.18215,
    "parameterization": "eps",
    "unet_config": {"params": {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_spatial_transformer": True,
        "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024, "use_checkpoint": False,
        "legacy": False, "camera_dim": 16}},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
    "cond_stage_config": {"params": {"freeze": True, "layer": "penultimate"}},
}}}
_UNET, _VAE, _TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."
CAMERA_KEY = _UNET + "camera_embed.0.weight"
#: LatentDiffusionInterface's buffers: betas and ᾱ are checked against the yaml's schedule, the rest derive from them
_SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
             "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
             "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
_FOLDER_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: open_clip's text towers have 64-wide attention heads (ViT-H-14: width 1024, 16 heads)
_OPEN_CLIP_HEAD_WIDTH = 64


# ------------------------------------------------------------------------------------------ detection
def is_mvdream(source: str | os.PathLike, cache_dir=None) -> bool:
    """Whether ``source`` is MVDream: a checkpoint file with MVDream's camera embedding, a folder (or cached hub id)
    whose ``model_index.json`` names an MVDream pipeline or whose UNet is a ``MultiViewUNetModel``, or a hub id of the
    ``MVDream`` organisation."""
    raw = str(source)
    path = Path(os.path.expanduser(raw))
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            return False
        try:
            return CAMERA_KEY in read_checkpoint_keys(path)
        except Exception:  # unreadable: the loader it goes to reports it
            return False
    if path.is_dir():
        return _folder_is_mvdream(path)
    if hub.HUB_ID.match(raw) and not raw.startswith((".", "~")):
        name = model_index_class(raw, cache_dir)
        return ("MVDream" in name) if name else raw.partition("/")[0].lower() == "mvdream"
    return False


def _folder_is_mvdream(folder: Path) -> bool:
    name = model_index_class(str(folder)) or ""
    return "MVDream" in name or _unet_class(folder) == "MultiViewUNetModel"


def _unet_class(folder: Path) -> Optional[str]:
    try:
        data = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("_class_name") if isinstance(data, dict) else None


# ----------------------------------------------------------------------------------------- architecture
def unet_config_from_ldm(p: dict) -> dict:
    """A diffusers ``UNet2DConditionModel`` config for the yaml's ``unet_config.params`` of an MVDream UNet: SD
    2.x's blocks (cross-attention where the downsampling factor is in ``attention_resolutions``, heads of
    ``num_head_channels``, linear projections) and the camera MLP as a projection class embedding."""
    widths = [int(p["model_channels"]) * int(m) for m in p["channel_mult"]]
    attn = [2 ** i in set(p["attention_resolutions"]) for i in range(len(widths))]
    head = int(p.get("num_head_channels", -1))
    heads = [w // head for w in widths] if head > 0 else [int(p["num_heads"])] * len(widths)
    return dict(sample_size=int(p["image_size"]), in_channels=int(p["in_channels"]),
                out_channels=int(p["out_channels"]), block_out_channels=widths,
                layers_per_block=int(p["num_res_blocks"]),
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                cross_attention_dim=int(p["context_dim"]), attention_head_dim=heads,
                use_linear_projection=bool(p.get("use_linear_in_transformer", False)),
                transformer_layers_per_block=int(p.get("transformer_depth", 1)),
                class_embed_type="projection", projection_class_embeddings_input_dim=int(p["camera_dim"]))


def vae_config_from_ldm(dd: dict, scale_factor: float) -> dict:
    """A diffusers ``AutoencoderKL`` config for the yaml's ``first_stage_config.params.ddconfig``."""
    widths = [int(dd["ch"]) * int(m) for m in dd["ch_mult"]]
    return dict(in_channels=int(dd["in_channels"]), out_channels=int(dd["out_ch"]), block_out_channels=widths,
                down_block_types=["DownEncoderBlock2D"] * len(widths),
                up_block_types=["UpDecoderBlock2D"] * len(widths),
                layers_per_block=int(dd["num_res_blocks"]), latent_channels=int(dd["z_channels"]),
                sample_size=int(dd["resolution"]), scaling_factor=float(scale_factor))


def _scheduler(params: dict):
    """The DDIM scheduler of the yaml's schedule (LDM's "linear" β = diffusers' scaled_linear)."""
    from diffusers import DDIMScheduler

    if params.get("parameterization", "eps") != "eps":
        raise ModelNotFoundError(f"parameterization {params['parameterization']!r}: only ε-prediction (eps) MVDream "
                                 f"models are supported")
    return DDIMScheduler(num_train_timesteps=int(params.get("timesteps", 1000)),
                         beta_start=float(params["linear_start"]), beta_end=float(params["linear_end"]),
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type="epsilon")


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["model"]["params"]["unet_config"]["params"]  # noqa: B018 - the parts the loader needs
        data["model"]["params"]["first_stage_config"]["params"]["ddconfig"]  # noqa: B018
    except Exception as e:
        raise ModelNotFoundError(f"{path} is not an MVDream model yaml (like the published sd-v2-base.yaml, with "
                                 f"model.params.unet_config and first_stage_config): {type(e).__name__}: {e}") from e
    return data


def _architecture(path: Path, config: Optional[Path]) -> tuple[dict, str]:
    """(the yaml's ``model.params``, where they came from) for the checkpoint ``path``."""
    candidates = [config] if config is not None and config.suffix.lower() in (".yaml", ".yml") else []
    candidates += [path.with_suffix(".yaml"), path.parent / "sd-v2-base.yaml"]
    for yaml_path in candidates:
        if yaml_path is not None and yaml_path.is_file():
            return _read_yaml(yaml_path)["model"]["params"], str(yaml_path)
    return SD_V2_BASE["model"]["params"], "the published sd-v2-base.yaml"


def _check_shapes(keys: Dict[str, tuple], params: dict, where: str, path: Path) -> None:
    """Refuse an architecture whose sizes are not the checkpoint's (before building anything)."""
    u, dd = params["unet_config"]["params"], params["first_stage_config"]["params"]["ddconfig"]
    facts = [(_UNET + "input_blocks.0.0.weight", 0, int(u["model_channels"]), "unet_config model_channels"),
             (CAMERA_KEY, 1, int(u.get("camera_dim", 0)), "unet_config camera_dim"),
             (_VAE + "encoder.conv_in.weight", 0, int(dd["ch"]), "ddconfig ch"),
             (_VAE + "post_quant_conv.weight", 0, int(dd["z_channels"]), "ddconfig z_channels")]
    for key, dim, want, name in facts:
        shape = keys.get(key)
        if shape is not None and (len(shape) <= dim or shape[dim] != want):
            raise ModelNotFoundError(
                f"{path} does not match {where}: its {key} has shape {tuple(shape)}, the yaml's {name} is {want}. "
                f"Put the yaml published with this checkpoint next to it (same name, .yaml) or pass it with "
                f"--model-config (config= in Python).")


# ------------------------------------------------------------------------------------ the original checkpoint
def _split(state: Dict[str, torch.Tensor], path: Path):
    """The checkpoint's parts by prefix: (unet, vae, text, schedule); any other key is a layout error."""
    parts = {_UNET: {}, _VAE: {}, _TEXT: {}}
    schedule = {}
    for key, value in state.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is not None:
            parts[prefix][key[len(prefix):]] = value
        elif key in _SCHEDULE:
            schedule[key] = value
        elif key.startswith("cond_stage_model.transformer."):
            raise ModelNotFoundError(
                f"{path} has a CLIP ViT-L text encoder ({key}): it is an SD 1.5-based MVDream (sd-v1.5-4view); only "
                f"the SD 2.1-based {MVDREAM_FILE} (OpenCLIP ViT-H) is supported")
        else:
            raise ModelNotFoundError(f"{path} is not in the MVDream checkpoint layout: it has the key {key!r}, which "
                                     f"MVDream's LatentDiffusionInterface does not. Pass {MVDREAM_FILE} as published "
                                     f"(or a diffusers-style MVDream folder).")
    if not parts[_UNET] or not parts[_VAE] or not parts[_TEXT]:
        missing = [p + "*" for p, v in parts.items() if not v]
        raise ModelNotFoundError(f"{path} is not a complete MVDream checkpoint: no {', '.join(missing)} keys")
    return parts[_UNET], parts[_VAE], parts[_TEXT], schedule


def _build(cls_factory, state: Dict[str, torch.Tensor], what: str, where: str):
    """A module from ``cls_factory()`` holding exactly ``state`` (built on the meta device, so no random init is
    paid for; every parameter and buffer must come from ``state``)."""
    with torch.device("meta"):
        module = cls_factory()
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:3]
        raise ModelNotFoundError(f"the {what} weights of {where} do not fit its architecture: {' '.join(lines)[:600]}. "
                                 f"The yaml must be the one published with this checkpoint.") from e
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise ModelNotFoundError(f"the {what} of {where} has no weights for {', '.join(left[:5])}")
    return module.eval()


def convert_checkpoint(state: Dict[str, torch.Tensor], params: dict, path: Path, tokenizer) -> tuple[dict, dict]:
    """The five components from the original checkpoint's ``state`` and its yaml ``params``, and the unused keys
    (``{key: why}``). Every key is either loaded into a component or listed there."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_sd, vae_sd, text_sd, schedule = _split(state, path)
    u, dd = params["unet_config"]["params"], params["first_stage_config"]["params"]["ddconfig"]
    layer = params.get("cond_stage_config", {}).get("params", {}).get("layer", "penultimate")
    try:
        unet_d, _ = unet_from_ldm(unet_sd, int(u["num_res_blocks"]))
        vae_d, vae_unused = vae_from_ldm(vae_sd, len(dd["ch_mult"]))
        n_layers = len({k.split(".")[2] for k in text_sd if k.startswith("transformer.resblocks.")})
        kept = n_layers - (1 if layer == "penultimate" else 0)
        text_d, text_unused = open_clip_text_from_ldm(text_sd, kept)
    except LayoutError as e:
        prefix = {"UNet": _UNET, "VAE": _VAE, "text encoder": _TEXT}[e.part]
        raise ModelNotFoundError(f"{path} is not in MVDream's key layout: the {e.part} key {prefix}{e.key} is not one "
                                 f"of the original LDM model's") from e
    unused = {**{_VAE + k: v for k, v in vae_unused.items()}, **{_TEXT + k: v for k, v in text_unused.items()}}
    unet = _build(lambda: UNet2DConditionModel(**unet_config_from_ldm(u)), unet_d, "UNet", path)
    vae = _build(lambda: AutoencoderKL(**vae_config_from_ldm(dd, params.get("scale_factor", 0.18215))), vae_d,
                 "VAE", path)
    width = text_sd["token_embedding.weight"].shape[1]
    text_cfg = CLIPTextConfig(
        vocab_size=text_sd["token_embedding.weight"].shape[0], hidden_size=width,
        intermediate_size=text_sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], num_hidden_layers=kept,
        num_attention_heads=max(1, width // _OPEN_CLIP_HEAD_WIDTH),
        max_position_embeddings=text_sd["positional_embedding"].shape[0], hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(text_cfg)  # small next to the UNet; its position ids are a buffer it makes itself
    prefix = "text_model." if any(k.startswith("text_model.") for k in text_encoder.state_dict()) else ""
    try:
        text_encoder.load_state_dict({prefix + k: v for k, v in text_d.items()}, strict=True)
    except RuntimeError as e:
        raise ModelNotFoundError(f"the text encoder weights of {path} do not fit an OpenCLIP text tower: "
                                 f"{str(e).splitlines()[0][:400]}") from e
    scheduler = _scheduler(params)
    for name in _SCHEDULE:
        if name not in schedule:
            continue
        if name in ("betas", "alphas_cumprod"):
            mine = getattr(scheduler, name)
            if schedule[name].shape != mine.shape or not torch.allclose(schedule[name].float(), mine, rtol=1e-4,
                                                                        atol=1e-7):
                raise ModelNotFoundError(f"{path}: its noise schedule ({name}) is not the yaml's (linear_start "
                                         f"{params['linear_start']}, linear_end {params['linear_end']})")
        else:
            unused[name] = "a table derived from the noise schedule (recomputed)"
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                scheduler=scheduler), unused


def _clip_tokenizer(location: str, **kwargs):
    """A CLIP tokenizer from ``location``'s tokenizer/ sub-folder, or None when it has no vocabulary there
    (transformers 5 returns a tokenizer of the special tokens alone instead of failing)."""
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **kwargs)
    except Exception:
        return None
    return tokenizer if tokenizer.vocab_size > 256 else None  # a byte-level BPE has at least the 256 bytes


def _tokenizer(config, path: Path, *, offline: bool, cache_dir):
    """The CLIP tokenizer for an original checkpoint: from ``config`` (a diffusers folder or hub id), else the cache
    of :data:`TOKENIZER_REPO`, else downloaded."""
    if config is not None and not str(config).lower().endswith((".yaml", ".yml")):
        where = str(config)
        tokenizer = _clip_tokenizer(where, local_files_only=offline or os.path.isdir(where), cache_dir=cache_dir)
        if tokenizer is None:
            raise ModelNotFoundError(f"--model-config {where}: no CLIP tokenizer in its tokenizer/ sub-folder; give a "
                                     f"diffusers Stable Diffusion 2.x or MVDream folder (e.g. a download of "
                                     f"{TOKENIZER_REPO})")
        return tokenizer
    tokenizer = _clip_tokenizer(TOKENIZER_REPO, local_files_only=True, cache_dir=cache_dir)
    if tokenizer is not None:
        return tokenizer
    why = "HF_HUB_OFFLINE is set" if offline else \
        f"there is no network (the hub {hub.hub_host()} did not answer within 3 s)"
    if not offline and hub.hub_reachable():
        tokenizer = _clip_tokenizer(TOKENIZER_REPO, cache_dir=cache_dir)
        if tokenizer is not None:
            return tokenizer
        why = "downloading it failed"
    raise ModelNotFoundError(
        f"{path} holds no tokenizer: its OpenCLIP text encoder reads the tokens of {TOKENIZER_REPO}'s tokenizer, which "
        f"is not in the Hugging Face cache ({hub.hf_cache_dir(cache_dir)}) and {why}. To fix: pass a diffusers Stable "
        f"Diffusion 2.x (or MVDream) folder with --model-config (config= in Python, config_from on the node), or run "
        f"`huggingface-cli download {TOKENIZER_REPO} --include 'tokenizer/*'` once with internet access.")


def load_checkpoint_parts(path: Path, config, *, offline: bool, cache_dir) -> tuple[dict, dict]:
    """(components, unused keys) of an original MVDream checkpoint file."""
    try:
        keys = read_checkpoint_keys(path, shapes_of=(_UNET + "input_blocks.0.0.weight", CAMERA_KEY,
                                                     _VAE + "encoder.conv_in.weight", _VAE + "post_quant_conv.weight"))
    except Exception as e:
        raise unreadable_checkpoint(path, e) from e
    if CAMERA_KEY not in keys:
        raise ModelNotFoundError(f"{path} is not an MVDream checkpoint: it has no camera embedding ({CAMERA_KEY}); "
                                 "load a plain Stable Diffusion checkpoint as a Stable Diffusion model")
    cfg_path = Path(os.path.expanduser(str(config))) if config is not None else None
    if cfg_path is not None and cfg_path.suffix.lower() in (".yaml", ".yml") and not cfg_path.is_file():
        raise ModelNotFoundError(f"--model-config {cfg_path}: no such yaml file")
    params, where = _architecture(path, cfg_path)
    _check_shapes(keys, params, where, path)
    tokenizer = _tokenizer(config, path, offline=offline, cache_dir=cache_dir)
    try:
        state = read_state_dict(path)
    except Exception as e:
        raise unreadable_checkpoint(path, e) from e
    return convert_checkpoint(state, params, path, tokenizer)


# --------------------------------------------------------------------------------------- diffusers-style folders
_UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


def _folder_unet(folder: Path, torch_dtype):
    """The UNet of a diffusers-style MVDream folder: an LDM-named ``MultiViewUNetModel`` (converted) or a diffusers
    ``UNet2DConditionModel`` with the camera as its projection class embedding."""
    from diffusers import UNet2DConditionModel

    sub = folder / "unet"
    if _unet_class(folder) != "MultiViewUNetModel":
        try:
            unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", torch_dtype=torch_dtype,
                                                        local_files_only=True)
        except Exception as e:
            raise ModelNotFoundError(f"could not load the MVDream component 'unet' from {folder}: {type(e).__name__}: "
                                     f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from e
        if unet.config.class_embed_type != "projection" or \
                int(unet.config.projection_class_embeddings_input_dim or 0) != CAMERA_DIM:
            raise ModelNotFoundError(f"the UNet of {folder} has no MVDream camera embedding (class_embed_type "
                                     f"'projection' with {CAMERA_DIM} inputs): it is not an MVDream UNet")
        return unet
    # the published conversion's MultiViewUNetModel always projects with linear layers (its config drops the flag)
    params = {"use_linear_in_transformer": True, **json.loads((sub / "config.json").read_text(encoding="utf-8"))}
    weights = next((sub / n for n in _UNET_WEIGHTS if (sub / n).is_file()), None)
    if weights is None:
        raise ModelNotFoundError(f"{sub} has no weights: expected one of {', '.join(_UNET_WEIGHTS)}")
    try:
        state = read_state_dict(weights)
        converted, _ = unet_from_ldm(state, int(params["num_res_blocks"]))
        config = unet_config_from_ldm(params)
    except LayoutError as e:
        raise ModelNotFoundError(f"{weights} is not in MVDream's UNet layout: its key {e.key!r} is not one of the "
                                 "original LDM model's") from e
    except (KeyError, TypeError, ValueError) as e:
        raise ModelNotFoundError(f"{sub / 'config.json'} is not an MVDream MultiViewUNetModel config ({e})") from e
    except Exception as e:
        raise unreadable_checkpoint(weights, e) from e
    return _build(lambda: UNet2DConditionModel(**config), converted, "UNet", sub)


def _load_folder(folder: Path, *, cache_dir, torch_dtype, where: str) -> dict:
    missing = [n for n in _FOLDER_PARTS if not (folder / n).is_dir()]
    if missing:
        raise ModelNotFoundError(f"{where} is not a complete diffusers-style MVDream folder: missing "
                                 f"{', '.join(missing)}. Expected model_index.json plus {', '.join(_FOLDER_PARTS)} "
                                 f"(e.g. ashawkey/mvdream-sd2.1-diffusers), or the original {MVDREAM_FILE}.")
    parts = load_diffusers_parts(str(folder), local_files_only=True, cache_dir=cache_dir, torch_dtype=torch_dtype,
                                 where=where, names=("scheduler", "tokenizer", "text_encoder", "vae"))
    parts["unet"] = _folder_unet(folder, torch_dtype)
    return parts


def _hub_file(raw: str, path: Path, cache_dir) -> Path:
    """The original checkpoint of the hub repo ``raw`` (:data:`MVDREAM_FILE`), from the cache or downloaded."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(raw, MVDREAM_FILE, cache_dir=cache_dir)
    except Exception:
        cached = None
    if isinstance(cached, str):
        return Path(cached)
    fix = (f"To fix: run `huggingface-cli download {raw} {MVDREAM_FILE}` on a machine with internet access (and "
           "copy the cache), or point at the downloaded file or a diffusers-style MVDream folder")
    refusal = hub.download_refusal(raw, path, cache_dir, fix)
    if refusal:
        raise ModelNotFoundError(refusal)
    try:
        return Path(hf_hub_download(raw, MVDREAM_FILE, cache_dir=cache_dir))
    except Exception as e:
        gated = type(e).__name__ == "GatedRepoError" or "gated" in str(e).lower()
        hint = (f" The repository is gated: accept its conditions on https://huggingface.co/{raw} with your Hugging "
                "Face account and log in (`huggingface-cli login`), then retry." if gated else f" {fix}.")
        raise ModelNotFoundError(f"could not download {MVDREAM_FILE} from the hub repo '{raw}': {type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}.{hint}") from e


def load_mvdream(source: str | os.PathLike, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                 config: Optional[str | os.PathLike] = None, resolution: Optional[int] = None,
                 max_resolution: Optional[int] = None, cache_dir: Optional[str | os.PathLike] = None) -> MVDreamPrior:
    """Load a frozen MVDream prior from the original checkpoint, a diffusers-style folder or a hub id (module
    docstring). ``config``: for the checkpoint, its yaml, or a diffusers folder (or hub id) to take the tokenizer
    from. ``resolution``/``max_resolution``: as for Stable Diffusion (native: 256 for the published model)."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    offline = hub.hf_offline()
    raw = str(source)
    path = Path(os.path.expanduser(raw))
    if path.is_dir():
        parts = _load_folder(path, cache_dir=cache_dir, torch_dtype=torch_dtype, where=str(path))
    elif path.is_file() or (hub.HUB_ID.match(raw) and not raw.startswith((".", "~"))):
        if not path.is_file():
            name = model_index_class(raw, cache_dir)
            if name is not None and "MVDream" in name:
                from huggingface_hub import try_to_load_from_cache

                snapshot = Path(try_to_load_from_cache(raw, "model_index.json", cache_dir=cache_dir)).parent
                where = f"the hub model '{raw}' (Hugging Face cache {hub.hf_cache_dir(cache_dir)})"
                parts = _load_folder(snapshot, cache_dir=cache_dir, torch_dtype=torch_dtype, where=where)
                return _prior(parts, dev, torch_dtype, resolution, max_resolution, raw)
            path = _hub_file(raw, path, cache_dir)
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelNotFoundError(f"{path}: unsupported model file type '{path.suffix or '(none)'}'. Use the "
                                     f"MVDream checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}) or a diffusers-style "
                                     "folder.")
        parts, _unused = load_checkpoint_parts(path, config, offline=offline, cache_dir=cache_dir)
    else:
        parent = path.parent if str(path.parent) not in ("", ".") else Path.cwd()
        raise ModelNotFoundError(f"model not found: {path} does not exist (looked in {parent.resolve()}). Pass the "
                                 f"MVDream checkpoint ({MVDREAM_FILE}), a diffusers-style MVDream folder, or the hub "
                                 f"id {MVDREAM_HUB_ID}.")
    return _prior(parts, dev, torch_dtype, resolution, max_resolution, raw)


def _prior(parts: dict, dev, torch_dtype, resolution, max_resolution, source: str) -> MVDreamPrior:
    return MVDreamPrior.from_components(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                                        parts["scheduler"], device=dev, dtype=torch_dtype, resolution=resolution,
                                        max_resolution=max_resolution, source=source)

