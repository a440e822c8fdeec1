"""``DIR/manifest.jsonl``: the record of a batch, one JSON object a line, appended as runs start and end.

Every line is a complete record of one run at that moment: ``run`` (its folder name, relative to DIR),
``index``, ``prompt``, ``seed``, ``status`` (pending, running, done, failed, interrupted), ``step`` (steps done:
where it starts from on ``running``, where it stopped otherwise), ``steps`` (planned), ``seconds`` (of that
attempt), ``outputs`` (paths relative to DIR), ``error``, ``attempt``, ``worker`` and ``time``. The latest line
of a run is its state. Only the driver writes the file (workers report to it), one ``os.write`` of a whole line
on an ``O_APPEND`` descriptor followed by ``fsync``: a line is either entirely there or (after a crash in the
middle of a write) a torn last line that readers skip.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Dict, List

from ..errors import CSDError

MANIFEST_FILE = "manifest.jsonl"
STATUSES = ("pending", "running", "done", "failed", "interrupted")

log = logging.getLogger(__name__)


class Manifest:
    def __init__(self, folder: Path):
        self.path = Path(folder) / MANIFEST_FILE

    def append(self, record: dict) -> dict:
        """Append ``record`` (a ``time`` is added) as one line, durably."""
        from ..io import non_finite_path

        record = {**record, "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        bad = non_finite_path(record)
        if bad is not None:
            raise CSDError(f"cannot record {bad} = NaN/Infinity in {self.path.name}")
        data = (json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")
        new = not self.path.exists()
        if not new and not _ends_a_line(self.path):  # a line torn by a crash: start a new one
            data = b"\n" + data
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # minus the umask
        try:
            view = memoryview(data)
            while view:  # one write for a line (a regular file takes it whole); a short write is finished
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            _fsync_dir(self.path.parent)
        return record

    def records(self) -> List[dict]:
        """Every complete record, in order (a torn or foreign line is skipped with a warning)."""
        if not self.path.is_file():
            return []
        out = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is incomplete (a crash while it was written?); it is ignored", self.path, n)
                continue
            if isinstance(rec, dict) and isinstance(rec.get("run"), str):
                out.append(rec)
        return out

    def latest(self) -> Dict[str, dict]:
        """The state of every run: its latest record."""
        state: Dict[str, dict] = {}
        for rec in self.records():
            state[rec["run"]] = rec
        return state


def outputs_exist(folder: Path, record: dict) -> bool:
    """Whether every file a record lists as written is still there."""
    outputs = record.get("outputs") or {}
    paths = [p for v in outputs.values() for p in (v if isinstance(v, list) else [v]) if isinstance(p, str)]
    return bool(paths) and all((Path(folder) / p).exists() for p in paths)


def _ends_a_line(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return True
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
