"""Local workers: one process per device (each GPU, or the CPU), each loading the prior once for all its runs.

The driver hands one run at a time to an idle worker over a pipe and reads the worker's events from it. A worker
that dies in the middle of a run (killed, out of memory) is replaced, and its run is handed out again: it
resumes from its last checkpoint, up to ``retries`` times. Ctrl-C reaches every worker (they share the terminal's
process group); SIGTERM sent to the driver alone is passed on: each worker saves its checkpoint and stops.
Workers are started with ``spawn`` (a fresh interpreter: no fork of a process that holds torch threads or CUDA).
"""
from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import signal
import time
from collections import Counter, deque
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, List, Optional

from ..errors import ConfigError, CSDError
from .plan import RunSpec

#: how long a stopped batch waits for its workers to save their checkpoints before it kills them
STOP_WAIT_S = 300.0
#: what stops a worker at once (Windows has no SIGKILL: TerminateProcess is all it has)
HARD_STOP = getattr(signal, "SIGKILL", signal.SIGTERM)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_devices() -> List[str]:
    """Every CUDA device, or the CPU."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


@dataclasses.dataclass
class _Slot:
    index: int
    device: str
    proc: Optional[mp.process.BaseProcess] = None
    conn: object = None
    ready: bool = False
    spec: Optional[RunSpec] = None
    step: Optional[int] = None
    failed_starts: int = 0


class LocalRunner:
    def __init__(self, workers: Optional[int] = None, retries: int = 2):
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ConfigError("--workers", f"must be at least 1, got {workers}")
        if retries < 0:
            raise ConfigError("--retries", f"must be 0 or more, got {retries}")
        self.devices = local_devices()
        self.workers = workers or len(self.devices)
        self.retries = retries

    def describe(self) -> str:
        where = ", ".join(sorted(set(self._device(i) for i in range(self.workers))))
        return f"{self.workers} local worker{'s' if self.workers != 1 else ''} ({where})"

    def _device(self, i: int) -> str:
        return self.devices[i % len(self.devices)]

    def prepare(self, folder: Path) -> None:
        """Nothing to check before the batch starts (the folder is local)."""

    def close(self) -> None:
        pass

    def threads(self) -> Optional[int]:
        """torch threads per worker: the cores shared out (OMP_NUM_THREADS, when set, is left to torch)."""
        if os.environ.get("OMP_NUM_THREADS"):
            return None
        return max(1, available_cores() // self.workers)

    def run(self, specs: List[RunSpec], folder: Path, outputs, prior_over: dict,
            handle: Callable[[dict], None], stop_requested: Callable[[], bool]) -> bool:
        """Run every spec; returns True when a signal stopped the batch (every started run then has its end)."""
        ctx = mp.get_context("spawn")
        queue = deque(specs)
        attempts: Counter = Counter()
        slots = [_Slot(i, self._device(i)) for i in range(min(self.workers, len(specs)))]
        out_dict = dataclasses.asdict(outputs)
        stopping, deadline = False, None
        # workers take Ctrl-C as the driver does: a driver started with SIGINT ignored (nohup, `cmd &` in a script)
        # has workers that ignore it too, so a SIGINT to the process group cannot stop them behind its back
        interruptible = _sigint_handled()

        def start(slot: _Slot) -> None:
            parent, child = ctx.Pipe()
            slot.proc = ctx.Process(target=worker_main, name=f"csd-batch-worker-{slot.index}", daemon=True,
                                    args=(slot.device, self.threads(), str(folder), out_dict, prior_over, child,
                                          interruptible))
            with _sigint_ignored():  # a Ctrl-C while it imports torch: no traceback, the driver stops it
                slot.proc.start()
            child.close()
            slot.conn, slot.ready, slot.spec, slot.step = parent, False, None, None

        def stop_slot(slot: _Slot, sig=signal.SIGTERM) -> None:
            if slot.proc is not None and slot.proc.is_alive():
                with contextlib.suppress(OSError):
                    if slot.spec is None and sig == signal.SIGTERM and slot.conn is not None:
                        slot.conn.send(None)  # idle: just leave
                    else:
                        os.kill(slot.proc.pid, sig)  # saves its checkpoint (SIGTERM), or dies (SIGKILL)

        def receive(slot: _Slot) -> None:
            while slot.conn is not None and slot.conn.poll():
                try:
                    ev = slot.conn.recv()
                except (EOFError, OSError):
                    slot.conn = None
                    return
                if ev.get("type") == "ready":
                    slot.ready, slot.failed_starts = True, 0
                    continue
                if slot.spec is None or ev.get("run") != slot.spec.id:
                    continue  # a late event of a run this slot no longer holds
                if ev["type"] in ("training", "progress"):
                    slot.step = ev.get("step")
                handle(ev)
                if ev["type"] == "end":
                    slot.spec = None

        def exited(slot: _Slot) -> None:
            code = slot.proc.exitcode
            why = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
                   else f"exit code {code}")
            spec, slot.spec = slot.spec, None
            if not slot.ready and not closing and not stopping:
                slot.failed_starts += 1
                if slot.failed_starts >= 2:
                    raise CSDError(f"a local worker process exits before it starts ({why}); run with CSD_DEBUG=1 "
                                   "and --workers 1 to see why")
            if spec is not None:
                where = f" at step {slot.step}" if slot.step is not None else ""
                if stopping:
                    handle({"type": "end", "run": spec.id, "status": "interrupted", "step": slot.step,
                            "error": f"its worker stopped ({why}){where}; the run resumes from its checkpoint"})
                elif attempts[spec.id] <= self.retries:
                    queue.appendleft(spec)
                    handle({"type": "requeue", "run": spec.id, "step": slot.step,
                            "error": f"its worker (pid {slot.proc.pid}) died ({why}){where}; started again from "
                                     f"its checkpoint (attempt {attempts[spec.id] + 1} of {self.retries + 1})"})
                else:
                    handle({"type": "end", "run": spec.id, "status": "failed", "step": slot.step,
                            "error": f"its worker died {attempts[spec.id]} times (last: {why}{where}); resume the "
                                     "batch to try again"})
            slot.proc.join()
            slot.proc, slot.conn = None, None
            if queue and not stopping:
                start(slot)

        closing = False  # every run has ended: the workers are leaving
        for slot in slots:
            start(slot)
        try:
            while any(s.proc is not None for s in slots):
                if stop_requested():
                    if stopping:  # a second signal: do not wait for the checkpoints
                        for slot in slots:
                            stop_slot(slot, HARD_STOP)
                    stopping, deadline = True, deadline or time.monotonic() + STOP_WAIT_S
                    for slot in slots:
                        stop_slot(slot)
                if stopping and deadline is not None and time.monotonic() > deadline:
                    for slot in slots:
                        stop_slot(slot, HARD_STOP)
                    deadline = None
                if not stopping and not closing:
                    for slot in slots:
                        if slot.proc is not None and slot.ready and slot.spec is None and queue:
                            spec = queue.popleft()
                            attempts[spec.id] += 1
                            slot.spec, slot.step = spec, None
                            slot.conn.send(dataclasses.asdict(spec))
                    if not queue and all(s.spec is None for s in slots):
                        closing = True
                        for slot in slots:
                            stop_slot(slot)
                live = [s for s in slots if s.proc is not None]
                wait([s.conn for s in live if s.conn is not None] + [s.proc.sentinel for s in live], timeout=0.2)
                for slot in live:
                    receive(slot)
                    if not slot.proc.is_alive():
                        receive(slot)
                        exited(slot)
        except BaseException:  # a bug, or KeyboardInterrupt outside the driver's signal handling: stop hard
            for slot in slots:
                stop_slot(slot, HARD_STOP)
            raise
        return stopping


def worker_main(device: str, threads: Optional[int], folder: str, outputs: dict, prior_over: dict, conn,
                interruptible: bool = True) -> None:
    """A worker process: take runs from ``conn`` until it sends None; every event goes back over ``conn``.
    ``interruptible``: Ctrl-C (SIGINT) stops it, as it stops the driver (else SIGINT stays ignored)."""
    if interruptible:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored while it started
    from ..runs.stopping import signals_interrupt

    with signals_interrupt(notice=False):  # the driver tells the user
        try:
            _serve(device, threads, Path(folder), outputs, prior_over, conn)
        except (KeyboardInterrupt, EOFError, BrokenPipeError):
            pass  # stopped (its run saved its checkpoint), or the driver is gone


def _serve(device, threads, folder, outputs, prior_over, conn) -> None:
    import torch

    from ..runs.outputs import RunOutputs
    from ..runs.progress import quiet_third_party
    from .execute import PriorCache, execute

    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    quiet_third_party()
    outs = RunOutputs(**outputs)
    priors = PriorCache()  # the prior of this worker, kept across its runs
    conn.send({"type": "ready", "pid": os.getpid()})
    while True:
        msg = conn.recv()
        if msg is None:
            return
        # a GPU worker puts its runs on its GPU; on the CPU "auto" already means it (config.json as generate's)
        result = execute(RunSpec(**msg), folder, outs, conn.send, priors,
                         device=device if device != "cpu" else None, prior_over=prior_over)
        conn.send(result)


def _sigint_handled() -> bool:
    """Whether this process reacts to SIGINT (Python ignores it when it was started with SIGINT ignored)."""
    try:
        return signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    except ValueError:
        return True


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored while a child starts: it inherits that, so Python does not turn a Ctrl-C during its imports
    into a traceback (the child installs its own handler when it is ready)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
