"""Colour scores of texturing with the shipped toy prior: does "a red cube" paint the vase red?

    python benchmarks/texture_quality.py                                   # the five toy prompts, seeds 0,1,2
    python benchmarks/texture_quality.py --prompts red,green --seeds 0 --steps 300

For each toy prompt (its colour word names the object's albedo, ``benchmarks/toy_prior/objects.py``) and seed, the
README's texture demo runs (``--preset``, default ``texture-cpu``, on ``--mesh``, default the shipped vase): a
fixed-mesh scene whose texture field is optimised with CSD, as ``python -m csd_backend texture`` does. Scores, on
``N_POINTS`` points sampled by area on the mesh's surface:

* **mean albedo** of the texture field there, and **error** = the largest per-channel |mean albedo − the colour
  word's albedo| (issue goal for the demo: at most 0.15);
* **spread**: the mean per-point distance from that mean albedo (patches of other colours raise it).

Writes ``table.md`` and ``scores.json`` into ``--out``; the seeds' means are the row "mean".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parent, _HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from toy_prior.objects import OBJECTS  # noqa: E402

VASE = _HERE.parent / "example_workflows" / "meshes" / "csd_vase.obj"
N_POINTS = 20000
GOAL = 0.15


def colour_word(obj) -> str:
    """``"a red cube"`` → ``"red"``."""
    return obj.prompt.split()[1]


def surface_albedo(scene, n: int = N_POINTS, seed: int = 0) -> np.ndarray:
    """The texture field's albedo ``[n, 3]`` at points sampled by area on the scene's fixed mesh."""
    import trimesh

    v, f = (t.detach().cpu().numpy() for t in scene.mesh())
    pts, _ = trimesh.sample.sample_surface(trimesh.Trimesh(v, f, process=False), n, seed=seed)
    with torch.no_grad():
        return scene.albedo(torch.as_tensor(np.asarray(pts), dtype=torch.float32)).clamp(0, 1).numpy()


def scores(albedo: np.ndarray, target) -> dict:
    mean = albedo.mean(0)
    return {"rgb": [round(float(x), 3) for x in mean],
            "error": float(np.abs(mean - np.asarray(target)).max()),
            "spread": float(np.abs(albedo - mean).mean())}


def texture_run(obj, seed: int, steps: int, preset: str, mesh: Path, prior, overrides=None):
    """The textured scene of the texture demo for ``obj``'s prompt (as ``csd_backend texture``) and its seconds."""
    from csd_backend.convert.mesh_file import mesh_scene, read_mesh_file
    from csd_backend.optimize import Optimization
    from csd_backend.presets import get_preset

    cfg = get_preset(preset).replace(guidance={"prompt": obj.prompt}, prior={"model": "toy", "device": "cpu"},
                                     optim={"seed": seed, "checkpoint_every": 0, "preview_every": 0})
    if steps:
        cfg = cfg.with_steps(steps)
    if overrides:
        cfg = cfg.replace(**overrides)
    vertices, faces = read_mesh_file(mesh)
    scene = mesh_scene(vertices, faces, cfg.scene, name=mesh.name, seed=seed)
    t0 = time.perf_counter()
    opt = Optimization(cfg, prior, scene=scene)
    opt.run()
    return opt.trained_scene(), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default=",".join(colour_word(o) for o in OBJECTS),
                    help="colour words of the toy prompts (default: all five)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=0, help="training steps (default 0: the preset's)")
    ap.add_argument("--preset", default="texture-cpu")
    ap.add_argument("--mesh", type=Path, default=VASE)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a configuration field of every run (after --steps), as the command line's --set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/texture_quality"))
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds: expected integers separated by commas, got {args.seeds!r}")
    words = [w.strip() for w in args.prompts.split(",") if w.strip()]
    objects = [o for o in OBJECTS if colour_word(o) in words]
    if len(objects) != len(words):
        ap.error(f"--prompts: choose among {', '.join(colour_word(o) for o in OBJECTS)}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from csd_backend.config import PriorConfig
    from csd_backend.priors import load_prior
    from csd_backend.runs.flags import parse_overrides

    overrides = parse_overrides(args.set)

    prior = load_prior(PriorConfig(model="toy", device="cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    lines = [f"Texture demo colours: preset {args.preset}{' ' + ' '.join(args.set) if args.set else ''}, "
             f"mesh {args.mesh.name}, seeds {seeds}, "
             f"{args.threads} torch thread(s); error = max per-channel |mean albedo − colour| (goal ≤ {GOAL})", "",
             "| prompt | seed | mean albedo (true) | error ↓ | spread ↓ | time |", "|---|---|---|---|---|---|"]
    for obj in objects:
        rows = []
        for seed in seeds:
            scene, secs = texture_run(obj, seed, args.steps, args.preset, args.mesh, prior, overrides)
            r = {**scores(surface_albedo(scene, seed=seed), obj.color), "seconds": round(secs, 1)}
            rows.append(r)
            true = ", ".join(f"{c:.2f}" for c in obj.color)
            lines.append(f"| {obj.prompt} | {seed} | ({', '.join(f'{c:.2f}' for c in r['rgb'])}) ({true}) | "
                         f"{r['error']:.3f} | {r['spread']:.3f} | {secs:.0f} s |")
            print(lines[-1], flush=True)
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("error", "spread")}
        lines.append(f"| {obj.prompt} | mean | | **{mean['error']:.3f}** | {mean['spread']:.3f} | |")
        results[obj.prompt] = {"seeds": dict(zip(seeds, rows)), "mean": mean}
    (args.out / "scores.json").write_text(json.dumps(results, indent=2))
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
