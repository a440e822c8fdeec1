"""Settings of a Gaussian-splat scene (``scene.kind`` gaussians; ``SceneConfig.gaussians``): its initialisation,
its renderer, its per-parameter learning rates and the adaptive density control of 3D Gaussian Splatting (Kerbl et
al. 2023), as DreamGaussian (Tang et al. 2024) runs it for text-to-3D.

The defaults are DreamGaussian's ``configs/text.yaml`` and the code it runs (``gs_renderer.py``, ``main.py``):
5000 random points in a ball of radius 0.5, SH degree 0, opacity 0.1, scales from the mean distance to the
3 nearest neighbours, position lr 1e-3 → 2e-5 over 300 steps (log-linear, times ``position_lr_scale`` 10: the
``spatial_lr_scale`` DreamGaussian passes for a random start), feature 0.01 (the higher SH bands 1/20 of it),
opacity 0.05, scaling and rotation 0.005; densify every 50 steps from step 0 to 3000 at view-space gradient 0.01,
clone below / split above ``percent_dense`` 0.01 × ``extent`` 4 (split into 2 at scale / (0.8·2)), prune below
opacity 0.01 and above 0.1 × extent in world size, opacity reset to 0.01 every 700 steps.

Every threshold and interval is a schedule (``schedules.py``: a constant or ``[start_step, start, end, end_step]``);
the phase boundaries (``densify_from``, ``densify_until``, ``position_lr_steps``) stretch with a run's length as
every step count does (``RunConfig.with_steps``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List

from .errors import ConfigError
from .schedules import ScheduleSpec, validate_schedule

#: how the scene starts when it is not converted from another run: random points in a ball (DreamGaussian)
INITS = ("ball",)
#: splatting backends (``render/gaussian_renderer.py``): auto (gsplat on CUDA when a trial call works, else torch)
GAUSSIAN_BACKENDS = ("auto", "torch", "gsplat")
MAX_SH_DEGREE = 3


def _schedule(default: Any) -> Any:
    return field(default=default, metadata={"schedule": True})


def _steps(default: int, least: int = 0) -> Any:
    """A step count that stretches with the run's length (``RunConfig.with_steps``), never below ``least``."""
    return field(default=default, metadata={"steps": True, "least": least})


@dataclass
class GaussianConfig:
    """A Gaussian-splat scene and its training (see the module docstring for where each default comes from)."""

    #: initial number of Gaussians (random ball; a conversion from a run or a mesh samples as many)
    num_points: int = 5000
    init: str = "ball"
    #: radius of the ball the random points fill (uniformly in volume)
    init_radius: float = 0.5
    init_opacity: float = 0.1
    #: colour of the random points (DreamGaussian: SH of U[0, 1/255], i.e. grey 0.5)
    init_color: List[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    #: spherical-harmonics degree of the colour (0: view-independent DC only … 3: 16 coefficients a channel)
    sh_degree: int = 0
    #: one SH band more every this many steps (3DGS: 1000); 0: every band from the start (DreamGaussian)
    sh_degree_every: int = _steps(0)
    #: a stage-1 run → Gaussians: the density level that counts as inside ("auto": the mesh export's mean level)
    init_density_threshold: Any = "auto"

    # ------------------------------------------------------------------ learning rates (Adam, per parameter)
    position_lr_init: float = 1e-3
    position_lr_final: float = 2e-5
    #: the position lr falls log-linearly from init to final over these steps, then stays at final
    position_lr_steps: int = _steps(300, least=1)
    #: both position lrs are multiplied by this (3DGS's spatial_lr_scale; DreamGaussian: 10 for a random start)
    position_lr_scale: float = 10.0
    feature_lr: float = 0.01
    #: the SH bands above 0 (3DGS: feature_lr / 20)
    feature_rest_lr: float = 0.0005
    opacity_lr: float = 0.05
    scaling_lr: float = 0.005
    rotation_lr: float = 0.005

    # ------------------------------------------------------------------ adaptive density control
    densify_from: int = _steps(0)
    densify_until: int = _steps(3000)
    densify_every: ScheduleSpec = _schedule(50)
    #: mean view-space (NDC) gradient norm of a Gaussian's 2D mean above which it is cloned or split
    densify_grad_threshold: ScheduleSpec = _schedule(0.01)
    #: clone when the largest scale is at most percent_dense × extent, split when above
    percent_dense: ScheduleSpec = _schedule(0.01)
    #: the scene extent (world units) the size thresholds are fractions of (DreamGaussian: 4)
    extent: float = 4.0
    split_count: int = 2
    #: a split Gaussian's children get scale / (split_scale_divisor × split_count) (3DGS: 0.8)
    split_scale_divisor: float = 0.8
    prune_opacity: ScheduleSpec = _schedule(0.01)
    #: prune Gaussians whose largest scale exceeds this fraction of the extent (3DGS: 0.1)
    prune_scale: ScheduleSpec = _schedule(0.1)
    #: prune Gaussians whose screen radius exceeded this many pixels since the last densification (0: never; in
    #: 3DGS and DreamGaussian the test reads radii just reset to zero, so it never prunes either)
    prune_screen_size: ScheduleSpec = _schedule(0.0)
    #: set every opacity above opacity_reset_value down to it every this many steps (0: never)
    opacity_reset_every: ScheduleSpec = _schedule(700)
    opacity_reset_value: float = 0.01
    #: at most this many Gaussians: densification stops adding at the cap (a warning says so)
    max_gaussians: int = 1_000_000

    # ------------------------------------------------------------------ rendering
    #: auto (gsplat on CUDA when a trial call works, else torch) | torch (the pure-PyTorch reference) | gsplat
    backend: str = "auto"
    #: square tiles (pixels a side) the torch splatter bins Gaussians into (3DGS and gsplat: 16)
    tile_size: int = 16
    #: Gaussians nearer the camera than this (camera-space depth) are skipped (gsplat's near_plane)
    near_plane: float = 0.01
    #: the low-pass dilation added to every 2D covariance (pixels², 3DGS: 0.3)
    low_pass: float = 0.3

    def validate(self, prefix: str = "scene.gaussians") -> "GaussianConfig":
        """Raise ``ConfigError`` naming the field and the fix for any invalid value."""
        def name(f: str) -> str:
            return f"{prefix}.{f}"

        for f, lo, hi in (("num_points", 1, 100_000_000), ("sh_degree", 0, MAX_SH_DEGREE), ("split_count", 2, 16),
                          ("tile_size", 4, 64), ("max_gaussians", 1, 1_000_000_000), ("sh_degree_every", 0, 1 << 40),
                          ("densify_from", 0, 1 << 40), ("densify_until", 0, 1 << 40),
                          ("position_lr_steps", 1, 1 << 40)):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ConfigError(name(f), f"must be an integer in [{lo}, {hi}], got {v!r}")
        if self.init not in INITS:
            raise ConfigError(name("init"), f"{self.init!r} is not one of {', '.join(map(repr, INITS))}")
        if self.backend not in GAUSSIAN_BACKENDS:
            raise ConfigError(name("backend"), f"{self.backend!r} is not one of "
                                               f"{', '.join(map(repr, GAUSSIAN_BACKENDS))}")
        for f in ("init_radius", "position_lr_init", "position_lr_final", "position_lr_scale", "feature_lr",
                  "feature_rest_lr", "opacity_lr", "scaling_lr", "rotation_lr", "extent", "split_scale_divisor",
                  "near_plane"):
            v = getattr(self, f)
            if not _number(v) or v <= 0:
                raise ConfigError(name(f), f"must be a positive number, got {v!r}")
        for f in ("init_opacity", "opacity_reset_value"):
            v = getattr(self, f)
            if not _number(v) or not 0 < v < 1:
                raise ConfigError(name(f), f"must be a number in (0, 1) (an opacity), got {v!r}")
        if not _number(self.low_pass) or self.low_pass < 0:
            raise ConfigError(name("low_pass"), f"must be a non-negative number (pixels²), got {self.low_pass!r}")
        c = self.init_color
        if not isinstance(c, (list, tuple)) or len(c) != 3 or not all(_number(x) and 0 <= x <= 1 for x in c):
            raise ConfigError(name("init_color"), f"must be 3 numbers in [0, 1], got {c!r}")
        t = self.init_density_threshold
        if t != "auto" and (not _number(t) or t <= 0):
            raise ConfigError(name("init_density_threshold"), f"must be 'auto' or a positive density, got {t!r}")
        for f in ("densify_every", "opacity_reset_every"):
            validate_schedule(getattr(self, f), name(f), minimum=0.0)
        for f in ("densify_grad_threshold", "percent_dense", "prune_opacity", "prune_scale", "prune_screen_size"):
            validate_schedule(getattr(self, f), name(f), minimum=0.0)
        if self.max_gaussians < self.num_points:
            raise ConfigError(name("max_gaussians"), f"{self.max_gaussians} is below the {self.num_points} Gaussians "
                                                     f"the scene starts with ({prefix}.num_points): raise "
                                                     f"max_gaussians or lower num_points")
        return self


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def interval_due(spec: ScheduleSpec, step: int) -> bool:
    """Whether an every-N-steps action with interval schedule ``spec`` runs after ``step`` steps (N ≤ 0: never)."""
    from .schedules import schedule_value

    every = int(round(schedule_value(spec, step)))
    return every > 0 and step > 0 and step % every == 0


def position_lr(cfg: GaussianConfig, step: int) -> float:
    """The learning rate of the means at ``step``: log-linear from init to final over ``position_lr_steps``, times
    ``position_lr_scale`` (3DGS's ``get_expon_lr_func`` without its delay, as DreamGaussian uses it)."""
    t = min(max(step / cfg.position_lr_steps, 0.0), 1.0)
    lr = math.exp(math.log(cfg.position_lr_init) * (1 - t) + math.log(cfg.position_lr_final) * t)
    return lr * cfg.position_lr_scale
