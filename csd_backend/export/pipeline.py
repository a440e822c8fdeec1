"""Scene → textured mesh: the isosurface of the density, then the UV atlas, the baked albedo texture and the
vertex colours. The scene is only read (inference mode, no change of its train/eval mode or parameters)."""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from .config import ExportConfig
from .isosurface import Isosurface, clean_mesh, extract_isosurface, vertex_normals
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

    Works with any object that has ``albedo(points) -> [N, 3]`` and, for the density, ``volume.density(points)
    -> [N]`` (torch tensors in world units): ``csd_backend.scene.volume.Scene``, a ``MeshScene`` or a
    ``GaussianScene`` (its ``volume`` is the splats' density field, ``scene/gaussian_field.py``).
    """

    def __init__(self, scene, chunk_size: int = 262144, tick: Optional[Callable[[float], None]] = None):
        import torch

        if not hasattr(scene, "albedo") and not hasattr(getattr(scene, "volume", None), "albedo"):
            raise MeshError(f"expected a CSD scene (a volume or a mesh scene), got {type(scene).__name__}")
        self.scene = scene
        self.volume = getattr(scene, "volume", None)
        self.chunk = int(chunk_size)
        self.tick = tick
        try:
            p = next(iter(scene.parameters()))
            self.device, self.dtype = p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
        except (AttributeError, StopIteration, TypeError):
            self.device, self.dtype = torch.device("cpu"), torch.float32
        radius = getattr(scene, "radius", None)
        self.radius = float(radius if radius is not None else self.volume.radius)

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
        if self.volume is None or not hasattr(self.volume, "density"):
            raise MeshError(f"a {getattr(self.scene, 'kind', 'mesh')} scene has no density")
        return self._query(self.volume.density, points, 1)

    def albedo(self, points: np.ndarray) -> np.ndarray:
        """Albedo at ``points [N, 3]`` → ``[N, 3]`` in [0, 1]."""
        fn = self.scene.albedo if hasattr(self.scene, "albedo") else self.volume.albedo
        return self._query(fn, points, 3)


def mesh_scene_surface(scene, floater_area: Optional[float], face_budget: int) -> Isosurface:
    """The surface of a mesh scene is its own mesh (stage 2: the DMTet mesh, no marching cubes), cleaned as an
    isosurface is; a fixed user mesh keeps its winding, every part and every face (``face_budget`` is not applied:
    a mesh over ``convert.mesh_file.MAX_FACES`` was decimated once, for texturing, when its scene was made, and the
    export writes that mesh)."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        v, f = scene.mesh()
        vertices, faces = v.detach().float().cpu().numpy(), f.cpu().numpy().astype(np.int64)
    if len(faces) == 0:
        raise MeshError("the mesh scene has no surface (its SDF has no zero crossing inside the grid); the run "
                        "diverged or the stage-1 scene was empty: refine from an earlier checkpoint")
    fixed = scene.kind == "mesh"
    info: dict = {"faces_scene": int(len(faces))}
    vertices, faces = clean_mesh(vertices, faces, None if fixed else floater_area, 0 if fixed else face_budget,
                                 orient=not fixed, info=info)
    info["timings"] = {"cleanup": time.perf_counter() - t0}
    box = np.stack([vertices.min(0), vertices.max(0)]).astype(np.float32)
    return Isosurface(vertices.astype(np.float32), faces, vertex_normals(vertices, faces), float("nan"), box, info)


def source_units(scene, vertices: np.ndarray) -> np.ndarray:
    """World vertices of a fixed-mesh scene in the units of the mesh it was made from."""
    import torch

    with torch.inference_mode():
        out = scene.geometry.to_source(torch.from_numpy(vertices).to(scene.geometry.vertices))
    return out.cpu().numpy().astype(np.float32)


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
    floaters = cfg.floater_area if cfg.remove_floaters else None
    if getattr(scene, "kind", "volume") in ("volume", "gaussians"):  # a density field: marching cubes
        iso = extract_isosurface(field.density, field.radius, resolution=cfg.resolution,
                                 threshold=cfg.threshold_value(), coarse_to_fine=cfg.coarse_to_fine,
                                 narrow_band=cfg.narrow_band, floater_area=floaters,
                                 face_budget=cfg.face_budget, chunk_size=cfg.chunk_size,
                                 progress=surface_progress, stage=lambda name: report("simplification", 0.0))
    else:
        report("simplification", 0.0)
        iso = mesh_scene_surface(scene, floaters, cfg.face_budget)
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
    vertices, y_up = iso.vertices, cfg.y_up
    if getattr(scene, "kind", "volume") == "mesh":  # a user's mesh goes back to its own units and frame
        vertices, y_up = source_units(scene, vertices), bool(scene.geometry.source_y_up)
    return TexturedMesh(
        vertices=vertices, faces=iso.faces, normals=iso.normals, threshold=iso.threshold, bbox=iso.bbox,
        vertex_colors=colors, uv=None if atlas is None else atlas.uv,
        uv_faces=None if atlas is None else atlas.uv_faces, uv_vertex=None if atlas is None else atlas.uv_vertex,
        texture=texture, y_up=y_up, info=info)
