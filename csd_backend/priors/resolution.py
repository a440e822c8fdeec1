"""The size renders are resized to before a prior sees them (``prior.resolution``): one rule for every prior.

No torch here: the ComfyUI-model prior of ``nodes/`` uses the same rule, and the pack must import without torch.
"""
from __future__ import annotations

from typing import Optional, Tuple

from ..errors import ConfigError


def choose_resolution(native: int, resolution: Optional[int] = None,
                      max_resolution: Optional[int] = None) -> Tuple[int, Optional[str]]:
    """``(side, warning)``: ``resolution``, or the model's ``native`` size under a preset's cap ``max_resolution``
    (a cap never raises it: no warning); above ``native``: ``native`` and a warning text (else None)."""
    if resolution is None:
        resolution = native
        if max_resolution is not None:
            resolution = min(resolution, int(max_resolution))
    if isinstance(resolution, bool) or int(resolution) <= 0:
        raise ConfigError("resolution", f"{resolution} must be a positive number of pixels (e.g. {native})")
    if int(resolution) > native:
        return int(native), (f"resolution {int(resolution)} is above this model's native size {native}: renders "
                             f"would be upscaled for nothing; using {native} (a preset may lower the resolution "
                             "for speed, never raise it above the model's)")
    return int(resolution), None
