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


# ------------------------------------------------------------------------------------------ the import graph
import import_graph  # noqa: E402  (tests/ is on the path: the graph builder is also a script)

#: package files allowed over MAX_LINES, each with the reason one concept needs the length
LONG_FILES: dict = {}
MAX_LINES = 600


def test_import_graph_has_no_circle():
    found = import_graph.cycles(import_graph.build())
    assert not found, "import circles (python tests/import_graph.py draws the graph):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_no_import_runs_up_the_layers():
    """The layers of the README's *Engine layout* (``import_graph.LAYERS``): function-local imports count too."""
    g = import_graph.build()
    assert not import_graph.unplaced(g), f"modules without a layer in import_graph.LAYERS: {import_graph.unplaced(g)}"
    up = import_graph.upward_imports(g)
    assert not up, "imports from a lower layer back up:\n" + "\n".join(up)


def test_no_module_uses_another_modules_private_names():
    g = import_graph.build()
    assert not g.private, "private names of other modules (make them public where they are shared):\n" + "\n".join(
        f"{m}:{line}: {text}" for m, line, text in g.private)


def test_the_graph_checks_catch_what_they_look_for(tmp_path):
    """A circle, an upward function-local import and a private name, in a package tree of the same shape."""
    files = {
        "csd_backend/__init__.py": "",
        "csd_backend/errors.py": "def f():\n    from .cli import main\n",  # foundation -> command line
        "csd_backend/cli.py": "from . import io\n\ndef main():\n    return io._secret\n",
        "csd_backend/io.py": "from .config import X\n",
        "csd_backend/config.py": "from .io import Y\nfrom .schedules import _hidden\n",
        "csd_backend/schedules.py": "_hidden = 1\n",
        "nodes/__init__.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g = import_graph.build(tmp_path)
    assert import_graph.cycles(g) == [["csd_backend.config", "csd_backend.io"]]
    up = import_graph.upward_imports(g)
    assert any(u.startswith("csd_backend.errors:2 imports csd_backend.cli") for u in up)
    assert any(u.startswith("csd_backend.io:1 imports csd_backend.config") for u in up)
    private = {(m, text) for m, _, text in g.private}
    assert private == {("csd_backend.cli", "io._secret"),
                       ("csd_backend.config", "from csd_backend.schedules import _hidden")}


def test_scene_kind_table_names_what_exists():
    """The table names its classes and conversions as strings (it imports none of them): each must resolve."""
    from csd_backend.config import SCENE_KINDS
    from csd_backend.scene_kinds import KINDS, resolve

    assert set(KINDS) == set(SCENE_KINDS)
    for kind, row in KINDS.items():
        for ref in (row.scene, row.renderer, *row.starts_from.values()):
            assert callable(resolve(ref)), (kind, ref)
        assert set(row.starts_from) <= set(KINDS), kind


def test_no_package_file_is_too_long():
    """Small modules named after one concept: a file over MAX_LINES is split, or listed in LONG_FILES with why."""
    long = {}
    for pkg in import_graph.PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            n = len(p.read_text(encoding="utf-8").splitlines())
            rel = p.relative_to(ROOT).as_posix()
            if n > MAX_LINES and rel not in LONG_FILES:
                long[rel] = n
    assert not long, f"package files over {MAX_LINES} lines: {long}"


def test_install_steps_pin_torch_before_any_pip_line_and_name_the_cpu_wheel():
    """The README's install blocks: the CPU torch command (a plain ``pip install torch`` pulls the CUDA build), the
    constraint file written before the first ``pip install`` of the pack and used by every one, no fixed /tmp file,
    and the clone line says what ``<URL of this repository>`` is."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    install = text[text.index("## Install"):text.index("## The two commands")]
    comfy = text[text.index("## Using the pack in ComfyUI"):text.index("### Models")]
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
    for block in (install, comfy):
        lines = [ln for ln in block.splitlines() if "pip install" in ln and "torch " not in ln.split("#")[0]
                 .replace("pip install torch", "TORCH")]
        pack_lines = [ln for ln in lines if "-e " in ln or "-r requirements" in ln]
        assert pack_lines and all("-c torch-constraint.txt" in ln for ln in pack_lines), pack_lines
        assert block.index("> torch-constraint.txt") < block.index(pack_lines[0])
        assert "/tmp/" not in block and "<this repository>" not in block
        assert "<URL of this repository>" in block and "the page you are reading" in block
    assert "/torch-constraint.txt" in (ROOT / ".gitignore").read_text()
