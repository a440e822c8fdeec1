"""Stable Diffusion 1.x / 2.x as a :class:`DiffusionPrior` (latent space, spec §1.4 stage 2 and §5.6).

``load_stable_diffusion(source)`` takes

* a diffusers folder (``model_index.json`` + ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``);
* a single checkpoint file (``.safetensors``, or ``.ckpt``/``.pt``/``.pth`` read with ``weights_only=True``) in
  the original LDM key layout, as found in ComfyUI's ``models/checkpoints``. Its architecture configs come from
  ``config`` (a diffusers folder or hub id; the CLI flag is ``--model-config``) or, when that is not given, from
  the diffusers configs of the matching reference model in the Hugging Face cache;
* a Hugging Face hub id (``stabilityai/stable-diffusion-2-1-base``), resolved through the normal HF cache
  (cache only when ``HF_HUB_OFFLINE`` is set).

Every failure to find or read weights is a :class:`ModelNotFoundError` that says what was looked for, where, and
how to fix it; the original exception is chained.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError, ModelNotFoundError
from . import hub
from .base import (DiffusionPrior, check_prediction_type, freeze, place_modules, positive_int, read_checkpoint_keys,
                   resize_renders, scaled_input_size, unet_inputs, unreadable_checkpoint, warn_if_truncated)
from .resolution import choose_resolution

log = logging.getLogger("csd_backend")

__all__ = ["StableDiffusionPrior", "load_stable_diffusion", "v_to_eps", "REQUIRED_SUBFOLDERS"]

#: sub-folders of a diffusers SD folder that the prior needs
REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
_CONFIG_FLAG = "--model-config"

# reference diffusers configs for single LDM files (what diffusers itself infers, plus SD 2.x-base by file name)
_REF_SD1 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
_REF_SD2 = "stabilityai/stable-diffusion-2-1"
_REF_SD2_BASE = "stabilityai/stable-diffusion-2-1-base"
_KEY_UNET = "model.diffusion_model."
_KEY_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_KEY_V2 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
_KEY_SDXL = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
_CONFIG_FILE_PATTERNS = ["model_index.json", "*/config.json", "*/scheduler_config.json", "tokenizer/*"]


def v_to_eps(v: torch.Tensor, z_t: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """ε from a v-prediction: ``ε = sqrt(ᾱ)·v + sqrt(1-ᾱ)·z_t`` (``ᾱ`` broadcast per item, ``[N]``)."""
    a = alphas_cumprod_t.to(v.dtype).view(-1, *([1] * (v.dim() - 1)))
    return a.sqrt() * v + (1 - a).sqrt() * z_t


# ------------------------------------------------------------------------------------------ small helpers
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        dev = device
    elif str(device).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(str(device))
        except RuntimeError as e:
            raise ConfigError("device", f"{device!r} is not a device; use 'auto', 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{device!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return dev


_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if key not in _DTYPES:
        raise ConfigError("dtype", f"{dtype!r} is not supported; use 'auto', 'fp16', 'bf16' or 'fp32'")
    return _DTYPES[key]


def _missing_parts(folder: Path) -> list:
    return [name for name in REQUIRED_SUBFOLDERS if not (folder / name).is_dir()]


def _fix_hint() -> str:
    return (
        f"pass a diffusers folder of the same architecture with {_CONFIG_FLAG} (config= in Python), "
        "run once with internet access so that diffusers can fetch the configs into the Hugging Face cache, "
        "or load a diffusers folder instead of the single file"
    )


def native_resolution(unet, vae, vae_scale_factor: int) -> int:
    """The image size a model was trained at: the UNet's latent ``sample_size`` × the VAE factor (512 for SD 1.x
    and 2.x-base, 768 for SD 2.x), else the VAE's ``sample_size``, else 512."""
    latent = positive_int(getattr(unet.config, "sample_size", None))
    if latent is not None:
        return latent * vae_scale_factor
    return positive_int(getattr(vae.config, "sample_size", None)) or 512


# ------------------------------------------------------------------------------------------------ prior
class StableDiffusionPrior(DiffusionPrior):
    """A frozen SD 1.x/2.x UNet + VAE + CLIP text encoder.

    Inputs are renders ``[B, H, W, 3]`` in [0, 1]; the diffusion input is the scaled VAE latent ``[B, 4, h/8, w/8]``.
    ``predict_noise`` always returns ε, converting v-predictions (SD 2.x 768) with :func:`v_to_eps`.
    """

    name = "stable-diffusion"

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        alphas_cumprod: torch.Tensor,
        *,
        prediction_type: str = "epsilon",
        device: str | torch.device = "cpu",
        resolution: Optional[int] = None,
        max_resolution: Optional[int] = None,
        source: str = "<components>",
        scheduler=None,
    ):
        super().__init__(alphas_cumprod, device)
        check_prediction_type(prediction_type)
        self.unet = freeze(unet)
        self.vae = freeze(vae)
        self.text_encoder = freeze(text_encoder)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.source = str(source)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        self.native_resolution = native_resolution(unet, vae, self.vae_scale_factor)
        self.resolution, warning = choose_resolution(self.native_resolution, resolution, max_resolution)
        if warning:
            log.warning(warning)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", None) or 0.18215)
        self.controlnet = None  # an optional depth ControlNet (attach_controlnet)
        self.controlnet_scale = 1.0
        self.controlnet_source = None

    def attach_controlnet(self, source: str, scale: float = 1.0) -> "StableDiffusionPrior":
        """Condition every noise prediction on a depth image through the diffusers ControlNet in ``source``."""
        from .controlnet import check_compatible, load_controlnet

        model = load_controlnet(source, self.device, self.unet_dtype)
        check_compatible(model, self.unet, "prior.controlnet")
        self.controlnet, self.controlnet_scale, self.controlnet_source = model, float(scale), str(source)
        return self

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_components(
        cls,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        resolution: Optional[int] = None,
        max_resolution: Optional[int] = None,
        source: str = "<components>",
    ) -> "StableDiffusionPrior":
        """Build the prior from already-loaded diffusers/transformers modules.

        ``scheduler`` is a diffusers scheduler (or a config dict for one); only its betas and prediction type are
        used. The modules are moved to ``device`` (``"auto"``: CUDA if available); with ``dtype=None`` they keep
        their dtype, otherwise they are cast (``"auto"``: fp16 on CUDA, fp32 on CPU).
        """
        from diffusers import DDIMScheduler

        dev = resolve_device(device)
        if isinstance(scheduler, dict):
            scheduler = DDIMScheduler.from_config(scheduler)
        sched_cfg = dict(scheduler.config)
        ddim = scheduler if isinstance(scheduler, DDIMScheduler) else DDIMScheduler.from_config(sched_cfg)
        dt = None if dtype is None else resolve_dtype(dtype, dev)
        mods = place_modules((unet, vae, text_encoder), dev, dt)
        return cls(
            *mods,
            tokenizer,
            ddim.alphas_cumprod.clone(),
            prediction_type=sched_cfg.get("prediction_type", "epsilon"),
            device=dev,
            resolution=resolution,
            max_resolution=max_resolution,
            source=source,
            scheduler=ddim,
        )

    # ---------------------------------------------------------------------- dtypes
    @property
    def unet_dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    # ------------------------------------------------------------------------ text
    def _encode_text_uncached(self, prompts: Sequence[str]) -> torch.Tensor:
        max_length = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
        limit = int(getattr(self.text_encoder.config, "max_position_embeddings", 77))
        if max_length <= 0 or max_length > limit:  # unset (huge) model_max_length
            max_length = limit
        # the encoder sees the start token, max_length − 2 prompt tokens and the end token
        warn_if_truncated(self.tokenizer, prompts, max_length, 1, "the text encoder", self._truncation_warned)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            out = self.text_encoder(tokens.input_ids.to(self.device))
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return hidden.to(device=self.device, dtype=self.unet_dtype)

    # ---------------------------------------------------------------------- images
    def input_size(self, height: int, width: int) -> Tuple[int, int]:
        m, f = self.size_multiple, self.vae_scale_factor
        return scaled_input_size(height, width, self.resolution, m, f"VAE factor {f} × UNet downsampling {m // f}")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_renders(images, self.input_size, self.device)
        x = (x * 2 - 1).to(self.vae_dtype)
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample()  # no generator: seeding torch's global RNG makes it reproducible
        return (z * self.scaling_factor).to(torch.float32)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = (z.to(self.device, torch.float32) / self.scaling_factor).to(self.vae_dtype)
        x = self.vae.decode(z).sample.to(torch.float32)
        return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    # ----------------------------------------------------------------------- noise
    @torch.no_grad()
    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
                      control: Optional[torch.Tensor] = None) -> torch.Tensor:
        dt = self.unet_dtype
        z_t, t, emb = unet_inputs(z_t, t, embeddings, self.device, dt)
        extra = {}
        if control is not None and self.controlnet is not None:
            extra = self._control_residuals(z_t.to(dt), t, emb, control)
        out = self.unet(z_t.to(dt), t, encoder_hidden_states=emb, **extra).sample
        out = out.to(torch.float32)
        if self.prediction_type == "v_prediction":
            out = v_to_eps(out, z_t.to(torch.float32), self.alphas_cumprod[t])
        return out


    def _control_residuals(self, z_t, t, emb, control: torch.Tensor) -> dict:
        """The ControlNet's residuals for the UNet, from condition images ``[N, H, W, 3]`` in [0, 1]."""
        h, w = z_t.shape[-2] * self.vae_scale_factor, z_t.shape[-1] * self.vae_scale_factor
        cond = control.to(self.device, torch.float32).permute(0, 3, 1, 2)
        if cond.shape[-2:] != (h, w):
            cond = F.interpolate(cond, size=(h, w), mode="bilinear", align_corners=False)
        down, mid = self.controlnet(z_t, t, encoder_hidden_states=emb, controlnet_cond=cond.to(z_t.dtype),
                                    conditioning_scale=self.controlnet_scale, return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


# ---------------------------------------------------------------------------------------------- loading
def load_diffusers_parts(location: str, *, local_files_only: bool, cache_dir, torch_dtype, where: str,
                         names=REQUIRED_SUBFOLDERS) -> dict:
    """The components ``names`` (of the five SD ones) from a diffusers folder or hub id (one per sub-folder)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(local_files_only=local_files_only, cache_dir=cache_dir)
    loaders = {
        "scheduler": lambda: DDIMScheduler.from_config(DDIMScheduler.load_config(location, subfolder="scheduler", **kw)),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **kw),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(location, subfolder="text_encoder", dtype=torch_dtype, **kw),
        "vae": lambda: AutoencoderKL.from_pretrained(location, subfolder="vae", torch_dtype=torch_dtype, **kw),
        "unet": lambda: UNet2DConditionModel.from_pretrained(location, subfolder="unet", torch_dtype=torch_dtype, **kw),
    }
    parts = {}
    for name in names:
        load = loaders[name]
        try:
            parts[name] = load()
        except Exception as e:
            raise ModelNotFoundError(
                f"could not load the Stable Diffusion component '{name}' from {where}: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}. Check that the '{name}' sub-folder holds "
                "its config and weights (re-download the model if files are missing or truncated)."
            ) from e
    return parts


def _reference_repo(path: Path, keys: dict) -> str:
    """The hub model whose diffusers configs fit an LDM single file (mirrors diffusers' inference)."""
    in_shape = keys.get(_KEY_UNET_IN)
    if _KEY_SDXL in keys or any(k.startswith("conditioner.") for k in keys):
        raise ModelNotFoundError(
            f"{path} looks like an SDXL checkpoint; only Stable Diffusion 1.x/2.x checkpoints are supported"
        )
    if not any(k.startswith(_KEY_UNET) for k in keys):
        raise ModelNotFoundError(
            f"{path} is not a Stable Diffusion 1.x/2.x checkpoint: it has no UNet weights under '{_KEY_UNET}*' "
            "(is it a LoRA, a VAE or an embedding?). Point at a full SD checkpoint or a diffusers folder."
        )
    if in_shape is not None and len(in_shape) == 4 and in_shape[1] != 4:
        raise ModelNotFoundError(
            f"{path} is not a plain text-to-image checkpoint (its UNet takes {in_shape[1]} input channels, e.g. an "
            "inpainting model); use a regular SD 1.x/2.x checkpoint"
        )
    v2 = keys.get(_KEY_V2)
    if v2 is not None and v2[-1] == 1024:
        # SD 2.x-base (512, ε) and SD 2.x (768, v) have the same weights layout: go by the file name.
        return _REF_SD2_BASE if re.search(r"512|base", path.name, re.I) else _REF_SD2
    return _REF_SD1


def _check_config_folder(folder: Path, what: str) -> None:
    missing = ([] if (folder / "model_index.json").is_file() else ["model_index.json"]) + _missing_parts(folder)
    if missing:
        raise ModelNotFoundError(
            f"{what} {folder} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}. "
            f"Pass a folder with model_index.json and the sub-folders {', '.join(REQUIRED_SUBFOLDERS)} "
            f"(e.g. a downloaded stabilityai/stable-diffusion-2-1-base) with {_CONFIG_FLAG}."
        )


def _resolve_config(config: Optional[str], path: Path, *, offline: bool, cache_dir) -> str:
    """A local diffusers folder (or, online, a hub id) holding the configs for the single file ``path``."""
    if config is not None:
        cfg = Path(os.path.expanduser(str(config)))
        if cfg.exists():
            if not cfg.is_dir():
                raise ModelNotFoundError(
                    f"{_CONFIG_FLAG} {cfg} is a file; it must be a diffusers folder (with model_index.json) or a hub id"
                )
            _check_config_folder(cfg, f"{_CONFIG_FLAG}")
            return str(cfg)
        if not hub.HUB_ID.match(str(config)):
            raise ModelNotFoundError(f"{_CONFIG_FLAG} {config}: no such folder, and it is not a hub id (owner/name)")
        repo, how = str(config), f"the configs of {config} (from {_CONFIG_FLAG})"
    else:
        try:
            keys = read_checkpoint_keys(path, shapes_of=(_KEY_UNET_IN, _KEY_V2))
        except ModelNotFoundError:
            raise
        except Exception as e:
            raise unreadable_checkpoint(path, e) from e
        repo = _reference_repo(path, keys)
        how = f"the diffusers configs of {repo} (the reference model inferred from the checkpoint's layout)"
    why = "HF_HUB_OFFLINE is set"
    if not offline:
        if hub.hub_reachable():
            return repo  # diffusers fetches (only) the config files from the hub
        why = f"there is no network (the hub {hub.hub_host()} did not answer within 3 s)"
    from huggingface_hub import snapshot_download

    where = hub.hf_cache_dir(cache_dir)
    try:
        snap = Path(snapshot_download(repo, local_files_only=True, cache_dir=cache_dir, allow_patterns=_CONFIG_FILE_PATTERNS))
        _check_config_folder(snap, "the cached snapshot")
    except Exception as e:
        raise ModelNotFoundError(
            f"cannot load the single-file checkpoint {path} offline: it needs {how}, which are not in the Hugging "
            f"Face cache ({where}) and {why}. To fix: {_fix_hint()}."
        ) from e
    return str(snap)


def _load_single_file(path: Path, config: Optional[str], *, offline: bool, cache_dir, torch_dtype):
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        # refuse anything that is not plain tensors before diffusers opens it (weights_only semantics)
        try:
            read_checkpoint_keys(path)
        except Exception as e:
            raise unreadable_checkpoint(path, e) from e
    cfg = _resolve_config(config, path, offline=offline, cache_dir=cache_dir)
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=cfg,
            local_files_only=offline or os.path.isdir(cfg),
            cache_dir=cache_dir,
            torch_dtype=torch_dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except ModelNotFoundError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelNotFoundError(
            f"could not load the single-file checkpoint {path} with the configs from {cfg}: {type(e).__name__}: "
            f"{msg}. The configs must describe the same architecture as the checkpoint (SD 1.x vs 2.x); "
            f"pass the matching diffusers folder with {_CONFIG_FLAG}."
        ) from e
    _verify_text_encoder(path, pipe.text_encoder)
    return dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler)


_TOKEN_EMBEDDING_KEYS = (
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",  # SD 1.x (CLIP)
    "cond_stage_model.transformer.embeddings.token_embedding.weight",
    "cond_stage_model.model.token_embedding.weight",  # SD 2.x (OpenCLIP)
)


def _verify_text_encoder(path: Path, text_encoder) -> None:
    """Without ``accelerate`` diffusers loads the single-file text encoder with ``strict=False``, so a key layout it
    does not expect leaves random weights without an error. Compare the token embedding with the file's."""
    if path.suffix.lower() != ".safetensors":
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        key = next((k for k in _TOKEN_EMBEDDING_KEYS if k in f.keys()), None)
        if key is None:
            return
        expected = f.get_tensor(key)
    got = text_encoder.get_input_embeddings().weight.detach().to("cpu", torch.float32)
    if got.shape != expected.shape or not torch.allclose(got, expected.to(torch.float32), rtol=1e-3, atol=1e-3):
        raise ModelNotFoundError(
            f"the text encoder weights of {path} were not loaded (its '{key}' does not match the loaded model); "
            f"the file's text encoder layout is not one diffusers converts. Use a diffusers folder of this model."
        )


def load_stable_diffusion(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    config: Optional[str | os.PathLike] = None,
    resolution: Optional[int] = None,
    max_resolution: Optional[int] = None,
    cache_dir: Optional[str | os.PathLike] = None,
) -> StableDiffusionPrior:
    """Load a frozen SD 1.x/2.x prior from a diffusers folder, an LDM single file or a hub id.

    ``config``: for single files, a diffusers folder or hub id to take the architecture configs from.
    ``resolution``: the side the renders are resized to (default: the model's native size, ``unet.sample_size`` × the
    VAE factor; above it: a warning, and the native size). ``max_resolution``: a cap on the default (presets lower
    the cost with it; a model smaller than the cap keeps its own size, without a warning).
    ``cache_dir``: Hugging Face hub cache to use instead of the default one.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    offline = hub.hf_offline()
    raw = str(source)
    path = Path(os.path.expanduser(raw))
    config = None if config is None else str(config)

    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelNotFoundError(
                f"{path}: unsupported model file type '{path.suffix or '(none)'}'. Use a Stable Diffusion checkpoint "
                f"({', '.join(SINGLE_FILE_SUFFIXES)}) or a diffusers folder containing model_index.json."
            )
        parts = _load_single_file(path, config, offline=offline, cache_dir=cache_dir, torch_dtype=torch_dtype)
    elif path.is_dir():
        missing = _missing_parts(path)
        if missing:
            has_index = (path / "model_index.json").is_file()
            checkpoints = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SINGLE_FILE_SUFFIXES)[:5]
            hint = f" It contains checkpoint files ({', '.join(checkpoints)}): pass one of them instead." if checkpoints else ""
            raise ModelNotFoundError(
                f"{path} is not a diffusers Stable Diffusion folder: "
                f"{'' if has_index else 'no model_index.json, '}missing sub-folders {', '.join(missing)}."
                f"{hint} Expected model_index.json plus {', '.join(REQUIRED_SUBFOLDERS)} (as saved by diffusers), "
                f"or a single .safetensors/.ckpt checkpoint."
            )
        parts = load_diffusers_parts(str(path), local_files_only=True, cache_dir=cache_dir, torch_dtype=torch_dtype,
                                     where=str(path))
    elif hub.HUB_ID.match(raw) and not raw.startswith((".", "~")):
        where = hub.hf_cache_dir(cache_dir)
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = isinstance(try_to_load_from_cache(raw, "model_index.json", cache_dir=cache_dir), str)
        except Exception:  # malformed id etc.
            cached = False
        if not cached:
            fix = (f"To fix: run `huggingface-cli download {raw}` on a machine with internet access (and copy the "
                   f"cache), or point at a local diffusers folder or checkpoint file")
            refusal = hub.download_refusal(raw, path, cache_dir, fix)
            if refusal:
                raise ModelNotFoundError(refusal)
        parts = load_diffusers_parts(
            raw, local_files_only=offline, cache_dir=cache_dir, torch_dtype=torch_dtype,
            where=f"the hub model '{raw}' (Hugging Face cache {where})",
        )
    else:
        parent = path.parent if str(path.parent) not in ("", ".") else Path.cwd()
        raise ModelNotFoundError(
            f"model not found: {path} does not exist (looked in {parent.resolve()}). Pass an existing diffusers "
            f"folder, a .safetensors/.ckpt checkpoint file, or a hub id such as stabilityai/stable-diffusion-2-1-base."
        )

    return StableDiffusionPrior.from_components(
        parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
        device=dev, dtype=torch_dtype, resolution=resolution, max_resolution=max_resolution, source=raw,
    )
