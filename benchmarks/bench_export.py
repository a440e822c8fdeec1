"""Benchmark of mesh export on this machine: train a preview scene quickly (preset preview-cpu with the exact
analytic prior), then time the isosurface extraction at 128³ and 256³ and the UV unwrap + texture bake at 1024².

    python benchmarks/bench_export.py                 # train 150 steps, then measure
    python benchmarks/bench_export.py --checkpoint runs/demo --dense

Prints a table (seconds, density queries, faces); ``--json FILE`` also writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train_scene(steps: int, seed: int, out_dir=None):
    from csd_backend.optimize import Optimization
    from csd_backend.presets import get_preset
    from csd_backend.priors import load_prior

    cfg = get_preset("preview-cpu").replace(guidance={"prompt": "a red ball"}, prior={"model": "analytic:32"},
                                            optim={"seed": seed, "checkpoint_every": 0, "preview_every": 0})
    cfg = cfg.with_steps(steps)
    prior = load_prior(cfg.prior)
    opt = Optimization(cfg, prior, out_dir=out_dir)
    t0 = time.perf_counter()
    scene = opt.run()
    return scene.eval(), time.perf_counter() - t0, cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="training steps of the preview scene (default 150)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default=None, help="measure this run instead of training one")
    ap.add_argument("--keep-run", default=None, help="save the trained run (checkpoint) in this new folder")
    ap.add_argument("--resolutions", default="128,256", help="extraction grids (default 128,256)")
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--face-budget", type=int, default=100000)
    ap.add_argument("--dense", action="store_true", help="also time the dense grid (no narrow band), for comparison")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from csd_backend.export import ExportConfig, SceneField, extract_isosurface, save_mesh
    from csd_backend.export.texture import bake_texture, unwrap

    torch.manual_seed(args.seed)
    results = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "rows": []}
    if args.checkpoint:
        from csd_backend.optimize import load_scene

        scene, cfg = load_scene(args.checkpoint)
        results["scene"] = str(args.checkpoint)
    else:
        scene, seconds, cfg = train_scene(args.steps, args.seed, args.keep_run)
        results["scene"] = f"preview-cpu, analytic:32, {args.steps} steps"
        results["train_seconds"] = seconds
        print(f"trained {args.steps} steps in {seconds:.1f} s ({args.steps / seconds:.2f} steps/s)", flush=True)
    s = cfg.scene
    print(f"scene: hash grid {s.n_levels} levels x {s.n_features_per_level}, 2^{s.log2_hashmap_size} table, "
          f"radius {s.radius}; torch threads {results['threads']}", flush=True)

    field = SceneField(scene)
    # density query rate (the cost that dominates extraction on a CPU)
    pts = (np.random.default_rng(0).random((1 << 20, 3), dtype=np.float32) * 2 - 1) * field.radius
    t0 = time.perf_counter()
    field.density(pts)
    rate = time.perf_counter() - t0
    results["density_seconds_per_1M_points"] = rate
    print(f"density: {rate:.2f} s per 1M points", flush=True)

    last = None
    variants = [(int(r), True) for r in args.resolutions.split(",")]
    if args.dense:
        variants += [(int(r), False) for r in args.resolutions.split(",")]
    for res, band in variants:
        cfg_x = ExportConfig(resolution=res, face_budget=args.face_budget, narrow_band=band)
        t0 = time.perf_counter()
        iso = extract_isosurface(field.density, field.radius, res, cfg_x.threshold_value(),
                                 narrow_band=band, face_budget=args.face_budget)
        dt = time.perf_counter() - t0
        tm = iso.info["timings"]
        row = {"stage": f"extract {res}^3" + ("" if band else " dense"), "seconds": dt,
               "density_queries": iso.info["density_queries"], "density_seconds": iso.info["density_seconds"],
               "marching_cubes_seconds": tm["marching_cubes"], "cleanup_seconds": tm["cleanup"],
               "faces_mc": iso.info["faces_marching_cubes"], "faces": int(len(iso.faces)),
               "threshold": iso.threshold}
        results["rows"].append(row)
        print(f"{row['stage']}: {dt:.1f} s ({row['density_queries'] / 1e6:.2f}M queries in "
              f"{row['density_seconds']:.1f} s, MC {tm['marching_cubes']:.2f} s, clean-up/simplify "
              f"{tm['cleanup']:.2f} s) -> {row['faces_mc']} -> {row['faces']} faces, tau {iso.threshold:.3g}",
              flush=True)
        if band and (last is None or res > last[0]):
            last = (res, iso)

    res, iso = last
    t0 = time.perf_counter()
    atlas = unwrap(iso.vertices, iso.faces, args.texture_size)
    t_unwrap = time.perf_counter() - t0
    t0 = time.perf_counter()
    texture, stats = bake_texture(iso.vertices, iso.faces, atlas, args.texture_size, field.albedo)
    t_bake = time.perf_counter() - t0
    results["rows"].append({"stage": f"unwrap ({len(iso.faces)} faces)", "seconds": t_unwrap, "charts": atlas.charts,
                            "parts": atlas.parts, "utilization": atlas.utilization})
    results["rows"].append({"stage": f"bake {args.texture_size}^2", "seconds": t_bake, **stats})
    print(f"unwrap: {t_unwrap:.1f} s ({atlas.charts} charts in {atlas.parts} parts, utilisation "
          f"{atlas.utilization:.2f})", flush=True)
    print(f"bake {args.texture_size}^2: {t_bake:.1f} s (rasterise {stats['rasterize_seconds']:.2f} s, albedo at "
          f"{stats['texels_baked']} texels {stats['albedo_seconds']:.2f} s, fill {stats['fill_seconds']:.2f} s)",
          flush=True)

    from csd_backend.export import TexturedMesh

    mesh = TexturedMesh(iso.vertices, iso.faces, iso.normals, iso.threshold, iso.bbox, None, atlas.uv,
                        atlas.uv_faces, atlas.uv_vertex, texture)
    with tempfile.TemporaryDirectory() as d:
        for fmt in ("glb", "obj", "ply"):
            t0 = time.perf_counter()
            path = save_mesh(mesh, Path(d) / f"mesh.{fmt}")
            names = [path.name] + ([f"{path.stem}.mtl", f"{path.stem}.png"] if fmt == "obj" else [])
            size = sum((Path(d) / n).stat().st_size for n in names)
            dt = time.perf_counter() - t0
            results["rows"].append({"stage": f"write {fmt}", "seconds": dt, "bytes": size})
            print(f"write {fmt}: {dt:.2f} s, {size / 1e6:.1f} MB ({path.name})", flush=True)

    print("\n| stage | seconds | notes |\n|---|---:|---|")
    for row in results["rows"]:
        notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                          if k not in ("stage", "seconds"))
        print(f"| {row['stage']} | {row['seconds']:.2f} | {notes} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
