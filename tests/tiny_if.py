"""A tiny random-weight DeepFloyd-IF-shaped stage-I model for tests (no pytest here; see ``conftest.py``).

``build_tiny_if(root)`` writes ``root/tiny-if``: a diffusers folder saved with ``IFPipeline.save_pretrained``
(``model_index.json`` naming IFPipeline, ``text_encoder/ tokenizer/ unet/ scheduler/``; no safety checker, feature
extractor or watermarker), shaped like ``DeepFloyd/IF-I-XL-v1.0`` but tiny:

* a ``T5EncoderModel`` of width 24 (IF: T5-XXL, 4096) and a T5 tokenizer built offline from a small
  ``tokenizers`` Unigram vocabulary (whole words of the test prompts, then every ASCII letter, digit and punctuation
  mark, so no text falls back to ``<unk>``), saved as ``tokenizer.json`` (no ``sentencepiece`` needed);
* an IF-like ``UNet2DConditionModel``: 3 input / 6 output channels (ε + learned variance) at ``sample_size`` 64,
  IF's block types (resnet up/down-sampling blocks, "simple" cross-attention with added K/V, text pooling into the
  time embedding, scale-shift norms, GELU), ``encoder_hid_dim`` = the T5 width projected to a cross-attention width
  of 32 (``text_proj``), three levels of widths 8/16/32 (attention only at 16² and below, so a batch of 12 at 64²
  runs in ~0.1 s on one CPU thread);
* IF's ``DDPMScheduler`` config (``squaredcos_cap_v2``, ``learned_range`` variance, thresholding).
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

TINY_IF_RESOLUTION = 64
TINY_T5_WIDTH = 24
TINY_CROSS_ATTENTION = 32
TINY_MAX_LENGTH = 77

_WORDS = ("a", "an", "the", "of", "on", "in", "and", "with", "photo", "DSLR", "cat", "dog", "red", "blue", "green",
          "ball", "thing", "view", "front", "side", "back", "overhead", "corgi", "oversaturated", "color", "ugly",
          "tiling", "low", "quality", "noisy")


def build_tiny_tokenizer():
    """A ``T5TokenizerFast`` over a small Unigram vocabulary (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 as in T5)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = {"▁": -2.0}
    for w in _WORDS:
        pieces.setdefault("▁" + w, -3.0)  # whole words win over spelling them out
    for ch in chars:
        pieces.setdefault("▁" + ch, -5.5)
        pieces.setdefault(ch, -5.0)
    vocab = [(s, 0.0) for s in specials] + list(pieces.items())
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                           special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                          extra_ids=0, additional_special_tokens=[], model_max_length=TINY_MAX_LENGTH)
    return tok, len(vocab)


def build_tiny_if_components() -> dict:
    """The four IF stage-I components with seeded random weights (not saved)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    tokenizer, n_tokens = build_tiny_tokenizer()
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=256,
        d_model=TINY_T5_WIDTH,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=3,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as T5-XXL in IF
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))
    assert n_tokens <= text_encoder.config.vocab_size
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=TINY_IF_RESOLUTION,
        in_channels=3,
        out_channels=6,
        layers_per_block=1,
        block_out_channels=(8, 16, 32),
        down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=TINY_CROSS_ATTENTION,
        encoder_hid_dim=TINY_T5_WIDTH,
        encoder_hid_dim_type="text_proj",
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        beta_start=0.0001,
        beta_end=0.02,
        clip_sample=True,
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.5,
        prediction_type="epsilon",
        variance_type="learned_range",
    )
    for m in (unet, text_encoder):
        m.eval()
    return dict(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def build_tiny_if(root: Path) -> dict:
    """Build the tiny IF model under ``root``: ``{"folder": the diffusers folder}``."""
    from diffusers import IFPipeline

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    parts = build_tiny_if_components()
    pipe = IFPipeline(**parts, safety_checker=None, feature_extractor=None, watermarker=None,
                      requires_safety_checker=False)
    folder = root / "tiny-if"
    pipe.save_pretrained(folder)
    return dict(folder=folder)
