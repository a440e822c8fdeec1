"""One writer per run folder: ``run.lock`` names the process that trains (or finishes) the run, so a second
``generate --resume``, batch worker or ComfyUI node on the same folder is refused instead of writing the same
checkpoints.

The lock file is created atomically (``O_CREAT | O_EXCL``) and holds the holder's PID, host, start time and
command. A lock whose holder is gone (a crash, ``kill -9``, a reboot) is stale: it is detected (the PID is not
running on this host, or a different process now has that PID) and taken over with a warning. A lock held on
another host cannot be checked from here; the error says how to remove it once that run is known to be over.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from ..errors import CSDError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
#: lock files this process holds (a leftover of this PID that is not in here is stale)
_HELD: set = set()


class RunLockedError(CSDError):
    """The run folder is being written by another process."""


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (Linux: field 22 of /proc/PID/stat), to tell a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def _holder_alive(info: dict) -> bool:
    """Whether the process recorded in a lock file still runs (on this host; other hosts: assumed so)."""
    if info.get("host") != socket.gethostname():
        return True
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return False  # this process does not hold it (it is not in _HELD): a leftover of an earlier failure
    if not _running(pid):
        return False
    started = info.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def _read(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written or damaged: nobody can be shown to hold it


def describe(info: dict) -> str:
    when = info.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "?"
    return f"PID {info.get('pid', '?')} on {info.get('host', '?')} (since {since}: {info.get('command', '?')})"


class RunLock:
    """``with RunLock(folder, "generate --resume"):`` — or ``acquire()`` / ``release()``."""

    def __init__(self, folder, what: str = ""):
        self.path = Path(folder) / LOCK_FILE
        self.what = what or " ".join(sys.argv[:3])
        self.held = False

    def acquire(self) -> "RunLock":
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "process_start": _process_start(os.getpid()), "command": self.what}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if str(self.path.resolve()) in _HELD:
                    raise RunLockedError(f"{self.path.parent} is already in use by this process (another run of "
                                         "it writes there); wait for that run to finish") from None
                other = _read(self.path)
                if other is None:
                    continue  # released meanwhile: try again
                if other and _holder_alive(other):
                    raise RunLockedError(
                        f"{self.path.parent} is in use by {describe(other)}; one process writes a run folder at a "
                        f"time. Wait for it to finish (or stop it), then try again. If that process is surely gone "
                        f"(e.g. it ran on another machine that was switched off), delete {self.path}.")
                log.warning("taking over a stale lock of %s: %s", self.path.parent,
                            describe(other) + " is no longer running" if other else "the lock file was unreadable")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(info, fh)
            self.held = True
            _HELD.add(str(self.path.resolve()))
            return self
        raise RunLockedError(f"could not lock {self.path.parent}: its lock file keeps changing; another process is "
                             "starting on it")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD.discard(str(self.path.resolve()))
        try:
            if (_read(self.path) or {}).get("pid") == os.getpid():
                self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
