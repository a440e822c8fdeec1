"""Files: atomic writes, never-overwrite output names, and checkpoints read with ``weights_only=True``."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Union

import torch

from .errors import CheckpointError, OutputExistsError

PathLike = Union[str, os.PathLike]
CHECKPOINT_FORMAT = "csd-run"
CHECKPOINT_VERSION = 1


def atomic_write(path: PathLike, write: Callable[[str], None], overwrite: bool = False) -> Path:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, then rename it into place.

    With ``overwrite=False`` an existing ``path`` raises ``OutputExistsError`` (outputs are never replaced).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise OutputExistsError(f"{path} already exists; outputs are never overwritten. Choose another name or folder.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if not overwrite:
            # os.link fails if the target appeared meanwhile, so two writers cannot clobber each other
            try:
                os.link(tmp, path)
            except FileExistsError as e:
                raise OutputExistsError(f"{path} already exists; outputs are never overwritten.") from e
            except OSError:
                if path.exists():
                    raise OutputExistsError(f"{path} already exists; outputs are never overwritten.")
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def unique_path(folder: PathLike, stem: str, suffix: str) -> Path:
    """``folder/stem_00001.suffix`` with the first counter that does not exist yet."""
    folder = Path(folder)
    i = 1
    while True:
        p = folder / f"{stem}_{i:05d}{suffix}"
        if not p.exists():
            return p
        i += 1


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> Path:
    """Atomically (re)write a run checkpoint; the previous one stays intact until the new one is complete."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=True)


def find_checkpoint(path: PathLike) -> Path:
    """A checkpoint file, or the last checkpoint of a run folder."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if cand.is_file():
                return cand
        raise CheckpointError(f"no checkpoint in {p}: looked for checkpoints/last.ckpt and last.ckpt. "
                              "Pass the run folder written by `generate --out` or a .ckpt file.")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist. Pass the run folder written by `generate --out` "
                              "or a .ckpt file inside it.")
    return p


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    p = find_checkpoint(path)
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a torch file
        raise CheckpointError(f"could not read checkpoint {p}: {e}. The file may be truncated; "
                              "use an earlier checkpoint or start a new run.") from e
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not a CSD run checkpoint (no '{CHECKPOINT_FORMAT}' header).")
    if data.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{p} was written by a newer version (format {data['version']}); update the pack.")
    return data
