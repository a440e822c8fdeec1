"""CSD Prior from ComfyUI Model: the MODEL, CLIP and VAE of ComfyUI's Load Checkpoint (LoRAs applied) as a CSD prior.

``ComfyModelPrior`` is a :class:`csd_backend.priors.base.DiffusionPrior` over ComfyUI's own objects:

* text: ``clip.tokenize`` / ``clip.encode_from_tokens`` → the cross-attention context ``[L, D]`` (cached);
* renders ``[B, H, W, 3]`` in [0, 1] → ``vae.first_stage_model``'s encoder **with gradients** (ComfyUI's
  ``VAE.encode`` returns the posterior's mode into a preallocated tensor and is meant for inference), a sample of
  the posterior as the engine's Stable Diffusion prior takes, then the model's ``latent_format.process_in``
  (× 0.18215 for SD 1.x/2.x);
* noise: ``model.model.apply_model(x, σ, c_crossattn=...)``, which scales the input (``calculate_input``), maps σ
  to the UNet's timestep and returns the denoised x0 through the model's own ``calculate_denoised`` (ε- or
  v-prediction); ε = (x − x0) / σ. The engine's ``z_t`` becomes ComfyUI's ``x = z_t·√(1+σ²)`` and ``alphas_cumprod``
  is ``1 / (1 + σ²)`` of the model's sigmas table, so ``add_noise`` and ``predict_noise`` agree (see
  ``comfy_sampling.py``);
* the models are put on ComfyUI's device by ``comfy.model_management.load_models_gpu`` before every use, so
  ComfyUI stays free to unload them between runs (and LoRA patches are applied by it).

The class needs torch and csd_backend, which the pack must not import at start-up: it is built on first use
(``ComfyModelPrior`` is a lazy module attribute).
"""
from __future__ import annotations

from typing import Optional

from . import pack
from .execution import autograd_allowed, comfy_device, model_management
from .input_errors import named_error
from .widgets import int_input
from . import comfy_sampling as cs_math

_PRIOR_CLASS = None


def _mro_names(obj) -> list:
    return [k.__name__ for k in type(obj).__mro__]


def model_support(model) -> "cs_math.ModelSupport":
    """Which supported Stable Diffusion a ComfyUI MODEL (a ModelPatcher) is; ConfigError naming the supported
    models otherwise."""
    from csd_backend.errors import ConfigError

    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    if base is None or config is None or not hasattr(base, "apply_model"):
        raise ConfigError("model", f"expected a MODEL from Load Checkpoint (a ComfyUI ModelPatcher), got "
                                   f"{type(model).__name__}")
    model_type = getattr(base, "model_type", None)
    prediction = getattr(model_type, "name", str(model_type))
    unet_config = getattr(config, "unet_config", {}) or {}
    in_channels = unet_config.get("in_channels", 4)
    extra = [k for k in getattr(base, "concat_keys", ()) or ()]
    if int(getattr(base, "adm_channels", 0) or 0):
        extra.append(f"y (ADM, {int(base.adm_channels)} channels)")
    sampling = _model_sampling(model)
    sampling_ok = hasattr(sampling, "sigmas") and "EPS" in _mro_names(sampling) and \
        float(getattr(sampling, "sigma_data", 1.0)) == 1.0
    return cs_math.check_support(type(config).__name__, type(base).__name__, prediction, in_channels, extra,
                                 sampling_ok)


def _model_sampling(model):
    getter = getattr(model, "get_model_object", None)
    if getter is not None:
        try:
            return getter("model_sampling")
        except (AttributeError, KeyError):
            pass
    return getattr(model.model, "model_sampling", None)


def _prior_class():
    """``ComfyModelPrior``, defined on first use (it imports torch and the engine)."""
    global _PRIOR_CLASS
    if _PRIOR_CLASS is not None:
        return _PRIOR_CLASS
    import torch

    from csd_backend.errors import ConfigError
    from csd_backend.priors.base import DiffusionPrior, resize_renders, scaled_input_size, unet_inputs
    from csd_backend.priors.resolution import choose_resolution

    class _Call(torch.nn.Module):
        """``fn(module, x)`` as a module, so that ``torch.func.functional_call`` can swap the parameters."""

        def __init__(self, module, fn):
            super().__init__()
            self.m = module
            self.fn = fn

        def forward(self, x):
            return self.fn(self.m, x)

    def differentiable_call(module, fn, x, prefixes=("",)):
        """``fn(module, x)`` with gradients to ``x``, never to the weights. ComfyUI loads checkpoints inside
        ``torch.inference_mode()``: its weights are inference tensors, which autograd cannot save for backward, so
        those (under the given parameter-name prefixes) are cloned for the call; others are used detached."""
        params = {}
        with torch.no_grad():
            for name, p in module.named_parameters():
                if any(name.startswith(pre) for pre in prefixes):
                    params[f"m.{name}"] = p.clone() if p.is_inference() else p.detach()
        return torch.func.functional_call(_Call(module, fn), params, (x,), strict=False)

    class ComfyModelPrior(DiffusionPrior):
        """A frozen SD 1.x/2.x from ComfyUI's MODEL + CLIP + VAE (see the module docstring)."""

        name = "comfyui"

        def __init__(self, model, clip, vae, resolution: Optional[int] = None):
            support = model_support(model)
            if clip is None:
                raise ConfigError("clip", "no CLIP: this checkpoint has no text encoder; connect a CLIP (e.g. from "
                                          "Load CLIP or another checkpoint of the same family)")
            if vae is None or getattr(vae, "first_stage_model", None) is None:
                raise ConfigError("vae", "no VAE: connect the VAE output of Load Checkpoint (or Load VAE)")
            sampling = _model_sampling(model)
            with torch.no_grad():
                sigmas = sampling.sigmas.detach().to("cpu", torch.float64)  # a normal tensor (not inference)
            if sigmas.dim() != 1 or sigmas.numel() < 2 or not bool((sigmas > 0).all()):
                raise ConfigError("model", f"the model's sigmas table has shape {tuple(sigmas.shape)}; expected a "
                                           "positive [T] schedule")
            device = torch.device(getattr(model, "load_device", None) or comfy_device() or "cpu")
            super().__init__(cs_math.alphas_cumprod_from_sigmas(sigmas).to(torch.float32), device)
            self.model, self.clip, self.vae = model, clip, vae
            self.support = support
            self.sigmas = sigmas.to(device, torch.float32)  # [T], ascending: σ of timestep t
            self.name = support.name  # checkpoints record it; resume needs a prior with the same name
            self.source = support.name  # recorded as the run's model (config.json)
            self.prediction_type = "v_prediction" if support.prediction == "V_PREDICTION" else "epsilon"
            self.latent_format = model.model.latent_format
            ratio = getattr(vae, "downscale_ratio", 8)  # an int for image VAEs (a function for some video ones)
            self.vae_scale_factor = ratio if isinstance(ratio, int) else 8
            levels = len(model.model.model_config.unet_config.get("channel_mult", (1, 2, 4, 4)))
            self.size_multiple = self.vae_scale_factor * 2 ** (levels - 1)
            self.native_resolution = support.native_resolution
            res, warning = choose_resolution(self.native_resolution, resolution or None)  # 0: native
            if warning:
                pack.log.warning("CSD Prior from ComfyUI Model: %s", warning)
            self.resolution = res

        # ------------------------------------------------------------------ ComfyUI's model management
        def _load(self, patchers, memory_required: float = 0.0) -> None:
            mm = model_management()
            if mm is None or not hasattr(mm, "load_models_gpu"):
                return
            with torch.no_grad():  # LoRA weights are merged here: no graph, whatever the caller's mode
                mm.load_models_gpu([p for p in patchers if p is not None], memory_required=memory_required)

        @property
        def unet_dtype(self) -> torch.dtype:
            base = self.model.model
            return getattr(base, "manual_cast_dtype", None) or base.get_dtype()

        # ------------------------------------------------------------------------------------ text
        def encode_text(self, prompts):
            """``[N, L, D]``; contexts of different lengths (prompts over 75 tokens) are repeated to a common
            length, as ComfyUI batches them."""
            missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
            if missing:
                for p, e in zip(missing, self._encode_text_uncached(missing)):
                    self._text_cache[p] = e.detach()
            return torch.stack(cs_math.repeat_to_common_length([self._text_cache[p] for p in prompts]), 0)

        def _encode_text_uncached(self, prompts):
            out = []
            for prompt in prompts:
                tokens = self.clip.tokenize(prompt)
                with torch.no_grad():
                    cond = self.clip.encode_from_tokens(tokens)  # [1, 77·k, D]; loads CLIP through ComfyUI
                if isinstance(cond, (tuple, list)):
                    cond = cond[0]
                out.append(cond[0].to(self.device, torch.float32).clone())
            return out

        # ---------------------------------------------------------------------------------- images
        def input_size(self, height: int, width: int):
            m, f = self.size_multiple, self.vae_scale_factor
            return scaled_input_size(height, width, self.resolution, m, f"VAE factor {f} × UNet downsampling {m // f}")

        def encode_images(self, images: torch.Tensor) -> torch.Tensor:
            x = resize_renders(images, self.input_size, self.device)  # [B, 3, h, w]
            vae = self.vae
            mem = vae.memory_used_encode(x.shape, vae.vae_dtype) if hasattr(vae, "memory_used_encode") else 0
            self._load([vae.patcher], 3 * mem)  # × 3: activations are kept for the backward pass
            x = vae.process_input(x).to(vae.device, vae.vae_dtype)  # [-1, 1]
            fsm = vae.first_stage_model
            if hasattr(fsm, "encoder") and hasattr(fsm, "quant_conv"):  # LDM AutoencoderKL: sample its posterior
                moments = differentiable_call(fsm, lambda m, v: m.quant_conv(m.encoder(v)), x,
                                              ("encoder.", "quant_conv."))
                c2 = moments.shape[1] // 2
                noise = torch.randn(moments[:, :c2].shape, dtype=moments.dtype, device=moments.device)
                raw = cs_math.posterior_sample(moments, noise)
            else:  # another first stage: its own encode (ComfyUI's: the posterior's mode)
                raw = differentiable_call(fsm, lambda m, v: m.encode(v), x)
            return self.latent_format.process_in(raw.to(self.device, torch.float32))  # [B, 4, h/8, w/8]

        @torch.no_grad()
        def decode(self, z: torch.Tensor) -> torch.Tensor:
            raw = self.latent_format.process_out(z.to(self.device, torch.float32))
            return self.vae.decode(raw).to(self.device, torch.float32).clamp(0, 1)  # [B, H, W, 3]

        # ----------------------------------------------------------------------------------- noise
        @torch.no_grad()
        def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
                          control: Optional[torch.Tensor] = None) -> torch.Tensor:
            z_t, t, emb = unet_inputs(z_t, t, embeddings, self.device, embeddings.dtype)
            z_t = z_t.to(torch.float32)
            base = self.model.model
            mem = base.memory_required(list(z_t.shape)) if hasattr(base, "memory_required") else 0
            self._load([self.model], mem)
            sigma = cs_math.sigma_at(self.sigmas, t)  # [N]
            x = cs_math.comfy_x_from_z_t(z_t, sigma)  # ComfyUI's x = z + σ·ε
            options = dict((getattr(self.model, "model_options", None) or {}).get("transformer_options", {}))
            options.update(sigmas=sigma, cond_or_uncond=[0])
            denoised = base.apply_model(x, sigma, c_crossattn=emb,
                                        transformer_options=options)
            return cs_math.eps_from_denoised(x, denoised.to(torch.float32), sigma).to(torch.float32)

    ComfyModelPrior.__module__ = __name__
    _PRIOR_CLASS = ComfyModelPrior
    return ComfyModelPrior


def __getattr__(name):  # PEP 562: ``from nodes.comfy_prior import ComfyModelPrior`` builds the class on demand
    if name == "ComfyModelPrior":
        return _prior_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_prior(model, clip, vae, resolution: Optional[int] = None):
    """A ``ComfyModelPrior`` over ComfyUI's MODEL, CLIP and VAE (``resolution`` None or 0: the model's own)."""
    return _prior_class()(model, clip, vae, resolution=resolution or None)


class CSDPriorFromComfyModel:
    DESCRIPTION = ("Uses the MODEL, CLIP and VAE of ComfyUI's Load Checkpoint (also after LoRA loaders and other "
                   "model patches) as the score-distillation prior, for CSD Optimize, Refine Mesh and Texture Mesh: "
                   "no second copy of the model is loaded, and ComfyUI's memory management moves it on and off the "
                   "GPU. Stable Diffusion 1.x and 2.x (512 px ε and 768 px v-prediction) checkpoints; SDXL, SD3, "
                   "Flux and other families are refused with an error.")
    CATEGORY = pack.CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = (pack.PRIOR,)
    RETURN_NAMES = ("prior",)
    OUTPUT_TOOLTIPS = ("The diffusion prior, for CSD Optimize / Refine Mesh / Texture Mesh.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "from Load Checkpoint (or a LoRA loader after it): an SD 1.x/2.x model"}),
            "clip": ("CLIP", {"tooltip": "the text encoder of the same checkpoint (from Load Checkpoint or the LoRA "
                                         "loader)"}),
            "vae": ("VAE", {"tooltip": "the VAE of the same checkpoint: renders are encoded through it with "
                                       "gradients"}),
            "resolution": int_input(0, 0, 4096, "side the renders are resized to before the VAE; 0: the model's "
                                                "native size (512 for SD 1.5 and 2.x-base, 768 for SD 2.x v). A "
                                                "multiple of 64 for SD (VAE 8 × UNet 8); lower is faster", step=8),
        }}

    @autograd_allowed
    def make(self, model, clip, vae, resolution):
        from csd_backend.errors import ConfigError

        try:
            prior = make_prior(model, clip, vae, int(resolution) or None)
        except ConfigError as e:
            raise named_error(e, "CSD Prior from ComfyUI Model") from e
        pack.log.info("CSD: prior %s on %s (render size %d)", prior.name, prior.device, prior.resolution)
        return (prior,)


NODE_CLASS_MAPPINGS = {"CSDPriorFromComfyModel": CSDPriorFromComfyModel}
NODE_DISPLAY_NAME_MAPPINGS = {"CSDPriorFromComfyModel": "CSD Prior from ComfyUI Model"}
