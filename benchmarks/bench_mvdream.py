"""Step time and memory of the CSD-MVDream run at the official sizes (issue 24), with random weights.

    python benchmarks/bench_mvdream.py                         # CPU, full-size random MVDream (SD-2.1-base-shaped)
    python benchmarks/bench_mvdream.py --device cuda --dtype float16   # a GPU (gpu_check.sh runs this)
    python benchmarks/bench_mvdream.py --tiny --steps 1        # the tests' tiny MVDream (a quick check of the script)

``--prior-only`` times what MVDream itself costs at the same sizes: the guidance on random renders (VAE encode,
the UNet call, the direction) and the backward to the renders, without the scene (on a 23 GB CPU machine the whole
full-size step at 8 renders does not fit: the renders' analytic normals and the VAE backward come on top of 5.2 GB
of fp32 weights).

The prior is MVDream's architecture (SD 2.1-base's UNet with the camera MLP and multi-view attention, its VAE, the
23-layer OpenCLIP ViT-H text tower) with seeded random weights: ``--full-size`` numbers cost what the real model
costs. The preset (``csd-mvdream``) runs its two phases: steps 0–4999 render 8 images (2 objects of 4 views) at 64²,
steps 5000–9999 4 images (1 object) at 256², each upsampled to 256² for the VAE. For each phase the script trains
``--warmup`` steps from that phase's first step, then times ``--steps`` steps (median), the UNet forward of the
same batch alone (the floor: 2 branches, positive and negative, of the batch), and reads the peak memory
(max_memory_allocated on CUDA; the process's peak RSS on a CPU). The projection holds each measured step time from
its phase's first step to the next one's: 5000·(phase 1 step) + 5000·(phase 2 step) for csd-mvdream. The scene is the
preset's initial volume (the density blob) with its occupancy grid brought up to date first, as a run's grid is; a
trained object may occupy more or less of the box than the blob.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from csd_backend.optimize import Optimization  # noqa: E402
from csd_backend.presets import get_preset  # noqa: E402


def full_size_prior(device: str, dtype: str):
    """An ``MVDreamPrior`` with MVDream-shaped random weights (SD 2.1-base + the camera MLP, 256² native)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from csd_backend.priors.mvdream import MVDreamPrior
    from full_size_sd import SCHEDULER, TEXT, UNET, VAE, build_sd21_base_components  # noqa: F401
    from tiny_sd import _build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**UNET, "sample_size": 32, "class_embed_type": "projection",
                                   "projection_class_embeddings_input_dim": 16})
    vae = AutoencoderKL(**{**VAE, "sample_size": 256})
    text = CLIPTextModel(CLIPTextConfig(**TEXT))
    tokenizer, _ = _build_tokenizer(Path(tempfile.mkdtemp()))
    tokenizer.model_max_length = 77
    from diffusers import DDIMScheduler

    return MVDreamPrior.from_components(unet, vae, text, tokenizer, DDIMScheduler(**SCHEDULER), device=device,
                                        dtype=dtype, source="random MVDream-shaped")


def tiny_prior(device: str, dtype: str, workdir: Path):
    from csd_backend.priors.mvdream_loader import load_mvdream
    from tiny_mvdream import build_tiny_mvdream

    tiny = build_tiny_mvdream(workdir)
    return load_mvdream(tiny["checkpoint"], device=device, dtype=dtype, config=tiny["tokenizer_folder"])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@contextlib.contextmanager
def timed_unet(prior):
    """While inside: every ``prior.predict_noise`` call is timed (synchronised) into the yielded list as
    ``(seconds, z_t shape, keyword arguments)``."""
    predict = prior.predict_noise
    calls = []

    def timed(z_t, t, emb, **kw):
        sync(prior.device)
        t0 = time.perf_counter()
        out = predict(z_t, t, emb, **kw)
        sync(prior.device)
        calls.append((time.perf_counter() - t0, z_t.shape, kw))
        return out

    prior.predict_noise = timed
    try:
        yield calls
    finally:
        prior.predict_noise = predict


def bench_phase(prior, cfg, start: int, args) -> dict:
    """Median step and UNet floor of ``--steps`` steps after ``--warmup`` steps, all from step ``start``."""
    if prior.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(prior.device)
    opt = Optimization(cfg, prior)
    opt.step = start
    # the occupancy grid as a run has it by then: every cell evaluated against the scene (the first 256 steps' rule);
    # a fresh grid marks every cell occupied, and a run at step 5000 would not render the blob's empty space
    opt.renderer.update_grid(0, opt.scene.volume, opt.generator)
    steps, unet = [], []
    with timed_unet(prior) as calls:
        for i in range(args.warmup + args.steps):
            calls.clear()
            sync(prior.device)
            t0 = time.perf_counter()
            info = opt.train_step()
            sync(prior.device)
            if i >= args.warmup:
                steps.append(time.perf_counter() - t0)
                unet.append(sum(c[0] for c in calls))
            print(f"  step {opt.step - 1}: {time.perf_counter() - t0:.2f} s, shading {info.shading}, "
                  f"{info.num_samples} samples", flush=True)
    _, shape, kw = calls[-1]
    z = torch.randn(*shape, device=prior.device)
    t = torch.full((shape[0],), 500, device=prior.device, dtype=torch.long)
    emb = prior.encode_text([str(i) for i in range(shape[0])])
    floor = []
    for _ in range(max(1, args.steps)):
        sync(prior.device)
        t0 = time.perf_counter()
        prior.predict_noise(z, t, emb, **kw)
        sync(prior.device)
        floor.append(time.perf_counter() - t0)
    batch, height, width = cfg.camera.size_at(start)
    return dict(batch=batch, size=f"{height}x{width}", unet_batch=shape[0], latent=f"{shape[-2]}x{shape[-1]}",
                step=statistics.median(steps), unet=statistics.median(unet), floor=statistics.median(floor),
                peak=peak_gb(prior.device))


def bench_prior_phase(prior, cfg, start: int, args) -> dict:
    """The prior's share of a step at the phase's sizes, without the scene: random renders ``[B, H, W, 3]`` through
    the guidance (VAE encode at the prior's input size, the batched UNet call of both branches with the cameras of
    whole objects, the direction) and the backward to the renders (the VAE encoder's backward)."""
    from csd_backend.guidance import ScoreDistillation
    from csd_backend.render.cameras import sample_cameras

    if prior.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(prior.device)
    guidance = ScoreDistillation(cfg.guidance, prior, optim=cfg.optim)
    g = torch.Generator().manual_seed(0)
    batch, height, width = cfg.camera.size_at(start)
    steps, unet = [], []
    with timed_unet(prior) as calls:
        for i in range(args.warmup + args.steps):
            cams = sample_cameras(cfg.camera, start + i, g)
            images = torch.rand(batch, height, width, 3, generator=g).to(prior.device).requires_grad_(True)
            calls.clear()
            sync(prior.device)
            t0 = time.perf_counter()
            out = guidance(images, cams.elevation, cams.azimuth, start + i, generator=g, c2w=cams.c2w,
                           n_views=cfg.camera.n_views)
            out.loss.backward()
            sync(prior.device)
            if i >= args.warmup:
                steps.append(time.perf_counter() - t0)
                unet.append(sum(c[0] for c in calls))
            print(f"  prior step {start + i}: {time.perf_counter() - t0:.2f} s (UNet {calls[-1][0]:.2f} s)", flush=True)
    _, shape, _ = calls[-1]
    return dict(batch=batch, size=f"{height}x{width}", unet_batch=shape[0], latent=f"{shape[-2]}x{shape[-1]}",
                step=statistics.median(steps), unet=statistics.median(unet), floor=statistics.median(unet),
                peak=peak_gb(prior.device))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="csd-mvdream")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny MVDream instead of full-size weights")
    p.add_argument("--steps", type=int, default=1, help="measured steps per phase (median)")
    p.add_argument("--warmup", type=int, default=1, help="steps per phase before the measured ones")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--phases", default="0,5000", help="the first step of each phase to measure")
    p.add_argument("--prior-only", action="store_true",
                   help="time the prior's share of a step (guidance on random renders + the backward to them), "
                        "without the scene: what MVDream itself costs at the phase's sizes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. render.num_samples_per_ray=256 (repeatable)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_step import overrides

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        prior = tiny_prior(args.device, args.dtype, Path(d)) if args.tiny else full_size_prior(args.device, args.dtype)
        n = sum(p.numel() for p in prior.unet.parameters()) / 1e6
        print(f"MVDream prior ({'tiny' if args.tiny else 'full-size random'}, UNet {n:.1f} M parameters) built in "
              f"{time.perf_counter() - t0:.1f} s; device {prior.device}, dtype {prior.unet_dtype}, torch threads "
              f"{torch.get_num_threads()}", flush=True)
        cfg = get_preset(args.preset).replace(guidance={"prompt": "an astronaut riding a horse"},
                                              prior={"model": "bench"}, optim={"checkpoint_every": 0})
        cfg = cfg.replace(**overrides(args.set, "preset"))
        rows = []
        for start in (int(s) for s in args.phases.split(",")):
            print(f"phase from step {start}:", flush=True)
            rows.append((bench_prior_phase if args.prior_only else bench_phase)(prior, cfg, start, args))
        what = "the prior's share of a step (guidance + backward to the renders)" if args.prior_only else "whole steps"
        print(f"\n{args.preset} on {prior.device} ({prior.unet_dtype}), prior input {prior.resolution}², {what}")
        print(f"{'phase':<8}{'renders':>12}{'UNet batch':>12}{'latent':>8}{'step s':>9}{'UNet s':>9}{'floor s':>9}"
              f"{'step/floor':>12}{'peak GB':>9}")
        for start, r in zip(args.phases.split(","), rows):
            print(f"{start:<8}{str(r['batch']) + ' x ' + r['size']:>12}{r['unet_batch']:>12}{r['latent']:>8}"
                  f"{r['step']:>9.2f}{r['unet']:>9.2f}{r['floor']:>9.2f}{r['step'] / r['floor']:>12.2f}"
                  f"{r['peak']:>9.2f}")
        starts = [int(x) for x in args.phases.split(",")]
        ends = starts[1:] + [cfg.optim.steps]  # each measured step time holds until the next measured start
        total = sum(max(0, e - b) * r["step"] for b, e, r in zip(starts, ends, rows))
        share = " (the prior's share)" if args.prior_only else ""
        spans = ", ".join(f"{b}-{e - 1}" for b, e in zip(starts, ends))
        print(f"projected {cfg.optim.steps} steps (steps {spans} at the measured times){share}: {total / 3600:.2f} h")


if __name__ == "__main__":
    main()
