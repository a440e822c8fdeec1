"""Time the tetrahedral grid and differentiable marching tetrahedra (``csd_backend/scene/tetrahedra.py``).

    python benchmarks/bench_tetrahedra.py [--resolutions 32 64 128 256] [--threads 1] [--repeat 3]

For each resolution: the time to generate the grid (cache cleared first) and its memory (vertices, tets), then
marching tetrahedra on a sphere SDF (radius 0.3 in the unit cube) through a deformation, forward and backward
(to the SDF and the deformation, the DMTet parameters), the median of ``--repeat`` runs. Times are also given as
ratios to the 64 case of the same run. Prints the torch thread count.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from csd_backend.scene import tetrahedra  # noqa: E402
from csd_backend.scene.tetrahedra import deformed_vertices, marching_tetrahedra, tet_grid  # noqa: E402


def _median_time(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(res: int, repeat: int) -> dict:
    def grid():
        tetrahedra._cached_grid.cache_clear()
        return tet_grid(res)

    t_grid, (v, t) = _median_time(grid, repeat)
    sdf = ((v - 0.5).norm(dim=-1) - 0.3).requires_grad_()
    delta = torch.zeros_like(v, requires_grad=True)

    def forward():
        return marching_tetrahedra(deformed_vertices(v, delta, res), sdf, t)

    t_fwd, (mv, f) = _median_time(forward, repeat)

    def backward():
        mv, _ = forward()
        t0 = time.perf_counter()
        (mv * mv).sum().backward()
        return time.perf_counter() - t0

    t_bwd = statistics.median(backward() for _ in range(repeat))
    return dict(res=res, V=len(v), T=len(t), mb=(v.nbytes + t.nbytes) / 2 ** 20, grid=t_grid, M=len(mv),
                F=len(f), fwd=t_fwd, bwd=t_bwd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeat}")
    rows = [measure(r, args.repeat) for r in args.resolutions]
    ref = next((r for r in rows if r["res"] == 64), rows[0])
    print(f"{'res':>4} {'vertices':>9} {'tets':>10} {'MB':>7} {'grid s':>8} {'×64':>6} {'mesh V':>7} {'faces':>7} "
          f"{'fwd s':>8} {'×64':>6} {'bwd s':>8} {'×64':>6} {'f+b s':>8} {'×64':>6}")
    for r in rows:
        fb, fb_ref = r["fwd"] + r["bwd"], ref["fwd"] + ref["bwd"]
        print(f"{r['res']:>4} {r['V']:>9} {r['T']:>10} {r['mb']:>7.1f} {r['grid']:>8.4f} "
              f"{r['grid'] / ref['grid']:>6.1f} {r['M']:>7} {r['F']:>7} {r['fwd']:>8.4f} {r['fwd'] / ref['fwd']:>6.1f} {r['bwd']:>8.4f} "
              f"{r['bwd'] / ref['bwd']:>6.1f} {fb:>8.4f} {fb / fb_ref:>6.1f}")


if __name__ == "__main__":
    main()
