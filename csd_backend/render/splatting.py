"""Differentiable Gaussian splatting in pure PyTorch (the reference backend; CPU and CUDA), after 3D Gaussian
Splatting (Kerbl et al. 2023) and its EWA splatting (Zwicker et al. 2002).

Conventions are the engine's (``cameras.py``, ``rasterizer.py``): OpenGL ``c2w`` (columns right, up, −lookat,
position), focal ``f = 0.5·H / tan(fovy/2)`` pixels, and a camera-space point ``(x, y, z)`` with depth ``w = −z``
lands at column ``W/2 + f·x/w``, row ``H/2 − f·y/w``; pixel ``(row j, column i)`` has its centre at
``(i + 0.5, j + 0.5)``. gsplat's OpenCV cameras are the same pixels (``gaussian_renderer.py``).

1. **Projection.** Camera-space covariance ``Σ_c = Rᵀ Σ R`` (R: the camera's rotation), the Jacobian of the
   projection ``J = [[f/w, 0, f·x/w²], [0, −f/w, −f·y/w²]]`` (x/w, y/w clamped to 1.3× the field of view, as 3DGS),
   ``Σ_2D = J Σ_c Jᵀ + low_pass·I`` (the 0.3 px² dilation), its inverse (the conic), and the screen radius
   ``⌈3·sqrt(λ_max)⌉``. Gaussians nearer than ``near_plane``, with a degenerate Σ_2D or off screen are culled.
2. **Binning.** Each visible Gaussian is paired with every ``tile × tile`` pixel tile its radius touches; the pairs
   are sorted once by the 64-bit key ``(camera·tiles + tile) << 32 | float32 bits of the depth`` (positive floats
   order like their bits), which puts every tile's Gaussians front to back.
3. **Compositing.** For every pair and every pixel of its tile: ``α = min(0.99, o·exp(−½ dᵀ conic d))``, dropped
   below 1/255; transmittance ``T = Π_{front}(1 − α)`` as a per-tile exclusive cumulative sum of ``log(1 − α)``
   (float64, over the flat pair list, less the sum at the tile's first pair); a pixel stops (early termination)
   at the Gaussian that would take T below 1e-4, which is not drawn, as in 3DGS. Features are summed with weights
   ``T·α`` per tile pixel (``index_add``).

Nothing loops over Gaussians or pixels in Python: pairs are made with ``repeat_interleave`` and processed in
chunks of whole tiles (``PAIR_PIXEL_BUDGET`` pair-pixels a chunk).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4
#: pair × pixel evaluations per chunk of tiles (bounds the temporaries: ~12 floats each)
PAIR_PIXEL_BUDGET = 1 << 23


@dataclass
class Projection:
    """Per camera and Gaussian (``[B, N, ...]``): screen means (pixels), depth, conic ``(A, B, C)`` of
    ``A·dx² + 2B·dx·dy + C·dy²``, integer screen radius (0: culled)."""

    means2d: torch.Tensor  # [B, N, 2]
    depth: torch.Tensor  # [B, N]
    conic: torch.Tensor  # [B, N, 3]
    radius: torch.Tensor  # [B, N] int64


def project(means: torch.Tensor, covariances: torch.Tensor, c2w: torch.Tensor, focal: torch.Tensor, width: int,
            height: int, near_plane: float = 0.01, low_pass: float = 0.3) -> Projection:
    """Project Gaussians (``means`` ``[N, 3]``, world ``covariances`` ``[N, 3, 3]``) into B cameras (``c2w``
    ``[B, 4, 4]``, ``focal`` ``[B]`` pixels)."""
    rot, pos = c2w[:, :3, :3], c2w[:, :3, 3]  # [B, 3, 3], [B, 3]
    p = torch.einsum("bnk,bkj->bnj", means.unsqueeze(0) - pos[:, None, :], rot)  # [B, N, 3] camera space
    w = -p[..., 2]
    valid = w > near_plane
    ws = torch.where(valid, w, torch.ones_like(w))  # no division by ~0 (culled anyway)
    f = focal.view(-1, 1)
    lim_x = 1.3 * (0.5 * width) / f
    lim_y = 1.3 * (0.5 * height) / f
    tx = (p[..., 0] / ws).clamp(-lim_x, lim_x) * ws
    ty = (p[..., 1] / ws).clamp(-lim_y, lim_y) * ws
    zero = torch.zeros_like(ws)
    jac = torch.stack([torch.stack([f / ws, zero, f * tx / ws ** 2], -1),
                       torch.stack([zero, -f / ws, -f * ty / ws ** 2], -1)], -2)  # [B, N, 2, 3]
    cov_c = rot.transpose(1, 2).unsqueeze(1) @ covariances.unsqueeze(0) @ rot.unsqueeze(1)  # [B, N, 3, 3]
    cov2 = jac @ cov_c @ jac.transpose(-1, -2)  # [B, N, 2, 2]
    a = cov2[..., 0, 0] + low_pass
    b = cov2[..., 0, 1]
    c = cov2[..., 1, 1] + low_pass
    det = a * c - b * b
    valid = valid & (det > 0)
    det_s = torch.where(valid, det, torch.ones_like(det))
    conic = torch.stack([c / det_s, -b / det_s, a / det_s], -1)
    mid = 0.5 * (a + c)
    lam = mid + torch.sqrt((mid * mid - det).clamp_min(0.1))
    radius = torch.ceil(3.0 * torch.sqrt(lam.detach().clamp_min(0)))
    means2d = torch.stack([0.5 * width + f * p[..., 0] / ws, 0.5 * height - f * p[..., 1] / ws], -1)
    m = means2d.detach()
    on_screen = (m[..., 0] + radius > 0) & (m[..., 0] - radius < width) & (m[..., 1] + radius > 0) \
        & (m[..., 1] - radius < height)
    radius = torch.where(valid & on_screen, radius, torch.zeros_like(radius)).long()
    return Projection(means2d, w, conic, radius)


def splat(proj: Projection, opacities: torch.Tensor, features: torch.Tensor, width: int, height: int,
          tile: int = 16):
    """Composite per-camera ``features`` ``[B, N, D]`` of Gaussians with ``opacities`` ``[N]`` front to back.

    Returns ``(image [B, H, W, D], alpha [B, H, W], pairs)``: the weighted feature sums, ``Σ T·α`` per pixel and the
    number of Gaussian-tile pairs drawn."""
    B, N = proj.depth.shape
    D = features.shape[-1]
    device = features.device
    nx, ny = math.ceil(width / tile), math.ceil(height / tile)
    n_tiles = B * nx * ny
    P = tile * tile
    r = proj.radius
    m = proj.means2d.detach()
    x0 = torch.floor((m[..., 0] - r) / tile).clamp(0, nx).long()
    x1 = torch.floor((m[..., 0] + r + tile - 1) / tile).clamp(0, nx).long()
    y0 = torch.floor((m[..., 1] - r) / tile).clamp(0, ny).long()
    y1 = torch.floor((m[..., 1] + r + tile - 1) / tile).clamp(0, ny).long()
    counts = torch.where(r > 0, (x1 - x0) * (y1 - y0), 0).reshape(-1)  # [B·N]
    flat = torch.repeat_interleave(torch.arange(B * N, device=device), counts)  # [K] camera·N + Gaussian
    out = features.new_zeros(n_tiles, P, D)
    acc = features.new_zeros(n_tiles, P)
    K = flat.shape[0]
    if K > 0:
        k = torch.arange(K, device=device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        span = (x1 - x0).reshape(-1)[flat]
        tx = x0.reshape(-1)[flat] + k % span
        ty = y0.reshape(-1)[flat] + k // span
        cam = flat // N
        tile_id = (cam * ny + ty) * nx + tx  # [K]
        depth_bits = proj.depth.detach().reshape(-1)[flat].float().contiguous().view(torch.int32).long()
        order = torch.argsort(tile_id * (1 << 32) + depth_bits)
        flat, tile_id = flat[order], tile_id[order]
        per_tile = torch.bincount(tile_id, minlength=n_tiles)
        # chunks of whole tiles, each with at most about PAIR_PIXEL_BUDGET pair-pixels
        ends = torch.cumsum(per_tile, 0)
        chunk_of_tile = (ends - per_tile) // max(1, PAIR_PIXEL_BUDGET // P)
        bounds = torch.searchsorted(chunk_of_tile, torch.arange(int(chunk_of_tile[-1]) + 2, device=device))
        pair_bounds = torch.cat([torch.zeros(1, dtype=torch.long, device=device), ends])[bounds].tolist()
        local = torch.arange(P, device=device)
        for s, e in zip(pair_bounds[:-1], pair_bounds[1:]):
            if e > s:
                _composite(proj, opacities, features, flat[s:e], tile_id[s:e], local, tile, nx, ny, N, out, acc)
    img = out.view(B, ny, nx, tile, tile, D).permute(0, 1, 3, 2, 4, 5).reshape(B, ny * tile, nx * tile, D)
    alpha = acc.view(B, ny, nx, tile, tile).permute(0, 1, 3, 2, 4).reshape(B, ny * tile, nx * tile)
    return img[:, :height, :width], alpha[:, :height, :width], K


def _composite(proj, opacities, features, flat, tile_id, local, tile, nx, ny, N, out, acc) -> None:
    """Alpha compositing of one chunk of sorted pairs (whole tiles) into ``out`` ``[tiles, P, D]`` and ``acc``."""
    cam, gid = flat // N, flat % N
    t = tile_id % (nx * ny)
    px = (t % nx).unsqueeze(-1) * tile + (local % tile) + 0.5  # [K, P] pixel centres
    py = (t // nx).unsqueeze(-1) * tile + (local // tile) + 0.5
    mean = proj.means2d[cam, gid]  # [K, 2]
    con = proj.conic[cam, gid]  # [K, 3]
    dx = px - mean[:, :1]
    dy = py - mean[:, 1:]
    power = -0.5 * (con[:, :1] * dx * dx + con[:, 2:] * dy * dy) - con[:, 1:2] * dx * dy
    alpha = (opacities[gid].unsqueeze(-1) * torch.exp(power.clamp_max(0.0))).clamp_max(ALPHA_MAX)
    alpha = torch.where((power <= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))  # [K, P]
    log_t = torch.log1p(-alpha).double()
    cs = torch.cumsum(log_t, 0)
    excl = cs - log_t
    first = torch.searchsorted(tile_id, tile_id)  # [K] the first pair of each pair's tile
    trans = torch.exp(excl - excl[first]).float()  # [K, P] transmittance in front of each pair
    keep = trans * (1 - alpha) >= T_MIN  # early termination: a prefix of each pixel's list
    w = torch.where(keep, trans * alpha, torch.zeros_like(alpha))  # [K, P]
    feat = features[cam, gid]  # [K, D]
    out.index_add_(0, tile_id, w.unsqueeze(-1) * feat.unsqueeze(1))
    acc.index_add_(0, tile_id, w)
