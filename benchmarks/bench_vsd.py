"""VSD (ProlificDreamer) step time split, against CSD in the same run.

    python benchmarks/bench_vsd.py                          # CPU, tiny random SD prior
    python benchmarks/bench_vsd.py --threads 1 --steps 5
    python benchmarks/bench_vsd.py --device cuda --full-size  # SD-2.1-base-shaped random weights, fp16

Each preset runs in a fresh process (so its peak memory is its own) on the same prior weights: ``--warmup`` steps
from step 0, then ``--steps`` measured steps from ``--start-fraction`` of the preset's run (past the warm-up phases:
by default 10 %: CSD's three branches, every preset still rendering albedo only). Columns (medians, milliseconds):

- render: occupancy-grid update + volume render forward;
- encode: VAE encode of the renders (with autograd);
- frozen: the frozen UNet (``predict_noise``: CSD's merged branches, or VSD's ε_y and ε_u in one call);
- lora_fwd: VSD's LoRA UNet forward for ε_lora (no autograd);
- lora_train: the LoRA's training step, forward + backward (``lora_bwd`` of it is the backward);
- backward: the scene's backward (through the VAE encoder and the renderer);
- update: the Adam steps (scene, and the LoRA's AdamW);
- step: the whole step.

The ratio table divides every column by the median step of the baseline preset (``--baseline``, csd-coarse) of the
same invocation, so numbers from machines of different speed compare. Peak memory: the CUDA peak allocated during the
preset, or on the CPU the process's peak resident set (the process only runs that preset).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

COLUMNS = ["render", "encode", "frozen", "lora_fwd", "lora_train", "lora_bwd", "backward", "update", "step"]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_prior(args):
    from csd_backend.priors.stable_diffusion import load_stable_diffusion

    if args.full_size:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from full_size_sd import build_sd21_base_prior

        return build_sd21_base_prior(args.device, args.dtype)
    return load_stable_diffusion(args.model, device=args.device, dtype=args.dtype)


def timed(fn, device, sink: list):
    def wrapper(*a, **kw):
        sync(device)
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        sync(device)
        sink.append(time.perf_counter() - t0)
        return out

    return wrapper


def measure(name: str, args) -> dict:
    """Median times of one preset (run in this process)."""
    from csd_backend.optimize import Optimization
    from csd_backend.presets import get_preset

    prior = load_prior(args)
    cfg = get_preset(name).replace(guidance={"prompt": "a DSLR photo of a corgi"}, prior={"model": "bench"},
                                   optim={"checkpoint_every": 0},
                                   camera={"batch_size": args.batch} if args.batch else {})
    prior.resolution = cfg.prior.resolution or min(prior.resolution, cfg.prior.max_resolution or prior.resolution)
    if prior.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(prior.device)
    opt = Optimization(cfg, prior)
    opt.profile = True
    vsd = opt.guidance.vsd
    if vsd is not None:
        vsd.profile = True
    enc, frozen, lora_step = [], [], []
    prior.encode_images = timed(prior.encode_images, prior.device, enc)
    prior.predict_noise = timed(prior.predict_noise, prior.device, frozen)
    if vsd is not None:
        vsd.step = timed(vsd.step, prior.device, lora_step)
    rows = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            opt.step = max(opt.step, int(args.start_fraction * cfg.optim.steps))
        for sink in (enc, frozen, lora_step):
            sink.clear()
        opt.timings.clear()
        if vsd is not None:
            vsd.timings.clear()
        info = opt.train_step()
        if i < args.warmup:
            continue
        t, v = opt.timings, (vsd.timings if vsd is not None else {})
        rows.append({
            "render": t.get("grid", 0.0) + t.get("render", 0.0), "encode": sum(enc), "frozen": sum(frozen),
            "lora_fwd": v.get("lora_forward", 0.0),
            "lora_train": v.get("lora_train_forward", 0.0) + v.get("lora_backward", 0.0),
            "lora_bwd": v.get("lora_backward", 0.0), "backward": t.get("backward", 0.0),
            "update": t.get("optimizer", 0.0), "step": info.seconds,
        })
    med = {k: statistics.median(r[k] for r in rows) for k in COLUMNS}
    if prior.device.type == "cuda":
        med["peak_mib"] = torch.cuda.max_memory_allocated(prior.device) / 2**20
    else:
        import resource

        med["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    batch, height, _ = cfg.camera.size_at(opt.step)  # the phase the timed steps ran in
    med.update(batch=batch, samples=cfg.render.num_samples_per_ray, size=height,
               prior_res=prior.resolution, threads=torch.get_num_threads(), total_steps=cfg.optim.steps,
               dtype=str(prior.unet_dtype).removeprefix("torch."), device=str(prior.device))
    if vsd is not None:
        med["lora_params"] = sum(p.numel() for p in vsd.parameters())
    return med


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="vsd-preview-cpu,vsd-prolificdreamer")
    p.add_argument("--baseline", default="csd-coarse", help="the preset every time is divided by (its median step)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--full-size", action="store_true", help="SD-2.1-base-shaped random weights")
    p.add_argument("--model", default=None, help="a diffusers folder (default: the tests' tiny random SD, built)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--start-fraction", type=float, default=0.1,
                   help="where the measured steps start, as a fraction of each preset's run (default 0.1: CSD's "
                        "three branches, every preset still rendering albedo only, so the render cost compares)")
    p.add_argument("--batch", type=int, default=None, help="camera batch size for every preset (default: each "
                                                           "preset's own: csd-coarse 4, the VSD presets 1)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one preset, print JSON
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args)), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as d:
        if args.model is None and not args.full_size:
            from tiny_sd import build_tiny_sd

            args.model = str(build_tiny_sd(Path(d))["folder"])
        names = [args.baseline] + [n for n in args.presets.split(",") if n and n != args.baseline]
        results = {}
        for name in names:
            cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--dtype", args.dtype,
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--start-fraction", str(args.start_fraction)] + (["--batch", str(args.batch)] if args.batch else [])
            cmd += ["--full-size"] if args.full_size else ["--model", args.model]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{name}: the measuring process failed (exit status {out.returncode}; -9: killed, "
                                 f"e.g. out of memory)")
            results[name] = json.loads(line[len("RESULT "):])
            print(f"measured {name}", file=sys.stderr, flush=True)
    first = results[names[0]]
    print(f"device {first['device']}, dtype {first['dtype']}, torch threads {first['threads']} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), {'SD-2.1-base-shaped' if args.full_size else 'tiny'} "
          f"prior at {first['prior_res']} px; {args.steps} measured steps after {args.warmup} warm-up, from "
          f"{args.start_fraction:.0%} of each run")
    head = f"{'preset':<22}{'batch':>6}{'spp':>5}" + "".join(f"{c:>11}" for c in COLUMNS) + f"{'peak MiB':>10}"
    print("\nmilliseconds (medians)")
    print(head)
    for name in names:
        r = results[name]
        print(f"{name:<22}{r['batch']:>6}{r['samples']:>5}" + "".join(f"{r[c] * 1000:>11.1f}" for c in COLUMNS)
              + f"{r['peak_mib']:>10.0f}")
    base = results[args.baseline]["step"]
    print(f"\nratios to the median {args.baseline} step of this run ({base * 1000:.1f} ms)")
    print(head[:-10])
    for name in names:
        r = results[name]
        print(f"{name:<22}{r['batch']:>6}{r['samples']:>5}" + "".join(f"{r[c] / base:>11.3f}" for c in COLUMNS))
    for name in names:
        r = results[name]
        if "lora_params" in r:
            print(f"{name}: LoRA + camera embedding {r['lora_params']:,} parameters; whole run "
                  f"{r['total_steps']} steps ≈ {r['step'] * r['total_steps'] / 60:.1f} min at this step time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
