"""The plan of a batch: one ``RunSpec`` per run (prompt × seed), each with its run folder and resolved config.

A run's configuration is built exactly as ``generate`` builds it from the same flags (preset, ``--set``, the
flags, ``--steps``) with the line's own prompt, negative prompt, seed, preset and steps in place of the flags',
then the line's ``set`` on top of everything, and is validated before anything runs. The plan is saved as ``DIR/batch.json`` (never overwritten), so ``batch
--resume DIR`` needs nothing else.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

from ..errors import CheckpointError, ConfigError
from .prompts_file import PromptLine

PLAN_FILE = "batch.json"
PLAN_FORMAT = "csd-batch"
PLAN_VERSION = 1
#: longest slug of a prompt in a run folder's name
SLUG_LENGTH = 40


@dataclass
class RunSpec:
    """One run of the batch."""

    id: str  # its run folder's name, relative to the batch folder: "0001-a-red-ball"
    index: int  # 1-based position in the batch
    line: int  # line of the PROMPTS file
    prompt: str
    seed: int
    config: dict  # the resolved RunConfig as a dict

    @property
    def folder(self) -> str:
        return self.id

    def run_config(self, prior_over: Optional[dict] = None):
        from ..config import RunConfig

        config = RunConfig.from_dict(self.config)
        return config.replace(prior=prior_over) if prior_over else config


@dataclass
class BatchPlan:
    runs: List[RunSpec]
    outputs: dict  # runs.outputs.RunOutputs as a dict (quiet excluded: that is the driver's)
    prompts: str = ""  # the PROMPTS file it came from

    def save(self, folder: Path) -> Path:
        from ..io import write_json

        data = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "prompts": self.prompts, "outputs": self.outputs,
                "runs": [asdict(r) for r in self.runs]}
        return write_json(Path(folder) / PLAN_FILE, data)

    @classmethod
    def load(cls, folder: Path) -> "BatchPlan":
        path = Path(folder) / PLAN_FILE
        if not path.is_file():
            raise ConfigError("--resume", f"{folder} is not a batch folder: it has no {PLAN_FILE}. Pass the --out "
                                          "folder of a `batch` command.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != PLAN_FORMAT:
                raise ValueError(f"no '{PLAN_FORMAT}' header")
            if int(data.get("version", 0)) > PLAN_VERSION:
                raise ValueError(f"written by a newer version (format {data.get('version')}); update the pack")
            runs = [RunSpec(**r) for r in data["runs"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot use {path}: {e}") from None
        return cls(runs=runs, outputs=data.get("outputs", {}), prompts=data.get("prompts", ""))


def slug(text: str, length: int = SLUG_LENGTH) -> str:
    """A readable, portable folder name for a prompt: ASCII lower case words joined by '-' (cut at a word)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    words = re.sub(r"[^a-z0-9]+", " ", ascii_text).split()
    out = ""
    for w in words:
        nxt = f"{out}-{w}" if out else w
        if len(nxt) > length:
            if not out:
                out = w[:length]
            break
        out = nxt
    return out or "prompt"


def plan_runs(lines: List[PromptLine], args: argparse.Namespace, source: str) -> List[RunSpec]:
    """One spec per line and seed, each config built as ``generate`` builds it and validated (a ``ConfigError``
    names the file's line)."""
    from ..runs.flags import build_config, parse_overrides
    from ..presets import get_preset

    seeds = 1 if args.seeds is None else args.seeds
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError("--seeds", f"must be a positive integer, got {seeds!r}")
    specs: List[RunSpec] = []
    total = len(lines) * seeds
    width = max(4, len(str(total)))
    for ln in lines:
        where = f"{source} line {ln.line}"
        preset = ln.preset or args.preset or "csd-coarse"
        base_seed = ln.seed if ln.seed is not None else (args.seed if args.seed is not None
                                                         else get_preset(preset).optim.seed)
        for k in range(seeds):
            seed = base_seed + k
            line_args = copy.copy(args)
            line_args.prompt = ln.prompt
            line_args.negative_prompt = ln.negative_prompt if ln.negative_prompt is not None else args.negative_prompt
            line_args.source_prompt = None
            line_args.seed = seed
            steps = ln.steps if ln.steps is not None else args.steps
            try:
                config = build_config(line_args, preset, steps)
                if ln.sets:  # the line's own settings come last: over --set, the flags and --steps
                    config = config.replace(**parse_overrides(ln.sets))
                config.validate(require_model=True)
            except ConfigError as e:
                raise ConfigError(where, str(e)) from None
            index = len(specs) + 1
            name = f"{index:0{width}d}-{slug(ln.prompt)}" + (f"-seed{seed}" if seeds > 1 else "")
            specs.append(RunSpec(id=name, index=index, line=ln.line, prompt=ln.prompt, seed=seed,
                                 config=config.to_dict()))
    return specs


def absolute_model_paths(specs: List[RunSpec]) -> None:
    """Model paths that exist here become absolute, so workers in other folders (Ray) and a later --resume from
    another folder find them."""
    from ..priors import ANALYTIC_PREFIX, TOY_MODEL

    for spec in specs:
        prior = spec.config["prior"]
        for key in ("model", "model_config", "controlnet", "lora_base_model"):
            value = prior.get(key)
            if key in ("model", "lora_base_model") and (value == TOY_MODEL or
                                                        str(value).split(":")[0] == ANALYTIC_PREFIX):
                continue  # names of the priors shipped with the pack, not paths
            if isinstance(value, str) and value and Path(value).exists():
                prior[key] = str(Path(value).resolve())
