"""``torch.compile`` for the ``compiled`` backends (DESIGN §2): the hash-grid encoding (``scene/backends.py``) and
the volume renderer's compositing (``render/volume_renderer.py``).

Every compiled function comes from :func:`compiled`: one ``torch.compile`` per function and set of static
arguments, each with its own code object, so one configuration's graphs never count against another's recompile
limit. :func:`resolve_compiled_backend` turns a setting ``auto | torch | compiled`` into the backend used here:
``auto`` is compiled on CUDA when a trial compile (:func:`compile_problem`) works, else torch with one warning
naming the cause; on the CPU torch here, because whether compiling pays depends on the run's length, which the
run decides before building its parts (``auto_backends.py``); an explicit ``compiled`` that cannot compile is a
ConfigError naming the field.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import types
from typing import Callable, Dict, Optional

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

COMPILE_HINT = ("torch.compile needs a C++ compiler on the CPU and Triton on CUDA (CUDA builds of torch ship "
                "it); set {field} to 'torch' (always available) or 'auto'")


# ----------------------------------------------------------------------------------------- torch.compile plumbing
_COMPILED: Dict[tuple, Callable] = {}


def compiled(fn: Callable, field: str = "", **static) -> Callable:
    """``torch.compile`` of ``fn`` with the keyword arguments ``static`` fixed (constants of the graph), cached.

    Each entry compiles a copy of ``fn`` with its own code object: dynamo keeps its graphs and its recompile limit
    per code object, so configurations never evict each other. Callers mark the packed dimension dynamic
    (``torch._dynamo.maybe_mark_dynamic``) so that a new sample count reuses the graph. A compile that fails (past
    the trial of ``compile_problem``) is a ConfigError naming ``field``, the setting that chose this backend."""
    key = (fn.__module__, fn.__qualname__, tuple(sorted(static.items())))
    c = _COMPILED.get(key)
    if c is None:
        # a name that depends only on the key: the same in every process, for inductor's on-disk caches
        name = f"{fn.__name__}_compiled_{hashlib.sha1(repr(key).encode()).hexdigest()[:10]}"
        code = fn.__code__.replace(co_name=name)
        fresh = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        fresh.__kwdefaults__ = fn.__kwdefaults__
        graph = torch.compile(functools.partial(fresh, **static) if static else fresh)

        def c(*args, _graph=graph, _field=field or "the backend setting"):
            try:
                return _graph(*args)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                raise ConfigError(_field, f"torch.compile failed here ({_cause(e)}). "
                                          + COMPILE_HINT.format(field=_field)) from e

        c.source_function = fresh  # the copy dynamo compiles (tests check its code object)
        _COMPILED[key] = c
    return c


def _trial_function(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    idx = (x * 7).long() % table.shape[0]  # a gather, whose backward is a scatter-add: what the backends need
    return (table[idx] * x.unsqueeze(-1)).sum(1)


@functools.lru_cache(maxsize=None)
def compile_problem(device: str) -> Optional[str]:
    """None when ``torch.compile`` builds and runs a small gather / scatter function (forward and backward) on
    ``device`` (a string such as 'cpu' or 'cuda:0'); else the cause, e.g. 'ImportError: no triton'."""
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        fn = compiled(_trial_function)
        x = torch.linspace(0, 1, 48, device=dev).view(16, 3)  # no random draw: a trial must not move the seed
        table = torch.zeros(8, 2, device=dev, requires_grad=True)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        fn(x, table).sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return None
    except Exception as e:  # BackendCompilerFailed, ImportError (triton), OSError / CalledProcessError (compiler)
        return _cause(e.__cause__ if isinstance(e, ConfigError) and e.__cause__ is not None else e)


def _cause(e: BaseException) -> str:
    """'Type: first line' of an exception, looking through dynamo's BackendCompilerFailed to its cause."""
    e = getattr(e, "inner_exception", None) or e
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


_WARNED: set = set()


def resolve_compiled_backend(field: str, requested: str, device=None) -> str:
    """'torch' or 'compiled' for a part whose backends are ``auto | torch | compiled``: ``auto`` is compiled on CUDA
    when a trial compile works (else torch, with one warning naming the cause) and torch on the CPU; an explicit
    ``compiled`` that cannot compile here is a ConfigError naming ``field``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if requested not in ("auto", "torch", "compiled"):
        raise ConfigError(field, f"{requested!r} is not one of 'auto', 'torch', 'compiled'")
    if requested == "torch" or (requested == "auto" and device.type != "cuda"):
        return "torch"
    problem = compile_problem(_device_key(device))
    if problem is None:
        return "compiled"
    if requested == "compiled":
        raise ConfigError(field, f"'compiled' needs torch.compile on {device}, and a trial compile failed "
                                 f"({problem}). " + COMPILE_HINT.format(field=field))
    if (field, problem) not in _WARNED:
        _WARNED.add((field, problem))
        log.warning("%s auto: torch.compile does not work on %s (%s); using the slower torch backend. %s",
                    field, device, problem, COMPILE_HINT.format(field=field))
    return "torch"


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type
