"""A run's configuration from command-line flags (``generate``, ``refine``, ``texture`` and each line of
``batch``): the preset, then ``--set SECTION.FIELD=VALUE``, then the named flags, then ``--steps`` (stretching the
schedules); and, for ``--resume``, which given flags would change the saved run."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

from ..errors import ConfigError

#: settings that may differ from the saved run on --resume (they do not change what is trained)
RESUME_FREE = {"prior.model", "prior.model_config", "prior.device", "prior.dtype", "optim.steps"}
#: the named flags and the configuration fields they set
FLAG_FIELDS = {"prompt": "guidance.prompt", "negative_prompt": "guidance.negative_prompt",
               "source_prompt": "guidance.source_prompt", "seed": "optim.seed",
               "preview_every": "optim.preview_every", "checkpoint_every": "optim.checkpoint_every",
               "resolution": "prior.resolution", "model": "prior.model", "model_config": "prior.model_config",
               "device": "prior.device", "dtype": "prior.dtype", "controlnet": "prior.controlnet",
               "controlnet_scale": "prior.controlnet_scale", "lora_base_model": "prior.lora_base_model"}


#: the sections of the configuration (``--set SECTION.FIELD=VALUE``)
SECTIONS = ("guidance", "prior", "scene", "camera", "render", "loss", "optim")


def flag_hint(err) -> str:
    """How the command line sets the configuration field an engine error names (``ConfigError.field``): the
    named flag, or ``--set``; empty when the error already names a flag. The engine's messages name fields, not
    flags, because the ComfyUI nodes show them too (with their widgets instead)."""
    field = getattr(err, "field", None)
    if not isinstance(field, str) or "--" in str(err) or field.split(".")[0] not in SECTIONS or "." not in field:
        return ""
    flag = next((f"--{name.replace('_', '-')}" for name, f in FLAG_FIELDS.items() if f == field), None)
    return f" (on the command line: {flag} or --set {field}=...)" if flag else \
        f" (on the command line: --set {field}=...)"


def parse_value(text: str, key: str = "--set"):
    """A --set value: JSON when it parses (numbers, lists, true/false, null), else the text itself. NaN and
    ±Infinity (which Python's JSON reader accepts) are refused, naming the field."""
    from ..io import non_finite_path

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    bad = non_finite_path(value)
    if bad is not None:
        where = "" if bad == "value" else f" (at {bad})"
        raise ConfigError(key, f"{text!r} is not a finite number{where}; NaN and Infinity are not allowed")
    return value


def parse_overrides(items: List[str]) -> dict:
    """``["optim.lr=0.01", ...]`` → ``{"optim": {"lr": 0.01}}`` (errors name --set and show the form)."""
    out: dict = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError("--set", f"'{item}' is not SECTION.FIELD=VALUE, e.g. optim.lr=0.01")
        key, value = item.split("=", 1)
        *path, name = key.split(".")  # nested sections too: scene.gaussians.max_gaussians
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[name] = parse_value(value, key)
    return out


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build_config(args, preset: str, steps: Optional[int], init_scene_cfg=None):
    """The configuration the flags describe, built as for a new run: preset, --set, the flags, then --steps
    (stretching the schedules unless --no-rescale-schedules), then the scene settings of --init-scene."""
    from ..presets import get_preset

    config = get_preset(preset)
    over = parse_overrides(args.set)
    guid = over.setdefault("guidance", {})
    for key in ("prompt", "negative_prompt", "source_prompt"):
        if getattr(args, key) is not None:
            guid[key] = getattr(args, key)
    pri = over.setdefault("prior", {})
    for key in ("model", "model_config", "device", "dtype", "resolution", "controlnet", "controlnet_scale",
                "lora_base_model"):
        if getattr(args, key) is not None:
            pri[key] = getattr(args, key)
    opt_over = over.setdefault("optim", {})
    for key in ("seed", "preview_every", "checkpoint_every"):
        if getattr(args, key) is not None:
            opt_over[key] = getattr(args, key)
    config = config.replace(**over)
    if steps is not None:
        config = config.with_steps(steps, rescale_schedules=not args.no_rescale_schedules)
    if init_scene_cfg is not None:  # an edited scene keeps its own settings (as Optimization does)
        config = config.replace(scene=dataclasses.asdict(init_scene_cfg))
    return config


def given_fields(args) -> set:
    """The configuration fields the command line sets explicitly (a preset sets every field it names)."""
    from ..config import SceneConfig
    from ..presets import PRESETS

    fields = set()
    if args.preset:
        fields |= {"preset"} | set(flatten(PRESETS[args.preset]))
    fields |= {field for flag, field in FLAG_FIELDS.items() if getattr(args, flag) is not None}
    fields |= {item.split("=", 1)[0] for item in args.set}
    if args.init_scene:
        fields |= {f"scene.{f.name}" for f in dataclasses.fields(SceneConfig)}
    return fields


def check_resume_flags(args, run_dir: Path, saved) -> None:
    """Refuse flags whose values differ from the saved run (naming the field, the saved and the new value).

    The flags are turned into a configuration exactly as for a new run; schedules are stretched to the run's
    planned length (its config.json), which is what the original --steps did. Flags left out keep the saved
    values; --steps sets where the resumed run ends; the model, device and dtype may change."""
    from ..presets import PRESETS
    from .folders import load_init_scene

    if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
        raise ConfigError("--out", f"{args.out} is not the folder of the run being resumed ({run_dir}); a resumed "
                                   "run writes into its own folder. Leave --out out, or start a new run there "
                                   "without --resume.")
    given = given_fields(args) - RESUME_FREE
    if not given:
        return
    preset = args.preset or (saved.preset if saved.preset in PRESETS else "csd-coarse")
    init_cfg = load_init_scene(args.init_scene).cfg if args.init_scene else None
    # --steps of the original command stretched the schedules to the run's planned length: do the same
    new = flatten(build_config(args, preset, saved.optim.steps, init_cfg).to_dict())
    old = flatten(saved.to_dict())
    names = sorted(new, key=lambda name: name != "preset")  # the preset first: it explains the rest
    diffs = [f"{name}: saved {old.get(name)!r}, new {new[name]!r}" for name in names
             if name in given and old.get(name) != new[name]]
    if diffs:
        more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise ConfigError("--resume", f"these settings differ from the saved run {run_dir}: "
                                      f"{'; '.join(diffs[:6])}{more}. A resumed run keeps its saved settings: "
                                      "leave these flags out (or give the saved values), or start a new run "
                                      "in another --out folder.")
