"""Diffusion priors. ``load_prior`` turns a ``PriorConfig`` into a prior (imports diffusers only when needed), with
its ControlNet and VSD's LoRA base model attached when the config names them."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import PriorConfig
from ..errors import ConfigError, ModelNotFoundError

if TYPE_CHECKING:  # the interface is loaded on use: importing the package (and .resolution) needs no torch
    from .base import DiffusionPrior

#: ``--model analytic`` (or ``analytic:RES``) selects the exact Gaussian test prior (no weights needed)
ANALYTIC_PREFIX = "analytic"
#: ``--model toy`` selects the small Stable-Diffusion-shaped prior shipped with the package: 64×64 renders of
#: five toy objects ("a red cube", "a blue ball", "a green cone", "a yellow mug", "a purple ring"), for offline
#: demos and shape tests (trained by ``benchmarks/toy_prior/train.py``)
TOY_MODEL = "toy"
TOY_PROMPTS = ("a red cube", "a blue ball", "a green cone", "a yellow mug", "a purple ring")


def toy_model_path() -> Path:
    """The diffusers folder of the shipped toy prior."""
    return Path(__file__).resolve().parent / "toy_model"


def load_prior(cfg: PriorConfig) -> DiffusionPrior:
    """The prior of ``cfg``, with its ControlNet attached when ``cfg.controlnet`` names one and VSD's LoRA base
    model as ``prior.lora_prior`` when ``cfg.lora_base_model`` names one."""
    prior = _load_model(cfg)
    if cfg.controlnet:
        if not hasattr(prior, "attach_controlnet"):
            raise ConfigError("prior.controlnet", f"a ControlNet conditions a Stable Diffusion model, not the "
                                                  f"'{cfg.model}' prior; remove the ControlNet or use an SD model")
        prior.attach_controlnet(cfg.controlnet, cfg.controlnet_scale)
    if cfg.lora_base_model:
        prior.lora_prior = load_lora_base_model(cfg)
    return prior


def load_lora_base_model(cfg: PriorConfig) -> DiffusionPrior:
    """VSD's LoRA base model ``cfg.lora_base_model`` (threestudio's ``pretrained_model_name_or_path_lora``), loaded
    as a prior by the same loaders, on the prior's device and dtype; errors name ``prior.lora_base_model``."""
    where = "prior.lora_base_model"
    try:
        return _load_model(PriorConfig(model=cfg.lora_base_model, device=cfg.device, dtype=cfg.dtype))
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{where} (the model VSD's LoRA adapts): {e}") from e
    except ConfigError as e:
        text = str(e).removeprefix(f"{e.field}: ")
        raise ConfigError(where, f"{cfg.lora_base_model!r}: {text}") from e


def _load_model(cfg: PriorConfig) -> DiffusionPrior:
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

    if model == TOY_MODEL:
        path = toy_model_path()
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"the toy prior is missing from this installation (looked for {path / 'model_index.json'}); "
                "reinstall the package, or rebuild it with `python benchmarks/toy_prior/train.py --out "
                f"{path} --work runs/toy_prior`")
        prior = load_stable_diffusion(path, device=cfg.device, dtype=cfg.dtype, resolution=cfg.resolution,
                                      max_resolution=cfg.max_resolution)
        prior.name = TOY_MODEL  # checkpoints record it; --resume then needs --model toy again
        prior.source = TOY_MODEL  # what load_prior takes back (the nodes store it as the run's model)
        return prior
    from .mvdream_loader import is_mvdream, load_mvdream

    if is_mvdream(model):  # a checkpoint with MVDream's camera embedding, an MVDream folder or hub id
        return load_mvdream(model, device=cfg.device, dtype=cfg.dtype, config=cfg.model_config,
                            resolution=cfg.resolution, max_resolution=cfg.max_resolution)
    from .deepfloyd_if import is_deepfloyd_if, load_deepfloyd_if

    if is_deepfloyd_if(model):  # model_index.json names an IF pipeline (or an uncached DeepFloyd hub id)
        return load_deepfloyd_if(model, device=cfg.device, dtype=cfg.dtype, resolution=cfg.resolution,
                                 max_resolution=cfg.max_resolution)
    return load_stable_diffusion(model, device=cfg.device, dtype=cfg.dtype, config=cfg.model_config,
                                 resolution=cfg.resolution, max_resolution=cfg.max_resolution)


__all__ = ["DiffusionPrior", "load_prior", "TOY_MODEL", "TOY_PROMPTS", "toy_model_path"]


def __getattr__(name: str):
    if name == "DiffusionPrior":
        from .base import DiffusionPrior

        return DiffusionPrior
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
