"""Mesh export (spec §5.3, §5.5): scene → isosurface → UV atlas + baked albedo texture → GLB / OBJ / PLY.

Main entry points::

    from csd_backend.export import ExportConfig, extract_textured_mesh, save_mesh
    mesh = extract_textured_mesh(scene, ExportConfig(resolution=256, threshold="auto", texture_size=1024))
    save_mesh(mesh, "out/mesh.glb")            # never overwrites; .obj writes .mtl + .png beside it

Needs scikit-image (marching cubes), scipy, trimesh, and for textures xatlas, for simplification
fast-simplification; each is imported when used and a missing one raises ``MeshError`` naming the pip package.
"""
from .config import AUTO, ExportConfig
from .isosurface import Isosurface, extract_isosurface
from .mesh import MeshError, TexturedMesh, mesh_tensors, scene_to_y_up
from .pipeline import SceneField, extract_textured_mesh
from .texture import UVAtlas, bake_texture, sample_texture, unwrap
from .writers import (FORMATS, relative_model_path, resolve_output_prefix, save_mesh, save_mesh_unique,
                      to_trimesh)

__all__ = ["AUTO", "ExportConfig", "Isosurface", "extract_isosurface", "MeshError", "TexturedMesh", "mesh_tensors",
           "scene_to_y_up", "SceneField", "extract_textured_mesh", "UVAtlas", "bake_texture", "sample_texture",
           "unwrap", "FORMATS", "relative_model_path", "resolve_output_prefix", "save_mesh", "save_mesh_unique",
           "to_trimesh"]
