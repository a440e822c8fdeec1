"""The pack as ComfyUI sees it: its menu category, its custom socket types, its logger, and ComfyUI's own classes
where the running version has them."""
from __future__ import annotations

import functools
import importlib
import logging

log = logging.getLogger("csd3d")

CATEGORY = "CSD 3D"

# custom types (DESIGN §4), passed between the pack's nodes
PRIOR = "CSD_PRIOR"  # a csd_backend.priors.base.DiffusionPrior
GUIDANCE = "CSD_GUIDANCE"  # a specs.GuidanceSpec, which builds a GuidanceConfig for a run length
SCENE = "CSD_SCENE"  # a scene of any kind (csd_backend/scene_kinds.py)
CAMERAS = "CSD_CAMERAS"  # a csd_backend.config.CameraConfig


def comfy_attribute(*candidates):
    """The first of ``candidates`` (``(module, "Attr.sub")`` pairs) that this ComfyUI version has, else None: its
    own classes where newer versions added them (MESH, File3D), a stand-in or nothing in older ones."""
    for module, path in candidates:
        try:
            return functools.reduce(getattr, path.split("."), importlib.import_module(module))
        except Exception:  # not in this ComfyUI version, or no ComfyUI at all
            continue
    return None
