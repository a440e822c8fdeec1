"""The deformable tetrahedral SDF grid of stage 2 (DMTet, spec §5.3); ``convert/volume_to_dmtet.py`` makes one from a
stage-1 volume.

A tetrahedral grid (``tetrahedra.tet_grid``, generated at run time) fills the scene's box ``cfg.bbox``; each grid
vertex carries an SDF value (negative inside) and a deformation ``δ`` (vertex ``v + tanh(δ)/res`` in the grid's
unit frame). Every call of ``mesh()`` runs marching tetrahedra, so the SDF and the deformation get gradients
through the rendered mesh. ``fix_geometry`` turns both into buffers (texture-only training).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..config import SceneConfig
from .tetrahedra import deformed_vertices, marching_tetrahedra, tet_grid


def scene_box(cfg: SceneConfig) -> torch.Tensor:
    """``[2, 3]`` the box of a mesh scene: ``cfg.bbox`` or ``±radius``."""
    if cfg.bbox is not None:
        return torch.tensor(cfg.bbox, dtype=torch.float32)
    r = float(cfg.radius)
    return torch.tensor([[-r] * 3, [r] * 3], dtype=torch.float32)


class TetSDFGeometry(nn.Module):
    def __init__(self, cfg: SceneConfig):
        super().__init__()
        self.resolution = int(cfg.tet_resolution)
        grid, tets = tet_grid(self.resolution)
        # shared with tet_grid's cache (never modified in place); not saved: rebuilt from the resolution
        self.register_buffer("grid_vertices", grid, persistent=False)  # [V, 3] in [0, 1]³
        self.register_buffer("tets", tets, persistent=False)  # [T, 4]
        self.register_buffer("box", scene_box(cfg), persistent=False)
        sdf = torch.zeros(grid.shape[0])
        deformation = torch.zeros(grid.shape[0], 3)
        if cfg.fix_geometry:
            self.register_buffer("sdf", sdf)
            self.register_buffer("deformation", deformation)
        else:
            self.sdf = nn.Parameter(sdf)
            self.deformation = nn.Parameter(deformation)

    def world(self, unit_points: torch.Tensor) -> torch.Tensor:
        """Grid-frame points ``[N, 3]`` in [0, 1]³ → world units."""
        lo, hi = self.box[0], self.box[1]
        return lo + unit_points * (hi - lo)

    def grid_world_vertices(self) -> torch.Tensor:
        """The undeformed grid vertices in world units ``[V, 3]``."""
        return self.world(self.grid_vertices)

    def mesh(self) -> Tuple[torch.Tensor, torch.Tensor]:
        v = self.world(deformed_vertices(self.grid_vertices, self.deformation, self.resolution))
        return marching_tetrahedra(v, self.sdf, self.tets)
