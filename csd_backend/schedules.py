"""One helper for every value that changes over optimisation steps (spec §2).

A schedule is either a constant, or ``[start_step, start_value, end_value, end_step]``: linear between the two
steps and held at the ends. A 3-element list ``[start_value, end_value, end_step]`` gets ``start_step = 0``
(threestudio's ``C()`` reads its configs the same way).
``end_step == start_step`` is a step change at that step (the value jumps to ``end_value`` once
``step >= end_step``; threestudio writes it ``[5000, 0.98, 0.5, 5001]``, which is the same thing one step later).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from .errors import ConfigError

ScheduleSpec = Union[float, int, Sequence[float]]
#: what a schedule may be (every error about one says it)
FORMS = ("a number, [start_value, end_value, end_step] (from step 0) or [start_step, start_value, end_value, "
         "end_step]")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_schedule(spec: ScheduleSpec, field: str = "schedule", minimum: Optional[float] = None,
                      positive: bool = False) -> ScheduleSpec:
    """Return ``spec`` unchanged if it is a valid schedule, else raise ``ConfigError`` naming ``field``.

    Values must be finite; with ``minimum`` (or ``positive``) every value must be at least (above) it.
    """
    _validate_shape(spec, field)
    values = [spec] if isinstance(spec, (int, float)) else list(_normalise(spec)[1:3])
    for v in values:
        if (minimum is not None and v < minimum) or (positive and v <= 0):
            bound = f"> {0}" if positive else f">= {minimum}"
            raise ConfigError(field, f"values must be {bound}, got {spec!r}")
    return spec


def _validate_shape(spec: ScheduleSpec, field: str) -> None:
    if isinstance(spec, bool):
        raise ConfigError(field, f"expected {FORMS}, got {spec!r}")
    if isinstance(spec, (int, float)):
        if not math.isfinite(spec):
            raise ConfigError(field, f"must be a finite number, got {spec!r}")
        return
    if isinstance(spec, (list, tuple)):
        if len(spec) not in (3, 4) or not all(_finite(v) for v in spec):
            raise ConfigError(
                field,
                f"expected {FORMS} (finite numbers), got {spec!r}",
            )
        s0, _, _, s1 = _normalise(spec)
        if s1 < s0:
            raise ConfigError(field, f"end_step {s1} is before start_step {s0}; swap them")
        return
    raise ConfigError(field, f"expected {FORMS}, got {spec!r}")


def _normalise(spec: Sequence[float]):
    if len(spec) == 3:
        return 0, spec[0], spec[1], spec[2]
    return spec[0], spec[1], spec[2], spec[3]


def schedule_value(spec: ScheduleSpec, step: int) -> float:
    """Value of a schedule at ``step`` (the global step within the current stage)."""
    if isinstance(spec, (int, float)):
        return float(spec)
    s0, v0, v1, s1 = _normalise(spec)
    if s1 == s0:
        return float(v1 if step >= s1 else v0)
    frac = min(max((step - s0) / (s1 - s0), 0.0), 1.0)
    return float(v0 + (v1 - v0) * frac)
