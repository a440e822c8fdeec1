"""What the settings nodes output for "CSD Optimize": the guidance as a ``GuidanceSpec`` and the cameras' overrides,
with every step-valued schedule given for the spec's run length (10000 steps) so that it follows the step count
chosen on the Optimize node."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from csd_backend.config import GuidanceConfig, OptimConfig, RunConfig
from csd_backend.errors import ConfigError

from .input_errors import validate_config
from .widgets import PRESET_VALUE, default_of

STEPS_REF = int(default_of(OptimConfig, "steps"))  # the spec's run length (10000): schedules are given for it
_NEG = default_of(GuidanceConfig, "negative_weight")  # [0, 0.0, 1.0, 5000]


@dataclass(frozen=True)
class GuidanceSpec:
    """What "CSD Guidance" outputs (type CSD_GUIDANCE): the guidance settings, with the step-valued schedules given
    as fractions of the run so that they follow the step count chosen on "CSD Optimize".

    ``config(steps)`` is the :class:`GuidanceConfig` for a run of ``steps`` steps; ``overrides(steps)`` the same as
    a dict of the fields the node sets (the preset keeps the others: view thresholds, gradient clipping).
    """

    prompt: str = "a DSLR photo of a corgi"
    negative_prompt: str = default_of(GuidanceConfig, "negative_prompt")
    mode: str = default_of(GuidanceConfig, "mode")
    source_prompt: str = default_of(GuidanceConfig, "source_prompt")
    guidance_weight: float = float(default_of(GuidanceConfig, "guidance_weight"))
    negative_weight_start: float = float(_NEG[1])
    negative_weight_end: float = float(_NEG[2])
    #: ω2 goes from start to end over this fraction of the run (spec: steps 0 → 5000 of 10000)
    negative_weight_anneal_until: float = (_NEG[3] - _NEG[0]) / STEPS_REF
    cfg_scale: float = float(default_of(GuidanceConfig, "cfg_scale"))
    weighting: str = default_of(GuidanceConfig, "weighting")
    grad_normalize: bool = bool(default_of(GuidanceConfig, "grad_normalize"))
    #: the timestep range; negative (-1): the preset's (whatever its schedule: a jump, a linear anneal, ...).
    #: The largest timestep drops from t_max_start to t_max_end at t_max_switch_at (a fraction of the run)
    t_min: float = PRESET_VALUE
    t_max_start: float = PRESET_VALUE
    t_max_end: float = PRESET_VALUE
    t_max_switch_at: float = PRESET_VALUE
    view_dependent: bool = bool(default_of(GuidanceConfig, "view_dependent"))
    #: Perp-Neg: "preset" (the preset's setting: on for the character presets), "on" or "off"
    perp_neg: str = "preset"
    #: VSD: the LoRA's learning rate and the probability of dropping its camera condition; negative (-1): the
    #: preset's value
    lora_lr: float = PRESET_VALUE
    camera_condition_drop: float = PRESET_VALUE

    def overrides(self, steps: int) -> Dict[str, Any]:
        steps = int(steps)
        if self.negative_weight_start == self.negative_weight_end or self.negative_weight_anneal_until <= 0:
            negative_weight: Any = float(self.negative_weight_end)
        else:
            end = max(1, int(round(self.negative_weight_anneal_until * steps)))
            negative_weight = [0, float(self.negative_weight_start), float(self.negative_weight_end), end]
        return {
            "mode": self.mode, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
            "source_prompt": self.source_prompt, "guidance_weight": float(self.guidance_weight),
            "negative_weight": negative_weight, "cfg_scale": float(self.cfg_scale), "weighting": self.weighting,
            "grad_normalize": bool(self.grad_normalize), **self._t_range(steps),
            "view_dependent": bool(self.view_dependent),
            **({} if self.perp_neg == "preset" else {"perp_neg": self.perp_neg == "on"}),
            **{name: float(getattr(self, name)) for name in ("lora_lr", "camera_condition_drop")
               if getattr(self, name) >= 0},
        }

    def _t_range(self, steps: int) -> Dict[str, Any]:
        """The timestep fields the widgets set (those at -1 are left to the preset)."""
        out: Dict[str, Any] = {} if self.t_min < 0 else {"min_step_percent": float(self.t_min)}
        if self.t_max_start < 0 and self.t_max_end < 0:
            return out
        for name in ("t_max_start", "t_max_end"):
            if getattr(self, name) < 0:
                other = "t_max_end" if name == "t_max_start" else "t_max_start"
                raise ConfigError(name, f"is -1 (the preset's) but {other} is set: set both, or both to -1 to "
                                        "keep the preset's largest timestep")
        if self.t_max_start == self.t_max_end:
            out["max_step_percent"] = float(self.t_max_end)
        elif self.t_max_switch_at < 0:
            raise ConfigError("t_max_switch_at", f"is -1 but t_max_start ({self.t_max_start}) and t_max_end "
                                                 f"({self.t_max_end}) differ: say when t_max drops (0.5 = halfway)")
        else:  # a jump, written like threestudio: [N, start, end, N + 1]
            at = int(round(self.t_max_switch_at * steps))
            out["max_step_percent"] = [at, float(self.t_max_start), float(self.t_max_end), at + 1]
        return out

    def config(self, steps: int = STEPS_REF) -> GuidanceConfig:
        return RunConfig().replace(guidance=self.overrides(steps)).guidance

    def validate(self) -> "GuidanceSpec":
        """Raise ConfigError naming the node input when a setting is invalid or inconsistent."""
        if 0 <= self.t_max_start and 0 <= self.t_max_end and not self.t_min <= min(self.t_max_start, self.t_max_end):
            raise ConfigError("t_min", f"{self.t_min} must not exceed t_max_start ({self.t_max_start}) and "
                                       f"t_max_end ({self.t_max_end}): t is drawn from [t_min, t_max]")
        g = self.overrides(STEPS_REF)
        validate_config(RunConfig().replace(guidance=g))
        return self


#: the CameraConfig fields that "CSD Cameras" sets; Optimize takes these and leaves the rest to the preset
CAMERA_FIELDS = ("height", "width", "batch_size", "resolution_milestones", "elevation_range", "azimuth_range",
                 "distance_range", "fovy_range")


def camera_overrides(cameras, steps: int) -> Dict[str, Any]:
    """The camera settings of "CSD Cameras" for a run of ``steps`` steps: its size milestones are given for a run
    of STEPS_REF steps (as the guidance schedules) and follow the run's length."""
    over = {k: getattr(cameras, k) for k in CAMERA_FIELDS}
    over["resolution_milestones"] = [int(round(m * int(steps) / STEPS_REF)) for m in cameras.resolution_milestones]
    return over
