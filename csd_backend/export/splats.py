"""Gaussian splats as the standard 3DGS ``.ply`` (the INRIA layout that 3DGS, gsplat, SuperSplat and the Blender and
Unity splat add-ons read): one ``vertex`` element of float32 properties, binary little-endian, in the order

    x y z  nx ny nz  f_dc_0..2  f_rest_0..(3·((d+1)² − 1) − 1)  opacity  scale_0..2  rot_0..3

with the stored (pre-activation) values: opacity as a logit, scales as logs, the rotation quaternion ``(w, x, y,
z)`` unnormalised, colours as SH coefficients, ``f_rest`` channel-major (all red coefficients, then green, then
blue), normals zero. Positions are the engine's world units in its Z-up frame (Blender's; the GLB of the same run
is Y-up, glTF's). Reading accepts binary (either endianness) and ASCII files, float or double properties, and
refuses a file that lacks a splat attribute with the attributes it does have.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from ..errors import CSDError, OutputExistsError

_TYPES = {"float": "f4", "float32": "f4", "double": "f8", "float64": "f8", "uchar": "u1", "uint8": "u1",
          "char": "i1", "int8": "i1", "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2", "int": "i4",
          "int32": "i4", "uint": "u4", "uint32": "u4"}
REQUIRED = ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2", "rot_0",
            "rot_1", "rot_2", "rot_3")


class SplatFileError(CSDError):
    """A file that is not a readable Gaussian-splat .ply."""


def attribute_names(sh_degree: int) -> List[str]:
    rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def splat_arrays(scene) -> Dict[str, np.ndarray]:
    """The scene's splats as float32 arrays: means ``[N, 3]``, sh_dc ``[N, 3]``, sh_rest ``[N, K − 1, 3]``,
    opacity_logits ``[N]``, log_scales ``[N, 3]``, quaternions ``[N, 4]``."""
    return {name: p.detach().float().cpu().numpy() for name, p in scene.gaussian_parameters().items()}


def write_splats(scene, path, overwrite: bool = False) -> Path:
    """Write ``scene``'s splats to ``path`` (atomically; an existing file raises ``OutputExistsError`` unless
    ``overwrite``)."""
    from ..io import atomic_write

    a = splat_arrays(scene)
    finite = np.logical_and.reduce([np.isfinite(v.reshape(v.shape[0], -1)).all(1) for v in a.values()])
    if not finite.all():
        raise SplatFileError(f"{path}: not written, {int((~finite).sum())} of {finite.size} splats hold NaN or "
                             "infinite values (a run that diverged); resume from an earlier checkpoint with lower "
                             "scene.gaussians learning rates")
    n, rest = a["means"].shape[0], a["sh_rest"].shape[1]
    degree = int(round((rest + 1) ** 0.5)) - 1
    names = attribute_names(degree)
    f_rest = a["sh_rest"].transpose(0, 2, 1).reshape(n, -1)  # [N, 3·(K − 1)] channel-major
    data = np.concatenate([a["means"], np.zeros((n, 3), np.float32), a["sh_dc"], f_rest,
                           a["opacity_logits"][:, None], a["log_scales"], a["quaternions"]], 1).astype("<f4")
    header = "\n".join(["ply", "format binary_little_endian 1.0", "comment Gaussian splats written by CSD 3D",
                        f"element vertex {n}"] + [f"property float {name}" for name in names] + ["end_header"]) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(header.encode("ascii"))
            f.write(np.ascontiguousarray(data).tobytes())

    return atomic_write(path, write, overwrite=overwrite)


def save_splats_unique(scene, folder, stem: str) -> Path:
    """Write the splats as ``folder/<stem>_<NNNNN>_.ply`` with the next free counter (never overwriting)."""
    from .writers import save_unique

    return save_unique(folder, stem, "ply", lambda path: write_splats(scene, path))


def _parse_header(raw: bytes, path) -> Tuple[str, List[Tuple[str, int, List[Tuple[str, str]]]], int]:
    if not raw.startswith(b"ply"):
        raise SplatFileError(f"{path} is not a PLY file (it does not start with 'ply'); give a 3DGS .ply")
    end = raw.find(b"end_header")
    if end < 0:
        raise SplatFileError(f"{path}: the PLY header has no end_header; the file is damaged or not a PLY")
    body = raw.index(b"\n", end) + 1
    fmt, elements = "", []
    for line in raw[:end].decode("ascii", "replace").splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "format":
            fmt = parts[1]
        elif parts[0] == "element":
            elements.append((parts[1], int(parts[2]), []))
        elif parts[0] == "property" and elements:
            if parts[1] == "list":
                elements[-1][2].append((parts[-1], "list"))
            else:
                elements[-1][2].append((parts[2], parts[1]))
    return fmt, elements, body


def read_splats(path) -> Dict[str, np.ndarray]:
    """The splats of a 3DGS ``.ply`` as the arrays of ``splat_arrays``; ``SplatFileError`` names what is wrong."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SplatFileError(f"cannot read {path}: {e.strerror or e}") from None
    fmt, elements, body = _parse_header(raw, path)
    vertex = next((e for e in elements if e[0] == "vertex"), None)
    props = [name for name, _ in vertex[2]] if vertex else []
    missing = [name for name in REQUIRED if name not in props]
    if vertex is None or missing:
        have = ", ".join(props[:12]) + (" ..." if len(props) > 12 else "") if props else "no vertex attributes"
        raise SplatFileError(f"{path} is not a Gaussian-splat .ply: it lacks {', '.join(missing or REQUIRED)} "
                             f"(it has {have}; a mesh or a point cloud?). Give a 3DGS .ply in the INRIA layout "
                             f"(x y z, f_dc_*, f_rest_*, opacity, scale_*, rot_*)")
    if elements[0][0] != "vertex" or any(t == "list" or t not in _TYPES for _, t in vertex[2]):
        raise SplatFileError(f"{path}: the vertex element must come first and hold plain numeric properties")
    n = vertex[1]
    if fmt == "ascii":
        table = np.loadtxt(raw[body:].decode("ascii").splitlines()[:n], dtype=np.float64, ndmin=2)
        columns = {name: table[:, i] for i, name in enumerate(props)}
    elif fmt in ("binary_little_endian", "binary_big_endian"):
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(name, order + _TYPES[t]) for name, t in vertex[2]])
        if len(raw) - body < n * dtype.itemsize:
            raise SplatFileError(f"{path} is truncated: its header announces {n} splats of {dtype.itemsize} bytes")
        table = np.frombuffer(raw, dtype, count=n, offset=body)
        columns = {name: table[name] for name in props}
    else:
        raise SplatFileError(f"{path}: unknown PLY format {fmt!r}")
    rest = sorted((name for name in props if name.startswith("f_rest_")), key=lambda s: int(s.split("_")[-1]))
    k = len(rest) // 3 + 1
    if len(rest) % 3 or int(round(k ** 0.5)) ** 2 != k or k > 16:
        raise SplatFileError(f"{path} has {len(rest)} f_rest attributes; a splat file has 3·((d+1)² − 1) of them "
                             "for SH degree d = 0…3 (0, 9, 24 or 45)")

    def stack(names):
        return np.stack([np.asarray(columns[c], np.float32) for c in names], -1) if names else np.zeros((n, 0),
                                                                                                        np.float32)

    out = {"means": stack(["x", "y", "z"]), "sh_dc": stack(["f_dc_0", "f_dc_1", "f_dc_2"]),
           "sh_rest": stack(rest).reshape(n, 3, k - 1).transpose(0, 2, 1).copy(),
           "opacity_logits": np.array(columns["opacity"], np.float32),
           "log_scales": stack(["scale_0", "scale_1", "scale_2"]), "quaternions": stack(["rot_0", "rot_1", "rot_2",
                                                                                         "rot_3"])}
    if not all(np.isfinite(v).all() for v in out.values()):
        raise SplatFileError(f"{path} holds NaN or infinite values")
    return out


def load_splats(path, cfg=None):
    """A ``GaussianScene`` holding the splats of ``path`` (``cfg``: its ``SceneConfig``; by default a gaussians
    scene of the file's SH degree and a radius that holds every mean)."""
    import dataclasses

    import torch

    from ..config import SceneConfig
    from ..scene.gaussians import GaussianScene

    a = read_splats(path)
    degree = int(round((a["sh_rest"].shape[1] + 1) ** 0.5)) - 1
    n = a["means"].shape[0]
    if n == 0:
        raise SplatFileError(f"{path} holds no splats")
    if cfg is None:
        reach = float(np.abs(a["means"]).max()) if n else 1.0
        cfg = SceneConfig(kind="gaussians", radius=max(1.0, reach * 1.1), background="solid")
    g = dataclasses.replace(cfg.gaussians, sh_degree=degree, num_points=n, max_gaussians=max(n, cfg.gaussians
                                                                                            .max_gaussians))
    cfg = dataclasses.replace(cfg, kind="gaussians", gaussians=g)
    with torch.random.fork_rng(devices=[]):
        scene = GaussianScene(dataclasses.replace(cfg, gaussians=dataclasses.replace(g, num_points=1)))
    state = {k: torch.from_numpy(v) for k, v in a.items()}
    scene.load_state_dict({**scene.state_dict(), **state})
    scene.cfg = cfg
    return scene.eval()
