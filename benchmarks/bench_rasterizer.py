"""Time of the differentiable rasterizer (csd_backend/render/rasterizer.py) on noisy spheres.

    python benchmarks/bench_rasterizer.py [--threads 1] [--faces 10000 100000 300000] [--sizes 128 512]
                                          [--views 1] [--repeat 3] [--backend torch] [--device cpu]

For each mesh size and resolution: rasterize, interpolate (world positions, 3 channels), antialias (an RGB
image) and the backward pass of a loss on the antialiased image to the vertex positions (seconds, best of
``--repeat``), and the total as a ratio to the first case measured in the same run (the smallest mesh at the
smallest size), so tables from different machines compare. Prints the torch thread count. The mesh topology
that antialiasing needs is rebuilt in every pass (as when the faces change each step, like DMTet's); a fixed
mesh reuses it (``--cached-topology`` measures that).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import trimesh  # noqa: E402

from csd_backend.render.cameras import orbit_cameras  # noqa: E402
from csd_backend.render import rasterizer  # noqa: E402
from csd_backend.render.rasterizer import antialias, interpolate, rasterize  # noqa: E402


def noisy_sphere(n_faces: int, seed: int = 0):
    """A unit UV sphere of about ``n_faces`` triangles, vertices moved radially by up to ±2 %."""
    n = max(4, round((n_faces / 4) ** 0.5))
    mesh = trimesh.creation.uv_sphere(radius=1.0, count=[n, n])
    g = torch.Generator().manual_seed(seed)
    verts = torch.tensor(mesh.vertices, dtype=torch.float32)
    verts = verts * (1 + 0.02 * (torch.rand(len(verts), 1, generator=g) * 2 - 1))
    return verts, torch.tensor(mesh.faces, dtype=torch.long)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(verts, faces, cams, backend, device, cached_topology=False):
    """Seconds of each stage for one forward and backward pass."""
    if not cached_topology:
        rasterizer._TOPOLOGY.clear()
    times = {}
    v = verts.clone().requires_grad_(True)
    sync(device)
    t = time.perf_counter()
    frags = rasterize(v, faces, cams, backend)
    sync(device)
    times["rasterize"] = time.perf_counter() - t
    t = time.perf_counter()
    pos = interpolate(v, frags, faces)
    sync(device)
    times["interpolate"] = time.perf_counter() - t
    t = time.perf_counter()
    m = frags.mask.unsqueeze(-1).float()
    image = antialias((pos * 0.5 + 0.5) * m + (1 - m), frags, faces)
    sync(device)
    times["antialias"] = time.perf_counter() - t
    t = time.perf_counter()
    image.square().mean().backward()
    sync(device)
    times["backward"] = time.perf_counter() - t
    times["total"] = sum(times.values())
    return times, int(frags.mask.sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--faces", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cached-topology", action="store_true", help="reuse the mesh topology between passes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}, backend "
          f"{args.backend}, {args.views} view(s), best of {args.repeat}, topology "
          f"{'cached' if args.cached_topology else 'rebuilt each pass'}")
    header = f"{'faces':>8} {'size':>5} {'covered':>8} {'rasterize':>10} {'interp':>8} {'antialias':>10} " \
             f"{'backward':>9} {'total s':>8} {'× base':>7}"
    print(header)
    print("-" * len(header))
    baseline = None
    for n_faces in sorted(args.faces):
        verts, faces = noisy_sphere(n_faces)
        verts, faces = verts.to(device), faces.to(device)
        for size in sorted(args.sizes):
            cams = orbit_cameras(args.views, elevation=20.0, distance=2.5, fovy=50.0, height=size,
                                 width=size).to(device)
            run = lambda: run_once(verts, faces, cams, args.backend, device, args.cached_topology)  # noqa: E731
            run()  # warm-up
            runs = [run() for _ in range(args.repeat)]
            best = {k: min(r[0][k] for r in runs) for k in runs[0][0]}
            baseline = baseline or best["total"]
            print(f"{len(faces):>8} {size:>5} {runs[0][1]:>8} {best['rasterize']:>10.3f} {best['interpolate']:>8.3f} "
                  f"{best['antialias']:>10.3f} {best['backward']:>9.3f} {best['total']:>8.3f} "
                  f"{best['total'] / baseline:>7.1f}")


if __name__ == "__main__":
    main()
