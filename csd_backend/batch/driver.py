"""The driver of ``batch``: plan (or reload) the runs, hand them to a runner (local workers or Ray), turn the
workers' events into manifest lines and a progress display, and end with a summary table and an exit code.

Exit codes: 0 every run finished, 1 some run failed (the others finished; the manifest says why), 2 bad input
(nothing ran), 130 / 143 stopped by Ctrl-C / SIGTERM (every run resumes with ``batch --resume DIR``).
"""
from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..errors import ConfigError
from ..runs.folders import check_out_dir, quoted, remove_empty
from ..runs.outputs import RunOutputs
from ..runs.progress import bar
from ..runs.stopping import deferred, stopped, take_pending
from .manifest import Manifest, outputs_exist
from .plan import PLAN_FILE, BatchPlan, RunSpec, absolute_model_paths, plan_runs
from .prompts_file import read_prompts

#: flags that ``batch --resume`` takes (everything else is the batch's saved plan)
RESUME_FREE = ("workers", "ray", "retries", "cpus_per_run", "quiet", "model", "model_config", "device", "dtype")
#: width of the error column of the summary table
ERROR_WIDTH = 70


class Display:
    """One summary bar for the whole batch (steps of every run, with counts of runs by state) and a line per run
    as it starts and ends; --quiet keeps the lines."""

    def __init__(self, total_steps: int, runs: int, quiet: bool):
        self.bar = bar(quiet, total=total_steps, unit="step", desc="batch")
        self.steps: Dict[str, int] = {}
        self.runs = runs

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def step(self, run: str, step: Optional[int]) -> None:
        if step is None or self.bar is None:
            return
        delta = step - self.steps.get(run, 0)
        self.steps[run] = step
        if delta > 0:
            self.bar.update(delta)

    def counts(self, counts: Counter) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(f"{counts[k]} {k}" for k in ("done", "running", "failed") if counts[k])
                                     + f" of {self.runs}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Driver:
    """Events of the workers → manifest lines (only the driver writes the manifest) and the display."""

    def __init__(self, folder: Path, plan: BatchPlan, todo: List[RunSpec], manifest: Manifest, display: Display,
                 on_event: Optional[Callable[[dict], None]] = None):
        self.folder, self.manifest, self.display, self.on_event = folder, manifest, display, on_event
        self.specs = {s.id: s for s in plan.runs}
        self.total = len(plan.runs)
        self.state: Dict[str, dict] = dict(manifest.latest())
        self.attempts: Counter = Counter()
        self.workers: Dict[str, str] = {}
        self.todo = [s.id for s in todo]

    def record(self, spec: RunSpec, status: str, **fields) -> None:
        prev = self.state.get(spec.id, {})
        rec = {"run": spec.id, "index": spec.index, "prompt": spec.prompt, "seed": spec.seed, "status": status,
               "step": fields.pop("step", prev.get("step")), "steps": fields.pop("steps", prev.get("steps")),
               "seconds": None, "outputs": None, "error": None, **fields}
        self.state[spec.id] = self.manifest.append(rec)
        self.display.counts(Counter(r["status"] for r in self.state.values()))

    def label(self, spec: RunSpec) -> str:
        return f"[{spec.index}/{self.total}] {spec.id}"

    def handle(self, ev: dict) -> None:
        if self.on_event is not None:
            self.on_event(ev)
        spec = self.specs.get(ev.get("run"))
        if spec is None:
            return
        kind = ev.get("type")
        if kind == "start":
            self.attempts[spec.id] += 1
            self.workers[spec.id] = " ".join(str(x) for x in (ev.get("host"), f"pid {ev.get('pid')}",
                                                                  ev.get("device")) if x)
        elif kind == "training":
            self.record(spec, "running", step=ev.get("step"), steps=ev.get("total"), attempt=self.attempts[spec.id],
                        worker=self.workers.get(spec.id), prior=ev.get("prior"))
            self.display.step(spec.id, ev.get("step"))
            how = f"resumed at step {ev.get('step')}" if ev.get("resumed") else "started"
            self.display.write(f"{self.label(spec)}: {how} on {self.workers.get(spec.id, 'a worker')} "
                               f"(model {ev.get('prior')})")
        elif kind == "progress":
            self.display.step(spec.id, ev.get("step"))
        elif kind == "log":
            self.display.write(f"{ev.get('level', 'warning')}: {spec.id}: {ev.get('message')}")
        elif kind == "requeue":
            self.record(spec, "pending", step=ev.get("step"), error=ev.get("error"))
            self.display.write(f"{self.label(spec)}: {ev.get('error')}")
        elif kind == "end":
            status = ev.get("status", "failed")
            fields = {k: ev[k] for k in ("seconds", "outputs", "error", "traceback") if ev.get(k) is not None}
            self.record(spec, status, step=ev.get("step"), steps=ev.get("total") or self.state.get(spec.id, {}).get(
                "steps"), attempt=self.attempts[spec.id] or None, worker=self.workers.get(spec.id), **fields)
            self.display.step(spec.id, ev.get("step") if status == "done" else None)
            if status == "done":
                self.display.write(f"{self.label(spec)}: done, {ev.get('step')} steps in {ev.get('seconds', 0):.1f} s")
            else:
                self.display.write(f"{self.label(spec)}: {status}: {ev.get('error')}")

    def close_unfinished(self) -> None:
        """Runs that started and have no end (a worker that vanished): recorded as interrupted, resumable."""
        for run in self.todo:
            rec = self.state.get(run)
            if rec is not None and rec.get("status") == "running":
                self.record(self.specs[run], "interrupted", error="stopped; the run resumes from its checkpoint",
                            attempt=rec.get("attempt"), worker=rec.get("worker"))

    def summary(self) -> Counter:
        """The table of every run (stdout) and the counts by status."""
        rows = []
        counts: Counter = Counter()
        for run, spec in self.specs.items():
            rec = self.state.get(run, {})
            status = rec.get("status", "pending")
            counts[status] += 1
            step, steps = rec.get("step"), rec.get("steps") or spec.config.get("optim", {}).get("steps")
            seconds = rec.get("seconds")
            outputs = rec.get("outputs") or {}
            result = (outputs.get("mesh") or outputs.get("checkpoint") or "") if status == "done" else (
                rec.get("error") or "")
            if len(result) > ERROR_WIDTH:
                result = result[:ERROR_WIDTH - 3] + "..."
            rows.append((run, status, str(spec.seed), f"{'?' if step is None else step}/{steps}",
                         "" if seconds is None else f"{seconds:.1f} s", result))
        head = ("run", "status", "seed", "steps", "time", "mesh / error")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for r in [head, *rows]:
            print("  ".join(c.ljust(w) if i in (0, 1, 5) else c.rjust(w) for i, (c, w) in
                            enumerate(zip(r, widths))).rstrip())
        return counts


def make_runner(args):
    retries = 2 if args.retries is None else args.retries
    if args.ray:
        if args.workers is not None:
            raise ConfigError("--workers", "is for local workers; on Ray every GPU runs one run at a time (or "
                                           "--cpus-per-run CPUs on a cluster without GPUs)")
        from .ray_runner import RayRunner

        return RayRunner(args.ray, retries=retries, cpus_per_run=args.cpus_per_run or 1)
    if args.cpus_per_run is not None:
        raise ConfigError("--cpus-per-run", "only applies with --ray; local workers share the cores out")
    from .local import LocalRunner

    return LocalRunner(args.workers, retries=retries)


def _new_batch(args):
    if args.prompts is None:
        raise ConfigError("PROMPTS", "give a file of prompts (one a line, or .jsonl), or --resume a batch folder")
    if not args.out:
        raise ConfigError("--out", "give the batch's output folder (it gets one run folder per run)")
    if not args.model:
        raise ConfigError("--model", "give the diffusion model (a diffusers folder, a .safetensors file, a hub id, "
                                     "toy or analytic)")
    folder = Path(args.out)
    if (folder / PLAN_FILE).exists():
        raise ConfigError("--out", f"{folder} already holds a batch; continue it with: python -m csd_backend batch "
                                   f"--resume {quoted(folder)}")
    if folder.is_dir() and any(folder.iterdir()):
        raise ConfigError("--out", f"{folder} exists and is not empty; outputs are never overwritten. Choose a new "
                                   "folder.")
    runs = plan_runs(read_prompts(args.prompts), args, Path(args.prompts).name)
    absolute_model_paths(runs)
    outputs = dataclasses.asdict(RunOutputs.from_args(args).validate())
    outputs.pop("quiet")
    return folder, BatchPlan(runs=runs, outputs=outputs, prompts=str(Path(args.prompts).resolve())), {}


def _resume_batch(args):
    given = [name for name, value in vars(args).items()
             if name not in RESUME_FREE and name not in ("command", "resume", "out")
             and value not in (None, False, [])]
    if given:
        flags = ", ".join("PROMPTS" if g == "prompts" else "--" + g.replace("_", "-") for g in given)
        raise ConfigError("--resume", f"a resumed batch keeps the settings it was planned with (its {PLAN_FILE}); "
                                      f"leave out {flags}. Only --workers, --ray, --retries, --cpus-per-run, "
                                      "--quiet, --model, --model-config, --device and --dtype may be given.")
    folder = Path(args.resume)
    if args.out is not None and Path(args.out).resolve() != folder.resolve():
        raise ConfigError("--out", f"{args.out} is not the batch being resumed ({folder}); leave --out out")
    plan = BatchPlan.load(folder)
    over = {k: getattr(args, k) for k in ("model", "model_config", "device", "dtype") if getattr(args, k)}
    for key in ("model", "model_config"):
        if key in over and Path(over[key]).exists() and over[key] != "toy":
            over[key] = str(Path(over[key]).resolve())
    return folder, plan, over


def cmd_batch(args, on_event: Optional[Callable[[dict], None]] = None) -> int:
    """``python -m csd_backend batch``. ``on_event(event)`` sees every event of the workers (for programs that
    embed the batch, and tests)."""
    folder, plan, prior_over = _resume_batch(args) if args.resume else _new_batch(args)
    runner = make_runner(args)
    manifest = Manifest(folder)
    # the folder is made (and checked) only now that the input is known to be good, and kept only once the
    # runner can use it (Ray: connected, and every node sees it)
    latest = manifest.latest()
    finished = {s.id for s in plan.runs if latest.get(s.id, {}).get("status") == "done"
                and outputs_exist(folder, latest[s.id])}
    todo = [s for s in plan.runs if s.id not in finished]
    created = [] if args.resume else check_out_dir(folder)
    try:
        if todo:
            runner.prepare(folder.resolve())
        if not args.resume:
            plan.save(folder)
            for spec in plan.runs:
                manifest.append({"run": spec.id, "index": spec.index, "prompt": spec.prompt, "seed": spec.seed,
                                 "status": "pending", "step": 0, "steps": spec.config["optim"]["steps"],
                                 "seconds": None, "outputs": None, "error": None, "line": spec.line})
    except BaseException:
        runner.close()
        remove_empty(created)
        raise
    try:
        return _run(args, folder, plan, todo, prior_over, runner, manifest, on_event)
    finally:
        runner.close()


def _run(args, folder: Path, plan: BatchPlan, todo: List[RunSpec], prior_over: dict, runner, manifest: Manifest,
         on_event) -> int:
    outputs = RunOutputs(**plan.outputs, quiet=True)
    finished = len(plan.runs) - len(todo)
    skip = f" ({finished} finished before)" if finished else ""
    print(f"batch of {len(plan.runs)} runs in {folder}: {len(todo)} to run{skip}, on {runner.describe()}",
          file=sys.stderr)
    display = Display(sum(s.config["optim"]["steps"] for s in todo), len(plan.runs), bool(args.quiet))
    driver = Driver(folder, plan, todo, manifest, display, on_event)
    was_stopped = False
    try:
        # a signal is only recorded (runs/stopping.py); the runner stops the workers cleanly when it asks
        with deferred(lambda: True):
            if todo:
                was_stopped = runner.run(todo, folder.resolve(), outputs, prior_over, driver.handle, take_pending)
    finally:
        display.close()
        driver.close_unfinished()
    counts = driver.summary()
    done = counts["done"]
    line = (f"{done} of {len(plan.runs)} runs finished" + (f", {counts['failed']} failed" if counts["failed"] else "")
            + f"; manifest: {manifest.path}")
    if was_stopped:
        return stopped(f"the batch ({line}). Every run resumes from its checkpoint: python -m csd_backend "
                            f"batch --resume {quoted(folder)}")
    print(line, file=sys.stderr)
    if done < len(plan.runs):
        print(f"to retry the runs that did not finish: python -m csd_backend batch --resume {quoted(folder)}",
              file=sys.stderr)
        return 1
    return 0
