"""CSD Cameras: the training camera sampler (resolution, batch and the ranges cameras are drawn from)."""
from __future__ import annotations

import dataclasses

from csd_backend.config import CameraConfig

from . import _common as c

_RANGES = {  # widget prefix → (CameraConfig field, lowest, highest, step, what)
    "elevation": ("elevation_range", -90.0, 90.0, 1.0, "elevation in degrees (spec: -10 … 90)"),
    "azimuth": ("azimuth_range", -360.0, 360.0, 1.0, "azimuth in degrees (spec: -180 … 180)"),
    "distance": ("distance_range", 0.01, 100.0, 0.05, "camera distance from the centre (spec: 1.5 … 2)"),
    "fovy": ("fovy_range", 1.0, 179.0, 1.0, "vertical field of view in degrees (spec: 40 … 70)"),
}


class CSDCameras:
    DESCRIPTION = ("Random training cameras: each step renders batch_size views of width×height pixels, from "
                   "elevation/azimuth/distance/field of view drawn from these ranges (spec §3.1). The render is "
                   "resized to the model's resolution before the VAE. Other camera settings come from the preset "
                   "of CSD Optimize.")
    CATEGORY = c.CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (c.CAMERAS,)
    RETURN_NAMES = ("cameras",)
    OUTPUT_TOOLTIPS = ("Camera settings for CSD Optimize.",)

    @classmethod
    def INPUT_TYPES(cls):
        d = CameraConfig()
        req = {
            "width": c.int_input(d.width, 8, 4096, "render width in pixels (spec: 64)", step=8),
            "height": c.int_input(d.height, 8, 4096, "render height in pixels (spec: 64)", step=8),
            "batch_size": c.int_input(d.batch_size, 1, 256, "views rendered per step (spec: 1)"),
        }
        for prefix, (field, lo, hi, step, what) in _RANGES.items():
            lo_default, hi_default = getattr(d, field)
            req[f"{prefix}_min"] = c.float_input(lo_default, lo, hi, step, f"lowest {what}")
            req[f"{prefix}_max"] = c.float_input(hi_default, lo, hi, step, f"highest {what}")
        return {"required": req}

    @classmethod
    def VALIDATE_INPUTS(cls, elevation_min=None, elevation_max=None, azimuth_min=None, azimuth_max=None,
                        distance_min=None, distance_max=None, fovy_min=None, fovy_max=None):
        values = dict(elevation_min=elevation_min, elevation_max=elevation_max, azimuth_min=azimuth_min,
                      azimuth_max=azimuth_max, distance_min=distance_min, distance_max=distance_max,
                      fovy_min=fovy_min, fovy_max=fovy_max)
        err = c.check_widgets(cls, values)
        if err:
            return err
        for prefix in _RANGES:
            lo, hi = values[f"{prefix}_min"], values[f"{prefix}_max"]
            if lo is not None and hi is not None and lo > hi:
                return f"{prefix}_min/{prefix}_max: the minimum {lo} is greater than the maximum {hi}; swap them"
        return True

    def build(self, width, height, batch_size, **ranges):
        over = {"width": int(width), "height": int(height), "batch_size": int(batch_size)}
        for prefix, (field, *_rest) in _RANGES.items():
            over[field] = [float(ranges[f"{prefix}_min"]), float(ranges[f"{prefix}_max"])]
        cfg = dataclasses.replace(CameraConfig(), **over)
        c.validate_sections("CSD Cameras", camera=dataclasses.asdict(cfg))
        return (cfg,)


NODE_CLASS_MAPPINGS = {"CSDCameras": CSDCameras}
NODE_DISPLAY_NAME_MAPPINGS = {"CSDCameras": "CSD Cameras"}
