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


class Cancelled(CSDError):
    """The run was cancelled by a callback; the last checkpoint is kept."""
