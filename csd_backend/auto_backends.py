"""What ``auto`` means for the volume path's backends on a CPU (``scene.encoding_backend``, ``render.backend``): the
compiled kernels when the run is long enough to repay their first compile, else the torch reference.

On CUDA ``auto`` is decided where each backend is built (``compiling.resolve_compiled_backend``: compiled when a
trial compile works). On a CPU the answer depends on the run: a first compile (C++ kernels through inductor) costs
30-60 s on 2 cores, and the compiled path gains only on large steps now that the reference's hash grid has its
own backward (issue 26). Measured on the 2-core development machine, 1 torch thread: the ``preview-cpu`` demo (150
steps, 59 M ray samples, ``--views 0 --no-mesh``) took 19.3 / 18.3 s on the torch path, 50.6 s compiled with an
empty inductor cache and 19.9 s with the cache of an earlier run (no gain a step: its grid is small); a
``csd-coarse`` step (``benchmarks/bench_step.py``, 2.1 M ray samples a view) saves 0.29 s at batch 1 (1.59 → 1.30
s) and 1.46 s at batch 4 (6.27 → 4.80 s), so a cold compile is repaid after 100-200 batch-1 steps or 20-40 batch-4
steps: 0.2-0.4 G planned ray samples. ``CPU_COMPILE_BREAK_EVEN`` is 0.5 G: ``csd-coarse`` (10,000 steps at batch
4, 512 samples per ray: 84 G) compiles; tests, the demos and short runs stay on the reference.

The decision uses the run's planned work (its configuration), never timings, so a seed gives the same run on the
same machine every time, and a resumed run takes the path it started on. The run's ``config.json`` keeps ``auto``
and records the backends that ran under ``resolved``. A CPU whose trial compile fails (no C++ compiler) runs the
torch path with one warning.
"""
from __future__ import annotations

import logging

import torch

from .compiling import compile_problem
from .config import RunConfig

log = logging.getLogger(__name__)

#: ray samples (steps x views x height x width x samples per ray, over the run's size phases) from which the
#: compiled volume path repays a cold compile on a CPU (module docstring: csd-coarse-sized steps)
CPU_COMPILE_BREAK_EVEN = 500e6
_FIELDS = (("scene", "encoding_backend"), ("render", "backend"))


def planned_ray_samples(config: RunConfig) -> float:
    """The most ray samples the run's renders can take: over each size phase, steps x views x pixels x samples per
    ray (empty-space skipping keeps fewer)."""
    c = config.camera
    bounds = [0] + [m for m in c.resolution_milestones if m < config.optim.steps] + [config.optim.steps]
    total = 0.0
    for start, end in zip(bounds, bounds[1:]):
        batch, height, width = c.size_at(start)
        total += (end - start) * batch * c.n_views * height * width * config.render.num_samples_per_ray
    return total


def cpu_compiled_pays(config: RunConfig) -> bool:
    return planned_ray_samples(config) >= CPU_COMPILE_BREAK_EVEN


def resolve_auto_backends(config: RunConfig, device) -> RunConfig:
    """``config`` with the volume path's ``auto`` backends set to ``compiled`` where that pays on this CPU (module
    docstring); ``config`` itself where nothing changes (CUDA, other scene kinds, explicit backends, a short run,
    no compiler)."""
    device = torch.device(device)
    auto = [(section, name) for section, name in _FIELDS if getattr(getattr(config, section), name) == "auto"]
    if device.type != "cpu" or config.scene.kind != "volume" or not auto or not cpu_compiled_pays(config):
        return config
    problem = compile_problem("cpu")
    if problem is not None:
        log.warning("auto backends: this run is long enough for the compiled CPU kernels to pay, but torch.compile "
                    "does not work here (%s); using the slower torch path. Installing a C++ compiler (g++ or "
                    "clang) makes later runs about 2-6x faster per step", problem)
        return config
    log.info("auto backends: compiling the volume path's CPU kernels for this run (about a minute the first time; "
             "inductor's on-disk cache makes later runs start in seconds)")
    over: dict = {}
    for section, name in auto:
        over.setdefault(section, {})[name] = "compiled"
    return config.replace(**over)
