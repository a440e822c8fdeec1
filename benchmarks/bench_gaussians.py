"""Gaussian splats against the volume at the same render size and batch (issue 25's measurements), in one run: the
step-time split (grid: the volume's occupancy-grid update; render; prior = VAE encode + UNet; backward; optimiser;
densify: the splats' density control and position-lr decay), the number of Gaussians over the run, and memory.

    python benchmarks/bench_gaussians.py --threads 1          # CPU: the toy prior, gaussian-preview-cpu vs preview-cpu
    python benchmarks/bench_gaussians.py --device cuda --full-size --dtype float16 \\
        --presets csd-gaussian,csd-coarse --size 128 --steps 100 --backends torch,auto     # a GPU (gpu_check.sh)

Every preset runs a fresh run of ``--steps`` steps (default: the first preset's own length; the schedules are
stretched to it) at ``--size``² renders and batch ``--batch`` (the preset's cameras otherwise), with the phases timed
by the loop itself (``Optimization.profile``: a device sync after each phase; medians, but means for the phases that
run every few steps: the grid update and densification). ``--backends`` runs a Gaussian
preset once per splatting backend (torch: the pure-PyTorch splatter; auto: gsplat on CUDA when it works); a volume
preset runs once. Prints medians in milliseconds, the mean step, the Gaussians at a few points of the run and the
peak memory (CUDA: allocated during that run; CPU: the process's peak resident memory so far).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests", ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_step import overrides, peak_gb, reset_peak, sync  # noqa: E402
from csd_backend.optimize import Optimization  # noqa: E402
from csd_backend.presets import get_preset  # noqa: E402

PHASES = ("grid", "render", "prior", "backward", "optimizer", "densify")
PERIODIC = ("grid", "densify")
PROMPT = "a green cone"  # the toy prior knows it; any text for the random-weight models


def build_prior(args, workdir: Path):
    """The toy prior (default), a tiny random SD (``--tiny``, the dry run) or SD-2.1-base-shaped random weights
    (``--full-size``)."""
    if args.full_size:
        from full_size_sd import build_sd21_base_prior

        return build_sd21_base_prior(args.device, args.dtype)
    from csd_backend.config import PriorConfig
    from csd_backend.priors import load_prior

    model = args.model
    if args.tiny:
        from tiny_sd import build_tiny_sd

        model = str(build_tiny_sd(workdir)["folder"])
    return load_prior(PriorConfig(model=model, device=args.device, dtype=args.dtype))


def run_preset(name: str, backend: str, prior, args, steps: int) -> dict:
    cfg = get_preset(name).with_steps(steps)
    over = overrides(args.set, "preset")
    over.setdefault("guidance", {})["prompt"] = PROMPT
    over.setdefault("camera", {}).update(height=args.size, width=args.size, batch_size=args.batch,
                                         resolution_milestones=[])
    over.setdefault("optim", {}).update(checkpoint_every=0, preview_every=0)
    if cfg.scene.kind == "gaussians" and backend != "preset":
        over.setdefault("scene", {}).setdefault("gaussians", {})["backend"] = backend
    cfg = cfg.replace(**over)
    prior.resolution = cfg.prior.resolution or prior.resolution
    reset_peak(prior.device)
    opt = Optimization(cfg, prior)
    opt.profile = True
    marks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps})
    counts, rows = {}, []
    sync(prior.device)
    t0 = time.perf_counter()
    for i in range(steps):
        if i in marks and opt.scene.kind == "gaussians":
            counts[i] = opt.scene.num_gaussians
        opt.timings.clear()
        info = opt.train_step()
        rows.append({**{k: opt.timings.get(k, 0.0) for k in PHASES}, "step": info.seconds})
    sync(prior.device)
    total = time.perf_counter() - t0
    if opt.scene.kind == "gaussians":
        counts[steps] = opt.scene.num_gaussians
    opt.check_finite()
    measured = rows[1:] or rows  # the first step aside
    # medians, but the means of the periodic phases (the occupancy grid, densification): their median is 0
    med = {k: (statistics.mean if k in PERIODIC else statistics.median)(r[k] for r in measured)
           for k in (*PHASES, "step")}
    resolved = getattr(opt.renderer, "resolved_backends", {})  # a property
    return {"preset": name, "kind": opt.scene.kind, "backend": resolved.get("scene.gaussians.backend", "-"),
            "median": med, "mean_step": total / steps, "first": rows[0]["step"], "counts": counts,
            "peak_gb": peak_gb(prior.device), "total_s": total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="gaussian-preview-cpu,preview-cpu")
    p.add_argument("--model", default="toy", help="the prior (default: the toy prior shipped with the pack)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Stable Diffusion (the dry run)")
    p.add_argument("--full-size", action="store_true", help="SD-2.1-base-shaped random weights (needs a GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--size", type=int, default=64, help="render width and height for every preset")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="steps of every run (default: the first preset's)")
    p.add_argument("--backends", default="preset", help="splatting backends of the Gaussian presets: preset "
                                                        "(the preset's, auto), torch, auto, gsplat")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.presets.split(",")
    steps = args.steps or get_preset(names[0]).optim.steps
    with tempfile.TemporaryDirectory() as d:
        prior = build_prior(args, Path(d))
        print(f"device {prior.device}, prior {type(prior).__name__} @{prior.resolution}, torch threads "
              f"{torch.get_num_threads()}, {steps} steps, {args.size}² renders, batch {args.batch}")
        print(f"{'preset':<22}{'kind':>10}{'backend':>9}" + "".join(f"{c:>10}" for c in (*PHASES, "step"))
              + f"{'mean':>10}{'first s':>9}{'peak GB':>9}{'run min':>9}  Gaussians at steps")
        for name in names:
            kinds = args.backends.split(",") if get_preset(name).scene.kind == "gaussians" else ["preset"]
            for backend in kinds:
                r = run_preset(name, backend, prior, args, steps)
                m = r["median"]
                counts = ", ".join(f"{k}: {v}" for k, v in sorted(r["counts"].items())) or "-"
                print(f"{name:<22}{r['kind']:>10}{r['backend']:>9}"
                      + "".join(f"{m[c] * 1000:>9.1f}m" for c in (*PHASES, "step"))
                      + f"{r['mean_step'] * 1000:>9.1f}m{r['first']:>9.1f}{r['peak_gb']:>9.2f}"
                      + f"{r['mean_step'] * get_preset(name).optim.steps / 60:>9.2f}  {counts}", flush=True)
    print("(milliseconds: medians over the steps after the first, means for grid and densify, which run every few "
          "steps; 'mean' includes every step and its syncs; "
          "'first s' = the first step in seconds; 'peak GB' = CUDA memory allocated during that run, on the CPU the "
          "process's peak resident memory so far; 'run min' = the mean step × the preset's own steps, the "
          "training time of its run in minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
