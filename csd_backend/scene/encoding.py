"""Multi-resolution hash-grid encoding in pure PyTorch (spec §5.1), with tiny-cuda-nn's parameter layout.

Level l has scale ``N_min·b^l − 1`` and resolution ``ceil(scale) + 1``; a level whose dense grid fits in the
table is indexed densely, others through the spatial hash ``(x·1) ⊕ (y·2654435761) ⊕ (z·805459861)``; each
level's table holds ``min(res³, 2^T)`` entries rounded up to a multiple of 8, and all tables live in one flat
parameter vector in level order (as tinycudann stores them), so a tinycudann backend can be dropped in later
with the same parameters. Evaluation goes level by level (one gather per level over all points), which on CPU
is several times faster than one gather over all levels and corners (DEPENDENCIES.md).
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

PRIMES = (1, 2654435761, 805459861)
_CORNERS = torch.tensor([[(i >> d) & 1 for d in range(3)] for i in range(8)], dtype=torch.long)  # [8, 3]


class HashGridEncoding(nn.Module):
    """Input ``[N, 3]`` in [0, 1]³ → features ``[N, L·F]``."""

    def __init__(self, n_levels: int = 16, n_features_per_level: int = 2, log2_hashmap_size: int = 19,
                 base_resolution: int = 16, per_level_scale: float = 1.447269237440378):
        super().__init__()
        self.n_levels = n_levels
        self.n_features = n_features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.base_resolution = base_resolution
        self.per_level_scale = per_level_scale
        self.n_output_dims = n_levels * n_features_per_level
        #: levels in use; the others output zeros and are not evaluated (progressive band, ``set_active_levels``)
        self.active_levels = n_levels
        max_params = 2 ** log2_hashmap_size
        offsets: List[int] = [0]
        self.scales: List[float] = []
        self.resolutions: List[int] = []
        self.hashed: List[bool] = []
        for level in range(n_levels):
            scale = base_resolution * per_level_scale ** level - 1.0
            res = int(math.ceil(scale)) + 1
            dense = res ** 3
            size = min(dense, max_params)
            size = (size + 7) // 8 * 8
            self.scales.append(scale)
            self.resolutions.append(res)
            self.hashed.append(dense > size)
            offsets.append(offsets[-1] + size)
        self.offsets = offsets
        self.params = nn.Parameter(torch.empty(offsets[-1] * n_features_per_level).uniform_(-1e-4, 1e-4))
        # on the module's device, so the forward never copies from the host (a sync on CUDA)
        self.register_buffer("corners", _CORNERS.clone(), persistent=False)

    def level_table(self, level: int) -> torch.Tensor:
        """View of one level's table ``[size, F]``."""
        F = self.n_features
        return self.params[self.offsets[level] * F:self.offsets[level + 1] * F].view(-1, F)

    def set_active_levels(self, n: int) -> None:
        self.active_levels = max(1, min(int(n), self.n_levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, 3] in [0, 1]
        corners = self.corners
        feats = []
        for level in range(self.active_levels):
            scale = self.scales[level]
            pos = x * scale + 0.5  # [N, 3]
            grid = torch.floor(pos)
            frac = pos - grid  # [N, 3]
            grid = grid.long()
            idx = grid.unsqueeze(1) + corners  # [N, 8, 3]
            table = self.level_table(level)
            size = table.shape[0]
            if self.hashed[level]:
                h = (idx[..., 0] * PRIMES[0]) ^ (idx[..., 1] * PRIMES[1]) ^ (idx[..., 2] * PRIMES[2])
                h = h & 0xFFFFFFFF
            else:
                res = self.resolutions[level]
                h = idx[..., 0] + idx[..., 1] * res + idx[..., 2] * res * res
            h = h % size  # [N, 8]
            # trilinear weights per corner: prod over dims of frac or 1 - frac
            w = torch.where(corners.bool(), frac.unsqueeze(1), 1.0 - frac.unsqueeze(1)).prod(-1)  # [N, 8]
            values = torch.nn.functional.embedding(h, table)  # [N, 8, F]; deterministic backward on CPU
            feats.append((values * w.unsqueeze(-1)).sum(1))
        if self.active_levels < self.n_levels:  # inactive levels contribute zeros (and get no gradient)
            feats.append(x.new_zeros(x.shape[0], (self.n_levels - self.active_levels) * self.n_features))
        return torch.cat(feats, -1)
