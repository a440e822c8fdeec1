"""Settings of mesh export (spec §5.3, §5.5): one dataclass drives the engine, the command line and the nodes."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Union

from ..errors import ConfigError

AUTO = "auto"
#: hard limits (memory: a 512³ float grid is 0.5 GB; xatlas and baking above 8192² are impractical on a CPU)
MAX_RESOLUTION = 1024
MAX_TEXTURE_SIZE = 8192
#: the default ``floater_area`` (see ``ExportConfig``)
FLOATER_AREA = 0.2


@dataclass
class ExportConfig:
    """How a scene becomes a textured mesh.

    ``threshold`` is the density τ of the surface ``σ = τ``: ``"auto"`` (spec §5.3: the mean of σ over the grid
    samples with σ > 1e-5, taken over the whole bounding box) or a number (threestudio's default is 25; CSD's
    stage 2 uses 10).
    """

    #: grid samples along the longest side of the (tight) bounding box; voxels are cubes
    resolution: int = 256
    threshold: Union[str, float] = AUTO
    #: side of the square base-colour texture in texels; 0 = no UVs and no texture (vertex colours only)
    texture_size: int = 1024
    #: simplify a generated surface (marching cubes, a refined DMTet mesh) to at most this many faces (quadric
    #: decimation); 0 = keep every face. A fixed mesh (``texture``: the user's own) keeps all its faces.
    face_budget: int = 100000
    #: drop the floaters of a generated surface, so that the object is one piece unless it has several sizeable
    #: parts. A part is a set of faces joined by shared edges; a floater is a part whose surface area is below
    #: ``floater_area`` × the largest part's, or a closed part wound inwards (the wall of a bubble inside the
    #: object, never visible). 0.2: a part needs a fifth of the main part's area (about 45 % of its size) to stay,
    #: as two objects side by side have. The parts around trained preview scenes reach 17 % (faint haze that the
    #: renders barely show, enclosed by the mean-density level); a small separate part, such as a mug's handle
    #: cut off its cup (about 5 %), needs a lower value. Holes (a ring's, a mug's opening) are not parts and are
    #: never filled; a fixed mesh (the user's own) keeps every part.
    remove_floaters: bool = True
    floater_area: float = FLOATER_AREA
    #: per-vertex colours (albedo at each vertex), written to PLY and to GLB/OBJ when there is no texture
    vertex_colors: bool = True
    #: spec §5.3: find the object over the whole box on a coarse grid, then extract inside its padded box
    coarse_to_fine: bool = True
    #: query the fine grid only near the surface found on a coarser grid (≥ 64 samples a side) and interpolate
    #: elsewhere: 4-6× fewer density queries at 256³. Details smaller than a coarse cell that lie away from the
    #: rest of the surface can be missed; False queries every grid point.
    narrow_band: bool = True
    #: xatlas padding between charts, in atlas texels (spec §5.5: 2); the space between charts is filled with
    #: the nearest baked colour, so seams stay clean with bilinear filtering and mip-maps
    uv_padding: int = 2
    #: write meshes Y-up with the front (+x of the scene, azimuth 0) facing +z, as glTF and three.js expect;
    #: False keeps the scene's own Z-up frame
    y_up: bool = True
    #: points per density/albedo query (memory vs. speed)
    chunk_size: int = 262144

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ExportConfig":
        names = {f.name for f in fields(cls)}
        for key in data:
            if key not in names:
                raise ConfigError(f"export.{key}", f"unknown setting; valid ones are: {', '.join(sorted(names))}")
        return cls(**data).validate()

    def threshold_value(self) -> Union[str, float]:
        """``"auto"`` or the threshold as a float."""
        if isinstance(self.threshold, str):
            return AUTO
        return float(self.threshold)

    def validate(self) -> "ExportConfig":
        _int("resolution", self.resolution, 8, MAX_RESOLUTION)
        t = self.threshold
        if isinstance(t, str):
            if t.strip().lower() != AUTO:
                raise ConfigError("threshold", f"must be 'auto' or a positive density, got {t!r}")
            self.threshold = AUTO
        elif isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ConfigError("threshold", f"must be 'auto' or a positive density (σ ≥ 0 everywhere, so the surface "
                                           f"σ = τ needs τ > 0; threestudio uses 25, CSD 10), got {t!r}")
        if self.texture_size != 0:
            _int("texture_size", self.texture_size, 16, MAX_TEXTURE_SIZE)
        _int("face_budget", self.face_budget, 0, 100_000_000)
        if 0 < self.face_budget < 4:
            raise ConfigError("face_budget", f"must be 0 (keep every face) or at least 4, got {self.face_budget}")
        if isinstance(self.floater_area, bool) or not isinstance(self.floater_area, (int, float)) \
                or not 0 <= self.floater_area <= 1:
            raise ConfigError("floater_area", f"must be a number in [0, 1] (the share of the largest part's area "
                                              f"a part needs to stay; 0 drops only bubbles inside the object), got "
                                              f"{self.floater_area!r}")
        _int("uv_padding", self.uv_padding, 0, 64)
        _int("chunk_size", self.chunk_size, 1024, 1 << 26)
        for name in ("remove_floaters", "vertex_colors", "coarse_to_fine", "narrow_band", "y_up"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        return self


def _int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(name, f"must be an integer in [{lo}, {hi}], got {value!r}")
