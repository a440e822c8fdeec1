"""Typed errors raised at the engine's boundaries.

Every error names the field (or file) that is wrong and how to fix it, so that the command line and the
ComfyUI nodes can show the message as is, never a stack trace from deep inside torch.
"""
from __future__ import annotations


class CSDError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(CSDError, ValueError):
    """A configuration value is invalid. The message names the field and the fix."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ModelNotFoundError(CSDError, FileNotFoundError):
    """Model weights are missing: says what was looked for, where, and how to fix it."""


class CheckpointError(CSDError):
    """A run checkpoint is missing, unreadable or does not match the configuration."""


class OutputExistsError(CSDError, FileExistsError):
    """An output file already exists; outputs are never overwritten."""


class EmptySceneError(CSDError):
    """Nothing a training render shows depends on a trained parameter any more (the object vanished): the run cannot
    recover and stops; the last checkpoint is kept."""


class Cancelled(CSDError):
    """The run was cancelled by a callback; the last checkpoint is kept."""


class DiskFullError(CSDError, OSError):
    """A file could not be written because its disk is full (or failing): names the file and the free space.
    What was written before (the last checkpoint) is intact: writes go to a temporary file and are renamed."""

    def __init__(self, message: str, path=None, free: int = -1):
        self.path, self.free = path, free
        super().__init__(message)


def format_bytes(n: int) -> str:
    """``1536`` → ``"1.5 KB"`` (decimal units, as disk tools show them)."""
    if n < 0:
        return "unknown"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"  # pragma: no cover
