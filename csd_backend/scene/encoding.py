"""Multi-resolution hash-grid encoding in pure PyTorch (spec §5.1), with tiny-cuda-nn's parameter layout.

Level l has scale ``N_min·b^l − 1`` and resolution ``ceil(scale) + 1``; a level whose dense grid fits in the
table is indexed densely, others through the spatial hash ``(x·1) ⊕ (y·2654435761) ⊕ (z·805459861)``; each
level's table holds ``min(res³, 2^T)`` entries rounded up to a multiple of 8, and all tables live in one flat
parameter vector in level order (as tinycudann stores them), so a tinycudann backend can be dropped in later
with the same parameters. Evaluation goes level by level (one gather per level over all points), which on CPU
is several times faster than one gather over all levels and corners (DEPENDENCIES.md).

The math exists in two forms, checked against each other by the tests:

- the reference (:class:`HashGridEncoding`, ``torch``) evaluates it eagerly, corner-major (``eager_features``:
  every broadcast runs along the points), inside :class:`HashGridLookup`, an autograd function whose backward
  is written out: features and Jacobian ``d features / d points`` are linear in the tables, so the gradient for
  the tables is one ``index_add`` per level of the cell weights times the incoming gradients, recomputed from
  the points. Autograd through the gathers instead keeps every level's indices, weights and gathered values and,
  with analytic normals, builds a second-order graph over all of them: 4-5x the time and most of a step's
  memory (issue 26).
- ``hash_grid_features`` is a pure function of ``(points, params)`` with the level layout as constants,
  point-major, which the ``compiled`` backend (``backends.py``) hands to ``torch.compile``: every level's
  gathers, weights and sums fuse into a few kernels, and the backward with them.

Both reach the points through :class:`JacobianLink` (first order: the sample points are never trained, so their
second derivatives are not needed).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

PRIMES = (1, 2654435761, 805459861)
CORNERS = torch.tensor([[(i >> d) & 1 for d in range(3)] for i in range(8)], dtype=torch.long)  # [8, 3]


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

    def level_table(self, level: int) -> torch.Tensor:
        """View of one level's table ``[size, F]``."""
        return level_view(self.params, self.level_specs()[level], self.n_features)

    def set_active_levels(self, n: int) -> None:
        self.active_levels = max(1, min(int(n), self.n_levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, 3] in [0, 1]; only the active levels are evaluated, the others output zeros (and get no gradient)
        out = hash_grid(x, self.params, self.level_specs()[:self.active_levels], self.n_features)
        if self.active_levels < self.n_levels:
            out = torch.cat([out, x.new_zeros(x.shape[0], (self.n_levels - self.active_levels) * self.n_features)], -1)
        return out

    def level_specs(self) -> Tuple[LevelSpec, ...]:
        """The static layout of every level, as ``hash_grid_features`` takes it."""
        return tuple((self.offsets[level], self.offsets[level + 1] - self.offsets[level], self.scales[level],
                      self.resolutions[level], self.hashed[level]) for level in range(self.n_levels))


#: one level's (offset in table entries, table size, scale, resolution, hashed)
LevelSpec = Tuple[int, int, float, int, bool]


def level_view(flat: torch.Tensor, level: LevelSpec, n_features: int) -> torch.Tensor:
    """One level's rows ``[size, F]`` of a flat vector in the tables' layout (the parameters or their gradient)."""
    offset, size = level[:2]
    return flat[offset * n_features:(offset + size) * n_features].view(size, n_features)


def corner_sum(terms: torch.Tensor) -> torch.Tensor:
    """The sum over the 8 cell corners (dim 1) of ``terms`` ``[N, 8, ...]``, added corner by corner: as a reduction,
    inductor's CPU kernels parallelise the 8 corners inside a serial loop over the points (one OpenMP region per
    point: 5x slower at 2 threads than at 1); as adds, the loop over the points is the parallel one."""
    out = terms[:, 0]
    for c in range(1, terms.shape[1]):
        out = out + terms[:, c]
    return out


def hash_grid_features(x: torch.Tensor, params: torch.Tensor, mask: Optional[torch.Tensor], corners: torch.Tensor,
                       levels: Tuple[LevelSpec, ...], n_features: int, with_jacobian: bool = False):
    """The encoding as a pure function, point-major (the form the ``compiled`` backend hands to ``torch.compile``;
    :func:`eager_features` is the same math corner-major): points ``x`` ``[N, 3]`` in [0, 1]³, the flat
    ``params``, ``mask`` ``[L·F]`` or None (1 for the features of active levels, 0 for the others, so that one
    compiled graph serves every number of active levels), ``corners`` ``[8, 3]``, the static layout of the
    ``levels`` evaluated → features ``[N, L·F]``, and with ``with_jacobian`` also ``d features / d x``
    ``[N, L·F, 3]`` (the trilinear weights' derivatives; the floor of the cell index has none).
    """
    F = n_features
    cb = corners.bool()
    sign = corners.to(x.dtype) * 2 - 1  # [8, 3]: d w_c / d frac_d = ±(product over the other dims)
    feats, jacs = [], []
    for level in levels:
        _, size, scale, res, hashed = level
        table = level_view(params, level, F)
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
        values = table[h]  # [N, 8, F]
        feats.append(corner_sum(values * w.unsqueeze(-1)))
        if with_jacobian:
            dw = sign * torch.stack([wd[..., 1] * wd[..., 2], wd[..., 0] * wd[..., 2], wd[..., 0] * wd[..., 1]], -1)
            jacs.append(scale * corner_sum(values.unsqueeze(-1) * dw.unsqueeze(-2)))
    out = torch.cat(feats, -1)
    if mask is not None:
        out = out * mask
    if with_jacobian:
        jac = torch.cat(jacs, 1)
        return out, (jac if mask is None else jac * mask.unsqueeze(-1))
    return out


def _corners(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, combine) -> torch.Tensor:
    """Values ``[2, N]`` at the lower and upper cell face in each dimension → ``[8, N]`` over the cell corners
    (corner ``c`` takes the upper face in dimension ``d`` where bit ``d`` of ``c`` is set), as
    ``combine(combine(x, y), z)``."""
    return combine(combine(x[None, None], y[None, :, None]), z[:, None, None]).reshape(8, x.shape[-1])


def level_lookup(xt: torch.Tensor, level: LevelSpec, with_jacobian: bool):
    """One level's cell corners for points ``xt`` ``[3, N]`` (transposed) in [0, 1]³, corner-major (every
    broadcast runs along the points: eager code's fast layout): table rows ``[8, N]``, trilinear weights ``[8, N]``
    and, with ``with_jacobian``, their derivatives by the cell coordinates ``[3, 8, N]`` (else None)."""
    offset, size, scale, res, hashed = level
    pos = xt * scale + 0.5  # [3, N]
    grid = torch.floor(pos)
    frac = pos - grid
    g = grid.long()
    faces = [torch.stack([g[d], g[d] + 1]) for d in range(3)]  # [2, N] each
    if hashed:
        rows = _corners(*(f * prime for f, prime in zip(faces, PRIMES)), torch.bitwise_xor) & 0xFFFFFFFF
    else:
        rows = _corners(faces[0], faces[1] * res, faces[2] * (res * res), torch.add)
    rows = rows & (size - 1) if size & (size - 1) == 0 else rows % size  # the same (rows ≥ 0); a mask is cheaper
    wd = [torch.stack([1.0 - frac[d], frac[d]]) for d in range(3)]  # [2, N] per-dimension factors
    w = _corners(*wd, torch.mul)
    if not with_jacobian:
        return rows, w, None
    one = torch.ones_like(frac[0])
    slope = torch.stack([-one, one])  # d factor / d frac: −1 for the lower face, +1 for the upper
    dw = torch.stack([_corners(*(slope if d == k else wd[d] for d in range(3)), torch.mul) for k in range(3)])
    return rows, w, dw


def eager_features(x: torch.Tensor, params: torch.Tensor, levels: Tuple[LevelSpec, ...], n_features: int,
                   with_jacobian: bool):
    """``hash_grid_features`` without a mask, computed corner-major (about 2x faster in eager mode; the
    compiled graph prefers the point-major form) → features and the Jacobian or None."""
    xt = x.t().contiguous()
    feats, jacs = [], []
    for level in levels:
        scale = level[2]
        rows, w, dw = level_lookup(xt, level, with_jacobian)
        values = level_view(params, level, n_features)[rows]  # [8, N, F]
        feats.append((values * w.unsqueeze(-1)).sum(0))
        if with_jacobian:
            jacs.append(torch.stack([scale * (values * dw[d].unsqueeze(-1)).sum(0) for d in range(3)], -1))
    return torch.cat(feats, -1), (torch.cat(jacs, 1) if with_jacobian else None)


class HashGridLookup(torch.autograd.Function):
    """``hash_grid_features`` (no mask, eager) with its backward for the tables written out → ``(features,
    Jacobian or None)``. Saves only the points: the backward recomputes each level's rows and weights and adds
    ``w·g_features + scale·Σ_d dw_d·g_jacobian_d`` into the table rows (the transpose of the forward, both being
    linear in the tables). No gradient for ``x`` here: :class:`JacobianLink` gives it."""

    @staticmethod
    def forward(ctx, x, params, levels, n_features, with_jacobian):
        ctx.save_for_backward(x)
        ctx.levels, ctx.n_features, ctx.n_params = levels, n_features, params.shape[0]
        return eager_features(x, params, levels, n_features, with_jacobian)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_feats, g_jac):
        (x,) = ctx.saved_tensors
        F = ctx.n_features
        xt = x.t().contiguous()
        grad = x.new_zeros(ctx.n_params)
        for i, level in enumerate(ctx.levels):
            rows, w, dw = level_lookup(xt, level, g_jac is not None)
            # autograd hands a zero tensor for an unused output (materialised grads), so g_feats is never None
            coeff = w.unsqueeze(-1) * g_feats[:, i * F:(i + 1) * F]  # [8, N, F]
            if g_jac is not None:
                gj = g_jac[:, i * F:(i + 1) * F] * level[2]  # [N, F, 3], times the level's scale
                for d in range(3):
                    coeff += dw[d].unsqueeze(-1) * gj[..., d]
            level_view(grad, level, F).index_add_(0, rows.view(-1), coeff.view(-1, F))
        return None, grad, None, None, None


class JacobianLink(torch.autograd.Function):
    """Returns ``feats`` with ``d feats / d x = jac``: the gradient for the points is ``Σ_k g_k · jac_k``, built
    from differentiable ops, so second-order gradients (analytic normals) reach the parameters through ``jac``'s
    first-order backward (a compiled graph or :class:`HashGridLookup` has no double backward of its own)."""

    @staticmethod
    def forward(ctx, feats, jac, x):
        ctx.save_for_backward(jac)
        return feats.view_as(feats)

    @staticmethod
    def backward(ctx, grad):
        (jac,) = ctx.saved_tensors
        return grad, None, torch.einsum("nk,nkd->nd", grad, jac)


def hash_grid(x: torch.Tensor, params: torch.Tensor, levels: Tuple[LevelSpec, ...], n_features: int) -> torch.Tensor:
    """The reference's evaluation: features of ``x`` ``[N, 3]`` with gradients for ``params`` and, when ``x``
    requires them, for ``x`` (through the Jacobian)."""
    if x.requires_grad and torch.is_grad_enabled():
        feats, jac = HashGridLookup.apply(x.detach(), params, levels, n_features, True)
        return JacobianLink.apply(feats, jac, x)
    return HashGridLookup.apply(x, params, levels, n_features, False)[0]
