"""The nodes' run folders: ``<output>/csd3d/runs/<run_name>_NNNNN``, one per run of a node (never reused), the
newest of a name is the one ``resume`` continues; and the signature that tells ComfyUI a checkpoint changed."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

from csd_backend.errors import ConfigError

from .model_folders import output_directory

#: output sub-folder of every run: <output>/csd3d/runs/<run name>_<NNNNN>/checkpoints/last.ckpt
RUNS_SUBDIR = ("csd3d", "runs")
#: the scene-source choice that makes a new scene instead of loading a run
NEW_SCENE = "(new scene)"
#: an attribute set on scenes made by "CSD 3D Scene" that were never trained: Optimize then initialises the
#: scene from its own seed (as the command line does) instead of copying the random weights
UNTRAINED_ATTR = "_csd_untrained"
#: what a run name may be (a folder name on every OS)
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def runs_directory() -> Path:
    return output_directory().joinpath(*RUNS_SUBDIR)


def check_run_name(run_name: str) -> None:
    if not RUN_NAME.match(run_name or ""):
        raise ConfigError("run_name", f"{run_name!r}: use 1-100 letters, digits, '.', '_' or '-' (no folders), "
                                      "starting with a letter or digit")


def run_folders(run_name: str) -> List[Path]:
    """``<runs>/<run_name>_NNNNN`` folders, oldest first."""
    root = runs_directory()
    if not root.is_dir():
        return []
    pat = re.compile(re.escape(run_name) + r"_(\d{5,})$")
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := pat.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_name: str) -> Optional[Path]:
    """The checkpoint of the newest ``<run_name>_NNNNN`` run, or None. Never an older run: if the newest one
    crashed before its first checkpoint, resuming must not silently continue a different run."""
    folders = run_folders(run_name)
    if not folders:
        return None
    ckpt = folders[-1] / "checkpoints" / "last.ckpt"
    return ckpt if ckpt.is_file() else None


def new_run_folder(run_name: str) -> Path:
    """A new ``<runs>/<run_name>_NNNNN`` (created; existing runs are never reused)."""
    existing = run_folders(run_name)
    n = int(existing[-1].name.rsplit("_", 1)[1]) + 1 if existing else 1
    while True:
        folder = runs_directory() / f"{run_name}_{n:05d}"
        try:
            folder.mkdir(parents=True, exist_ok=False)
            return folder
        except FileExistsError:
            n += 1


def saved_runs() -> List[str]:
    """Run folders with a checkpoint, relative to the runs folder (choices of "CSD 3D Scene")."""
    root = runs_directory()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "checkpoints" / "last.ckpt").is_file())


def file_signature(path: Optional[Path]) -> str:
    if path is None or not path.exists():
        return "missing"
    st = path.stat()
    return f"{path}:{st.st_mtime_ns}:{st.st_size}"
