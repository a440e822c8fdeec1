"""How a node runs inside ComfyUI: with autograd (ComfyUI executes nodes in inference mode), on ComfyUI's device,
with its progress bar (and a live preview) and its Cancel button. Outside ComfyUI (plain Python, tests) these
fall back to no-ops: no progress bar, no interruption, the engine's own device choice."""
from __future__ import annotations

import functools
from typing import Optional

from .previews import PREVIEW_MAX_SIZE, enlarge_nearest, to_pil


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


def model_management():
    try:
        import comfy.model_management as mm  # type: ignore

        return mm
    except ImportError:
        return None


def processing_interrupted() -> bool:
    """True once the user pressed Cancel (reads ComfyUI's flag without clearing it)."""
    mm = model_management()
    return bool(mm is not None and mm.processing_interrupted())


def raise_interrupt() -> None:
    """Raise ComfyUI's ``InterruptProcessingException`` (clearing the flag, as ComfyUI does)."""
    mm = model_management()
    if mm is None:
        raise KeyboardInterrupt("cancelled")
    mm.throw_exception_if_processing_interrupted()
    raise mm.InterruptProcessingException()


def check_interrupt() -> None:
    mm = model_management()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def is_interrupt(exc: BaseException) -> bool:
    """True for ComfyUI's ``InterruptProcessingException`` (Cancel pressed)."""
    mm = model_management()
    cls = getattr(mm, "InterruptProcessingException", None) if mm is not None else None
    return cls is not None and isinstance(exc, cls)


def comfy_device() -> Optional[str]:
    """ComfyUI's torch device (respects ``--cpu`` and ``--cuda-device``), or None outside ComfyUI."""
    mm = model_management()
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

    def update(self, step: int, total: int, image=None, caption: Optional[str] = None) -> None:
        """``caption``: a line written on the preview's bottom edge (what the render shows)."""
        if self.bar is None:
            return
        preview = None
        if image is not None:
            picture = enlarge_nearest(to_pil(image))
            if caption:
                from csd_backend.runs.outputs import captioned

                picture = captioned(picture, caption)
            preview = ("JPEG", picture, PREVIEW_MAX_SIZE)
        self.bar.update_absolute(step, total, preview)
