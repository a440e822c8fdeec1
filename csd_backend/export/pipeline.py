"""Scene → textured mesh: the isosurface of the density, then the UV atlas, the baked albedo texture and the
vertex colours. The scene is only read (inference mode, no change of its train/eval mode or parameters)."""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from .config import ExportConfig
from .isosurface import extract_isosurface
from .mesh import MeshError, TexturedMesh
from .texture import bake_texture, unwrap

#: ``progress(fraction of the whole export in [0, 1], stage)``; it may raise to cancel
ProgressCallback = Callable[[float, str], None]

#: the stages in order, each with its share of the whole export (density queries dominate on a CPU):
#: extraction (density sampling, marching cubes), simplification (floaters removed, decimation to the face
#: budget, normals), vertex colors, UVs (the xatlas unwrap) and baking (the albedo texture)
STAGES = {"extraction": (0.0, 0.66), "simplification": (0.66, 0.7), "vertex colors": (0.7, 0.72),
          "UVs": (0.72, 0.8), "baking": (0.8, 1.0)}
_STAGES = STAGES


def stage_fraction(fraction: float, stage: str) -> float:
    """The progress within ``stage`` (0..1) of an overall ``fraction`` reported with it."""
    a, b = STAGES[stage]
    return min(max((fraction - a) / (b - a), 0.0), 1.0)


class SceneField:
    """Chunked numpy access to a scene's density and albedo on the scene's own device and dtype.

    Works with any object that has ``volume.density(points) -> [N]`` and ``volume.albedo(points) -> [N, 3]`` (torch
    tensors in world units), e.g. ``csd_backend.scene.volume.Scene``.
    """

    def __init__(self, scene, chunk_size: int = 262144, tick: Optional[Callable[[float], None]] = None):
        import torch

        volume = getattr(scene, "volume", None)
        if volume is None or not hasattr(volume, "density") or not hasattr(volume, "albedo"):
            raise MeshError(f"expected a CSD scene with a volume (density and albedo), got {type(scene).__name__}")
        self.volume = volume
        self.chunk = int(chunk_size)
        self.tick = tick
        try:
            p = next(iter(volume.parameters()))
            self.device, self.dtype = p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
        except (AttributeError, StopIteration, TypeError):
            self.device, self.dtype = torch.device("cpu"), torch.float32
        radius = getattr(scene, "radius", None)
        self.radius = float(radius if radius is not None else volume.radius)

    def _query(self, fn, points: np.ndarray, dims: int) -> np.ndarray:
        import torch

        out = np.empty((len(points), dims) if dims > 1 else (len(points),), np.float32)
        with torch.inference_mode():
            for s in range(0, len(points), self.chunk):
                x = torch.from_numpy(np.ascontiguousarray(points[s:s + self.chunk], np.float32))
                y = fn(x.to(self.device, self.dtype))
                out[s:s + self.chunk] = y.float().cpu().numpy().reshape(out[s:s + self.chunk].shape)
                if self.tick is not None:  # the fraction of this query done
                    self.tick(min(s + self.chunk, len(points)) / max(len(points), 1))
        return out

    def density(self, points: np.ndarray) -> np.ndarray:
        """σ at ``points [N, 3]`` → ``[N]``."""
        return self._query(self.volume.density, points, 1)

    def albedo(self, points: np.ndarray) -> np.ndarray:
        """Albedo at ``points [N, 3]`` → ``[N, 3]`` in [0, 1]."""
        return self._query(self.volume.albedo, points, 3)


def extract_textured_mesh(scene, config: Optional[ExportConfig] = None,
                          progress: Optional[ProgressCallback] = None) -> TexturedMesh:
    """The textured mesh of ``scene`` (see ``ExportConfig``). Raises ``MeshError`` when there is no surface at the
    threshold (the message gives the density range) and ``ConfigError`` for invalid settings."""
    cfg = (config if config is not None else ExportConfig()).validate()
    t0 = time.perf_counter()

    last = {"stage": "extraction", "value": 0.0}

    def report(stage: str, frac: float) -> None:
        if progress is not None:
            a, b = STAGES[stage]
            last["stage"], last["value"] = stage, a + (b - a) * frac
            progress(last["value"], stage)

    def surface_progress(frac: float) -> None:  # the isosurface reports 0 … 0.9 while it samples the density
        if last["stage"] == "extraction":
            report("extraction", min(frac / 0.9, 1.0))
        else:
            report("simplification", frac)

    def tick(frac: float) -> None:  # after every chunk of queries: lets the callback cancel long albedo bakes too
        if progress is None:
            return
        if last["stage"] == "vertex colors":
            report("vertex colors", frac)
        elif last["stage"] == "baking":  # the albedo of every texel: between the rasterisation and the fill
            a, b = STAGES["baking"]
            progress(max(last["value"], a + (b - a) * (0.1 + 0.8 * frac)), "baking")
        else:
            progress(last["value"], last["stage"])

    field = SceneField(scene, cfg.chunk_size, tick=tick)
    iso = extract_isosurface(field.density, field.radius, resolution=cfg.resolution, threshold=cfg.threshold_value(),
                             coarse_to_fine=cfg.coarse_to_fine, narrow_band=cfg.narrow_band,
                             remove_floaters_fraction=cfg.floater_fraction if cfg.remove_floaters else None,
                             face_budget=cfg.face_budget, chunk_size=cfg.chunk_size,
                             progress=surface_progress, stage=lambda name: report("simplification", 0.0))
    info = dict(iso.info)
    timings = dict(info.pop("timings"))
    colors = None
    if cfg.vertex_colors or not cfg.texture_size:
        report("vertex colors", 0.0)
        t = time.perf_counter()
        colors = np.clip(field.albedo(iso.vertices), 0.0, 1.0)
        timings["vertex_colors"] = time.perf_counter() - t
    atlas = texture = None
    if cfg.texture_size:
        report("UVs", 0.0)
        t = time.perf_counter()
        atlas = unwrap(iso.vertices, iso.faces, cfg.texture_size, cfg.uv_padding)
        timings["unwrap"] = time.perf_counter() - t
        info.update(charts=atlas.charts, uv_parts=atlas.parts, uv_utilization=atlas.utilization)
        report("baking", 0.0)
        t = time.perf_counter()
        texture, bake_stats = bake_texture(iso.vertices, iso.faces, atlas, cfg.texture_size, field.albedo,
                                           progress=lambda f: report("baking", f))
        timings["bake"] = time.perf_counter() - t
        info.update(bake_stats)
    report(last["stage"], 1.0)
    if progress is not None and last["value"] < 1.0:  # no texture: the export ends after the vertex colours
        progress(1.0, last["stage"])
    timings["total"] = time.perf_counter() - t0
    info["timings"] = timings
    info["config"] = cfg.to_dict()
    return TexturedMesh(
        vertices=iso.vertices, faces=iso.faces, normals=iso.normals, threshold=iso.threshold, bbox=iso.bbox,
        vertex_colors=colors, uv=None if atlas is None else atlas.uv,
        uv_faces=None if atlas is None else atlas.uv_faces, uv_vertex=None if atlas is None else atlas.uv_vertex,
        texture=texture, y_up=cfg.y_up, info=info)
