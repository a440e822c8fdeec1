"""CSD Load Diffusion Model: a Stable Diffusion 1.x/2.x or DeepFloyd IF stage-I prior from ComfyUI's model folders."""
from __future__ import annotations

from csd_backend.config import PriorConfig

from . import pack
from .execution import autograd_allowed, comfy_device
from .input_errors import named_error
from .model_folders import AUTO_CONFIG, diffusers_models, model_choices, resolve_model
from .widgets import check_widgets, combo_input, default_of, int_input

_DEVICES = ["auto", "cpu", "cuda"]
#: the small prior shipped with the pack (csd_backend.priors.TOY_MODEL; not imported here: no torch at start-up)
TOY = "toy"
_DTYPES = ["auto", "float32", "float16", "bfloat16"]
#: no LoRA base model: VSD adapts the loaded model's own UNet
NO_LORA_BASE = "(none)"


class CSDLoadDiffusionModel:
    DESCRIPTION = ("Loads a frozen Stable Diffusion 1.x/2.x model as the score-distillation prior: a diffusers folder "
                   "(found by model_index.json under models/diffusers) or a single-file checkpoint "
                   "(models/checkpoints). The CSD paper uses stabilityai/stable-diffusion-2-1-base; its stage 1 uses "
                   "DeepFloyd IF stage I (a diffusers folder of DeepFloyd/IF-I-XL-v1.0 under models/diffusers, 64² "
                   "pixel space, for the csd-coarse-if presets). MVDream, for CSD MVDream: sd-v2.1-base-4view.pt in "
                   "models/checkpoints with its sd-v2-base.yaml beside it (the tokenizer comes from the Hugging Face "
                   "cache of stabilityai/stable-diffusion-2-1-base, or from the SD 2.x folder chosen in "
                   "config_from), or a diffusers-style MVDream folder in models/diffusers.")
    CATEGORY = pack.CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (pack.PRIOR,)
    RETURN_NAMES = ("prior",)
    OUTPUT_TOOLTIPS = ("The diffusion prior, for CSD Optimize.",)

    @classmethod
    def INPUT_TYPES(cls):
        models = model_choices() + [TOY]
        configs = [AUTO_CONFIG] + [f"diffusers/{m}" for m in diffusers_models()]
        return {"required": {
            "model": combo_input(models, None, "diffusers/<folder> from models/diffusers, or checkpoints/<file> "
                                               "(an SD 1.x/2.x .safetensors, or MVDream's sd-v2.1-base-4view.pt) from "
                                               "models/checkpoints, or toy: the small "
                                               "built-in prior of five toy objects (a red cube, a blue ball, a "
                                               "green cone, a yellow mug, a purple ring) for offline tests"),
            "device": combo_input(_DEVICES, default_of_prior("device"),
                                  "auto: ComfyUI's device (CUDA unless started with --cpu)"),
            "dtype": combo_input(_DTYPES, default_of_prior("dtype"), "auto: float16 on CUDA, float32 on the CPU"),
            "resolution": int_input(0, 0, 4096, "side the renders are resized to before the VAE; 0: the model's "
                                                "native size (512 for SD 2.1-base, 64 for DeepFloyd IF). Must be a "
                                                "multiple of 64 for SD (VAE 8 × UNet 8)", step=8),
            "config_from": combo_input(configs, AUTO_CONFIG,
                                       "single-file checkpoints only: a diffusers folder of the same architecture "
                                       "to take the component configs from ((auto): inferred, needs the configs "
                                       "in the Hugging Face cache or internet access); for an MVDream checkpoint "
                                       "an SD 2.x folder to take the tokenizer from"),
        }, "optional": {
            "vsd_lora_base_model": combo_input([NO_LORA_BASE] + models, NO_LORA_BASE,
                                               "vsd only: a second model whose UNet carries VSD's LoRA, loaded "
                                               "with this one (ProlificDreamer: stable-diffusion-2-1, 768 "
                                               "v-prediction, under models/diffusers); (none): a LoRA of this "
                                               "model's own UNet"),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, device=None, dtype=None):
        err = check_widgets(cls, {"device": device, "dtype": dtype})
        if err:
            return err
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return "device: 'cuda' was chosen but CUDA is not available; use 'auto' or 'cpu'"
        if device == "cpu" and dtype == "float16":
            return "dtype: float16 is not supported on the CPU; use 'auto', 'float32' or 'bfloat16'"
        return True

    @autograd_allowed
    def load(self, model, device, dtype, resolution, config_from, vsd_lora_base_model=NO_LORA_BASE):
        from csd_backend.errors import ConfigError
        from csd_backend.priors import load_prior

        err = self.VALIDATE_INPUTS(device=device, dtype=dtype)
        if err is not True:
            raise ConfigError(err.split(":", 1)[0], err.split(":", 1)[1].strip())
        path = TOY if model == TOY else resolve_model(model)
        model_config = None
        if config_from and config_from != AUTO_CONFIG:
            model_config = resolve_model(config_from)
        if device == "auto":
            device = comfy_device() or "auto"
        lora_base = None
        if vsd_lora_base_model and vsd_lora_base_model != NO_LORA_BASE:
            lora_base = TOY if vsd_lora_base_model == TOY else resolve_model(vsd_lora_base_model,
                                                                             "vsd_lora_base_model")
        cfg = PriorConfig(model=path, model_config=model_config, device=device, dtype=dtype,
                          resolution=int(resolution) or None, lora_base_model=lora_base)
        try:
            prior = load_prior(cfg)
        except ConfigError as e:
            raise named_error(e, "CSD Load Diffusion Model") from e
        pack.log.info("CSD: loaded %s on %s (render size %s)", model, prior.device, getattr(prior, "resolution", "?"))
        return (prior,)


def default_of_prior(name: str) -> str:
    return default_of(PriorConfig, name)


NODE_CLASS_MAPPINGS = {"CSDLoadDiffusionModel": CSDLoadDiffusionModel}
NODE_DISPLAY_NAME_MAPPINGS = {"CSDLoadDiffusionModel": "CSD Load Diffusion Model"}
