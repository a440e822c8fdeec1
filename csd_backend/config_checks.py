"""The value checks of ``config.py``'s validation: each raises ``ConfigError`` naming the field and what it must be."""
from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError


def choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(name, f"{value!r} is not one of {', '.join(map(repr, choices))}")


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if not is_number(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(name, f"must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def in_range(name: str, value: Any, lo: float, hi: float) -> None:
    if not is_number(value) or not lo <= value <= hi:
        raise ConfigError(name, f"must be a number in [{lo}, {hi}], got {value!r}")


def int_range(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(name, f"must be an integer in [{lo}, {hi}], got {value!r}")


def range_pair(name: str, value: Any, lo: float, hi: float) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(is_number(v) for v in value):
        raise ConfigError(name, f"must be a pair [min, max] of numbers, got {value!r}")
    if value[0] > value[1]:
        raise ConfigError(name, f"min {value[0]} is greater than max {value[1]}; swap them")
    if value[0] < lo or value[1] > hi:
        raise ConfigError(name, f"must lie within [{lo}, {hi}], got {list(value)}")


def vec(name: str, value: Any, n: int, lo: float, hi: float) -> None:
    if (not isinstance(value, (list, tuple)) or len(value) != n
            or not all(is_number(v) and lo <= v <= hi for v in value)):
        raise ConfigError(name, f"must be {n} numbers in [{lo}, {hi}], got {value!r}")


def box(name: str, value: Any) -> None:
    """An axis-aligned box ``[[x0, y0, z0], [x1, y1, z1]]`` with x0 < x1, y0 < y1, z0 < z1."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(c, (list, tuple)) and len(c) == 3 and all(is_number(x) for x in c) for c in value)
            or not all(a < b for a, b in zip(*value))):
        raise ConfigError(name, f"must be [[x0, y0, z0], [x1, y1, z1]] with x0 < x1, y0 < y1, z0 < z1 (or null for "
                                f"±radius), got {value!r}")
