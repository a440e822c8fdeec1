"""The ``DiffusionPrior`` interface (DESIGN §2, spec §1.4).

A prior turns text into embeddings (cached), renders into its diffusion input space (differentiably), and
predicts noise for a batch of (noisy input, timestep, embedding) without autograd. Guidance code only ever
talks to this interface, so the same CSD/SDS code runs on Stable Diffusion, on the analytic test prior, and
later on DeepFloyd IF or ComfyUI's own models.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError, ModelNotFoundError

log = logging.getLogger(__name__)
#: how much of a prompt's ignored tail a truncation warning quotes
SHOWN_TAIL = 60


class DiffusionPrior(ABC):
    """A frozen diffusion model seen as a score function."""

    #: short human-readable name (for logs and checkpoints)
    name: str = "prior"

    def __init__(self, alphas_cumprod: torch.Tensor, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float32)  # [T]
        self._text_cache: Dict[str, torch.Tensor] = {}
        self._truncation_warned: set = set()  # the kept part of every prompt already warned about

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    # ------------------------------------------------------------------ text
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embeddings for ``prompts``: ``[N, ...]`` (cached per prompt string)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            emb = self._encode_text_uncached(list(missing))
            for p, e in zip(missing, emb):
                self._text_cache[p] = e.detach()
        return torch.stack([self._text_cache[p] for p in prompts], 0)

    @abstractmethod
    def _encode_text_uncached(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embeddings for ``prompts`` without the cache: ``[N, ...]``."""

    # ---------------------------------------------------------------- images
    @abstractmethod
    def input_size(self, height: int, width: int) -> Tuple[int, int]:
        """Image size (h, w) that a ``height``×``width`` render is resized to before encoding.

        Raises ``ConfigError`` when the prior cannot take a render of that size.
        """

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Renders ``[B, H, W, 3]`` in [0, 1] → diffusion input ``z`` ``[B, C, h, w]`` (differentiable)."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion input ``[B, C, h, w]`` → images ``[B, H, W, 3]`` in [0, 1] (for previews; optional)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- noise
    #: an optional ControlNet that ``predict_noise`` conditions on ``control`` images (Stable Diffusion only)
    controlnet = None
    #: VSD: an optional second prior whose UNet carries the LoRA (``prior.lora_base_model``); None: this prior's own
    lora_prior: Optional["DiffusionPrior"] = None
    #: a multi-view prior (MVDream): ``predict_noise`` also takes ``cameras`` (the engine's c2w ``[N, 4, 4]``) and
    #: ``num_views`` (consecutive images per object); the guidance passes them only to such priors
    multiview: bool = False

    @abstractmethod
    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
                      control: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ε prediction for ``z_t`` ``[N, C, h, w]`` at integer timesteps ``t`` ``[N]`` with ``embeddings``
        ``[N, ...]``, conditioned on ``control`` images ``[N, H, W, 3]`` when the prior has a ControlNet. Runs
        without autograd in one batched call; returns float32 ``[N, C, h, w]``."""

    def add_noise(self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``z_t = sqrt(ᾱ_t)·z + sqrt(1-ᾱ_t)·ε`` with per-item ``t`` ``[B]``."""
        a = self.alphas_cumprod[t].view(-1, *([1] * (z.dim() - 1)))
        return a.sqrt() * z + (1 - a).sqrt() * noise


def scaled_input_size(height: int, width: int, resolution: int, multiple: int, why: str) -> Tuple[int, int]:
    """``(h, w)``: a ``height``×``width`` render scaled to ``resolution`` rows with its aspect ratio kept. Both
    sides must be multiples of ``multiple`` (``why``: what imposes it), else a ``ConfigError`` on "render size"."""
    if int(height) <= 0 or int(width) <= 0:
        raise ConfigError("render size", f"{height}×{width} must be positive")
    h = int(resolution)
    w = int(round(h * int(width) / int(height)))
    m = int(multiple)
    if h % m or w % m or w <= 0:
        lo = (h // m) * m
        options = [x for x in (lo, lo + m) if x > 0]
        raise ConfigError(
            "render size",
            f"a {height}×{width} render is resized to {h}×{w} for this model (resolution {resolution}), but both "
            f"sides must be multiples of {m} ({why}); use a resolution such as {' or '.join(map(str, options))} "
            f"and square renders (or an aspect ratio that keeps the width a multiple of {m})")
    return h, w


def resize_renders(images: torch.Tensor, input_size, device) -> torch.Tensor:
    """Renders ``[B, H, W, 3]`` in [0, 1] → ``[B, 3, h, w]`` float32 on ``device``, ``(h, w) = input_size(H, W)``
    (bilinear, differentiable)."""
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected [B, H, W, 3] images in [0, 1], got {tuple(images.shape)}")
    size = input_size(images.shape[1], images.shape[2])
    x = images.to(device, torch.float32).permute(0, 3, 1, 2)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(
            "prediction_type", f"{prediction_type!r} is not supported; the scheduler must predict 'epsilon' or 'v_prediction'"
        )


def place_modules(modules: Sequence[torch.nn.Module], device: torch.device,
                  dtype: Optional[torch.dtype]) -> list:
    """``modules`` moved to ``device`` and, when ``dtype`` is given and differs, cast to it (the loaders' parts)."""
    placed = []
    for m in modules:
        m = m.to(device=device)
        if dtype is not None and next(m.parameters()).dtype != dtype:
            m = m.to(dtype=dtype)
        placed.append(m)
    return placed


def unet_inputs(z_t: torch.Tensor, t, embeddings: torch.Tensor, device: torch.device, dtype: torch.dtype):
    """``(z_t, t, embeddings)`` for a UNet call: detached on ``device``, ``t`` a long ``[N]`` (one timestep is
    expanded to the batch), the embeddings in the UNet's ``dtype`` (``z_t`` keeps its own: callers need it in
    float32 for the v → ε conversion)."""
    z_t = z_t.detach().to(device)
    t = torch.as_tensor(t, device=device).long().reshape(-1)
    if t.numel() == 1 and z_t.shape[0] > 1:
        t = t.expand(z_t.shape[0])
    return z_t, t, embeddings.detach().to(device, dtype)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def positive_int(value) -> Optional[int]:
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def warn_if_truncated(tokenizer, prompts: Sequence[str], max_length: int, start_tokens: int, encoder: str,
                      seen: set) -> None:
    """Warn when a prompt is longer than the text encoder reads (``max_length`` tokens with ``start_tokens``
    before the text and an end token after it), naming the cut: once per cut (the view-dependent variants of
    one long prompt are cut at the same place), quoting at most ``SHOWN_TAIL`` characters of what is ignored."""
    for prompt in prompts:
        ids = tokenizer(prompt, truncation=False, add_special_tokens=True, verbose=False).input_ids
        if len(ids) <= max_length:
            continue
        kept = tokenizer.decode(ids[start_tokens:max_length - 1], skip_special_tokens=True).strip()
        if kept in seen:
            continue
        seen.add(kept)
        dropped = tokenizer.decode(ids[max_length - 1:], skip_special_tokens=True).strip()
        more = len(dropped) - SHOWN_TAIL
        ignored = f'"{dropped}"' if more <= 0 else f'"{dropped[:SHOWN_TAIL]}..." and {more} more characters'
        log.warning('the prompt is %d tokens long but %s reads %d (%d of text): it is cut after "...%s"; ignored: '
                    '%s. Shorten the prompt.', len(ids), encoder, max_length, max_length - 1 - start_tokens,
                    kept[-40:], ignored)


# ------------------------------------------------------------------------------------- single checkpoint files
def _torch_state(path: Path, mmap: bool) -> dict:
    """The state dict in a pickle checkpoint, read with ``weights_only=True`` (``state_dict`` wrappers unpacked)."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError:  # not a zip-format file: mmap is impossible
        if not mmap:
            raise
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    while isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError("the file does not hold a state dict")
    return sd


def read_checkpoint_keys(path: Path, shapes_of: Sequence[str] = ()) -> dict:
    """``{key: shape}`` of a single checkpoint file, read cheaply (the safetensors header, where only the keys
    ``shapes_of`` get their shape, others None; a mmap'd weights-only load of a pickle)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in shapes_of if k in keys}
        return {k: shapes.get(k) for k in keys}
    sd = _torch_state(path, mmap=True)
    return {k: tuple(v.shape) if torch.is_tensor(v) else None for k, v in sd.items()}


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a single checkpoint file (``.safetensors``, or a pickle read with ``weights_only=True``)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return {k: v for k, v in _torch_state(path, mmap=True).items() if torch.is_tensor(v)}


def unreadable_checkpoint(path: Path, e: Exception) -> ModelNotFoundError:
    """A model checkpoint torch refused to read with weights_only=True (never quoting torch's advice to turn it
    off), or could not read at all."""
    from ..io import describe_unsafe_pickle

    text = describe_unsafe_pickle(path, e, what="model checkpoint")
    if text is None:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        text = f"could not read the checkpoint {path}: {type(e).__name__}: {first[:300]}"
    return ModelNotFoundError(f"{text} Convert it to .safetensors or use a diffusers folder.")
