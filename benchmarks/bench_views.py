"""Time of the final ring of views (what `generate` renders after the last step and CSD Render Views renders).

    python benchmarks/bench_views.py [--preset csd-coarse] [--views 8] [--size 256] [--threads 2] [--train 0]

The scene is the preset's initial blob: soft, semi-transparent (no ray becomes opaque). ``--opaque`` scales the
blob's density bias (×10) so that it has a hard surface like a trained object, where early termination pays.
``--compare`` also times the two-pass differentiable path (``render_rays`` under no_grad, what views used before)
in the same run, and prints the ratio. Prints seconds per view and in total, with the torch thread count.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from csd_backend.presets import get_preset  # noqa: E402
from csd_backend.render.views import prepare_renderer, render_ring  # noqa: E402
from csd_backend.scene.volume import Scene  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="csd-coarse")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--opaque", action="store_true", help="a hard-surfaced blob (density bias ×10)")
    ap.add_argument("--compare", action="store_true", help="also time the old two-pass path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    if args.opaque:
        cfg = cfg.replace(scene={"density_blob_scale": cfg.scene.density_blob_scale * 10})
    torch.manual_seed(0)
    scene = Scene(cfg.scene).eval()
    c = cfg.camera
    t0 = time.perf_counter()
    renderer = prepare_renderer(scene, cfg.render)
    t_grid = time.perf_counter() - t0

    def ring():
        return render_ring(scene, args.views, args.size, c.eval_elevation, c.eval_distance, c.eval_fovy,
                           render_cfg=cfg.render, renderer=renderer)

    def best_of(fn):
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    new, images = best_of(ring)
    print(f"preset {args.preset}{' (opaque blob)' if args.opaque else ''}: {args.views} views at {args.size}², "
          f"{cfg.render.num_samples_per_ray} samples/ray, {torch.get_num_threads()} torch threads")
    print(f"  occupancy grid fit: {t_grid:.2f} s")
    print(f"  one-pass render with early termination: {new:.2f} s ({new / args.views:.2f} s per view)")
    if args.compare:
        one_pass = renderer.render_rays_eval
        renderer.render_rays_eval = lambda *a, **k: renderer.render_rays(*a, **k)  # the old two-pass path
        try:
            old, old_images = best_of(ring)
        finally:
            renderer.render_rays_eval = one_pass
        diff = (old_images - images).abs().max().item()
        print(f"  two-pass render (before): {old:.2f} s ({old / args.views:.2f} s per view); "
              f"speed-up {old / new:.2f}x; max pixel difference {diff:.2e}")


if __name__ == "__main__":
    main()
