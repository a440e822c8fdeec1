"""MVDream (Shi et al., *MVDream: Multi-view Diffusion for 3D Generation*, 2023) as a :class:`DiffusionPrior`: the
multi-view model of the official CSD-MVDream runs (CSD_SPEC §1.2 R2 column, §8 item 9).

MVDream is Stable Diffusion 2.1-base (its VAE, its OpenCLIP ViT-H text encoder read at the penultimate layer, its
UNet at 256², i.e. 32² latents) with two changes to the UNet, both reproduced here on diffusers'
``UNet2DConditionModel``:

1. **A camera embedding.** Each image's camera, its camera-to-world matrix with the translation moved onto the unit
   sphere and flattened to 16 numbers (:func:`mvdream_camera`), goes through a two-layer MLP (linear, SiLU, linear)
   whose output is added to the timestep embedding: exactly diffusers' ``class_embed_type="projection"`` class
   embedding (``class_embedding.linear_{1,2}`` = MVDream's ``camera_embed.{0,2}``), fed as ``class_labels``.
2. **Self-attention across the views of one object.** In every transformer block the self-attention (``attn1``)
   of the ``num_views`` images of one object runs over their tokens joined, ``[(B·V), L, C] → [B, V·L, C]``
   (MVDream's ``BasicTransformerBlock3D``); the cross-attention to the text stays per image. This is an attention
   processor (:class:`MultiViewAttnProcessor`) on every attention of the UNet, the view count passed through
   ``cross_attention_kwargs``, so the UNet's weights, layout and code stay diffusers'.

Why diffusers' UNet and not a port of MVDream's ``MultiViewUNetModel``: the two changes are small and both map onto
extension points diffusers has (a projection class embedding, attention processors), so the UNet is the one the
Stable Diffusion prior already runs (scaled-dot-product attention, fp16, the same VAE and text paths through
:class:`StableDiffusionPrior`), and "MVDream with one view and no camera embedding is SD 2.1" holds by construction
(``tests/test_prior_mvdream.py`` checks it). The original checkpoint's LDM key layout is converted once at load time
(``ldm_layout.py``, every key accounted for); loading lives in ``mvdream_loader.py``.

A batch holds whole objects: ``num_views`` consecutive images are the views of one object (the camera sampler draws
them so, ``render/cameras.py``). The prior takes the engine's cameras as they are: the engine's world (z up) and
OpenGL camera axes are those MVDream was trained with after its ``convert_opengl_to_blender``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError
from .base import unet_inputs
from .stable_diffusion import StableDiffusionPrior, v_to_eps

__all__ = ["MVDreamPrior", "MultiViewAttnProcessor", "install_multiview_attention", "mvdream_camera", "CAMERA_DIM"]

#: MVDream's camera condition: a flattened 4×4 camera-to-world matrix (``camera_dim`` of sd-v2-base.yaml)
CAMERA_DIM = 16


def mvdream_camera(c2w: torch.Tensor) -> torch.Tensor:
    """MVDream's camera condition ``[N, 16]`` for camera-to-world matrices ``c2w`` ``[N, 4, 4]`` of the engine.

    MVDream's training cameras (its ``camera_utils.get_camera``) are OpenGL c2w matrices of a y-up world turned into
    Blender's z-up world by ``convert_opengl_to_blender`` (``flip_yz`` applied on the left): world z up, camera
    columns [right, up, −look-at] — the engine's convention (``render/cameras.py``), so no axis changes. The
    azimuths differ by a constant: MVDream's azimuth 0 looks from −y, the engine's from +x (engine azimuth =
    MVDream azimuth − 90°). ``normalize_camera`` puts the camera on the unit sphere (the translation divided by its
    norm + 1e-8), then the matrix is flattened row by row, as threestudio-mvdream and the CSD-MVDream guidance pass
    it (``camera_condition_type: rotation``)."""
    m = c2w.reshape(-1, 4, 4).to(torch.float32).clone()
    t = m[:, :3, 3]
    m[:, :3, 3] = t / (t.norm(dim=-1, keepdim=True) + 1e-8)
    return m.reshape(-1, 16)


class MultiViewAttnProcessor:
    """A diffusers attention processor with MVDream's multi-view self-attention.

    ``joint`` (the self-attentions, ``attn1``): the tokens ``[(B·V), L, C]`` of the ``num_views`` = V images of one
    object attend as one sequence ``[B, V·L, C]`` (MVDream: ``"(b f) l c -> b (f l) c"``), so every view sees every
    other view of its object; not joint (the cross-attentions) or ``num_views`` 1: the plain processor. Either way
    the attention's own weights and scaled-dot-product attention (``AttnProcessor2_0``) do the work."""

    def __init__(self, joint: bool):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.joint = bool(joint)
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 num_views: int = 1) -> torch.Tensor:
        views = int(num_views)
        if not self.joint or views <= 1 or encoder_hidden_states is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        n, length, channels = hidden_states.shape  # [(B·V), L, C]
        if n % views:
            raise ValueError(f"a batch of {n} images is not whole objects of {views} views each")
        joined = hidden_states.reshape(n // views, views * length, channels)  # [B, V·L, C]
        return self.inner(attn, joined, None, attention_mask, temb).reshape(n, length, channels)


def install_multiview_attention(unet) -> None:
    """Give every attention of a diffusers ``UNet2DConditionModel`` a :class:`MultiViewAttnProcessor`: joint for the
    self-attentions (``attn1``), plain for the cross-attentions (they accept ``num_views`` too, so the UNet's
    ``cross_attention_kwargs={"num_views": V}`` reaches every block without warnings)."""
    unet.set_attn_processor({name: MultiViewAttnProcessor(joint=name.endswith("attn1.processor"))
                             for name in unet.attn_processors})


class MVDreamPrior(StableDiffusionPrior):
    """A frozen MVDream UNet (SD 2.1-base with a camera embedding and multi-view self-attention) + VAE + text
    encoder. Renders, latents and text work as in :class:`StableDiffusionPrior` (256² renders → 4×32×32 latents for
    the published model); :meth:`predict_noise` needs the cameras and the number of views per object."""

    name = "mvdream"
    multiview = True

    def __init__(self, unet, *args, **kwargs):
        super().__init__(unet, *args, **kwargs)
        c = self.unet.config
        if c.class_embed_type != "projection" or int(c.projection_class_embeddings_input_dim or 0) != CAMERA_DIM:
            raise ConfigError("model", f"the UNet of {self.source} has no MVDream camera embedding (a projection class "
                                       f"embedding of {CAMERA_DIM} inputs); load it as a Stable Diffusion model")
        install_multiview_attention(self.unet)

    def attach_controlnet(self, source: str, scale: float = 1.0):
        raise ConfigError("prior.controlnet", "MVDream takes no ControlNet (its UNet is conditioned on the cameras "
                                              "and views of each object); remove the ControlNet or use a Stable "
                                              "Diffusion model")

    @torch.no_grad()
    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
                      control: Optional[torch.Tensor] = None, cameras: Optional[torch.Tensor] = None,
                      num_views: int = 1) -> torch.Tensor:
        """ε for ``z_t`` ``[N, 4, h, w]`` at timesteps ``t`` ``[N]`` with text ``embeddings`` ``[N, 77, D]``, seen
        from ``cameras`` (the engine's c2w, ``[N, 4, 4]``), ``num_views`` consecutive images per object (N a
        multiple of it). ``control`` is accepted and ignored (no ControlNet). Returns float32 ``[N, 4, h, w]``."""
        if cameras is None:
            raise ValueError("MVDream conditions every prediction on its camera: pass cameras=c2w [N, 4, 4]")
        dt = self.unet_dtype
        z_t, t, emb = unet_inputs(z_t, t, embeddings, self.device, dt)
        n = z_t.shape[0]
        if int(num_views) < 1 or n % int(num_views) or cameras.reshape(-1, 16).shape[0] != n:
            raise ValueError(f"{n} images with {cameras.reshape(-1, 16).shape[0]} cameras cannot be grouped into "
                             f"objects of {num_views} views")
        camera = mvdream_camera(cameras.to(self.device)).to(dt)  # [N, 16]
        out = self.unet(z_t.to(dt), t, encoder_hidden_states=emb, class_labels=camera,
                        cross_attention_kwargs={"num_views": int(num_views)}).sample.to(torch.float32)
        if self.prediction_type == "v_prediction":
            out = v_to_eps(out, z_t.to(torch.float32), self.alphas_cumprod[t])
        return out
