"""Regularisers (spec §3.1, §3.2): orientation, sparsity and opacity of volume renders; normal consistency and
Laplacian smoothing of rendered meshes. Their weights are schedules in ``LossConfig``; a term that does not apply to
the scene kind is zero."""
from __future__ import annotations

import torch

from .render.volume_renderer import RenderOutput


def orientation_loss(out: RenderOutput) -> torch.Tensor:
    """``Σ stopgrad(w)·max(0, n·d)² / #{pixels with opacity > 0}``: penalises normals facing away from the camera."""
    if out.mesh is not None or out.sample_normals is None or out.weights.numel() == 0:
        return out.rgb.new_zeros(())
    facing = (out.sample_normals * out.sample_dirs).sum(-1).clamp_min(0.0)
    visible = (out.opacity > 0).sum().clamp_min(1)
    return (out.weights.detach() * facing ** 2).sum() / visible


def sparsity_loss(out: RenderOutput) -> torch.Tensor:
    """``mean sqrt(opacity² + 0.01)`` (volume renders)."""
    if out.mesh is not None:
        return out.rgb.new_zeros(())
    return torch.sqrt(out.opacity ** 2 + 0.01).mean()


def opaque_loss(out: RenderOutput) -> torch.Tensor:
    """Binary cross-entropy of the opacity with itself (pushes it to 0 or 1; volume renders)."""
    if out.mesh is not None:
        return out.rgb.new_zeros(())
    op = out.opacity.clamp(1e-3, 1 - 1e-3)
    return -(op * torch.log(op) + (1 - op) * torch.log(1 - op)).mean()


def normal_consistency_loss(out: RenderOutput) -> torch.Tensor:
    """Mean over the mesh's edges of ``1 − cos`` of the vertex normals at its ends (spec §3.2)."""
    if out.mesh is None or out.mesh[1].shape[0] == 0:
        return out.rgb.new_zeros(())
    from .scene.tetrahedra import normal_consistency

    return normal_consistency(*out.mesh)


def laplacian_loss(out: RenderOutput) -> torch.Tensor:
    """Uniform Laplacian smoothing of the mesh's vertices."""
    if out.mesh is None or out.mesh[1].shape[0] == 0:
        return out.rgb.new_zeros(())
    from .scene.tetrahedra import laplacian_smoothing

    return laplacian_smoothing(*out.mesh)


REGULARIZERS = {"orient": orientation_loss, "sparsity": sparsity_loss, "opaque": opaque_loss,
                "normal_consistency": normal_consistency_loss, "laplacian": laplacian_loss}
