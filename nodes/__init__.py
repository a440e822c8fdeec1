"""The ComfyUI skin of the CSD engine (DESIGN §1): every ``nodes/*.py`` module that defines
``NODE_CLASS_MAPPINGS`` (and ``NODE_DISPLAY_NAME_MAPPINGS``) is merged here. A module that fails to import is
reported in the log and the other modules still load.

Node modules (one per node family: ``model.py``, ``guidance.py``, ``optimize.py``, ...) sit on helper modules,
each named after what it holds: ``pack.py`` (category, socket types, logger), ``widgets.py``, ``input_errors.py``
(errors in the node user's words), ``specs.py`` (guidance and camera settings that follow the run length),
``execution.py`` (autograd, device, progress, Cancel), ``previews.py``, ``model_folders.py``,
``run_folders.py`` and ``comfy_sampling.py`` (ComfyUI's σ ↔ the engine's ᾱ). Helpers never import node modules
(``tests/import_graph.py`` checks it); none of them imports torch at start-up.
"""
from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import traceback
from typing import Dict, Tuple

log = logging.getLogger("csd3d")


def collect_mappings(package: str, folder: str) -> Tuple[Dict[str, type], Dict[str, str], Dict[str, str]]:
    """Import every public module of ``package`` (found in ``folder``) and merge their mappings.

    Returns ``(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, failures)`` where ``failures`` maps a module name
    to the traceback of its import error (or to the reason it was skipped).
    """
    classes: Dict[str, type] = {}
    names: Dict[str, str] = {}
    failures: Dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules([folder]), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{package}.{info.name}")
        except Exception:  # report, keep the other modules
            failures[info.name] = traceback.format_exc()
            log.error("CSD 3D: could not import nodes/%s.py; its nodes are missing:\n%s", info.name,
                      failures[info.name])
            continue
        mapping = getattr(module, "NODE_CLASS_MAPPINGS", None)
        if not isinstance(mapping, dict):
            continue
        for node_id, cls in mapping.items():
            if node_id in classes and classes[node_id] is not cls:
                failures[f"{info.name}:{node_id}"] = f"node id {node_id!r} is already defined; kept the first"
                log.error("CSD 3D: nodes/%s.py redefines %s; kept the first definition", info.name, node_id)
                continue
            classes[node_id] = cls
        display = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None) or {}
        names.update({k: v for k, v in display.items() if k in mapping and classes.get(k) is mapping[k]})
    return classes, names, failures


try:
    from .model_folders import register_model_folders

    register_model_folders()
except Exception:  # never keep the nodes from loading because of folder registration
    log.error("CSD 3D: could not register model folders:\n%s", traceback.format_exc())

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, IMPORT_FAILURES = collect_mappings(
    __name__, os.path.dirname(os.path.abspath(__file__)))

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "IMPORT_FAILURES", "collect_mappings"]
