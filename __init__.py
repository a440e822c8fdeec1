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

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError:  # imported as a plain module (not as a package), e.g. by a tool scanning the folder
    logging.getLogger("csd3d").warning("CSD 3D: import the pack as a package (ComfyUI does) to get its nodes")
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
