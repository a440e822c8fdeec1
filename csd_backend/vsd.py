"""Variational Score Distillation (ProlificDreamer, arXiv 2305.16213) as threestudio codes it
(``stable-diffusion-vsd-guidance``), over the prior's own Stable Diffusion UNet or a second model's.

The direction on the render latents ``z`` at a timestep ``t`` is

    g = w(t) · (ε_u + s·(ε_y − ε_u) − ε_lora)

with ``s = cfg_scale`` in this (diffusers) form (ProlificDreamer: 7.5), ``ε_y``/``ε_u`` the frozen UNet on the
view-dependent prompt and the negative prompt (``guidance.py`` computes them in its one batched call), and
``ε_lora`` the LoRA-adapted UNet on the plain prompt, conditioned on the camera: its c2w matrix (16 values)
through a small ``TimestepEmbedding(16, time_embed_dim)`` added to the timestep embedding as the UNet's class
embedding (threestudio ``camera_condition_type: extrinsics``). With ``lora_cfg_scale`` ≠ 1 the LoRA prediction is
itself guided against a zero camera, ``ε_∅cam + s_l·(ε_cam − ε_∅cam)`` (threestudio ``guidance_scale_lora``; at
its default 1 only the camera branch runs).

**The LoRA's model.** By default the prior's own (threestudio's single-model path when
``pretrained_model_name_or_path_lora`` equals the prior's): no second UNet is loaded. With ``prior.lora_base_model``
(``prior.lora_prior``, loaded by ``load_prior``; ProlificDreamer: SD 2.1 at 768, v-prediction) the LoRA adapts that
model's UNet instead, as threestudio's two-model path: it sees the prior's latents and noisy latents, predicts with its
own scheduler's prediction type (v converted to ε with its own ᾱ), trains on its own ``add_noise`` and v target, and
reads the prompt through its own text encoder (SD 2.1 and 2.1-base share OpenCLIP ViT-H, so for the official pair this
is threestudio's embedding). Either way peft LoRA layers (rank ``lora_rank`` on ``to_q``/``to_k``/``to_v``/
``to_out.0`` of every attention, as threestudio's ``LoRAAttnProcessor``) are injected into that UNet under an
adapter name of their own. The adapters are *disabled* except inside :meth:`VSD._lora_active`, which also sets
the camera embedding as the UNet's class embedding for that call and removes it after, so every other use of the
prior (the frozen ε above, other runs sharing the prior) sees the plain UNet, bit for bit. Several VSD runs on one
prior each own their adapter; it is removed from the UNet (and the UNet's layers unwrapped once no adapter is
left) when the run is garbage-collected or :meth:`VSD.close` is called.

**The LoRA's training step** (same iteration, after the direction): the LoRA UNet denoises the detached latents at
``t ~ U{0, …, T−1}`` with fresh noise, loss ``MSE(pred, target)`` with target ε or v as the scheduler predicts,
the camera condition replaced by zeros for the whole batch with probability ``camera_condition_drop``
(threestudio: ``lora_cfg_training`` with 0.1), ``lora_timestep_samples`` noisy copies per render. The backward
runs inside the guidance call (its graph does not touch the scene's); the AdamW step (lr ``lora_lr``, the run's
betas and eps, weight decay 0.01 as threestudio's AdamW) waits for :meth:`VSD.step`, which the loop calls with the
scene's update, so an interrupted step changes neither.

Every random draw comes from the generator the loop passes (LoRA and camera-embedding initialisation use torch's
global RNG, seeded by the loop before it builds the scene), and :meth:`state_dict` holds the LoRA weights, the
camera embedding and the optimiser: a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import itertools
import time
import warnings
import weakref
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .config import GuidanceConfig, OptimConfig
from .errors import CheckpointError, ConfigError
from .transfer import to_device_async

#: the attention projections threestudio's LoRAAttnProcessor adapts
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: torch's AdamW default, which threestudio's AdamW applies to the guidance's parameter group
LORA_WEIGHT_DECAY = 0.01
#: the camera condition: a flattened 4×4 c2w matrix
CAMERA_DIM = 16

_ADAPTER_IDS = itertools.count()


def refuse_controlnet(prior) -> None:
    """VSD takes no ControlNet: ``ConfigError`` naming ``prior.controlnet`` when ``prior`` has one."""
    if getattr(prior, "controlnet", None) is not None:
        raise ConfigError("prior.controlnet", "vsd does not take a ControlNet (the LoRA learns the renders, not "
                                              "depth-conditioned images); remove the ControlNet or use mode csd/sds")


def check_vsd_prior(prior, field: str = "guidance.mode") -> None:
    """Raise ``ConfigError`` (naming ``field``: ``guidance.mode`` for the prior's own UNet, ``prior.lora_base_model``
    for a second model) unless ``prior`` has a diffusers Stable Diffusion UNet that a LoRA can adapt."""
    fix = ("use a Stable Diffusion model (a diffusers folder, a .safetensors checkpoint, a hub id, or --model toy), "
           + ("or mode csd or sds" if field == "guidance.mode" else "or no LoRA base model (the prior's own UNet)"))
    unet = getattr(prior, "unet", None)
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:  # pragma: no cover - diffusers is a dependency
        UNet2DConditionModel = None
    name = getattr(prior, "name", type(prior).__name__)
    if unet is None or UNet2DConditionModel is None or not isinstance(unet, UNet2DConditionModel):
        raise ConfigError(field, f"vsd trains a LoRA of a diffusers UNet, and the '{name}' prior has none; {fix}")
    if unet.config.out_channels != unet.config.in_channels or getattr(prior, "prediction_type", None) not in (
            "epsilon", "v_prediction"):
        raise ConfigError(field, f"vsd supports Stable Diffusion 1.x/2.x UNets (ε or v prediction); the '{name}' "
                                 f"prior's UNet predicts {unet.config.out_channels} channels for "
                                 f"{unet.config.in_channels} (e.g. DeepFloyd IF's learned variance); {fix}")
    if unet.class_embedding is not None or unet.config.addition_embed_type is not None:
        raise ConfigError(field, f"vsd conditions the LoRA on the camera through the UNet's class embedding, "
                                 f"which the '{name}' prior's UNet already uses; {fix}")
    refuse_controlnet(prior)


def lora_model(prior):
    """The prior whose UNet carries the run's LoRA: ``prior.lora_prior`` (``prior.lora_base_model``) when the prior
    has one, else ``prior`` itself; checked (``ConfigError`` naming the field to change)."""
    model = getattr(prior, "lora_prior", None)
    if model is None:
        check_vsd_prior(prior)
        return prior
    field = "prior.lora_base_model"
    check_vsd_prior(model, field)
    unet = getattr(prior, "unet", None)
    channels = getattr(getattr(unet, "config", None), "in_channels", None)
    name, base = getattr(prior, "name", type(prior).__name__), getattr(model, "source", model.name)
    if channels != model.unet.config.in_channels or getattr(prior, "vae", None) is None:
        raise ConfigError(field, f"the LoRA of '{base}' learns the prior's latents, but the '{name}' prior's input is "
                                 f"not {model.unet.config.in_channels}-channel VAE latents; use a Stable Diffusion "
                                 f"prior with it, or no LoRA base model")
    if model.num_train_timesteps != prior.num_train_timesteps:
        raise ConfigError(field, f"'{base}' has {model.num_train_timesteps} diffusion timesteps and the prior "
                                 f"{prior.num_train_timesteps}; the LoRA sees the prior's timesteps: use a model "
                                 f"with the same schedule length")
    refuse_controlnet(prior)
    return model


def _tuner_layers(unet) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def _remove_adapter(unet, adapter: str) -> None:
    """Delete ``adapter`` from ``unet``; once no adapter is left, put the original layers back."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - interpreter shutdown
        return
    for layer in _tuner_layers(unet):
        if adapter in getattr(layer, "lora_A", {}):
            with warnings.catch_warnings():  # "adapter ... was active which is now deleted": all are off anyway
                warnings.simplefilter("ignore")
                layer.delete_adapter(adapter)
        layer.enable_adapters(False)
    config = getattr(unet, "peft_config", None)
    if isinstance(config, dict):
        config.pop(adapter, None)
    if any(len(getattr(layer, "lora_A", {})) for layer in _tuner_layers(unet)):
        return
    wrapped = [(name, m) for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in wrapped:  # no adapter left: put the original layers back
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, module.get_base_layer())
    if isinstance(config, dict) and not config:
        del unet.peft_config


class VSD:
    """The LoRA "particle" model of VSD for one run: adapters on the UNet of the prior (or of its LoRA base model),
    the camera embedding, and their optimiser. ``guidance.ScoreDistillation`` builds it for mode ``vsd``."""

    def __init__(self, cfg: GuidanceConfig, prior, prompts, optim: Optional[OptimConfig] = None):
        """``prior``: the run's prior (its ``lora_prior``, when set, carries the LoRA); ``prompts``: the run's
        ``PromptEmbeddings`` (the LoRA reads the plain prompt)."""
        model = lora_model(prior)
        #: whether the LoRA adapts a second model (``prior.lora_base_model``), recorded in checkpoints
        self.separate_model = model is not prior
        plain_embedding = model.encode_text([prompts.prompt])[0] if self.separate_model else prompts.plain
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as e:
            raise ConfigError("guidance.mode", "vsd needs the peft package for its LoRA: pip install peft "
                                               "(it is in requirements.txt)") from e
        from diffusers.models.embeddings import TimestepEmbedding

        self.cfg = cfg
        self.prior = model  # the LoRA's model: its UNet, scheduler and text encoder
        self.unet = model.unet
        self.device = model.device
        self.plain = plain_embedding.detach()  # [L, D] the prompt without a view suffix (threestudio: view-independent)
        self.adapter = f"csd_vsd_{next(_ADAPTER_IDS)}"
        lora = LoraConfig(r=int(cfg.lora_rank), lora_alpha=int(cfg.lora_rank), lora_dropout=0.0,
                          target_modules=list(LORA_TARGETS), init_lora_weights="gaussian")
        with warnings.catch_warnings():  # "multiple adapters": intended, each run owns one
            warnings.simplefilter("ignore")
            inject_adapter_in_model(lora, self.unet, adapter_name=self.adapter)
        self._finalizer = weakref.finalize(self, _remove_adapter, self.unet, self.adapter)
        self.layers = [layer for layer in _tuner_layers(self.unet) if self.adapter in layer.lora_A]
        self.lora: Dict[str, torch.nn.Parameter] = {}
        tag = f".{self.adapter}."
        for name, p in self.unet.named_parameters():
            if tag in name:  # a name without the adapter's: the same in every run, so checkpoints load anywhere
                p.data = p.data.to(self.device, torch.float32)  # trained in fp32 whatever the UNet's dtype
                self.lora[name.replace(tag, ".")] = p
        for layer in self.layers:
            layer.enable_adapters(False)  # the default state: the plain UNet
        time_embed_dim = self.unet.time_embedding.linear_2.out_features  # 1280 for SD 1.x/2.x
        self.camera_embedding = TimestepEmbedding(CAMERA_DIM, time_embed_dim).to(self.device, torch.float32)
        optim = optim or OptimConfig()
        params = [self.lora[k] for k in sorted(self.lora)] + list(self.camera_embedding.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=float(cfg.lora_lr), betas=tuple(optim.betas), eps=optim.eps,
                                           weight_decay=LORA_WEIGHT_DECAY)
        self.profile = False  # accumulate per-part times in ``timings`` (with a CUDA sync) when True
        self.timings: Dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- the one UNet
    @contextlib.contextmanager
    def _lora_active(self):
        """The UNet with this run's LoRA on and the camera embedding as its class embedding (only inside)."""
        for layer in self.layers:
            layer.set_adapter(self.adapter)
            layer.enable_adapters(True)
        self.unet.class_embedding = self.camera_embedding
        try:
            yield self.unet
        finally:
            self.unet.class_embedding = None
            for layer in self.layers:
                layer.enable_adapters(False)

    def _lora_unet(self, z_t: torch.Tensor, t: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        """The LoRA UNet's raw output (ε or v) for ``z_t`` ``[N, C, h, w]``, ``t`` ``[N]``, ``camera`` ``[N, 16]``."""
        dt = self.prior.unet_dtype
        emb = self.plain.to(self.device, dt).unsqueeze(0).expand(z_t.shape[0], *self.plain.shape)
        out = self.unet(z_t.to(dt), t, encoder_hidden_states=emb, class_labels=camera.to(self.device, torch.float32))
        return out.sample.to(torch.float32)

    def _tick(self, name: str, t0: float) -> float:
        if not self.profile:
            return t0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - t0
        return now

    @staticmethod
    def camera_condition(c2w: torch.Tensor) -> torch.Tensor:
        """``[B, 4, 4]`` camera-to-world matrices → the ``[B, 16]`` condition (row-major, as ``c2w.view(B, -1)``)."""
        return c2w.reshape(c2w.shape[0], -1).to(torch.float32)

    @torch.no_grad()
    def predict(self, z_t: torch.Tensor, t: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
        """ε_lora ``[B, C, h, w]`` for ``z_t`` at ``t`` seen from ``c2w`` ``[B, 4, 4]`` (no autograd)."""
        t0 = time.perf_counter()
        cam = self.camera_condition(c2w)
        B = z_t.shape[0]
        s = float(self.cfg.lora_cfg_scale)
        guided = s != 1.0
        if guided:  # the camera branch and a zero-camera branch in one call
            z_in, t_in, cam = z_t.repeat(2, 1, 1, 1), t.repeat(2), torch.cat([cam, torch.zeros_like(cam)], 0)
        else:
            z_in, t_in = z_t, t
        with self._lora_active():
            out = self._lora_unet(z_in, t_in, cam)
        if self.prior.prediction_type == "v_prediction":
            from .priors.stable_diffusion import v_to_eps

            out = v_to_eps(out, z_in.to(torch.float32), self.prior.alphas_cumprod[t_in])
        if guided:
            eps_cam, eps_none = out[:B], out[B:]
            out = eps_none + s * (eps_cam - eps_none)
        self._tick("lora_forward", t0)
        return out

    # ------------------------------------------------------------------------------------- the LoRA's training
    def train_step(self, z: torch.Tensor, c2w: torch.Tensor,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Forward and backward of the LoRA's denoising loss on the detached latents ``z`` ``[B, C, h, w]``; the
        gradients wait in the LoRA's parameters for :meth:`step`. Returns the loss (detached, 0-dim)."""
        t0 = time.perf_counter()
        n = int(self.cfg.lora_timestep_samples)
        z0 = z.detach().to(torch.float32).repeat(n, 1, 1, 1)
        N = z0.shape[0]
        T = self.prior.num_train_timesteps
        t = to_device_async(torch.randint(0, T, (N,), generator=generator, dtype=torch.long), self.device)
        noise = to_device_async(torch.randn(z0.shape, generator=generator, dtype=torch.float32), self.device)
        drop = torch.rand(1, generator=generator).item() < float(self.cfg.camera_condition_drop)
        z_t = self.prior.add_noise(z0, noise, t)
        if self.prior.prediction_type == "v_prediction":  # v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·z0 (get_velocity)
            a = self.prior.alphas_cumprod[t].view(-1, 1, 1, 1)
            target = a.sqrt() * noise - (1 - a).sqrt() * z0
        else:
            target = noise
        cam = self.camera_condition(c2w).repeat(n, 1)
        if drop:
            cam = torch.zeros_like(cam)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad(), self._lora_active():
            pred = self._lora_unet(z_t, t, cam)
            loss = F.mse_loss(pred, target)
            t0 = self._tick("lora_train_forward", t0)
            loss.backward()  # inside: the adapters' requires_grad is only on while they are active
        self._tick("lora_backward", t0)
        return loss.detach()

    def step(self) -> None:
        """The LoRA's optimiser step (the loop calls it with the scene's update)."""
        if any(p.grad is not None for g in self.optimizer.param_groups for p in g["params"]):
            self.optimizer.step()

    # ------------------------------------------------------------------------------------------------- state
    def parameters(self):
        return [self.lora[k] for k in sorted(self.lora)] + list(self.camera_embedding.parameters())

    def state_dict(self) -> dict:
        return {"lora": {k: p.detach().clone() for k, p in self.lora.items()},
                "camera_embedding": {k: v.clone() for k, v in self.camera_embedding.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "lora_rank": int(self.cfg.lora_rank),
                "separate_model": self.separate_model}

    def load_state_dict(self, state: dict) -> None:
        saved = bool(state.get("separate_model", False))
        if saved != self.separate_model:
            which = {True: "a second model's UNet (prior.lora_base_model)", False: "the prior's own UNet"}
            raise CheckpointError(f"the checkpoint's VSD LoRA adapts {which[saved]}, this run's {which[not saved]}: "
                                  f"resume with the prior it was trained with, {'with' if saved else 'without'} its "
                                  f"LoRA base model (--lora-base-model; the node: CSD Load Diffusion Model's "
                                  f"vsd_lora_base_model)")
        lora = state["lora"]
        if set(lora) != set(self.lora):
            missing, extra = sorted(set(self.lora) - set(lora)), sorted(set(lora) - set(self.lora))
            raise CheckpointError(f"the checkpoint's VSD LoRA does not fit this UNet (missing {missing[:3]}, "
                                  f"unexpected {extra[:3]})")
        with torch.no_grad():
            for k, p in self.lora.items():
                if lora[k].shape != p.shape:
                    raise CheckpointError(f"the checkpoint's VSD LoRA weight {k} is {tuple(lora[k].shape)}, this "
                                          f"run's {tuple(p.shape)} (another lora_rank?)")
                p.copy_(lora[k])
        self.camera_embedding.load_state_dict(state["camera_embedding"])
        self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        """Remove this run's adapter from the prior's UNet now (also done when the object is collected)."""
        self._finalizer()
