"""The Hugging Face hub as the loaders see it: hub ids, the cache folder, offline mode and whether the hub answers.

Shared by every loader that takes a hub id (Stable Diffusion, DeepFloyd IF) so that their errors say the same
thing about the same situation.
"""
from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from typing import Optional

#: ``owner/name``: what a hub id looks like (a local path that does not exist is reported as one or the other)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hf_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    try:
        from huggingface_hub import constants

        return env or bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub always comes with diffusers
        return env


def hf_cache_dir(cache_dir: Optional[str | os.PathLike]) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        return "~/.cache/huggingface/hub"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds (DNS included)."""
    host = re.sub(r"^[a-z]+://", "", hub_host()).split("/")[0]
    name, _, port = host.partition(":")
    ok = []

    def probe():
        try:
            socket.create_connection((name, int(port or 443)), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores socket timeouts: bound it here
    worker.start()
    worker.join(timeout)
    return bool(ok)


def hub_host() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except Exception:  # pragma: no cover
        return "https://huggingface.co"


def download_refusal(raw: str, local: Path, cache_dir, fix: str, what: str = "file or folder") -> Optional[str]:
    """Why the hub id ``raw``, which is not in the cache, cannot be downloaded now (an error text saying where it was
    looked for and ``fix``), or None when it can be: HF_HUB_OFFLINE is set, or the hub does not answer. ``local``:
    the path ``raw`` also names (it does not exist); ``what``: what such a path would be."""
    where = hf_cache_dir(cache_dir)
    if hf_offline():
        return (f"'{raw}' is neither a local path (no such {what}: {Path(local).resolve()}) nor a model in the "
                f"Hugging Face cache ({where}), and HF_HUB_OFFLINE is set so it cannot be downloaded. {fix}; or unset "
                "HF_HUB_OFFLINE.")
    if not hub_reachable():
        return (f"'{raw}' is not in the Hugging Face cache ({where}) and there is no network: the hub ({hub_host()}) "
                f"did not answer within 3 s, so it cannot be downloaded. It is not a local path either (no such "
                f"{what}: {Path(local).resolve()}). {fix}.")
    return None
