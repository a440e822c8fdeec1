"""The original (LDM / CompVis) key layout of Stable-Diffusion-family checkpoints, mapped onto diffusers and
transformers module names.

Each part is a function of its state dict (keys without the checkpoint's prefix) that returns
``(converted, unused)``: the tensors under diffusers/transformers names, and the keys deliberately not loaded with
the reason. A key that no rule knows raises :class:`LayoutError` naming it, so a partial conversion cannot pass
silently: every key of a checkpoint is either converted or listed as unused.

* :func:`unet_from_ldm`: ``openaimodel.UNetModel`` (SD 1.x/2.x, and MVDream's ``MultiViewUNetModel``, whose camera
  MLP ``camera_embed.{0,2}`` becomes diffusers' projection class embedding ``class_embedding.linear_{1,2}``);
* :func:`vae_from_ldm`: the LDM ``AutoencoderKL`` (1×1-convolution attention weights become linear ones);
* :func:`open_clip_text_from_ldm`: the OpenCLIP text tower of SD 2.x (``FrozenOpenCLIPEmbedder``) as a transformers
  ``CLIPTextModel`` of its first ``n_layers`` layers (SD 2.x reads the penultimate layer; the layers after it, the
  projection, the logit scale and the causal mask buffer are unused).
"""
from __future__ import annotations

import re
from typing import Dict, Tuple

import torch

#: (converted state dict, {unused key: why})
Converted = Tuple[Dict[str, torch.Tensor], Dict[str, str]]

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "camera_embed.0": "class_embedding.linear_1", "camera_embed.2": "class_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
#: what a spatial transformer holds (the same names in LDM and diffusers)
_ATTENTION = re.compile(r"(norm|proj_in|proj_out)\.(weight|bias)|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v"
                        r"|to_out\.0)|ff\.net\.(0\.proj|2)|norm[123])\.(weight|bias)")
_PARAM = re.compile(r"(weight|bias)")


class LayoutError(ValueError):
    """A checkpoint key that the LDM layout does not have (the file is of another layout or model)."""

    def __init__(self, part: str, key: str):
        super().__init__(f"{part} key {key!r} is not part of the original LDM layout")
        self.part, self.key = part, key


def _resnet(part: str, key: str, rest: str) -> str:
    head, _, param = rest.rpartition(".")
    if head not in _RESNET or not _PARAM.fullmatch(param):
        raise LayoutError(part, key)
    return f"{_RESNET[head]}.{param}"


def _attention(part: str, key: str, rest: str) -> str:
    if not _ATTENTION.fullmatch(rest):
        raise LayoutError(part, key)
    return rest


def unet_from_ldm(state: Dict[str, torch.Tensor], layers_per_block: int) -> Converted:
    """LDM UNet keys (``input_blocks.*``, ``middle_block.*``, ``output_blocks.*``, ...) → ``UNet2DConditionModel``
    names. ``layers_per_block``: the yaml's ``num_res_blocks`` (the flat LDM block index encodes level and layer)."""
    n = int(layers_per_block) + 1  # blocks per level: the resnets, then the down/upsampler
    out = {}
    for key, value in state.items():
        prefix, _, param = key.rpartition(".")
        if prefix in _UNET_TOP and _PARAM.fullmatch(param):
            out[f"{_UNET_TOP[prefix]}.{param}"] = value
            continue
        m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key)
        if m and int(m[1]) > 0:
            level, layer = divmod(int(m[1]) - 1, n)
            down = f"down_blocks.{level}"
            if layer == n - 1:  # the downsampler
                if m[2] != "0" or not re.fullmatch(r"op\.(weight|bias)", m[3]):
                    raise LayoutError("UNet", key)
                out[f"{down}.downsamplers.0.conv.{m[3][3:]}"] = value
            elif m[2] == "0":
                out[f"{down}.resnets.{layer}.{_resnet('UNet', key, m[3])}"] = value
            elif m[2] == "1":
                out[f"{down}.attentions.{layer}.{_attention('UNet', key, m[3])}"] = value
            else:
                raise LayoutError("UNet", key)
            continue
        m = re.fullmatch(r"middle_block\.([012])\.(.+)", key)
        if m:
            if m[1] == "1":
                out[f"mid_block.attentions.0.{_attention('UNet', key, m[2])}"] = value
            else:
                out[f"mid_block.resnets.{int(m[1]) // 2}.{_resnet('UNet', key, m[2])}"] = value
            continue
        m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key)
        if m:
            level, layer = divmod(int(m[1]), n)
            up = f"up_blocks.{level}"
            if m[2] in ("1", "2") and re.fullmatch(r"conv\.(weight|bias)", m[3]):  # the upsampler
                out[f"{up}.upsamplers.0.conv.{m[3][5:]}"] = value
            elif m[2] == "0":
                out[f"{up}.resnets.{layer}.{_resnet('UNet', key, m[3])}"] = value
            elif m[2] == "1":
                out[f"{up}.attentions.{layer}.{_attention('UNet', key, m[3])}"] = value
            else:
                raise LayoutError("UNet", key)
            continue
        raise LayoutError("UNet", key)
    return out, {}


_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_from_ldm(state: Dict[str, torch.Tensor], n_levels: int) -> Converted:
    """LDM ``AutoencoderKL`` keys → diffusers ``AutoencoderKL`` names (``n_levels``: ``len(ch_mult)``; the decoder
    counts its levels from the other end). ``loss.*`` (the training loss, in some training checkpoints) is unused."""
    out, unused = {}, {}
    for key, value in state.items():
        if key.startswith("loss."):
            unused[key] = "the autoencoder's training loss"
            continue
        prefix, _, param = key.rpartition(".")
        if prefix in ("quant_conv", "post_quant_conv") and _PARAM.fullmatch(param):
            out[key] = value
            continue
        m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", key)
        if m:
            out[f"{m[1]}.{'conv_norm_out' if m[2] == 'norm_out' else m[2]}.{m[3]}"] = value
            continue
        m = re.fullmatch(r"(encoder\.down|decoder\.up)\.(\d+)\.(block\.(\d+)\.(\w+)|downsample\.conv|upsample\.conv)"
                         r"\.(weight|bias)", key)
        if m:
            side, kind = m[1].split(".")
            level = int(m[2]) if kind == "down" else int(n_levels) - 1 - int(m[2])
            if m[4] is not None:
                if m[5] not in _VAE_RESNET:
                    raise LayoutError("VAE", key)
                out[f"{side}.{kind}_blocks.{level}.resnets.{m[4]}.{_VAE_RESNET[m[5]]}.{m[6]}"] = value
            elif m[3] == f"{kind}sample.conv":
                out[f"{side}.{kind}_blocks.{level}.{kind}samplers.0.conv.{m[6]}"] = value
            else:
                raise LayoutError("VAE", key)
            continue
        m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_([12])\.(\w+)|attn_1\.(\w+))\.(weight|bias)", key)
        if m:
            if m[3] is not None and m[4] in _VAE_RESNET:
                out[f"{m[1]}.mid_block.resnets.{int(m[3]) - 1}.{_VAE_RESNET[m[4]]}.{m[6]}"] = value
            elif m[5] in _VAE_ATTENTION:
                if m[6] == "weight" and m[5] != "norm" and value.dim() == 4:
                    value = value[:, :, 0, 0]  # a 1×1 convolution is a linear layer
                out[f"{m[1]}.mid_block.attentions.0.{_VAE_ATTENTION[m[5]]}.{m[6]}"] = value
            else:
                raise LayoutError("VAE", key)
            continue
        raise LayoutError("VAE", key)
    return out, unused


_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def open_clip_text_from_ldm(state: Dict[str, torch.Tensor], n_layers: int) -> Converted:
    """OpenCLIP text-tower keys (``token_embedding``, ``positional_embedding``, ``transformer.resblocks.*``,
    ``ln_final``, ...) → a transformers ``CLIPTextModel`` of the first ``n_layers`` layers (without the
    ``text_model.`` prefix of transformers 4). The fused ``in_proj`` of each attention splits into q, k and v."""
    out, unused = {}, {}
    for key, value in state.items():
        if key == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = value
        elif key in ("ln_final.weight", "ln_final.bias"):
            out[f"final_layer_norm.{key.rpartition('.')[2]}"] = value
        elif key in ("text_projection", "logit_scale"):
            unused[key] = "CLIP's contrastive head (the prior reads the hidden states)"
        elif key == "attn_mask":
            unused[key] = "the causal mask (rebuilt by the text model)"
        else:
            m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key) or \
                re.fullmatch(r"transformer\.resblocks\.(\d+)\.(attn)\.in_proj_(weight|bias)", key)
            if not m:
                raise LayoutError("text encoder", key)
            i, name, param = int(m[1]), m[2], m[3]
            if i >= n_layers:
                unused[key] = f"text layer {i}: the model reads the output of layer {n_layers - 1}"
                continue
            layer = f"encoder.layers.{i}"
            if name == "attn" and key.endswith(f"in_proj_{param}"):
                for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    out[f"{layer}.self_attn.{part}_proj.{param}"] = chunk
            elif name in _CLIP_LAYER:
                out[f"{layer}.{_CLIP_LAYER[name]}.{param}"] = value
            else:
                raise LayoutError("text encoder", key)
    return out, unused
