"""Stopping a command cleanly: Ctrl-C (SIGINT) and SIGTERM (``timeout``, job schedulers, ``kill``) raise
``KeyboardInterrupt`` at a safe point, so a run saves its checkpoint and the command exits with one line.

``STOP`` records the signal. While its ``defer`` predicate is true (the parameter update of a training step, or a
batch whose runner stops the workers itself) a signal is only recorded as *pending*; ``raise_pending`` raises it
at the next safe point. Used by ``cli.py``, ``batch/`` and ``runs/life.py`` alike.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class StopState:
    #: "SIGINT" or "SIGTERM" once one arrived
    signal: Optional[str] = None
    #: a signal arrived and was not raised yet (or some library swallowed its KeyboardInterrupt)
    pending: bool = False
    #: while ``defer()`` is true, a signal is only recorded
    defer: Optional[Callable[[], bool]] = None


#: the signal that stopped the command (one per process)
STOP = StopState()


@contextlib.contextmanager
def signals_interrupt():
    """While the command runs, SIGTERM raises KeyboardInterrupt like Ctrl-C, so a run saves its checkpoint and
    exits with the one-line message; neither signal cuts a parameter update in half. The previous handlers come
    back afterwards."""
    STOP.signal, STOP.pending, STOP.defer = None, False, None
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        name = "SIGTERM" if signum == getattr(signal, "SIGTERM", None) else "SIGINT"
        first = STOP.signal is None
        STOP.signal = STOP.signal or name
        # pending until the command reports the stop: if some library swallows the KeyboardInterrupt (a bare
        # except), the training loop raises it again at the end of the step
        STOP.pending = True
        if (STOP.defer is not None and STOP.defer()) or in_import(frame):
            return  # raised at the next safe point: the end of the step, or of the import
        if first or name == "SIGINT":  # a second SIGTERM does not break the checkpoint the first one saves
            raise KeyboardInterrupt

    installed = []
    try:
        for sig in (getattr(signal, "SIGTERM", None), signal.SIGINT):
            if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                installed.append((sig, signal.signal(sig, on_signal)))
        yield
    finally:
        for sig, previous in installed:
            signal.signal(sig, previous)
        STOP.pending, STOP.defer = False, None


@contextlib.contextmanager
def deferred(predicate: Callable[[], bool]):
    """Signals are only recorded while ``predicate()`` is true (they are raised by ``raise_pending``)."""
    STOP.defer = predicate
    try:
        yield
    finally:
        STOP.defer = None


def in_import(frame) -> bool:
    """True while a module is being imported: an exception there can leave a half-initialised extension module
    behind (and some imports swallow it), so the signal waits for the next safe point."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def raise_pending() -> None:
    """Raise the interrupt a signal asked for during a parameter update, now that the step is complete."""
    if STOP.pending:
        STOP.pending = False
        raise KeyboardInterrupt


def take_pending() -> bool:
    """Whether a signal is pending (and no longer, after this call): for a loop that stops by itself."""
    if STOP.pending:
        STOP.pending = False
        return True
    return False


def stopped(what: str) -> int:
    """Print how the command was stopped (one line) and return its exit code (130 Ctrl-C, 143 SIGTERM)."""
    STOP.pending = False
    by = "stopped by SIGTERM" if STOP.signal == "SIGTERM" else "interrupted"
    print(f"\n{by} {what}", file=sys.stderr)
    return 143 if STOP.signal == "SIGTERM" else 130
