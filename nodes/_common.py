"""What every node of the pack shares: type names, widget helpers, ComfyUI access, folders and error naming.

Nothing here imports torch, diffusers or ComfyUI at import time: the pack must import quickly, and the engine is
imported lazily inside the node functions. ComfyUI's modules (``folder_paths``, ``comfy.utils``,
``comfy.model_management``) are imported where they are used, so outside ComfyUI (plain Python, tests) the nodes
fall back to no-ops: no progress bar, no interruption, ``./output`` as the output folder.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from csd_backend.config import GuidanceConfig, OptimConfig, RunConfig
from csd_backend.errors import ConfigError

log = logging.getLogger("csd3d")

CATEGORY = "CSD 3D"

# custom types (DESIGN §4). CSD_SCENE is always a csd_backend.scene.volume.Scene instance.
PRIOR = "CSD_PRIOR"  # a csd_backend.priors.base.DiffusionPrior
GUIDANCE = "CSD_GUIDANCE"  # a GuidanceSpec (below), which builds a GuidanceConfig for a run length
SCENE = "CSD_SCENE"  # a csd_backend.scene.volume.Scene
CAMERAS = "CSD_CAMERAS"  # a csd_backend.config.CameraConfig

#: output sub-folder of every run: <output>/csd3d/runs/<run name>_<NNNNN>/checkpoints/last.ckpt
RUNS_SUBDIR = ("csd3d", "runs")
#: the scene-source choice that makes a new scene instead of loading a run
NEW_SCENE = "(new scene)"
#: the single-file config choice that lets the engine infer the architecture
AUTO_CONFIG = "(auto)"
#: an attribute set on scenes made by "CSD 3D Scene" that were never trained: Optimize then initialises the
#: scene from its own seed (as the command line does) instead of copying the random weights
UNTRAINED_ATTR = "_csd_untrained"
#: longest side of the live preview sent to the browser: training renders (64² px) are enlarged by nearest
#: neighbour by the largest integer factor that keeps them within it (64² → 512², each pixel an 8×8 block)
PREVIEW_MAX_SIZE = 512
#: the "preview" IMAGE output of CSD Optimize is rendered at this multiple of the training render size (64² →
#: 256²), never above PREVIEW_MAX_SIZE nor below the render size
PREVIEW_RENDER_FACTOR = 4
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# ------------------------------------------------------------------------------------------ dataclass defaults
def default_of(cls, name: str) -> Any:
    """The default of dataclass field ``name`` (calling its default_factory)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def int_input(default: int, lo: int, hi: int, tooltip: str, step: int = 1, **extra) -> tuple:
    return ("INT", {"default": int(default), "min": int(lo), "max": int(hi), "step": int(step), "tooltip": tooltip,
                    **extra})


def float_input(default: float, lo: float, hi: float, step: float, tooltip: str, **extra) -> tuple:
    return ("FLOAT", {"default": float(default), "min": float(lo), "max": float(hi), "step": float(step),
                      "tooltip": tooltip, **extra})


def bool_input(default: bool, tooltip: str) -> tuple:
    return ("BOOLEAN", {"default": bool(default), "tooltip": tooltip})


def string_input(default: str, tooltip: str, multiline: bool = False) -> tuple:
    return ("STRING", {"default": default, "multiline": multiline, "tooltip": tooltip})


def combo_input(choices: List[str], default: Optional[str], tooltip: str) -> tuple:
    opts: Dict[str, Any] = {"tooltip": tooltip}
    if default is not None and default in choices:
        opts["default"] = default
    return (list(choices), opts)


def check_widgets(node_cls, values: Dict[str, Any]) -> Optional[str]:
    """Range and choice checks of ``values`` against ``node_cls.INPUT_TYPES()``.

    ComfyUI skips its own min/max/choice checks for the inputs a ``VALIDATE_INPUTS`` names, so the nodes call
    this first. Linked inputs arrive as ``None`` and are skipped. Returns an error naming the input, or None.
    """
    spec = node_cls.INPUT_TYPES()
    merged = {**spec.get("required", {}), **spec.get("optional", {})}
    for name, value in values.items():
        if value is None or name not in merged:
            continue
        typ, opts = merged[name][0], (merged[name][1] if len(merged[name]) > 1 else {})
        if isinstance(typ, list):
            if value not in typ:
                return f"{name}: {value!r} is not one of {typ[:20]}"
        elif typ in ("INT", "FLOAT"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"{name}: expected a number, got {value!r}"
            if "min" in opts and value < opts["min"]:
                return f"{name}: {value} is smaller than the minimum {opts['min']}"
            if "max" in opts and value > opts["max"]:
                return f"{name}: {value} is bigger than the maximum {opts['max']}"
    return None


# --------------------------------------------------------------------------------------- config error naming
#: engine config fields (as ConfigError names them) → the node inputs that set them
INPUT_NAMES: Dict[str, str] = {
    "model": "model", "device": "device", "dtype": "dtype", "resolution": "resolution",
    "render size": "width/height (CSD Cameras) with the model's resolution (CSD Load Diffusion Model)",
    "prompt": "prompt", "source_prompt": "source_prompt", "guidance.mode": "mode",
    "guidance.weighting": "weighting", "guidance.guidance_weight": "guidance_weight",
    "guidance.negative_weight": "negative_weight_start/negative_weight_end/negative_weight_anneal_until",
    "guidance.min_step_percent": "t_min", "guidance.max_step_percent": "t_max_start/t_max_end/t_max_switch_at",
    "guidance.min_step_percent/max_step_percent": "t_min/t_max_start/t_max_end",
    "guidance.cfg_scale": "cfg_scale", "guidance.lora_lr": "lora_lr",
    "guidance.camera_condition_drop": "camera_condition_drop",
    "scene.radius": "radius", "scene.n_levels": "n_levels", "scene.log2_hashmap_size": "log2_hashmap_size",
    "scene.max_resolution": "max_resolution", "scene.background": "background",
    "camera.height": "height", "camera.width": "width", "camera.batch_size": "batch_size",
    "camera.elevation_range": "elevation_min/elevation_max", "camera.azimuth_range": "azimuth_min/azimuth_max",
    "camera.distance_range": "distance_min/distance_max", "camera.fovy_range": "fovy_min/fovy_max",
    "steps": "steps", "optim.lr": "lr", "seed": "seed", "optim.checkpoint_every": "checkpoint_every",
    "preset": "preset",
}


#: fields that already are node input names (errors the nodes raise themselves)
_NODE_INPUTS = {"resume", "run_name", "source", "guidance", "t_min"}


def named_error(err: ConfigError, where: str = "") -> ConfigError:
    """The same error with the engine's field replaced by the node input(s) that set it (once)."""
    if getattr(err, "named", False) or err.field in _NODE_INPUTS:
        return err
    name = INPUT_NAMES.get(err.field)
    text = str(err)
    prefix = f"{err.field}: "
    message = text[len(prefix):] if text.startswith(prefix) else text
    if name is None:  # a setting without a widget: it comes from the preset
        name, message = err.field, f"{message} (this setting comes from the preset)"
    out = ConfigError(name, message + (f" [{where}]" if where else ""))
    out.named = True
    out.__cause__ = err
    return out


def validate_config(config: RunConfig, where: str = "") -> RunConfig:
    try:
        return config.validate(require_model=False)
    except ConfigError as e:
        raise named_error(e, where) from e


def validate_sections(where: str = "", **sections: Dict[str, Any]) -> None:
    """Validate some sections of a run config on their own (the other sections keep valid defaults)."""
    sections.setdefault("guidance", {})
    sections["guidance"] = {"prompt": "-", **sections["guidance"]}  # the prompt is checked where it is set
    validate_config(RunConfig().replace(**sections), where)


def error_text(fn, *args, **kwargs) -> Optional[str]:
    """Run a validation; the error message (naming the input) or None. For ``VALIDATE_INPUTS``."""
    try:
        fn(*args, **kwargs)
    except ConfigError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------------------------- guidance spec
#: the value of an optional number widget that keeps the preset's setting (any negative value does)
PRESET_VALUE = -1.0
STEPS_REF = int(default_of(OptimConfig, "steps"))  # the spec's run length (10000): schedules are given for it
_NEG = default_of(GuidanceConfig, "negative_weight")  # [0, 0.0, 1.0, 5000]
_TMAX = default_of(GuidanceConfig, "max_step_percent")  # [5000, 0.98, 0.5, 5001]


@dataclass(frozen=True)
class GuidanceSpec:
    """What "CSD Guidance" outputs (type CSD_GUIDANCE): the guidance settings, with the step-valued schedules given
    as fractions of the run so that they follow the step count chosen on "CSD Optimize".

    ``config(steps)`` is the :class:`GuidanceConfig` for a run of ``steps`` steps; ``overrides(steps)`` the same as
    a dict of the fields the node sets (the preset keeps the others: view thresholds, gradient clipping).
    """

    prompt: str = "a DSLR photo of a corgi"
    negative_prompt: str = default_of(GuidanceConfig, "negative_prompt")
    mode: str = default_of(GuidanceConfig, "mode")
    source_prompt: str = default_of(GuidanceConfig, "source_prompt")
    guidance_weight: float = float(default_of(GuidanceConfig, "guidance_weight"))
    negative_weight_start: float = float(_NEG[1])
    negative_weight_end: float = float(_NEG[2])
    #: ω2 goes from start to end over this fraction of the run (spec: steps 0 → 5000 of 10000)
    negative_weight_anneal_until: float = (_NEG[3] - _NEG[0]) / STEPS_REF
    cfg_scale: float = float(default_of(GuidanceConfig, "cfg_scale"))
    weighting: str = default_of(GuidanceConfig, "weighting")
    grad_normalize: bool = bool(default_of(GuidanceConfig, "grad_normalize"))
    t_min: float = float(default_of(GuidanceConfig, "min_step_percent"))
    t_max_start: float = float(_TMAX[1])
    t_max_end: float = float(_TMAX[2])
    #: the largest timestep drops from t_max_start to t_max_end at this fraction of the run (spec: 5000 of 10000)
    t_max_switch_at: float = _TMAX[0] / STEPS_REF
    view_dependent: bool = bool(default_of(GuidanceConfig, "view_dependent"))
    #: Perp-Neg: "preset" (the preset's setting: on for the character presets), "on" or "off"
    perp_neg: str = "preset"
    #: VSD: the LoRA's learning rate and the probability of dropping its camera condition; negative (-1): the
    #: preset's value
    lora_lr: float = PRESET_VALUE
    camera_condition_drop: float = PRESET_VALUE

    def overrides(self, steps: int) -> Dict[str, Any]:
        steps = int(steps)
        if self.negative_weight_start == self.negative_weight_end or self.negative_weight_anneal_until <= 0:
            negative_weight: Any = float(self.negative_weight_end)
        else:
            end = max(1, int(round(self.negative_weight_anneal_until * steps)))
            negative_weight = [0, float(self.negative_weight_start), float(self.negative_weight_end), end]
        if self.t_max_start == self.t_max_end:
            max_step: Any = float(self.t_max_end)
        else:  # a jump, written like threestudio: [N, start, end, N + 1]
            at = int(round(self.t_max_switch_at * steps))
            max_step = [at, float(self.t_max_start), float(self.t_max_end), at + 1]
        return {
            "mode": self.mode, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
            "source_prompt": self.source_prompt, "guidance_weight": float(self.guidance_weight),
            "negative_weight": negative_weight, "cfg_scale": float(self.cfg_scale), "weighting": self.weighting,
            "grad_normalize": bool(self.grad_normalize), "min_step_percent": float(self.t_min),
            "max_step_percent": max_step, "view_dependent": bool(self.view_dependent),
            **({} if self.perp_neg == "preset" else {"perp_neg": self.perp_neg == "on"}),
            **{name: float(getattr(self, name)) for name in ("lora_lr", "camera_condition_drop")
               if getattr(self, name) >= 0},
        }

    def config(self, steps: int = STEPS_REF) -> GuidanceConfig:
        return RunConfig().replace(guidance=self.overrides(steps)).guidance

    def validate(self) -> "GuidanceSpec":
        """Raise ConfigError naming the node input when a setting is invalid or inconsistent."""
        if not self.t_min <= min(self.t_max_start, self.t_max_end):
            raise ConfigError("t_min", f"{self.t_min} must not exceed t_max_start ({self.t_max_start}) and "
                                       f"t_max_end ({self.t_max_end}): t is drawn from [t_min, t_max]")
        g = self.overrides(STEPS_REF)
        validate_config(RunConfig().replace(guidance=g))
        return self


#: the CameraConfig fields that "CSD Cameras" sets; Optimize takes these and leaves the rest to the preset
CAMERA_FIELDS = ("height", "width", "batch_size", "resolution_milestones", "elevation_range", "azimuth_range",
                 "distance_range", "fovy_range")


def camera_overrides(cameras, steps: int) -> Dict[str, Any]:
    """The camera settings of "CSD Cameras" for a run of ``steps`` steps: its size milestones are given for a run
    of STEPS_REF steps (as the guidance schedules) and follow the run's length."""
    over = {k: getattr(cameras, k) for k in CAMERA_FIELDS}
    over["resolution_milestones"] = [int(round(m * int(steps) / STEPS_REF)) for m in cameras.resolution_milestones]
    return over


# ---------------------------------------------------------------------------------------------- ComfyUI access
def autograd_allowed(fn):
    """Run a node function outside inference mode, with autograd on.

    ComfyUI executes every node inside ``torch.inference_mode()``. Tensors made there are inference tensors that
    autograd can never use, and gradients (optimisation, analytic normals) fail. Nodes that create or train engine
    objects (priors, scenes) or render normals therefore run under ``inference_mode(False)``.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return wrapper


def _model_management():
    try:
        import comfy.model_management as mm  # type: ignore

        return mm
    except ImportError:
        return None


def processing_interrupted() -> bool:
    """True once the user pressed Cancel (reads ComfyUI's flag without clearing it)."""
    mm = _model_management()
    return bool(mm is not None and mm.processing_interrupted())


def raise_interrupt() -> None:
    """Raise ComfyUI's ``InterruptProcessingException`` (clearing the flag, as ComfyUI does)."""
    mm = _model_management()
    if mm is None:
        raise KeyboardInterrupt("cancelled")
    mm.throw_exception_if_processing_interrupted()
    raise mm.InterruptProcessingException()


def check_interrupt() -> None:
    mm = _model_management()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def is_interrupt(exc: BaseException) -> bool:
    """True for ComfyUI's ``InterruptProcessingException`` (Cancel pressed)."""
    mm = _model_management()
    cls = getattr(mm, "InterruptProcessingException", None) if mm is not None else None
    return cls is not None and isinstance(exc, cls)


def comfy_device() -> Optional[str]:
    """ComfyUI's torch device (respects ``--cpu`` and ``--cuda-device``), or None outside ComfyUI."""
    mm = _model_management()
    if mm is None or not hasattr(mm, "get_torch_device"):
        return None
    try:
        return str(mm.get_torch_device())
    except Exception:  # pragma: no cover - defensive: fall back to the engine's auto
        return None


class Progress:
    """ComfyUI's progress bar (a no-op outside ComfyUI). ``update(step, total, image)`` with an optional
    ``[H, W, 3]`` tensor in [0, 1] as the live preview."""

    def __init__(self, total: int, node_id: Optional[str] = None):
        try:
            import comfy.utils  # type: ignore

            self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        except ImportError:
            self.bar = None

    def update(self, step: int, total: int, image=None) -> None:
        if self.bar is None:
            return
        preview = None
        if image is not None:
            preview = ("JPEG", enlarge_nearest(to_pil(image)), PREVIEW_MAX_SIZE)
        self.bar.update_absolute(step, total, preview)


def to_pil(image):
    """``[H, W, 3]`` float tensor in [0, 1] → PIL image."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype("uint8")
    return Image.fromarray(arr)


def preview_factor(height: int, width: int, limit: int = PREVIEW_MAX_SIZE) -> int:
    """The largest integer factor that keeps ``max(height, width) * factor`` within ``limit`` (at least 1)."""
    return max(1, int(limit) // max(1, int(height), int(width)))


def enlarge_nearest(image, limit: int = PREVIEW_MAX_SIZE):
    """A PIL image enlarged by nearest neighbour by ``preview_factor`` (sharp pixels, no blur): a 64² training
    render becomes 512², viewable in the browser; an image already larger than half the limit is unchanged."""
    from PIL import Image

    k = preview_factor(image.height, image.width, limit)
    if k == 1:
        return image
    return image.resize((image.width * k, image.height * k), Image.NEAREST)


def preview_render_size(height: int, width: int) -> int:
    """Side of the square "preview" output of CSD Optimize: PREVIEW_RENDER_FACTOR × the training render size,
    at most PREVIEW_MAX_SIZE and never below the render size."""
    side = max(int(height), int(width))
    return max(side, min(side * PREVIEW_RENDER_FACTOR, PREVIEW_MAX_SIZE))


# ----------------------------------------------------------------------------------------------- folders
def _folder_paths():
    try:
        import folder_paths  # type: ignore

        return folder_paths
    except ImportError:
        return None


def register_model_folders() -> None:
    """Make sure the model folders the pack reads exist in ``folder_paths``, merging, never overwriting:
    extra_model_paths.yaml and other packs may already have added paths (or an empty extension set = all files)."""
    fp = _folder_paths()
    if fp is None:
        return
    wanted = {"diffusers": {"folder"}, "checkpoints": set(getattr(fp, "supported_pt_extensions", set())),
              "controlnet": set(getattr(fp, "supported_pt_extensions", set()))}
    table = fp.folder_names_and_paths
    for name, exts in wanted.items():
        default = os.path.join(fp.models_dir, name)
        if name in table:
            paths, have = table[name]
            if default not in paths:
                paths.append(default)
            if have and not exts <= set(have):  # an empty set means "every file": leave it
                merged = set(have) | exts
                table[name] = (paths, merged if isinstance(have, set) else sorted(merged))
        else:
            table[name] = ([default], exts)


def output_directory() -> Path:
    fp = _folder_paths()
    return Path(fp.get_output_directory()) if fp is not None else Path("output").resolve()


def runs_directory() -> Path:
    return output_directory().joinpath(*RUNS_SUBDIR)


def diffusers_models() -> List[str]:
    """Diffusers folders (with model_index.json) under every ``diffusers`` model path, relative, with '/'."""
    return model_folders("diffusers", "model_index.json")


def model_folders(kind: str, marker: str) -> List[str]:
    """Folders holding ``marker`` under every ``kind`` model path (not inside one another), relative, with '/'."""
    fp = _folder_paths()
    if fp is None:
        return []
    found = []
    try:
        roots = fp.get_folder_paths(kind)
    except KeyError:
        return []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for here, dirs, files in os.walk(root, followlinks=True):
            if marker in files:
                rel = os.path.relpath(here, root)
                if rel != ".":
                    found.append(rel.replace(os.sep, "/"))
                dirs[:] = []  # a model's sub-folders hold no further models
            dirs.sort()
    return sorted(dict.fromkeys(found))


def checkpoint_models() -> List[str]:
    fp = _folder_paths()
    if fp is None:
        return []
    try:
        names = fp.get_filename_list("checkpoints")
    except KeyError:
        return []
    return [n.replace(os.sep, "/") for n in names if n.lower().endswith(SINGLE_FILE_SUFFIXES)]


def model_choices() -> List[str]:
    return ([f"diffusers/{m}" for m in diffusers_models()] + [f"checkpoints/{m}" for m in checkpoint_models()])


def resolve_model(choice: str) -> str:
    """A "diffusers/<rel>" or "checkpoints/<rel>" choice → the path on disk."""
    kind, _, rel = choice.partition("/")
    fp = _folder_paths()
    if kind not in ("diffusers", "checkpoints") or not rel or fp is None:
        raise ConfigError("model", f"{choice!r} is not a model of the list; put diffusers folders under "
                                   "models/diffusers and single-file checkpoints under models/checkpoints")
    for root in fp.get_folder_paths(kind):
        path = os.path.join(root, *rel.split("/"))
        if os.path.exists(path):
            return path
    raise ConfigError("model", f"{choice!r} was not found in {fp.get_folder_paths(kind)}")


def check_run_name(run_name: str) -> None:
    if not _RUN_NAME.match(run_name or ""):
        raise ConfigError("run_name", f"{run_name!r}: use 1-100 letters, digits, '.', '_' or '-' (no folders), "
                                      "starting with a letter or digit")


def run_folders(run_name: str) -> List[Path]:
    """``<runs>/<run_name>_NNNNN`` folders, oldest first."""
    root = runs_directory()
    if not root.is_dir():
        return []
    pat = re.compile(re.escape(run_name) + r"_(\d{5,})$")
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := pat.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_name: str) -> Optional[Path]:
    """The checkpoint of the newest ``<run_name>_NNNNN`` run, or None. Never an older run: if the newest one
    crashed before its first checkpoint, resuming must not silently continue a different run."""
    folders = run_folders(run_name)
    if not folders:
        return None
    ckpt = folders[-1] / "checkpoints" / "last.ckpt"
    return ckpt if ckpt.is_file() else None


def new_run_folder(run_name: str) -> Path:
    """A new ``<runs>/<run_name>_NNNNN`` (created; existing runs are never reused)."""
    existing = run_folders(run_name)
    n = int(existing[-1].name.rsplit("_", 1)[1]) + 1 if existing else 1
    while True:
        folder = runs_directory() / f"{run_name}_{n:05d}"
        try:
            folder.mkdir(parents=True, exist_ok=False)
            return folder
        except FileExistsError:
            n += 1


def saved_runs() -> List[str]:
    """Run folders with a checkpoint, relative to the runs folder (choices of "CSD 3D Scene")."""
    root = runs_directory()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "checkpoints" / "last.ckpt").is_file())


def file_signature(path: Optional[Path]) -> str:
    if path is None or not path.exists():
        return "missing"
    st = path.stat()
    return f"{path}:{st.st_mtime_ns}:{st.st_size}"

