"""CSD Load Mesh: a user's mesh (a file from ComfyUI's input/3d, or a MESH from another node) as a fixed-mesh scene
for CSD Texture Mesh."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

from csd_backend.convert.mesh_file import MESH_SUFFIXES

from . import pack
from .execution import autograd_allowed, comfy_device
from .model_folders import folder_paths_module
from .run_folders import UNTRAINED_ATTR, file_signature
from .widgets import combo_input

NO_FILE = "(none: use the mesh input)"
#: meshes shipped with the pack (for the example workflow), listed as "example/<name>"
EXAMPLE_PREFIX = "example/"
EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "example_workflows" / "meshes"


def input_3d_directory() -> Path:
    fp = folder_paths_module()
    base = Path(fp.get_input_directory()) if fp is not None else Path("input").resolve()
    return base / "3d"


def _meshes_in(folder: Path) -> List[str]:
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in MESH_SUFFIXES)


def input_meshes() -> List[str]:
    """Mesh files under input/3d (where the core Load 3D node uploads), relative to input/3d with '/', then the
    pack's example meshes as ``example/<name>``."""
    return _meshes_in(input_3d_directory()) + [EXAMPLE_PREFIX + m for m in _meshes_in(EXAMPLE_DIR)]


def mesh_path(choice: str) -> Path:
    """The file of a ``mesh_file`` choice; ValueError when it would leave its folder."""
    if choice.startswith(EXAMPLE_PREFIX):
        folder, name = EXAMPLE_DIR, choice[len(EXAMPLE_PREFIX):]
    else:
        folder, name = input_3d_directory(), choice
    path = (folder / name).resolve()
    if folder.resolve() not in path.parents:
        raise ValueError(f"mesh_file: {choice} is outside {folder}")
    return path


class CSDLoadMesh:
    DESCRIPTION = ("Your own mesh as a scene for CSD Texture Mesh: a GLB/glTF/OBJ/PLY/STL/OFF file from "
                   "ComfyUI's input/3d folder (the core Load 3D node uploads there), or a MESH from another node "
                   "(which wins when connected). It is centred and scaled into the scene; the export undoes both, "
                   "so the textured mesh comes back in your units and orientation. Meshes over 500k faces are "
                   "decimated to 200k (said in the log).")
    CATEGORY = pack.CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (pack.SCENE,)
    RETURN_NAMES = ("scene",)
    OUTPUT_TOOLTIPS = ("A fixed-mesh scene for CSD Texture Mesh, which gives it the texture field and background "
                       "of its preset (one choice: the preset of Texture Mesh).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mesh_file": combo_input([NO_FILE] + input_meshes(), NO_FILE,
                                     "a mesh file in input/3d, or (none) to use the mesh input"),
            "up_axis": combo_input(["y", "z"], "y", "the file's up axis: y (glTF, and most OBJ/PLY files) or z"),
        }, "optional": {
            "mesh": ("MESH", {"tooltip": "optional: ComfyUI's MESH (first of the batch, Y up); wins over the file"}),
        }}

    @classmethod
    def IS_CHANGED(cls, mesh_file=None, **kwargs):
        if mesh_file and mesh_file != NO_FILE:
            try:
                return file_signature(mesh_path(mesh_file))
            except ValueError:
                return ""
        return ""

    @classmethod
    def VALIDATE_INPUTS(cls, mesh_file=None):
        if mesh_file is None or mesh_file == NO_FILE:
            return True
        try:
            path = mesh_path(mesh_file)
        except ValueError as e:
            return str(e)
        if not path.is_file():
            return f"mesh_file: {mesh_file} is not in {input_3d_directory()}; upload it there (e.g. with Load 3D)"
        return True

    @autograd_allowed
    def load(self, mesh_file, up_axis, mesh=None):
        import numpy as np

        from csd_backend.convert.mesh_file import mesh_scene, read_mesh_file
        from csd_backend.errors import ConfigError
        from csd_backend.presets import get_preset

        if mesh is not None:
            vertices, faces = getattr(mesh, "vertices", None), getattr(mesh, "faces", None)
            if vertices is None or faces is None:
                raise ConfigError("mesh", f"expected ComfyUI's MESH (vertices and faces), got {type(mesh).__name__}")
            if vertices.ndim == 3:
                if vertices.shape[0] > 1:
                    pack.log.warning("CSD Load Mesh: the MESH holds %d meshes; using the first", vertices.shape[0])
                vertices, faces = vertices[0], faces[0]
            v, f, name = np.asarray(vertices.detach().cpu(), np.float32), np.asarray(faces.cpu(), np.int64), "MESH"
        elif mesh_file == NO_FILE:
            raise ConfigError("mesh_file", "choose a file in input/3d or connect a MESH")
        else:
            try:
                path = mesh_path(mesh_file)
            except ValueError as e:
                raise ConfigError("mesh_file", str(e).split(": ", 1)[1]) from None
            v, f = read_mesh_file(path)
            name = os.path.basename(mesh_file)
        # the texture field is made again by CSD Texture Mesh from its preset and seed (UNTRAINED_ATTR): these
        # settings only make the scene renderable on its own
        scene = mesh_scene(v, f, get_preset("csd-texture").scene, y_up=(up_axis == "y"), name=name, seed=0)
        setattr(scene, UNTRAINED_ATTR, True)
        pack.log.info("CSD Load Mesh: %s, %d vertices, %d faces", name, scene.geometry.vertices.shape[0],
                      scene.geometry.faces.shape[0])
        return (scene.to(comfy_device() or "cpu").eval(),)


NODE_CLASS_MAPPINGS = {"CSDLoadMesh": CSDLoadMesh}
NODE_DISPLAY_NAME_MAPPINGS = {"CSDLoadMesh": "CSD Load Mesh"}
