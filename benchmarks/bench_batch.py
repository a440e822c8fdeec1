"""Throughput of a batch of prompts on this machine: ``generate`` run N times in a row (one process each, as a
shell loop would) against ``batch`` with 1 and 2 local workers and on Ray, all in the same run of this script.

Every mode makes the same runs (analytic prior, the preview-cpu preset shortened to --steps, a ring of views and
a mesh each) from a fresh folder, as a user would start them: a new process, wall-clock time until it exits.
Ray modes: ``local`` starts (and stops) a private cluster inside the command, so its time includes the cluster's
start; ``auto`` connects to a cluster started beforehand with ``ray start --head`` (not counted), as on a real
cluster. torch threads: ``--threads`` (default 1) for every process (OMP_NUM_THREADS), since OpenMP threads that
outnumber the free cores are many times slower on a busy machine; a Ray task gets --cpus-per-run (1) thread.
``--threads 0`` leaves OMP_NUM_THREADS unset (a process alone uses every core, a local worker cores/workers).

    python benchmarks/bench_batch.py                       # 6 prompts, 20 steps, every mode
    python benchmarks/bench_batch.py --steps 150 --modes generate,workers-1,workers-2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red ball", "a blue cube", "a green cone", "a yellow mug", "a white vase", "a black chair",
           "a grey stone", "a red car"]
MODES = ("generate", "workers-1", "workers-2", "ray-local", "ray-auto")


def run_flags(steps: int) -> list:
    """preview-cpu made smaller (32² renders at 1 view a step, as the README's table was measured; 48 samples a ray)
    so that a shared 2-core machine runs the benchmark in minutes; a ring of 4 views at 64² and a 64³ mesh with
    vertex colours (a UV unwrap of the noisy mesh of a short run takes longer than its training), as a user's run
    writes them."""
    return ["--preset", "preview-cpu", "--model", "analytic", "--steps", str(steps), "--set", "camera.height=32",
            "--set", "camera.width=32", "--set", "camera.batch_size=1", "--set", "render.num_samples_per_ray=48",
            "--views", "4", "--view-size", "64",
            "--mesh-resolution", "64", "--mesh-texture-size", "0", "--quiet"]


def timed(cmd, env) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (0: unset)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary one, removed)")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    (work / "prompts.txt").write_text("\n".join(prompts) + "\n")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = run_flags(args.steps)
    python = [sys.executable, "-m", "csd_backend"]
    results = []
    ray_started = False
    try:
        for mode in modes:
            out = work / mode
            alone = args.threads or cores  # torch threads of one process
            if mode == "generate":
                t0 = time.perf_counter()
                for i, p in enumerate(prompts):
                    timed([*python, "generate", "--prompt", p, *flags, "--out", str(out / f"{i:04d}")], env)
                wall, threads, workers = time.perf_counter() - t0, alone, 1
            else:
                extra, threads, workers = [], alone, 1
                if mode.startswith("workers-"):
                    workers = int(mode.split("-")[1])
                    extra, threads = ["--workers", str(workers)], args.threads or max(1, cores // workers)
                elif mode == "ray-local":
                    extra, threads, workers = ["--ray", "local"], 1, cores
                elif mode == "ray-auto":
                    if not ray_started:
                        subprocess.run(["ray", "start", "--head", f"--num-cpus={cores}", "--include-dashboard=false",
                                        "--disable-usage-stats"], check=True, capture_output=True, env=env)
                        ray_started = True
                    extra, threads, workers = ["--ray", "auto"], 1, cores
                wall = timed([*python, "batch", str(work / "prompts.txt"), *flags, "--out", str(out), *extra], env)
                state = {}
                for line in (out / "manifest.jsonl").read_text().splitlines():
                    rec = json.loads(line)
                    state[rec["run"]] = rec["status"]
                assert list(state.values()) == ["done"] * len(prompts), state
            results.append((mode, workers, threads, wall))
            print(f"{mode}: {wall:.1f} s", file=sys.stderr)
    finally:
        if ray_started:
            subprocess.run(["ray", "stop", "--force"], capture_output=True, env=env)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    base = next((w for m, _, _, w in results if m == "generate"), None)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{len(prompts)} prompts × {args.steps} steps (preview-cpu at 32², analytic prior, 4 views at 64², mesh 64³ "
          f"with vertex colours); {cores} cores; load average {load:.1f} at the end\n")
    print("| mode | concurrent runs | torch threads each | wall | runs/min | × generate in a row |")
    print("|---|---|---|---|---|---|")
    for mode, workers, threads, wall in results:
        ratio = f"{base / wall:.2f}×" if base else "–"
        print(f"| {mode} | {workers} | {threads} | {wall:.1f} s | {60 * len(prompts) / wall:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
