"""Train the toy prior: a small Stable-Diffusion-shaped latent diffusion model of the five toy objects.

    python benchmarks/toy_prior/train.py --out csd_backend/priors/toy_model --work runs/toy_prior   # v2, hours
    python benchmarks/toy_prior/train.py --smoke --out /tmp/toy_smoke --work /tmp/toy_smoke_work   # 1-minute check
    # the first prior's recipe (v1; not bit-identical to it: the held-out split changed):
    python benchmarks/toy_prior/train.py --arch v1 --per-object 1600 --vae-steps 1000 --vae-crop-fraction 0.85 \
        --unet-steps 1800 --ema-decay 0.995 --fp32-unet --out ... --work ...

**Resumable.** The VAE and UNet phases save their whole state (models, EMA, optimiser, data order, random
generator) to ``<work>/ckpt/vae.pt`` / ``unet.pt`` every ``--checkpoint-every`` steps; running the same command
again continues where it stopped, bit-identically for the same thread count (a checkpoint made with other
result-affecting settings is refused). The latents are cached in ``ckpt/latents.pt``. A finished VAE can be reused
for other UNet settings by copying ``vae.pt`` and ``latents.pt`` into a new ``--work`` (same VAE options).

**Evaluations during training** (``--eval-every``, on the EMA weights, with their own random generator so the
training is unchanged): held-out ε-MSE and Min-SNR-weighted loss at fixed noise, the diffusion-classifier accuracy
(overall, per shading, and the mug's view captions), a sample grid (``<work>/evals/``), one line per evaluation in
``<work>/evals.jsonl``, and a fp16 copy of the EMA weights (``ckpt/ema_step*.pt``). ``--export-only`` writes
``--out`` from the latest UNet checkpoint (or ``--export-step N``) and runs the final checks, so an unfinished
training can be tried in the engine; ``--eval-model DIR`` runs the final checks on any saved prior (e.g. the shipped
one) with this ``--work``'s held-out renders.

**Fine-tuning and other training sets** (README, "Fine-tuned at one apparent size"): ``--init-from DIR`` starts from
a saved prior (its VAE kept as it is: no VAE phase, its ``scaling_factor``; the UNet and text encoder train on for
``--unet-steps`` at ``--lr``); ``--relative-distance A,B`` renders the training set at one apparent size (distance
U[A, B] / tan(fovy / 2)); ``--variants-per-object N`` adds N resized or recoloured renders of every object that
only the unconditional captions name (``--variant-kind morph``: its shape blended with another object's instead;
``morph-resize``: half each; ``blob``: its shape blended with the engine's starting blob; ``morph-blob``: half
morphs, half blob morphs; ``morph-blob-recolour``: those recoloured; ``morph-blob-sized``: those seen at their
object's own size, half recoloured; ``morph-blob-sized-resize``: those and resized objects). Each is part of the
checkpoints' settings only when given.

Phases (each prints its time):

1. **render**: ``--per-object`` renders of every object (``render_dataset.py``: the engine's cameras, shadings and
   backgrounds, 64×64, 2×2 supersampled).
2. **vae**: an ``AutoencoderKL`` with factor 4 (64×64×3 → 16×16×4), L1 reconstruction + a small KL term (SD's
   choice: the latent is nearly deterministic); its ``scaling_factor`` is set so the latents have unit variance.
3. **latents**: the posterior mean and std of every image (the UNet phase samples from them, as the engine's
   ``encode_images`` does).
4. **unet**: a ``UNet2DConditionModel`` on 4×16×16 latents, ε-prediction with SD's scheduler (``scaled_linear``
   betas 0.00085–0.012, 1000 steps, so ``alphas_cumprod`` is SD's), Min-SNR-5 loss weights, EMA weights; the
   small ``CLIPTextModel`` is trained with it (see the README for why). Captions are drawn per sample:
   65 % view-suffixed exactly as the engine builds them (``prompts.view_labels`` with the 30° thresholds of the
   CSD presets or the 45° of the SDS preset, then ``prompts.directional_prompt``), 15 % the plain prompt, 15 %
   the empty caption "" (so ε(x; "") is the unconditional score CSD needs) and 5 % the engine's default
   negative prompt (so it acts as a second unconditional prompt instead of an unseen, arbitrary one).
5. **save**: ``StableDiffusionPipeline.save_pretrained`` → ``model_index.json`` + ``unet/ vae/ text_encoder/
   tokenizer/ scheduler/`` (safetensors, fp16 weights to keep the package small), loadable by
   ``csd_backend.priors.stable_diffusion.load_stable_diffusion``.
6. **samples**: DDIM (30 steps, CFG 5) samples per prompt and view, one PNG per object plus an overview
   ``samples.png``; the VAE's reconstructions of held-out renders (``vae_recon.png``: PSNR overall and on edge
   pixels, mean colour shift); and a check that the model recognises the objects: for held-out renders (every 50th
   render of each object, all shadings), the caption with the lowest denoising error ("diffusion classifier")
   should be the right one (``--classifier-images``, default 400).

Deterministic from ``--seed`` for a given torch version and thread count (``--threads``, default 1: on a
shared 2-core machine a second OpenMP thread often makes small models slower, not faster).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parents[1], _HERE.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from toy_prior.objects import OBJECTS  # noqa: E402
from toy_prior.render_dataset import (BLOB_MIX, IMAGE_SIZE, MORPH_BLOB_MIX, MORPH_BLOB_RECOLOUR_MIX,  # noqa: E402
                                     MORPH_BLOB_SIZED_MIX, MORPH_BLOB_SIZED_RESIZE_MIX, MORPH_MIX, MORPH_SIZE_MIX,
                                     SHADING_MIX, VARIANT_MIX, distance_range, render_dataset, save_sheet)

# ------------------------------------------------------------------------------------------------ settings
MAX_LENGTH = 32
#: the thresholds (front, back) of the presets: 30° for the CSD presets, 45° for sds-dreamfusion
VIEW_THRESHOLDS = (30.0, 45.0)
OVERHEAD_THRESHOLD = 60.0
CAPTION_MIX = {"view": 0.65, "plain": 0.15, "empty": 0.15, "negative": 0.05}
#: the captions of the variants (``--variants-per-object``): the unconditional ones only, as often as above
VARIANT_CAPTION_MIX = {"empty": 0.75, "negative": 0.25}
VIEWS = ("front", "side", "back", "overhead")


def default_negative_prompt() -> str:
    from csd_backend.config import DEFAULT_NEGATIVE_PROMPT

    return DEFAULT_NEGATIVE_PROMPT


def known_words() -> List[str]:
    words = {"a", "view", *VIEWS}
    for o in OBJECTS:
        words.update(o.prompt.split())
    words.update(w.strip(",") for w in default_negative_prompt().split())
    return sorted(w for w in words if w)


# ----------------------------------------------------------------------------------------------- tokenizer
def byte_alphabet() -> Dict[int, str]:
    """The byte-level alphabet of GPT-2/CLIP BPE: every byte gets a printable character (also used by the
    tests' tiny tokenizer, ``tests/tiny_sd.py``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe(word: str, ranks: Dict[tuple, int]) -> List[str]:
    """CLIP's BPE of one lower-case word (the last symbol carries ``</w>``)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def tokenizer_tables(words: List[str]):
    """``(vocab, merges)`` of the toy tokenizer: the byte-level alphabet plus BPE merges that make every word in
    ``words`` one token (merges are added word by word, each after the merges it needs, so earlier words keep
    their single token). Other text still tokenizes, character by character."""
    chars = list(byte_alphabet().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges: List[tuple] = []
    ranks: Dict[tuple, int] = {}
    for w in words:
        parts = _bpe(w, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            new = parts[0] + parts[1]
            if new not in tokens:
                tokens.append(new)
            parts = [new] + parts[2:]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def build_tokenizer(words: List[str]):
    """The toy ``CLIPTokenizer`` (see ``tokenizer_tables``), built offline."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_tables(words)
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=MAX_LENGTH)
    for w in words:  # each known word must be one token
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer: '{w}' became {tok.convert_ids_to_tokens(ids)}")
    return tok


# ----------------------------------------------------------------------------------------------- captions
def caption_for(obj_index: int, elevation: float, azimuth: float, kind: str, threshold: float) -> str:
    from csd_backend.prompts import directional_prompt, view_labels

    prompt = OBJECTS[obj_index].prompt
    if kind == "plain":
        return prompt
    if kind == "empty":
        return ""
    if kind == "negative":
        return default_negative_prompt()
    label = view_labels(torch.tensor([elevation]), torch.tensor([azimuth]), threshold, threshold,
                        OVERHEAD_THRESHOLD)[0]
    return directional_prompt(prompt, label)


def all_captions() -> List[str]:
    from csd_backend.prompts import directional_prompt

    caps = ["", default_negative_prompt()]
    for o in OBJECTS:
        caps += [o.prompt] + [directional_prompt(o.prompt, v) for v in VIEWS]
    return caps


def draw_captions(data, idx: torch.Tensor, g: torch.Generator) -> List[str]:
    """A caption per image (``CAPTION_MIX``); a variant (``render_dataset(variants=True)``) gets only the
    unconditional ones (``VARIANT_CAPTION_MIX``)."""
    def pick(mix: dict) -> List[str]:
        kinds, probs = zip(*mix.items())
        return [kinds[int(k)] for k in torch.multinomial(torch.tensor(probs), len(idx), True, generator=g)]

    kind = pick(CAPTION_MIX)
    thr = torch.randint(0, len(VIEW_THRESHOLDS), (len(idx),), generator=g)
    variant = data["variant"][idx]
    if variant.any():  # drawn only then: a training without variants draws exactly what it drew before them
        kind = [v if is_variant else k for k, v, is_variant in zip(kind, pick(VARIANT_CAPTION_MIX), variant)]
    return [caption_for(int(data["object"][i]), float(data["elevation"][i]), float(data["azimuth"][i]), k,
                        VIEW_THRESHOLDS[int(t)]) for i, k, t in zip(idx.tolist(), kind, thr)]


def make_portable(folder: Path) -> None:
    """Make a folder saved by transformers 5 load with transformers 4.x too (ComfyUI installs often have 4.x):
    the slow tokenizer's ``vocab.json`` + ``merges.txt`` beside ``tokenizer.json``, and the text encoder's keys
    with the ``text_model.`` prefix that 4.x expects (5.x reads both layouts; without the prefix 4.x would
    silently leave the encoder random)."""
    from safetensors.torch import load_file, save_file

    vocab, merges = tokenizer_tables(known_words())
    tok = folder / "tokenizer"
    (tok / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tok / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    te = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(te))
    state = {(k if k.startswith("text_model.") else f"text_model.{k}"): v.contiguous() for k, v in state.items()}
    save_file(state, str(te), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------- models
#: named architectures (``--arch``); ``--vae-channels``, ``--unet-channels``, ... override single fields.
#: ``v1`` is the first shipped prior (7 MB); ``v2`` the stronger one (see the README for the measurements).
ARCHS = {
    "smoke": dict(vae_channels="8,16,16", vae_layers=1, unet_channels="16,32,32", unet_layers=1, unet_heads=2,
                  unet_attn_levels=2, text_dim=64, text_layers=2),
    "v1": dict(vae_channels="16,32,64", vae_layers=1, unet_channels="32,64,96", unet_layers=1, unet_heads=2,
               unet_attn_levels=2, text_dim=64, text_layers=2),
    "v2": dict(vae_channels="32,64,64", vae_layers=1, unet_channels="64,128,128", unet_layers=1, unet_heads=4,
               unet_attn_levels=2, text_dim=64, text_layers=2),
}
ARCH_FIELDS = tuple(ARCHS["v1"])


def channels(text: str) -> tuple:
    return tuple(int(c) for c in str(text).split(","))


def build_models(tokenizer, arch: dict):
    """VAE, UNet, text encoder and scheduler of architecture ``arch`` (a dict with the fields of ``ARCHS``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vc, uc = channels(arch["vae_channels"]), channels(arch["unet_channels"])
    if len(vc) != 3:
        raise SystemExit(f"--vae-channels needs 3 levels (factor 4: 64×64 → 16×16 latents), got {vc}")
    n_attn = int(arch["unet_attn_levels"])
    if not 0 <= n_attn <= len(uc):
        raise SystemExit(f"--unet-attn-levels must be 0…{len(uc)}, got {n_attn}")
    down = tuple("CrossAttnDownBlock2D" if i >= len(uc) - n_attn else "DownBlock2D" for i in range(len(uc)))
    up = tuple("CrossAttnUpBlock2D" if d.startswith("CrossAttn") else "UpBlock2D" for d in reversed(down))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=vc, layers_per_block=int(arch["vae_layers"]), latent_channels=4,
        norm_num_groups=8, sample_size=IMAGE_SIZE, mid_block_add_attention=False,
    )
    text_dim = int(arch["text_dim"])
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4,
        block_out_channels=uc, layers_per_block=int(arch["unet_layers"]),
        down_block_types=down, up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if n_attn else None,
        cross_attention_dim=text_dim, attention_head_dim=int(arch["unet_heads"]), norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim,
        num_hidden_layers=int(arch["text_layers"]), num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, scheduler=scheduler)


def load_models(folder: Path):
    """VAE, UNet, text encoder and scheduler of a saved prior (``--init-from``), in fp32."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"--init-from {folder}: not a saved prior (no model_index.json there); give a folder "
                         f"this script wrote, e.g. csd_backend/priors/toy_model")
    kw = dict(torch_dtype=torch.float32)
    return dict(vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw),
                unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw),
                text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw),
                scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"))


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def lr_at(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` → float ``[B, 3, H, W]`` in [−1, 1]."""
    return images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------- checkpoints
class PhaseCheckpoint:
    """The resumable state of one training phase (``<work>/ckpt/<phase>.pt``): models, optimiser, the data order
    and the random generator, so a resumed phase continues exactly as if it had not stopped (same thread count).
    ``settings`` are the options the phase's result depends on; a checkpoint made with other settings is refused
    (delete it, or use another ``--work``)."""

    def __init__(self, folder: Path, phase: str, settings: dict, every: int, log):
        self.path = folder / f"{phase}.pt"
        self.phase, self.settings, self.every, self.log = phase, settings, every, log

    def load(self):
        if not self.path.is_file():
            return None
        state = torch.load(self.path, weights_only=False)
        if state["settings"] != self.settings:
            diff = {k: (state["settings"].get(k), v) for k, v in self.settings.items()
                    if state["settings"].get(k) != v}
            raise SystemExit(f"{self.path} was made with other settings (checkpoint, now): {diff}; delete it or "
                             f"use another --work to start this phase again")
        if state.get("threads") != torch.get_num_threads():
            self.log(f"  note: {self.path.name} was written with {state.get('threads')} thread(s), now "
                     f"{torch.get_num_threads()}: the continuation is not bit-identical to an uninterrupted run")
        return state

    def due(self, step: int, total: int) -> bool:
        return step == total or (self.every > 0 and step % self.every == 0)

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = dict(state, settings=self.settings, threads=torch.get_num_threads())
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


class Batches:
    """Random batches without replacement (a new permutation when one runs out), with a state to checkpoint."""

    def __init__(self, n: int, batch: int, g: torch.Generator):
        self.n, self.batch, self.g = n, batch, g
        self.perm, self.pos = torch.randperm(n, generator=g), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx

    def state(self) -> dict:
        return {"perm": self.perm, "pos": self.pos}

    def restore(self, state: dict) -> None:
        self.perm, self.pos = state["perm"], state["pos"]


# ---------------------------------------------------------------------------------------------------- VAE
def train_vae(vae, images: torch.Tensor, steps: int, batch: int, lr: float, g: torch.Generator, log,
              crop_fraction: float = 0.85, kl_weight: float = 1e-6, ckpt: Optional[PhaseCheckpoint] = None) -> None:
    """L1 + ``kl_weight``·KL. The first ``crop_fraction`` of the steps train on random 32×32 crops (4× cheaper;
    the network is convolutional), the rest on whole images (GroupNorm statistics of the full size). The
    log-variance starts at −12 with zero weights (posterior std ≈ 0.0025): the VAE trains as a plain autoencoder
    from the first step instead of first learning to shrink a unit-variance posterior (diffusers' deep,
    GroupNorm-heavy VAE learns slowly; these two changes took a 64-px VAE from ~16 dB to ~23 dB in a few minutes
    on this CPU). With ``ckpt`` the phase resumes from, and saves to, its checkpoint."""
    with torch.no_grad():
        c = vae.config.latent_channels
        vae.quant_conv.weight[c:] = 0
        vae.quant_conv.bias[c:] = -12.0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    crop_steps = int(steps * crop_fraction)
    batches = Batches(images.shape[0], batch, g)
    start, acc = 0, []
    state = ckpt.load() if ckpt else None
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["rng"])
        batches.restore(state["batches"])
        start, acc = state["step"], state["acc"]
        log(f"  vae: resumed from {ckpt.path} at step {start}/{steps}")
    vae.train()
    t0 = time.perf_counter()
    for step in range(start, steps):
        x = to_unit(images[batches.next()])
        if step < crop_steps:
            i, j = torch.randint(0, IMAGE_SIZE // 2 + 1, (2,), generator=g).tolist()
            x = x[:, :, i:i + IMAGE_SIZE // 2, j:j + IMAGE_SIZE // 2]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            rec = vae.decode(z).sample
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        kl = 0.5 * (post.mean.float() ** 2 + post.var.float() - 1 - post.logvar.float()).mean()
        loss = l1 + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc.append(float(l1.detach()))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            log(f"  vae step {step + 1}/{steps}: L1 {sum(acc) / len(acc):.4f} ({el:.0f} s, "
                f"eta {el / (step + 1 - start) * (steps - step - 1):.0f} s)")
            acc = []
        if ckpt and ckpt.due(step + 1, steps):
            ckpt.save({"step": step + 1, "model": vae.state_dict(), "opt": opt.state_dict(), "rng": g.get_state(),
                       "batches": batches.state(), "acc": acc})
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256):
    means, stds = [], []
    for s in range(0, images.shape[0], batch):
        post = vae.encode(to_unit(images[s:s + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_reconstruct(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Decoded posterior means, uint8 ``[B, H, W, 3]``."""
    out = []
    for s in range(0, images.shape[0], batch):
        x = to_unit(images[s:s + batch])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        out.append(((rec + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(out)


def psnr(a_u8: torch.Tensor, b_u8: torch.Tensor) -> float:
    mse = ((a_u8.float() - b_u8.float()) / 255).pow(2).mean()
    return float(10 * torch.log10(1 / mse))


def vae_report(vae, images: torch.Tensor) -> dict:
    """Held-out reconstruction: PSNR over all pixels, PSNR on edge pixels (where a 3×3 neighbourhood of the
    original changes by more than 0.1: silhouettes and shading edges) and the mean colour shift (the mean of
    |mean(rec) − mean(original)| per image and channel, in [0, 1])."""
    rec = vae_reconstruct(vae, images)
    x, r = images.float() / 255, rec.float() / 255
    xc = x.permute(0, 3, 1, 2)
    rng = F.max_pool2d(xc, 3, 1, 1) + F.max_pool2d(-xc, 3, 1, 1)
    edge = (rng.amax(1) > 0.1).unsqueeze(-1).expand_as(x)
    edge_mse = (x - r).pow(2)[edge].mean()
    return {"psnr": psnr(images, rec), "psnr_edges": float(10 * torch.log10(1 / edge_mse)),
            "colour_shift": float((x.mean((1, 2)) - r.mean((1, 2))).abs().mean())}


def vae_psnr(vae, images: torch.Tensor) -> float:
    return vae_report(vae, images)["psnr"]


# --------------------------------------------------------------------------------------------------- UNet
class TextCache:
    """Token ids per caption (the tokenizer runs once per distinct caption)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: Dict[str, torch.Tensor] = {}

    def __call__(self, captions: List[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.ids]
        if missing:
            t = self.tokenizer(missing, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                               return_tensors="pt").input_ids
            self.ids.update(zip(missing, t))
        return torch.stack([self.ids[c] for c in captions])


def encode_captions(text_encoder, cache: TextCache, captions: List[str]) -> torch.Tensor:
    """``[B, L, D]`` embeddings, computing each distinct caption once."""
    uniq = list(dict.fromkeys(captions))
    emb = text_encoder(cache(uniq))[0]
    where = torch.tensor([uniq.index(c) for c in captions])
    return emb[where]


def train_unet(unet, text_encoder, tokenizer, alphas_cumprod, data, mean, std, steps: int, batch: int, lr: float,
               g: torch.Generator, log, ema_decay: float = 0.995, snr_gamma: float = 5.0, warmup: int = 50,
               bf16: bool = False, ckpt: Optional[PhaseCheckpoint] = None, evaluate=None, eval_every: int = 0):
    """UNet + text encoder (AdamW, warm-up then cosine to lr/10, Min-SNR-γ, clipping 1, EMA). Returns the EMA
    models. With ``ckpt`` the phase resumes from, and saves to, its checkpoint; ``evaluate(step, ema_unet,
    ema_text_encoder)`` runs every ``eval_every`` steps (its time is not in the ETA)."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema = {"unet": copy.deepcopy(unet).eval(), "text_encoder": copy.deepcopy(text_encoder).eval()}
    for m in ema.values():
        m.requires_grad_(False)
    pairs = [(ema["unet"], unet), (ema["text_encoder"], text_encoder)]
    cache = TextCache(tokenizer)
    batches = Batches(mean.shape[0], batch, g)
    start, acc = 0, []
    state = ckpt.load() if ckpt else None
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema["unet"].load_state_dict(state["ema_unet"])
        ema["text_encoder"].load_state_dict(state["ema_text_encoder"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["rng"])
        batches.restore(state["batches"])
        start, acc = state["step"], state["acc"]
        log(f"  unet: resumed from {ckpt.path} at step {start}/{steps}")
    unet.train()
    text_encoder.train()
    t0, spent = time.perf_counter(), 0.0
    ac = alphas_cumprod
    for step in range(start, steps):
        idx = batches.next()
        captions = draw_captions(data, idx, g)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, ac.shape[0], (batch,), generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = encode_captions(text_encoder, cache, captions)
            pred = unet(zt, t, encoder_hidden_states=emb).sample
        snr = ac[t] / (1 - ac[t])
        w = torch.clamp(snr, max=snr_gamma) / snr  # Min-SNR-γ weights for ε-prediction
        loss = (w * (pred.float() - noise).pow(2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, m in pairs:
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - d)
        acc.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            el = time.perf_counter() - t0 - spent
            log(f"  unet step {step + 1}/{steps}: loss {sum(acc) / len(acc):.4f} ({el:.0f} s, "
                f"eta {el / (step + 1 - start) * (steps - step - 1):.0f} s)")
            acc = []
        if ckpt and ckpt.due(step + 1, steps):
            ckpt.save({"step": step + 1, "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                       "ema_unet": ema["unet"].state_dict(), "ema_text_encoder": ema["text_encoder"].state_dict(),
                       "opt": opt.state_dict(), "rng": g.get_state(), "batches": batches.state(), "acc": acc})
        if evaluate is not None and eval_every > 0 and ((step + 1) % eval_every == 0 or step + 1 == steps):
            te = time.perf_counter()
            evaluate(step + 1, ema["unet"], ema["text_encoder"])
            spent += time.perf_counter() - te
    return ema["unet"], ema["text_encoder"]


# ------------------------------------------------------------------------------------------------ samples
@torch.no_grad()
def sample(unet, text_encoder, tokenizer, vae, scheduler, captions: List[str], n: int, seed: int,
           steps: int = 30, cfg: float = 5.0) -> torch.Tensor:
    """DDIM samples with classifier-free guidance: ``[len(captions), n, H, W, 3]`` in [0, 1]."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    cache = TextCache(tokenizer)
    cond = encode_captions(text_encoder, cache, [c for c in captions for _ in range(n)])
    uncond = encode_captions(text_encoder, cache, [""]).expand_as(cond)
    g = torch.Generator().manual_seed(seed)
    s = IMAGE_SIZE // 4
    z = torch.randn(len(captions) * n, 4, s, s, generator=g)
    for t in sched.timesteps:
        eps = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([cond, uncond])).sample
        e_c, e_u = eps.chunk(2)
        z = sched.step(e_u + cfg * (e_c - e_u), t, z).prev_sample
    x = vae.decode(z / vae.config.scaling_factor).sample
    img = ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    return img.view(len(captions), n, *img.shape[1:])


def save_grid(rows: torch.Tensor, labels: List[str], path: Path, pad: int = 2) -> None:
    """``rows`` ``[R, C, H, W, 3]`` → a PNG with one labelled row per caption."""
    from PIL import Image, ImageDraw

    R, C, H, W, _ = rows.shape
    label_w = 190
    canvas = Image.new("RGB", (label_w + C * (W + pad), R * (H + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r in range(R):
        draw.text((4, r * (H + pad) + H // 2 - 6), labels[r] or '"" (empty)', fill="black")
        for c in range(C):
            tile = Image.fromarray((rows[r, c].numpy() * 255 + 0.5).astype("uint8"))
            canvas.paste(tile, (label_w + c * (W + pad), r * (H + pad)))
    canvas.save(path)


#: the timesteps of the diffusion-classifier checks (``caption_accuracy``, ``prefer_exact.py``)
CLASSIFIER_TIMESTEPS = (100, 250, 400, 550, 700, 850)


@torch.no_grad()
def caption_accuracy(unet, text_encoder, tokenizer, alphas_cumprod, data, mean, n_images: int, seed: int,
                     details: bool = False):
    """Diffusion-classifier check on renders: for each image, the denoising error of every object's view caption
    at the same noise (6 timesteps 100…850); the object whose caption gives the lowest error is the prediction.
    Returns the accuracy (with ``details``: a dict with the accuracy, the confusion matrix and the accuracy of the
    mug's view captions: for held-out mug images, the view caption with the lowest error must be the image's
    view, the one object whose front, side and back differ)."""
    from csd_backend.prompts import directional_prompt

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(mean.shape[0], generator=g)[:n_images]
    cache = TextCache(tokenizer)
    ts = torch.tensor(CLASSIFIER_TIMESTEPS)
    a = alphas_cumprod[ts].view(-1, 1, 1, 1)
    K = len(OBJECTS)
    confusion = torch.zeros(K, K, dtype=torch.long)
    mug = next(i for i, o in enumerate(OBJECTS) if o.name == "mug")
    view_ok = view_n = 0
    shading_names = [s for s, _ in SHADING_MIX]
    by_shading = {s: [0, 0] for s in shading_names}
    for i in idx.tolist():
        label = caption_for(0, float(data["elevation"][i]), float(data["azimuth"][i]), "view", 30.0).split(", ")[-1]
        view = label.replace(" view", "")
        caps = [directional_prompt(o.prompt, view) for o in OBJECTS]
        obj = int(data["object"][i])
        if obj == mug:
            caps += [directional_prompt(OBJECTS[mug].prompt, v) for v in VIEWS if v != view]
        emb = encode_captions(text_encoder, cache, caps)  # [C, L, D]
        noise = torch.randn(len(ts), *mean.shape[1:], generator=g)
        zt = a.sqrt() * mean[i:i + 1] + (1 - a).sqrt() * noise  # [T, 4, h, w]
        C = len(caps)
        pred = unet(zt.repeat_interleave(C, 0), ts.repeat_interleave(C),
                    encoder_hidden_states=emb.repeat(len(ts), 1, 1)).sample
        err = (pred - noise.repeat_interleave(C, 0)).pow(2).mean((1, 2, 3)).view(len(ts), C).sum(0)
        confusion[obj, int(err[:K].argmin())] += 1
        if "shading" in data:
            cell = by_shading[shading_names[int(data["shading"][i])]]
            cell[0] += int(int(err[:K].argmin()) == obj)
            cell[1] += 1
        if obj == mug:
            view_n += 1
            view_ok += int(int(torch.cat([err[mug:mug + 1], err[K:]]).argmin()) == 0)
    acc = float(confusion.diag().sum()) / max(1, len(idx))
    if not details:
        return acc
    return {"accuracy": acc, "confusion": confusion.tolist(), "mug_view_accuracy": view_ok / max(1, view_n),
            "images": len(idx), "by_shading": {k: (round(c / m, 4), m) for k, (c, m) in by_shading.items() if m}}


@torch.no_grad()
def heldout_loss(unet, text_encoder, tokenizer, alphas_cumprod, data, mean, seed: int, snr_gamma: float = 5.0,
                 batch: int = 100) -> dict:
    """Denoising loss on held-out latents with their view captions (30° thresholds), at fixed noise and timesteps
    (stratified over 0…999, the same for every call with the same seed): the ε-MSE and the Min-SNR-weighted loss
    that training minimises."""
    from csd_backend.prompts import directional_prompt

    g = torch.Generator().manual_seed(seed)
    n = mean.shape[0]
    t_all = ((torch.arange(n) + torch.rand(n, generator=g)) * (alphas_cumprod.shape[0] / n)).long()
    t_all = t_all[torch.randperm(n, generator=g)]
    noise_all = torch.randn(mean.shape, generator=g)
    cache = TextCache(tokenizer)
    mse = wsum = 0.0
    for s in range(0, n, batch):
        sl = slice(s, min(n, s + batch))
        caps = [directional_prompt(OBJECTS[int(data["object"][i])].prompt,
                                   caption_for(0, float(data["elevation"][i]), float(data["azimuth"][i]), "view",
                                               30.0).split(", ")[-1].replace(" view", ""))
                for i in range(sl.start, sl.stop)]
        t = t_all[sl]
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * mean[sl] + (1 - a).sqrt() * noise_all[sl]
        pred = unet(zt, t, encoder_hidden_states=encode_captions(text_encoder, cache, caps)).sample
        e = (pred - noise_all[sl]).pow(2).mean((1, 2, 3))
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        mse += float(e.sum())
        wsum += float((torch.clamp(snr, max=snr_gamma) / snr * e).sum())
    return {"eps_mse": mse / n, "weighted": wsum / n}


def sample_overview(unet, text_encoder, tokenizer, vae, scheduler, n: int, seed: int, folder: Path,
                    prefix: str = "samples", per_object: bool = True) -> None:
    """Sample grids: one row per object × (plain, each view) and the empty caption; ``<prefix>.png`` and, with
    ``per_object``, ``<prefix>_<object>.png``."""
    from csd_backend.prompts import directional_prompt

    overview, labels = [], []
    for o in OBJECTS:
        caps = [o.prompt] + [directional_prompt(o.prompt, v) for v in VIEWS]
        imgs = sample(unet, text_encoder, tokenizer, vae, scheduler, caps, n, seed)
        if per_object:
            save_grid(imgs, caps, folder / f"{prefix}_{o.name}.png")
        overview.append(imgs)
        labels += caps
    overview.append(sample(unet, text_encoder, tokenizer, vae, scheduler, [""], n, seed))
    labels.append("")
    save_grid(torch.cat(overview), labels, folder / f"{prefix}.png")


def save_recon_sheet(vae, images: torch.Tensor, objects: torch.Tensor, path: Path, per_object: int = 12) -> None:
    """Held-out renders (odd rows) above their VAE reconstructions (even rows), ``per_object`` per object."""
    from PIL import Image

    rows = []
    for oi in range(len(OBJECTS)):
        idx = torch.nonzero(objects == oi).squeeze(-1)[:per_object]
        rows += [torch.cat(list(images[idx]), 1), torch.cat(list(vae_reconstruct(vae, images[idx])), 1)]
    Image.fromarray(torch.cat(rows, 0).numpy()).save(path)


def final_checks(folder: Path, test: dict, args, log) -> dict:
    """Samples and checks of a saved diffusers folder, loaded through the engine's own loader (the fp16-rounded
    weights as the engine sees them): sample grids, VAE reconstruction of the held-out renders, held-out denoising
    loss and the diffusion-classifier accuracy."""
    from csd_backend.priors.stable_diffusion import load_stable_diffusion

    prior = load_stable_diffusion(folder, device="cpu", dtype="float32")
    u, te, tk, vv = prior.unet, prior.text_encoder, prior.tokenizer, prior.vae
    sample_overview(u, te, tk, vv, prior.scheduler, args.samples, args.seed, args.work)
    save_recon_sheet(vv, test["images"], test["object"], args.work / "vae_recon.png")
    out = {"vae": vae_report(vv, test["images"])}
    test_mean = encode_latents(vv, test["images"])[0] * vv.config.scaling_factor
    ac = prior.alphas_cumprod.float().cpu()
    out["heldout_loss"] = heldout_loss(u, te, tk, ac, test, test_mean, args.seed + 1)
    out["classifier"] = caption_accuracy(u, te, tk, ac, test, test_mean, min(args.classifier_images,
                                                                                  len(test_mean)),
                                         args.seed, details=True)
    return out


#: options that are in a phase's settings only when given (so the checkpoints of earlier runs still resume)
OPTIONAL_KEYS = ("relative_distance", "init_from", "variants_per_object", "variant_kind")
#: ``--variant-kind``: what the variants change (``render_dataset.py``) and the name of their cache file
VARIANT_KINDS = {"resize-recolour": (VARIANT_MIX, "variants"), "morph": (MORPH_MIX, "morphs"),
                 "morph-resize": (MORPH_SIZE_MIX, "morphs-resize"), "blob": (BLOB_MIX, "blobs"),
                 "morph-blob": (MORPH_BLOB_MIX, "morphs-blobs"),
                 "morph-blob-recolour": (MORPH_BLOB_RECOLOUR_MIX, "morphs-blobs-recolour"),
                 "morph-blob-sized": (MORPH_BLOB_SIZED_MIX, "morphs-blobs-sized"),
                 "morph-blob-sized-resize": (MORPH_BLOB_SIZED_RESIZE_MIX, "morphs-blobs-sized-resize")}
#: the options each phase's result depends on (a checkpoint made with other values is not resumed)
VAE_KEYS = ("seed", "per_object", "vae_channels", "vae_layers", "vae_steps", "vae_batch", "vae_lr",
            "vae_crop_fraction", "vae_kl") + OPTIONAL_KEYS
UNET_KEYS = VAE_KEYS + ("unet_channels", "unet_layers", "unet_heads", "unet_attn_levels", "text_dim", "text_layers",
                        "unet_steps", "unet_batch", "lr", "warmup", "ema_decay", "snr_gamma", "bf16")


# ----------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the diffusers folder to write (replaced if it exists)")
    ap.add_argument("--work", type=Path, required=True,
                    help="folder for the dataset cache, checkpoints (ckpt/), evaluations, samples and log; "
                         "running the same command again resumes from its checkpoints")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-object", type=int, default=4000, help="renders per object")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="v2",
                    help="named model sizes (v1: the first shipped prior, 7 MB); the options below override fields")
    ap.add_argument("--vae-channels", default=None, help="VAE channels per level, 3 levels (e.g. 32,64,64)")
    ap.add_argument("--vae-layers", type=int, default=None, help="VAE resnet layers per level")
    ap.add_argument("--unet-channels", default=None, help="UNet channels per level (e.g. 64,128,192)")
    ap.add_argument("--unet-layers", type=int, default=None, help="UNet resnet layers per level")
    ap.add_argument("--unet-heads", type=int, default=None, help="attention heads of the UNet's transformers")
    ap.add_argument("--unet-attn-levels", type=int, default=None,
                    help="how many of the lowest-resolution UNet levels have cross-attention")
    ap.add_argument("--text-dim", type=int, default=None, help="text encoder width (= cross-attention dim)")
    ap.add_argument("--text-layers", type=int, default=None, help="text encoder layers")
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--vae-crop-fraction", type=float, default=0.9,
                    help="fraction of the VAE steps on random 32×32 crops (4× cheaper)")
    ap.add_argument("--vae-kl", type=float, default=1e-6, help="weight of the VAE's KL term")
    ap.add_argument("--unet-steps", type=int, default=10000)
    ap.add_argument("--unet-batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="UNet and text encoder learning rate")
    ap.add_argument("--warmup", type=int, default=50, help="UNet learning-rate warm-up steps")
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR-γ of the UNet loss weights")
    ap.add_argument("--fp32-unet", dest="bf16", action="store_false",
                    help="train the UNet and text encoder in fp32 (default: bf16 autocast, about 1.3× faster on a "
                         "CPU with bf16 support; the weights and the optimiser stay fp32)")
    ap.add_argument("--checkpoint-every", type=int, default=250,
                    help="save the resumable state of the VAE and UNet phases every N steps (0: only at the end)")
    ap.add_argument("--eval-every", type=int, default=1000,
                    help="every N UNet steps: held-out loss, classifier accuracy and a sample grid of the EMA "
                         "weights (evals.jsonl, evals/), and a copy of them (ckpt/ema_step*.pt); 0: off")
    ap.add_argument("--eval-images", type=int, default=200, help="held-out images of the evaluations")
    ap.add_argument("--eval-samples", type=int, default=2, help="samples per caption in the evaluation grids")
    ap.add_argument("--classifier-images", type=int, default=400, help="held-out images of the final check")
    ap.add_argument("--samples", type=int, default=6, help="samples per caption in the grids")
    ap.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16: half the size)")
    ap.add_argument("--stop-after", choices=("vae", "unet"), default=None,
                    help="stop after this phase (vae: the VAE report and the latents; unet: no saving)")
    ap.add_argument("--export-only", action="store_true",
                    help="no training: save --out from the UNet checkpoint (its EMA weights), or from the "
                         "--export-step snapshot, then the samples and checks")
    ap.add_argument("--export-step", type=int, default=0, help="with --export-only: the ema_step snapshot to use")
    ap.add_argument("--eval-model", type=Path, default=None,
                    help="no training: only the samples and checks of this diffusers folder (e.g. the shipped "
                         "prior) on this --work's held-out renders")
    ap.add_argument("--relative-distance", type=distance_range, default=None, metavar="A,B",
                    help="render the training set with camera distances U[A, B] / tan(fovy / 2) "
                         "(camera.relative_distance: every object at about the same apparent size) instead of the "
                         "presets' distances 1.5-2")
    ap.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                    help="fine-tune a saved prior (e.g. csd_backend/priors/toy_model): its VAE is kept as it is "
                         "(no VAE phase; its scaling_factor), its UNet and text encoder train on for --unet-steps "
                         "at --lr; the architecture options are ignored")
    ap.add_argument("--variants-per-object", type=int, default=None, metavar="N",
                    help="also train on N variants of every object that no caption names (smaller or larger, "
                         "recoloured; render_dataset.py), captioned only with the empty caption or the negative "
                         "prompt: the prompts' classifier direction then tells the object from ∅ by size and colour")
    ap.add_argument("--variant-kind", choices=sorted(VARIANT_KINDS), default=None,
                    help="with --variants-per-object: what the variants change (default resize-recolour; morph: "
                         "the object's shape blended with another object's, in its own colour; morph-resize: half "
                         "morphs, half resized; blob: the object's shape blended with the starting blob's, rounder "
                         "and larger; morph-blob: half morphs, half blob morphs; morph-blob-recolour: those "
                         "recoloured; morph-blob-sized: those at their object's own apparent size, half recoloured; "
                         "morph-blob-sized-resize: those and resized objects)")
    ap.add_argument("--smoke", action="store_true", help="tiny models and a few steps: checks the pipeline")
    args = ap.parse_args(argv)
    if args.variant_kind and not args.variants_per_object:
        ap.error("--variant-kind says what the variants change: give --variants-per-object N as well")
    if args.smoke:
        args.per_object, args.vae_steps, args.unet_steps, args.samples = 32, 20, 20, 2
        args.arch, args.eval_every, args.eval_images, args.checkpoint_every = "smoke", 20, 8, 10
    for k in ARCH_FIELDS:
        if getattr(args, k) is None:
            setattr(args, k, ARCHS[args.arch][k])
    arch = {k: getattr(args, k) for k in ARCH_FIELDS}
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt_dir = args.work / "ckpt"
    ckpt_dir.mkdir(exist_ok=True)
    log_file = open(args.work / "train.log", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"toy prior: seed {args.seed}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"settings {json.dumps({k: str(v) for k, v in vars(args).items()})}")
    times: Dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. render
    t0 = time.perf_counter()
    rel = args.relative_distance
    cache = args.work / (f"dataset_{args.per_object}_{args.seed}" + (f"_rel{rel[0]}-{rel[1]}" if rel else "") + ".pt")
    if cache.exists():
        data = torch.load(cache)
        log(f"[render] loaded {cache}")
    else:
        data = render_dataset(args.per_object, seed=args.seed, batch=32, log=log, relative_distance=rel)
        torch.save(data, cache)
    save_sheet(data, args.work / "dataset_sheet.png")
    times["render"] = time.perf_counter() - t0
    n = data["images"].shape[0]
    data.setdefault("variant", torch.zeros(n, dtype=torch.bool))  # (a dataset cached before variants existed)
    log(f"[render] {n} images in {times['render']:.1f} s")

    # held-out images for the checks: every 50th render of each object (2 %) is never trained on. (Strided, not
    # the last 2 %: the renderer draws one shading per batch of 32, so a contiguous block would test one or two
    # shadings per object; the first prior's 0.94 was measured that way.)
    held = torch.zeros(n, dtype=torch.bool)
    for oi in range(len(OBJECTS)):
        ids = torch.nonzero(data["object"] == oi).squeeze(-1)
        held[ids[25::50] if len(ids) >= 50 else ids[-1:]] = True
    train_ids = torch.nonzero(~held).squeeze(-1)
    train = {k: v[train_ids] for k, v in data.items()}
    test = {k: v[held] for k, v in data.items()}

    if args.eval_model is not None:  # checks of an existing model only
        t0 = time.perf_counter()
        res = final_checks(args.eval_model, test, args, log)
        log(f"[eval-model] {args.eval_model}: {json.dumps(res)} ({time.perf_counter() - t0:.0f} s)")
        (args.work / "eval_model.json").write_text(json.dumps({"model": str(args.eval_model), **res}, indent=2))
        return 0

    if args.variants_per_object:  # trained on only: the checks are about the captioned objects
        mix, tag = VARIANT_KINDS[args.variant_kind or "resize-recolour"]
        vcache = cache.with_name(cache.stem + f"_{tag}{args.variants_per_object}.pt")
        if vcache.exists():
            variants = torch.load(vcache)
        else:
            variants = render_dataset(args.variants_per_object, seed=args.seed + 1, batch=8, log=log,
                                      relative_distance=rel, variants=True, variant_mix=mix)
            torch.save(variants, vcache)
        save_sheet(variants, args.work / "variants_sheet.png")
        train = {k: torch.cat([v, variants[k]]) for k, v in train.items()}
        log(f"[render] + {len(variants['images'])} variants (unconditional captions only)")

    g = torch.Generator().manual_seed(args.seed)
    tokenizer = build_tokenizer(known_words())
    torch.manual_seed(args.seed)
    if args.init_from is not None:
        models = load_models(args.init_from)
        arch = {"init_from": str(args.init_from)}
    else:
        models = build_models(tokenizer, arch)
    vae, unet, text_encoder, scheduler = models["vae"], models["unet"], models["text_encoder"], models["scheduler"]
    log(f"architecture {json.dumps(arch)}; parameters: vae {n_params(vae):,}, unet {n_params(unet):,}, "
        f"text encoder {n_params(text_encoder):,}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k in UNET_KEYS
                if (v := getattr(args, k)) is not None or k not in OPTIONAL_KEYS}
    vae_settings = {k: settings[k] for k in VAE_KEYS if k in settings}

    # 2. VAE
    t0 = time.perf_counter()
    vae_ckpt = PhaseCheckpoint(ckpt_dir, "vae", vae_settings, args.checkpoint_every, log)
    if args.init_from is None:
        train_vae(vae, train["images"], args.vae_steps, args.vae_batch, args.vae_lr, g, log, args.vae_crop_fraction,
                  args.vae_kl, vae_ckpt)
    vae_rng_after = g.get_state()
    times["vae"] = time.perf_counter() - t0
    rep = vae_report(vae, test["images"])
    log(f"[vae] {times['vae']:.1f} s; held-out PSNR {rep['psnr']:.2f} dB, on edges {rep['psnr_edges']:.2f} dB, "
        f"mean colour shift {rep['colour_shift']:.4f}")
    # 3. latents (cached: they depend on the VAE only)
    t0 = time.perf_counter()
    lat_path = ckpt_dir / "latents.pt"
    lat = torch.load(lat_path) if lat_path.is_file() else None
    if lat is None or lat.get("settings") != vae_settings:
        mean, std = encode_latents(vae, train["images"])
        # a fine-tuned prior keeps its VAE's scale (its UNet was trained on latents of that scale)
        scale = float(vae.config.scaling_factor if args.init_from else 1.0 / mean.std())
        lat = {"mean": mean, "std": std, "scale": scale, "settings": vae_settings}
        torch.save(lat, lat_path)
    scale = lat["scale"]
    vae.register_to_config(scaling_factor=scale)
    mean, std = lat["mean"] * scale, lat["std"] * scale
    test_mean = encode_latents(vae, test["images"])[0] * scale
    times["latents"] = time.perf_counter() - t0
    log(f"[latents] {tuple(mean.shape)}, scaling_factor {scale:.4f}, posterior std {float(std.mean()):.4f}, "
        f"{times['latents']:.1f} s")
    if args.stop_after == "vae":
        save_recon_sheet(vae, test["images"], test["object"], args.work / "vae_recon.png")
        (args.work / "summary_vae.json").write_text(json.dumps({"vae": rep, "parameters": n_params(vae),
                                                                "seconds": times["vae"], "arch": arch}, indent=2))
        return 0

    # 4. UNet + text encoder
    t0 = time.perf_counter()
    ac = scheduler.alphas_cumprod.clone()
    unet_ckpt = PhaseCheckpoint(ckpt_dir, "unet", settings, args.checkpoint_every, log)
    evals_dir = args.work / "evals"

    def evaluate(step: int, u, te) -> dict:
        te0 = time.perf_counter()
        evals_dir.mkdir(exist_ok=True)
        rec = {"step": step, **heldout_loss(u, te, tokenizer, ac, test, test_mean, args.seed + 1)}
        rec.update(caption_accuracy(u, te, tokenizer, ac, test, test_mean, min(args.eval_images, len(test_mean)),
                                    args.seed, details=True))
        if args.eval_samples > 0:
            sample_overview(u, te, tokenizer, vae, scheduler, args.eval_samples, args.seed, evals_dir,
                            prefix=f"samples_step{step:06d}", per_object=False)
        torch.save({"step": step, "unet": {k: v.half() for k, v in u.state_dict().items()},
                    "text_encoder": {k: v.half() for k, v in te.state_dict().items()}},
                   ckpt_dir / f"ema_step{step:06d}.pt")
        rec["seconds"] = time.perf_counter() - te0
        with open(args.work / "evals.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        log(f"  [eval step {step}] held-out eps-MSE {rec['eps_mse']:.4f}, weighted {rec['weighted']:.4f}, "
            f"classifier {rec['accuracy']:.3f} ({rec['images']} images; by shading "
            f"{', '.join(f'{k} {v[0]:.2f}' for k, v in rec['by_shading'].items())}), mug views "
            f"{rec['mug_view_accuracy']:.2f}; "
            f"{rec['seconds']:.0f} s")
        return rec

    if args.export_only:
        if args.export_step:
            snap = torch.load(ckpt_dir / f"ema_step{args.export_step:06d}.pt")
            unet.load_state_dict({k: v.float() for k, v in snap["unet"].items()})
            text_encoder.load_state_dict({k: v.float() for k, v in snap["text_encoder"].items()})
            step = snap["step"]
        else:
            state = unet_ckpt.load()
            if state is None:
                raise SystemExit(f"--export-only: no UNet checkpoint in {ckpt_dir}")
            unet.load_state_dict(state["ema_unet"])
            text_encoder.load_state_dict(state["ema_text_encoder"])
            step = state["step"]
        unet_ema, text_ema = unet.eval(), text_encoder.eval()
        log(f"[export] the EMA weights of UNet step {step}/{args.unet_steps}")
    else:
        if not unet_ckpt.path.is_file():
            g.set_state(vae_rng_after)
        unet_ema, text_ema = train_unet(unet, text_encoder, tokenizer, ac, train, mean, std, args.unet_steps,
                                        args.unet_batch, args.lr, g, log, args.ema_decay, args.snr_gamma,
                                        args.warmup, args.bf16, unet_ckpt, evaluate, args.eval_every)
    times["unet"] = time.perf_counter() - t0
    log(f"[unet] {times['unet']:.1f} s")
    if args.stop_after == "unet":
        return 0

    # 5. save
    t0 = time.perf_counter()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_ema, tokenizer=tokenizer, unet=unet_ema,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if args.out.exists():
        shutil.rmtree(args.out)
    save_dtype = torch.float32 if args.fp32 else torch.float16
    pipe.to(dtype=save_dtype)
    pipe.save_pretrained(args.out, safe_serialization=True)
    make_portable(args.out)
    pipe.to(dtype=torch.float32)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    times["save"] = time.perf_counter() - t0
    log(f"[save] {args.out}: {size / 1e6:.2f} MB ({save_dtype})")

    # 6. samples and checks, from the saved (fp16-rounded) weights through the engine's own loader
    t0 = time.perf_counter()
    checks = final_checks(args.out, test, args, log)
    acc = checks["classifier"]["accuracy"]
    times["samples"] = time.perf_counter() - t0
    log(f"[samples] {args.work / 'samples.png'}; held-out caption accuracy {acc:.3f} "
        f"({checks['classifier']['images']} images, chance {1 / len(OBJECTS):.2f}), mug view accuracy "
        f"{checks['classifier']['mug_view_accuracy']:.2f}, held-out eps-MSE {checks['heldout_loss']['eps_mse']:.4f}, "
        f"VAE PSNR {checks['vae']['psnr']:.2f} dB; {times['samples']:.1f} s")
    total = time.perf_counter() - t_all
    log("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {total:.0f} s "
        f"({total / 60:.1f} min) with {torch.get_num_threads()} thread(s) (this session; resumed phases count "
        f"only their remaining steps)")
    (args.work / "summary.json").write_text(json.dumps({
        "times_s": times, "total_s": total, "threads": torch.get_num_threads(), "size_bytes": size,
        "parameters": {"vae": n_params(vae), "unet": n_params(unet_ema), "text_encoder": n_params(text_ema)},
        "caption_accuracy": acc, "checks": checks, "scaling_factor": scale, "arch": arch,
        "args": {k: str(v) for k, v in vars(args).items()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
