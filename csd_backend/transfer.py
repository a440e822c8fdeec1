"""Host → device copies without a host sync (``optimize.py``, the volume renderer)."""
from __future__ import annotations

import torch


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """``t.to(device)`` without a host sync: a CPU tensor bound for CUDA is copied through pinned memory with
    ``non_blocking`` (a plain copy from pageable memory waits for the GPU to finish its queue). The values are
    the same; on the CPU this is ``t.to(device)``."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
