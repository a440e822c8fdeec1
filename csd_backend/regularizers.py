"""Stage-1 regularisers (spec §3.1). Their weights are schedules in ``LossConfig``."""
from __future__ import annotations

import torch

from .render.volume_renderer import RenderOutput


def orientation_loss(out: RenderOutput) -> torch.Tensor:
    """``Σ stopgrad(w)·max(0, n·d)² / #{pixels with opacity > 0}``: penalises normals facing away from the camera."""
    if out.sample_normals is None or out.weights.numel() == 0:
        return out.rgb.new_zeros(())
    facing = (out.sample_normals * out.sample_dirs).sum(-1).clamp_min(0.0)
    visible = (out.opacity > 0).sum().clamp_min(1)
    return (out.weights.detach() * facing ** 2).sum() / visible


def sparsity_loss(out: RenderOutput) -> torch.Tensor:
    """``mean sqrt(opacity² + 0.01)``."""
    return torch.sqrt(out.opacity ** 2 + 0.01).mean()


def opaque_loss(out: RenderOutput) -> torch.Tensor:
    """Binary cross-entropy of the opacity with itself (pushes it to 0 or 1)."""
    op = out.opacity.clamp(1e-3, 1 - 1e-3)
    return -(op * torch.log(op) + (1 - op) * torch.log(1 - op)).mean()


REGULARIZERS = {"orient": orientation_loss, "sparsity": sparsity_loss, "opaque": opaque_loss}
