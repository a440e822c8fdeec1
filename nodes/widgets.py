"""Widget declarations of the node inputs (ComfyUI's ``INPUT_TYPES`` tuples), with defaults taken from the engine's
dataclasses, and the range and choice checks that ``VALIDATE_INPUTS`` must do itself."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

#: the value of an optional number widget that keeps the preset's setting (any negative value does)
PRESET_VALUE = -1.0


def default_of(cls, name: str) -> Any:
    """The default of dataclass field ``name`` (calling its default_factory)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def int_input(default: int, lo: int, hi: int, tooltip: str, step: int = 1, **extra) -> tuple:
    return ("INT", {"default": int(default), "min": int(lo), "max": int(hi), "step": int(step), "tooltip": tooltip,
                    **extra})


def float_input(default: float, lo: float, hi: float, step: float, tooltip: str, **extra) -> tuple:
    return ("FLOAT", {"default": float(default), "min": float(lo), "max": float(hi), "step": float(step),
                      "tooltip": tooltip, **extra})


def bool_input(default: bool, tooltip: str) -> tuple:
    return ("BOOLEAN", {"default": bool(default), "tooltip": tooltip})


def string_input(default: str, tooltip: str, multiline: bool = False) -> tuple:
    return ("STRING", {"default": default, "multiline": multiline, "tooltip": tooltip})


def combo_input(choices: List[str], default: Optional[str], tooltip: str) -> tuple:
    opts: Dict[str, Any] = {"tooltip": tooltip}
    if default is not None and default in choices:
        opts["default"] = default
    return (list(choices), opts)


def check_widgets(node_cls, values: Dict[str, Any]) -> Optional[str]:
    """Range and choice checks of ``values`` against ``node_cls.INPUT_TYPES()``.

    ComfyUI skips its own min/max/choice checks for the inputs a ``VALIDATE_INPUTS`` names, so the nodes call
    this first. Linked inputs arrive as ``None`` and are skipped. Returns an error naming the input, or None.
    """
    spec = node_cls.INPUT_TYPES()
    merged = {**spec.get("required", {}), **spec.get("optional", {})}
    for name, value in values.items():
        if value is None or name not in merged:
            continue
        typ, opts = merged[name][0], (merged[name][1] if len(merged[name]) > 1 else {})
        if isinstance(typ, list):
            if value not in typ:
                return f"{name}: {value!r} is not one of {typ[:20]}"
        elif typ in ("INT", "FLOAT"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"{name}: expected a number, got {value!r}"
            if "min" in opts and value < opts["min"]:
                return f"{name}: {value} is smaller than the minimum {opts['min']}"
            if "max" in opts and value > opts["max"]:
                return f"{name}: {value} is bigger than the maximum {opts['max']}"
    return None
