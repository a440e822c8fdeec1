"""Rendering a Gaussian-splat scene: the renderer interface every scene kind has (``prepare``, ``update``,
``render`` → ``RenderOutput``), plus ``after_update``, the loop's hook after each parameter update, which runs the
adaptive density control (``scene/gaussian_density.py``) and the position-lr decay.

Backends (``scene.gaussians.backend``), one interface and one set of parameters:

- ``torch``: ``splatting.py``, the pure-PyTorch reference (CPU and CUDA).
- ``gsplat``: ``gsplat.rasterization`` (``pip install gsplat``, an optional extra; CUDA, its kernels are compiled
  on first use), the engine's OpenGL cameras turned into its OpenCV view matrices and intrinsics (same pixels).
- ``auto``: gsplat on CUDA when it imports and a guarded trial call renders, else torch with one warning saying
  why; torch on the CPU. An explicit ``gsplat`` that cannot run is a ``ConfigError`` with the install hint.

What is composited per Gaussian, per camera: its shaded colour (``shading.shade``: the SH colour as albedo, the
normal map, or Lambertian light per Gaussian), its camera depth and its normal — the shortest axis of the
ellipsoid, turned towards the camera (``GaussianScene.normals``). The normal map is ``(normalize(Σ w·n) + 1) / 2``
times the opacity, as the volume renderer's. The background (the scene's, or ``bg_colors``) shows through
``1 − Σ w``.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RenderConfig
from ..errors import ConfigError
from ..gaussian_config import GaussianConfig
from .cameras import Cameras, get_rays
from .shading import check_shading, shade
from .splatting import project, splat
from .volume_renderer import RenderOutput

log = logging.getLogger(__name__)

GSPLAT_HINT = ("gsplat is an optional extra that needs CUDA: `pip install gsplat` (its CUDA kernels compile on "
               "first use and need the CUDA toolkit), or set scene.gaussians.backend to 'torch' (always available)")
_WARNED: set = set()


@functools.lru_cache(maxsize=None)
def gsplat_problem(device_index: int = 0) -> Optional[str]:
    """None when gsplat imports and renders two Gaussians on this CUDA device; else why not (cached)."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from gsplat import rasterization

        device = torch.device("cuda", device_index)
        means = torch.tensor([[0.0, 0.0, 2.0], [0.1, 0.0, 3.0]], device=device)
        quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2, device=device)
        scales = torch.full((2, 3), 0.1, device=device)
        K = torch.tensor([[[8.0, 0.0, 4.0], [0.0, 8.0, 4.0], [0.0, 0.0, 1.0]]], device=device)
        rasterization(means, quats, scales, torch.full((2,), 0.5, device=device), torch.ones(2, 3, device=device),
                      torch.eye(4, device=device)[None], K, 8, 8)
        torch.cuda.synchronize(device)
        return None
    except Exception as e:  # ImportError, a kernel build that fails, an architecture mismatch
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def splat_backend(name: str, device) -> str:
    """Resolve ``scene.gaussians.backend`` (auto | torch | gsplat) for scenes on ``device``."""
    field = "scene.gaussians.backend"
    if name not in ("auto", "torch", "gsplat"):
        raise ConfigError(field, f"{name!r} is not one of 'auto', 'torch', 'gsplat'")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return "torch"
    if device.type != "cuda":
        raise ConfigError(field, f"'gsplat' runs on CUDA only, but the scene is on {device}; use 'torch' or "
                                 f"'auto'. {GSPLAT_HINT}")
    problem = gsplat_problem(device.index if device.index is not None else torch.cuda.current_device())
    if problem is None:
        return "gsplat"
    if name == "gsplat":
        raise ConfigError(field, f"'gsplat' was asked for but cannot run here ({problem}). {GSPLAT_HINT}")
    if problem not in _WARNED:
        _WARNED.add(problem)
        log.warning("%s auto: gsplat cannot run here (%s); using the slower torch splatter. %s", field, problem,
                    GSPLAT_HINT)
    return "torch"


def opencv_cameras(c2w: torch.Tensor, focal: torch.Tensor, width: int, height: int):
    """gsplat's cameras for the engine's: view matrices ``[B, 4, 4]`` (world → OpenCV camera: x right, y down,
    z forward) and intrinsics ``[B, 3, 3]`` with the principal point at the image centre."""
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], device=c2w.device, dtype=c2w.dtype))
    viewmats = torch.linalg.inv(c2w @ flip)
    K = torch.zeros(c2w.shape[0], 3, 3, device=c2w.device, dtype=c2w.dtype)
    K[:, 0, 0] = focal
    K[:, 1, 1] = focal
    K[:, 0, 2] = width / 2
    K[:, 1, 2] = height / 2
    K[:, 2, 2] = 1
    return viewmats, K


def gsplat_splat(scene, features: torch.Tensor, c2w, focal, width: int, height: int, settings: GaussianConfig):
    """The ``splatting.splat`` of gsplat: ``(image [B, H, W, D], alpha [B, H, W], means2d [B, N, 2], radius [B, N],
    pairs)``."""
    from gsplat import rasterization

    viewmats, K = opencv_cameras(c2w, focal, width, height)
    image, alpha, meta = rasterization(
        scene.means, F.normalize(scene.quaternions, dim=-1), scene.scales(), scene.opacities(), features,
        viewmats, K, width, height, near_plane=settings.near_plane, eps2d=settings.low_pass, packed=False,
        tile_size=settings.tile_size, render_mode="RGB", rasterize_mode="classic")
    radius = meta["radii"]
    if radius.dim() == 3:  # gsplat ≥ 1.5: one radius per screen axis
        radius = radius.amax(-1)
    pairs = int(meta.get("isect_ids", torch.zeros(0)).numel())
    return image, alpha[..., 0], meta["means2d"], radius.long(), pairs


class GaussianRenderer(nn.Module):
    """The renderer of ``gaussians`` scenes. Its state is the density control's statistics per Gaussian (the
    mean view-space gradient and the largest screen radius since the last densification), kept in checkpoints."""

    def __init__(self, cfg: RenderConfig, radius: float = 1.0, device=None, settings: Optional[GaussianConfig] = None):
        super().__init__()
        self.cfg = cfg
        self.radius = float(radius)
        self.settings = settings if settings is not None else GaussianConfig()
        self.backend = splat_backend(self.settings.backend, device)
        for name in ("grad_sum", "grad_count", "max_radius"):
            self.register_buffer(name, torch.zeros(0))
        self.cap_warned = False

    @property
    def resolved_backends(self) -> dict:
        return {"scene.gaussians.backend": self.backend}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("grad_sum", "grad_count", "max_radius"):  # one value per Gaussian: the saved count
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor):
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def prepare(self, scene) -> "GaussianRenderer":
        return self

    def update(self, step: int, scene, generator: torch.Generator) -> bool:
        return False

    def after_update(self, step: int, scene, optimizer, out: RenderOutput, generator: torch.Generator) -> bool:
        """After the parameter update that completes ``step`` steps: statistics, densification, pruning, opacity
        reset and the position lr of the next step (``gaussian_density.py``). Returns whether the set changed."""
        from ..scene.gaussian_density import after_update

        return after_update(self, step, scene, optimizer, out, generator)

    def render(self, scene, cams: Cameras, shading: str = "albedo", bg_colors: Optional[torch.Tensor] = None,
               need_normals: bool = False, generator: Optional[torch.Generator] = None,
               ambient_ratio: Optional[float] = None) -> RenderOutput:
        """Images of ``scene`` from ``cams``; ``bg_colors`` ``[B, 3]`` replace the background; ``ambient_ratio``:
        the light's ambient share for lit shadings (``shading.shade``)."""
        check_shading(shading)
        B, H, W = len(cams), cams.height, cams.width
        device = scene.means.device
        c2w, focal = cams.c2w.to(device), cams.focal.to(device)
        campos = c2w[:, :3, 3]  # [B, 3]
        N = scene.num_gaussians
        albedo = scene.colors(campos)  # [B, N, 3]
        normals = scene.normals(campos)  # [B, N, 3]
        if shading == "albedo":
            color = albedo
        else:
            lights = cams.light_positions.to(device)[:, None, :].expand(B, N, 3)
            points = scene.means.unsqueeze(0).expand(B, N, 3)
            color = shade(self.cfg, shading, albedo.reshape(-1, 3), normals.reshape(-1, 3), points.reshape(-1, 3),
                          lights.reshape(-1, 3), ambient_ratio).view(B, N, 3)
        cam_space = torch.einsum("bnk,bkj->bnj", scene.means.unsqueeze(0) - campos[:, None, :], c2w[:, :3, :3])
        features = torch.cat([color, -cam_space[..., 2:3], normals], -1)  # [B, N, 7]
        s = self.settings
        if self.backend == "gsplat":
            image, alpha, means2d, radius, pairs = gsplat_splat(scene, features, c2w, focal, W, H, s)
        else:
            proj = project(scene.means, scene.covariances(), c2w, focal, W, H, s.near_plane, s.low_pass)
            image, alpha, pairs = splat(proj, scene.opacities(), features, W, H, s.tile_size)
            means2d, radius = proj.means2d, proj.radius
        if means2d.requires_grad:
            means2d.retain_grad()  # the view-space gradient the density control reads
        _, rays_d = get_rays(cams.to(device))
        bg = bg_colors.to(device)[:, None, None, :].expand(B, H, W, 3) if bg_colors is not None else \
            scene.background(rays_d.reshape(-1, 3)).view(B, H, W, 3)
        opacity = alpha.unsqueeze(-1)  # [B, H, W, 1]
        rgb = image[..., :3] + (1 - opacity) * bg
        normal = (F.normalize(image[..., 4:7], dim=-1) + 1) / 2 * opacity
        empty = rgb.new_zeros(0)
        return RenderOutput(rgb=rgb, opacity=opacity, depth=image[..., 3:4], normal=normal, weights=empty,
                            sample_normals=None, sample_dirs=rgb.new_zeros(0, 3), num_samples=int(pairs),
                            splats={"means2d": means2d, "radius": radius, "width": W, "height": H})
