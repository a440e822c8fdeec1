"""Arithmetic that lines ComfyUI's σ-parameterised models up with the engine's ᾱ-parameterised priors.

No ComfyUI and no torch import here (the pack imports every public ``nodes/*.py`` at start-up, and CI has no
ComfyUI): the functions work on torch tensors and on plain floats through their operators only.

The two parameterisations of one noisy latent (``z`` the scaled VAE latent, ``ε`` unit Gaussian noise):

* the engine (``DiffusionPrior.add_noise``): ``z_t = √ᾱ_t · z + √(1 − ᾱ_t) · ε`` at an integer timestep ``t``;
* ComfyUI (k-diffusion, ``comfy/model_sampling.py``): ``x = z + σ · ε``, the model called with σ itself.

They describe the same point when ``σ_t² = (1 − ᾱ_t) / ᾱ_t``, i.e. ``ᾱ_t = 1 / (1 + σ_t²)`` (how ComfyUI's
``ModelSamplingDiscrete`` builds its ``sigmas`` table from the betas), and then ``x = z_t / √ᾱ_t =
z_t · √(1 + σ_t²)``. ComfyUI's ``calculate_input`` divides ``x`` by ``√(σ² + σ_data²)`` (σ_data = 1 for SD), so
the UNet sees exactly the engine's ``z_t``; ``timestep(σ_t)`` gives back ``t``. ``apply_model`` returns the
denoised ``x0`` (for ε- and v-prediction alike, through the model's own ``calculate_denoised``), and
``ε = (x − x0) / σ``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from csd_backend.errors import ConfigError

#: ComfyUI model-config classes (``comfy/supported_models.py``) this prior runs, with what they are
SUPPORTED_CONFIGS = {"SD15": "Stable Diffusion 1.x", "SD20": "Stable Diffusion 2.x"}
#: ComfyUI ``model_base`` class every supported checkpoint loads as (others need extra conditioning inputs)
SUPPORTED_MODEL_CLASS = "BaseModel"
#: ``model_base.ModelType`` names this prior converts (the model's own ``calculate_denoised`` does the work)
SUPPORTED_PREDICTIONS = ("EPS", "V_PREDICTION")
SUPPORTED_TEXT = ("Stable Diffusion 1.x (SD15: 512 px, ε-prediction) and 2.x (SD20: 512 px ε-prediction "
                  "\"-base\" and 768 px v-prediction) checkpoints, plain text-to-image (no inpainting, unCLIP, "
                  "instruct-pix2pix or depth models)")


# ------------------------------------------------------------------------------------------------ σ ↔ ᾱ ↔ t
def alphas_cumprod_from_sigmas(sigmas):
    """``ᾱ = 1 / (1 + σ²)`` (the inverse of ComfyUI's ``σ = √((1 − ᾱ) / ᾱ)``)."""
    return 1.0 / (1.0 + sigmas * sigmas)


def sigmas_from_alphas_cumprod(alphas_cumprod):
    """``σ = √((1 − ᾱ) / ᾱ)``, as ``ModelSamplingDiscrete._register_schedule`` computes it."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigma_at(sigmas, t):
    """σ of integer timesteps ``t`` (a tensor ``[N]`` or an int) from a sigmas table ``[T]`` (ascending)."""
    return sigmas[t]


def timestep_of_sigma(sigmas, sigma: float) -> int:
    """The integer timestep whose σ is nearest in log space (what ComfyUI's discrete ``timestep(σ)`` does)."""
    target = math.log(float(sigma))
    values = [math.log(float(s)) for s in sigmas]
    return min(range(len(values)), key=lambda i: abs(values[i] - target))


def per_item(value, ndim: int):
    """A per-item ``[N]`` tensor shaped ``[N, 1, ..., 1]`` to broadcast over ``ndim`` dims (floats unchanged)."""
    if hasattr(value, "view") and getattr(value, "dim", lambda: 0)() >= 1:
        return value.view(-1, *([1] * (ndim - 1)))
    return value


# ------------------------------------------------------------------------------------------ the two spaces
def comfy_x_from_z_t(z_t, sigma):
    """Engine ``z_t`` (``√ᾱ z + √(1−ᾱ) ε``) → ComfyUI's ``x = z + σ ε = z_t · √(1 + σ²)``."""
    s = per_item(sigma, z_t.dim() if hasattr(z_t, "dim") else 0)
    return z_t * (1.0 + s * s) ** 0.5


def z_t_from_comfy_x(x, sigma):
    """ComfyUI's ``x`` → the engine's ``z_t = x / √(1 + σ²)``."""
    s = per_item(sigma, x.dim() if hasattr(x, "dim") else 0)
    return x / (1.0 + s * s) ** 0.5


def eps_from_denoised(x, denoised, sigma):
    """ε from ComfyUI's denoised ``x0`` at σ: ``ε = (x − x0) / σ`` (σ > 0)."""
    s = per_item(sigma, x.dim() if hasattr(x, "dim") else 0)
    return (x - denoised) / s


# ---------------------------------------------------- ComfyUI's model sampling, for the checks (model_sampling.py)
def comfy_model_input(x, sigma, sigma_data: float = 1.0):
    """ComfyUI's ``EPS.calculate_input`` (also used by V_PREDICTION): ``x / √(σ² + σ_data²)``."""
    s = per_item(sigma, x.dim() if hasattr(x, "dim") else 0)
    return x / (s * s + sigma_data ** 2) ** 0.5


def comfy_denoised(prediction: str, x, model_output, sigma, sigma_data: float = 1.0):
    """ComfyUI's ``calculate_denoised`` for ``prediction`` ``"EPS"`` (``x − out·σ``) or ``"V_PREDICTION"``
    (``x·σd²/(σ²+σd²) − out·σ·σd/√(σ²+σd²)``)."""
    s = per_item(sigma, x.dim() if hasattr(x, "dim") else 0)
    if prediction == "EPS":
        return x - model_output * s
    if prediction == "V_PREDICTION":
        return (x * sigma_data ** 2 / (s * s + sigma_data ** 2)
                - model_output * s * sigma_data / (s * s + sigma_data ** 2) ** 0.5)
    raise ValueError(f"unknown prediction type {prediction!r}")


# --------------------------------------------------------------------------------------- text embeddings
def repeat_to_common_length(embeddings: Sequence):
    """Cross-attention contexts ``[L_i, D]`` of different lengths (ComfyUI encodes a prompt longer than 75 tokens
    as several 77-token chunks) repeated along the tokens to their least common multiple, as ComfyUI's
    ``CONDCrossAttn.concat`` batches them. Repeating every key and value k times leaves attention unchanged."""
    lengths = [int(e.shape[0]) for e in embeddings]
    common = 1
    for n in lengths:
        common = common * n // math.gcd(common, n)
    return [e if n == common else e.repeat(common // n, *([1] * (e.dim() - 1))) for e, n in zip(embeddings, lengths)]


# ------------------------------------------------------------------------------------------- model support
@dataclass(frozen=True)
class ModelSupport:
    family: str  # "SD15" | "SD20"
    prediction: str  # "EPS" | "V_PREDICTION"
    native_resolution: int  # 512 | 768

    @property
    def name(self) -> str:
        """What checkpoints record as the run's prior (``Optimization.resume`` compares it)."""
        return f"comfyui:{self.family}:{'v' if self.prediction == 'V_PREDICTION' else 'eps'}"


def check_support(config_class: str, model_class: str, prediction: str, in_channels: Optional[int] = 4,
                  extra_inputs: Sequence[str] = (), sampling_ok: bool = True) -> ModelSupport:
    """What a ComfyUI MODEL is, from its ``model_config`` class name, ``model_base`` class name, ``ModelType`` name,
    UNet input channels and extra conditioning inputs; raises ConfigError naming what is supported otherwise."""
    what = f"this MODEL is {config_class} (ComfyUI model class {model_class}, {prediction})"
    hint = ("Load a Stable Diffusion 1.5 or 2.1 checkpoint with Load Checkpoint (LoRAs on top are fine), or use CSD "
            "Load Diffusion Model.")
    if config_class not in SUPPORTED_CONFIGS or model_class != SUPPORTED_MODEL_CLASS:
        raise ConfigError("model", f"{what}; CSD Prior from ComfyUI Model supports {SUPPORTED_TEXT}. {hint}")
    if (in_channels is not None and int(in_channels) != 4) or tuple(extra_inputs):
        extra = f"its UNet takes {in_channels} input channels" if in_channels not in (None, 4) else \
            f"it needs the extra inputs {', '.join(extra_inputs)}"
        raise ConfigError("model", f"{what}, but {extra} (an inpainting or image-conditioned variant); CSD Prior "
                                   f"from ComfyUI Model supports {SUPPORTED_TEXT}. {hint}")
    if prediction not in SUPPORTED_PREDICTIONS:
        raise ConfigError("model", f"{what}: the prediction type {prediction} is not supported (only ε and v); "
                                   f"{SUPPORTED_TEXT}. {hint}")
    if not sampling_ok:
        raise ConfigError("model", f"{what}, but its model sampling was patched to one that is not a discrete σ "
                                   "schedule with x = z + σ·ε (e.g. a flow or ModelSamplingContinuous patch); remove "
                                   "that patch for CSD")
    native = 768 if (config_class == "SD20" and prediction == "V_PREDICTION") else 512
    return ModelSupport(config_class, prediction, native)


# ------------------------------------------------------------------------------------------------- sizes
def posterior_sample(moments, noise=None):
    """A sample (``noise`` given) or the mean (``noise`` None) of the VAE's diagonal Gaussian from its moments
    ``[B, 2C, h, w]`` (mean, log-variance clamped to [−30, 20], as LDM/ComfyUI/diffusers do)."""
    c = moments.shape[1] // 2
    mean, logvar = moments[:, :c], moments[:, c:]
    if noise is None:
        return mean
    return mean + (0.5 * logvar.clamp(-30.0, 20.0)).exp() * noise
