"""The ``DiffusionPrior`` interface (DESIGN §2, spec §1.4).

A prior turns text into embeddings (cached), renders into its diffusion input space (differentiably), and
predicts noise for a batch of (noisy input, timestep, embedding) without autograd. Guidance code only ever
talks to this interface, so the same CSD/SDS code runs on Stable Diffusion, on the analytic test prior, and
later on DeepFloyd IF or ComfyUI's own models.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, Optional, Sequence, Tuple

import torch


class DiffusionPrior(ABC):
    """A frozen diffusion model seen as a score function."""

    #: short human-readable name (for logs and checkpoints)
    name: str = "prior"

    def __init__(self, alphas_cumprod: torch.Tensor, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float32)  # [T]
        self._text_cache: Dict[str, torch.Tensor] = {}

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
