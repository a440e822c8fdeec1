"""One run of a batch inside a worker (a local worker process or a Ray task).

The run folder decides how the run goes on, so a retried or resumed run needs no other state: a folder with a
checkpoint (or at least its ``config.json``) continues from it exactly as ``generate --resume`` does; an empty or
missing folder starts the run; a finished run whose views and mesh are there is only reported. The run itself is
``generate``'s code (``runs.life.start_run`` / ``continue_run`` / ``train_run``, ``runs.outputs.finish_run``), with a prior that the
worker loads once and keeps for the next runs.

``execute`` reports ``start``, ``training``, ``progress`` and ``log`` events through ``report(event)`` and returns
the ``end`` event (an interrupted run reports its ``end`` too, since it cannot return it).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Tuple

from ..errors import CheckpointError, CSDError
from ..runs.lock import LOCK_FILE, RunLock
from .plan import RunSpec

#: at most one progress event per run this often (and always on the last step)
PROGRESS_EVERY_S = 0.25
#: prior settings a run may continue with when they differ from its saved ones (as ``generate --resume``)
PRIOR_FREE = ("model", "model_config", "device", "dtype")


class PriorCache:
    """The prior of a worker: loaded for the first run, reused while the next runs ask for the same settings."""

    def __init__(self):
        self.key: Optional[str] = None
        self.prior = None
        self.loads = 0

    def get(self, cfg) -> Tuple[object, str, float]:
        """(prior, "loaded" or "reused", seconds spent loading)."""
        from ..priors import load_prior

        key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
        if key == self.key and self.prior is not None:
            return self.prior, "reused", 0.0
        self.prior = self.key = None
        _free_memory()
        t0 = time.perf_counter()
        self.prior = load_prior(cfg)
        self.key = key
        self.loads += 1
        return self.prior, "loaded", time.perf_counter() - t0


#: the prior of this process: Ray runs many tasks in one worker process, which then share it
WORKER_PRIORS = PriorCache()


def execute(spec: RunSpec, batch_dir: Path, outputs, report: Callable[[dict], None],
            priors: Optional[PriorCache] = None, device: Optional[str] = None,
            prior_over: Optional[dict] = None) -> dict:
    """Run ``spec`` into ``batch_dir/spec.folder`` and return its ``end`` event (status done or failed).
    ``device``: this worker's device, used when the run's device is ``auto``; ``prior_over``: prior settings
    given to ``batch --resume`` (--model, --device, ...). KeyboardInterrupt (Ctrl-C, SIGTERM, Ray's cancel)
    propagates once the run's checkpoint is saved, after an ``end`` event with status interrupted."""
    from ..runs.life import train_run
    from ..runs.outputs import finish_run

    priors = priors if priors is not None else WORKER_PRIORS
    batch_dir = Path(batch_dir)
    out = batch_dir / spec.folder
    t0 = time.perf_counter()
    state = {"opt": None, "step": None, "total": spec.config.get("optim", {}).get("steps")}
    report({"type": "start", "run": spec.id, "pid": os.getpid(), "host": socket.gethostname(),
            "device": device or _auto_device()})
    forward = _ForwardWarnings(report, spec.id)
    logger = logging.getLogger("csd_backend")
    logger.addHandler(forward)

    def end(status: str, **extra) -> dict:
        opt = state["opt"]
        step = (opt.saved_step if status == "interrupted" else opt.step) if opt is not None else state["step"]
        return {"type": "end", "run": spec.id, "status": status, "step": step,
                "total": opt.config.optim.steps if opt is not None else state["total"],
                "seconds": round(time.perf_counter() - t0, 3), **extra}

    lock = None
    try:
        over = dict(prior_over or {})
        config = spec.run_config()
        if device and config.prior.device == "auto" and "device" not in over:
            over["device"] = device
        config = config.replace(prior=over) if over else config
        prior, how, load_s = priors.get(config.prior)
        lock = RunLock(out, f"batch run {spec.id} (pid {os.getpid()})")
        opt, resumed = _open_run(spec, out, config, prior, lock)
        state["opt"] = opt
        start = opt.step
        total = opt.config.optim.steps
        report({"type": "training", "run": spec.id, "step": opt.step, "total": total, "resumed": resumed,
                "prior": how, "prior_seconds": round(load_s, 3)})
        expected = outputs.expected_files(out)
        if opt.step >= total and expected and all(p.exists() for p in expected):
            # finished before (its worker died after writing the outputs): nothing to redo
            return end("done", outputs=_relative(batch_dir, out, {"renders": sorted((out / "renders").glob("*.png")),
                                                                  "mesh": expected[-1] if outputs.mesh else None}))
        last = [0.0]

        def on_step(info):
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or info.step == info.total:
                last[0] = now
                report({"type": "progress", "run": spec.id, "step": info.step, "total": info.total})

        scene = train_run(opt, out, quiet=True, on_step=on_step)
        written = finish_run(scene, opt, out, outputs, say=forward.echo, only_missing=opt.step == start)
        return end("done", outputs=_relative(batch_dir, out, written))
    except KeyboardInterrupt:
        report(end("interrupted", error="stopped; the run resumes from its checkpoint"))
        raise
    except CSDError as e:
        return end("failed", error=str(e))
    except Exception as e:  # noqa: BLE001 - one failed run must not stop the others; the manifest says why
        return end("failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=20))
    finally:
        if lock is not None:
            lock.release()
        logger.removeHandler(forward)
        state["opt"] = None
        _free_memory()


def _open_run(spec: RunSpec, out: Path, config, prior, lock: RunLock):
    """(Optimization, resumed?) of the run folder ``out``, locked with ``lock``: continued when it holds a run,
    else started."""
    from ..optimize import RUN_CONFIG_FILE, run_checkpoint
    from ..runs.life import continue_run, start_run

    saved = out / RUN_CONFIG_FILE
    if out.is_dir() and (saved.is_file() or run_checkpoint(out) is not None):
        _check_same_run(spec, out)
        lock.acquire()
        over = {k: getattr(config.prior, k) for k in PRIOR_FREE}
        return continue_run(out, prior, prior_over=over, release_encoder=False), True
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise CheckpointError(f"{out} holds files but no run (no {RUN_CONFIG_FILE}, no checkpoint); move them away "
                              "and resume the batch")
    out.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    return start_run(config, prior, out, release_encoder=False), False


def _check_same_run(spec: RunSpec, out: Path) -> None:
    """A folder that holds another run (another prompt or seed) is never continued as this one."""
    from ..optimize import RUN_CONFIG_FILE, read_run_config

    if not (out / RUN_CONFIG_FILE).is_file():
        return  # stopped before config.json: the checkpoint's own config is checked by Optimization.resume
    read_run_config(out)  # a damaged config.json is refused (the error says what to do), as by generate --resume
    saved = json.loads((out / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
    prompt = saved.get("guidance", {}).get("prompt")
    seed = saved.get("optim", {}).get("seed")
    if prompt != spec.config["guidance"]["prompt"] or seed != spec.seed:
        raise CheckpointError(f"{out} holds the run of {prompt!r} with seed {seed}, not of {spec.prompt!r} with seed "
                              f"{spec.seed}; it is left alone")


def _relative(batch_dir: Path, out: Path, written: dict) -> dict:
    from ..optimize import RUN_CONFIG_FILE

    rel = lambda p: os.path.relpath(p, batch_dir)
    result = {"config": rel(out / RUN_CONFIG_FILE), "checkpoint": rel(out / "checkpoints" / "last.ckpt"),
              "renders": [rel(p) for p in written.get("renders", [])]}
    if written.get("mesh") is not None:
        result["mesh"] = rel(written["mesh"])
    return result


class _ForwardWarnings(logging.Handler):
    """The engine's warnings during a run, as ``log`` events for the driver to print."""

    def __init__(self, report, run: str):
        super().__init__(logging.WARNING)
        self.report, self.run = report, run

    def emit(self, record):
        try:
            self.report({"type": "log", "run": self.run, "level": record.levelname.lower(),
                         "message": record.getMessage()})
        except Exception:  # noqa: BLE001 - a warning that cannot be sent is not worth failing a run
            pass

    def echo(self, line: str) -> None:
        """``finish_run``'s lines: its warnings are sent, "mesh: ..." lines are not (the manifest has the path)."""
        if line.startswith("warning: "):
            self.report({"type": "log", "run": self.run, "level": "warning", "message": line[len("warning: "):]})


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
