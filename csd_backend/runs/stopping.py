"""Stopping a command cleanly: Ctrl-C (SIGINT) and SIGTERM (``timeout``, job schedulers, ``kill``) raise
``KeyboardInterrupt`` at a safe point, so a run saves its checkpoint and the command exits with one line.

``STOP`` records the signal. While its ``defer`` predicate is true (the parameter update of a training step, or a
batch whose runner stops the workers itself) a signal is only recorded as *pending*; ``raise_pending`` raises it
at the next safe point. Used by ``cli.py``, ``batch/`` and ``runs/life.py`` alike.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Optional

#: said at once when the first signal arrives (a long CPU step may take a minute to reach a safe point)
NOTICE = "stopping: the current step is finished or undone, then the checkpoint is saved ..."
#: said when another signal arrives while the command is already stopping
AGAIN = "already stopping; the checkpoint is being saved (another Ctrl-C does not skip it)"


@dataclass
class StopState:
    #: "SIGINT" or "SIGTERM" once one arrived
    signal: Optional[str] = None
    #: a signal arrived and was not raised yet (or some library swallowed its KeyboardInterrupt)
    pending: bool = False
    #: while ``defer()`` is true, a signal is only recorded
    defer: Optional[Callable[[], bool]] = None
    #: what the user has been told: 0 nothing, 1 ``NOTICE``, 2 ``AGAIN`` too
    told: int = 0
    #: a thread tells the user at once (``_announce_at_once``); else the handler does, when it runs
    watched: bool = False


#: the signal that stopped the command (one per process)
STOP = StopState()


@contextlib.contextmanager
def signals_interrupt(notice: bool = True, exiting: bool = False):
    """While the command runs, SIGTERM raises KeyboardInterrupt like Ctrl-C, so a run saves its checkpoint and
    exits with the one-line message; neither signal cuts a parameter update in half. Only the first signal
    interrupts: later ones are recorded (a second Ctrl-C never skips the checkpoint). The user is told at once,
    even while a long computation holds the interpreter (``_announce_at_once``); ``notice=False``: not told (a
    batch worker, whose driver speaks for it). The previous handlers come back afterwards; ``exiting``: the process
    ends with the command, so a signal that comes after it (while Python shuts down) is ignored instead, never a
    traceback."""
    STOP.signal, STOP.pending, STOP.defer, STOP.watched = None, False, None, False
    STOP.told = 0 if notice else 2
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        name = "SIGTERM" if signum == getattr(signal, "SIGTERM", None) else "SIGINT"
        first = STOP.signal is None
        STOP.signal = STOP.signal or name
        if not STOP.watched:
            announce(first)
        # pending until the command reports the stop: if some library swallows the KeyboardInterrupt (a bare
        # except), the training loop raises it again at the end of the step
        STOP.pending = True
        if (STOP.defer is not None and STOP.defer()) or in_import(frame):
            return  # raised at the next safe point: the end of the step, or of the import
        if first:  # a second signal does not break the checkpoint the first one saves
            raise KeyboardInterrupt

    installed = []
    try:
        for sig in (getattr(signal, "SIGTERM", None), signal.SIGINT):
            if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                installed.append((sig, signal.signal(sig, on_signal)))
        with _announce_at_once(bool(installed) and notice):
            yield
    finally:
        for sig, previous in installed:
            signal.signal(sig, signal.SIG_IGN if exiting else previous)
        STOP.pending, STOP.defer = False, None


def announce(first: bool) -> None:
    """Tell the user that the command is stopping (the first signal), or already is (once, for a later one)."""
    if first and STOP.told == 0:
        STOP.told = 1
        print(f"\n{NOTICE}", file=sys.stderr, flush=True)
    elif not first and STOP.told == 1:
        STOP.told = 2
        print(AGAIN, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _announce_at_once(active: bool):
    """Python runs a signal handler only between bytecodes, so during a long torch call (a CPU backward pass can
    take a minute) nothing could be said. The interpreter's C handler also writes the signal number to a wakeup
    fd at once: a thread waiting on it tells the user immediately."""
    if not active:
        yield
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):  # not the main thread, or not supported here
        os.close(r)
        os.close(w)
        yield
        return
    seen = [0]
    STOP.watched = True

    def watch():
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:
                return
            for byte in data:
                if byte in (signal.SIGINT, getattr(signal, "SIGTERM", -1)):
                    seen[0] += 1
                    announce(seen[0] == 1)

    watcher = threading.Thread(target=watch, name="csd-signal-notice", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        STOP.watched = False
        signal.set_wakeup_fd(previous)
        os.close(w)  # the watcher's read returns empty: it ends
        watcher.join(timeout=1.0)
        os.close(r)


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
