"""ComfyUI entry point of the CSD text-to-3D node pack (clone this repository into ``ComfyUI/custom_nodes/``).

Importing the pack is quick: no torch, diffusers or model is loaded here; the engine's heavy modules are imported
by the nodes when they run. The engine ``csd_backend`` ships inside the pack; if it is not importable yet (the
usual case in ComfyUI, which does not put pack folders on ``sys.path``), it is registered from this folder.
"""
import importlib.util
import logging
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _register_engine() -> None:
    if "csd_backend" in sys.modules:
        return
    init = os.path.join(_HERE, "csd_backend", "__init__.py")
    if importlib.util.find_spec("csd_backend") is not None or not os.path.isfile(init):
        return  # installed (pip install -e .) or on sys.path already
    spec = importlib.util.spec_from_file_location("csd_backend", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["csd_backend"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules["csd_backend"]
        raise


_register_engine()


def _copies_loaded_before() -> list:
    """``[(shown path, real path)]`` of the other copies of this pack already imported in this process.

    Two sources: a list that every copy (from this version on) appends to, kept on the process-wide ``csd3d``
    logger, and a look through ``sys.modules`` for pack modules of any version (a module whose own ``__dict__``
    maps both CSDOptimize and CSDScene, from an ``__init__.py``; the ``nodes`` package, which also has them, is
    told apart by its IMPORT_FAILURES). Only module dicts are read: no import, no ``__getattr__``, no torch.
    """
    real = os.path.realpath(_HERE)
    me = sys.modules.get(__name__)
    found = {}
    registry = logging.getLogger("csd3d").__dict__.get("_csd3d_pack_copies", [])
    for name, shown, folder in registry:
        if not (name == __name__ and folder == real):
            found.setdefault((name, folder), shown)
    for name, module in list(sys.modules.items()):
        d = getattr(module, "__dict__", None)
        if module is me or not isinstance(d, dict) or "IMPORT_FAILURES" in d:
            continue
        mapping = d.get("NODE_CLASS_MAPPINGS")
        init = d.get("__file__")
        if (not isinstance(mapping, dict) or "CSDOptimize" not in mapping or "CSDScene" not in mapping
                or not isinstance(init, str) or os.path.basename(init) != "__init__.py"):
            continue
        folder = os.path.dirname(os.path.abspath(init))
        key = (name, os.path.realpath(folder))
        if key != (__name__, real) and key not in found:
            found[key] = folder if key[1] == folder else f"{folder} (-> {key[1]})"
    return [(shown, folder) for (_name, folder), shown in found.items()]


def _warn_if_loaded_twice() -> None:
    """Log a warning naming both folders when another copy of this pack was loaded in this process before.

    Two copies (e.g. one cloned into ``custom_nodes`` and one added through ``extra_model_paths.yaml``, or a
    renamed second clone) define the same node ids, so ComfyUI keeps the nodes of the last one loaded, and both
    use the engine (``csd_backend``) of the first. A re-import of the same module is no copy. Cheap: no torch.
    """
    logger = logging.getLogger("csd3d")
    real = os.path.realpath(_HERE)
    shown = _HERE if real == _HERE else f"{_HERE} (-> {real})"
    others = _copies_loaded_before()
    if others:
        engine = getattr(sys.modules.get("csd_backend"), "__file__", None)
        engine = os.path.dirname(os.path.abspath(engine)) if engine else "?"
        first, first_real = others[0]
        same = "; both are the same folder" if first_real == real else ""
        logger.warning("CSD 3D: two copies of this node pack are loaded: %s (first) and %s%s. They define the same "
                       "nodes, so ComfyUI keeps those of the copy loaded last, and both use the engine in %s. Remove "
                       "one copy from custom_nodes (or rename its folder to end in '.disabled') and restart ComfyUI.",
                       first, shown, same, engine)
    registry = logger.__dict__.setdefault("_csd3d_pack_copies", [])  # [(module name, shown path, real path)]
    if not any(name == __name__ and folder == real for name, _shown, folder in registry):
        registry.append((__name__, shown, real))


try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError:  # imported as a plain module (not as a package), e.g. by a tool scanning the folder
    logging.getLogger("csd3d").warning("CSD 3D: import the pack as a package (ComfyUI does) to get its nodes")
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    _warn_if_loaded_twice()

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
