"""Multi-resolution hash-grid encoding in pure PyTorch (spec §5.1), with tiny-cuda-nn's parameter layout.

Level l has scale ``N_min·b^l − 1`` and resolution ``ceil(scale) + 1``; a level whose dense grid fits in the
table is indexed densely, others through the spatial hash ``(x·1) ⊕ (y·2654435761) ⊕ (z·805459861)``; each
level's table holds ``min(res³, 2^T)`` entries rounded up to a multiple of 8, and all tables live in one flat
parameter vector in level order (as tinycudann stores them), so a tinycudann backend can be dropped in later
with the same parameters. Evaluation goes level by level (one gather per level over all points), which on CPU
is several times faster than one gather over all levels and corners (DEPENDENCIES.md).

``hash_grid_features`` is the same math as a pure function of ``(points, params)`` with the level layout as
constants: the ``compiled`` backend (``backends.py``) hands it to ``torch.compile``, which fuses every level's
gathers, weights and sums into a few kernels and, in the backward, the scatter of the gradient into the tables
(the reference's expensive part: one ``embedding`` backward per level). It can also return the Jacobian
``d features / d points``, which the compiled backend uses for gradients with respect to the points.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

PRIMES = (1, 2654435761, 805459861)
_CORNERS = torch.tensor([[(i >> d) & 1 for d in range(3)] for i in range(8)], dtype=torch.long)  # [8, 3]


class HashGridEncoding(nn.Module):
    """Input ``[N, 3]`` in [0, 1]³ → features ``[N, L·F]``."""

    #: the ``scene.encoding_backend`` this class is (recorded in a run's config.json)
    backend_name = "torch"

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
        # x: [N, 3] in [0, 1]; only the active levels are evaluated, the others output zeros (and get no gradient)
        out = hash_grid_features(x, self.params, None, self.corners, self.level_specs()[:self.active_levels],
                                 self.n_features, gather=torch.nn.functional.embedding)
        if self.active_levels < self.n_levels:
            out = torch.cat([out, x.new_zeros(x.shape[0], (self.n_levels - self.active_levels) * self.n_features)], -1)
        return out

    def level_specs(self) -> Tuple[LevelSpec, ...]:
        """The static layout of every level, as ``hash_grid_features`` takes it."""
        return tuple((self.offsets[level], self.offsets[level + 1] - self.offsets[level], self.scales[level],
                      self.resolutions[level], self.hashed[level]) for level in range(self.n_levels))


#: one level's (offset in table entries, table size, scale, resolution, hashed)
LevelSpec = Tuple[int, int, float, int, bool]


def corner_sum(terms: torch.Tensor, unrolled: bool) -> torch.Tensor:
    """The sum over the 8 cell corners (dim 1) of ``terms`` ``[N, 8, ...]``. ``unrolled`` (the compiled graph) adds
    the corners one by one: as a reduction, inductor's CPU kernels parallelise the 8 corners inside a serial loop
    over the points (one OpenMP region per point: 5x slower at 2 threads than at 1); as adds, the loop over the
    points is the parallel one."""
    if not unrolled:
        return terms.sum(1)
    out = terms[:, 0]
    for c in range(1, terms.shape[1]):
        out = out + terms[:, c]
    return out


def hash_grid_features(x: torch.Tensor, params: torch.Tensor, mask: Optional[torch.Tensor], corners: torch.Tensor,
                       levels: Tuple[LevelSpec, ...], n_features: int, with_jacobian: bool = False,
                       gather: Optional[Callable] = None):
    """The encoding as a pure function: points ``x`` ``[N, 3]`` in [0, 1]³, the flat ``params``, ``mask``
    ``[L·F]`` or None (the compiled backend: 1 for the features of active levels, 0 for the others, so that one
    compiled graph serves every number of active levels), ``corners`` ``[8, 3]``, the static layout of the
    ``levels`` evaluated → features ``[N, L·F]``, and with ``with_jacobian`` also ``d features / d x``
    ``[N, L·F, 3]`` (the trilinear weights' derivatives; the floor of the cell index has none). ``gather(h,
    table)`` looks the corners up: ``F.embedding`` for the reference (a deterministic backward on the CPU),
    indexing (None) for the compiled graph.
    """
    F = n_features
    cb = corners.bool()
    sign = corners.to(x.dtype) * 2 - 1  # [8, 3]: d w_c / d frac_d = ±(product over the other dims)
    feats, jacs = [], []
    for offset, size, scale, res, hashed in levels:
        table = params[offset * F:(offset + size) * F].view(size, F)
        pos = x * scale + 0.5  # [N, 3]
        grid = torch.floor(pos)
        frac = pos - grid
        idx = grid.long().unsqueeze(1) + corners  # [N, 8, 3]
        if hashed:
            h = (idx[..., 0] * PRIMES[0]) ^ (idx[..., 1] * PRIMES[1]) ^ (idx[..., 2] * PRIMES[2])
            h = h & 0xFFFFFFFF
        else:
            h = idx[..., 0] + idx[..., 1] * res + idx[..., 2] * res * res
        h = h % size  # [N, 8]
        wd = torch.where(cb, frac.unsqueeze(1), 1.0 - frac.unsqueeze(1))  # [N, 8, 3] per-dimension factors
        w = wd.prod(-1)  # [N, 8]
        values = table[h] if gather is None else gather(h, table)  # [N, 8, F]
        feats.append(corner_sum(values * w.unsqueeze(-1), unrolled=gather is None))
        if with_jacobian:
            dw = sign * torch.stack([wd[..., 1] * wd[..., 2], wd[..., 0] * wd[..., 2], wd[..., 0] * wd[..., 1]], -1)
            jacs.append(scale * corner_sum(values.unsqueeze(-1) * dw.unsqueeze(-2), unrolled=gather is None))
    out = torch.cat(feats, -1)
    if mask is not None:
        out = out * mask
    if with_jacobian:
        jac = torch.cat(jacs, 1)
        return out, (jac if mask is None else jac * mask.unsqueeze(-1))
    return out
