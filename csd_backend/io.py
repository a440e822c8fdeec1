"""Files: atomic writes (with the process umask), never-overwrite output names, strict JSON, and run checkpoints
read with ``weights_only=True`` and verified against the content digest stored in them."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from .errors import CheckpointError, CSDError, DiskFullError, OutputExistsError, format_bytes

PathLike = Union[str, os.PathLike]
CHECKPOINT_FORMAT = "csd-run"
#: 1: no digest; 2: a content digest ("digest") over every other entry, verified on load
CHECKPOINT_VERSION = 2
DIGEST_ALGORITHM = "blake2b-256"
#: the checkpoint a run folder resumes from, and the one kept before it
LAST_CHECKPOINT = "last.ckpt"
PREVIOUS_CHECKPOINT = "previous.ckpt"

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ plain files
def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[str], None], overwrite: bool = False,
                 before_replace: Optional[Callable[[str], None]] = None) -> Path:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, then rename it into place.

    The file gets the mode a plain ``open(path, "w")`` would give it (0666 minus the umask), not the 0600 of
    temporary files. ``before_replace(tmp_path)`` runs after the data is on disk and before the rename (it may
    check the file and raise, which leaves ``path`` untouched). With ``overwrite=False`` an existing ``path``
    raises ``OutputExistsError`` (outputs are never replaced).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise OutputExistsError(f"{path} already exists; outputs are never overwritten. Choose another name or folder.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    except OSError as e:
        raise disk_full(e, path) or e
    os.close(fd)
    try:
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~current_umask())
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        except (OSError, RuntimeError) as e:
            full = disk_full(e, path)
            if full is None:
                raise
            raise full from e
        if before_replace is not None:
            before_replace(tmp)
        if not overwrite:
            # os.link fails if the target appeared meanwhile, so two writers cannot clobber each other
            try:
                os.link(tmp, path)
            except FileExistsError as e:
                raise OutputExistsError(f"{path} already exists; outputs are never overwritten.") from e
            except OSError:
                if path.exists():
                    raise OutputExistsError(f"{path} already exists; outputs are never overwritten.")
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


#: how torch's zip writer reports a short write (a full disk) in a RuntimeError
_WRITE_FAILED = ("unexpected pos", "file write failed", "No space left", "Disk quota exceeded")


def disk_full(exc: BaseException, path: PathLike) -> Optional[DiskFullError]:
    """A ``DiskFullError`` naming ``path`` and its disk's free space when ``exc`` is a failed write for lack of
    space (ENOSPC, a quota, or torch's "unexpected pos" of a short write); None for any other error."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if not (code in (errno.ENOSPC, errno.EDQUOT) or (isinstance(exc, RuntimeError)
                                                       and any(m in text for m in _WRITE_FAILED))):
        return None
    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    except OSError:
        free = -1
    why = "the disk is full" if code in (errno.ENOSPC, errno.EDQUOT) or free < 64 << 20 else \
        "the write failed (a full or failing disk)"
    return DiskFullError(f"could not write {path}: {why} ({format_bytes(free)} free on its disk)", path, free)


def non_finite_path(value: Any, where: str = "") -> Optional[str]:
    """The dotted path of the first NaN/±Infinity inside ``value`` (dicts, lists), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "value"
    if isinstance(value, dict):
        for k, v in value.items():
            found = non_finite_path(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = non_finite_path(v, f"{where}[{i}]")
            if found:
                return found
    return None


def write_json(path: PathLike, data: Any, overwrite: bool = False) -> Path:
    """Atomically write strict JSON (no NaN or Infinity, which other JSON readers reject)."""
    bad = non_finite_path(data)
    if bad is not None:
        raise CSDError(f"cannot write {Path(path).name}: {bad} is not a finite number (NaN and Infinity are not JSON)")
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)


def unique_path(folder: PathLike, stem: str, suffix: str) -> Path:
    """``folder/stem_00001.suffix`` with the first counter that does not exist yet."""
    folder = Path(folder)
    i = 1
    while True:
        p = folder / f"{stem}_{i:05d}{suffix}"
        if not p.exists():
            return p
        i += 1


# ---------------------------------------------------------------------------------------------- torch pickles
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def describe_unsafe_pickle(path: PathLike, exc: BaseException, what: str = "checkpoint") -> Optional[str]:
    """Our own message for torch's refusal to read ``path`` with ``weights_only=True``, or None when ``exc`` is
    not such a refusal.

    torch's text advises retrying with ``weights_only=False`` (which runs any code the file contains); this
    message never does. A file that needs a Python class or function is called what it is (a pickle with
    code, refused); any other refusal (an unknown opcode, a bad load key) means the pickle is damaged.
    """
    text = _ANSI.sub("", str(exc))
    if "weights_only" not in text and "WeightsUnpickler" not in text:
        return None
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m or "Unsupported global" in text:
        name = m.group(1) if m else "a Python object"
        return (f"{path} is not a plain-tensor {what}: it needs the Python object {name} to load, and a pickle "
                f"with Python objects can run arbitrary code when it is opened, so it is refused (files are only "
                f"read with weights_only=True). Use a .safetensors file or a {what} that holds only tensors.")
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    reason = " ".join(m.group(1).split()) if m else "it is not a valid tensor pickle"
    return (f"{path} could not be read as a plain-tensor {what} ({reason}); the file is damaged or not a "
            f"PyTorch {what}.")


def _short_error(exc: BaseException) -> str:
    text = describe_unsafe_pickle("the file", exc)
    if text is not None:
        return text
    first = _ANSI.sub("", str(exc)).strip().split("\n")[0]
    first = first.split(". This is an internal")[0]
    return f"{type(exc).__name__}: {first[:300]}"


# ------------------------------------------------------------------------------------------------ checkpoints
def _feed(h: "hashlib._Hash", value: Any) -> None:
    """Hash ``value`` in a canonical order: dict items sorted by key; tensors by dtype, shape and bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(f"D{len(value)};".encode())
        for k in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, k)
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)};".encode())
        for v in value:
            _feed(h, v)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(f"S{len(data)};".encode())
        h.update(data)
    else:  # int, float, bool, None, bytes, torch.dtype, ...
        text = f"{type(value).__name__}:{value!r}".encode()
        h.update(f"V{len(text)};".encode())
        h.update(text)


def checkpoint_digest(payload: Dict[str, Any]) -> str:
    """The content digest of a checkpoint payload (every entry but ``digest`` itself)."""
    h = hashlib.blake2b(digest_size=32)
    _feed(h, {k: v for k, v in payload.items() if k != "digest"})
    return h.hexdigest()


#: files this process wrote or read and verified: path → (device, inode, size, mtime) at that time
_VERIFIED: Dict[str, Tuple[int, int, int, int]] = {}


def _signature(path: Path) -> Optional[Tuple[int, int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _remember_good(path: Path) -> None:
    sig = _signature(path)
    if sig is not None:
        _VERIFIED[str(Path(path).absolute())] = sig


def _known_good(path: Path) -> bool:
    sig = _signature(path)
    return sig is not None and _VERIFIED.get(str(Path(path).absolute())) == sig


def previous_path(path: PathLike) -> Path:
    """Where the checkpoint replaced by a save of ``path`` is kept: ``previous.ckpt`` beside ``last.ckpt``."""
    p = Path(path)
    return p.with_name(PREVIOUS_CHECKPOINT) if p.name == LAST_CHECKPOINT else p.with_name(f"{p.stem}.previous{p.suffix}")


def _is_good_checkpoint(path: Path) -> bool:
    if _known_good(path):
        return True
    try:
        load_checkpoint(path)
    except CheckpointError:
        return False
    return True


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> Path:
    """Atomically (re)write a run checkpoint with a content digest.

    The new file is written beside ``path``, read back and verified before it replaces ``path``; the checkpoint
    it replaces is kept as ``previous.ckpt`` (when it is intact). A write that does not read back identically
    raises ``CheckpointError`` and leaves both files as they were.
    """
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    payload.pop("digest", None)
    digest = checkpoint_digest(payload)
    payload["digest"] = {"algorithm": DIGEST_ALGORITHM, "value": digest}

    def verify_and_rotate(tmp: str) -> None:
        try:
            data = torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
            ok = (isinstance(data, dict) and data.get("digest", {}).get("value") == digest
                  and checkpoint_digest(data) == digest)
            del data
        except Exception as e:  # noqa: BLE001 - any failure to read back is a failed write
            raise CheckpointError(f"the checkpoint written for {path} could not be read back ({_short_error(e)}); "
                                  f"{path.name} was left as it was") from e
        if not ok:
            raise CheckpointError(f"the checkpoint written for {path} did not read back identically (a disk or "
                                  f"memory error?); {path.name} was left as it was")
        if path.is_file():
            prev = previous_path(path)
            if _is_good_checkpoint(path):
                _rotate(path, prev)
            else:
                log.warning("%s was damaged; it is replaced by the new checkpoint and %s is kept", path, prev.name)

    atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=True, before_replace=verify_and_rotate)
    _remember_good(path)
    return path


def _rotate(path: Path, prev: Path) -> None:
    """Make ``prev`` the file now at ``path`` while ``path`` stays in place (a hard link, renamed over ``prev``)."""
    tmp = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(path, tmp)
        os.replace(tmp, prev)
    except OSError:  # no hard links here: move it (the new file follows at once)
        if tmp.exists():
            tmp.unlink()
        os.replace(path, prev)
    _remember_good(prev)


def find_checkpoint(path: PathLike) -> Path:
    """A checkpoint file, or the last checkpoint of a run folder."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "checkpoints" / LAST_CHECKPOINT, p / LAST_CHECKPOINT, p / "checkpoints" / PREVIOUS_CHECKPOINT):
            if cand.is_file():
                return cand
        raise CheckpointError(f"no checkpoint in {p}: looked for checkpoints/last.ckpt and last.ckpt. "
                              "Pass the run folder written by `generate --out` or a .ckpt file.")
    if p.exists() and not p.is_file():
        raise CheckpointError(f"{p} is not a checkpoint file or a run folder.")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist. Pass the run folder written by `generate --out` "
                              "or a .ckpt file inside it.")
    return p


def _fallback_hint(p: Path) -> str:
    """What is left after ``p`` turned out damaged: the checkpoint before it, only when that one is intact."""
    prev = previous_path(p)
    if prev == p or not prev.is_file():
        return "No earlier checkpoint of this run is kept; start a new run."
    if not _is_good_checkpoint(prev):
        return f"The checkpoint before it ({prev.name}) is damaged too: no intact checkpoint is left; start a new run."
    return (f"The checkpoint before it is intact: resume from it with: python -m csd_backend generate --resume "
            f"{shlex.quote(str(prev))} (in ComfyUI: copy {prev.name} over {p.name}).")


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read a run checkpoint (``weights_only=True``) and verify its content digest."""
    p = find_checkpoint(path)
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, not a torch file, or a pickle with Python objects
        unsafe = describe_unsafe_pickle(p, e)
        if unsafe is not None and "needs the Python object" in unsafe:
            raise CheckpointError(unsafe) from None
        raise CheckpointError(f"could not read checkpoint {p}: {_short_error(e)}. The file is truncated or "
                              f"damaged. {_fallback_hint(p)}") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not a CSD run checkpoint (no '{CHECKPOINT_FORMAT}' header).")
    version = data.get("version", 0)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{p} was written by a newer version (format {version}); update the pack.")
    if version >= 2:
        stored = data.get("digest")
        value = stored.get("value") if isinstance(stored, dict) else None
        if not isinstance(value, str):
            raise CheckpointError(f"checkpoint {p} has no content checksum although its format ({version}) has "
                                  f"one: it was altered. {_fallback_hint(p)}")
        if checkpoint_digest(data) != value:
            raise CheckpointError(f"checkpoint {p} is damaged: its content does not match the checksum stored in "
                                  f"it (the file changed after it was written: a disk error, an incomplete copy or "
                                  f"an edit), so it is not used. {_fallback_hint(p)}")
    _remember_good(p)
    return data
