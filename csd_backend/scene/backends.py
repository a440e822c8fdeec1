"""Accelerator backends (DESIGN §2: backends of a part, same interface and parameters).

Hash-grid encoding (``scene.encoding_backend``):

- ``torch``: the reference :class:`HashGridEncoding`.
- ``compiled``: :class:`CompiledHashGridEncoding`, the reference's math (``encoding.hash_grid_features``) through
  ``torch.compile`` (Triton kernels on CUDA, C++ on the CPU): all levels' gathers, weights and sums fuse, and so
  does the backward (the scatter of the gradient into the tables). Same ``params``, so checkpoints move between
  backends. Dynamic in the number of points (one graph for every step's sample count; inputs of 0 or 1 point
  use the reference), and every level is evaluated with the inactive ones masked to zero, so the progressive band
  never recompiles. Gradients with respect to the points go through the Jacobian the compiled graph returns
  (``encoding.JacobianLink``, as in the reference): analytic normals and their second-order gradients reach the
  parameters; the second derivatives with respect to the points themselves are dropped (nothing trains the
  sample points).
- ``tcnn``: tiny-cuda-nn's fused ``HashGrid`` with the *same* flat parameter vector (``params``, level-major,
  tinycudann's layout). tinycudann is not on PyPI: it is built from source on a CUDA machine.
- ``auto``: on CUDA tcnn when it imports and runs a trial call, else compiled when a trial compile works, else
  torch (with one warning naming the cause); on the CPU the run decides (``auto_backends.py``: compiled for runs
  long enough to repay the first compile, such as csd-coarse; 1.2-1.3x a step there, ``benchmarks/bench_step.py
  --backends torch,compiled``), and a part built outside a run takes torch.

The volume renderer's compositing (``render.backend``: auto | torch | compiled) resolves the same way (``compiling.py``).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from ..compiling import compiled, resolve_compiled_backend
from ..errors import ConfigError
from .encoding import CORNERS, HashGridEncoding, JacobianLink, hash_grid_features

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
            enc(torch.linspace(0, 1, 24, device=f"cuda:{device_index}").view(8, 3))  # no draw: keeps the seed
        return True
    except Exception:  # ImportError, OSError (CUDA_HOME), RuntimeError (arch mismatch)
        return False


class TcnnHashGridEncoding(nn.Module):
    """tinycudann HashGrid with this package's parameter name and layout (``params``); output float32."""

    backend_name = "tcnn"

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


# ------------------------------------------------------------------------------------------- compiled hash grid
class CompiledHashGridEncoding(HashGridEncoding):
    """:class:`HashGridEncoding` (same parameters, layout and ``state_dict``) evaluated by a compiled graph."""

    backend_name = "compiled"

    def __init__(self, n_levels: int = 16, n_features_per_level: int = 2, log2_hashmap_size: int = 19,
                 base_resolution: int = 16, per_level_scale: float = 1.447269237440378):
        super().__init__(n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale)
        self.levels = self.level_specs()
        # on the module's device, so the forward never copies from the host (a sync on CUDA)
        self.register_buffer("corners", CORNERS.clone(), persistent=False)
        # the level of each output feature, to mask the inactive ones on the device (no host copy)
        self.register_buffer("feature_level", torch.arange(n_levels).repeat_interleave(n_features_per_level),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, 3] in [0, 1] → [N, L·F]
        if x.shape[0] < 2:  # sizes 0 and 1 would specialise the graph (a recompile): the reference does them
            return super().forward(x)
        mask = (self.feature_level < self.active_levels).to(x.dtype)  # [L·F]
        with_jacobian = x.requires_grad and torch.is_grad_enabled()
        xd = x.detach() if with_jacobian else x
        torch._dynamo.maybe_mark_dynamic(xd, 0)
        fn = compiled(hash_grid_features, "scene.encoding_backend", levels=self.levels, n_features=self.n_features,
                      with_jacobian=with_jacobian)
        if not with_jacobian:
            return fn(xd, self.params, mask, self.corners)
        feats, jac = fn(xd, self.params, mask, self.corners)
        return JacobianLink.apply(feats, jac, x)


def make_hash_grid(n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale,
                   backend: str = "auto", device: Optional[torch.device] = None) -> nn.Module:
    device = torch.device(device) if device is not None else torch.device("cpu")
    on_cuda = device.type == "cuda"
    index = device.index if device.index is not None else (torch.cuda.current_device() if on_cuda else 0)
    field = "scene.encoding_backend"
    if backend == "tcnn" or (backend == "auto" and on_cuda and tcnn_available(index)):
        if not on_cuda:
            raise ConfigError(field, f"'tcnn' runs on CUDA only, but the scene is on {device}; "
                                     "use 'torch', 'compiled' or 'auto'")
        if not tcnn_available(index):
            raise ConfigError(field, f"'tcnn' was asked for but is not usable here: {TCNN_HINT}")
        return TcnnHashGridEncoding(n_levels, n_features_per_level, log2_hashmap_size, base_resolution,
                                    per_level_scale, device)
    if backend not in ("auto", "torch", "compiled", "tcnn"):
        raise ConfigError(field, f"{backend!r} is not one of 'auto', 'torch', 'compiled', 'tcnn'")
    args = (n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale)
    if resolve_compiled_backend(field, backend, device) == "compiled":
        return CompiledHashGridEncoding(*args)
    return HashGridEncoding(*args)
