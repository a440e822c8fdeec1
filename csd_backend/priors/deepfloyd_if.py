"""DeepFloyd IF stage I as a :class:`DiffusionPrior` (pixel space at 64², spec §1.4 stage 1 and §3.1).

The official CSD stage-1 configs (``csd-if.yaml``, ``csd-if-object.yaml``) distil ``DeepFloyd/IF-I-XL-v1.0``:

* no VAE: a render ``x`` in [0, 1] becomes ``z = 2x − 1``, resized bilinearly to the UNet's ``sample_size`` (64);
* the UNet predicts 6 channels, ε and the learned variance (``variance_type: learned_range``): only the first 3
  (ε) are kept;
* text goes through the T5 encoder (T5-XXL in IF-I-XL, ~10 GB in fp16) with 77 tokens, as threestudio's
  ``deep-floyd-prompt-processor`` (no lower-casing or caption cleaning: the prompt is tokenized as written). The
  embeddings are cached per prompt; once a run's prompts are encoded, :meth:`DeepFloydIFPrior.release_text_encoder`
  frees the encoder (threestudio never keeps it next to the UNet);
* the pipeline's own ``DDPMScheduler`` (``squaredcos_cap_v2``, 1000 steps): only ``alphas_cumprod`` is used;
* weights in fp16 on CUDA, fp32 on the CPU (``dtype="auto"``); the UNet output is returned as fp32.

``load_deepfloyd_if(source)`` takes a diffusers IF folder (``model_index.json`` naming ``IFPipeline``, with
``text_encoder/ tokenizer/ unet/ scheduler/``; ``safety_checker/ feature_extractor/ watermarker/`` are not needed) or
a hub id such as ``DeepFloyd/IF-I-XL-v1.0`` (resolved through the Hugging Face cache like the Stable Diffusion
loader; the official model is gated). ``load_prior`` picks this loader when ``model_index.json`` names an IF
pipeline (:func:`is_deepfloyd_if`). Every failure to find or read weights is a :class:`ModelNotFoundError` saying
what was looked for, where, and how to fix it.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError, CSDError, ModelNotFoundError
from . import hub
from .base import (DiffusionPrior, check_prediction_type, freeze, place_modules, positive_int,
                   resize_renders, scaled_input_size, unet_inputs, warn_if_truncated)
from .resolution import choose_resolution
from .stable_diffusion import resolve_device, resolve_dtype, v_to_eps

log = logging.getLogger("csd_backend")

__all__ = ["DeepFloydIFPrior", "load_deepfloyd_if", "is_deepfloyd_if", "model_index_class", "REQUIRED_SUBFOLDERS",
           "IF_HUB_ID", "TEXT_MAX_LENGTH"]

#: sub-folders of a diffusers IF folder that the prior needs (safety_checker, feature_extractor, watermarker: not)
REQUIRED_SUBFOLDERS = ("text_encoder", "tokenizer", "unet", "scheduler")
#: the stage-I model of the official CSD configs
IF_HUB_ID = "DeepFloyd/IF-I-XL-v1.0"
#: T5 tokens per prompt (threestudio's deep-floyd-prompt-processor and diffusers' IFPipeline)
TEXT_MAX_LENGTH = 77
#: the stage-I pipeline classes (same UNet); the super-resolution stages take 6 input channels and a noise level
_STAGE1_CLASSES = ("IFPipeline", "IFImg2ImgPipeline", "IFInpaintingPipeline")
_FP16_FILE = re.compile(r"\.fp16[.-]")
_GATED_HINT = (f"The official DeepFloyd IF models are gated: accept the license on https://huggingface.co/{IF_HUB_ID} "
               "with your Hugging Face account and log in (`huggingface-cli login`) before downloading")


# ------------------------------------------------------------------------------------------ detection
def _read_index(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cached_index_file(repo: str, cache_dir=None) -> Optional[Path]:
    """``model_index.json`` of a hub id in the Hugging Face cache (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "model_index.json", cache_dir=cache_dir)
    except Exception:  # malformed id etc.
        return None
    return Path(found) if isinstance(found, str) else None


def _is_hub_id(raw: str) -> bool:
    return bool(hub.HUB_ID.match(raw)) and not raw.startswith((".", "~"))


def model_index_class(source: str | os.PathLike, cache_dir=None) -> Optional[str]:
    """The ``_class_name`` of the ``model_index.json`` of a diffusers folder or of a hub id in the Hugging Face cache
    (no network); None when there is none."""
    raw = str(source)
    path = Path(os.path.expanduser(raw))
    if path.is_dir():
        index = path / "model_index.json"
    elif not path.exists() and _is_hub_id(raw):
        index = _cached_index_file(raw, cache_dir)
    else:
        return None
    data = _read_index(index) if index is not None and index.is_file() else None
    name = data.get("_class_name") if data else None
    return name if isinstance(name, str) else None


def _looks_like_if_hub_id(raw: str) -> bool:
    """A hub id of a DeepFloyd IF model by its name (for ids that are not in the cache: the loader then says how to
    get the gated model instead of treating it as Stable Diffusion)."""
    if not _is_hub_id(raw):
        return False
    owner, _, name = raw.partition("/")
    return owner.lower() == "deepfloyd" or name.upper().startswith("IF-")


def is_deepfloyd_if(source: str | os.PathLike, cache_dir=None) -> bool:
    """Whether ``source`` is a DeepFloyd IF pipeline: its ``model_index.json`` (folder, or a cached hub id) names an
    IF pipeline class, or it is an uncached hub id of a DeepFloyd IF model (``DeepFloyd/IF-I-XL-v1.0``)."""
    raw = str(source)
    name = model_index_class(raw, cache_dir)
    if name is not None:
        return "IF" in name
    path = Path(os.path.expanduser(raw))
    return not path.exists() and _looks_like_if_hub_id(raw)


# ------------------------------------------------------------------------------------------------ prior
class DeepFloydIFPrior(DiffusionPrior):
    """A frozen DeepFloyd IF stage-I UNet + T5 text encoder, in pixel space.

    Inputs are renders ``[B, H, W, 3]`` in [0, 1]; the diffusion input is ``z = 2x − 1`` ``[B, 3, h, w]`` at the
    UNet's native size (64² for IF-I). ``predict_noise`` returns the ε channels (the first 3 of the UNet's 6).
    """

    name = "deepfloyd-if"

    def __init__(
        self,
        unet,
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
        in_ch = int(unet.config.in_channels)
        out_ch = int(unet.config.out_channels)
        if in_ch != 3 or out_ch not in (3, 6):
            raise ConfigError(
                "model", f"the UNet of {source} takes {in_ch} channels and predicts {out_ch}; a DeepFloyd IF stage-I "
                         "UNet takes 3 (RGB) and predicts 6 (ε and the learned variance). Super-resolution stages "
                         f"(IF-II, IF-III) cannot be the prior: use the stage-I model, e.g. {IF_HUB_ID}")
        self.unet = freeze(unet)
        self.text_encoder = freeze(text_encoder)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.source = str(source)
        self.eps_channels = 3  # the learned-variance channels that follow are dropped
        self.size_multiple = 2 ** (len(unet.config.block_out_channels) - 1)
        self.native_resolution = positive_int(getattr(unet.config, "sample_size", None)) or 64
        self.resolution, warning = choose_resolution(self.native_resolution, resolution, max_resolution)
        if warning:
            log.warning(warning)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_components(
        cls,
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        resolution: Optional[int] = None,
        max_resolution: Optional[int] = None,
        source: str = "<components>",
    ) -> "DeepFloydIFPrior":
        """Build the prior from already-loaded diffusers/transformers modules.

        ``scheduler`` is a diffusers scheduler (or a config dict for one; IF uses ``DDPMScheduler``); only its
        ``alphas_cumprod`` and prediction type are used. The modules are moved to ``device`` (``"auto"``: CUDA if
        available); with ``dtype=None`` they keep their dtype, otherwise they are cast (``"auto"``: fp16 on CUDA,
        fp32 on the CPU).
        """
        from diffusers import DDPMScheduler

        dev = resolve_device(device)
        if isinstance(scheduler, dict):
            scheduler = DDPMScheduler.from_config(scheduler)
        sched_cfg = dict(scheduler.config)
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is None:  # a scheduler without the table: the DDPM one of the same config has it
            alphas = DDPMScheduler.from_config(sched_cfg).alphas_cumprod
        dt = None if dtype is None else resolve_dtype(dtype, dev)
        mods = place_modules((unet, text_encoder), dev, dt)
        if dev.type == "cuda":
            mods[0] = mods[0].to(memory_format=torch.channels_last)  # as threestudio: faster convolutions
        return cls(
            mods[0],
            mods[1],
            tokenizer,
            torch.as_tensor(alphas).detach().clone(),
            prediction_type=sched_cfg.get("prediction_type", "epsilon"),
            device=dev,
            resolution=resolution,
            max_resolution=max_resolution,
            source=source,
            scheduler=scheduler,
        )

    # ---------------------------------------------------------------------- dtypes
    @property
    def unet_dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # ------------------------------------------------------------------------ text
    @property
    def text_encoder_released(self) -> bool:
        return self.text_encoder is None

    def release_text_encoder(self) -> None:
        """Free the T5 encoder (T5-XXL: ~10 GB in fp16) once the run's prompts are encoded. Cached prompts keep
        working; a new prompt then raises :class:`CSDError` (reload the model to encode it)."""
        if self.text_encoder is None:
            return
        self.text_encoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("DeepFloyd IF: released the T5 text encoder (%d prompts stay cached)", len(self._text_cache))

    def _encode_text_uncached(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.text_encoder is None:
            shown = ", ".join(repr(p) for p in list(prompts)[:3]) + (", ..." if len(prompts) > 3 else "")
            raise CSDError(
                f"the T5 text encoder of the DeepFloyd IF model {self.source} was released "
                f"(release_text_encoder) and the prompt(s) {shown} were not encoded before; reload the model "
                "(load_prior, or re-run CSD Load Diffusion Model) to encode new prompts, and encode every prompt of "
                "a run before releasing the encoder")
        # T5 has no start token: the encoder reads max_length − 1 prompt tokens and the end token
        warn_if_truncated(self.tokenizer, prompts, TEXT_MAX_LENGTH, 0, "the T5 text encoder", self._truncation_warned)
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        dev = next(self.text_encoder.parameters()).device
        with torch.no_grad():
            out = self.text_encoder(tokens.input_ids.to(dev), attention_mask=tokens.attention_mask.to(dev))
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return hidden.to(device=self.device, dtype=self.unet_dtype)

    # ---------------------------------------------------------------------- images
    def input_size(self, height: int, width: int) -> Tuple[int, int]:
        return scaled_input_size(height, width, self.resolution, self.size_multiple,
                                 f"the UNet downsamples {self.size_multiple}×; DeepFloyd IF stage I is trained at "
                                 f"{self.native_resolution}²")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return resize_renders(images, self.input_size, self.device) * 2 - 1

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return ((z.detach().to(torch.float32) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    # ----------------------------------------------------------------------- noise
    @torch.no_grad()
    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
                      control: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ε for ``z_t`` ``[N, 3, h, w]`` (the first 3 UNet output channels; the learned variance is dropped).
        ``control`` is accepted and ignored: IF has no ControlNet."""
        dt = self.unet_dtype
        z_t, t, emb = unet_inputs(z_t, t, embeddings, self.device, dt)
        out = self.unet(z_t.to(dt), t, encoder_hidden_states=emb).sample
        out = out[:, : self.eps_channels].to(torch.float32)
        if self.prediction_type == "v_prediction":
            out = v_to_eps(out, z_t.to(torch.float32), self.alphas_cumprod[t])
        return out


# ---------------------------------------------------------------------------------------------- loading
def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _transformers_dtype_kw(torch_dtype) -> dict:
    import transformers

    major = int(re.match(r"\d+", transformers.__version__).group())
    return {"dtype" if major >= 5 else "torch_dtype": torch_dtype}


def _variants(local: Optional[Path], sub: str, torch_dtype) -> list:
    """The weight variants of a component to try, in order. The official repos ship ``fp16`` files next to the fp32
    ones: fp16 weights come from them (a hub download then fetches only those); other dtypes read the full-precision
    files, or the fp16 ones (cast) when a folder holds only those."""
    if local is None or not (local / sub).is_dir():  # to be downloaded
        return ["fp16", None] if torch_dtype == torch.float16 else [None]
    # diffusion_pytorch_model.fp16.safetensors, model.fp16-00001-of-00002.safetensors, *.safetensors.index.fp16.json
    if not any(_FP16_FILE.search(p.name) for p in (local / sub).iterdir()):
        return [None]
    return ["fp16", None] if torch_dtype == torch.float16 else [None, "fp16"]


def _tokenizer_hint(local: Optional[Path]) -> str:
    folder = local / "tokenizer" if local is not None else None
    if folder is not None and folder.is_dir() and (folder / "spiece.model").is_file() \
            and not (folder / "tokenizer.json").is_file() and importlib.util.find_spec("sentencepiece") is None:
        return (" The tokenizer is a SentencePiece model (spiece.model, no tokenizer.json): reading it needs the "
                "`sentencepiece` and `protobuf` packages (pip install sentencepiece protobuf).")
    return ""


def _load_components(location: str, *, local: Optional[Path], local_files_only: bool, cache_dir, torch_dtype,
                     where: str) -> dict:
    """The four components from a diffusers IF folder or hub id (one per sub-folder)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import T5EncoderModel, T5TokenizerFast

    kw = dict(local_files_only=local_files_only, cache_dir=cache_dir)

    def with_variant(load, sub):
        *first, last = _variants(local, sub, torch_dtype)
        for variant in first:
            try:
                return load(variant)
            except Exception:  # not this variant after all: the next one (its error is the one reported)
                pass
        return load(last)

    loaders = {
        "scheduler": lambda: DDPMScheduler.from_config(DDPMScheduler.load_config(location, subfolder="scheduler", **kw)),
        "tokenizer": lambda: T5TokenizerFast.from_pretrained(location, subfolder="tokenizer", **kw),
        "text_encoder": lambda: with_variant(lambda v: T5EncoderModel.from_pretrained(
            location, subfolder="text_encoder", variant=v, **_transformers_dtype_kw(torch_dtype), **kw), "text_encoder"),
        "unet": lambda: with_variant(lambda v: UNet2DConditionModel.from_pretrained(
            location, subfolder="unet", variant=v, torch_dtype=torch_dtype, **kw), "unet"),
    }
    parts = {}
    for name, load in loaders.items():
        try:
            parts[name] = load()
        except Exception as e:
            gated = type(e).__name__ == "GatedRepoError" or "gated" in str(e).lower()
            hint = f" {_GATED_HINT}." if gated else (_tokenizer_hint(local) if name == "tokenizer" else "")
            raise ModelNotFoundError(
                f"could not load the DeepFloyd IF component '{name}' from {where}: {type(e).__name__}: "
                f"{_first_line(e)}. Check that the '{name}' sub-folder holds its config and weights (re-download the "
                f"model if files are missing or truncated).{hint}"
            ) from e
    unet = parts["unet"]
    if int(unet.config.in_channels) != 3 or int(unet.config.out_channels) not in (3, 6):
        raise ModelNotFoundError(
            f"the UNet of {where} takes {unet.config.in_channels} input channels and predicts "
            f"{unet.config.out_channels}: it is not a DeepFloyd IF stage-I UNet (3 in, 6 out). Use the stage-I model, "
            f"e.g. {IF_HUB_ID}, not a super-resolution stage.")
    return parts


def _check_index(index_file: Path, where: str) -> None:
    """Refuse a ``model_index.json`` that names no IF stage-I pipeline, saying what it is and what to do."""
    data = _read_index(index_file)
    if data is None:
        raise ModelNotFoundError(f"{index_file} could not be read as JSON; re-download the model ({where})")
    name = data.get("_class_name")
    if name in _STAGE1_CLASSES:
        return
    if isinstance(name, str) and "IF" in name:
        raise ModelNotFoundError(
            f"{where} is a DeepFloyd IF '{name}' (a super-resolution stage): only stage I can be the prior (64² "
            f"renders, spec §1.4). Use the stage-I model, e.g. {IF_HUB_ID}.")
    raise ModelNotFoundError(
        f"{where} is not a DeepFloyd IF folder: its model_index.json names {name!r}, not IFPipeline. Load Stable "
        "Diffusion models with the Stable Diffusion loader (load_prior / --model pick the loader from "
        f"model_index.json), or pass a DeepFloyd IF stage-I folder such as a download of {IF_HUB_ID}.")


def load_deepfloyd_if(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    resolution: Optional[int] = None,
    max_resolution: Optional[int] = None,
    cache_dir: Optional[str | os.PathLike] = None,
) -> DeepFloydIFPrior:
    """Load a frozen DeepFloyd IF stage-I prior from a diffusers folder or a hub id.

    ``resolution``: the side the renders are resized to (default: the UNet's ``sample_size``, 64 for IF-I; above it:
    a warning, and the native size). ``max_resolution``: a cap on the default (presets set it).
    ``cache_dir``: Hugging Face hub cache to use instead of the default one.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    offline = hub.hf_offline()
    raw = str(source)
    path = Path(os.path.expanduser(raw))

    if path.is_file():
        raise ModelNotFoundError(
            f"{path} is a single file: DeepFloyd IF loads from a diffusers folder (model_index.json naming IFPipeline "
            f"plus {', '.join(REQUIRED_SUBFOLDERS)}) or a hub id such as {IF_HUB_ID}.")
    if path.is_dir():
        index = path / "model_index.json"
        missing = ([] if index.is_file() else ["model_index.json"]) + \
                  [name for name in REQUIRED_SUBFOLDERS if not (path / name).is_dir()]
        if index.is_file():
            _check_index(index, str(path))
        if missing:
            raise ModelNotFoundError(
                f"{path} is not a complete diffusers DeepFloyd IF folder: missing {', '.join(missing)}. Expected "
                f"model_index.json (IFPipeline) plus the sub-folders {', '.join(REQUIRED_SUBFOLDERS)} as saved by "
                f"diffusers (e.g. a download of {IF_HUB_ID}); safety_checker, feature_extractor and watermarker are "
                "not needed.")
        parts = _load_components(str(path), local=path, local_files_only=True, cache_dir=cache_dir,
                                 torch_dtype=torch_dtype, where=str(path))
    elif _is_hub_id(raw):
        where = hub.hf_cache_dir(cache_dir)
        index = _cached_index_file(raw, cache_dir)
        if index is None:
            fix = (f"To fix: run `huggingface-cli download {raw}` on a machine with internet access (and copy the "
                   f"cache), or point at a local diffusers folder. {_GATED_HINT}")
            refusal = hub.download_refusal(raw, path, cache_dir, fix, what="folder")
            if refusal:
                raise ModelNotFoundError(refusal)
            local = None
        else:
            _check_index(index, f"the hub model '{raw}' (Hugging Face cache {where})")
            local = index.parent
        parts = _load_components(raw, local=local, local_files_only=offline, cache_dir=cache_dir,
                                 torch_dtype=torch_dtype, where=f"the hub model '{raw}' (Hugging Face cache {where})")
    else:
        parent = path.parent if str(path.parent) not in ("", ".") else Path.cwd()
        raise ModelNotFoundError(
            f"model not found: {path} does not exist (looked in {parent.resolve()}). Pass an existing diffusers "
            f"DeepFloyd IF folder or a hub id such as {IF_HUB_ID}.")

    return DeepFloydIFPrior.from_components(
        parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
        device=dev, dtype=torch_dtype, resolution=resolution, max_resolution=max_resolution, source=raw,
    )
