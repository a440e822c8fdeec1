"""The import graph of the package (``csd_backend/`` and ``nodes/``), drawn from the source with ``ast``: every
``import`` statement counts, function-local and ``TYPE_CHECKING`` ones included.

``python tests/import_graph.py`` prints each module's layer and the modules it imports; ``--dot`` prints the
graph for Graphviz. ``tests/test_repository.py`` checks it against the layers below (the README's *Engine
layout* shows the same stack).
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("csd_backend", "nodes")

#: the layers, bottom first. A module may import modules of its own layer (without a circle) and of the layers
#: below, never of a layer above. A name is a module or a package (all its modules).
LAYERS: List[Tuple[str, List[str]]] = [
    ("foundation", ["csd_backend", "csd_backend.errors", "csd_backend.io", "csd_backend.transfer",
                    "csd_backend.compiling"]),
    ("settings", ["csd_backend.schedules", "csd_backend.config_checks", "csd_backend.gaussian_config",
                  "csd_backend.config", "csd_backend.presets",
                  "csd_backend.scene_kinds", "csd_backend.auto_backends"]),
    ("priors", ["csd_backend.priors"]),
    ("representations", ["csd_backend.scene"]),
    ("rendering", ["csd_backend.render"]),
    ("extraction", ["csd_backend.export"]),
    ("conversion", ["csd_backend.convert"]),
    ("losses", ["csd_backend.prompts", "csd_backend.vsd", "csd_backend.guidance", "csd_backend.regularizers"]),
    ("loop", ["csd_backend.optimize"]),
    ("run folders", ["csd_backend.runs"]),
    ("batch", ["csd_backend.batch"]),
    ("command line", ["csd_backend.cli", "csd_backend.cli_parser", "csd_backend.__main__"]),
    ("node helpers", ["nodes.pack", "nodes.widgets", "nodes.input_errors", "nodes.specs", "nodes.previews",
                      "nodes.execution", "nodes.model_folders", "nodes.run_folders", "nodes.comfy_sampling"]),
    ("nodes", ["nodes.cameras", "nodes.comfy_prior", "nodes.controlnet", "nodes.guidance", "nodes.load_mesh",
               "nodes.mesh", "nodes.model", "nodes.mvdream", "nodes.optimize", "nodes.render", "nodes.scene"]),
    ("node registration", ["nodes"]),
]


@dataclass
class Graph:
    modules: Dict[str, Path]
    #: module → {imported module: first line}
    edges: Dict[str, Dict[str, int]] = field(default_factory=dict)
    #: (module, line, text): a ``_private`` name of another module imported or used
    private: List[Tuple[str, int, str]] = field(default_factory=list)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_modules(root: Path = ROOT) -> Dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            out[module_name(p, root)] = p
    return out


def _owner(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """The package module that ``name`` (a module or an attribute of one) belongs to, or None (outside)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def build(root: Path = ROOT) -> Graph:
    g = Graph(find_modules(root))
    for mod, path in g.modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        edges: Dict[str, int] = {}
        aliases: Dict[str, str] = {}  # local name bound to a package module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    target = _owner(a.name, g.modules)
                    if target:
                        edges.setdefault(target, node.lineno)
                        if a.asname:
                            aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                src = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                for a in node.names:
                    full = f"{src}.{a.name}"
                    if full in g.modules:  # a module: ``from pkg import module``
                        edges.setdefault(full, node.lineno)
                        aliases[a.asname or a.name] = full
                        continue
                    target = _owner(src, g.modules)
                    if target:
                        edges.setdefault(target, node.lineno)
                        if _private(a.name) and target != mod:
                            g.private.append((mod, node.lineno, f"from {src} import {a.name}"))
        for node in ast.walk(tree):  # ``module._name`` through an alias of another package module
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and _private(node.attr) and aliases[node.value.id] != mod:
                g.private.append((mod, node.lineno, f"{node.value.id}.{node.attr}"))
        edges.pop(mod, None)
        g.edges[mod] = edges
    return g


def layer_of(mod: str) -> Optional[int]:
    """Index of ``mod``'s layer (the most specific name that covers it), or None when no layer names it."""
    best = None
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if mod == n or mod.startswith(n + "."):
                if best is None or len(n) > best[1]:
                    best = (i, len(n))
    return None if best is None else best[0]


def upward_imports(g: Graph) -> List[str]:
    out = []
    for mod, edges in g.edges.items():
        for target, line in edges.items():
            a, b = layer_of(mod), layer_of(target)
            if a is not None and b is not None and b > a:
                out.append(f"{mod}:{line} imports {target} ({LAYERS[a][0]} → {LAYERS[b][0]}, a layer above)")
    return sorted(out)


def unplaced(g: Graph) -> List[str]:
    return sorted(m for m in g.modules if layer_of(m) is None)


def cycles(g: Graph) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(g.modules):
        if v not in index:
            visit(v)
    return found


def main(argv: List[str]) -> int:
    g = build()
    if "--dot" in argv:
        print("digraph imports {\n  rankdir=BT;")
        for mod, edges in sorted(g.edges.items()):
            for target in sorted(edges):
                print(f'  "{mod}" -> "{target}";')
        print("}")
        return 0
    for i, (name, _) in reversed(list(enumerate(LAYERS))):
        mods = sorted(m for m in g.modules if layer_of(m) == i)
        print(f"{name}:")
        for m in mods:
            print(f"  {m} -> {', '.join(sorted(g.edges[m])) or '-'}")
    problems = upward_imports(g) + [f"circle: {' <-> '.join(c)}" for c in cycles(g)] + \
        [f"{m}:{line}: {text}" for m, line, text in g.private] + [f"no layer: {m}" for m in unplaced(g)]
    print("\n".join(problems) if problems else "no circle, no upward import, no private import")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
