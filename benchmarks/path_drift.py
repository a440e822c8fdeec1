"""How far the ``torch`` and ``compiled`` paths drift apart from one seed (issue 26 item 3).

    python benchmarks/path_drift.py                  # 60 steps of a small analytic-prior run on each path
    python benchmarks/path_drift.py --steps 200

Trains the same small configuration (``tests/engine_helpers.small_config``: the analytic prior, batch 2 of 24²
renders) from seed 0 once with the reference backends and once with the compiled ones, and prints, at a few steps,
the largest and the relative difference of all scene parameters, and the first step whose packed sample count
differs (the occupancy grid deciding differently). The paths compute the same math with a different summation
order, so a difference of float rounding is expected; a growing one means the runs diverge.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from csd_backend.optimize import Optimization  # noqa: E402
from csd_backend.priors.analytic import AnalyticPrior  # noqa: E402
from engine_helpers import small_config  # noqa: E402


def train(backend: str, steps: int, marks) -> tuple:
    cfg = small_config(steps=steps, scene={"encoding_backend": backend}, render={"backend": backend})
    opt = Optimization(cfg, AnalyticPrior(resolution=16))
    snaps, counts = {}, []
    for i in range(1, steps + 1):
        counts.append(opt.train_step().num_samples)
        if i in marks:
            snaps[i] = torch.cat([p.detach().flatten().clone() for p in opt.scene.parameters()])
    return snaps, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    marks = sorted({m for m in (1, 2, 5, 10, 20, 40, 60, 100, 200, args.steps) if m <= args.steps})
    (a, ca), (b, cb) = train("torch", args.steps, marks), train("compiled", args.steps, marks)
    print(f"torch threads {torch.get_num_threads()}; step, max |param torch − param compiled|, relative (L2)")
    for m in marks:
        d = a[m] - b[m]
        print(f"{m:>5} {float(d.abs().max()):>12.3e} {float(d.norm() / a[m].norm()):>12.3e}")
    first = next((i + 1 for i, (x, y) in enumerate(zip(ca, cb)) if x != y), None)
    print(f"sample counts: {'identical at every step' if first is None else f'first differ at step {first}'} "
          f"({sum(ca)} vs {sum(cb)} samples in all)")


if __name__ == "__main__":
    main()
