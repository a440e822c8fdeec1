"""What a user sees of a command on the terminal: progress bars on stderr (training, views, each export stage),
the engine's warnings as ``warning: ...`` lines, and the silence of third-party loaders under ``--quiet``."""
from __future__ import annotations

import contextlib
import logging
import os
import sys

from .stopping import raise_pending


def bar(quiet: bool, **kwargs):
    """A tqdm progress bar on stderr, or None with --quiet (or without tqdm)."""
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(file=sys.stderr, dynamic_ncols=True, **kwargs)


def training_bar(total: int, start: int, quiet: bool):
    """``(bar, update(info))``: the "training" bar from step ``start`` of ``total`` (loss and shading shown)."""
    b = bar(quiet, total=total, initial=start, unit="step", desc="training")
    if b is None:
        return None, lambda info: None

    def update(info):
        b.update(1)
        b.set_postfix(loss=f"{info.losses['total']:.4f}", shading=info.shading)
    return b, update


class StageBars:
    """``progress(fraction, stage)`` for ``extract_textured_mesh``: one bar per export stage."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.stage = None

    def __call__(self, fraction: float, stage: str) -> None:
        from ..export.pipeline import stage_fraction

        raise_pending()

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = bar(self.quiet, total=100, desc=stage, unit="%",
                           bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}]")
        if self.bar is not None:
            n = int(round(100 * stage_fraction(fraction, stage)))
            if n > self.bar.n:
                self.bar.update(n - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(100 - self.bar.n)
            self.bar.close()
            self.bar = None


class _ConversionBar:
    """``progress(fraction)`` of a conversion, drawn as one bar; ``close()`` ends the line (also after a failure)."""

    def __init__(self, b):
        self.bar = b

    def __call__(self, fraction: float) -> None:
        raise_pending()
        n = int(round(100 * min(max(fraction, 0.0), 1.0)))
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def conversion_bar(scene, cfg, quiet: bool):
    """A "conversion" bar (``progress(fraction)``, then ``close()``) when a run starts by converting ``scene``
    (stage 2 from a volume: seconds to a minute); None otherwise."""
    from ..scene_kinds import converts

    if not converts(scene, cfg):
        return None
    b = bar(quiet, total=100, desc=f"{scene.kind} -> {cfg.kind}", unit="%",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}]")
    return None if b is None else _ConversionBar(b)


def echo(message: str) -> None:
    """A line for the user on stderr."""
    print(message, file=sys.stderr)


def quiet_third_party() -> None:
    """``--quiet``: no "Loading weights" bars or advice from diffusers / transformers / huggingface_hub."""
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dl

        dl.set_verbosity_error()
        dl.disable_progress_bar()
    except Exception:  # pragma: no cover - an old or missing diffusers: nothing to silence
        pass
    try:
        import transformers.utils.logging as tl

        tl.set_verbosity_error()
        tl.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class LevelFormatter(logging.Formatter):
    def format(self, record):
        return f"{record.levelname.lower()}: {record.getMessage()}"


@contextlib.contextmanager
def engine_warnings():
    """The engine's warnings (logger ``csd_backend``) as ``warning: ...`` lines on stderr."""
    logger = logging.getLogger("csd_backend")
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(LevelFormatter())
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
