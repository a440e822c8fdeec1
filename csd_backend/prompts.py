"""View-dependent prompt embeddings (spec §5.7).

Only the positive prompt depends on the view. Directions are evaluated in the order side (default), front,
back, overhead; a later match overrides an earlier one. The negative prompt and the null prompt "" are plain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from .priors.base import DiffusionPrior

DIRECTIONS = ("side", "front", "back", "overhead")


def view_labels(elevation: torch.Tensor, azimuth: torch.Tensor, front_threshold: float = 45.0,
                back_threshold: float = 45.0, overhead_threshold: float = 60.0) -> List[str]:
    """Direction label per view. ``elevation``/``azimuth`` ``[B]`` in degrees (azimuth 0 = front)."""
    a = torch.remainder(azimuth.detach().float().cpu() + 180.0, 360.0) - 180.0  # wrap to [-180, 180)
    e = elevation.detach().float().cpu()
    labels = []
    for ai, ei in zip(a.tolist(), e.tolist()):
        label = "side"
        if abs(ai) < front_threshold:
            label = "front"
        if abs(ai) > 180.0 - back_threshold:
            label = "back"
        if ei > overhead_threshold:
            label = "overhead"
        labels.append(label)
    return labels


def directional_prompt(prompt: str, direction: str) -> str:
    return f"{prompt}, {direction} view"


@dataclass
class PromptEmbeddings:
    """The embeddings one guidance call needs: the positive per view, the negative and the null."""

    prompt: str
    negative_prompt: str
    view_dependent: bool
    front_threshold: float
    back_threshold: float
    overhead_threshold: float
    directional: Dict[str, torch.Tensor]  # direction -> [L, D]
    plain: torch.Tensor  # [L, D] positive without a view suffix
    negative: torch.Tensor  # [L, D]
    null: torch.Tensor  # [L, D]

    @classmethod
    def build(cls, prior: DiffusionPrior, prompt: str, negative_prompt: str = "", view_dependent: bool = True,
              front_threshold: float = 45.0, back_threshold: float = 45.0,
              overhead_threshold: float = 60.0) -> "PromptEmbeddings":
        texts = [prompt, negative_prompt, ""] + [directional_prompt(prompt, d) for d in DIRECTIONS]
        emb = prior.encode_text(texts)
        return cls(prompt, negative_prompt, view_dependent, front_threshold, back_threshold, overhead_threshold,
                   directional={d: emb[3 + i] for i, d in enumerate(DIRECTIONS)},
                   plain=emb[0], negative=emb[1], null=emb[2])

    def labels(self, elevation: torch.Tensor, azimuth: torch.Tensor) -> List[str]:
        return view_labels(elevation, azimuth, self.front_threshold, self.back_threshold, self.overhead_threshold)

    def positive(self, elevation: torch.Tensor, azimuth: torch.Tensor) -> torch.Tensor:
        """Positive embeddings per view ``[B, L, D]``."""
        if not self.view_dependent:
            return self.plain.unsqueeze(0).expand(len(elevation), *self.plain.shape)
        return torch.stack([self.directional[label] for label in self.labels(elevation, azimuth)], 0)
