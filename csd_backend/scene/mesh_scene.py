"""Mesh scenes (stage 2 and texturing): an explicit triangle mesh from a geometry module, coloured by the same
texture field as the volume (hash grid + albedo MLP, queried at surface points), over the same backgrounds.

The geometry is either a deformable tetrahedral SDF grid (``dmtet.py``: the mesh is re-extracted by marching
tetrahedra at every step, so the shape trains) or a fixed mesh (``fixed_mesh.py``: a user's mesh, only its
texture trains). Both give ``mesh() -> (vertices [V, 3] world, faces [F, 3])``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..config import SceneConfig
from .dmtet import TetSDFGeometry
from .fixed_mesh import FixedMeshGeometry
from .volume import TextureField, make_background

#: the geometry of each mesh scene kind
GEOMETRIES = {"dmtet": TetSDFGeometry, "mesh": FixedMeshGeometry}


class MeshScene(nn.Module):
    """What a stage-2 or texturing run trains: ``geometry`` (``cfg.kind``), ``texture`` and ``background``."""

    def __init__(self, cfg: SceneConfig, device=None):
        super().__init__()
        self.cfg = cfg
        geometry = GEOMETRIES.get(cfg.kind)
        if geometry is None:
            raise ValueError(f"MeshScene holds a 'dmtet' or 'mesh' scene, not {cfg.kind!r}")
        self.geometry = geometry(cfg)
        self.texture = TextureField(cfg, device)
        self.background = make_background(cfg)

    @property
    def radius(self) -> float:
        return self.texture.radius

    @property
    def kind(self) -> str:
        return self.cfg.kind

    def update_step(self, step: int) -> None:
        self.texture.update_step(step)

    def mesh(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The current mesh in world units: vertices ``[V, 3]`` (differentiable for dmtet) and faces ``[F, 3]``."""
        return self.geometry.mesh()

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        return self.texture.albedo(points)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
