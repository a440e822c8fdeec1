"""Ray: one task per run, one GPU each (or ``--cpus-per-run`` CPUs on a cluster without GPUs).

Ray is an optional extra (``pip install ".[ray]"``) imported only here. Every node must have the pack installed
and see the batch folder at the same path (checked before any run starts: the driver writes a token there, a
task on every node reads it and writes its own answer, which the driver reads back). A task whose worker dies
is retried by Ray (``max_retries``); since a run continues from whatever its folder holds, the retry resumes
from the last checkpoint. Tasks report their progress to a small actor that the driver reads; only the driver
writes the manifest. Ctrl-C cancels the tasks (Ray raises KeyboardInterrupt in them: each saves its checkpoint)
and waits for them, so every run can be resumed. A worker process keeps its prior for the next tasks it runs.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, List, Optional

from ..errors import ConfigError, CSDError
from .plan import RunSpec

RAY_HINT = 'pip install ".[ray]"'
#: how long the nodes may take to answer the check of the shared folder (a worker may need to start on each)
SHARED_CHECK_S = 180.0
#: how long a stopped batch waits for its cancelled tasks to save their checkpoints
STOP_WAIT_S = 300.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray", f"Ray is not installed here; install it with {RAY_HINT} (or pip install "
                                   "\"ray>=2.9\"), or leave out --ray to run on local worker processes") from None
    return ray


class _Reporter:
    """Events of the tasks, kept until the driver reads them."""

    def __init__(self):
        self.events: list = []

    def report(self, event: dict) -> None:
        self.events.append(event)

    def sync(self) -> bool:  # a task's blocking call: every event it sent before is here
        return True

    def drain(self) -> list:
        out, self.events = self.events, []
        return out


def _run_task(spec: dict, folder: str, outputs: dict, prior_over: dict, threads: Optional[int], reporter) -> dict:
    """The Ray task: one run into ``folder/<run>``, from whatever the folder holds (so a retry resumes)."""
    import ray
    import torch

    from ..runs.outputs import RunOutputs
    from ..runs.progress import quiet_third_party
    from .execute import execute

    if threads:
        torch.set_num_threads(threads)
    quiet_third_party()
    _cancellable()
    try:
        result = execute(RunSpec(**spec), Path(folder), RunOutputs(**outputs), reporter.report.remote,
                         prior_over=prior_over)
    except KeyboardInterrupt:
        # cancelled: the run saved its checkpoint; its "interrupted" end (with that step) must reach the driver.
        # Then this worker process leaves: the interrupt may have cut an import short somewhere, which would break
        # the next task it ran (Ray does not retry a cancelled task).
        try:
            ray.get(reporter.sync.remote(), timeout=30)
        finally:
            os._exit(1)
    ray.get(reporter.sync.remote())  # the driver sees this run's events before its end
    return result


def _cancellable() -> None:
    """Let Ray's cancel reach the task: it raises KeyboardInterrupt through Python's SIGINT machinery, which does
    nothing in a worker that inherited SIGINT ignored (a cluster started by a script run in the background)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _sees_folder(probe: str, token: str, answer: str) -> bool:
    """On one node: whether it reads the driver's token, after writing its own answer beside it."""
    p = Path(probe)
    try:
        ok = p.read_text() == token
        Path(answer).write_text(token)
    except OSError:
        return False
    return ok


@functools.lru_cache(maxsize=None)
def _remotes(ray):
    return (ray.remote(_Reporter), ray.remote(_run_task), ray.remote(_sees_folder))


class RayRunner:
    def __init__(self, address: str, retries: int = 2, cpus_per_run: int = 1):
        self.ray = import_ray()
        if retries < 0:
            raise ConfigError("--retries", f"must be 0 or more, got {retries}")
        if cpus_per_run < 1:
            raise ConfigError("--cpus-per-run", f"must be at least 1, got {cpus_per_run}")
        self.address, self.retries, self.cpus_per_run = address, retries, cpus_per_run
        self.connected = False  # by prepare(): then close() disconnects

    def describe(self) -> str:
        ray = self.ray
        if not self.connected and ray.is_initialized():
            where = "the Ray cluster this program is connected to"
        else:
            where = "a new local Ray cluster" if self.address == "local" else f"the Ray cluster at {self.address}"
        if ray.is_initialized():
            res = ray.cluster_resources()
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            gpus = int(res.get("GPU", 0))
            what = f"{gpus} GPUs" if gpus else f"{int(res.get('CPU', 0))} CPUs, {self.cpus_per_run} a run"
            where += f" ({nodes} node{'s' if nodes != 1 else ''}, {what})"
        return where

    def _connect(self) -> bool:
        """Connect (or start a local cluster); True when this runner did, so it disconnects at the end."""
        ray = self.ray
        if ray.is_initialized():
            return False
        try:
            if self.address == "local":
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=self.address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError("--ray", f"cannot connect to a Ray cluster at {self.address!r} ({e}); start one with "
                                       "`ray start --head` (and `ray start --address HEAD:6379` on the other "
                                       "nodes), or use --ray local") from None
        return True

    def check_shared_folder(self, folder: Path) -> None:
        """Every alive node reads a token the driver wrote into ``folder`` and writes one back, or ConfigError."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = uuid.uuid4().hex
        probe = folder / f".csd-shared-check-{token}"
        probe.write_text(token)
        answers = []
        try:
            _, _, sees = _remotes(ray)
            refs = {}
            for node in ray.nodes():
                if not node.get("Alive"):
                    continue
                answer = folder / f".csd-shared-check-{token}-{node['NodeID'][:12]}"
                answers.append(answer)
                strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
                ref = sees.options(num_cpus=0, scheduling_strategy=strategy, max_retries=0).remote(
                    str(probe), token, str(answer))
                refs[ref] = (node.get("NodeManagerAddress", node["NodeID"][:12]), answer)
            ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=SHARED_CHECK_S)
            blind = [refs[r][0] for r in ready if not _get_or_false(ray, r) or not refs[r][1].is_file()]
            for r in late:
                ray.cancel(r, force=True)
            if blind:
                raise ConfigError("--out", f"{folder} is not shared with every node of the Ray cluster: "
                                           f"{', '.join(blind)} cannot see (or write) it. Put --out on a filesystem "
                                           "that every node mounts at the same path (NFS, a cluster filesystem)")
            if late:
                raise CSDError(f"node(s) {', '.join(refs[r][0] for r in late)} did not answer the check of the "
                               f"shared folder within {SHARED_CHECK_S:.0f} s (busy, or the pack is not installed "
                               "there?)")
        finally:
            for p in (probe, *answers):
                try:
                    p.unlink()
                except OSError:
                    pass

    def prepare(self, folder: Path) -> None:
        """Connect, and check that every node sees ``folder`` (before the batch writes anything into it)."""
        self.connected = self._connect()
        self.check_shared_folder(folder)

    def close(self) -> None:
        """Disconnect (and stop the cluster of --ray local) when ``prepare`` connected."""
        if self.connected:
            self.connected = False
            self.ray.shutdown()

    def run(self, specs: List[RunSpec], folder: Path, outputs, prior_over: dict,
            handle: Callable[[dict], None], stop_requested: Callable[[], bool]) -> bool:
        """Run every spec as a task; returns True when a signal stopped the batch."""
        ray = self.ray
        reporter_cls, task, _ = _remotes(ray)
        gpus = ray.cluster_resources().get("GPU", 0)
        resources = {"num_gpus": 1} if gpus else {"num_cpus": self.cpus_per_run}
        threads = None if gpus else self.cpus_per_run
        reporter = reporter_cls.options(num_cpus=0).remote()
        task = task.options(max_retries=self.retries, retry_exceptions=False, **resources)
        out_dict = dataclasses.asdict(outputs)
        refs = {task.remote(dataclasses.asdict(s), str(folder), out_dict, prior_over, threads, reporter): s
                for s in specs}
        ended, started, steps, training = set(), {}, {}, set()
        stopping, deadline = False, None

        def drain() -> None:
            for ev in ray.get(reporter.drain.remote()):
                run = ev.get("run")
                if run in ended:
                    continue
                if ev.get("type") == "start":
                    started[run] = started.get(run, 0) + 1
                    training.discard(run)
                    if started[run] > 1:  # Ray started it again: its worker died
                        where = f" at step {steps[run]}" if steps.get(run) is not None else ""
                        handle({"type": "requeue", "run": run, "step": steps.get(run),
                                "error": f"its worker died{where}; Ray started it again from its checkpoint "
                                         f"(attempt {started[run]} of {self.retries + 1})"})
                elif ev.get("type") in ("training", "progress"):
                    steps[run] = ev.get("step")
                    training.add(run)
                elif ev.get("type") == "end":
                    ended.add(run)
                handle(ev)

        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0.3)
                drain()
                for ref in ready:
                    spec = refs.pop(ref)
                    result = self._result(ref, spec, steps.get(spec.id))
                    if result is not None and spec.id not in ended:
                        ended.add(spec.id)
                        handle(result)
                if stop_requested():
                    for ref, spec in refs.items():
                        # a run that trains saves its checkpoint when cancelled; one that has not started training
                        # has nothing to save, and its worker is stopped at once; a second signal forces every
                        # run (the last periodic checkpoints stay)
                        ray.cancel(ref, force=stopping or spec.id not in training)
                    stopping, deadline = True, time.monotonic() + STOP_WAIT_S
                if stopping and time.monotonic() > deadline:
                    break
            drain()
        finally:
            ray.kill(reporter)
        return stopping

    def _result(self, ref, spec: RunSpec, step) -> Optional[dict]:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return None  # stopped: its "interrupted" end came through the reporter (or it never started)
        except ray.exceptions.RayTaskError as e:  # raised in the task, outside the run (which catches its own)
            cause = getattr(e, "cause", None)
            text = f"{type(cause).__name__}: {cause}" if cause is not None else _ANSI.sub("", str(e))
            return {"type": "end", "run": spec.id, "status": "failed", "step": step,
                    "error": f"the Ray task failed: {text.strip().splitlines()[-1][:300]}"}
        except ray.exceptions.RayError as e:  # its worker died on every attempt, a node was lost, ...
            first = _ANSI.sub("", str(e)).strip().splitlines()[0] if str(e).strip() else ""
            return {"type": "end", "run": spec.id, "status": "failed", "step": step,
                    "error": f"{type(e).__name__} after {self.retries + 1} attempt(s): {first[:300]}"}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _get_or_false(ray, ref) -> bool:
    try:
        return bool(ray.get(ref))
    except Exception:  # noqa: BLE001 - a node that fails the check does not see the folder
        return False
