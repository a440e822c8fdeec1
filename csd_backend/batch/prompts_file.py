"""The PROMPTS file of ``batch``: plain text (one prompt a line) or JSONL (one JSON object a line).

Text: every line is a prompt; blank lines and lines starting with ``#`` are skipped. JSONL (a ``.jsonl`` /
``.ndjson`` file, or any file whose first line starts with ``{``): every non-blank line is an object with
``prompt`` and optionally ``negative_prompt``, ``seed``, ``preset``, ``steps`` and ``set`` (overrides, as
``{"render.num_samples_per_ray": 64}`` or ``["render.num_samples_per_ray=64"]``, applied last: over ``--set`` and
the other flags).

Every problem raises a ``ConfigError`` whose field is ``FILE line N`` (and the key), before anything runs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..errors import ConfigError

#: the keys a JSONL line may have
LINE_KEYS = ("prompt", "negative_prompt", "seed", "preset", "steps", "set")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class PromptLine:
    """One prompt of the file and what its line sets (None: the command line's value)."""

    line: int  # 1-based line number in the file
    prompt: str
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    preset: Optional[str] = None
    steps: Optional[int] = None
    sets: List[str] = field(default_factory=list)  # SECTION.FIELD=VALUE, like --set


def read_prompts(path) -> List[PromptLine]:
    """The prompts of ``path`` in file order; a ``ConfigError`` naming the line for anything wrong."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError("PROMPTS", f"{path} {what}; give a text file with one prompt a line, or a .jsonl file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError("PROMPTS", f"cannot read {path}: {e.strerror or e}") from None
    lines = []
    for n, data in enumerate(raw.split(b"\n"), 1):
        try:
            lines.append((n, data.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError:
            raise ConfigError(f"{path.name} line {n}", "is not UTF-8 text; save the file as UTF-8") from None
    if lines and lines[0][1].startswith("\ufeff"):  # a byte-order mark some editors write
        lines[0] = (1, lines[0][1][1:])
    first = next((text.strip() for _, text in lines if text.strip()), "")
    jsonl = path.suffix.lower() in JSONL_SUFFIXES or first.startswith("{")
    out = [_json_line(path.name, n, text) if jsonl else PromptLine(n, text.strip())
           for n, text in lines if text.strip() and (jsonl or not text.lstrip().startswith("#"))]
    if not out:
        raise ConfigError("PROMPTS", f"{path} holds no prompt; write one prompt a line (or JSON objects, .jsonl)")
    return out


def _json_line(name: str, n: int, text: str) -> PromptLine:
    from ..io import non_finite_path
    from ..presets import preset_names

    where = f"{name} line {n}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(where, f"is not valid JSON ({e.msg} at column {e.colno}); each line of a .jsonl file is "
                                 'one object such as {"prompt": "a red ball", "seed": 3}') from None
    if not isinstance(data, dict):
        raise ConfigError(where, f'must be a JSON object such as {{"prompt": "a red ball"}}, got {text.strip()[:60]}')
    unknown = [k for k in data if k not in LINE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}", f"unknown key; a line may have {', '.join(LINE_KEYS)} "
                                                    "(other settings go into \"set\")")
    bad = non_finite_path(data)
    if bad is not None:
        raise ConfigError(f"{where}: {bad}", "is not a finite number; NaN and Infinity are not allowed")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{where}: prompt", "is missing or empty; every line needs a \"prompt\" (text)")
    negative = data.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ConfigError(f"{where}: negative_prompt", f"must be text, got {negative!r}")
    ints = {}
    for key in ("seed", "steps"):
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < (1 if key == "steps" else 0)):
            kind = "a positive integer" if key == "steps" else "an integer >= 0"
            raise ConfigError(f"{where}: {key}", f"must be {kind}, got {value!r}")
        ints[key] = value
    preset = data.get("preset")
    if preset is not None and preset not in preset_names():
        raise ConfigError(f"{where}: preset", f"unknown preset {preset!r}; choose one of: {', '.join(preset_names())}")
    return PromptLine(n, prompt.strip(), negative, ints["seed"], preset, ints["steps"],
                      _set_items(where, data.get("set")))


def _set_items(where: str, value) -> List[str]:
    """A line's ``set`` as ``--set`` items (values as JSON, which ``--set`` parses back)."""
    if value is None:
        return []
    if isinstance(value, dict):
        items = []
        for key, v in value.items():
            if "." not in key:
                raise ConfigError(f"{where}: set.{key}", "is not SECTION.FIELD, e.g. \"optim.lr\"")
            items.append(f"{key}={json.dumps(v)}")
        return items
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{where}: set", 'must be an object such as {"optim.lr": 0.01} or a list such as '
                                       '["optim.lr=0.01"]')
