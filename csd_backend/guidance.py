"""Score distillation over any ``DiffusionPrior``: CSD (spec §1), SDS (spec §5.6) and CSD editing (spec §4).

Every mode is one linear combination of noise predictions,

    g = w(t) · [ c·ε_y + u·ε_neg + n·ε_∅ + k·ε ]

with per-mode coefficients (``coefficients``):
- CSD:  c = ω1, u = −ω2, n = −(ω1 − ω2), k = 0 (the classifier score only; paper Eq. 10);
- SDS:  c = 1 + s, u = −s, n = 0, k = −1 (threestudio's ε_y + s(ε_y − ε_u) − ε, with ε_u the negative or ""
  prompt: the effective classifier-free guidance scale is s + 1, threestudio issue #289); with Perp-Neg threestudio
  writes ε_u + s·(ε_y − ε_u + Δ_perp) − ε instead: c = s, u = 1 − s, k = −1 and the Perp-Neg term weighted s;
- edit: as CSD with the *source* prompt in the negative slot (ω2 = 1 gives ε(y_tgt) − ε(y_src));
- VSD:  c = s, u = 1 − s, n = 0, k = 0 (the frozen ε_u + s(ε_y − ε_u), diffusers' form), minus ε_lora of the run's
  LoRA (``vsd.py``: the same UNet, or the UNet of ``prior.lora_base_model``, with its adapters on, conditioned on the
  cameras' ``c2w``), whose own training step runs in the same call; ``update()`` steps its optimiser and
  ``state_dict()`` holds it.

Branches that share an embedding are merged and zero coefficients are dropped before the single batched
UNet call, so e.g. stage-1 CSD at step 0 (ω2 = 0) costs two branches, not three.

Multi-view priors (MVDream, ``prior.multiview``) get the cameras and the views per object with every prediction.
The CSD-MVDream guidance (R2) is CSD with ω1 = ω2 = 1 and no null branch (ε_y − ε_neg), one timestep for the batch
(``shared_timestep``) and the per-render, per-channel std normalisation ``0.9·g/std + 0.1·g``
(``grad_normalize_by`` std, ``grad_normalize_scale``); threestudio-mvdream's SDS uses its x0-reconstruction
form (``recon_loss``: the direction z − x̂0 of the guided ε̂, ``recon_std_rescale`` per object,
:func:`reconstruction_direction`).

Perp-Neg (``perp_neg``, spec §1.3: the official character config) interpolates the positive view embedding and
adds ``p · Δ_perp``, ``Δ_perp = Σ_i w_i · perp(ε_view_i − ε_neg, ε_pos − ε_neg)``: the part of the two neighbouring
views' scores perpendicular to the positive direction, with negative weights (5B UNet inputs; 4B for SDS, which has
no null branch). ``p`` is ``perp_neg_scale`` for CSD, edit and VSD (the official IF guidance's ``perpneg_scale``) and
the guidance scale s for SDS (threestudio's ``stable-diffusion-guidance``, spec §5.6).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from .config import GuidanceConfig, OptimConfig
from .errors import ConfigError
from .priors.base import DiffusionPrior
from .prompts import PromptEmbeddings
from .schedules import schedule_value
from .transfer import to_device_async


@dataclass
class Coefficients:
    c: float  # positive
    u: float  # negative (or source prompt in edit mode)
    n: float  # null ""
    k: float  # the sampled noise ε
    p: float = 0.0  # the Perp-Neg term Δ_perp (0 without Perp-Neg)


@dataclass
class GuidanceOutput:
    loss: torch.Tensor  # scalar; ∂loss/∂z = grad / B
    grad: torch.Tensor  # [B, C, h, w] the (post-processed) direction g
    z: torch.Tensor  # [B, C, h, w] the prior's input (with autograd)
    t: torch.Tensor  # [B] timesteps used
    coefficients: Coefficients
    grad_norm: torch.Tensor  # ‖g‖ before normalisation (0-dim)
    #: losses already backpropagated by the guidance for its own parameters (vsd: "lora"), for reporting (0-dim)
    extra_losses: Dict[str, torch.Tensor] = field(default_factory=dict)


def coefficients(cfg: GuidanceConfig, step: int) -> Coefficients:
    """The mixing coefficients of spec §1.1 at ``step`` (with ``p``, the weight of the Perp-Neg term)."""
    p = float(cfg.perp_neg_scale) if cfg.perp_neg else 0.0
    if cfg.mode in ("csd", "edit"):
        w1 = schedule_value(cfg.guidance_weight, step)
        w2 = schedule_value(cfg.negative_weight, step)
        return Coefficients(c=w1, u=-w2, n=-(w1 - w2), k=0.0, p=p)
    if cfg.mode == "sds":
        s = float(cfg.cfg_scale)
        if cfg.perp_neg:  # threestudio: ε_u + s·(ε_y − ε_u + Δ_perp) − ε
            return Coefficients(c=s, u=1.0 - s, n=0.0, k=-1.0, p=s)
        return Coefficients(c=1.0 + s, u=-s, n=0.0, k=-1.0)
    if cfg.mode == "vsd":  # the frozen part; ε_lora is subtracted by the VSD model
        s = float(cfg.cfg_scale)
        return Coefficients(c=s, u=1.0 - s, n=0.0, k=0.0, p=p)
    raise ConfigError("guidance.mode", f"{cfg.mode!r} is not one of 'csd', 'sds', 'edit', 'vsd'")


def timestep_weight(weighting: str, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """w(t) for ``uniform`` (1), ``sds`` (1 − ᾱ) and ``fantasia3d`` (sqrt(ᾱ)·(1 − ᾱ))."""
    a = alphas_cumprod_t
    if weighting == "uniform":
        return torch.ones_like(a)
    if weighting == "sds":
        return 1 - a
    if weighting == "fantasia3d":
        return a.sqrt() * (1 - a)
    raise ConfigError("guidance.weighting", f"{weighting!r} is not one of 'uniform', 'sds', 'fantasia3d'")


def timestep_range(cfg: GuidanceConfig, step: int, num_train_timesteps: int) -> tuple[int, int]:
    """Inclusive integer range [t_min, t_max] at ``step``."""
    lo = schedule_value(cfg.min_step_percent, step)
    hi = schedule_value(cfg.max_step_percent, step)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError("guidance.min_step_percent/max_step_percent",
                          f"need 0 <= min <= max <= 1 at step {step}, got min {lo} and max {hi}")
    t_min = min(int(num_train_timesteps * lo), num_train_timesteps - 1)
    t_max = min(int(num_train_timesteps * hi), num_train_timesteps - 1)
    return t_min, max(t_min, t_max)


class ScoreDistillation:
    """CSD / SDS / edit / VSD guidance for one prompt set over one prior. ``optim``: the run's optimiser settings
    (VSD's LoRA optimiser takes its betas and eps, as threestudio's single AdamW)."""

    def __init__(self, cfg: GuidanceConfig, prior: DiffusionPrior, prompts: Optional[PromptEmbeddings] = None,
                 optim: Optional[OptimConfig] = None):
        self.cfg = cfg
        self.prior = prior
        if prompts is None:
            negative = cfg.source_prompt if cfg.mode == "edit" else cfg.negative_prompt
            prompts = PromptEmbeddings.build(prior, cfg.prompt, negative, cfg.view_dependent, cfg.front_threshold,
                                             cfg.back_threshold, cfg.overhead_threshold)
        self.prompts = prompts
        self.vsd = None
        if cfg.mode == "vsd":
            from .vsd import VSD

            self.vsd = VSD(cfg, prior, prompts, optim)

    def sample_timesteps(self, batch: int, step: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``[batch]`` integer timesteps in the range of ``step``: one per render, or one for all
        (``shared_timestep``, the MVDream guidances)."""
        t_min, t_max = timestep_range(self.cfg, step, self.prior.num_train_timesteps)
        if self.cfg.shared_timestep:
            return torch.randint(t_min, t_max + 1, (1,), generator=generator, dtype=torch.long).repeat(batch)
        return torch.randint(t_min, t_max + 1, (batch,), generator=generator, dtype=torch.long)

    def __call__(self, images: torch.Tensor, elevation: torch.Tensor, azimuth: torch.Tensor, step: int,
                 t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, control: Optional[torch.Tensor] = None,
                 c2w: Optional[torch.Tensor] = None, n_views: int = 1) -> GuidanceOutput:
        """Guidance for renders ``images`` ``[B, H, W, 3]`` seen from (elevation, azimuth) ``[B]`` degrees;
        ``control`` ``[B, H, W, 3]``: the condition images of the prior's ControlNet (e.g. the renders' depth).

        ``t`` ``[B]`` and ``noise`` (shaped like the prior's input) may be given for reproducibility; else they
        are drawn from ``generator`` (on the CPU, then moved, so results do not depend on the device).
        ``c2w`` ``[B, 4, 4]``: the cameras (VSD conditions its LoRA on them, a multi-view prior its predictions;
        the other modes ignore them). ``n_views``: consecutive renders per object (the multi-view prior's joint
        attention and ``recon_std_rescale`` work per object).
        """
        if (self.vsd is not None or self.prior.multiview) and c2w is None:
            raise ValueError(f"{'vsd guidance' if self.vsd is not None else 'a multi-view prior'} needs the cameras' "
                             "c2w matrices (c2w=[B, 4, 4])")
        prior = self.prior
        z = prior.encode_images(images)  # [B, C, h, w]
        B = z.shape[0]
        if B % int(n_views):
            raise ValueError(f"a batch of {B} renders is not whole objects of {n_views} views")
        if t is None:
            t = self.sample_timesteps(B, step, generator)
        t = to_device_async(t.long(), prior.device)
        if noise is None:
            noise = to_device_async(torch.randn(z.shape, generator=generator, dtype=torch.float32), z.device)
        coef = coefficients(self.cfg, step)

        with torch.no_grad():
            z_t = prior.add_noise(z.detach(), noise, t)
            branches, perp_weights = self._branches(coef, elevation, azimuth, B)
            n = len(branches)
            embs = torch.cat([e for _, e, _ in branches], 0)
            # the condition only when there is one: priors without a ControlNet keep the 3-argument call; the
            # cameras only for a multi-view prior (each branch is whole objects: B is a multiple of n_views)
            cond = {} if control is None else {"control": control.repeat(n, 1, 1, 1)}
            if prior.multiview:
                cond.update(cameras=c2w.reshape(B, 4, 4).repeat(n, 1, 1), num_views=int(n_views))
            eps = prior.predict_noise(z_t.repeat(n, 1, 1, 1), t.repeat(n), embs, **cond)
            eps = {key: eps[i * B:(i + 1) * B] for i, (key, _, _) in enumerate(branches)}
            # the guided ε̂ alone for the x0 form (its k·ε is not used), else ε̂ + k·ε
            direction = torch.zeros_like(noise) if self.cfg.recon_loss else coef.k * noise
            for key, _, weight in branches:
                if weight != 0.0:
                    direction = direction + weight * eps[key]
            if self.cfg.perp_neg:
                direction = direction + coef.p * perp_neg_term(
                    eps["positive"], eps[self._negative_key], [eps["perp:0"], eps["perp:1"]],
                    to_device_async(perp_weights, eps["positive"].device))
            if self.vsd is not None:
                direction = direction - self.vsd.predict(z_t, t, c2w)
            if self.cfg.recon_loss:
                if self.cfg.recon_std_rescale > 0 and "positive" not in eps:
                    raise ConfigError("guidance.recon_std_rescale", "needs the positive prompt's branch (its weight "
                                                                    "c is 0); set it to 0 or give c a weight")
                direction = reconstruction_direction(z.detach(), z_t, direction, eps.get("positive"),
                                                     prior.alphas_cumprod[t], self.cfg.recon_std_rescale, n_views)
            w = timestep_weight(self.cfg.weighting, prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
            g = torch.nan_to_num(w * direction)  # as the official code: NaN → 0, ±Inf → ± the largest float
            if self.cfg.grad_clip is not None:
                clip = schedule_value(self.cfg.grad_clip, step)
                g = g.clamp(-clip, clip)
            grad_norm = g.norm()  # a tensor: no host-device sync inside the step
            if self.cfg.grad_normalize:
                g = normalize_direction(g, grad_norm, self.cfg.grad_normalize_by, self.cfg.grad_normalize_scale)

        target = (z - g).detach()
        loss = 0.5 * ((z - target) ** 2).sum() / B
        extra = {} if self.vsd is None else {"lora": self.vsd.train_step(z, c2w, generator)}
        return GuidanceOutput(loss=loss, grad=g, z=z, t=t, coefficients=coef, grad_norm=grad_norm,
                              extra_losses=extra)

    # ------------------------------------------------------------------ the guidance's own parameters (VSD)
    def update(self) -> None:
        """Step the guidance's own optimiser (VSD's LoRA); the loop calls it with the scene's update."""
        if self.vsd is not None:
            self.vsd.step()

    @property
    def has_state(self) -> bool:
        """Whether the guidance trains parameters of its own (VSD), saved in run checkpoints."""
        return self.vsd is not None

    def state_dict(self) -> dict:
        """The guidance's trained state (VSD: LoRA, camera embedding, optimiser); empty for the other modes."""
        return {} if self.vsd is None else {"vsd": self.vsd.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.vsd is not None:
            self.vsd.load_state_dict(state["vsd"])

    @property
    def _negative_key(self) -> str:
        return f"text:{self.prompts.negative_prompt}"

    def _branches(self, coef: Coefficients, elevation, azimuth, batch: int):
        """([(key, embeddings [B, L, D], weight)], Perp-Neg weights [B, 2] or None), merging branches with the same
        prompt and dropping zeros (with Perp-Neg the positive is the interpolated view, and the negative-prompt
        branch and the two negative views are kept whatever their weight: the perpendicular term needs them)."""
        p = self.prompts
        merged: Dict[str, list] = {}

        def add(key: str, emb_fn, weight: float):
            if key in merged:
                merged[key][1] += weight
            else:
                merged[key] = [emb_fn, weight]

        keep, perp_weights = set(), None
        if self.cfg.perp_neg:
            c = self.cfg
            positive, negative_views, perp_weights = p.perp_neg(elevation, azimuth, c.perp_neg_f_fs,
                                                                c.perp_neg_f_sb, c.perp_neg_f_fsb)
            add("positive", lambda: positive, coef.c)
            keep = {"positive", self._negative_key, "perp:0", "perp:1"}
        else:
            add("positive", lambda: p.positive(elevation, azimuth), coef.c)
        add(self._negative_key, lambda: p.negative.unsqueeze(0).expand(batch, *p.negative.shape), coef.u)
        add("text:", lambda: p.null.unsqueeze(0).expand(batch, *p.null.shape), coef.n)
        if self.cfg.perp_neg:
            add("perp:0", lambda: negative_views[0], 0.0)
            add("perp:1", lambda: negative_views[1], 0.0)
        out = [(key, fn(), w) for key, (fn, w) in merged.items() if w != 0.0 or key in keep]
        if not out:  # every coefficient is zero: keep one branch so shapes stay valid (direction = k·ε)
            out = [("text:", p.null.unsqueeze(0).expand(batch, *p.null.shape), 0.0)]
        return out, perp_weights


def perpendicular_component(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x − (⟨x, y⟩ / max(⟨y, y⟩, 1e-6))·y`` per sample (inner products over C, H, W)."""
    dims = tuple(range(1, x.dim()))
    coef = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp_min(1e-6)
    return x - coef * y


def perp_neg_term(eps_pos: torch.Tensor, eps_unc: torch.Tensor, eps_views, weights: torch.Tensor) -> torch.Tensor:
    """Perp-Neg's ``Δ_perp = Σ_i w_i · perp(ε_view_i − ε_unc, ε_pos − ε_unc)`` (spec §1.3); ``weights`` ``[B, n]``."""
    e_pos = eps_pos - eps_unc
    shape = (-1,) + (1,) * (eps_pos.dim() - 1)
    return sum(weights[:, i].view(shape) * perpendicular_component(e - eps_unc, e_pos)
               for i, e in enumerate(eps_views))


def normalize_direction(g: torch.Tensor, norm: torch.Tensor, by: str, scale: float) -> torch.Tensor:
    """``scale·ĝ + (1 − scale)·g`` for ``g`` ``[B, C, h, w]``, ĝ by ``by``: ``l2``: ``g / (‖g‖ + 1e-8)`` with the norm
    ``norm`` of the whole batch tensor (spec §1.1 step 4); ``std``: ``g / (std + 1e-8)`` with the unbiased std over
    H, W per render and channel (the CSD-MVDream guidance, R2)."""
    if by == "std":
        unit = g / (g.std(dim=(-2, -1), keepdim=True) + 1e-8)
    else:
        unit = g / (norm + 1e-8)
    return unit if scale == 1.0 else scale * unit + (1.0 - scale) * g


def reconstruction_direction(z: torch.Tensor, z_t: torch.Tensor, eps_hat: torch.Tensor, eps_y: Optional[torch.Tensor],
                             alphas_t: torch.Tensor, rescale: float, n_views: int) -> torch.Tensor:
    """MVDream's x0-reconstruction direction ``z − x̂0`` ``[B, C, h, w]`` (threestudio-mvdream ``recon_loss``; its loss
    ``0.5·‖z − sg(x̂0)‖²/B`` has the gradient ``(z − x̂0)/B``, the engine's loss with ``g = z − x̂0``).

    ``x̂0 = (z_t − sqrt(1 − ᾱ)·ε̂)/sqrt(ᾱ)`` from the guided ``eps_hat``; with ``rescale`` r > 0,
    ``x̂0 ← r·f·x̂0 + (1 − r)·x̂0`` where ``f = (std(x̂0_y) + 1e-8)/(std(x̂0) + 1e-8)`` per object (the unbiased std
    over its ``n_views`` renders' C, h, w) and ``x̂0_y`` is the reconstruction from ``eps_y`` (the positive prompt
    alone). ``alphas_t``: ᾱ ``[B]``."""
    a = alphas_t.view(-1, *([1] * (z.dim() - 1)))
    x0 = (z_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    if rescale > 0:
        x0_y = (z_t - (1 - a).sqrt() * eps_y) / a.sqrt()
        per_object = x0.shape[0] // int(n_views)
        f = (x0_y.reshape(per_object, -1).std(dim=1) + 1e-8) / (x0.reshape(per_object, -1).std(dim=1) + 1e-8)
        x0 = rescale * x0 * f.repeat_interleave(int(n_views)).view_as(a) + (1 - rescale) * x0
    return z - x0
