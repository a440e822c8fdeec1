"""Capacity of the scene kinds (issue 25): regress a scene onto exact renders of the toy objects — no prior, perfect
2D supervision — and score its silhouette IoU, Gaussian splats beside the volume under the same budget.

    python benchmarks/capacity_fit.py --threads 1                        # every toy object, gaussians and volume
    python benchmarks/capacity_fit.py --objects cube,cone --steps 100 --kinds gaussians

Each run is the engine's own loop (``Optimization``) with the preset's scene, renderer, optimiser and (for splats)
density control — ``gaussian-preview-cpu`` for the splats, ``preview-cpu`` for the volume, both stretched to
``--steps`` — with the guidance replaced by the mean squared error between the render and the exact render of the
object (``benchmarks/toy_prior/objects.py``: sphere tracing, 2× supersampled) from the same random training cameras,
both over a white background, albedo only, no regulariser. Training cameras are the preset's (preview-cpu's ranges)
at ``--size``² and batch ``--batch``. The score is ``shape_quality.py``'s silhouette IoU over its 16 fixed eval views
(128², opacity > 0.5 against coverage > 0.5), with the colour error on the pixels both cover, and its margin: the IoU
against its own object minus the best IoU against another toy object (``shape_quality.py``'s cross-object table
asks distillation for 0.10; this is what perfect supervision reaches under the same budget).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parent, _HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from shape_quality import Scorer, own_margin, truth  # noqa: E402
from toy_prior.objects import OBJECTS, get_object  # noqa: E402

#: scene kind → the preset whose scene, renderer and optimiser settings the fit uses
KIND_PRESETS = {"gaussians": "gaussian-preview-cpu", "volume": "preview-cpu"}


class ImageFit:
    """Stands in for the guidance: the loss is the MSE to the exact render from the step's cameras (recorded by
    the patched camera sampler)."""

    def __init__(self, obj):
        self.obj, self.cams = obj, None

    def __call__(self, rgb, *args, **kwargs):
        gt = truth(self.obj, self.cams)["rgb"].to(rgb.device)  # [B, H, W, 3] over white
        loss = F.mse_loss(rgb, gt)
        return SimpleNamespace(loss=loss, extra_losses={}, grad_norm=torch.zeros(()), t=torch.zeros(1),
                               coefficients=None)

    def update(self):
        pass


def fit_config(kind: str, obj, steps: int, size: int, batch: int, seed: int, base=None):
    """The fit's settings: ``base`` (default: the kind's preset, ``KIND_PRESETS``) stretched to ``steps``, the MSE to
    exact renders on white for the guidance, albedo only, no regulariser."""
    from csd_backend.presets import get_preset

    cfg = (base if base is not None else get_preset(KIND_PRESETS[kind])).with_steps(steps)
    return cfg.replace(
        guidance={"prompt": obj.prompt}, prior={"model": "analytic"},
        camera={"height": size, "width": size, "batch_size": batch, "resolution_milestones": []},
        scene={"background": "solid", "background_color": [1.0, 1.0, 1.0], "random_background_prob": 0.0},
        render={"ambient_only_steps": steps + 1, "albedo_prob": 1.0},
        loss={"guidance": 1.0, "orient": 0.0, "sparsity": 0.0, "opaque": 0.0},
        optim={"seed": seed, "checkpoint_every": 0, "preview_every": 0})


def fit(kind: str, obj, args, base=None) -> dict:
    """Fit a scene of ``kind`` (the settings of ``base``, default the kind's preset) to exact renders of ``obj``:
    ``args.steps`` steps at ``args.size``² and batch ``args.batch``, seed ``args.seed``."""
    import csd_backend.optimize as optimize
    from csd_backend.optimize import Optimization
    from csd_backend.priors.analytic import AnalyticPrior

    cfg = fit_config(kind, obj, args.steps, args.size, args.batch, args.seed, base)
    opt = Optimization(cfg, AnalyticPrior(args.size))
    loss = ImageFit(obj)
    opt.guidance = loss
    sample = optimize.sample_cameras

    def recorded(*a, **kw):
        loss.cams = sample(*a, **kw)
        return loss.cams

    optimize.sample_cameras = recorded
    t0 = time.perf_counter()
    try:
        for _ in range(args.steps):
            info = opt.train_step()
    finally:
        optimize.sample_cameras = sample
    seconds = time.perf_counter() - t0
    scene = opt.trained_scene()
    return {"kind": kind, "object": obj.name, "seconds": seconds, "final_mse": float(info.losses["guidance"]),
            "count": getattr(scene, "num_gaussians", None), "scene": scene, "render": cfg.render}


def exact_start(cfg, obj, steps: int = 200, size: int = 64, batch: int = 2):
    """The scene a run of ``cfg`` starts from instead of its blob: its own scene kind and settings fitted to exact
    renders of ``obj`` (``fit``, seed ``cfg.optim.seed``), with a fresh background of the run's kind (the fit's is
    white). ``shape_quality.py --start exact``: is the exact object a fixed point of the distillation?"""
    from csd_backend.auto_backends import resolve_auto_backends
    from csd_backend.convert.volume_to_dmtet import fresh_background
    from csd_backend.scene_kinds import make_scene

    fitted = fit(cfg.scene.kind, obj, SimpleNamespace(steps=steps, size=size, batch=batch, seed=cfg.optim.seed),
                 base=cfg)["scene"]
    scene_cfg = resolve_auto_backends(cfg, torch.device("cpu")).scene
    with torch.random.fork_rng(devices=[]):  # every weight is loaded below: the global RNG is left as it was
        scene = make_scene(scene_cfg, torch.device("cpu"))
    state = {k: v for k, v in fitted.state_dict().items() if not k.startswith("background.")}
    state.update({f"background.{k}": v for k, v in fresh_background(scene_cfg, cfg.optim.seed).state_dict().items()})
    scene.load_state_dict(state, strict=True)
    return scene


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", default=",".join(o.name for o in OBJECTS))
    p.add_argument("--kinds", default="gaussians,volume")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the scores to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    objects = [get_object(n) for n in args.objects.split(",")]
    kinds = args.kinds.split(",")
    scorer = Scorer(list(OBJECTS), points=False)  # every object: the margin needs the others' IoU
    print(f"{args.steps} steps, {args.size}² renders, batch {args.batch}, seed {args.seed}, torch threads "
          f"{torch.get_num_threads()}; silhouette IoU over 16 eval views (128²)", flush=True)
    results = []
    for obj in objects:
        for kind in kinds:
            r = fit(kind, obj, args)
            scores, _ = scorer.score(r.pop("scene"), r.pop("render"), own=(obj.name,), meshes=False, normals=False)
            s = scores[obj.name]
            r.update(iou=s["iou"][obj.name], colour_err=s["colour_err"], margin=own_margin(s["iou"], obj.name),
                     nearest=max((k for k in s["iou"] if k != obj.name), key=s["iou"].get))
            results.append(r)
            count = f", {r['count']} splats" if r["count"] is not None else ""
            print(f"{obj.name:<6} {kind:<10} IoU {r['iou']:.3f}  margin {r['margin']:+.3f} over {r['nearest']:<5}"
                  f"  colour error {r['colour_err']:.3f}  final MSE "
                  f"{r['final_mse']:.4f}  {r['seconds']:.0f} s{count}", flush=True)
    print("\n| object | " + " | ".join(f"{k} IoU (margin)" for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for obj in objects:
        row = {r["kind"]: r for r in results if r["object"] == obj.name}
        print(f"| {obj.name} | " + " | ".join(f"{row[k]['iou']:.3f} ({row[k]['margin']:+.3f} over {row[k]['nearest']})"
                                           for k in kinds) + " |")
    means = [sum(r["iou"] for r in results if r["kind"] == k) / len(objects) for k in kinds]
    print("| mean | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
