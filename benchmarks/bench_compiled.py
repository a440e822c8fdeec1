"""The compiled backends (issue 12 item 2) against the torch reference: hash-grid encoding and packed compositing.

    python benchmarks/bench_compiled.py                         # CPU, 1 torch thread, preview-cpu and csd-coarse grids
    python benchmarks/bench_compiled.py --device cuda --points 262144 1048576

For each preset's hash grid and each point count: the no-grad forward (the marching pass), forward + backward
(albedo-only steps) and forward + backward through analytic normals (``d features / d points`` with
``create_graph``, then the second-order backward, as a step with normal renders); for the compositing of packed
rays (64² × 4 views, the given samples per ray, 20 % empty rays): forward + backward. Medians of ``--repeats``
runs after one warm-up call; "compile s" is the first call's time minus the median (graph compile, once per
process; inductor caches the result on disk, so a second process compiles faster).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csd_backend.presets import get_preset  # noqa: E402
from csd_backend.render.volume_renderer import Compositor  # noqa: E402
from csd_backend.scene.backends import CompiledHashGridEncoding  # noqa: E402
from csd_backend.scene.encoding import HashGridEncoding  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """(first call seconds, median of ``repeats`` further calls)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def encoding_ops(enc, x, w):
    def forward():
        with torch.no_grad():
            enc(x)

    def backward():
        enc.params.grad = None
        (enc(x) * w).sum().backward()

    def normals():
        enc.params.grad = None
        xr = x.detach().requires_grad_(True)
        y = enc(xr)
        gx = torch.autograd.grad((y * w).sum(), xr, create_graph=True)[0]
        ((y * w).sum() + gx.square().sum()).backward()

    return {"encode fwd (no grad)": forward, "encode fwd+bwd": backward, "encode fwd+bwd, normals": normals}


def packed_rays(n_rays, per_ray, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 2 * per_ray + 1, (n_rays,), generator=g)
    counts[torch.rand(n_rays, generator=g) < 0.2] = 0
    ray_idx = torch.repeat_interleave(torch.arange(n_rays), counts).to(device)
    n = ray_idx.shape[0]
    sigma = (torch.rand(n, generator=g) * 20).to(device).requires_grad_(True)
    dt = (torch.rand(n, generator=g) * 0.02 + 0.005).to(device)
    values = tuple(torch.rand(n, c, generator=g).to(device).requires_grad_(True) for c in (3, 1, 3))
    return sigma, dt, ray_idx, values


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    p.add_argument("--presets", default="preview-cpu,csd-coarse", help="whose hash-grid settings to time")
    p.add_argument("--points", type=int, nargs="+", default=[65536])
    p.add_argument("--rays", type=int, default=4 * 64 * 64, help="rays of the compositing (default 4 views, 64²)")
    p.add_argument("--samples-per-ray", type=int, default=24, help="mean packed samples per ray (compositing)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="scene.KEY=VALUE",
                   help="override a hash-grid setting of the presets, e.g. scene.n_levels=2 (repeatable)")
    args = p.parse_args()
    scene_overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if not key.startswith("scene."):
            p.error(f"--set {item}: only scene.* settings apply here")
        scene_overrides[key[len("scene."):]] = json.loads(value)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    print(f"device {device}, torch {torch.__version__}, torch threads {torch.get_num_threads()}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    print(f"{'operation':<28}{'grid':>22}{'N':>10}{'torch ms':>11}{'compiled ms':>13}{'torch/compiled':>16}"
          f"{'compile s':>11}", flush=True)

    def row(name, grid, n, fn_ref, fn_comp):
        _, t_ref = timed(fn_ref, device, args.repeats)
        first, t_comp = timed(fn_comp, device, args.repeats)
        print(f"{name:<28}{grid:>22}{n:>10}{t_ref * 1e3:>11.1f}{t_comp * 1e3:>13.1f}{t_ref / t_comp:>16.2f}"
              f"{max(first - t_comp, 0.0):>11.1f}", flush=True)

    for preset in args.presets.split(","):
        s = get_preset(preset).replace(scene=scene_overrides).scene
        enc_args = (s.n_levels, s.n_features_per_level, s.log2_hashmap_size, s.base_resolution, s.level_scale())
        torch.manual_seed(0)
        ref = HashGridEncoding(*enc_args).to(device)
        with torch.no_grad():
            ref.params.normal_(0, 1e-2)
        comp = CompiledHashGridEncoding(*enc_args).to(device)
        comp.load_state_dict(ref.state_dict())
        grid = f"{preset} {s.n_levels}x2^{s.log2_hashmap_size}"
        for n in args.points:
            x = torch.rand(n, 3, device=device)
            w = torch.randn(n, ref.n_output_dims, device=device)
            ops_ref, ops_comp = encoding_ops(ref, x, w), encoding_ops(comp, x, w)
            for name in ops_ref:
                row(name, grid, n, ops_ref[name], ops_comp[name])

    sigma, dt, ray_idx, values = packed_rays(args.rays, args.samples_per_ray, device)
    compositors = {name: Compositor(name) for name in ("torch", "compiled")}

    def composite(c):
        def fn():
            sigma.grad = None
            weights, acc = c.composite(sigma, dt, ray_idx, values, args.rays)
            (acc.sum() + weights.sum()).backward()
        return fn

    def march(c):
        def fn():
            with torch.no_grad():
                c.march_weights(sigma, dt, ray_idx)
        return fn

    grid = f"{args.rays} rays"
    row("composite fwd+bwd", grid, ray_idx.shape[0], composite(compositors["torch"]),
        composite(compositors["compiled"]))
    row("march weights (no grad)", grid, ray_idx.shape[0], march(compositors["torch"]), march(compositors["compiled"]))
    print("(milliseconds, medians; torch/compiled > 1: the compiled backend is faster; 'compile s': the first "
          "call's extra time, paid once per process)")


if __name__ == "__main__":
    main()
