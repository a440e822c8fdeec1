"""A fixed triangle mesh (a user's, for texturing): geometry as buffers, never trained.

The mesh is stored in world units inside the scene box; ``to_world`` and ``to_source`` are the similarity that
``normalize_mesh`` chose (uniform scale and offset, plus the source's up axis), kept in the state dict so that the
export is written back in the source's units and orientation.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..config import SceneConfig


class FixedMeshGeometry(nn.Module):
    def __init__(self, cfg: SceneConfig):
        super().__init__()
        self.register_buffer("vertices", torch.zeros(0, 3))  # world units
        self.register_buffer("faces", torch.zeros(0, 3, dtype=torch.long))
        self.register_buffer("scale", torch.ones(()))  # world = (source_in_scene_frame − center) · scale
        self.register_buffer("center", torch.zeros(3))
        self.register_buffer("source_y_up", torch.ones((), dtype=torch.bool))  # the source's frame: glTF's

    def set_mesh(self, vertices: torch.Tensor, faces: torch.Tensor, center: torch.Tensor, scale: float,
                 source_y_up: bool = True) -> None:
        self.vertices = vertices.to(self.vertices)
        self.faces = faces.to(self.faces)
        self.center = center.to(self.center)
        self.scale = torch.as_tensor(float(scale)).to(self.scale)
        self.source_y_up = torch.as_tensor(bool(source_y_up)).to(self.source_y_up)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a fixed mesh's buffers take the saved mesh's size (an empty geometry is built first, then loaded)
        for name in ("vertices", "faces"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor):
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def mesh(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.vertices, self.faces

    def to_source(self, points: torch.Tensor) -> torch.Tensor:
        """World points → the source mesh's units (still in the scene's Z-up frame)."""
        return points / self.scale + self.center
