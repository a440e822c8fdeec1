"""Mesh files (trimesh): GLB with a PBR base-colour texture, OBJ + MTL + PNG, PLY with vertex colours.

Every file is written atomically (temporary name, then a link into place) and an existing file is never
replaced: ``save_mesh`` raises ``OutputExistsError``; ``save_mesh_unique`` picks the next free counter
(``<stem>_00001_.glb``, ComfyUI's naming). ``resolve_output_prefix`` turns a user's filename prefix into a folder
inside the output folder and refuses prefixes that would leave it, names Windows reserves (``con``, ``nul``,
``com1``...) and names or paths too long to write (``portable_name_error``).

Without a texture, GLB and OBJ carry the vertex colours; PLY always carries vertex colours (sampled from the
texture when the mesh has none of its own).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from ..errors import ConfigError, OutputExistsError
from ..io import atomic_write
from .mesh import MeshError, TexturedMesh
from .texture import sample_texture

FORMATS = ("glb", "obj", "ply")
PathLike = Union[str, os.PathLike]
GENERATOR = "comfyui-csd-3d"


def _require_trimesh():
    try:
        import trimesh
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MeshError("writing mesh files needs trimesh: pip install trimesh") from e
    return trimesh


def _check_format(fmt: str) -> str:
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def companion_paths(mesh: TexturedMesh, path: PathLike, fmt: str) -> List[Path]:
    """Files written beside ``path``: the material and texture of a textured OBJ."""
    path = Path(path)
    if _check_format(fmt) == "obj" and mesh.has_texture:
        return [path.with_suffix(".mtl"), path.with_suffix(".png")]
    return []


# --------------------------------------------------------------------------------------------- trimesh objects
def _colors_u8(colors: np.ndarray) -> np.ndarray:
    rgb = np.clip(np.asarray(colors, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], 1)


def vertex_colors_of(mesh: TexturedMesh) -> Optional[np.ndarray]:
    """``[V, 3]`` colours in [0, 1]: the mesh's own, else its texture at each vertex's UV, else None."""
    if mesh.vertex_colors is not None:
        return mesh.vertex_colors
    if mesh.has_texture:
        first = np.full(mesh.num_vertices, -1, np.int64)
        first[mesh.uv_vertex[::-1]] = np.arange(len(mesh.uv_vertex))[::-1]  # one UV vertex per mesh vertex
        ok = first >= 0
        colors = np.zeros((mesh.num_vertices, 3), np.float32)
        colors[ok] = sample_texture(mesh.texture, mesh.uv[first[ok]])
        return colors
    return None


def to_trimesh(mesh: TexturedMesh, textured: bool = True, material: str = "pbr", name: str = "csd3d"):
    """A ``trimesh.Trimesh`` in the output frame: split at UV seams with a texture material when ``textured`` and
    the mesh has a texture, else welded with vertex colours (when there are any)."""
    trimesh = _require_trimesh()
    if textured and mesh.has_texture:
        from PIL import Image

        idx = mesh.uv_vertex
        tm = trimesh.Trimesh(vertices=mesh.output_points(mesh.vertices[idx]), faces=np.asarray(mesh.uv_faces),
                             vertex_normals=mesh.output_points(mesh.normals[idx]), process=False, validate=False)
        image = Image.fromarray(np.ascontiguousarray(mesh.texture), "RGB")
        if material == "pbr":
            mat = trimesh.visual.material.PBRMaterial(name=name, baseColorTexture=image, metallicFactor=0.0,
                                                      roughnessFactor=1.0)
        else:  # OBJ/MTL: white diffuse (viewers multiply the map by Kd), no specular highlight
            mat = trimesh.visual.material.SimpleMaterial(name=name, image=image, diffuse=[255, 255, 255, 255],
                                                         ambient=[255, 255, 255, 255], specular=[0, 0, 0, 255],
                                                         glossiness=1.0)
        tm.visual = trimesh.visual.TextureVisuals(uv=np.asarray(mesh.uv), material=mat)
        return tm
    colors = vertex_colors_of(mesh)
    return trimesh.Trimesh(vertices=mesh.output_points(mesh.vertices), faces=np.asarray(mesh.faces),
                           vertex_normals=mesh.output_points(mesh.normals),
                           vertex_colors=_colors_u8(colors) if colors is not None else None,
                           process=False, validate=False)


def _encode(mesh: TexturedMesh, path: Path, fmt: str) -> List[Tuple[Path, bytes]]:
    """The bytes of every file of the mesh, companions first and the main file last."""
    trimesh = _require_trimesh()
    if fmt == "glb":
        tm = to_trimesh(mesh, textured=True, material="pbr", name=path.stem)
        scene = trimesh.Scene(tm)
        scene.metadata["generator"] = GENERATOR
        return [(path, trimesh.exchange.gltf.export_glb(scene, include_normals=True))]
    if fmt == "obj":
        tm = to_trimesh(mesh, textured=True, material="simple", name=path.stem)
        text, files = trimesh.exchange.obj.export_obj(tm, include_normals=True, include_color=True,
                                                      include_texture=True, return_texture=True,
                                                      mtl_name=f"{path.stem}.mtl", header=GENERATOR)
        out = []
        for fname, data in files.items():  # {stem}.mtl and {stem}.png
            out.append((path.parent / fname, data))
        if mesh.has_texture:
            expected = {p.name for p in companion_paths(mesh, path, fmt)}
            if {p.name for p, _ in out} != expected:  # pragma: no cover - guards a trimesh naming change
                raise MeshError(f"unexpected OBJ companion files {sorted(p.name for p, _ in out)}; "
                                f"expected {sorted(expected)}")
        return out + [(path, text.encode("utf-8"))]
    tm = to_trimesh(mesh, textured=False)
    return [(path, trimesh.exchange.ply.export_ply(tm, encoding="binary", vertex_normal=True))]


# ------------------------------------------------------------------------------------------------------ save
def save_mesh(mesh: TexturedMesh, path: PathLike, format: Optional[str] = None) -> Path:
    """Write ``mesh`` to ``path`` as glb / obj / ply (default: from the suffix). Returns the main file's path;
    a textured OBJ also writes ``<stem>.mtl`` and ``<stem>.png`` beside it. Never overwrites: if any of the
    files exists, raises ``OutputExistsError`` before writing anything. A file name that Windows reserves or
    that is over 255 bytes is refused (``ConfigError`` naming the file name) before anything is encoded."""
    path = Path(path)
    check_portable_name(path.name, "file name")
    fmt = _check_format(format or path.suffix or "glb")
    if path.suffix.lower() != f".{fmt}":
        if path.suffix.lower().lstrip(".") in FORMATS:
            raise ConfigError("format", f"{path.name} has the suffix {path.suffix} but the format is {fmt}")
        path = path.with_name(path.name + f".{fmt}")
    files = _encode(mesh, path, fmt)
    for p, _ in files:
        if p.exists():
            raise OutputExistsError(f"{p} already exists; outputs are never overwritten. Choose another name.")
    written: List[Path] = []
    try:
        for p, data in files:
            atomic_write(p, lambda tmp, data=data: Path(tmp).write_bytes(data))
            written.append(p)
    except BaseException:
        for p in written:  # do not leave a material without its model behind
            try:
                p.unlink()
            except OSError:  # pragma: no cover
                pass
        raise
    return path


_COUNTER = re.compile(r"_(\d{5,})_\.")


def save_unique(folder: PathLike, stem: str, suffix: str, write, taken=None) -> Path:
    """``write(folder/<stem>_<NNNNN>_.<suffix>)`` with the next counter after the highest one in use (ComfyUI's
    convention, as its SaveImage); ``write`` raises ``OutputExistsError`` when another writer took the name
    meanwhile, and the next counter is tried. ``taken(path)``: a name is also taken when this says so (files
    written beside it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    used = 0
    for name in os.listdir(folder):
        if name.startswith(f"{stem}_"):
            m = _COUNTER.match(name[len(stem):])
            if m:
                used = max(used, int(m.group(1)))
    counter = used + 1
    for _ in range(1000):
        path = folder / f"{stem}_{counter:05d}_.{suffix}"
        if not path.exists() and not (taken is not None and taken(path)):
            try:
                return write(path)
            except OutputExistsError:
                pass
        counter += 1
    raise OutputExistsError(f"could not find a free file name for {folder / stem} after 1000 tries")


def save_mesh_unique(mesh: TexturedMesh, folder: PathLike, stem: str, format: str = "glb") -> Path:
    """Save as ``folder/<stem>_<NNNNN>_.<format>`` with the next free counter (``save_unique``)."""
    fmt = _check_format(format)
    return save_unique(folder, stem, fmt, lambda path: save_mesh(mesh, path, fmt),
                       taken=lambda path: any(p.exists() for p in companion_paths(mesh, path, fmt)))


#: device names Windows reserves in every folder, also with an extension ("nul.glb") and in any case (Microsoft,
#: "Naming Files, Paths, and Namespaces"): such a file cannot be created or opened there
WINDOWS_RESERVED_NAMES = frozenset(
    ["con", "prn", "aux", "nul"] + [f"{dev}{n}" for dev in ("com", "lpt") for n in "0123456789\u00b9\u00b2\u00b3"])
#: longest file or folder name: 255 bytes on Linux/macOS file systems (255 UTF-16 units on NTFS; UTF-8 bytes are
#: never fewer)
MAX_NAME_BYTES = 255
#: longest path a Windows program can write without the long-path opt-in: MAX_PATH (260) less the final NUL; a
#: folder must leave room for an 8.3 name (MAX_PATH - 12)
WINDOWS_MAX_PATH = 259
WINDOWS_MAX_FOLDER = 247
#: what ``save_mesh_unique`` appends to a prefix: a 5-digit counter and the longest suffix it writes
_COUNTER_SUFFIX = "_00001_.glb"


def portable_name_error(name: str) -> Optional[str]:
    """Why ``name`` (one file or folder name) cannot be written on Windows or Linux/macOS, or None.

    Refuses Windows' reserved device names (``con``, ``prn``, ``aux``, ``nul``, ``com0``-``com9``, ``lpt0``-``lpt9``,
    case-insensitive, also followed by an extension or by trailing dots/spaces, which Windows strips), names ending
    in a dot or a space, and names longer than 255 bytes."""
    stem = name.split(".", 1)[0].rstrip(" .").lower()
    if stem in WINDOWS_RESERVED_NAMES:
        return (f"{name!r} is a device name that Windows reserves (CON, PRN, AUX, NUL, COM0-9, LPT0-9, also with an "
                f"extension): such a file cannot be written there; choose another name")
    if name.endswith((".", " ")) and name not in (".", ".."):
        return f"{name!r} ends with a dot or a space, which Windows drops from names; remove it"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        return (f"{name[:40]!r}... is {size} bytes long; a file or folder name may have at most {MAX_NAME_BYTES} "
                f"bytes: shorten it")
    return None


def check_portable_name(name: str, field: str) -> None:
    """Raise ``ConfigError(field, ...)`` when ``name`` is not a portable file name (see ``portable_name_error``)."""
    err = portable_name_error(name)
    if err:
        raise ConfigError(field, err)


def resolve_output_prefix(output_dir: PathLike, prefix: str, field: str = "filename_prefix") -> Tuple[Path, str]:
    """``"sub/dir/name"`` → ``(output_dir/sub/dir, "name")``. Refuses (``ConfigError``, a ``ValueError`` naming
    ``field``) empty prefixes, absolute paths, drive letters, ``~``, ``..`` and anything resolving (through
    links) outside ``output_dir``; names Windows reserves or that are too long (``portable_name_error``, with the
    counter and extension added to the last one); and prefixes whose files would not fit in Windows' 259
    characters (248 for the folder), counted from ``output_dir``. The rules hold on every system, so a workflow
    that saves on one machine saves on another. Nothing is created."""
    text = str(prefix).strip().replace("\\", "/")
    if not text:
        raise ConfigError(field, "is empty; give a name such as 'csd3d/mesh'")
    if text.startswith("/") or text.startswith("~") or re.match(r"^[A-Za-z]:", text):
        raise ConfigError(field, f"{prefix!r} must be a path relative to the output folder, e.g. 'csd3d/mesh'")
    parts = text.split("/")
    if ".." in parts:
        raise ConfigError(field, f"{prefix!r} must not contain '..': files are only written inside the output folder")
    if any(ch in text for ch in "\0:*?\"<>|"):
        raise ConfigError(field, f"{prefix!r} contains a character that is not allowed in file names")
    if text.endswith("/"):
        raise ConfigError(field, f"{prefix!r} ends with '/'; add a file name, e.g. '{text}mesh'")
    parts = [p for p in parts if p not in ("", ".")]
    if not parts:
        raise ConfigError(field, f"{prefix!r} has no file name; give one such as 'csd3d/mesh'")
    for i, part in enumerate(parts):
        err = portable_name_error(part)
        if err is None and i == len(parts) - 1:  # the file written is <name>_00001_.glb
            err = portable_name_error(part + _COUNTER_SUFFIX)
        if err:
            raise ConfigError(field, f"in {prefix!r}: {err}")
    root = Path(output_dir)
    folder = root.joinpath(*parts[:-1])
    longest = os.path.join(os.path.abspath(folder), parts[-1] + _COUNTER_SUFFIX)
    if len(os.path.abspath(folder)) > WINDOWS_MAX_FOLDER or len(longest) > WINDOWS_MAX_PATH:
        raise ConfigError(field, f"{prefix!r} gives files such as {longest} ({len(longest)} characters): a path "
                                 f"may have at most {WINDOWS_MAX_PATH} characters on Windows (its folder "
                                 f"{WINDOWS_MAX_FOLDER}); use a shorter prefix")
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(folder)]) != real_root:
        raise ConfigError(field, f"{prefix!r} leads outside the output folder (through a link); choose another")
    return folder, parts[-1]


def relative_model_path(path: PathLike, output_dir: PathLike) -> str:
    """``path`` relative to ``output_dir`` with '/' separators (what Preview3D's ``model_file`` expects)."""
    return Path(os.path.relpath(Path(path), Path(output_dir))).as_posix()
