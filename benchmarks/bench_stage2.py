"""Stage-2 (DMTet) step time (CPU or ``--device cuda``), split into marching tets, rasterize, shade (interpolation, texture
field, shading, antialiasing), prior, backward and optimiser step.

    python benchmarks/bench_stage2.py                       # 128² and 512², tet grid 128, the shipped toy prior
    python benchmarks/bench_stage2.py --tet 256 --sizes 512 --steps 3

The scene is a stage-1 blob converted as ``refine`` converts (surface at density 10), with the csd-refine-object
settings otherwise (``--preset``). Times are medians over the measured steps (after one warm-up step); "×" is the
ratio to the first row of the same run, the only meaningful comparison on a shared machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csd_backend.optimize import Optimization  # noqa: E402
from csd_backend.presets import get_preset  # noqa: E402
from csd_backend.priors import load_prior  # noqa: E402
from csd_backend.render import mesh_renderer  # noqa: E402
from csd_backend.convert.volume_to_dmtet import volume_to_dmtet  # noqa: E402
from csd_backend.scene.volume import Scene  # noqa: E402


class Timer:
    """Wraps a function and adds its wall time to ``seconds``."""

    def __init__(self, fn, device):
        self.fn, self.device, self.seconds = fn, device, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        return out


def start_scene(tet: int, preset: str) -> torch.nn.Module:
    """A stage-1 volume of the preset's size whose blob crosses density 10 near radius 0.25, converted."""
    cfg = dataclasses.replace(get_preset(preset).scene, kind="volume", density_blob_scale=20.0)
    torch.manual_seed(0)
    return volume_to_dmtet(Scene(cfg).eval(), tet_resolution=tet, threshold=10.0)


def bench(size: int, tet: int, prior, steps: int, device, preset: str) -> dict:
    cfg = get_preset(preset).replace(
        guidance={"prompt": "a green cone"}, prior={"model": "toy"},
        camera={"height": size, "width": size}, optim={"checkpoint_every": 0, "steps": steps + 1})
    opt = Optimization(cfg, prior, scene=start_scene(tet, preset))
    opt.profile = True
    mesh = Timer(opt.scene.geometry.mesh, device)
    opt.scene.geometry.mesh = mesh
    raster = Timer(mesh_renderer.rasterize, device)
    mesh_renderer.rasterize = raster
    rows = []
    try:
        for i in range(steps + 1):
            opt.timings.clear()
            mesh.seconds = raster.seconds = 0.0
            t0 = time.perf_counter()
            info = opt.train_step()
            total = time.perf_counter() - t0
            if i == 0:
                continue  # warm-up
            t = dict(opt.timings)
            rows.append({"marching tets": mesh.seconds, "rasterize": raster.seconds,
                         "shade": t.get("render", 0) - mesh.seconds - raster.seconds, "prior": t.get("prior", 0),
                         "backward": t.get("backward", 0), "optimizer": t.get("optimizer", 0), "step": total,
                         "faces": opt.scene.mesh()[1].shape[0], "pixels": info.num_samples})
    finally:
        mesh_renderer.rasterize = raster.fn
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    p.add_argument("--tet", type=int, nargs="+", default=[128])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="csd-refine-object", help="the stage-2 preset (its scene and losses)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    prior = load_prior(get_preset("refine-cpu").replace(prior={"model": "toy", "device": args.device}).prior)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}, toy prior, "
          f"{args.steps} steps (median)")
    cols = ["marching tets", "rasterize", "shade", "prior", "backward", "optimizer", "step"]
    print("| tet | render | faces | covered px | " + " | ".join(f"{c} s" for c in cols) + " | × |")
    print("|" + "---|" * (len(cols) + 5))
    base = None
    for tet in args.tet:
        for size in args.sizes:
            r = bench(size, tet, prior, args.steps, device, args.preset)
            base = base or r["step"]
            print(f"| {tet} | {size}² | {int(r['faces'])} | {int(r['pixels'])} | "
                  + " | ".join(f"{r[c]:.3f}" for c in cols) + f" | {r['step'] / base:.1f} |", flush=True)


if __name__ == "__main__":
    main()
