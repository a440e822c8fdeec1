"""The exported mesh: geometry (welded, watertight where the surface is closed), optional UV atlas and base-colour
texture, optional vertex colours. Arrays are numpy and are never modified after construction."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..errors import CSDError


class MeshError(CSDError):
    """No usable surface (nothing at the threshold, an empty or degenerate mesh) or a failed unwrap."""


def scene_to_y_up(points: np.ndarray) -> np.ndarray:
    """Scene frame (Z up, front = +x) → glTF frame (Y up, front = +z): ``(x, y, z) → (y, z, x)``.

    A cyclic permutation of the axes is a proper rotation, so triangle winding and handedness are kept."""
    return np.ascontiguousarray(points[:, [1, 2, 0]])


@dataclass(eq=False)
class TexturedMesh:
    """A mesh in scene units and the scene's frame (``vertices``); writers convert to the output frame.

    ``uv_faces[i]`` is face ``faces[i]`` in the UV atlas: UV vertex ``j`` sits at geometry vertex
    ``uv_vertex[j]`` with coordinates ``uv[j]`` (OBJ/trimesh convention: v grows upwards, row 0 of ``texture``
    is v = 1).
    """

    vertices: np.ndarray  # [V, 3] float32
    faces: np.ndarray  # [F, 3] int64, counter-clockwise seen from outside
    normals: np.ndarray  # [V, 3] float32, unit
    threshold: float
    bbox: np.ndarray  # [2, 3] the box the surface was extracted in
    vertex_colors: Optional[np.ndarray] = None  # [V, 3] float32 in [0, 1]
    uv: Optional[np.ndarray] = None  # [W, 2] float32 in [0, 1]
    uv_faces: Optional[np.ndarray] = None  # [F, 3] int64
    uv_vertex: Optional[np.ndarray] = None  # [W] int64
    texture: Optional[np.ndarray] = None  # [T, T, 3] uint8
    y_up: bool = True
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("vertices", "faces", "normals", "vertex_colors", "uv", "uv_faces", "uv_vertex", "texture"):
            arr = getattr(self, name)
            if arr is not None:
                arr.setflags(write=False)

    @property
    def num_vertices(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def has_texture(self) -> bool:
        return self.texture is not None and self.uv is not None

    def output_points(self, points: np.ndarray) -> np.ndarray:
        """Positions or directions ``[N, 3]`` from the scene frame into the frame files are written in."""
        out = scene_to_y_up(points) if self.y_up else np.ascontiguousarray(points)
        return out.astype(np.float32, copy=False)

    def __repr__(self) -> str:
        tex = f", texture {self.texture.shape[1]}x{self.texture.shape[0]}" if self.has_texture else ""
        col = ", vertex colours" if self.vertex_colors is not None else ""
        return f"TexturedMesh({self.num_vertices} vertices, {self.num_faces} faces{tex}{col}, τ={self.threshold:.4g})"


def mesh_tensors(mesh: TexturedMesh) -> Tuple["torch.Tensor", "torch.Tensor"]:  # noqa: F821
    """ComfyUI's MESH layout: ``vertices [1, V, 3] float32`` and ``faces [1, F, 3] int64`` (batch of one), in
    the output frame, welded (the watertight geometry, without the UV seams)."""
    import torch

    v = torch.from_numpy(mesh.output_points(mesh.vertices).copy()).unsqueeze(0)
    f = torch.from_numpy(mesh.faces.astype(np.int64, copy=True)).unsqueeze(0)
    return v.contiguous(), f.contiguous()
