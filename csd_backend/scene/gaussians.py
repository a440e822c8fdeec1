"""3D Gaussian splats (``scene.kind`` gaussians; settings ``SceneConfig.gaussians``, ``gaussian_config.py``).

Each Gaussian has a mean (world units, the engine's Z-up frame), log-scales, a rotation quaternion ``(w, x, y, z)``
(normalised on use), an opacity logit and its colour as real spherical harmonics (3DGS's basis and order): a DC
term ``sh_dc`` ``[N, 3]`` and the higher bands ``sh_rest`` ``[N, (d+1)² − 1, 3]`` (empty at degree 0). The colour
seen from direction ``v`` is ``max(0, Σ_k Y_k(v)·c_k + 0.5)`` (3DGS). These are the ``.ply`` attributes of the INRIA
layout one to one (``export/splats.py``).

The number of Gaussians changes during training (``gaussian_density.py``): the parameters keep their identity
(the optimiser's groups stay valid) and change their ``data``; ``load_state_dict`` takes the saved count.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SceneConfig
from .volume import make_background

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
         1.445305721320277, -0.5900435899266435)
#: the per-Gaussian parameters, in the order of the .ply attributes
PARAMETERS = ("means", "sh_dc", "sh_rest", "opacity_logits", "log_scales", "quaternions")


def num_sh(degree: int) -> int:
    """Coefficients per colour channel of SH ``degree``: ``(degree + 1)²``."""
    return (int(degree) + 1) ** 2


def sh_basis(dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """The real SH basis of 3DGS (signs and order of its ``eval_sh``) at unit directions ``[..., 3]`` →
    ``[..., (degree + 1)²]``."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree > 0:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree > 1:
        xx, yy, zz = x * x, y * y, z * z
        out += [SH_C2[0] * x * y, SH_C2[1] * y * z, SH_C2[2] * (2 * zz - xx - yy), SH_C2[3] * x * z,
                SH_C2[4] * (xx - yy)]
    if degree > 2:
        out += [SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * x * y * z, SH_C3[2] * y * (4 * zz - xx - yy),
                SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[4] * x * (4 * zz - xx - yy),
                SH_C3[5] * z * (xx - yy), SH_C3[6] * x * (xx - 3 * yy)]
    return torch.stack(out, -1)


def rgb_to_sh(rgb: torch.Tensor) -> torch.Tensor:
    """The DC coefficient whose colour is ``rgb`` (3DGS's RGB2SH)."""
    return (rgb - 0.5) / SH_C0


def quaternion_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[N, 3, 3]`` of quaternions ``[N, 4]`` ``(w, x, y, z)`` (normalised here)."""
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).view(-1, 3, 3)


def neighbour_scales(points: torch.Tensor, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """Log-scales ``[N, 3]`` from the mean squared distance to the ``k`` nearest other points (3DGS's ``distCUDA2``,
    clamped at 1e-7): isotropic Gaussians that about touch their neighbours. Exact, in row chunks of ``chunk``."""
    n = points.shape[0]
    if n <= 1:
        return torch.full((n, 3), math.log(0.01), device=points.device)
    k = min(k, n - 1)
    d2 = torch.cat([torch.cdist(points[i:i + chunk], points).pow(2).topk(k + 1, largest=False).values[:, 1:]
                    for i in range(0, n, chunk)])  # [N, k] without the point itself
    return torch.log(torch.sqrt(d2.mean(-1).clamp_min(1e-7))).unsqueeze(-1).expand(n, 3).contiguous()


def ball_points(n: int, radius: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[n, 3]`` points uniform in the ball of ``radius`` (DreamGaussian's random start)."""
    phi = torch.rand(n, generator=generator) * 2 * math.pi
    cos_theta = torch.rand(n, generator=generator) * 2 - 1
    r = radius * torch.rand(n, generator=generator).pow(1.0 / 3.0)
    sin_theta = torch.sqrt((1 - cos_theta ** 2).clamp_min(0))
    return torch.stack([r * sin_theta * torch.cos(phi), r * sin_theta * torch.sin(phi), r * cos_theta], -1)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class GaussianScene(nn.Module):
    """What a Gaussian run trains: the splats (``PARAMETERS``) and the background of ``cfg.background``."""

    def __init__(self, cfg: SceneConfig, device=None):
        super().__init__()
        self.cfg = cfg
        g = cfg.gaussians
        self.max_sh_degree = int(g.sh_degree)
        self.active_sh_degree = self.max_sh_degree
        rest = num_sh(self.max_sh_degree) - 1
        for name, shape in (("means", (0, 3)), ("sh_dc", (0, 3)), ("sh_rest", (0, rest, 3)), ("opacity_logits", (0,)),
                            ("log_scales", (0, 3)), ("quaternions", (0, 4))):
            setattr(self, name, nn.Parameter(torch.zeros(shape)))
        # the random start draws from torch's global RNG, which the run seeds before building its scene
        points = ball_points(g.num_points, g.init_radius)
        self.set_gaussians(points, torch.tensor(g.init_color).expand(g.num_points, 3), opacity=g.init_opacity)
        self.background = make_background(cfg)
        self.update_step(0)

    # ------------------------------------------------------------------------------------------- state
    @property
    def kind(self) -> str:
        return "gaussians"

    @property
    def radius(self) -> float:
        return float(self.cfg.radius)

    @property
    def num_gaussians(self) -> int:
        return int(self.means.shape[0])

    def gaussian_parameters(self) -> Dict[str, nn.Parameter]:
        """The per-Gaussian parameters by name (``PARAMETERS``), each with the Gaussians along dim 0."""
        return {name: getattr(self, name) for name in PARAMETERS}

    @torch.no_grad()
    def set_gaussians(self, means: torch.Tensor, colors: torch.Tensor, opacity=None, log_scales=None,
                      quaternions=None, sh_rest=None) -> "GaussianScene":
        """Replace every Gaussian: ``means`` ``[N, 3]``, ``colors`` ``[N, 3]`` in [0, 1] (the DC term), opacities
        ``[N]`` or one number (default ``init_opacity``), log-scales ``[N, 3]`` (default ``neighbour_scales``),
        quaternions ``[N, 4]`` (default identity), higher SH bands ``[N, K − 1, 3]`` (default zero)."""
        n = means.shape[0]
        device = self.means.device
        means = means.to(device, torch.float32)
        opacity = self.cfg.gaussians.init_opacity if opacity is None else opacity
        opacity = torch.as_tensor(opacity, dtype=torch.float32, device=device).expand(n).clamp(1e-6, 1 - 1e-6)
        values = {
            "means": means, "sh_dc": rgb_to_sh(colors.to(device, torch.float32)),
            "sh_rest": (torch.zeros(n, num_sh(self.max_sh_degree) - 1, 3, device=device) if sh_rest is None
                        else sh_rest.to(device, torch.float32)),
            "opacity_logits": torch.log(opacity / (1 - opacity)),
            "log_scales": neighbour_scales(means) if log_scales is None else log_scales.to(device, torch.float32),
            "quaternions": (torch.tensor([1.0, 0.0, 0.0, 0.0], device=device).expand(n, 4) if quaternions is None
                            else quaternions.to(device, torch.float32)),
        }
        for name, value in values.items():
            getattr(self, name).data = value.contiguous().clone()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the saved count of Gaussians wins: resize the parameters (same objects) before copying into them
        for name in PARAMETERS:
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor):
                p = getattr(self, name)
                p.data = torch.empty(saved.shape, dtype=p.dtype, device=p.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def update_step(self, step: int) -> None:
        """The SH bands in use at ``step`` (all of them unless ``sh_degree_every``)."""
        every = self.cfg.gaussians.sh_degree_every
        self.active_sh_degree = self.max_sh_degree if every <= 0 else min(self.max_sh_degree, int(step) // every)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameter_groups(self, o) -> List[dict]:
        """Adam groups with the per-parameter learning rates of ``cfg.gaussians`` (the background: ``o.lr``, or its
        ``o.group_lr`` entry); each group is named, so the position lr can follow its decay."""
        from ..gaussian_config import position_lr

        g = self.cfg.gaussians
        lrs = {"means": position_lr(g, 0), "sh_dc": g.feature_lr, "sh_rest": g.feature_rest_lr,
               "opacity_logits": g.opacity_lr, "log_scales": g.scaling_lr, "quaternions": g.rotation_lr}
        groups = [{"params": [getattr(self, n)], "lr": lrs[n], "name": n} for n in PARAMETERS]
        background = list(self.background.parameters())
        if background:
            groups.append({"params": background, "lr": float(o.group_lr.get("background", o.lr)),
                           "name": "background"})
        return groups

    # ------------------------------------------------------------------------------------------- values
    def scales(self) -> torch.Tensor:
        return torch.exp(self.log_scales)  # [N, 3]

    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)  # [N]

    def rotations(self) -> torch.Tensor:
        return quaternion_matrix(self.quaternions)  # [N, 3, 3]

    def covariances(self) -> torch.Tensor:
        """World covariances ``[N, 3, 3]``: ``R S Sᵀ Rᵀ``."""
        m = self.rotations() * self.scales().unsqueeze(-2)  # R · diag(s)
        return m @ m.transpose(-1, -2)

    def colors(self, campos: torch.Tensor) -> torch.Tensor:
        """Colours ``[B, N, 3]`` of the Gaussians seen from camera positions ``campos`` ``[B, 3]`` (degree 0: the
        same for every camera)."""
        d = self.active_sh_degree
        if d == 0:
            return (SH_C0 * self.sh_dc + 0.5).clamp_min(0.0).unsqueeze(0).expand(campos.shape[0], -1, -1)
        dirs = F.normalize(self.means.unsqueeze(0) - campos[:, None, :], dim=-1)  # [B, N, 3]
        coeffs = torch.cat([self.sh_dc.unsqueeze(1), self.sh_rest[:, :num_sh(d) - 1]], 1)  # [N, K, 3]
        return (torch.einsum("bnk,nkc->bnc", sh_basis(dirs, d), coeffs) + 0.5).clamp_min(0.0)

    def normals(self, campos: torch.Tensor) -> torch.Tensor:
        """Unit normals ``[B, N, 3]``: each Gaussian's shortest axis (the normal of the flat ellipsoid it becomes
        on a surface), turned towards each camera at ``campos`` ``[B, 3]``."""
        axis = self.log_scales.argmin(-1)  # [N]
        n = torch.gather(self.rotations(), 2, axis.view(-1, 1, 1).expand(-1, 3, 1)).squeeze(-1)  # [N, 3] columns
        facing = ((campos[:, None, :] - self.means.unsqueeze(0)) * n.unsqueeze(0)).sum(-1, keepdim=True)
        return torch.where(facing < 0, -n, n)

    @property
    def volume(self):
        """The splats as a density and albedo field (``gaussian_field.GaussianField``: mesh export, conversions)."""
        from .gaussian_field import GaussianField

        key = tuple((p.data_ptr(), p._version, tuple(p.shape)) for p in self.gaussian_parameters().values())
        cached = self.__dict__.get("_field")
        if cached is None or cached[0] != key:  # built once per state of the splats (exports query it in chunks)
            self.__dict__["_field"] = cached = (key, GaussianField(self))
        return cached[1]

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """Albedo ``[N, 3]`` at world points ``[N, 3]``: the splats' DC colours weighted by their density there."""
        return self.volume.albedo(points)
