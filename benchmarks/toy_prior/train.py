"""Train the toy prior: a small Stable-Diffusion-shaped latent diffusion model of the five toy objects.

    python benchmarks/toy_prior/train.py --out csd_backend/priors/toy_model --work runs/toy_prior
    python benchmarks/toy_prior/train.py --smoke --out /tmp/toy_smoke --work /tmp/toy_smoke_work   # 1-minute check

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
   ``samples.png``; and a check that the model recognises the objects: for held-out renders, the caption with the
   lowest denoising error ("diffusion classifier") should be the right one.

Deterministic from ``--seed`` for a given torch version and thread count (``--threads``, default 1: on a
shared 2-core machine a second OpenMP thread often makes small models slower, not faster).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parents[1], _HERE.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from toy_prior.objects import OBJECTS  # noqa: E402
from toy_prior.render_dataset import IMAGE_SIZE, render_dataset, save_sheet  # noqa: E402

# ------------------------------------------------------------------------------------------------ settings
TEXT_DIM = 64
MAX_LENGTH = 32
#: the thresholds (front, back) of the presets: 30° for the CSD presets, 45° for sds-dreamfusion
VIEW_THRESHOLDS = (30.0, 45.0)
OVERHEAD_THRESHOLD = 60.0
CAPTION_MIX = {"view": 0.65, "plain": 0.15, "empty": 0.15, "negative": 0.05}
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
    kinds, probs = zip(*CAPTION_MIX.items())
    pick = torch.multinomial(torch.tensor(probs), len(idx), replacement=True, generator=g)
    thr = torch.randint(0, len(VIEW_THRESHOLDS), (len(idx),), generator=g)
    return [caption_for(int(data["object"][i]), float(data["elevation"][i]), float(data["azimuth"][i]),
                        kinds[int(k)], VIEW_THRESHOLDS[int(t)]) for i, k, t in zip(idx.tolist(), pick, thr)]


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
def build_models(tokenizer, arch: str = "full"):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    small = arch == "smoke"
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16) if small else (16, 32, 64), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=IMAGE_SIZE, mid_block_add_attention=False,
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4,
        block_out_channels=(16, 32, 32) if small else (32, 64, 96), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=2, norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, scheduler=scheduler)


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


# ---------------------------------------------------------------------------------------------------- VAE
def train_vae(vae, images: torch.Tensor, steps: int, batch: int, lr: float, g: torch.Generator, log,
              crop_fraction: float = 0.85) -> None:
    """L1 + 1e-6·KL. The first ``crop_fraction`` of the steps train on random 32×32 crops (4× cheaper; the
    network is convolutional), the rest on whole images (GroupNorm statistics of the full size). The log-variance
    starts at −12 with zero weights (posterior std ≈ 0.0025): the VAE trains as a plain autoencoder from the first
    step instead of first learning to shrink a unit-variance posterior (diffusers' deep, GroupNorm-heavy VAE
    learns slowly; these two changes took a 64-px VAE from ~16 dB to ~23 dB in a few minutes on this CPU)."""
    with torch.no_grad():
        c = vae.config.latent_channels
        vae.quant_conv.weight[c:] = 0
        vae.quant_conv.bias[c:] = -12.0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    crop_steps = int(steps * crop_fraction)
    vae.train()
    n = images.shape[0]
    perm, pos = torch.randperm(n, generator=g), 0
    t0, acc = time.perf_counter(), []
    for step in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        x = to_unit(images[perm[pos:pos + batch]])
        pos += batch
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
        loss = l1 + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc.append(float(l1.detach()))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"  vae step {step + 1}/{steps}: L1 {sum(acc) / len(acc):.4f} ({time.perf_counter() - t0:.0f} s)")
            acc = []
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
def vae_psnr(vae, images: torch.Tensor) -> float:
    x = to_unit(images)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).mean()
    return float(10 * torch.log10(1 / mse))


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
               g: torch.Generator, log, ema_decay: float = 0.995, snr_gamma: float = 5.0):
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema = {"unet": copy.deepcopy(unet).eval(), "text_encoder": copy.deepcopy(text_encoder).eval()}
    for m in ema.values():
        m.requires_grad_(False)
    pairs = [(ema["unet"], unet), (ema["text_encoder"], text_encoder)]
    cache = TextCache(tokenizer)
    unet.train()
    text_encoder.train()
    n = mean.shape[0]
    perm, pos = torch.randperm(n, generator=g), 0
    t0, acc = time.perf_counter(), []
    ac = alphas_cumprod
    for step in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + batch]
        pos += batch
        captions = draw_captions(data, idx, g)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, ac.shape[0], (batch,), generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        emb = encode_captions(text_encoder, cache, captions)
        pred = unet(zt, t, encoder_hidden_states=emb).sample
        snr = ac[t] / (1 - ac[t])
        w = torch.clamp(snr, max=snr_gamma) / snr  # Min-SNR-γ weights for ε-prediction
        loss = (w * (pred - noise).pow(2).mean((1, 2, 3))).mean()
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
            el = time.perf_counter() - t0
            log(f"  unet step {step + 1}/{steps}: loss {sum(acc) / len(acc):.4f} ({el:.0f} s, "
                f"eta {el / (step + 1) * (steps - step - 1):.0f} s)")
            acc = []
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


@torch.no_grad()
def caption_accuracy(unet, text_encoder, tokenizer, alphas_cumprod, data, mean, n_images: int, seed: int):
    """Diffusion-classifier check on renders: for each image, the denoising error of every object's view caption
    at the same noise; the object whose caption gives the lowest error is the prediction. Returns the accuracy."""
    from csd_backend.prompts import directional_prompt

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(mean.shape[0], generator=g)[:n_images]
    cache = TextCache(tokenizer)
    ts = torch.tensor([100, 250, 400, 550, 700, 850])
    correct = 0
    for i in idx.tolist():
        label = caption_for(0, float(data["elevation"][i]), float(data["azimuth"][i]), "view", 30.0).split(", ")[-1]
        caps = [directional_prompt(o.prompt, label.replace(" view", "")) for o in OBJECTS]
        emb = encode_captions(text_encoder, cache, caps)  # [K, L, D]
        err = torch.zeros(len(OBJECTS))
        for t in ts:
            noise = torch.randn(1, *mean.shape[1:], generator=g)
            a = alphas_cumprod[t]
            zt = a.sqrt() * mean[i:i + 1] + (1 - a).sqrt() * noise
            pred = unet(zt.expand(len(caps), -1, -1, -1), t.expand(len(caps)), encoder_hidden_states=emb).sample
            err += (pred - noise).pow(2).mean((1, 2, 3))
        correct += int(int(err.argmin()) == int(data["object"][i]))
    return correct / len(idx)


# ----------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the diffusers folder to write (replaced if it exists)")
    ap.add_argument("--work", type=Path, required=True, help="folder for the dataset cache, samples and log")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-object", type=int, default=1600, help="renders per object")
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--unet-steps", type=int, default=1400)
    ap.add_argument("--unet-batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="UNet and text encoder learning rate")
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--samples", type=int, default=6, help="samples per caption in the grids")
    ap.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16: half the size)")
    ap.add_argument("--smoke", action="store_true", help="tiny models and a few steps: checks the pipeline")
    args = ap.parse_args(argv)
    if args.smoke:
        args.per_object, args.vae_steps, args.unet_steps, args.samples = 32, 20, 20, 2
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
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
    cache = args.work / f"dataset_{args.per_object}_{args.seed}.pt"
    if cache.exists():
        data = torch.load(cache)
        log(f"[render] loaded {cache}")
    else:
        data = render_dataset(args.per_object, seed=args.seed, batch=32, log=log)
        torch.save(data, cache)
    save_sheet(data, args.work / "dataset_sheet.png")
    times["render"] = time.perf_counter() - t0
    n = data["images"].shape[0]
    log(f"[render] {n} images in {times['render']:.1f} s")

    # held-out images for the checks (the last 2 % of each object's renders are never trained on)
    held = torch.zeros(n, dtype=torch.bool)
    for oi in range(len(OBJECTS)):
        ids = torch.nonzero(data["object"] == oi).squeeze(-1)
        held[ids[-max(1, len(ids) // 50):]] = True
    train_ids = torch.nonzero(~held).squeeze(-1)
    train = {k: v[train_ids] for k, v in data.items()}
    test = {k: v[held] for k, v in data.items()}

    g = torch.Generator().manual_seed(args.seed)
    tokenizer = build_tokenizer(known_words())
    torch.manual_seed(args.seed)
    models = build_models(tokenizer, "smoke" if args.smoke else "full")
    vae, unet, text_encoder, scheduler = models["vae"], models["unet"], models["text_encoder"], models["scheduler"]
    log(f"parameters: vae {n_params(vae):,}, unet {n_params(unet):,}, text encoder {n_params(text_encoder):,}")

    # 2. VAE
    t0 = time.perf_counter()
    train_vae(vae, train["images"], args.vae_steps, args.vae_batch, args.vae_lr, g, log)
    times["vae"] = time.perf_counter() - t0
    log(f"[vae] {times['vae']:.1f} s; held-out PSNR {vae_psnr(vae, test['images']):.2f} dB")

    # 3. latents
    t0 = time.perf_counter()
    mean, std = encode_latents(vae, train["images"])
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    mean, std = mean * scale, std * scale
    test_mean = encode_latents(vae, test["images"])[0] * scale
    times["latents"] = time.perf_counter() - t0
    log(f"[latents] {tuple(mean.shape)}, scaling_factor {scale:.4f}, posterior std {float(std.mean()):.4f}, "
        f"{times['latents']:.1f} s")

    # 4. UNet + text encoder
    t0 = time.perf_counter()
    ac = scheduler.alphas_cumprod.clone()
    unet_ema, text_ema = train_unet(unet, text_encoder, tokenizer, ac, train, mean, std, args.unet_steps,
                                    args.unet_batch, args.lr, g, log)
    times["unet"] = time.perf_counter() - t0
    log(f"[unet] {times['unet']:.1f} s")

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
    from csd_backend.priors.stable_diffusion import load_stable_diffusion

    prior = load_stable_diffusion(args.out, device="cpu", dtype="float32")
    u, te, tk, vv = prior.unet, prior.text_encoder, prior.tokenizer, prior.vae
    from csd_backend.prompts import directional_prompt

    overview, labels = [], []
    for o in OBJECTS:
        caps = [o.prompt] + [directional_prompt(o.prompt, v) for v in VIEWS]
        imgs = sample(u, te, tk, vv, prior.scheduler, caps, args.samples, args.seed)
        save_grid(imgs, caps, args.work / f"samples_{o.name}.png")
        overview.append(imgs)
        labels += caps
    imgs = sample(u, te, tk, vv, prior.scheduler, [""], args.samples, args.seed)
    overview.append(imgs)
    labels.append("")
    save_grid(torch.cat(overview), labels, args.work / "samples.png")
    acc = caption_accuracy(u, te, tk, prior.alphas_cumprod, test, test_mean, min(100, len(test_mean)), args.seed)
    times["samples"] = time.perf_counter() - t0
    log(f"[samples] {args.work / 'samples.png'}; held-out caption accuracy {acc:.2f} (chance "
        f"{1 / len(OBJECTS):.2f}); {times['samples']:.1f} s")
    total = time.perf_counter() - t_all
    log("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {total:.0f} s "
        f"({total / 60:.1f} min) with {torch.get_num_threads()} thread(s)")
    (args.work / "summary.json").write_text(json.dumps({
        "times_s": times, "total_s": total, "threads": torch.get_num_threads(), "size_bytes": size,
        "parameters": {"vae": n_params(vae), "unet": n_params(unet), "text_encoder": n_params(text_encoder)},
        "caption_accuracy": acc, "scaling_factor": scale, "args": {k: str(v) for k, v in vars(args).items()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
