"""Diffusion priors. ``load_prior`` turns a ``PriorConfig`` into a prior (imports diffusers only when needed)."""
from __future__ import annotations

from ..config import PriorConfig
from ..errors import ConfigError
from .base import DiffusionPrior

#: ``--model analytic`` (or ``analytic:RES``) selects the exact Gaussian test prior (no weights needed)
ANALYTIC_PREFIX = "analytic"


def load_prior(cfg: PriorConfig) -> DiffusionPrior:
    model = (cfg.model or "").strip()
    if not model:
        raise ConfigError("model", "no diffusion model given; pass a diffusers folder, a .safetensors file or a hub id")
    if model == ANALYTIC_PREFIX or model.startswith(ANALYTIC_PREFIX + ":"):
        from .analytic import AnalyticPrior

        res = model.split(":", 1)[1] if ":" in model else ""
        try:
            resolution = int(res) if res else 32
        except ValueError:
            raise ConfigError("model", f"'{model}': the analytic prior takes an integer resolution, e.g. analytic:32")
        return AnalyticPrior(resolution=resolution, device="cpu" if cfg.device == "auto" else cfg.device)
    from .stable_diffusion import load_stable_diffusion

    return load_stable_diffusion(model, device=cfg.device, dtype=cfg.dtype, config=cfg.model_config,
                                 resolution=cfg.resolution)


__all__ = ["DiffusionPrior", "load_prior"]
