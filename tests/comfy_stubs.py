"""Run the pack's nodes and API-format workflows without ComfyUI (CI has no ComfyUI: it is not on PyPI).

Only what the nodes call is stubbed, with ComfyUI's own semantics (checked against ComfyUI 0.3.64):

* ``folder_paths``: model folders, output/temp/input folders, ``get_filename_list``, ``get_save_image_path``;
* ``comfy.utils.ProgressBar`` with the global hook that ComfyUI's ``main.py`` installs: every update first calls
  ``throw_exception_if_processing_interrupted()``, then the update is recorded;
* ``comfy.model_management``: the interrupt flag, ``InterruptProcessingException`` and ``get_torch_device``.

``validate_prompt`` and ``execute_prompt`` resolve a graph the way ``execution.py`` does: inputs are values or
``[node id, output index]`` links; widget values are converted and range/choice-checked unless the node's
``VALIDATE_INPUTS`` names them; ``VALIDATE_INPUTS`` gets ``None`` for linked inputs; only output nodes and what
they depend on run; the interrupt flag is reset when a prompt starts and checked before every node.
Three core nodes the example workflows use (SaveImage, PreviewImage, Preview3D) have stand-ins with the same
inputs and ``ui`` outputs.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import os
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE = "csd3d_pack_under_test"
SUPPORTED_PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}


# ----------------------------------------------------------------------------------------------------- stubs
@dataclass
class StubEnv:
    root: Path
    models_dir: Path
    output_dir: Path
    temp_dir: Path
    input_dir: Path
    folder_paths: types.ModuleType = None
    utils: types.ModuleType = None
    mm: types.ModuleType = None
    #: every progress update: (node_id, value, total, preview)
    progress: List[tuple] = field(default_factory=list)
    #: called as on_progress(env, value, total) before each update is recorded (tests use it to press Cancel)
    on_progress: Optional[Callable] = None
    #: called as on_progress_after(env, value, total) after an update was recorded
    on_progress_after: Optional[Callable] = None
    current_node: Optional[str] = None

    def interrupt(self) -> None:
        self.mm.interrupt_current_processing(True)


def _make_folder_paths(env: StubEnv) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.supported_pt_extensions = set(SUPPORTED_PT_EXTENSIONS)
    fp.models_dir = str(env.models_dir)
    fp.folder_names_and_paths = {
        "checkpoints": ([str(env.models_dir / "checkpoints")], set(SUPPORTED_PT_EXTENSIONS)),
        "diffusers": ([str(env.models_dir / "diffusers")], ["folder"]),
        "vae": ([str(env.models_dir / "vae")], set(SUPPORTED_PT_EXTENSIONS)),
    }

    def get_folder_paths(name):
        return fp.folder_names_and_paths[name][0][:]

    def get_filename_list(name):
        paths, exts = fp.folder_names_and_paths[name]
        out = []
        for base in paths:
            if not os.path.isdir(base):
                continue
            for here, _dirs, files in os.walk(base, followlinks=True):
                for f in files:
                    if not exts or os.path.splitext(f)[1].lower() in exts:
                        out.append(os.path.relpath(os.path.join(here, f), base))
        return sorted(set(out))

    def get_full_path(name, filename):
        for base in get_folder_paths(name):
            p = os.path.join(base, filename)
            if os.path.isfile(p):
                return p
        return None

    def add_model_folder_path(name, path, is_default=False):
        if name in fp.folder_names_and_paths:
            paths = fp.folder_names_and_paths[name][0]
            if path not in paths:
                paths.insert(0, path) if is_default else paths.append(path)
        else:
            fp.folder_names_and_paths[name] = ([path], set())

    def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
        # folder_paths.get_save_image_path of ComfyUI 0.3.64, without the %date% variables
        def map_filename(filename):
            prefix_len = len(os.path.basename(filename_prefix))
            prefix = filename[:prefix_len + 1]
            try:
                digits = int(filename[prefix_len + 1:].split("_")[0])
            except ValueError:
                digits = 0
            return digits, prefix

        subfolder = os.path.dirname(os.path.normpath(filename_prefix))
        filename = os.path.basename(os.path.normpath(filename_prefix))
        full_output_folder = os.path.join(output_dir, subfolder)
        if os.path.commonpath((output_dir, os.path.abspath(full_output_folder))) != output_dir:
            raise Exception("Saving image outside the output folder is not allowed.")
        try:
            counter = max(filter(lambda a: os.path.normcase(a[1][:-1]) == os.path.normcase(filename) and a[1][-1] == "_",
                                 map(map_filename, os.listdir(full_output_folder))))[0] + 1
        except ValueError:
            counter = 1
        except FileNotFoundError:
            os.makedirs(full_output_folder, exist_ok=True)
            counter = 1
        return full_output_folder, filename, counter, subfolder, filename_prefix

    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.add_model_folder_path = add_model_folder_path
    fp.get_save_image_path = get_save_image_path
    fp.get_output_directory = lambda: str(env.output_dir)
    fp.get_temp_directory = lambda: str(env.temp_dir)
    fp.get_input_directory = lambda: str(env.input_dir)
    return fp


def _make_model_management() -> types.ModuleType:
    mm = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass

    mm.InterruptProcessingException = InterruptProcessingException
    mm._flag = False

    def interrupt_current_processing(value=True):
        mm._flag = value

    def processing_interrupted():
        return mm._flag

    def throw_exception_if_processing_interrupted():
        if mm._flag:
            mm._flag = False
            raise InterruptProcessingException()

    def get_torch_device():
        import torch

        return torch.device("cpu")

    mm.interrupt_current_processing = interrupt_current_processing
    mm.processing_interrupted = processing_interrupted
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.get_torch_device = get_torch_device
    #: every load_models_gpu call: the class names of the models' ``model`` (what ComfyUI would move to its device)
    mm.load_calls = []

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        mm.load_calls.append([type(getattr(m, "model", m)).__name__ for m in models])

    def load_model_gpu(model):
        return load_models_gpu([model])

    mm.load_models_gpu = load_models_gpu
    mm.load_model_gpu = load_model_gpu
    return mm


def _make_utils(env: StubEnv) -> types.ModuleType:
    utils = types.ModuleType("comfy.utils")
    utils.PROGRESS_BAR_HOOK = None

    def set_progress_bar_global_hook(function):
        utils.PROGRESS_BAR_HOOK = function

    class ProgressBar:  # comfy/utils.py:1024
        def __init__(self, total, node_id=None):
            self.total = total
            self.current = 0
            self.hook = utils.PROGRESS_BAR_HOOK
            self.node_id = node_id

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            if value > self.total:
                value = self.total
            self.current = value
            if self.hook is not None:
                self.hook(self.current, self.total, preview, node_id=self.node_id)

        def update(self, value):
            self.update_absolute(self.current + value)

    def hook(value, total, preview_image, prompt_id=None, node_id=None):  # main.py:hijack_progress
        if env.on_progress is not None:
            env.on_progress(env, value, total)
        env.mm.throw_exception_if_processing_interrupted()
        env.progress.append((node_id or env.current_node, value, total, preview_image))
        if env.on_progress_after is not None:
            env.on_progress_after(env, value, total)

    utils.ProgressBar = ProgressBar
    utils.set_progress_bar_global_hook = set_progress_bar_global_hook
    set_progress_bar_global_hook(hook)
    return utils


def install(monkeypatch, root: Path) -> StubEnv:
    """Put stub ``folder_paths`` and ``comfy.*`` modules into ``sys.modules`` (undone by ``monkeypatch``)."""
    root = Path(root)
    env = StubEnv(root=root, models_dir=root / "models", output_dir=root / "output", temp_dir=root / "temp",
                  input_dir=root / "input")
    for d in (env.models_dir / "diffusers", env.models_dir / "checkpoints", env.output_dir, env.temp_dir,
              env.input_dir):
        d.mkdir(parents=True, exist_ok=True)
    env.mm = _make_model_management()
    env.folder_paths = _make_folder_paths(env)
    env.utils = _make_utils(env)
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []  # a package
    comfy.utils = env.utils
    comfy.model_management = env.mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", env.utils)
    monkeypatch.setitem(sys.modules, "comfy.model_management", env.mm)
    monkeypatch.setitem(sys.modules, "folder_paths", env.folder_paths)
    return env


def load_pack(name: str = PACK_MODULE) -> types.ModuleType:
    """Import the repository as ComfyUI does (``spec_from_file_location`` on its ``__init__.py``); cached."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


# ----------------------------------------------------------------------------------------- core stand-ins
class SaveImage:
    type = "output"
    prefix_append = ""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to save."}),
                             "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"

    def _dir(self):
        import folder_paths

        return folder_paths.get_output_directory()

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        import folder_paths
        import numpy as np
        from PIL import Image

        filename_prefix += self.prefix_append
        out_dir = self._dir()
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, out_dir, images[0].shape[1], images[0].shape[0])
        results = []
        for image in images:
            arr = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
            file = f"{filename}_{counter:05}_.png"
            Image.fromarray(arr).save(os.path.join(folder, file))
            results.append({"filename": file, "subfolder": subfolder, "type": self.type})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    type = "temp"
    prefix_append = "_temp_test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def _dir(self):
        import folder_paths

        return folder_paths.get_temp_directory()


class Preview3D:  # comfy_extras/nodes_load_3d.py
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_file": ("STRING", {"default": "", "multiline": False})},
                "optional": {"camera_info": ("LOAD3D_CAMERA", {})}}

    OUTPUT_NODE = True
    RETURN_TYPES = ()
    CATEGORY = "3d"
    FUNCTION = "process"

    def process(self, model_file, **kwargs):
        return {"ui": {"result": [model_file, kwargs.get("camera_info", None)]}}


CORE_NODES = {"SaveImage": SaveImage, "PreviewImage": PreviewImage, "Preview3D": Preview3D}
#: nodes that exist only in the frontend (virtual nodes: no class on the server, never in the API format). A
#: Note is stored as {"type": "Note", "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text]}
FRONTEND_ONLY_NODES = ("Note", "MarkdownNote")
#: widgets the frontend adds after a node's own ones: stored in the UI format and sent in the prompt by
#: graphToPrompt (checked in ComfyUI's frontend 1.27.10: Preview3D gets an "image" widget, sent as "image": "")
UI_EXTRA_WIDGETS = {"Preview3D": ["image"]}


def node_classes(pack: types.ModuleType) -> Dict[str, type]:
    return {**CORE_NODES, **pack.NODE_CLASS_MAPPINGS}


# ------------------------------------------------------------------------------------------------ validation
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def input_info(cls, name):
    spec = cls.INPUT_TYPES()
    for cat in ("required", "optional", "hidden"):
        if name in spec.get(cat, {}):
            entry = spec[cat][name]
            if cat == "hidden":
                return entry, cat, {}
            return entry[0], cat, (entry[1] if len(entry) > 1 else {})
    return None, None, None


def is_widget(typ) -> bool:
    return isinstance(typ, list) or typ in WIDGET_TYPES


def _validate_function_args(cls):
    fn = getattr(cls, "VALIDATE_INPUTS", None)
    if fn is None:
        return [], False, None
    spec = inspect.getfullargspec(fn)
    return spec.args, spec.varkw is not None, fn


def _error(kind, message, name, details=None):
    return {"type": kind, "message": message, "details": details or name, "extra_info": {"input_name": name}}


def _validate_node(prompt, node_id, classes, validated) -> bool:
    if node_id in validated:
        return validated[node_id][0]
    node = prompt[node_id]
    cls = classes[node["class_type"]]
    spec = cls.INPUT_TYPES()
    inputs = node["inputs"]
    args, has_kwargs, fn = _validate_function_args(cls)
    errors, valid = [], True
    for cat in ("required", "optional"):
        for name, entry in spec.get(cat, {}).items():
            typ, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            if name not in inputs:
                if cat == "required":
                    errors.append(_error("required_input_missing", "Required input is missing", name))
                continue
            val = inputs[name]
            if isinstance(val, list):
                if len(val) != 2 or str(val[0]) not in prompt:
                    errors.append(_error("bad_linked_input", "Bad linked input", name))
                    continue
                src = prompt[str(val[0])]
                received = classes[src["class_type"]].RETURN_TYPES[val[1]]
                if received != typ and "*" not in (received, typ):
                    errors.append(_error("return_type_mismatch", "Return type mismatch between linked nodes", name,
                                         f"{name}, received_type({received}) mismatch input_type({typ})"))
                    continue
                if not _validate_node(prompt, str(val[0]), classes, validated):
                    valid = False
                continue
            try:
                if typ == "INT":
                    val = int(val)
                elif typ == "FLOAT":
                    val = float(val)
                elif typ == "STRING":
                    val = str(val)
                elif typ == "BOOLEAN":
                    val = bool(val)
                inputs[name] = val
            except (TypeError, ValueError) as e:
                errors.append(_error("invalid_input_type", f"Failed to convert an input value to a {typ} value",
                                     name, f"{name}, {val}, {e}"))
                continue
            if name in args or has_kwargs:
                continue
            if "min" in opts and val < opts["min"]:
                errors.append(_error("value_smaller_than_min", f"Value {val} smaller than min of {opts['min']}", name))
            elif "max" in opts and val > opts["max"]:
                errors.append(_error("value_bigger_than_max", f"Value {val} bigger than max of {opts['max']}", name))
            elif isinstance(typ, list) and val not in typ:
                errors.append(_error("value_not_in_list", "Value not in list", name, f"{name}: '{val}' not in {typ}"))
    if fn is not None and (args or has_kwargs):
        values = {}
        for name, val in inputs.items():
            if name in args or has_kwargs:
                values[name] = None if isinstance(val, list) else val
        for name, kind in spec.get("hidden", {}).items():
            if name in args or has_kwargs:
                values[name] = node_id if kind == "UNIQUE_ID" else None
        ret = fn(**values)
        if ret is not True:
            for name in values:
                errors.append(_error("custom_validation_failed", "Custom validation failed for node", name,
                                     f"{name} - {ret}"))
    ok = valid and not errors
    validated[node_id] = (ok, errors)
    return ok


def validate_prompt(prompt: Dict[str, Any], classes: Dict[str, type]):
    """``(outputs that passed, {node id: [errors]})`` like ``execution.validate_prompt``; raises on a broken
    prompt (unknown class, no output node)."""
    for nid, node in prompt.items():
        if "class_type" not in node:
            raise ValueError(f"node {nid} is missing the class_type property")
        if node["class_type"] not in classes:
            raise ValueError(f"node {nid}: {node['class_type']} does not exist")
    outputs = [nid for nid, node in prompt.items() if getattr(classes[node["class_type"]], "OUTPUT_NODE", False)]
    if not outputs:
        raise ValueError("Prompt has no outputs")
    validated: Dict[str, tuple] = {}
    good = [nid for nid in outputs if _validate_node(prompt, nid, classes, validated)]
    errors = {nid: errs for nid, (ok, errs) in validated.items() if errs}
    return good, errors


class PromptRejected(Exception):
    def __init__(self, errors):
        self.errors = errors
        super().__init__(json.dumps(errors, indent=1, default=str))


class NodeExecutionError(Exception):
    def __init__(self, node_id, class_type, exc):
        self.node_id, self.class_type, self.exception = node_id, class_type, exc
        super().__init__(f"node {node_id} ({class_type}): {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------- execution
def check_return(class_type: str, cls, result) -> None:
    """What a node returned must match its RETURN_TYPES."""
    types_ = cls.RETURN_TYPES
    assert isinstance(result, tuple), f"{class_type} returned {type(result).__name__}, not a tuple"
    assert len(result) == len(types_), f"{class_type} returned {len(result)} values for RETURN_TYPES {types_}"
    for typ, value in zip(types_, result):
        check = TYPE_CHECKS.get(typ)
        if check is not None:
            assert check(value), f"{class_type}: a {type(value).__name__} is not a valid {typ}"


def _is_image(v) -> bool:
    import torch

    return (isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[-1] == 3 and v.dtype == torch.float32
            and v.device.type == "cpu" and float(v.min()) >= 0.0 and float(v.max()) <= 1.0)


def _is_scene(v) -> bool:
    """A scene of a kind in the engine's table (volume, DMTet / fixed mesh, Gaussian splats)."""
    from csd_backend.scene_kinds import KINDS, resolve

    return isinstance(v, tuple({resolve(row.scene) for row in KINDS.values()}))


def _is_prior(v) -> bool:
    from csd_backend.priors.base import DiffusionPrior

    return isinstance(v, DiffusionPrior)


def _is_cameras(v) -> bool:
    from csd_backend.config import CameraConfig

    return isinstance(v, CameraConfig)


TYPE_CHECKS = {
    "IMAGE": _is_image,
    "CSD_SCENE": _is_scene,
    "CSD_PRIOR": _is_prior,
    "CSD_CAMERAS": _is_cameras,
    "CSD_GUIDANCE": lambda v: type(v).__name__ == "GuidanceSpec" and callable(getattr(v, "config", None)),
    "STRING": lambda v: isinstance(v, str),
    "INT": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "FLOAT": lambda v: isinstance(v, float),
    "MESH": lambda v: hasattr(v, "vertices") and hasattr(v, "faces"),
    "CSD_TEXTURED_MESH": lambda v: v is not None,
}


@dataclass
class Execution:
    outputs: Dict[str, Any]  # node id → ui dict of output nodes
    results: Dict[str, tuple]  # node id → returned values
    order: List[str]
    seconds: Dict[str, float]


def execute_prompt(prompt: Dict[str, Any], classes: Dict[str, type], env: Optional[StubEnv] = None) -> Execution:
    """Validate, then run the prompt's output nodes and their dependencies (links by node id and output index)."""
    prompt = json.loads(json.dumps(prompt))  # never change the caller's workflow
    good, errors = validate_prompt(prompt, classes)
    if errors or not good:
        raise PromptRejected(errors)
    import torch

    mm = sys.modules.get("comfy.model_management")
    if mm is not None:
        mm.interrupt_current_processing(False)  # a new prompt starts uninterrupted
    results: Dict[str, tuple] = {}
    ui: Dict[str, Any] = {}
    order: List[str] = []
    seconds: Dict[str, float] = {}

    def run(nid: str) -> tuple:
        if nid in results:
            return results[nid]
        node = prompt[nid]
        cls = classes[node["class_type"]]
        spec = cls.INPUT_TYPES()
        kwargs = {}
        for name, val in node["inputs"].items():
            if isinstance(val, list):
                src, idx = str(val[0]), val[1]
                kwargs[name] = run(src)[idx]
            else:
                kwargs[name] = val
        for name, kind in spec.get("hidden", {}).items():
            kwargs[name] = {"UNIQUE_ID": nid, "PROMPT": prompt}.get(kind)
        if mm is not None:
            mm.throw_exception_if_processing_interrupted()
        if env is not None:
            env.current_node = nid
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():  # as ComfyUI's PromptExecutor runs every node
                out = getattr(cls(), cls.FUNCTION)(**kwargs)
        except Exception as e:
            if mm is not None and isinstance(e, mm.InterruptProcessingException):
                raise
            raise NodeExecutionError(nid, node["class_type"], e) from e
        seconds[nid] = time.perf_counter() - t0
        if isinstance(out, dict):
            if "ui" in out:
                ui[nid] = out["ui"]
            out = tuple(out.get("result", ()))
        check_return(node["class_type"], cls, out)
        results[nid] = out
        order.append(nid)
        return out

    for nid in sorted(good, key=lambda k: int(k) if k.isdigit() else k):
        run(nid)
    return Execution(ui, results, order, seconds)


# ---------------------------------------------------------------------------------------- UI → API format
def widget_names(cls, node_type: str) -> List[str]:
    """The widget values a UI-format node stores, in order (frontend rule: INT widgets named seed/noise_seed or
    with control_after_generate get a second, frontend-only value)."""
    names = []
    spec = cls.INPUT_TYPES()
    for cat in ("required", "optional"):
        for name, entry in spec.get(cat, {}).items():
            typ, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            if not is_widget(typ) or opts.get("forceInput"):
                continue
            names.append(name)
            control = opts.get("control_after_generate")
            if typ == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
                names.append(None)  # control_after_generate value (not sent to the server)
    names.extend(UI_EXTRA_WIDGETS.get(node_type, []))
    return names


def ui_to_api(ui: Dict[str, Any], classes: Dict[str, type]) -> Dict[str, Any]:
    """What the frontend's graphToPrompt sends for a UI-format workflow (no groups/subgraphs; muted, bypassed and
    virtual nodes such as Note are left out)."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in FRONTEND_ONLY_NODES:
            continue
        cls = classes[node["type"]]
        names = widget_names(cls, node["type"])
        values = node.get("widgets_values", [])
        if len(values) != len(names):
            raise ValueError(f"node {node['id']} ({node['type']}) stores {len(values)} widget values, its widgets "
                             f"are {names}")
        inputs = {name: value for name, value in zip(names, values) if name is not None}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _id, src, slot, dst, dst_slot, _typ = links[inp["link"]]
                assert dst == node["id"], f"link {inp['link']} does not end at node {node['id']}"
                assert node["inputs"][dst_slot]["name"] == inp["name"], f"link {inp['link']}: wrong target slot"
                inputs[inp["name"]] = [str(src), slot]
        entry = {"inputs": inputs, "class_type": node["type"]}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        api[str(node["id"])] = entry
    return api


# ------------------------------------------------------------------------------------ example workflows
UI_DIR = ROOT / "example_workflows"
API_DIR = UI_DIR / "api"
TINY_MODEL = "diffusers/tiny-sd"
#: the example workflows by what they do. The file name is what ComfyUI's Templates dialog shows (frontend 1.27.10:
#: the card's title is the name, its description the name with "-" and "_" as spaces), so it describes the
#: template, numbered in the order to try them (the CPU demo first) and tagged GPU where Stable Diffusion on a GPU
#: is needed; <name>.jpg beside it is the card's thumbnail (benchmarks/template_thumbnails.py)
TEMPLATES = {
    "cpu": "01-CPU-demo-text-to-3D-with-the-toy-prior",
    "text_to_3d": "02-text-to-3D-CSD-paper-settings-GPU",
    "two_stage": "03-two-stage-CSD-then-mesh-refinement-GPU",
    "edit": "04-edit-a-generated-scene-GPU",
    "texture": "05-texture-your-own-mesh-GPU",
    "checkpoint": "06-your-checkpoint-and-LoRAs-as-prior-GPU",
    "sds": "07-SDS-baseline-DreamFusion-GPU",
    "vsd": "08-VSD-ProlificDreamer-GPU",
    "mvdream": "09-text-to-3D-CSD-MVDream-multi-view-GPU",
    "gaussians": "10-text-to-3D-Gaussian-splats-GPU",
}

#: per node type, the widget values a test run changes (model, sizes, steps); everything else runs as shipped
TEST_OVERRIDES: Dict[str, Dict[str, object]] = {
    "CSDLoadDiffusionModel": {"model": TINY_MODEL, "resolution": 32},
    "CSDScene": {"n_levels": 4, "log2_hashmap_size": 12, "max_resolution": 64},
    "CSDCameras": {"width": 16, "height": 16, "later_width": 0, "later_height": 0},
    "CSDOptimize": {"steps": 2, "checkpoint_every": 1, "preview_every": 1},
    # the CPU presets: a 64 tet grid, and the automatic surface level (a 2-step stage 1 never reaches density 10)
    "CSDRefineMesh": {"steps": 2, "checkpoint_every": 1, "preview_every": 1, "preset": "refine-cpu"},
    "CSDTextureMesh": {"steps": 2, "checkpoint_every": 1, "preview_every": 1, "preset": "texture-cpu"},
    "CSDRenderViews": {"n_views": 2, "size": 24, "samples_per_ray": 32},
    "CSDExtractMesh": {"resolution": 32, "texture_size": 64, "face_budget": 5000},
    "CSDMVDream": {"steps": 2, "checkpoint_every": 1, "preview_every": 1, "preset": "mvdream-cpu"},
}
#: the test model of the loader that feeds a node of these types (a multi-view node needs a multi-view model)
TINY_MULTIVIEW_MODEL = "diffusers/tiny-mvdream"
PRIOR_MODEL_FOR = {"CSDMVDream": TINY_MULTIVIEW_MODEL}


def workflow_names():
    return sorted(p.stem for p in API_DIR.glob("*.json"))


def load_api(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text(encoding="utf-8"))


def load_ui(name: str) -> dict:
    return json.loads((UI_DIR / f"{name}.json").read_text(encoding="utf-8"))


def for_tests(api: dict, classes=None, overrides=TEST_OVERRIDES) -> dict:
    """A copy of ``api`` with the test overrides, clamped into each widget's range when the class is known."""
    out = copy.deepcopy(api)
    for node in out.values():
        for name, value in overrides.get(node["class_type"], {}).items():
            if name not in node["inputs"]:
                continue
            if classes is not None and node["class_type"] in classes:
                spec = classes[node["class_type"]].INPUT_TYPES().get("required", {}).get(name)
                if spec is not None and len(spec) > 1 and isinstance(value, (int, float)):
                    lo, hi = spec[1].get("min", value), spec[1].get("max", value)
                    value = type(value)(min(max(value, lo), hi))
            node["inputs"][name] = value
    for node in list(out.values()):  # the loader feeding a multi-view node loads the tiny multi-view model
        source = node["inputs"].get("prior") if node["class_type"] in PRIOR_MODEL_FOR else None
        if isinstance(source, list) and out.get(str(source[0]), {}).get("class_type") == "CSDLoadDiffusionModel":
            out[str(source[0])]["inputs"]["model"] = PRIOR_MODEL_FOR[node["class_type"]]
    return out


def uses(api: dict, class_type: str) -> bool:
    return any(node["class_type"] == class_type for node in api.values())


def without_missing_nodes(api: dict, classes: Dict[str, type]) -> dict:
    """``api`` without the nodes whose class is not available, nor the nodes that depend on them."""
    out = {k: v for k, v in copy.deepcopy(api).items() if v["class_type"] in classes}
    changed = True
    while changed:
        changed = False
        for nid in list(out):
            links = [v for v in out[nid]["inputs"].values() if isinstance(v, list)]
            if any(str(src) not in out for src, _slot in links):
                del out[nid]
                changed = True
    return out


# ------------------------------------------------------------------ ComfyUI's MODEL / CLIP / VAE (stand-ins)
#: the checkpoint name the stub Load Checkpoint offers: the tiny test SD (``models/diffusers/tiny-sd``) wrapped in
#: ComfyUI-shaped MODEL / CLIP / VAE objects. On a real server the test setup puts a small random checkpoint of the
#: SD 1.5 layout under this name into ``models/checkpoints``.
STUB_CHECKPOINT = "csd-test-sd15.safetensors"


def _reshape_sigma(sigma, ndim):  # comfy/model_sampling.py: reshape_sigma
    return sigma.view(()) if sigma.nelement() == 1 else sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


class EPS:  # comfy/model_sampling.py (ComfyUI 0.3.64), written out again: the tests check the prior against it
    def calculate_input(self, sigma, noise):
        sigma = _reshape_sigma(sigma, noise.ndim)
        return noise / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = _reshape_sigma(sigma, model_output.ndim)
        return model_input - model_output * sigma


class V_PREDICTION(EPS):
    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = _reshape_sigma(sigma, model_output.ndim)
        return (model_input * self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
                - model_output * sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2) ** 0.5)


class ModelSamplingDiscrete:  # comfy/model_sampling.py: the "linear" (= diffusers' scaled_linear) schedule
    def __init__(self, linear_start=0.00085, linear_end=0.012, timesteps=1000):
        import torch

        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()
        self.sigma_data = 1.0

    def timestep(self, sigma):
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)


def model_sampling_class(prediction: str):
    """ComfyUI's ``model_base.model_sampling`` pairing: the discrete schedule with EPS or V_PREDICTION."""
    base = {"EPS": EPS, "V_PREDICTION": V_PREDICTION}[prediction]
    return type("ModelSampling", (ModelSamplingDiscrete, base), {})


class ModelType:  # comfy/model_base.py ModelType members (only .name is read)
    def __init__(self, name):
        self.name = name


class SD15:  # comfy/supported_models.py: the model-config class (only unet_config is read)
    def __init__(self, channel_mult):
        self.unet_config = {"in_channels": 4, "adm_in_channels": None, "context_dim": None,
                            "channel_mult": list(channel_mult)}


class LatentFormatSD15:  # comfy/latent_formats.py SD15
    scale_factor = 0.18215
    shift_factor = 0.0

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor + self.shift_factor


class BaseModel:  # comfy/model_base.py: apply_model takes σ and returns the denoised x0
    def __init__(self, unet, model_config, prediction="EPS", linear_start=0.00085, linear_end=0.012):
        self.diffusion_model = unet
        self.model_config = model_config
        self.latent_format = LatentFormatSD15()
        self.model_type = ModelType(prediction)
        self.model_sampling = model_sampling_class(prediction)(linear_start, linear_end)
        self.concat_keys = ()
        self.adm_channels = 0
        self.manual_cast_dtype = None

    def get_dtype(self):
        return next(self.diffusion_model.parameters()).dtype

    def memory_required(self, input_shape, cond_shapes={}):
        return 0

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x).to(self.get_dtype())
        timestep = self.model_sampling.timestep(t).float()
        context = c_crossattn.to(xc.device, self.get_dtype())
        out = self.diffusion_model(xc, timestep, encoder_hidden_states=context).sample.float()
        return self.model_sampling.calculate_denoised(sigma, out, x)


class ModelPatcher:  # comfy/model_patcher.py: what the prior reads
    def __init__(self, model, load_device="cpu"):
        import torch

        self.model = model
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device("cpu")
        self.model_options = {"transformer_options": {}}

    def get_model_object(self, name):
        return getattr(self.model, name)


class CLIP:  # comfy/sd.py CLIP over a transformers text encoder (SD 1.x: one 77-token chunk per 75 tokens)
    def __init__(self, text_encoder, tokenizer):
        self.cond_stage_model = text_encoder
        self.tokenizer = tokenizer
        self.patcher = ModelPatcher(text_encoder)

    def tokenize(self, text, return_word_ids=False, **kwargs):
        ids = self.tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        return {"l": [[(int(i), 1.0) for i in ids]]}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        import torch

        sys.modules["comfy.model_management"].load_model_gpu(self.patcher)
        ids = torch.tensor([[i for i, _w in chunk] for chunk in tokens["l"]])
        out = self.cond_stage_model(ids)
        cond = torch.cat(list(out.last_hidden_state), 0).unsqueeze(0)  # chunks side by side: [1, 77·k, D]
        return (cond, out.pooler_output[:1]) if return_pooled else cond


class VAE:  # comfy/sd.py VAE over a diffusers AutoencoderKL (which has encoder and quant_conv, as LDM's does)
    def __init__(self, vae):
        import torch

        self.first_stage_model = vae
        self.patcher = ModelPatcher(vae)
        self.device = torch.device("cpu")
        self.output_device = torch.device("cpu")
        self.vae_dtype = next(vae.parameters()).dtype
        self.downscale_ratio = 8
        self.latent_channels = 4
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)

    def memory_used_encode(self, shape, dtype):
        return 0

    def decode(self, samples_in):
        import torch

        with torch.no_grad():
            x = self.first_stage_model.decode(samples_in.to(self.device, self.vae_dtype)).sample
        return self.process_output(x.float()).movedim(1, -1)  # IMAGE [B, H, W, 3]


def load_stub_checkpoint(folder, prediction="EPS"):
    """(MODEL, CLIP, VAE) over the diffusers SD folder ``folder`` (the tiny test model), as Load Checkpoint returns
    them; ``prediction`` "V_PREDICTION" reads the same UNet as a v-prediction model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    base = BaseModel(unet, SD15([1] * len(unet.config.block_out_channels)), prediction,
                     sched.get("beta_start", 0.00085), sched.get("beta_end", 0.012))
    return ModelPatcher(base), CLIP(text, tokenizer), VAE(vae)


class CheckpointLoaderSimple:  # nodes.py "Load Checkpoint": only the tiny test model, as STUB_CHECKPOINT
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (cls._choices(), {"tooltip": "The name of the checkpoint (model) to load."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The model used for denoising latents.", "The CLIP model used for encoding text prompts.",
                       "The VAE model used for encoding and decoding images to and from latent space.")
    FUNCTION = "load_checkpoint"
    CATEGORY = "loaders"

    @staticmethod
    def _tiny_folder():
        import folder_paths

        for root in folder_paths.get_folder_paths("diffusers"):
            if (Path(root) / "tiny-sd" / "model_index.json").is_file():
                return Path(root) / "tiny-sd"
        return None

    @classmethod
    def _choices(cls):
        import folder_paths

        names = folder_paths.get_filename_list("checkpoints")
        return names + ([STUB_CHECKPOINT] if cls._tiny_folder() is not None and STUB_CHECKPOINT not in names else [])

    def load_checkpoint(self, ckpt_name):
        if ckpt_name != STUB_CHECKPOINT or self._tiny_folder() is None:
            raise NotImplementedError(f"the stub Load Checkpoint only loads the tiny test model as {STUB_CHECKPOINT} "
                                      "(models/diffusers/tiny-sd)")
        return load_stub_checkpoint(self._tiny_folder())


CORE_NODES["CheckpointLoaderSimple"] = CheckpointLoaderSimple
TEST_OVERRIDES["CheckpointLoaderSimple"] = {"ckpt_name": STUB_CHECKPOINT}
TEST_OVERRIDES["CSDPriorFromComfyModel"] = {"resolution": 32}
TYPE_CHECKS["MODEL"] = lambda v: hasattr(v, "model") and hasattr(v, "get_model_object")
TYPE_CHECKS["CLIP"] = lambda v: hasattr(v, "tokenize") and hasattr(v, "encode_from_tokens")
TYPE_CHECKS["VAE"] = lambda v: hasattr(v, "first_stage_model") and hasattr(v, "decode")
