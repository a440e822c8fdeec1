"""CSD Save Gaussians: the splats of a Gaussian scene → a standard 3DGS .ply under the output folder (never
overwriting), whose relative path is the node's STRING output and, in a ComfyUI with 3D file types, the same file as
a ``FILE_3D_SPLAT_ANY`` for its Preview Gaussian Splat node. All the work is in ``csd_backend.export.splats``."""
from __future__ import annotations

from pathlib import Path

from . import pack
from .model_folders import check_output_prefix

DEFAULT_PREFIX = "csd3d/gaussians"
#: newer ComfyUI's type for a splat file (.ply / .spz / .splat / .ksplat), the input of its PreviewGaussianSplat
SPLAT_FILE_TYPE = "FILE_3D_SPLAT_ANY"


def splat_file(path: Path):
    """``path`` as ComfyUI's ``File3D`` (``comfy_api.latest.Types``, newer versions), or None where this ComfyUI
    has no 3D file type (0.3.64: nothing there takes a ``FILE_3D_SPLAT_ANY`` either)."""
    file_3d = pack.comfy_attribute(("comfy_api.latest", "Types.File3D"))
    return None if file_3d is None else file_3d(source=str(path), file_format="ply")


class CSDSaveGaussians:
    DESCRIPTION = ("Save the 3D Gaussian splats of a Gaussian scene (CSD Optimize with csd-gaussian, sds-gaussian or "
                   "gaussian-preview-cpu) as a standard 3DGS .ply under ComfyUI's output folder (the INRIA layout "
                   "of 3D Gaussian Splatting, which splat viewers such as SuperSplat read). Files are never "
                   "overwritten: a counter is added. The ply_file output is the path relative to the output folder; "
                   "model_3d is the same file as a 3D file for Preview Gaussian Splat in ComfyUI versions that have "
                   "it (0.3.64 has no splat viewer: there it is empty). For a mesh of the scene use CSD Extract Mesh.")
    CATEGORY = pack.CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", SPLAT_FILE_TYPE)
    RETURN_NAMES = ("ply_file", "model_3d")
    OUTPUT_TOOLTIPS = ("The saved .ply, relative to the output folder with '/' separators.",
                       "The saved .ply as a splat file for Preview Gaussian Splat (ComfyUI versions with 3D file "
                       "types; empty in 0.3.64).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "scene": (pack.SCENE, {"tooltip": "A Gaussian scene: CSD Optimize with a Gaussian preset, or CSD 3D Scene "
                                              "loading a Gaussian run."}),
            "filename_prefix": ("STRING", {"default": DEFAULT_PREFIX,
                                           "tooltip": "Sub-folder and name inside the output folder; a counter and "
                                                      ".ply are added. Refused when queued: '..', absolute paths, "
                                                      "names Windows reserves, names over 255 bytes and paths over "
                                                      "259 characters (as CSD Save Mesh)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        return check_output_prefix(filename_prefix)

    def save(self, scene, filename_prefix):
        import folder_paths  # type: ignore

        from csd_backend.errors import ConfigError
        from csd_backend.export import relative_model_path, resolve_output_prefix, save_splats_unique

        kind = getattr(scene, "kind", None)
        if kind != "gaussians":
            what = f"a {kind} scene" if isinstance(kind, str) else f"a {type(scene).__name__}"
            raise ConfigError("scene", f"CSD Save Gaussians got {what}, not Gaussian splats: connect the scene "
                                       "of a CSD Optimize with a Gaussian preset (csd-gaussian, sds-gaussian, "
                                       "gaussian-preview-cpu) or of CSD 3D Scene loading a Gaussian run; for "
                                       "other scenes use CSD Extract Mesh and CSD Save Mesh")
        output_dir = folder_paths.get_output_directory()
        folder, stem = resolve_output_prefix(output_dir, filename_prefix, field="filename_prefix")
        path = save_splats_unique(scene, folder, stem)
        pack.log.info("CSD Save Gaussians: %d splats -> %s", scene.num_gaussians, path)
        rel = relative_model_path(path, output_dir)
        return {"ui": {"3d": [{"filename": path.name, "subfolder": rel.rpartition("/")[0], "type": "output"}]},
                "result": (rel, splat_file(path))}


NODE_CLASS_MAPPINGS = {"CSDSaveGaussians": CSDSaveGaussians}
NODE_DISPLAY_NAME_MAPPINGS = {"CSDSaveGaussians": "CSD Save Gaussians"}
