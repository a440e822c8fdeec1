"""Render the toy prior's training set: the objects of ``objects.py`` seen the way the engine sees a scene.

* Cameras: ``csd_backend.render.cameras.sample_cameras`` with the camera settings of the presets (``csd-coarse``:
  elevation −10…90° with the official ``csd-r1`` sampling, ``sds-dreamfusion``: −10…45° uniform; distance
  1.5–2, fovy 40–70, stratified azimuths) and its light positions; rays from ``get_rays`` (64×64, 2×2
  supersampled).
* Shadings as ``volume_renderer.py``: albedo, ``textureless`` normal maps n·0.5+0.5 (CSD presets), Lambertian
  ``diffuse`` (albedo·(0.1 + 0.9·max(0, n·l))) and the grey Lambertian ``textureless`` of the SDS preset.
* Backgrounds: random solid colours (the engine's ``random_background_prob``), white, grey, and smooth random
  environment maps (sigmoid of a random band-2 spherical-harmonics function of the ray direction, the same
  family as the engine's neural environment map).

Captions are not stored: each image keeps its object, elevation and azimuth, and ``train.py`` draws a caption
per sample (view-suffixed, plain, empty or the default negative prompt).

    python benchmarks/toy_prior/render_dataset.py --per-object 64 --out /tmp/toy_data.pt --sheet sheet.png
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parents[1], _HERE.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from toy_prior.objects import OBJECTS, ToyObject, get_object, render_object  # noqa: E402

IMAGE_SIZE = 64
#: (camera preset, probability): whose camera settings the views are drawn from
CAMERA_MIX = (("csd-coarse", 0.7), ("sds-dreamfusion", 0.3))
SHADING_MIX = (("albedo", 0.55), ("textureless", 0.20), ("diffuse", 0.15), ("grey", 0.10))
BACKGROUND_MIX = (("solid", 0.35), ("white", 0.15), ("grey", 0.10), ("env", 0.40))
#: variants (``render_dataset(variants=True)``): what changes — the apparent size, the colour or both — and how
VARIANT_MIX = (("size", 0.5), ("colour", 0.25), ("size+colour", 0.25))
#: the other kind of variant (``render_dataset(variant_mix=MORPH_MIX)``): the object's shape blended with another's
MORPH_MIX = (("morph", 1.0),)
#: morphs and resized objects, half each (a morph is often smaller than its object: the resized ones say that a
#: smaller or a larger object is not the prompt either)
MORPH_SIZE_MIX = (("morph", 0.5), ("size", 0.5))
#: a morph's share of the other object's signed distance
MORPH_RANGE = (0.3, 0.7)
#: the third kind (``render_dataset(variant_mix=BLOB_MIX)``): the object on its way from the engine's starting
#: blob — its signed distance blended with ``BLOB``'s (a share in ``BLOB_RANGE``): rounder, larger, holes closing
BLOB_MIX = (("blob", 1.0),)
#: the sphere every object fits in (objects.py), the size of the engine's starting blob (``density_blob_std`` 0.5)
BLOB = ToyObject("blob", "", (0.5, 0.5, 0.5), lambda p: p.norm(dim=-1) - 0.5, bound=0.55,
                 box=((-0.5,) * 3, (0.5,) * 3), description="sphere, radius 0.5")
#: the objects that are spheres about the origin, as ``BLOB`` is: a blend of the two is the object at another size, so
#: their ``"blob+sized"`` variants are morphs instead (the object itself would be in ∅)
SPHERES = frozenset({"ball"})
#: a blob morph's share of ``BLOB``'s distance (0.1: the cube at volume IoU 0.85, 0.4: 0.63)
BLOB_RANGE = (0.1, 0.4)
#: morphs and blob morphs, half each (the morphs are often smaller than their object, the blob morphs larger)
MORPH_BLOB_MIX = (("morph", 0.5), ("blob", 0.5))
#: the same, each recoloured as the colour variants (in the object's own colour, shapes between the objects in ∅
#: also say that the prompt's colour is not what tells it from ∅)
MORPH_BLOB_RECOLOUR_MIX = (("morph+colour", 0.5), ("blob+colour", 0.5))
#: morphs and blob morphs, each seen at its object's own apparent size (``+sized``: neither smaller nor larger, so
#: that only the shape tells them from the object), half of them recoloured
MORPH_BLOB_SIZED_MIX = (("morph+sized", 0.25), ("blob+sized", 0.25),
                        ("morph+sized+colour", 0.25), ("blob+sized+colour", 0.25))
#: those and the object itself resized, a fifth each (at one apparent size, ``--relative-distance``, what tells a
#: larger or smaller object from the prompt)
MORPH_BLOB_SIZED_RESIZE_MIX = (("morph+sized", 0.2), ("blob+sized", 0.2), ("morph+sized+colour", 0.2),
                               ("blob+sized+colour", 0.2), ("size", 0.2))
#: a variant's apparent size is the object's times one of these ranges (smaller or larger; never about its own)
VARIANT_SCALES = ((0.6, 0.8), (1.25, 1.6))
#: a variant's albedo moves by up to this much per channel (at least 0.15 in one channel), then clipped to [0, 1]
VARIANT_COLOUR_SHIFT = 0.35
#: cameras drawn per call of the sampler (the csd-r1 elevation rule picks one of its two modes per call)
CAMERA_CHUNK = 8


def _pick(mix, g: torch.Generator) -> str:
    """A name of ``mix`` ((name, probability) pairs) drawn from ``g``; a mix of one name draws nothing."""
    names, probs = zip(*mix)
    return names[0] if len(names) == 1 else names[int(torch.multinomial(torch.tensor(probs), 1, generator=g))]


def _uniform(bounds: Tuple[float, float], g: torch.Generator) -> float:
    lo, hi = bounds
    return float(lo + (hi - lo) * torch.rand(1, generator=g))


def _logit(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(1e-4, 1 - 1e-4)
    return torch.log(x / (1 - x))


def distance_range(text: str) -> Tuple[float, float]:
    """``"A,B"`` → ``(A, B)`` with 0 < A ≤ B (the ``--relative-distance`` option of this script and train.py)."""
    try:
        a, b = (float(x) for x in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers A,B (e.g. 0.85,0.95), got {text!r}") from None
    if not 0 < a <= b:
        raise argparse.ArgumentTypeError(f"expected 0 < A <= B, got {text!r}")
    return a, b


def random_backgrounds(kinds, g: torch.Generator) -> torch.Tensor:
    """Environment-map coefficients ``[B, 3, 9]`` (``sigmoid(c · SH(d))``); a solid colour is the DC term only."""
    B = len(kinds)
    coeffs = torch.zeros(B, 3, 9)
    for i, kind in enumerate(kinds):
        if kind == "env":
            scale = 0.2 + 1.8 * torch.rand(1, generator=g)
            coeffs[i] = torch.randn(3, 9, generator=g) * scale
            coeffs[i, :, 0] = torch.randn(3, generator=g) * 2.0  # the mean colour
            continue
        if kind == "solid":
            color = torch.rand(3, generator=g)
        elif kind == "white":
            color = torch.ones(3)
        else:  # grey
            color = torch.full((3,), float(0.2 + 0.7 * torch.rand(1, generator=g)))
        coeffs[i, :, 0] = _logit(color) / 0.2820948
    return coeffs


def sample_views(n: int, g: torch.Generator, relative_distance: Optional[Sequence[float]] = None):
    """``n`` training cameras (64×64) drawn with the presets' camera settings, in chunks of CAMERA_CHUNK. With
    ``relative_distance`` ``(a, b)`` the distance is ``U[a, b] / tan(fovy / 2)`` (``camera.relative_distance``):
    every object fills about the same part of every view, whatever the field of view."""
    from csd_backend.presets import get_preset
    from csd_backend.render.cameras import Cameras, sample_cameras

    size = dict(batch_size=CAMERA_CHUNK, height=IMAGE_SIZE, width=IMAGE_SIZE)
    if relative_distance is not None:
        size.update(relative_distance=True, distance_range=[float(d) for d in relative_distance])
    cfgs = {name: dataclasses.replace(get_preset(name).camera, **size) for name, _ in CAMERA_MIX}
    parts = []
    while sum(len(p) for p in parts) < n:
        cfg = cfgs[_pick(CAMERA_MIX, g)]
        parts.append(sample_cameras(cfg, step=1, generator=g))  # step > 0: no fixed first view
    cat = lambda k: torch.cat([getattr(p, k) for p in parts])[:n]  # noqa: E731
    return Cameras(cat("c2w"), cat("fovy"), cat("elevation"), cat("azimuth"), cat("distance"),
                   cat("light_positions"), IMAGE_SIZE, IMAGE_SIZE)


#: the directions ``silhouette_area`` looks from, (elevation, azimuth) in degrees: around the object, level and
#: from above, as most of the dataset's views (the area of a parallel projection is the same from the opposite side)
AREA_VIEWS = tuple((e, a) for e in (0, 30) for a in (0, 45, 90, 135))


def silhouette_area(obj, resolution: int = 40) -> float:
    """How large ``obj`` looks: its silhouette's area seen along each of ``AREA_VIEWS`` (a parallel projection of
    its occupancy on a ``resolution``³ grid over [−0.6, 0.6]³ turned to the view), as a fraction of the square
    [−0.6, 0.6]², averaged over the views — what a ``"+sized"`` variant keeps."""
    s = torch.linspace(-0.6, 0.6, resolution)
    grid = torch.stack(torch.meshgrid(s, s, s, indexing="ij"), -1).reshape(-1, 3)  # (depth, across, up)
    areas = []
    for elevation, azimuth in AREA_VIEWS:
        e, a = math.radians(elevation), math.radians(azimuth)
        depth = torch.tensor([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
        across = torch.tensor([-math.sin(a), math.cos(a), 0.0])
        up = torch.linalg.cross(depth, across)
        occupied = (obj.sdf_fn(grid @ torch.stack([depth, across, up])) < 0).reshape(resolution, -1)
        areas.append(float(occupied.any(0).float().mean()))
    return sum(areas) / len(areas)


@functools.lru_cache(maxsize=None)
def _object_area(name: str) -> float:
    return silhouette_area(get_object(name))


def _moved(cams, f: torch.Tensor):
    """``cams`` with each camera moved along its line to the origin so that everything looks ``f`` times as large."""
    c2w = cams.c2w.clone()
    c2w[:, :3, 3] /= f[:, None]
    return dataclasses.replace(cams, c2w=c2w, distance=cams.distance / f)


def at_size_of(exact, obj, cams):
    """``cams`` moved so that ``obj`` (a variant of ``exact``, one of ``OBJECTS``) looks as large as ``exact``."""
    return _moved(cams, torch.full((len(cams),), math.sqrt(_object_area(exact.name) / silhouette_area(obj))))


def morph_object(obj, other, share: float):
    """``obj`` whose signed distance is ``(1 − share)·obj + share·other`` (a shape between the two; a convex mix of
    1-Lipschitz distances is 1-Lipschitz, a distance bound that sphere tracing can step by), with ``obj``'s name and
    colour."""
    f, h = obj.sdf_fn, other.sdf_fn
    box = (tuple(map(min, obj.box[0], other.box[0])), tuple(map(max, obj.box[1], other.box[1])))
    return dataclasses.replace(obj, sdf_fn=lambda p: (1 - share) * f(p) + share * h(p),
                               bound=max(obj.bound, other.bound), box=box)


def _variant(obj, cams, g: torch.Generator, mix=VARIANT_MIX):
    """The object and cameras of one batch of variants (a kind drawn from ``mix``): seen larger or smaller (each
    camera moved along its line to the origin by the factor) and/or with another albedo, or its shape morphed with
    another object's (``morph_object``, a share in ``MORPH_RANGE``) or with ``BLOB`` (a share in ``BLOB_RANGE``).
    A kind's ``"+"`` modifiers: ``"+sized"`` moves the cameras so that the variant looks as large as its object
    (``silhouette_area``), ``"+colour"`` recolours it (``"size+colour"``: resized and recoloured)."""
    kind, *mods = _pick(mix, g).split("+")  # "blob+sized+colour": a blob morph, at the object's size, recoloured
    exact = obj
    if kind == "blob" and "sized" in mods and obj.name in SPHERES:
        kind = "morph"
    if kind == "blob":
        obj = morph_object(obj, BLOB, _uniform(BLOB_RANGE, g))
    if kind == "morph":
        others = [o for o in OBJECTS if o.name != obj.name]
        other = others[int(torch.randint(0, len(others), (1,), generator=g))]
        obj = morph_object(obj, other, _uniform(MORPH_RANGE, g))
    if kind == "size":
        lo, hi = VARIANT_SCALES[int(torch.randint(0, len(VARIANT_SCALES), (1,), generator=g))]
        cams = _moved(cams, lo + (hi - lo) * torch.rand(len(cams), generator=g))
    if "sized" in mods:
        cams = at_size_of(exact, obj, cams)
    if "colour" in (kind, *mods):
        shift = (torch.rand(3, generator=g) * 2 - 1) * VARIANT_COLOUR_SHIFT
        k = int(shift.abs().argmax())
        shift[k] = shift[k].sign() * max(float(shift[k].abs()), 0.15)
        color = tuple(float(c) for c in (torch.tensor(obj.color) + shift).clamp(0, 1))
        obj = dataclasses.replace(obj, color=color)
    return obj, cams


def render_dataset(per_object: int, seed: int = 0, batch: int = 8, log=print,
                   relative_distance: Optional[Sequence[float]] = None,
                   variants: bool = False, variant_mix=VARIANT_MIX) -> Dict[str, torch.Tensor]:
    """Images ``uint8 [N, 64, 64, 3]`` with ``object`` ``[N]`` (index into OBJECTS), ``elevation``/``azimuth``
    ``[N]`` degrees, ``shading`` ``[N]`` (index into SHADING_MIX), ``background`` ``[N]`` (BACKGROUND_MIX) and
    ``variant`` ``[N]`` (bool); ``relative_distance``: see :func:`sample_views`.

    ``variants``: every image is a variant of its object that no caption names — seen at 0.6–0.8× or 1.25–1.6× its
    apparent size, or with its albedo moved (up to ±0.35 per channel), or both (``variant_mix``, default
    ``VARIANT_MIX``), or its shape morphed with another object's (``MORPH_MIX``) or with the starting blob
    (``BLOB_MIX``). ``train.py
    --variants-per-object`` captions them only with the unconditional captions, so that a prompt's classifier
    direction ε(y) − ε(∅) tells the object from ∅ by its size and colour as well as its shape."""
    g = torch.Generator().manual_seed(seed)
    shading_names = [s for s, _ in SHADING_MIX]
    bg_names = [b for b, _ in BACKGROUND_MIX]
    out = {k: [] for k in ("images", "object", "elevation", "azimuth", "shading", "background", "variant")}
    t0 = time.perf_counter()
    for oi, obj in enumerate(OBJECTS):
        cams = sample_views(per_object, g, relative_distance)
        for s in range(0, per_object, batch):
            sl = slice(s, min(s + batch, per_object))
            sub = cams[sl]
            target = obj
            if variants:
                target, sub = _variant(obj, sub, g, variant_mix)
            shading = _pick(SHADING_MIX, g)
            kinds = [_pick(BACKGROUND_MIX, g) for _ in range(len(sub))]
            r = render_object(target, sub, "albedo" if shading == "albedo" else shading,
                              env_coeffs=random_backgrounds(kinds, g))
            out["images"].append((r["rgb"].clamp(0, 1) * 255 + 0.5).to(torch.uint8))
            out["object"].append(torch.full((len(sub),), oi, dtype=torch.long))
            out["elevation"].append(sub.elevation.clone())
            out["azimuth"].append(sub.azimuth.clone())
            out["shading"].append(torch.full((len(sub),), shading_names.index(shading), dtype=torch.long))
            out["background"].append(torch.tensor([bg_names.index(k) for k in kinds]))
            out["variant"].append(torch.full((len(sub),), variants))
        log(f"  rendered {obj.name}: {per_object} images ({time.perf_counter() - t0:.1f} s so far)")
    return {k: torch.cat(v) for k, v in out.items()}


def save_sheet(data: Dict[str, torch.Tensor], path: Path, per_object: int = 12) -> None:
    """A PNG with the first ``per_object`` images of every object (one row per object)."""
    from PIL import Image

    rows = []
    for oi in range(len(OBJECTS)):
        idx = torch.nonzero(data["object"] == oi).squeeze(-1)[:per_object]
        rows.append(torch.cat(list(data["images"][idx]), 1))
    Image.fromarray(torch.cat(rows, 0).numpy()).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-object", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="save the tensors here (torch.save)")
    ap.add_argument("--sheet", type=Path, default=None, help="write a PNG with some images of every object")
    ap.add_argument("--relative-distance", type=distance_range, default=None, metavar="A,B",
                    help="camera distance U[A, B] / tan(fovy / 2) (the same apparent size in every view)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = render_dataset(args.per_object, args.seed, relative_distance=args.relative_distance)
    print(f"{len(data['images'])} images in {time.perf_counter() - t0:.1f} s")
    if args.out:
        torch.save(data, args.out)
    if args.sheet:
        save_sheet(data, args.sheet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
