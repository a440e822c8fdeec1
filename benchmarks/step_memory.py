"""Memory and work per step over a run: does a step grow (a cache, a list), or does it follow its sample count?

    python benchmarks/step_memory.py                                   # csd-coarse, batch 4, torch, tiny SD prior
    python benchmarks/step_memory.py --backend compiled --warmup 3 --steps 4
    python benchmarks/step_memory.py --preset preview-cpu --warmup 2 --steps 2

Trains ``--warmup`` steps from step 0, then jumps to ``--start-step`` (past the warm-up phases: normal renders, all
guidance branches) and trains ``--steps`` more, printing for every step its seconds, the packed samples (and per
view), the occupied share of the occupancy grid, the process's resident memory now and at its peak so far
(Linux ``VmRSS`` / ``VmHWM``), and the number of Python objects the garbage collector tracks. A step that grows
without more samples, or memory and objects that climb between steps, would be a leak; memory that follows the
sample count is the work itself. The prior is the tests' tiny random-weight SD, so the renderer and the hash grid
dominate, as on a CPU run with any prior at 64² renders.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_step import bench_config  # noqa: E402
from csd_backend.optimize import Optimization  # noqa: E402


def memory_gb() -> tuple:
    """(resident, peak resident) of this process in GiB (Linux)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                fields[line.split(":")[0]] = int(line.split()[1]) / 2**20
    return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))


def report(opt: Optimization, label: str, seconds: float, samples: int) -> None:
    views = opt.config.camera.size_at(opt.step)[0] * opt.config.camera.n_views
    occupied = float(opt.renderer.grid.binaries.float().mean()) if hasattr(opt.renderer, "grid") else float("nan")
    rss, peak = memory_gb()
    print(f"{label} {opt.step:>6}: {seconds:6.1f} s, {samples:>8} samples ({samples // views:>7} a view), occupied "
          f"{occupied:.3f}, RSS {rss:5.2f} GB (peak {peak:5.2f}), Python objects {len(gc.get_objects())}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="csd-coarse")
    ap.add_argument("--backend", default="torch", choices=("torch", "compiled"))
    ap.add_argument("--batch", type=int, default=0, help="camera.batch_size (default 0: the preset's)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--start-step", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from csd_backend.priors.stable_diffusion import load_stable_diffusion
    from tiny_sd import build_tiny_sd

    with tempfile.TemporaryDirectory() as d:
        prior = load_stable_diffusion(build_tiny_sd(Path(d))["folder"], device="cpu", dtype="auto")
        cfg = bench_config(args.preset, [f"camera.batch_size={args.batch}"] if args.batch else [], args.backend)
        prior.resolution = cfg.prior.resolution or prior.resolution
        opt = Optimization(cfg, prior)
        print(f"{args.preset}, {args.backend}, batch {cfg.camera.size_at(0)[0]}, {torch.get_num_threads()} torch "
              f"thread(s)", flush=True)
        for phase, n in (("warm-up", args.warmup), ("step", args.steps)):
            if phase == "step":
                opt.step = max(opt.step, args.start_step)
            for _ in range(n):
                t0 = time.perf_counter()
                info = opt.train_step()
                report(opt, phase, time.perf_counter() - t0, int(info.num_samples))


if __name__ == "__main__":
    main()
