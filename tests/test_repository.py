"""The repository is cloned into users' ``custom_nodes``: it must hold no symlink that leaves it and no absolute
path of the machine it was developed on. CI runs these tests, so such a file makes CI fail."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", "runs", "outputs", "build"}
_BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".safetensors", ".ckpt", ".glb", ".bin", ".pt", ".pth", ".npz", ".gz"}


def tracked_files() -> list[Path]:
    """Files git tracks (or, outside a git checkout, every file except caches and virtual environments)."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / p for p in out.decode().split("\0") if p]
    files = []
    for here, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        files += [Path(here) / n for n in names]
    return files


def escaping_symlinks(files, root: Path) -> list[str]:
    """Symlinks among ``files`` whose target is absolute or resolves outside ``root``."""
    bad = []
    for f in files:
        if f.is_symlink():
            target = os.readlink(f)
            resolved = (f.parent / target).resolve()
            if os.path.isabs(target) or resolved == root or root not in resolved.parents:
                bad.append(f"{f.relative_to(root)} -> {target}")
    return bad


#: system temporary folders: a checkout inside one is normal (CI clones there), and docs and tests name them
TEMPORARY_FOLDERS = {"/tmp", "/var/tmp", str(Path(tempfile.gettempdir()).resolve()), tempfile.gettempdir().rstrip("/")}


def machine_path_pattern() -> re.Pattern:
    """Absolute paths that only exist on a developer's machine: home folders, this checkout's parent folder (unless
    that is a system temporary folder, which docs and tests may name on purpose: a clone in /tmp is normal)."""
    parts = [r"/home/[A-Za-z0-9_.-]+/", r"/Users/[A-Za-z0-9_.-]+/", r"[A-Za-z]:\\Users\\", "/" + "root/"]
    for p in {str(ROOT.parent), os.path.expanduser("~")}:
        if p not in ("/", "") and len(p) > 1 and p.rstrip("/") not in TEMPORARY_FOLDERS:
            parts.append(re.escape(p.rstrip("/") + "/"))
    return re.compile("|".join(parts))


def test_no_symlink_leaves_the_repository():
    bad = escaping_symlinks(tracked_files(), ROOT)
    assert not bad, f"tracked symlinks that point outside the repository (they end up in custom_nodes): {bad}"


def test_no_absolute_machine_paths():
    pattern = machine_path_pattern()
    hits = []
    for f in tracked_files():
        if f.suffix.lower() in _BINARY_SUFFIXES or f.is_symlink() or not f.is_file():
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "absolute paths of a developer's machine in tracked files:\n" + "\n".join(hits[:20])


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The two checks are not vacuous: a link out of the tree and a home path are found."""
    (tmp_path / "inside.txt").write_text("x")
    (tmp_path / "ok").symlink_to("inside.txt")
    (tmp_path / "out").symlink_to("/etc")
    (tmp_path / "up").symlink_to("..")
    bad = escaping_symlinks([tmp_path / n for n in ("ok", "out", "up")], tmp_path)
    assert [b.split(" ")[0] for b in bad] == ["out", "up"]
    pattern = machine_path_pattern()
    assert pattern.search("see /" + "home/alice/models/sd")
    assert (pattern.search(str(ROOT.parent) + "/somewhere") or str(ROOT.parent) == "/"
            or str(ROOT.parent) in TEMPORARY_FOLDERS)
    assert not pattern.search("models/diffusers/stable-diffusion-2-1-base")
