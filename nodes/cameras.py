"""CSD Cameras: the training camera sampler (resolution, batch and the ranges cameras are drawn from)."""
from __future__ import annotations

import dataclasses

from csd_backend.config import CameraConfig

from . import pack
from .input_errors import validate_sections
from .specs import STEPS_REF
from .widgets import check_widgets, float_input, int_input

_RANGES = {  # widget prefix → (CameraConfig field, lowest, highest, step, what)
    "elevation": ("elevation_range", -90.0, 90.0, 1.0, "elevation in degrees (spec: -10 … 90)"),
    "azimuth": ("azimuth_range", -360.0, 360.0, 1.0, "azimuth in degrees (spec: -180 … 180)"),
    "distance": ("distance_range", 0.01, 100.0, 0.05, "camera distance from the centre (spec: 1.5 … 2)"),
    "fovy": ("fovy_range", 1.0, 179.0, 1.0, "vertical field of view in degrees (spec: 40 … 70)"),
}


class CSDCameras:
    DESCRIPTION = ("Random training cameras: each step renders batch_size views of width×height pixels (or, from "
                   "later_from of the run, later_width×later_height), from "
                   "elevation/azimuth/distance/field of view drawn from these ranges (spec §3.1). The render is "
                   "resized to the model's resolution before the VAE. Other camera settings come from the preset "
                   "of CSD Optimize.")
    CATEGORY = pack.CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (pack.CAMERAS,)
    RETURN_NAMES = ("cameras",)
    OUTPUT_TOOLTIPS = ("Camera settings for CSD Optimize.",)

    @classmethod
    def INPUT_TYPES(cls):
        d = CameraConfig()
        req = {
            "width": int_input(d.width, 8, 4096, "render width in pixels (spec: 64)", step=8),
            "height": int_input(d.height, 8, 4096, "render height in pixels (spec: 64)", step=8),
            "batch_size": int_input(d.batch_size, 1, 256, "views rendered per step (spec: 1)"),
        }
        for prefix, (field, lo, hi, step, what) in _RANGES.items():
            lo_default, hi_default = getattr(d, field)
            req[f"{prefix}_min"] = float_input(lo_default, lo, hi, step, f"lowest {what}")
            req[f"{prefix}_max"] = float_input(hi_default, lo, hi, step, f"highest {what}")
        later = {
            "later_width": int_input(0, 0, 4096, "switch to renders this wide later in the run (ProlificDreamer: "
                                                 "512 from 20 % of the run; 0: keep width)", step=8),
            "later_height": int_input(0, 0, 4096, "switch to renders this high later in the run (0: keep height)",
                                      step=8),
            "later_from": float_input(0.2, 0.0, 1.0, 0.01, "the fraction of the run where later_width/"
                                                           "later_height take over (ProlificDreamer: 5000 of "
                                                           "25000 steps = 0.2)"),
        }
        return {"required": req, "optional": later}

    @classmethod
    def VALIDATE_INPUTS(cls, elevation_min=None, elevation_max=None, azimuth_min=None, azimuth_max=None,
                        distance_min=None, distance_max=None, fovy_min=None, fovy_max=None):
        values = dict(elevation_min=elevation_min, elevation_max=elevation_max, azimuth_min=azimuth_min,
                      azimuth_max=azimuth_max, distance_min=distance_min, distance_max=distance_max,
                      fovy_min=fovy_min, fovy_max=fovy_max)
        err = check_widgets(cls, values)
        if err:
            return err
        for prefix in _RANGES:
            lo, hi = values[f"{prefix}_min"], values[f"{prefix}_max"]
            if lo is not None and hi is not None and lo > hi:
                return f"{prefix}_min/{prefix}_max: the minimum {lo} is greater than the maximum {hi}; swap them"
        return True

    def build(self, width, height, batch_size, later_width=0, later_height=0, later_from=0.2, **ranges):
        over = {"width": int(width), "height": int(height), "batch_size": int(batch_size)}
        later = (int(later_width) or int(width), int(later_height) or int(height))
        if later != (int(width), int(height)):  # two phases; the milestone is given for the reference run length
            over.update(width=[int(width), later[0]], height=[int(height), later[1]],
                        resolution_milestones=[int(round(float(later_from) * STEPS_REF))])
        for prefix, (field, *_rest) in _RANGES.items():
            over[field] = [float(ranges[f"{prefix}_min"]), float(ranges[f"{prefix}_max"])]
        cfg = dataclasses.replace(CameraConfig(), **over)
        validate_sections("CSD Cameras", camera=dataclasses.asdict(cfg))
        return (cfg,)


NODE_CLASS_MAPPINGS = {"CSDCameras": CSDCameras}
NODE_DISPLAY_NAME_MAPPINGS = {"CSDCameras": "CSD Cameras"}
