"""The implicit volume (spec §5.1) and backgrounds.

Density ``σ = softplus(MLP_σ(enc(x)) + bias(x))`` with the ``blob_magic3d`` bias ``λ·(1 − ‖x‖/std)``; albedo
``sigmoid(MLP_f(enc(x)))``; normals ``−normalize(∇σ)`` (analytic, with ``create_graph`` so normal renders carry
second-order gradients) or central finite differences. Points are in world units inside ``[−r, r]³``.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SceneConfig
from ..schedules import schedule_value
from .backends import make_hash_grid


def make_mlp(n_in: int, n_out: int, width: int, hidden_layers: int) -> nn.Sequential:
    """Bias-free ReLU MLP (threestudio's VanillaMLP)."""
    layers = []
    dim = n_in
    for _ in range(hidden_layers):
        layers += [nn.Linear(dim, width, bias=False), nn.ReLU(inplace=True)]
        dim = width
    layers.append(nn.Linear(dim, n_out, bias=False))
    return nn.Sequential(*layers)


def make_encoding(cfg: SceneConfig, device=None) -> nn.Module:
    """The hash grid on ``cfg.encoding_backend`` (auto | torch | tcnn), see ``backends.py``."""
    return make_hash_grid(cfg.n_levels, cfg.n_features_per_level, cfg.log2_hashmap_size, cfg.base_resolution,
                          cfg.level_scale(), cfg.encoding_backend, device)


class TextureField(nn.Module):
    """Hash grid + albedo head: ``albedo(x) = sigmoid(MLP_f(enc(x)))``. The colour of every scene kind; a mesh
    scene inherits it (parameter for parameter) from the stage-1 volume."""

    def __init__(self, cfg: SceneConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.radius = float(cfg.radius)
        self.encoding = make_encoding(cfg, device)
        self._build_heads(self.encoding.n_output_dims)
        self.update_step(0)

    def _build_heads(self, n_enc: int) -> None:
        self.feature_mlp = make_mlp(n_enc, 3, self.cfg.mlp_width, self.cfg.mlp_hidden_layers)

    def active_levels(self, step: int) -> int:
        """Hash-grid levels in use at ``step`` (``cfg.active_levels`` rounded down; all when it is None)."""
        if self.cfg.active_levels is None:
            return self.cfg.n_levels
        return min(self.cfg.n_levels, max(1, math.floor(schedule_value(self.cfg.active_levels, step) + 1e-6)))

    def update_step(self, step: int) -> None:
        """Apply the step-dependent settings (the progressive band of hash-grid levels) for ``step``."""
        self.encoding.set_active_levels(self.active_levels(step))

    def encode(self, points: torch.Tensor) -> torch.Tensor:
        x = (points + self.radius) / (2 * self.radius)  # [N, 3] in [0, 1]
        return self.encoding(x.clamp(0.0, 1.0))

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """Albedo in [0, 1] at ``points`` ``[N, 3]`` → ``[N, 3]``."""
        return torch.sigmoid(self.feature_mlp(self.encode(points)))


class ImplicitVolume(TextureField):
    """Hash grid + density and albedo heads; ``forward`` returns density, albedo and (optionally) normals."""

    def _build_heads(self, n_enc: int) -> None:
        self.density_mlp = make_mlp(n_enc, 1, self.cfg.mlp_width, self.cfg.mlp_hidden_layers)  # first: the seed
        super()._build_heads(n_enc)  # draws of older runs stay the same

    # --------------------------------------------------------------- fields
    def density_bias(self, points: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.density_bias == "blob_magic3d":
            return c.density_blob_scale * (1 - points.norm(dim=-1) / c.density_blob_std)
        if c.density_bias == "blob_dreamfusion":
            return c.density_blob_scale * torch.exp(-0.5 * (points ** 2).sum(-1) / c.density_blob_std ** 2)
        return torch.zeros_like(points[..., 0])

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """σ at ``points`` ``[N, 3]`` → ``[N]``."""
        raw = self.density_mlp(self.encode(points))[..., 0]
        return F.softplus(raw + self.density_bias(points))

    def forward(self, points: torch.Tensor, with_normal: bool = False) -> Dict[str, torch.Tensor]:
        """``points`` ``[N, 3]`` → ``density`` ``[N]``, ``albedo`` ``[N, 3]`` and ``normal`` ``[N, 3]``."""
        need_grad = with_normal and self.cfg.normal_type == "analytic"
        create_graph = torch.is_grad_enabled()  # second-order gradients only when training
        if need_grad:
            points = points.detach().requires_grad_(True)
        with torch.enable_grad() if need_grad else _null():
            enc = self.encode(points)
            raw = self.density_mlp(enc)[..., 0]
            density = F.softplus(raw + self.density_bias(points))
        if need_grad and not create_graph:
            enc = enc.detach()
        out = {"density": density if create_graph or not need_grad else density.detach(),
               "albedo": torch.sigmoid(self.feature_mlp(enc))}
        if with_normal:
            if need_grad:
                grad = torch.autograd.grad(density, points, torch.ones_like(density), create_graph=create_graph)[0]
            else:
                eps = self.cfg.finite_difference_eps
                offsets = torch.eye(3, device=points.device, dtype=points.dtype) * eps  # [3, 3]
                pts = torch.cat([points.unsqueeze(1) + offsets, points.unsqueeze(1) - offsets], 1)  # [N, 6, 3]
                d = self.density(pts.view(-1, 3)).view(-1, 6)
                grad = (d[:, :3] - d[:, 3:]) / (2 * eps)
            out["normal"] = -F.normalize(grad, dim=-1)
        return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------ backgrounds
def spherical_harmonics_deg3(d: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics up to band 2 (tinycudann ``degree 3``: 9 values) of unit directions ``[N, 3]``."""
    x, y, z = d.unbind(-1)
    return torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.48860251190291987 * y,
        0.48860251190291987 * z,
        -0.48860251190291987 * x,
        1.0925484305920792 * x * y,
        -1.0925484305920792 * y * z,
        0.94617469575755997 * z * z - 0.31539156525251999,
        -1.0925484305920792 * x * z,
        0.54627421529603959 * (x * x - y * y),
    ], -1)


class NeuralEnvironmentMap(nn.Module):
    """Background colour from the view direction: SH degree 3 → MLP (16 wide, 2 hidden) → sigmoid."""

    def __init__(self, width: int = 16, hidden_layers: int = 2):
        super().__init__()
        self.mlp = make_mlp(9, 3, width, hidden_layers)

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        # dirs: [N, 3] unit vectors → [N, 3] colours in [0, 1]
        return torch.sigmoid(self.mlp(spherical_harmonics_deg3(dirs)))


class SolidBackground(nn.Module):
    def __init__(self, color=(1.0, 1.0, 1.0)):
        super().__init__()
        self.register_buffer("color", torch.tensor(list(color), dtype=torch.float32))

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        return self.color.to(dirs).expand(dirs.shape[0], 3)


def make_background(cfg: SceneConfig) -> nn.Module:
    if cfg.background == "neural_env":
        return NeuralEnvironmentMap()
    return SolidBackground(cfg.background_color)


class Scene(nn.Module):
    """What an optimisation trains: the volume and its background. ``state_dict`` is the whole scene."""

    def __init__(self, cfg: SceneConfig, device=None):
        """``device``: where the scene will live; it picks the encoding backend (tcnn needs CUDA)."""
        super().__init__()
        self.cfg = cfg
        self.volume = ImplicitVolume(cfg, device)
        self.background = make_background(cfg)

    @property
    def radius(self) -> float:
        return self.volume.radius

    @property
    def kind(self) -> str:
        return "volume"

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        return self.volume.albedo(points)

    def update_step(self, step: int) -> None:
        """Called by the loop before every step (and after loading a checkpoint) with the run's step."""
        self.volume.update_step(step)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

