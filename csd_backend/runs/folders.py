"""Run folders on disk: an output folder checked (and made) before anything slow runs, and removed again when a
command fails before it starts; which run ``--resume PATH`` means; the scene ``--init-scene PATH`` names; paths
quoted as a user would type them."""
from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path
from typing import List

from ..errors import ConfigError


def missing_dirs(path: Path) -> List[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    out = []
    p = path
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def check_out_dir(path: Path, flag: str = "--out") -> List[Path]:
    """Make sure ``path`` is (or can become) a writable folder, before anything slow runs. Returns the folders it
    created (deepest first) so that a run that fails before it starts can remove them again."""
    if path.exists() and not path.is_dir():
        raise ConfigError(flag, f"{path} is a file, not a folder; give a folder (new or empty)")
    created = missing_dirs(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(flag, f"cannot create the folder {path}: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".csd-write-test-", dir=str(path))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        remove_empty(created)
        raise ConfigError(flag, f"cannot write into {path}: {e.strerror or e}") from None
    return created


def remove_empty(folders: List[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: what a failed command created, nothing else."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return


def resume_target(path: Path):
    """(run folder, checkpoint or None) of ``--resume PATH`` (a run folder or a checkpoint file)."""
    from ..io import find_checkpoint
    from ..optimize import RUN_CONFIG_FILE, run_checkpoint

    if path.is_dir():
        ckpt = run_checkpoint(path)
        if ckpt is None and not (path / RUN_CONFIG_FILE).is_file():
            raise ConfigError("--resume", f"{path} is not a run folder: it has no checkpoints/last.ckpt and no "
                                          f"{RUN_CONFIG_FILE}. Pass the folder written by `generate --out`.")
        return path, ckpt
    ckpt = find_checkpoint(path)
    return (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent), ckpt


def quoted(path) -> str:
    """``path`` as it goes into a command a user can paste into a shell."""
    return shlex.quote(str(path))


def load_init_scene(path, scene_cfg=None):
    """The scene ``--init-scene PATH`` names: a run folder or checkpoint (``optimize.load_scene``), or a 3DGS ``.ply``
    of Gaussian splats (``export.load_splats``; a file that is not one is refused naming what it lacks). The splats
    take ``scene_cfg``'s Gaussian settings (renderer, rates, density control) when that is a Gaussian scene's."""
    p = Path(path)
    if p.suffix.lower() == ".ply" and not p.is_dir():
        from ..export.splats import load_splats

        return load_splats(p, scene_cfg if scene_cfg is not None and scene_cfg.kind == "gaussians" else None)
    from ..optimize import load_scene

    return load_scene(p)[0]
