"""The pack as ComfyUI sees it: its menu category, its custom socket types and its logger."""
from __future__ import annotations

import logging

log = logging.getLogger("csd3d")

CATEGORY = "CSD 3D"

# custom types (DESIGN §4), passed between the pack's nodes
PRIOR = "CSD_PRIOR"  # a csd_backend.priors.base.DiffusionPrior
GUIDANCE = "CSD_GUIDANCE"  # a specs.GuidanceSpec, which builds a GuidanceConfig for a run length
SCENE = "CSD_SCENE"  # a scene of any kind (csd_backend/scene_kinds.py)
CAMERAS = "CSD_CAMERAS"  # a csd_backend.config.CameraConfig
