"""View-dependent prompt embeddings (spec §5.7) and Perp-Neg's interpolated views (spec §1.3).

Only the positive prompt depends on the view. Directions are evaluated in the order side (default), front,
back, overhead; a later match overrides an earlier one. The negative prompt and the null prompt "" are plain.
With Perp-Neg the positive embedding is interpolated between neighbouring views by azimuth instead, and the two
views it is closest to become negative views with weights ``−f(r)`` (``perp_neg_views``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

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


def shifted_exp_decay(params: Sequence[float], r: float) -> float:
    """Perp-Neg's weight function ``f(a, b, c; r) = a·exp(−b·r) + c``."""
    a, b, c = params
    return a * math.exp(-b * r) + c


def perp_neg_views(elevation: torch.Tensor, azimuth: torch.Tensor, f_fs: Sequence[float], f_sb: Sequence[float],
                   f_fsb: Sequence[float], overhead_threshold: float = 60.0
                   ) -> List[Tuple[Dict[str, float], Tuple[str, str], Tuple[float, float]]]:
    """Per view: (positive mix {direction: weight}, the two negative directions, their weights), spec §1.3.

    With ``a`` the azimuth wrapped to (−180, 180]: front–side (|a| < 90, ``r = 1 − |a|/90``): positive
    ``r·front + (1−r)·side``, negatives (front, side) weighted (−f_fs(r), −f_sf(1−r)) with f_sf = f_fs;
    side–back (``r = 2 − |a|/90``): positive ``r·side + (1−r)·back``, negatives (side, front) weighted
    (−f_sb(r), −f_fsb(r)); above ``overhead_threshold``: the overhead view and zero weights."""
    out = []
    for e, a in zip(elevation.detach().float().cpu().tolist(), azimuth.detach().float().cpu().tolist()):
        a = -((-a + 180.0) % 360.0 - 180.0)  # (−180, 180]
        if e > overhead_threshold:
            out.append(({"overhead": 1.0}, ("front", "side"), (0.0, 0.0)))
        elif abs(a) < 90.0:
            r = 1.0 - abs(a) / 90.0
            out.append(({"front": r, "side": 1.0 - r}, ("front", "side"),
                        (-shifted_exp_decay(f_fs, r), -shifted_exp_decay(f_fs, 1.0 - r))))
        else:
            r = 2.0 - abs(a) / 90.0
            out.append(({"side": r, "back": 1.0 - r}, ("side", "front"),
                        (-shifted_exp_decay(f_sb, r), -shifted_exp_decay(f_fsb, r))))
    return out


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

    def perp_neg(self, elevation: torch.Tensor, azimuth: torch.Tensor, f_fs, f_sb, f_fsb
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Perp-Neg embeddings per view: interpolated positives ``[B, L, D]``, the two negative views
        ``[2, B, L, D]`` and their weights ``[B, 2]`` (spec §1.3)."""
        views = perp_neg_views(elevation, azimuth, f_fs, f_sb, f_fsb, self.overhead_threshold)
        d = self.directional
        pos = torch.stack([sum(w * d[k] for k, w in mix.items()) for mix, _, _ in views], 0)
        negs = torch.stack([torch.stack([d[n[i]] for _, n, _ in views], 0) for i in range(2)], 0)
        weights = torch.tensor([w for _, _, w in views], dtype=torch.float32)
        return pos, negs, weights

    def positive(self, elevation: torch.Tensor, azimuth: torch.Tensor) -> torch.Tensor:
        """Positive embeddings per view ``[B, L, D]``."""
        if not self.view_dependent:
            return self.plain.unsqueeze(0).expand(len(elevation), *self.plain.shape)
        return torch.stack([self.directional[label] for label in self.labels(elevation, azimuth)], 0)
