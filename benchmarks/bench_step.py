"""Per-step time split: render forward, prior (VAE encode + UNet), backward, optimiser step.

    python benchmarks/bench_step.py                     # CPU, tiny random SD prior, preview-cpu and csd-coarse
    python benchmarks/bench_step.py --device cuda --full-size   # CUDA, SD-2.1-base-shaped random weights, fp16
    python benchmarks/bench_step.py --backends torch,compiled   # the compiled path (issue 12 item 2) off and on

Prints a table with medians over the measured steps, the UNet-forward time of the same 3-branch batch (the
floor) and the ratio step / UNet floor; "engine" is everything but the UNet forward. The split is measured with a
device sync after each phase; "unsynced" is the mean step of as many further steps without those syncs (the
loop's own pace on CUDA, where it makes no host sync of its own), and "first" the first step (it includes
compiling the compiled backends). ``--backends`` runs every preset with the hash-grid encoding and the
compositing on each backend (``preset``: as the preset says, i.e. auto); ``--set`` overrides any setting.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from csd_backend.optimize import Optimization  # noqa: E402
from csd_backend.presets import get_preset  # noqa: E402


def build_prior(args, workdir: Path):
    from csd_backend.priors.stable_diffusion import load_stable_diffusion

    if args.full_size:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from full_size_sd import build_sd21_base_prior

        return build_sd21_base_prior(args.device, args.dtype)
    from tiny_sd import build_tiny_sd

    folder = build_tiny_sd(workdir)["folder"]
    return load_stable_diffusion(folder, device=args.device, dtype=args.dtype)


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def overrides(items, backend: str) -> dict:
    """Nested config overrides from ``--set key=value`` (values parsed as JSON when they parse) and a backend."""
    out: dict = {}
    if backend != "preset":  # tcnn is an encoding backend only: the compositing then takes auto
        render = backend if backend in ("auto", "torch", "compiled") else "auto"
        items = [f"scene.encoding_backend={backend}", f"render.backend={render}"] + list(items)
    for item in items:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        *path, leaf = key.split(".")
        d = out
        for part in path:
            d = d.setdefault(part, {})
        d[leaf] = value
    return out


def bench_config(name: str, items=(), backend: str = "preset"):
    """The benchmarks' run of preset ``name``: a fixed prompt, no checkpoints, ``--set`` items and a backend."""
    cfg = get_preset(name).replace(guidance={"prompt": "a DSLR photo of a corgi"}, prior={"model": "bench"},
                                   optim={"checkpoint_every": 0})
    return cfg.replace(**overrides(items, backend))


def bench_preset(name: str, prior, args, backend: str = "preset") -> dict:
    cfg = bench_config(name, args.set, backend)
    # the preset's prior input size (512 for csd-coarse: 64² renders upsampled for the VAE), or an override
    prior.resolution = args.resolution or cfg.prior.resolution or prior.resolution
    opt = Optimization(cfg, prior)
    opt.profile = True
    # UNet time inside the step: wrap predict_noise
    unet_times = []
    unet_batch = []
    orig = prior.predict_noise

    def timed(z_t, t, emb):
        unet_batch.append(z_t.shape[0])
        sync(prior.device)
        t0 = time.perf_counter()
        out = orig(z_t, t, emb)
        sync(prior.device)
        unet_times.append(time.perf_counter() - t0)
        return out

    prior.predict_noise = timed
    rows = []
    first = 0.0
    try:
        for i in range(args.warmup + args.steps):
            opt.timings.clear()
            unet_times.clear()
            # train from step 0 for the warm-up steps, then measure past the warm-up phases so the measured
            # steps include normal-map renders and all three branches
            if i == args.warmup:
                opt.step = max(opt.step, args.start_step)
            info = opt.train_step()
            if i == 0:
                first = info.seconds
            if i >= args.warmup:
                t = dict(opt.timings)
                t["unet"] = sum(unet_times)
                t["step"] = info.seconds
                t["samples"] = info.num_samples
                rows.append(t)
    finally:
        prior.predict_noise = orig
    # the loop's own pace: the same number of steps without the split's syncs, one sync at the end
    opt.profile = False
    sync(prior.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        opt.train_step()
    sync(prior.device)
    unsynced = (time.perf_counter() - t0) / args.steps
    opt.check_finite()
    backends = f"{type(opt.scene.volume.encoding).__name__}/{opt.renderer.compositor.backend}" \
        if hasattr(opt.renderer, "compositor") else "-"
    # the floor: one UNet forward on the same batch as the step's (branches with zero weight are skipped, so
    # stage 1 past step 5000 runs 2 branches: positive and negative)
    n = unet_batch[-1]
    _, height, width = cfg.camera.size_at(opt.step)  # the render size of the phase the steps ran in
    h, w = prior.input_size(height, width)
    z = torch.randn(n, 4, h // 8, w // 8, device=prior.device)
    t = torch.full((n,), 500, device=prior.device, dtype=torch.long)
    emb = prior.encode_text([str(i) for i in range(n)])
    floor = []
    for i in range(args.warmup + args.steps):
        sync(prior.device)
        t0 = time.perf_counter()
        prior.predict_noise(z, t, emb)
        sync(prior.device)
        if i >= args.warmup:
            floor.append(time.perf_counter() - t0)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    med["floor"] = statistics.median(floor)
    med["unet_batch"] = n
    med["engine"] = med["step"] - med["unet"]
    views = cfg.camera.size_at(opt.step)[0] * cfg.camera.n_views
    med.update(unsynced=unsynced, first=first, backends=backends, views=views)
    return med


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="preview-cpu,csd-coarse")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--full-size", action="store_true", help="SD-2.1-base-shaped random weights (needs a GPU)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--start-step", type=int, default=6000,
                   help="step index the measured steps use, past the warm-up phases (default 6000); the scene "
                        "itself is trained for --warmup steps first")
    p.add_argument("--resolution", type=int, default=None, help="prior input size override")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backends", default="preset",
                   help="comma-separated: preset (the preset's settings, auto), torch, compiled, tcnn (tcnn: the "
                        "encoding only, the compositing on auto); each preset runs once per backend")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. render.num_samples_per_ray=256 (repeatable)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        prior = build_prior(args, Path(d))
        print(f"device {prior.device}, dtype {next(prior.unet.parameters()).dtype}, "
              f"torch threads {torch.get_num_threads()}")
        cols = ["grid", "render", "prior", "unet", "backward", "optimizer", "engine", "step", "floor", "unsynced"]
        print("(columns in milliseconds; samples = packed samples per step after empty-space skipping)")
        print(f"{'preset':<22}{'backend':>9}" + "".join(f"{c:>10}" for c in cols)
              + f"{'step/floor':>12}{'unsync/floor':>14}{'first s':>9}{'samples':>10}{'per view':>10}"
              + f"{'vs base':>9}{'peak GB':>9}{'10k steps':>11}  encoding/compositing")
        for name in args.presets.split(","):
            base = None  # the preset's first backend: the baseline of its rows, measured in this same run
            for backend in args.backends.split(","):
                reset_peak(prior.device)
                m = bench_preset(name, prior, args, backend)
                base = base or m
                print(f"{name + ' @' + str(prior.resolution) + ' x' + str(m['unet_batch']):<22}{backend:>9}"
                      + "".join(f"{m.get(c, 0.0) * 1000:>9.1f}m" for c in cols)
                      + f"{m['step'] / m['floor']:>12.2f}{m['unsynced'] / m['floor']:>14.2f}{m['first']:>9.1f}"
                      + f"{int(m['samples']):>10}{int(m['samples'] / m['views']):>10}"
                      + f"{base['step'] / m['step']:>8.2f}x{peak_gb(prior.device):>9.2f}"
                      + f"{m['step'] * 10000 / 60:>9.1f}min  {m['backends']}", flush=True)
        print("(milliseconds, medians; @prior input size, xUNet batch; 'prior' = VAE encode + UNet; "
              "'engine' = step − UNet forward; 'floor' = one UNet forward on the step's batch; 'peak GB' = peak "
              "CUDA memory allocated during that preset (on the CPU: the process's peak resident memory so far); "
              "'10k steps' = the median step × 10000, the projected time of a full coarse stage; 'vs base' = the "
              "step time of the preset's first --backends entry ÷ this row's (measured in this run: > 1 is faster); "
              "'per view' = samples ÷ views in the step's batch; 'unsynced' = the mean step without the split's "
              "per-phase syncs; 'first s' = the first step in seconds, compiling included)")


if __name__ == "__main__":
    main()
