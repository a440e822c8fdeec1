"""A scene from a user's mesh file (texturing): read a GLB/glTF/OBJ/PLY/STL/OFF, check and tidy it, and make a
``mesh`` scene of it, centred and scaled into the scene's ball; the scene's ``FixedMeshGeometry`` keeps the
similarity so that the export is written back in the file's units and orientation.

numpy, torch and the mesh tools are imported on use: the ComfyUI nodes read ``MESH_SUFFIXES`` at start-up, and
the pack imports without them.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

#: the normalised mesh fits in a ball of this radius (world units) around the origin: the closest, narrowest
#: training camera (distance 1.5, fovy 40°) still sees all of it
MESH_RADIUS = 0.5
#: meshes with more faces are decimated to ``DECIMATE_TO`` before texturing (said in a warning); the export keeps
#: the decimated mesh's faces (no face budget applies to a fixed mesh)
MAX_FACES = 500_000
DECIMATE_TO = 200_000
MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")


def y_up_to_scene(points):
    """glTF's frame (Y up, front +z) → the scene's (Z up, front +x): the inverse of ``export.mesh.scene_to_y_up``."""
    return points[:, [2, 0, 1]]


def read_mesh_file(path) -> tuple:
    """``(vertices [V, 3] float32, faces [F, 3] int64)`` of a GLB/glTF/OBJ/PLY/STL/OFF file (every part of a
    scene file joined, in its own frame). Raises ``MeshError`` naming the file and the problem."""
    import numpy as np

    from ..export.mesh import MeshError

    path = Path(path)
    if not path.is_file():
        raise MeshError(f"mesh file not found: {path}")
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise MeshError(f"{path.name}: unsupported mesh format {path.suffix!r}; use one of "
                        f"{', '.join(MESH_SUFFIXES)}")
    try:
        import trimesh

        loaded = trimesh.load(str(path), force="mesh", process=False)
    except ImportError as e:  # pragma: no cover - trimesh is a dependency
        raise MeshError("reading meshes needs trimesh: pip install trimesh") from e
    except Exception as e:  # trimesh raises many kinds on a damaged file
        raise MeshError(f"cannot read the mesh {path.name}: {e}") from None
    faces = np.asarray(getattr(loaded, "faces", np.zeros((0, 3))), np.int64).reshape(-1, 3)
    vertices = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))), np.float32).reshape(-1, 3)
    return vertices, faces


def prepare_mesh(vertices, faces, y_up: bool = True, name: str = "the mesh") -> tuple:
    """Check and tidy a user's mesh: ``(vertices in the scene frame, faces, info)``. Errors name the problem;
    a mesh over ``MAX_FACES`` faces is decimated (logged as a warning)."""
    import numpy as np

    from ..export.isosurface import compact, simplify
    from ..export.mesh import MeshError

    v = np.asarray(vertices, np.float32).reshape(-1, 3)
    f = np.asarray(faces, np.int64).reshape(-1, 3)
    if len(f) == 0:
        raise MeshError(f"{name} has no faces (a point cloud or an empty file?); give a triangle mesh")
    if len(v) == 0 or f.min() < 0 or f.max() >= len(v):
        raise MeshError(f"{name} has faces that index missing vertices (indices {int(f.min())}..{int(f.max())} "
                        f"for {len(v)} vertices); the file is damaged")
    if not np.isfinite(v).all():
        raise MeshError(f"{name} has NaN or infinite vertex positions; repair it in a mesh editor first")
    v, f = compact(v, f)
    if len(f) == 0:
        raise MeshError(f"{name} has only degenerate faces")
    info = {"faces_input": int(len(f))}
    if len(f) > MAX_FACES:
        log.warning("%s has %d faces; decimating it to %d for texturing (the export writes that decimated mesh, "
                    "with all its faces)", name, len(f), DECIMATE_TO)
        v, f = simplify(v, f, DECIMATE_TO)
        info["decimated_to"] = int(len(f))
    extent = float(np.abs(v - (v.max(0) + v.min(0)) / 2).max())
    if extent <= 0:
        raise MeshError(f"{name} is a single point (all its vertices coincide)")
    return (y_up_to_scene(v) if y_up else v), f, info


def with_scene_settings(scene, cfg, seed: Optional[int] = None):
    """The same fixed mesh in a new ``mesh`` scene whose texture field and background follow scene settings ``cfg``
    (a texturing preset's), their first weights drawn from ``seed``: how a run textures a mesh that was loaded
    before its settings were chosen."""
    import torch

    from ..scene.mesh_scene import MeshScene

    g = scene.geometry
    cfg = dataclasses.replace(cfg, kind="mesh", fix_geometry=True, bbox=scene.cfg.bbox)
    device = g.vertices.device
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = MeshScene(cfg, device).to(device)
    out.geometry.set_mesh(g.vertices, g.faces, g.center, float(g.scale), bool(g.source_y_up))
    out.info = dict(getattr(scene, "info", {}))
    return out


def mesh_scene(vertices, faces, cfg, y_up: bool = True, name: str = "the mesh", device=None,
               seed: Optional[int] = None):
    """A ``mesh`` MeshScene of a user's mesh (arrays in its own frame; ``y_up``: glTF convention, else Z up),
    centred and scaled into a ball of ``MESH_RADIUS``; the export undoes both. ``seed``: the texture field's and
    the background's first weights follow it (else torch's global random state)."""
    import numpy as np
    import torch

    from ..scene.mesh_scene import MeshScene

    v, f, info = prepare_mesh(vertices, faces, y_up, name)
    center = (v.max(0) + v.min(0)) / 2
    scale = MESH_RADIUS / float(np.linalg.norm(v - center, axis=-1).max())
    world = (v - center) * scale
    lo, hi = world.min(0) - 0.05, world.max(0) + 0.05
    cfg = dataclasses.replace(cfg, kind="mesh", fix_geometry=True,
                              bbox=[[float(x) for x in lo], [float(x) for x in hi]])
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        scene = MeshScene(cfg, device)
    scene.geometry.set_mesh(torch.from_numpy(world.astype(np.float32)), torch.from_numpy(f),
                            torch.from_numpy(center.astype(np.float32)), scale, y_up)
    scene.info = info
    return scene
