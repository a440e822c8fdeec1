"""Mesh export (spec §5.3, §5.5): scene → isosurface → UV atlas + baked albedo texture → GLB / OBJ / PLY.

Main entry points::

    from csd_backend.export import ExportConfig, extract_textured_mesh, save_mesh
    mesh = extract_textured_mesh(scene, ExportConfig(resolution=256, threshold="auto", texture_size=1024))
    save_mesh(mesh, "out/mesh.glb")            # never overwrites; .obj writes .mtl + .png beside it

Modules: ``config`` (ExportConfig), ``mesh`` (TexturedMesh, MeshError, ComfyUI tensors), ``isosurface`` (grid,
threshold, marching cubes, clean-up), ``texture`` (xatlas unwrap, UV rasteriser, bake, gutter fill),
``writers`` (files, output names), ``pipeline`` (scene → TexturedMesh), ``splats`` (Gaussian splats ↔ 3DGS .ply).

Needs scikit-image (marching cubes), scipy, trimesh, and for textures xatlas, for simplification
fast-simplification; each is imported when used and a missing one raises ``MeshError`` naming the pip package.
The names below are loaded on first use, so ``import csd_backend.export.config`` stays cheap (no torch).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AUTO": "config", "ExportConfig": "config",
    "Isosurface": "isosurface", "extract_isosurface": "isosurface",
    "MeshError": "mesh", "TexturedMesh": "mesh", "mesh_tensors": "mesh", "scene_to_y_up": "mesh",
    "SceneField": "pipeline", "extract_textured_mesh": "pipeline",
    "UVAtlas": "texture", "bake_texture": "texture", "sample_texture": "texture", "unwrap": "texture",
    "FORMATS": "writers", "check_portable_name": "writers", "portable_name_error": "writers",
    "relative_model_path": "writers", "resolve_output_prefix": "writers",
    "save_mesh": "writers", "save_mesh_unique": "writers", "save_unique": "writers", "to_trimesh": "writers",
    "load_splats": "splats", "read_splats": "splats", "write_splats": "splats", "save_splats_unique": "splats",
    "SplatFileError": "splats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
