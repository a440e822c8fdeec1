"""Geometry scores of the engine with the shipped toy prior: does a run for "a red cube" make the cube?

    python benchmarks/shape_quality.py                                  # every object, csd and sds
    python benchmarks/shape_quality.py --objects cube,mug --methods csd --steps 200 --out runs/shape_quality
    python benchmarks/shape_quality.py --methods csd --seeds 0,1 --every 50 --no-mesh   # means of 2 seeds, curves

For each object and method, a short optimisation with the toy prior (``--preset``, default ``preview-cpu``, with
``--steps`` steps and ``--seed``) is scored against the object's exact geometry (``benchmarks/toy_prior/
objects.py``):

* **IoU**: silhouette IoU over a fixed set of 16 views (8 azimuths at elevation 15°, 4 at 45°, 4 from below at
  −30°; distance 2, fovy 50, 128²): the trained scene's opacity > 0.5 (the engine's renderer) against the true
  object's coverage > 0.5 (sphere tracing), intersection and union summed over all views;
* **Chamfer** and **F-score**: the mesh of ``csd_backend.export.extract_textured_mesh`` (128³, auto threshold)
  against the true surface, 20 000 points on each; ``acc`` = mean distance mesh → truth (what was added:
  bloat, skirts), ``comp`` = truth → mesh (what is missing), Chamfer = (acc + comp) / 2, F-score at τ = 0.05
  (world units; the objects are about 0.8 across);
* **largest part**: the area share of the largest part (faces joined by shared edges) of that mesh before the
  export's floater rule, with the parts before → after it: floaters show as a share below 1 (issue goal for the
  demo object: at least 0.95);
* **colour**: mean |Δ| (per channel, in [0, 1]) between the rendered albedo (un-premultiplied by the opacity)
  and the true colour on the pixels both silhouettes cover; ``rgb`` is the mean rendered albedo there.

* **IoU below**: the silhouette IoU of the 4 views from below alone, where density that training cameras rarely
  see (a "skirt" under the object) shows.
* **size**: the run's silhouette area over the object's (the same pixels as the IoU): above 1 the run is larger
  than its object, below 1 smaller — an IoU that falls against every object says neither.

Runs go ``--jobs`` at a time (processes, default 2) with ``--threads`` torch threads each (default 1).
``--seeds 0,1,2`` runs each (object, method) once per seed and reports the seeds' mean (with the IoU's range): one
seed's IoU varies by about ±0.2 with this prior, so a single-seed difference smaller than that is noise.
``--every N`` also scores the silhouette IoU every N steps of each run (a curve: does the shape hold, or peak and
erode?). ``--start exact`` starts each run from its object instead of the blob — the run's own scene fitted to
exact renders (``capacity_fit.exact_start``: 200 steps, IoU about 0.97), with a fresh background — and its curve
from step 0: is the exact object a fixed point of the distillation, or does the prior's signal move it away (and
which way: the size)?

The **blob** row is the starting scene (step 0, same seed) scored against each object: a method has to beat it.
The **cross-object matrix** scores the run for prompt A against every object B (silhouette IoU): its own object
should score highest (the diagonal).

Methods: ``csd`` = the preset as is; ``csd+refine`` / ``sds+refine`` = that run, then stage 2 (preset
``refine-cpu``: the volume converted to a DMTet grid at the automatic surface level and refined through the
rasterizer with the stage-2 CSD guidance, 150 steps); ``sds`` = the preset with the SDS baseline's guidance
(``sds-dreamfusion``: CFG 100, w(t) = 1 − ᾱ, no gradient normalisation, t ∈ [0.02, 0.98], empty negative
prompt, 45° view thresholds); ``vsd`` = the preset with ProlificDreamer's guidance (``vsd-preview-cpu``: CFG 7.5
minus a camera-conditioned LoRA of the toy UNet, w(t) = 1 − ᾱ, t ∈ [0.02, 0.98] → [0.02, 0.5] at mid-run, LoRA lr
1e-3). Writes ``table.md``, ``scores.json`` and ``sheet.png`` (per run: renders beside
the ground truth) into ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parent, _HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from toy_prior.objects import OBJECTS, ToyObject, get_object, render_object, surface_points  # noqa: E402

#: method → the preset whose guidance replaces the run preset's (None: the run preset's own, CSD)
METHOD_GUIDANCE = {"csd": None, "sds": "sds-dreamfusion", "vsd": "vsd-preview-cpu"}
METHODS = tuple(METHOD_GUIDANCE)
#: the guidance fields a method takes from its preset (the rest: prompt, view_dependent, ... stay the run's)
GUIDANCE_FIELDS = ("mode", "cfg_scale", "weighting", "grad_normalize", "front_threshold", "back_threshold",
                   "negative_prompt", "min_step_percent", "max_step_percent", "grad_clip", "lora_lr", "lora_rank",
                   "camera_condition_drop", "lora_cfg_scale", "lora_timestep_samples")
#: ``<method>+refine``: the stage-1 run of <method>, then stage 2 (``refine-cpu``: DMTet, CSD stage-2 guidance)
REFINE = "+refine"
REFINE_PRESET = "refine-cpu"
EVAL_SIZE = 128
EVAL_DISTANCE = 2.0
EVAL_FOVY = 50.0
F_TAU = 0.05
N_POINTS = 20000


# ------------------------------------------------------------------------------------------------- cameras
#: the eval views from below (elevation −30°): where density that training cameras rarely see (a "skirt") shows
BELOW = slice(12, 16)


def eval_cameras(size: int = EVAL_SIZE):
    from csd_backend.render.cameras import make_cameras

    el, az = [], []
    for a in range(0, 360, 45):
        el.append(15.0)
        az.append(float(a))
    for a in (0, 90, 180, 270):
        el.append(45.0)
        az.append(a + 45.0)
    for a in (0, 90, 180, 270):
        el.append(-30.0)
        az.append(float(a))
    az = [((x + 180) % 360) - 180 for x in az]
    n = len(el)
    return make_cameras(el, az, [EVAL_DISTANCE] * n, [EVAL_FOVY] * n, size, size)


# ------------------------------------------------------------------------------------------------- configs
def run_config(obj: ToyObject, method: str, steps: int, seed: int, preset: str = "preview-cpu",
               model: str = "toy", resolution: Optional[int] = None, overrides: Optional[dict] = None,
               rescale: bool = True):
    """The run of ``method`` for ``obj``'s prompt: the preset stretched to ``steps`` (``rescale`` False: its
    schedules kept in absolute steps, as ``generate --no-rescale-schedules``), then ``overrides``
    (``{section: {field: value}}``, in the run's own steps) on top."""
    from csd_backend.presets import get_preset

    method = method[:-len(REFINE)] if method.endswith(REFINE) else method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)} (each optionally with "
                         f"{REFINE})")
    cfg = get_preset(preset)
    over = {"guidance": {"prompt": obj.prompt}, "prior": {"model": model, "device": "cpu"},
            "optim": {"seed": seed, "checkpoint_every": 0, "preview_every": 0}}
    if resolution:
        over["prior"]["resolution"] = resolution
    if METHOD_GUIDANCE[method] is not None:  # the method's guidance, stretched from its preset's run length
        source = get_preset(METHOD_GUIDANCE[method]).with_steps(cfg.optim.steps).guidance
        over["guidance"].update({k: getattr(source, k) for k in GUIDANCE_FIELDS})
    cfg = cfg.replace(**over).with_steps(steps, rescale_schedules=rescale)
    return cfg.replace(**overrides) if overrides else cfg


# ------------------------------------------------------------------------------------------------- renders
def render_scene(scene, cams, render_cfg, renderer=None, shading: str = "albedo", background=None):
    """The engine's render of ``scene``: rgb ``[B, H, W, 3]`` and opacity ``[B, H, W]`` (CPU)."""
    from csd_backend.render.views import render_cameras_with_opacity

    bg = None if background is None else torch.tensor(background, dtype=torch.float32)
    return render_cameras_with_opacity(scene, cams, shading, render_cfg, renderer, bg)


@torch.no_grad()
def truth(obj: ToyObject, cams) -> Dict[str, torch.Tensor]:
    return render_object(obj, cams, "albedo", background=torch.ones(len(cams), 3), supersample=2)


def silhouette_iou(pred_opacity: torch.Tensor, true_cov: torch.Tensor) -> float:
    p, t = pred_opacity > 0.5, true_cov > 0.5
    union = (p | t).sum()
    return float((p & t).sum() / union) if union > 0 else float("nan")


def silhouette_size(pred_opacity: torch.Tensor, true_cov: torch.Tensor) -> float:
    """The run's silhouette area over the object's (opacity > 0.5 against coverage > 0.5, all views): above 1 the
    run is larger than its object, below 1 smaller (an IoU alone does not say which)."""
    return float((pred_opacity > 0.5).sum() / (true_cov > 0.5).sum().clamp(min=1))


def own_margin(ious: Dict[str, float], own: str, among: Optional[List[str]] = None) -> float:
    """The IoU against ``own`` minus the best IoU against another object (of ``among``, default all in ``ious``):
    issue 23 asks for 0.10 in every row of the cross-object table."""
    return ious[own] - max(v for k, v in ious.items() if k != own and (among is None or k in among))


def colour_error(albedo_black: torch.Tensor, opacity: torch.Tensor, gt: Dict[str, torch.Tensor]):
    """Mean |Δ| per channel and the mean rendered colour over pixels both silhouettes cover."""
    both = (opacity > 0.5) & (gt["mask"] > 0.5)
    if both.sum() == 0:
        return float("nan"), [float("nan")] * 3
    est = albedo_black[both] / opacity[both].unsqueeze(-1)
    ref = gt["albedo"][both] / gt["mask"][both].unsqueeze(-1)
    return float((est - ref).abs().mean()), [round(float(v), 3) for v in est.mean(0)]


# -------------------------------------------------------------------------------------------------- meshes
def part_shares(vertices: np.ndarray, faces: np.ndarray) -> List[float]:
    """The surface-area share of each part (faces joined by shared edges, as the export counts them), largest
    first."""
    from csd_backend.export.isosurface import component_labels

    v = vertices.astype(np.float64)[faces]
    area = np.bincount(component_labels(faces),
                       weights=0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1))
    return sorted((area / area.sum()).tolist(), reverse=True)


def mesh_points(scene, seed: int = 0, resolution: int = 128):
    """``N_POINTS`` points sampled (by area) on the exported mesh of ``scene`` (scene frame), or an error text.
    The info says how many parts the surface has before the export's floater rule (``parts_raw``) and the area
    share of its largest part (``largest_part``: a floater shows as a share below 1), and the parts kept."""
    import trimesh

    from csd_backend.errors import CSDError
    from csd_backend.export import ExportConfig, extract_textured_mesh
    from csd_backend.export.config import FLOATER_AREA
    from csd_backend.export.isosurface import remove_floaters

    try:
        mesh = extract_textured_mesh(scene, ExportConfig(resolution=resolution, texture_size=0, y_up=False,
                                                         face_budget=50000, remove_floaters=False))
    except CSDError as e:
        return None, {"faces": 0, "error": str(e)}
    vertices, faces = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    shares = part_shares(vertices, faces)
    vertices, faces, _ = remove_floaters(vertices, faces, FLOATER_AREA)  # what the export keeps
    tm = trimesh.Trimesh(vertices, faces, process=False)
    pts, _ = trimesh.sample.sample_surface(tm, N_POINTS, seed=seed)
    return np.asarray(pts), {"faces": int(len(faces)), "threshold": float(mesh.threshold),
                             "parts_raw": len(shares), "largest_part": shares[0],
                             "parts_kept": len(part_shares(vertices, faces))}


def mesh_scores(pts: Optional[np.ndarray], true_pts: np.ndarray) -> dict:
    """Chamfer (acc: mesh → truth, comp: truth → mesh, and their mean) and F-score at F_TAU."""
    from scipy.spatial import cKDTree

    if pts is None:
        return {"acc": math.nan, "comp": math.nan, "chamfer": math.nan, "fscore": 0.0}
    d_pred = cKDTree(true_pts).query(pts)[0]
    d_true = cKDTree(pts).query(true_pts)[0]
    prec, rec = float((d_pred < F_TAU).mean()), float((d_true < F_TAU).mean())
    f = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    return {"acc": float(d_pred.mean()), "comp": float(d_true.mean()),
            "chamfer": float((d_pred.mean() + d_true.mean()) / 2), "fscore": f, "precision": prec, "recall": rec}


# --------------------------------------------------------------------------------------------------- score
class Scorer:
    """Ground truth per object (masks, albedo, surface points) computed once."""

    def __init__(self, objects: List[ToyObject], size: int = EVAL_SIZE, points: bool = True):
        self.cams = eval_cameras(size)
        self.gt = {o.name: truth(o, self.cams) for o in objects}
        self.pts = {o.name: surface_points(o, N_POINTS).numpy() for o in objects} if points else {}
        self.objects = objects

    def score(self, scene, render_cfg, renderer=None, own=(), meshes: bool = True, normals: bool = True):
        """Silhouette IoU against every object; for each object in ``own``, also the colour and mesh scores.
        Returns ({object: scores}, renders); ``normals=False`` skips the normal-map render (only the sheet uses it)."""
        albedo, opacity = render_scene(scene, self.cams, render_cfg, renderer, "albedo", background=[0, 0, 0])
        normal = (render_scene(scene, self.cams, render_cfg, renderer, "textureless", background=[1, 1, 1])[0]
                  if normals else None)
        iou = {name: silhouette_iou(opacity, gt["mask"]) for name, gt in self.gt.items()}
        below = {name: silhouette_iou(opacity[BELOW], gt["mask"][BELOW]) for name, gt in self.gt.items()}
        pts, info = mesh_points(scene) if meshes else (None, {})
        out = {}
        for name in own:
            r = {"iou": dict(iou), "iou_below": below[name], "size": silhouette_size(opacity, self.gt[name]["mask"]),
                 **info}
            r["colour_err"], r["rgb"] = colour_error(albedo, opacity, self.gt[name])
            if meshes:
                r.update(mesh_scores(pts, self.pts[name]))
            out[name] = r
        return out, {"albedo": albedo, "opacity": opacity, "normal": normal}


def train_scene(cfg, prior, scene=None, every: int = 0, on_step=None):
    """The finished optimisation of ``cfg`` (from ``scene`` when given) and its training time in seconds (the
    time of ``on_step`` excluded). ``on_step(opt)`` is called after every ``every``-th step before the last."""
    from csd_backend.errors import EmptySceneError
    from csd_backend.optimize import Optimization

    opt = Optimization(cfg, prior, scene=scene)
    spent = [0.0]

    def progress(info):
        if every and on_step is not None and info.step % every == 0 and info.step < info.total:
            t = time.perf_counter()
            on_step(opt)
            spent[0] += time.perf_counter() - t

    t0 = time.perf_counter()
    try:
        opt.run(progress=progress)
    except EmptySceneError as e:  # scored as it is (nothing left: IoU 0) instead of ending the whole table
        print(f"{cfg.guidance.prompt!r}, seed {cfg.optim.seed}: {e}", flush=True)
    return opt, time.perf_counter() - t0 - spent[0]


def curve_point(step: int, scores: dict, own: str) -> list:
    """``[step, IoU against the own object, best IoU against another object, silhouette size]`` of a run's scores
    (``Scorer.score(...)[0][own]``)."""
    ious = scores["iou"]
    return [step, ious[own], max((v for k, v in ious.items() if k != own), default=math.nan), scores["size"]]


def refine_scene(stage1, obj: ToyObject, prior, seed: int):
    """Stage 2 of a trained stage-1 run (``REFINE_PRESET``, the object's prompt): (Optimization, seconds)."""
    from csd_backend.presets import get_preset
    from csd_backend.scene_kinds import starting_scene

    cfg = get_preset(REFINE_PRESET).replace(guidance={"prompt": obj.prompt},
                                            prior=dataclasses.asdict(stage1.config.prior),
                                            optim={"seed": seed, "checkpoint_every": 0, "preview_every": 0})
    t0 = time.perf_counter()
    opt, _ = train_scene(cfg, prior, starting_scene(stage1.trained_scene(), cfg.scene, cfg.optim.seed))
    return opt, time.perf_counter() - t0  # conversion included


_WORKER: dict = {}


def _run_one(job, scorer: Optional[Scorer] = None):
    """Train and score one (object, method) run; in a worker process the prior and the scorer are cached."""
    name, method, seed, steps, preset, model, resolution, meshes, threads, names, overrides, every, start, rescale = job
    from csd_backend.priors import load_prior

    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    obj = get_object(name)
    cfg = run_config(obj, method, steps, seed, preset, model, resolution, overrides, rescale)
    if scorer is None:
        if "scorer" not in _WORKER:
            _WORKER["scorer"] = Scorer([get_object(n) for n in names], points=meshes)
        scorer = _WORKER["scorer"]
    key = repr(cfg.prior)
    if key not in _WORKER:
        _WORKER[key] = load_prior(cfg.prior)
    curve = []

    def on_step(o):  # silhouette IoU during the run (stage 1 only)
        scores = scorer.score(o.trained_scene(), cfg.render, o.renderer, own=[name], meshes=False, normals=False)[0]
        curve.append(curve_point(o.step, scores[name], name))

    scene = None
    if start == "exact":  # the object itself, fitted to its exact renders: is it a fixed point of the distillation?
        from capacity_fit import exact_start
        from csd_backend.auto_backends import resolve_auto_backends

        cfg = resolve_auto_backends(cfg, "cpu")  # as a run from the blob would: its renderer's backend too
        scene = exact_start(cfg, obj)
        scores = scorer.score(scene, cfg.render, own=[name], meshes=False, normals=False)[0]
        curve.append(curve_point(0, scores[name], name))
    opt, secs = train_scene(cfg, _WORKER[key], scene=scene, every=every, on_step=on_step)
    if method.endswith(REFINE):
        opt, more = refine_scene(opt, obj, _WORKER[key], seed)
        secs += more
    rs, rend = scorer.score(opt.trained_scene(), cfg.render, opt.renderer, own=[name], meshes=meshes)
    r = rs[name]
    r["seconds"] = secs
    if curve or every:  # the last point is the final score (after stage 2 for a refined run: left out there)
        r["curve"] = curve + ([] if method.endswith(REFINE) else [curve_point(steps, r, name)])
    return r, rend


# ------------------------------------------------------------------------------------------------- outputs
def _fmt(v, nd=3):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _mean(values: list):
    """The mean of the seeds' values: numbers (NaN-aware), dicts and lists element-wise, else the first value."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _mean([v[k] for v in values if k in v]) for k in first}
    if isinstance(first, list) and all(isinstance(v, list) and len(v) == len(first) for v in values):
        return [_mean([v[i] for v in values]) for i in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        if all(v == first for v in values):  # e.g. the steps of a curve stay integers
            return first
        finite = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
        return sum(finite) / len(finite) if finite else math.nan
    return first


def combine_seeds(per_seed: Dict[int, dict], own: str) -> dict:
    """One result from the runs of several seeds: every score is the seeds' mean; ``per_seed`` keeps each run and
    ``iou_range`` the lowest and highest IoU against the own object."""
    runs = [per_seed[k] for k in sorted(per_seed)]
    if len(runs) == 1:
        return dict(runs[0])
    r = _mean(runs)
    ious = [x["iou"][own] for x in runs]
    r["iou_range"] = [min(ious), max(ious)]
    r["per_seed"] = {str(k): per_seed[k] for k in sorted(per_seed)}
    return r


def _iou_cell(r: dict, own: str) -> str:
    lo_hi = r.get("iou_range")
    return _fmt(r["iou"][own]) + (f" ({lo_hi[0]:.2f}–{lo_hi[1]:.2f})" if lo_hi else "")


def write_table(results: dict, objects: List[ToyObject], methods: List[str], path: Path, header: str) -> str:
    lines = [header, "",
             "| object | method | IoU ↑ | size | IoU below ↑ | Chamfer ↓ (acc / comp) | F@0.05 ↑ | largest part ↑ "
             "(parts) | colour err ↓ | mean rgb (true) | time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for o in objects:
        for m in ["blob"] + methods:
            r = results.get(f"{o.name}/{m}")
            if r is None:
                continue
            ch = f"{_fmt(r.get('chamfer'))} ({_fmt(r.get('acc'))} / {_fmt(r.get('comp'))})"
            rgb = r.get("rgb")
            rgb_s = "—" if rgb is None else "(" + ", ".join(f"{v:.2f}" for v in rgb) + ")"
            true_s = "(" + ", ".join(f"{v:.2f}" for v in o.color) + ")"
            parts = "—" if r.get("largest_part") is None else \
                f"{_fmt(r.get('largest_part'))} ({_fmt(r.get('parts_raw'), 1)} → {_fmt(r.get('parts_kept'), 1)})"
            size = "—" if r.get("size") is None else f"×{r['size']:.2f}"
            lines.append(f"| {o.name} | {m} | {_iou_cell(r, o.name)} | {size} | {_fmt(r.get('iou_below'))} | {ch} | "
                         f"{_fmt(r.get('fscore'))} | {parts} | "
                         f"{_fmt(r.get('colour_err'))} | {rgb_s} {true_s} | "
                         f"{_fmt(r.get('seconds'), 0) if r.get('seconds') else '—'} s |")
    names = [o.name for o in objects]
    for m in methods:
        rows = [(o.name, results.get(f"{o.name}/{m}")) for o in objects]
        if not all(r is not None for _, r in rows):
            continue
        lines += ["", f"Cross-object silhouette IoU, method {m} (row: the prompt's object; column: scored against; "
                      "**bold** = the row's best):", "",
                  "| prompt \\ object | " + " | ".join(names) + " | margin |", "|---|" + "---|" * (len(names) + 1)]
        for name, r in rows:
            best = max(names, key=lambda b: r["iou"][b])
            cells = [f"**{r['iou'][b]:.3f}**" if b == best else f"{r['iou'][b]:.3f}" for b in names]
            margin = f"{own_margin(r['iou'], name, names):+.3f}" if len(names) > 1 else "—"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {margin} |")
    blob = results.get("blob")
    if blob is not None:
        lines += ["", "| blob (step 0) | " + " | ".join(f"{blob['iou'][b]:.3f}" for b in names) + " | |"]
    exact = results.get("truth")
    if exact is not None and len(names) > 1:
        lines += ["", "The exact objects scored against each other (a perfect run's row; its margin is the most a row "
                      "can reach):", "", "| object \\ object | " + " | ".join(names) + " | margin |",
                  "|---|" + "---|" * (len(names) + 1)]
        lines += [f"| {a} | " + " | ".join(f"{exact[a][b]:.3f}" for b in names) +
                  f" | {own_margin(exact[a], a, names):+.3f} |" for a in names]
    lines += curve_table(results, objects, methods)
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def curve_table(results: dict, objects: List[ToyObject], methods: List[str]) -> List[str]:
    """The silhouette IoU during each run (``--every``, ``--start exact``): own object, the best other object in
    brackets, and the silhouette's size (its area over the object's)."""
    rows = [(o.name, m, results[f"{o.name}/{m}"]["curve"]) for m in methods for o in objects
            if "curve" in results.get(f"{o.name}/{m}", {})]
    if not rows:
        return []
    steps = sorted({p[0] for _, _, c in rows for p in c})
    lines = ["", "Silhouette IoU during the run: own object (best other object) ×size (the run's silhouette area over "
                 "the object's):", "",
             "| object | method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for name, m, curve in rows:
        at = {p[0]: p for p in curve}
        cells = [f"{at[s][1]:.3f} ({at[s][2]:.3f}) ×{at[s][3]:.2f}" if s in at else "—" for s in steps]
        lines.append(f"| {name} | {m} | " + " | ".join(cells) + " |")
    return lines


def write_sheet(rows: List[tuple], path: Path, views=(0, 2, 4, 8, 12)) -> None:
    """One block per run at a few of the eval views: its albedo renders on white (top), its normal maps (middle)
    and the true object (bottom)."""
    from PIL import Image, ImageDraw

    tiles = []
    for label, renders, gt in rows:
        top = torch.cat([renders["albedo"][v] + (1 - renders["opacity"][v]).unsqueeze(-1) for v in views], 1)
        middle = torch.cat([renders["normal"][v] for v in views], 1)
        bottom = torch.cat([gt["rgb"][v] for v in views], 1)
        tiles.append((label, torch.cat([top, middle, bottom], 0).clamp(0, 1)))
    H, W = tiles[0][1].shape[:2]
    label_w = 110
    canvas = Image.new("RGB", (label_w + W, len(tiles) * (H + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, t) in enumerate(tiles):
        canvas.paste(Image.fromarray((t.numpy() * 255 + 0.5).astype("uint8")), (label_w, i * (H + 4)))
        draw.text((4, i * (H + 4) + H // 2 - 20), label + "\n\ntop: run albedo\nmiddle: normals\nbottom: truth",
                  fill="black")
    canvas.save(path)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", default=",".join(o.name for o in OBJECTS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=0, help="training steps (default 0: the preset's own, 150 for preview-cpu)")
    ap.add_argument("--no-rescale-schedules", action="store_true",
                    help="with --steps: keep the preset's schedules in absolute steps instead of stretching them "
                         "(generate's option of that name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default="", metavar="S,S,...",
                    help="run every (object, method) with each of these seeds (instead of --seed) and report the "
                         "seeds' mean, with the range of the IoU: one seed's IoU varies by ±0.2 on this prior")
    ap.add_argument("--preset", default="preview-cpu")
    ap.add_argument("--model", default="toy", help="the prior (default: the shipped toy prior)")
    ap.add_argument("--resolution", type=int, default=0,
                    help="prior input size (default 0: the preset's, at most the model's native size)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a setting of every run (JSON values, in the run's own steps), e.g. "
                         "--set loss.opaque=0.1")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    ap.add_argument("--no-mesh", action="store_true", help="skip the mesh scores (faster)")
    ap.add_argument("--every", type=int, default=0, metavar="N",
                    help="also score the silhouette IoU every N steps during each run (a table of the curve: does "
                         "the shape hold, or peak and erode?); default 0: only at the end")
    ap.add_argument("--start", choices=("blob", "exact"), default="blob",
                    help="what each run starts from: the scene kind's own start (blob), or its object fitted to "
                         "exact renders (capacity_fit.py, 200 steps): does the distillation keep the exact object? "
                         "(its curve then starts at step 0)")
    ap.add_argument("--out", type=Path, default=Path("runs/shape_quality"))
    args = ap.parse_args(argv)
    if args.steps <= 0:
        from csd_backend.presets import get_preset

        args.steps = get_preset(args.preset).optim.steps
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    objects = [get_object(n.strip()) for n in args.objects.split(",") if n.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds.strip() else [args.seed]
    except ValueError:
        ap.error(f"--seeds takes whole numbers separated by commas, e.g. --seeds 0,1,2; got {args.seeds!r}")
    args.out.mkdir(parents=True, exist_ok=True)

    t_all = time.perf_counter()
    scorer = Scorer(objects, points=not args.no_mesh)
    results: Dict[str, dict] = {}
    sheet = []
    # the step-0 scene depends only on the seed and the scene settings: score it once per seed against every object
    from csd_backend.optimize import Optimization
    from csd_backend.priors import load_prior

    from csd_backend.runs.flags import parse_overrides

    overrides = parse_overrides(args.set)
    blobs, prior = {}, None
    for seed in seeds:
        cfg0 = run_config(objects[0], methods[0], args.steps, seed, args.preset, args.model,
                          args.resolution or None, overrides, not args.no_rescale_schedules)
        prior = prior or load_prior(cfg0.prior)  # the same for every seed: loaded once
        blob = Optimization(cfg0, prior).trained_scene()
        blobs[seed], rend = scorer.score(blob, cfg0.render, own=[b.name for b in objects], meshes=not args.no_mesh)
        if seed == seeds[0]:
            sheet.append(("blob (step 0)", rend, scorer.gt[objects[0].name]))
    for b in objects:
        results[f"{b.name}/blob"] = combine_seeds({k: v[b.name] for k, v in blobs.items()}, b.name)
    results["blob"] = results[f"{objects[0].name}/blob"]
    results["truth"] = {a: {b: silhouette_iou(scorer.gt[a]["mask"], scorer.gt[b]["mask"]) for b in scorer.gt}
                        for a in scorer.gt}

    jobs = [(o.name, m, seed) for m in methods for o in objects for seed in seeds]
    common = (args.steps, args.preset, args.model, args.resolution or None, not args.no_mesh,
              args.threads, [o.name for o in objects], overrides, max(args.every, 0), args.start,
              not args.no_rescale_schedules)

    def report(name, m, seed, r):
        print(f"{name:5s} {m} seed {seed}: IoU {r['iou'][name]:.3f} (best other "
              f"{max((v for k, v in r['iou'].items() if k != name), default=float('nan')):.3f}), "
              f"chamfer {_fmt(r.get('chamfer'))}, F {_fmt(r.get('fscore'))}, colour {_fmt(r.get('colour_err'))} "
              f"rgb {r.get('rgb')}, {r['seconds']:.0f} s", flush=True)

    outs = {}
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, (*job, *common)): job for job in jobs}
            for fut in as_completed(futures):
                outs[futures[fut]] = fut.result()
                report(*futures[fut], outs[futures[fut]][0])
    else:
        for job in jobs:
            outs[job] = _run_one((*job, *common), scorer)
            report(*job, outs[job][0])
    for o in objects:
        for m in methods:
            results[f"{o.name}/{m}"] = combine_seeds({seed: outs[(o.name, m, seed)][0] for seed in seeds}, o.name)
            sheet.append((f"{o.name} / {m}", outs[(o.name, m, seeds[0])][1], scorer.gt[o.name]))
    header = (f"Shape quality with the toy prior: preset {args.preset}, {args.steps} steps, "
              f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
              f"{', from the exact objects (--start exact)' if args.start == 'exact' else ''}"
              f"{', the schedules in absolute steps' if args.no_rescale_schedules else ''}"
              f"{' (the mean; IoU range in brackets)' if len(seeds) > 1 else ''}, "
              f"prior resolution {args.resolution or 'preset'}, {args.jobs} job(s) × {args.threads} torch thread(s); "
              f"{'settings ' + ' '.join(args.set) + '; ' if args.set else ''}"
              f"{len(eval_cameras())} views at {EVAL_SIZE}², distance {EVAL_DISTANCE}, fovy {EVAL_FOVY}; "
              f"total {time.perf_counter() - t_all:.0f} s")
    text = write_table(results, objects, methods, args.out / "table.md", header)
    (args.out / "scores.json").write_text(json.dumps(results, indent=2))
    write_sheet(sheet, args.out / "sheet.png")
    print(text)
    print(f"wrote {args.out / 'table.md'}, {args.out / 'scores.json'}, {args.out / 'sheet.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
