"""Adaptive density control of 3D Gaussian Splatting (Kerbl et al. 2023, as DreamGaussian runs it), applied after
each parameter update by ``GaussianRenderer.after_update``; every threshold and interval is a schedule of
``SceneConfig.gaussians`` (``gaussian_config.py``).

Within ``[densify_from, densify_until]`` each step adds, per Gaussian seen by a camera, the norm of the loss
gradient on its projected 2D mean in NDC units (pixel gradient × (W/2, H/2), 3DGS's convention; one count per
camera that sees it) and keeps its largest screen radius. Every ``densify_every`` steps, Gaussians whose mean
gradient reaches ``densify_grad_threshold`` are **cloned** when their largest scale is at most ``percent_dense ×
extent`` and **split** otherwise (``split_count`` children drawn from the Gaussian itself, scales divided by
``split_scale_divisor × split_count``, the parent removed); then Gaussians below ``prune_opacity``, larger than
``prune_scale × extent`` or (``prune_screen_size`` > 0) wider on screen than that many pixels are **pruned**, and
the statistics restart. Every ``opacity_reset_every`` steps opacities are clamped to ``opacity_reset_value`` and
their Adam moments zeroed. New Gaussians start with zero Adam moments; the survivors keep theirs.

``max_gaussians`` caps the count: when densification would pass it, the candidates with the largest gradients
are taken first and one warning names the setting. A non-finite parameter after an update stops the run with
the field to change (on CUDA checked at densification steps only: each check waits for the GPU).
"""
from __future__ import annotations

import logging
from typing import Dict

import torch

from ..errors import CSDError
from ..gaussian_config import GaussianConfig, interval_due, position_lr
from ..schedules import schedule_value
from .gaussians import GaussianScene

log = logging.getLogger(__name__)

STATS = ("grad_sum", "grad_count", "max_radius")


def after_update(stats, step: int, scene: GaussianScene, optimizer, out, generator: torch.Generator) -> bool:
    """The density control after the update that completes ``step`` steps. ``stats``: the module holding the
    statistics buffers ``STATS`` (the renderer). Returns whether the set of Gaussians changed."""
    g: GaussianConfig = scene.cfg.gaussians
    n = scene.num_gaussians
    for name in STATS:
        if getattr(stats, name).shape[0] != n:
            setattr(stats, name, torch.zeros(n, device=scene.means.device))
    changed = False
    due = interval_due(g.densify_every, step) or interval_due(g.opacity_reset_every, step)
    if scene.means.device.type != "cuda" or due:
        check_finite(scene, step)
    if g.densify_from <= step <= g.densify_until:
        accumulate(stats, out)
        if interval_due(g.densify_every, step):
            densify_and_prune(stats, step, scene, optimizer, generator)
            changed = True
        if interval_due(g.opacity_reset_every, step):
            reset_opacity(scene, optimizer, g.opacity_reset_value)
    set_group_lr(optimizer, scene.means, position_lr(g, step))
    return changed


def check_finite(scene: GaussianScene, step: int) -> None:
    for name, p in scene.gaussian_parameters().items():
        if not bool(torch.isfinite(p).all()):
            lr = {"means": "position_lr_init", "sh_dc": "feature_lr", "sh_rest": "feature_rest_lr",
                  "opacity_logits": "opacity_lr", "log_scales": "scaling_lr", "quaternions": "rotation_lr"}[name]
            raise CSDError(f"the Gaussians' {name} became NaN or infinite at step {step}; lower "
                           f"scene.gaussians.{lr} (or optim.lr for the background) or check the prior's dtype. "
                           f"The last checkpoint is kept.")


@torch.no_grad()
def accumulate(stats, out) -> None:
    """Add this step's view-space gradient norms and screen radii (``out.splats`` of the step's render)."""
    splats = getattr(out, "splats", None)
    if splats is None:
        return
    means2d, radius = splats["means2d"], splats["radius"]
    visible = radius > 0  # [B, N]
    if means2d.grad is not None:
        scale = torch.tensor([splats["width"] / 2.0, splats["height"] / 2.0], device=means2d.device)
        norm = (means2d.grad * scale).norm(dim=-1)  # [B, N] NDC units
        stats.grad_sum += torch.where(visible, norm, 0.0).sum(0)
        stats.grad_count += visible.sum(0)
    stats.max_radius.copy_(torch.maximum(stats.max_radius, torch.where(visible, radius, 0).amax(0).float()))


def set_group_lr(optimizer, param: torch.nn.Parameter, lr: float) -> None:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            group["lr"] = lr


def _cap(candidates: torch.Tensor, grads: torch.Tensor, cost: torch.Tensor, room: int) -> torch.Tensor:
    """Of the ``candidates`` (bool ``[N]``), those kept within ``room`` new Gaussians (``cost`` each), largest
    gradient first."""
    idx = torch.nonzero(candidates).squeeze(-1)
    order = idx[torch.argsort(-grads[idx], stable=True)]
    fits = torch.cumsum(cost[order], 0) <= room
    keep = torch.zeros_like(candidates)
    keep[order[fits]] = True
    return keep


@torch.no_grad()
def densify_and_prune(stats, step: int, scene: GaussianScene, optimizer, generator: torch.Generator) -> Dict:
    """Clone, split and prune as the module docstring says; returns the counts."""
    g = scene.cfg.gaussians
    n = scene.num_gaussians
    device = scene.means.device
    grads = torch.nan_to_num(stats.grad_sum / stats.grad_count, 0.0)  # [N]
    scales = scene.scales()
    max_scale = scales.amax(-1)
    dense = schedule_value(g.percent_dense, step) * g.extent
    hot = grads >= schedule_value(g.densify_grad_threshold, step)
    clone, split = hot & (max_scale <= dense), hot & (max_scale > dense)
    k = g.split_count
    cost = torch.where(clone, 1, k - 1)
    room = g.max_gaussians - n
    if int(cost[clone | split].sum()) > room:
        keep = _cap(clone | split, grads, cost, max(room, 0))
        clone, split = clone & keep, split & keep
        if not stats.cap_warned:
            stats.cap_warned = True
            log.warning("scene.gaussians.max_gaussians (%d) reached at step %d: densification adds only what fits "
                        "(the Gaussians with the largest gradients first); raise scene.gaussians.max_gaussians for "
                        "a finer scene", g.max_gaussians, step)
    params = scene.gaussian_parameters()
    ci, si = torch.nonzero(clone).squeeze(-1), torch.nonzero(split).squeeze(-1)
    # split children: means drawn from the parent Gaussian (the run's generator), smaller scales
    z = torch.randn(len(si) * k, 3, generator=generator).to(device)  # [S·k, 3]
    parent = si.repeat(k)
    rot = scene.rotations()[parent]
    child_means = scene.means[parent] + (rot @ (scales[parent] * z).unsqueeze(-1)).squeeze(-1)
    child_scales = torch.log(scales[parent] / (g.split_scale_divisor * k))
    new_rows = {}
    for name, p in params.items():
        child = {"means": child_means, "log_scales": child_scales}.get(name, p.data[parent])
        new_rows[name] = torch.cat([p.data[ci], child])
    survivors = torch.ones(n, dtype=torch.bool, device=device)
    survivors[si] = False
    keep_idx = torch.nonzero(survivors).squeeze(-1)
    # pruning, over the new set (3DGS prunes after adding)
    opac = torch.sigmoid(torch.cat([scene.opacity_logits.data[keep_idx], new_rows["opacity_logits"]]))
    big = torch.exp(torch.cat([scene.log_scales.data[keep_idx], new_rows["log_scales"]])).amax(-1)
    prune = (opac < schedule_value(g.prune_opacity, step)) | (big > schedule_value(g.prune_scale, step) * g.extent)
    screen = schedule_value(g.prune_screen_size, step)
    if screen > 0:
        radius = torch.cat([stats.max_radius[keep_idx], stats.max_radius.new_zeros(len(new_rows["means"]))])
        prune |= radius > screen
    if bool(prune.all()):
        prune[torch.argmax(opac)] = False  # never an empty scene: keep the most opaque one
    final = torch.nonzero(~prune).squeeze(-1)
    for name, p in params.items():
        resize(optimizer, p, lambda t, fresh: torch.cat([t[keep_idx], fresh])[final], new_rows[name])
    m = scene.num_gaussians
    for name in STATS:
        setattr(stats, name, torch.zeros(m, device=device))
    counts = {"cloned": len(ci), "split": len(si), "pruned": int(prune.sum()), "gaussians": m}
    log.debug("step %d: %s", step, counts)
    return counts


def resize(optimizer, p: torch.nn.Parameter, select, new_rows: torch.Tensor) -> None:
    """``p.data = select(p.data, new_rows)``, and the same rows of its Adam moments (zeros for the new rows)."""
    old_n = p.shape[0]
    state = optimizer.state.get(p, {})
    for key, value in list(state.items()):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == old_n:
            state[key] = select(value, torch.zeros_like(new_rows))
    p.data = select(p.data, new_rows)
    p.grad = None


@torch.no_grad()
def reset_opacity(scene: GaussianScene, optimizer, value: float) -> None:
    """Opacities above ``value`` down to it (logit space), with fresh Adam moments for them (3DGS)."""
    p = scene.opacity_logits
    cap = torch.log(torch.tensor(value / (1 - value), device=p.device))
    p.data = torch.minimum(p.data, cap)
    state = optimizer.state.get(p, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key] = torch.zeros_like(state[key])
