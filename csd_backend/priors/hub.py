"""The Hugging Face hub as the loaders see it: hub ids, the cache folder, offline mode and whether the hub answers.

Shared by every loader that takes a hub id (Stable Diffusion, DeepFloyd IF) so that their errors say the same
thing about the same situation.
"""
from __future__ import annotations

import os
import re
import socket
import threading
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
