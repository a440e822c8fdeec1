"""Encoding backends (DESIGN §2: backends of a part, same interface and parameters).

``torch`` is the reference :class:`HashGridEncoding`; ``tcnn`` wraps tiny-cuda-nn's fused ``HashGrid`` with the
*same* flat parameter vector (``params``, level-major, tinycudann's layout), so a checkpoint trained with one
loads into the other. ``auto`` takes tcnn when the scene lives on CUDA and tinycudann imports and runs a trial
call; otherwise torch. tinycudann is not on PyPI: it is built from source on a CUDA machine.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from .encoding import HashGridEncoding

TCNN_HINT = ("tinycudann is optional and needs CUDA; build it on a CUDA machine with "
             "`pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch`, "
             "or set scene.encoding_backend to 'torch' (always available)")


@functools.lru_cache(maxsize=None)
def tcnn_available(device_index: int = 0) -> bool:
    """tinycudann imports and encodes a few points on this CUDA device (nvcc without a GPU makes imports lie)."""
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann as tcnn

        with torch.cuda.device(device_index):
            enc = tcnn.Encoding(3, {"otype": "HashGrid", "n_levels": 2, "n_features_per_level": 2,
                                    "log2_hashmap_size": 10, "base_resolution": 4, "per_level_scale": 2.0})
            enc(torch.rand(8, 3, device=f"cuda:{device_index}"))
        return True
    except Exception:  # ImportError, OSError (CUDA_HOME), RuntimeError (arch mismatch)
        return False


class TcnnHashGridEncoding(nn.Module):
    """tinycudann HashGrid with this package's parameter name and layout (``params``); output float32."""

    def __init__(self, n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale,
                 device: torch.device):
        super().__init__()
        import tinycudann as tcnn

        config = {"otype": "HashGrid", "n_levels": n_levels, "n_features_per_level": n_features_per_level,
                  "log2_hashmap_size": log2_hashmap_size, "base_resolution": base_resolution,
                  "per_level_scale": per_level_scale}
        with torch.cuda.device(device):
            impl = tcnn.Encoding(3, config, dtype=torch.float32)
        reference = HashGridEncoding(n_levels, n_features_per_level, log2_hashmap_size, base_resolution,
                                     per_level_scale)
        if impl.params.numel() != reference.params.numel():
            raise ConfigError("scene.encoding_backend", f"tinycudann's HashGrid has {impl.params.numel()} parameters "
                                                        f"where the torch encoding has {reference.params.numel()}; "
                                                        "this tinycudann version uses another layout — use 'torch'")
        object.__setattr__(self, "_impl", impl)  # not a submodule: its parameter is ours, under the same name
        self.params = impl.params
        with torch.no_grad():
            self.params.copy_(reference.params.to(self.params))  # the same initialisation as the torch backend
        self.n_levels, self.n_features = n_levels, n_features_per_level
        self.n_output_dims = n_levels * n_features_per_level
        self.active_levels = n_levels

    def set_active_levels(self, n: int) -> None:
        """As the torch backend: levels past ``n`` output zeros (tinycudann evaluates them anyway)."""
        self.active_levels = max(1, min(int(n), self.n_levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._impl(x).float()
        if self.active_levels < self.n_levels:
            keep = self.active_levels * self.n_features
            out = torch.cat([out[:, :keep], out[:, keep:] * 0.0], -1)
        return out


def make_hash_grid(n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale,
                   backend: str = "auto", device: Optional[torch.device] = None) -> nn.Module:
    device = torch.device(device) if device is not None else torch.device("cpu")
    on_cuda = device.type == "cuda"
    index = device.index if device.index is not None else (torch.cuda.current_device() if on_cuda else 0)
    if backend == "tcnn" or (backend == "auto" and on_cuda and tcnn_available(index)):
        if not on_cuda:
            raise ConfigError("scene.encoding_backend", f"'tcnn' runs on CUDA only, but the scene is on {device}; "
                                                        "use 'torch' or 'auto'")
        if not tcnn_available(index):
            raise ConfigError("scene.encoding_backend", f"'tcnn' was asked for but is not usable here: {TCNN_HINT}")
        return TcnnHashGridEncoding(n_levels, n_features_per_level, log2_hashmap_size, base_resolution,
                                    per_level_scale, device)
    if backend not in ("auto", "torch", "tcnn"):
        raise ConfigError("scene.encoding_backend", f"{backend!r} is not one of 'auto', 'torch', 'tcnn'")
    return HashGridEncoding(n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale)
