"""CSD Extract Mesh and CSD Save Mesh: a scene → ComfyUI's native MESH (for the core SaveGLB) plus a textured mesh,
and the textured mesh → a GLB / OBJ / PLY file under the output folder whose relative path feeds the core
Preview3D node. All the work is in ``csd_backend.export``; nothing heavy is imported until a node runs.
"""
from __future__ import annotations

from . import pack
from .execution import Progress, check_interrupt, model_management
from .model_folders import check_output_prefix

TEXTURED_MESH = "CSD_TEXTURED_MESH"
FORMATS = ["glb", "obj", "ply"]
_PROGRESS_STEPS = 1000


class Mesh:
    """Stand-in for ComfyUI's MESH class when ComfyUI is not importable: the same two attributes."""

    def __init__(self, vertices, faces):
        self.vertices = vertices  # [B, V, 3] float32
        self.faces = faces  # [B, F, 3] int64

    def __repr__(self) -> str:
        return f"MESH(vertices={tuple(self.vertices.shape)}, faces={tuple(self.faces.shape)})"


def mesh_class():
    """ComfyUI's own MESH class (``comfy_api.latest._util`` in newer versions, ``comfy_extras.nodes_hunyuan3d`` in
    0.3.x), else the local stand-in."""
    return pack.comfy_attribute(("comfy_api.latest._util", "MESH"), ("comfy_extras.nodes_hunyuan3d", "MESH")) or Mesh


def _progress_callback():
    """``callback(fraction, stage)`` driving ComfyUI's progress bar (whose global hook also raises when the user
    presses Cancel), plus an explicit interruption check; None outside ComfyUI."""
    bar = Progress(_PROGRESS_STEPS)
    if bar.bar is None and model_management() is None:
        return None

    def callback(fraction: float, stage: str) -> None:
        check_interrupt()
        bar.update(int(round(min(max(fraction, 0.0), 1.0) * _PROGRESS_STEPS)), _PROGRESS_STEPS)

    return callback


class CSDExtractMesh:
    DESCRIPTION = ("Turn a CSD scene into a mesh: marching cubes on the density (a volume's, or the summed density "
                   "of Gaussian splats; coarse-to-fine; floaters removed: "
                   "parts under a fifth of the largest part's area and bubbles inside the object), simplified to the "
                   "face budget, UV-unwrapped (xatlas) with the albedo baked into "
                   "a texture. Outputs ComfyUI's MESH (for the core Save GLB node) and the textured mesh for "
                   "CSD Save Mesh. The scene is not changed.")
    CATEGORY = pack.CATEGORY
    FUNCTION = "extract"
    RETURN_TYPES = ("MESH", TEXTURED_MESH)
    RETURN_NAMES = ("mesh", "textured_mesh")
    OUTPUT_TOOLTIPS = ("Geometry only, in ComfyUI's MESH layout (batch of one, Y up): for the core Save GLB node.",
                       "The mesh with UVs, baked texture and vertex colours: for CSD Save Mesh.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "scene": (pack.SCENE, {"tooltip": "The scene to export (from CSD Optimize or CSD 3D Scene; any kind: "
                                              "volume, Gaussian splats, refined or textured mesh)."}),
            "resolution": ("INT", {"default": 256, "min": 32, "max": 512, "step": 32,
                                   "tooltip": "Grid samples along the longest side of the object's box. 256 takes "
                                              "tens of seconds on a CPU; 128 is a quick preview. Volumes and "
                                              "Gaussian splats only: a refined or textured mesh scene exports its "
                                              "own mesh (unused)."}),
            "threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.5,
                                    "tooltip": "Density of the surface. 0 = automatic (the mean density where "
                                               "there is any); threestudio uses 25, CSD's stage 2 uses 10. "
                                               "Lower it if parts are missing, raise it if the mesh is blobby. "
                                               "Volumes and Gaussian splats only: unused for a refined or "
                                               "textured mesh scene."}),
            "texture_size": ("INT", {"default": 1024, "min": 128, "max": 4096, "step": 128,
                                     "tooltip": "Side of the square base-colour texture in pixels."}),
            "face_budget": ("INT", {"default": 100000, "min": 0, "max": 2000000, "step": 1000,
                                    "tooltip": "Simplify to at most this many triangles (0 = keep all). Large "
                                               "meshes take longer to unwrap. A textured mesh of your own keeps "
                                               "all its faces."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, face_budget=None):
        # ComfyUI skips its own min/max check for inputs named here, so check the whole range
        if face_budget is None:  # linked from another node: checked when it runs
            return True
        b = int(face_budget)
        if not (b == 0 or 4 <= b <= 2000000):
            return f"face_budget: must be 0 (keep every face) or between 4 and 2000000, got {b}"
        return True

    def extract(self, scene, resolution, threshold, texture_size, face_budget):
        from csd_backend.export import ExportConfig, extract_textured_mesh, mesh_tensors

        config = ExportConfig(resolution=int(resolution),
                              threshold="auto" if float(threshold) <= 0.0 else float(threshold),
                              texture_size=int(texture_size), face_budget=int(face_budget))
        textured = extract_textured_mesh(scene, config, progress=_progress_callback())
        vertices, faces = mesh_tensors(textured)  # [1, V, 3] float32, [1, F, 3] int64
        return (mesh_class()(vertices, faces), textured)


class CSDSaveMesh:
    DESCRIPTION = ("Save the textured mesh under ComfyUI's output folder as GLB (PBR base-colour texture), OBJ "
                   "(+ MTL + PNG) or PLY (vertex colours). Files are never overwritten: a counter is added. The "
                   "model_file output (the path relative to the output folder) feeds the core Preview 3D node, "
                   "which shows GLB and OBJ (not PLY).")
    CATEGORY = pack.CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("model_file",)
    OUTPUT_TOOLTIPS = ("The saved file, relative to the output folder with '/' separators (Preview 3D's "
                       "model_file).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "textured_mesh": (TEXTURED_MESH, {"tooltip": "From CSD Extract Mesh."}),
            "format": (FORMATS, {"default": "glb", "tooltip": "glb: one file with the texture (best for Preview "
                                                              "3D); obj: .obj + .mtl + .png; ply: vertex colours."}),
            "filename_prefix": ("STRING", {"default": "csd3d/mesh",
                                           "tooltip": "Sub-folder and name inside the output folder; a counter "
                                                      "and the extension are added. Refused when queued: '..', "
                                                      "absolute paths, names Windows reserves (con, prn, aux, "
                                                      "nul, com1-9, lpt1-9, also with an extension), names over "
                                                      "255 bytes and paths over 259 characters."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        return check_output_prefix(filename_prefix)

    def save(self, textured_mesh, format, filename_prefix):
        import folder_paths  # type: ignore

        from csd_backend.export import relative_model_path, resolve_output_prefix, save_mesh_unique

        if not (hasattr(textured_mesh, "faces") and hasattr(textured_mesh, "uv_faces")):
            raise ValueError("textured_mesh: expected the textured_mesh output of CSD Extract Mesh, got "
                             f"{type(textured_mesh).__name__}")
        output_dir = folder_paths.get_output_directory()
        folder, stem = resolve_output_prefix(output_dir, filename_prefix, field="filename_prefix")
        path = save_mesh_unique(textured_mesh, folder, stem, format)
        rel = relative_model_path(path, output_dir)
        subfolder = rel.rpartition("/")[0]
        return {"ui": {"3d": [{"filename": path.name, "subfolder": subfolder, "type": "output"}]},
                "result": (rel,)}


NODE_CLASS_MAPPINGS = {"CSDExtractMesh": CSDExtractMesh, "CSDSaveMesh": CSDSaveMesh}
NODE_DISPLAY_NAME_MAPPINGS = {"CSDExtractMesh": "CSD Extract Mesh", "CSDSaveMesh": "CSD Save Mesh"}
