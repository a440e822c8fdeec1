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


def _warn_if_loaded_twice() -> None:
    """Log a warning naming both folders when another copy of this pack was loaded in this process before.

    Two copies (e.g. one cloned into ``custom_nodes`` and one added through ``extra_model_paths.yaml``, or a
    renamed second clone) define the same node ids, so ComfyUI keeps the nodes of the last one loaded, and both
    use the engine (``csd_backend``) of the first. The copies are recorded on the process-wide ``csd3d`` logger,
    which every copy shares (no torch, no scan of ``sys.modules``). A re-import of the same module is no copy.
    """
    logger = logging.getLogger("csd3d")
    loaded = logger.__dict__.setdefault("_csd3d_pack_copies", [])  # [(module name, shown path, real path)]
    real = os.path.realpath(_HERE)
    shown = _HERE if real == _HERE else f"{_HERE} (-> {real})"
    if any(name == __name__ and folder == real for name, _shown, folder in loaded):
        return  # the same module imported again
    if loaded:
        engine = getattr(sys.modules.get("csd_backend"), "__file__", None)
        engine = os.path.dirname(os.path.abspath(engine)) if engine else "?"
        _name, first, first_real = loaded[0]
        same = "; both are the same folder" if first_real == real else ""
        logger.warning("CSD 3D: two copies of this node pack are loaded: %s (first) and %s%s. They define the same "
                       "nodes, so ComfyUI keeps those of the copy loaded last, and both use the engine in %s. Remove "
                       "one copy from custom_nodes (or rename its folder to end in '.disabled') and restart ComfyUI.",
                       first, shown, same, engine)
    loaded.append((__name__, shown, real))


try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError:  # imported as a plain module (not as a package), e.g. by a tool scanning the folder
    logging.getLogger("csd3d").warning("CSD 3D: import the pack as a package (ComfyUI does) to get its nodes")
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    _warn_if_loaded_twice()

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
