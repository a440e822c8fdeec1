"""Step time of the peer stable-dreamfusion (github.com/ashawkey/stable-dreamfusion), ``--backbone vanilla``, on the
tiny random-weight Stable-Diffusion model our benchmarks use: a side-by-side number for ``bench_step.py``.

    python benchmarks/peer_step.py --peer PATH/TO/stable-dreamfusion                  # 1 thread, 3 + 10 steps
    python benchmarks/peer_step.py --peer PATH/TO/stable-dreamfusion --warmup 1 --steps 2 --threads 1
    python benchmarks/peer_step.py --peer PATH --sd-resize peer     # keep the peer's hard-coded 512² VAE input

``--peer`` is a checkout of the peer (a git checkout prints its commit). Nothing in it is changed on disk; at run
time this script

* serves stub modules for the CUDA-only extensions the vanilla CPU path imports but never calls (raymarching,
  gridencoder, freqencoder, shencoder, nvdiffrast, tinycudann, taichi, cubvh), and for the optional packages of the
  peer's requirements that are not installed and that a training step does not use (cv2, matplotlib, torchvision,
  tensorboardX, torchmetrics, mcubes, pymeshlab, pandas, ...: only mesh export, logging, images and metrics use them).
  A stub fails loudly when called; ``torch_ema`` (constructed by the Trainer, updated once per epoch) gets a minimal
  stand-in;
* reads the peer's options from its own ``main.py`` (its argparse calls and its option post-processing, executed
  from the parsed source) with ``--text PROMPT --backbone vanilla --h 64 --w 64 --batch_size 1 --hf_key TINY_SD``:
  the peer's defaults otherwise (fp32, no cuda_ray, Adan, 64 + 32 samples per ray, guidance scale 100, ...);
* builds the peer's own ``NeRFNetwork`` (vanilla), its ``StableDiffusion`` guidance (loaded from the tiny SD folder
  with the peer's ``StableDiffusionPipeline.from_pretrained``), its ``NeRFDataset`` train loader and its
  ``Trainer``, and times the body of ``Trainer.train_one_epoch`` for one step: a random camera from the loader,
  ``Trainer.train_step`` (the peer's CPU renderer ``NeRFRenderer.run`` + SDS through the guidance + its
  regularisers), backward, ``post_train_step``, the optimiser and LR-scheduler steps. Left out of that loop: the
  progress bar, tensorboard logging and the once-per-epoch EMA update;
* with ``--sd-resize native`` (default) maps the peer's hard-coded SD-2.1-base sizes (renders resized to 512², or
  to 64² latents in its latent phase) to the tiny model's native size (64² renders, 8² latents), which is what our
  prior does with the same model; ``--sd-resize peer`` keeps 512² (64² latents for the tiny UNet).

The measured steps run at ``--start-step`` (default 6000 of the peer's 10000: past its latent phase, i.e. VAE-encoded
RGB renders with random lambertian / textureless shading and a random or background-network background). The peer's
vanilla renderer has no occupancy grid, so its work per step does not depend on training progress. ``--start-step 0``
times its latent phase (steps up to 2000: normal shading as a 4-channel latent, no VAE).
"""
from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.machinery
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

#: CUDA-only extensions (the peer's own JIT-built ones and third-party ones): never used by the vanilla CPU path
CUDA_ONLY = ("raymarching", "gridencoder", "freqencoder", "shencoder", "nvdiffrast", "tinycudann", "taichi",
             "taichi_modules", "cubvh")
#: packages of the peer's requirements imported at module level but not used by a training step: stubbed if absent
OPTIONAL = ("cv2", "matplotlib", "torchvision", "torch_ema", "tensorboardX", "torchmetrics", "mcubes", "pymeshlab",
            "pandas", "trimesh", "scipy", "imageio", "psutil", "tqdm", "rich", "einops", "kornia")


# ------------------------------------------------------------------------------------------------ stubs
class _Missing:
    """A name from a stubbed module: fails when used, so a stub can never silently stand in for real work."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a stub of benchmarks/peer_step.py (not available on this path)")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.__name__}.{attr}")


class _EMA:
    """Minimal stand-in for ``torch_ema.ExponentialMovingAverage`` (the Trainer builds one; an epoch end updates it)."""

    def __init__(self, parameters, decay: float):
        self.decay = decay
        self.params = [p for p in parameters if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p, 1.0 - self.decay)


STAND_INS = {"torch_ema": {"ExponentialMovingAverage": _EMA}}


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in self.roots:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        for name, value in STAND_INS.get(spec.name, {}).items():
            setattr(module, name, value)
        return module

    def exec_module(self, module):
        pass


def install_stubs() -> list:
    """Stub the CUDA-only modules always and the optional ones that are not installed; returns the stubbed names."""
    missing = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
    roots = list(CUDA_ONLY) + missing
    sys.meta_path.insert(0, _StubFinder(roots))
    return roots


# ----------------------------------------------------------------------------------------------- options
def peer_options(peer: Path, argv: list) -> argparse.Namespace:
    """The peer's ``opt``: its ``main.py`` argparse calls and option post-processing (everything in its
    ``__main__`` block before the backbone import), run on ``argv``."""
    tree = ast.parse((peer / "main.py").read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    stop = next(i for i, n in enumerate(block.body)
                if isinstance(n, ast.If) and ast.unparse(n.test).startswith("opt.backbone =="))
    source = ast.unparse(ast.Module(body=block.body[:stop], type_ignores=[]))
    if source.count("parser.parse_args()") != 1:
        raise RuntimeError("the peer's main.py does not have the layout this script expects (one parse_args())")
    namespace = {"argparse": argparse, "sys": sys, "__argv__": argv, "pd": _StubModule("pandas")}
    exec(compile(source.replace("parser.parse_args()", "parser.parse_args(__argv__)"), "peer main.py", "exec"),
         namespace)
    return namespace["opt"]


def peer_commit(peer: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(peer), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


class _ResizeProxy:
    """``torch.nn.functional`` for the peer's ``guidance/sd_utils.py`` with its hard-coded SD sizes remapped."""

    def __init__(self, real, sizes: dict):
        self._real, self._sizes = real, sizes

    def __getattr__(self, name):
        return getattr(self._real, name)

    def interpolate(self, x, size=None, *args, **kwargs):
        if size is not None:
            size = self._sizes.get(tuple(size), size)
        return self._real.interpolate(x, size, *args, **kwargs)


# ------------------------------------------------------------------------------------------------ timing
class Timer:
    """Accumulates the seconds spent in wrapped callables per step (CPU: no device sync needed)."""

    def __init__(self):
        self.t = {}

    def wrap(self, key, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - t0
        return timed


def run_step(trainer, batches, timer: Timer) -> dict:
    """One iteration of the peer's ``Trainer.train_one_epoch`` loop body (fp32: its GradScaler is disabled)."""
    timer.t.clear()
    t0 = time.perf_counter()
    data = next(batches)
    t1 = time.perf_counter()
    trainer.local_step += 1
    trainer.global_step += 1
    trainer.optimizer.zero_grad()
    _, _, loss = trainer.train_step(data)
    t2 = time.perf_counter()
    trainer.scaler.scale(loss).backward()
    t3 = time.perf_counter()
    trainer.post_train_step()
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    trainer.lr_scheduler.step()
    loss_val = loss.item()
    t4 = time.perf_counter()
    if loss_val != loss_val:
        raise RuntimeError("the peer's loss is NaN")
    row = dict(data=t1 - t0, train_step=t2 - t1, backward=t3 - t2, optimizer=t4 - t3, step=t4 - t0)
    row.update(render=timer.t.get("render", 0.0), guidance=timer.t.get("guidance", 0.0), unet=timer.t.get("unet", 0.0))
    row["other"] = row["train_step"] - row["render"] - row["guidance"]
    return row


def step_line(row: dict) -> str:
    """One step's seconds and their split."""
    return (f"{row['step']:.3f} s  (render {row['render']:.3f}, guidance {row['guidance']:.3f} [UNet "
            f"{row['unet']:.3f}], other {row['other']:.3f}, backward {row['backward']:.3f}, optimizer "
            f"{row['optimizer']:.3f}, camera {row['data']:.3f})")


def report(rows: list, warmup: int, iters: int) -> None:
    """The measured steps' medians and the peer's run length at that median."""
    first, rows = rows[0]["step"], rows[warmup:]
    if rows:
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"median over {len(rows)} steps (after {warmup} warm-up, first step {first:.3f} s): step "
              + step_line(med))
        print(f"projected {iters} steps at this median: {med['step'] * iters / 60:.1f} min")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", required=True, type=Path, help="checkout of ashawkey/stable-dreamfusion")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--start-step", type=int, default=6000,
                   help="the peer's global step of all steps run (default 6000 of its 10000: past its latent "
                        "phase, steps <= 2000)")
    p.add_argument("--sd-resize", choices=("native", "peer"), default="native",
                   help="native: the peer's 512² (64² latents) mapped to the tiny SD's native 64² (8² latents), as "
                        "our prior does; peer: its hard-coded 512² kept")
    p.add_argument("--prompt", default="a DSLR photo of a corgi")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the peer's main.py parser, e.g. --peer-arg=--num_steps=32 (repeatable)")
    args = p.parse_args()
    peer = args.peer.resolve()
    if not (peer / "main.py").is_file() or not (peer / "nerf" / "network.py").is_file():
        p.error(f"--peer {peer} is not a stable-dreamfusion checkout (no main.py / nerf/network.py)")
    torch.set_num_threads(args.threads)
    # the peer (2023) uses torch.cuda.amp.* and diffusers' torch_dtype: deprecated, harmless here
    warnings.filterwarnings("ignore", message=r".*(torch\.cuda\.amp|torch_dtype).*", category=FutureWarning)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from tiny_sd import build_tiny_sd

        folder = build_tiny_sd(tmp)["folder"]
        if not (folder / "model_index.json").is_file():  # the peer loads a whole StableDiffusionPipeline
            raise RuntimeError(f"{folder} has no model_index.json")

        stubbed = install_stubs()
        sys.path.insert(0, str(peer))
        peer_argv = ["--text", args.prompt, "--backbone", "vanilla", "--h", "64", "--w", "64", "--batch_size", "1",
                     "--hf_key", str(folder), "--workspace", str(tmp / "workspace")] + args.peer_arg
        opt = peer_options(peer, peer_argv)
        if opt.cuda_ray or opt.fp16 or opt.backbone != "vanilla":
            raise RuntimeError("this benchmark times the vanilla fp32 CPU path (no --cuda_ray, -O or --fp16)")

        import guidance.sd_utils as sd_utils
        from nerf.network import NeRFNetwork
        from nerf.provider import NeRFDataset
        from nerf.utils import Trainer, seed_everything
        from optimizer import Adan

        seed_everything(args.seed)
        device = torch.device("cpu")
        model = NeRFNetwork(opt).to(device)
        # main.py's optimiser and scheduler for these options
        if opt.optim == "adan":
            optimizer = lambda m: Adan(m.get_params(5 * opt.lr), eps=1e-8, weight_decay=2e-5,  # noqa: E731
                                       max_grad_norm=5.0, foreach=False)
        else:
            optimizer = lambda m: torch.optim.Adam(m.get_params(opt.lr), betas=(0.9, 0.99), eps=1e-15)  # noqa: E731
        scheduler = lambda o: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
            o, lambda it: 0.1 ** min(it / opt.iters, 1))
        sd = sd_utils.StableDiffusion(device, opt.fp16, opt.vram_O, opt.sd_version, opt.hf_key, opt.t_range)
        vae_factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
        native = sd.unet.config.sample_size * vae_factor
        if args.sd_resize == "native":
            sd_utils.F = _ResizeProxy(torch.nn.functional, {(512, 512): (native, native),
                                                            (64, 64): (native // vae_factor,) * 2})
            vae_in = native
        else:
            vae_in = 512
        guidance = torch.nn.ModuleDict({"SD": sd})
        trainer = Trainer(" ".join(["main.py"] + peer_argv), "df", opt, model, guidance, device=device,
                          workspace=opt.workspace, optimizer=optimizer, ema_decay=0.95, fp16=opt.fp16,
                          lr_scheduler=scheduler, use_checkpoint=opt.ckpt, scheduler_update_every_step=True,
                          mute=True)
        loader = NeRFDataset(opt, device=device, type="train", H=opt.h, W=opt.w,
                             size=opt.dataset_size_train * opt.batch_size).dataloader()
        trainer.default_view_data = loader._data.get_default_view_data()

        timer = Timer()
        model.render = timer.wrap("render", model.render)
        sd.train_step = timer.wrap("guidance", sd.train_step)
        sd.unet.forward = timer.wrap("unet", sd.unet.forward)

        def batches():
            while True:
                yield from loader

        it = batches()
        trainer.global_step = args.start_step
        model.train()
        rays = opt.h * opt.w * opt.batch_size
        per_ray = opt.num_steps + opt.upsample_steps
        print(f"peer stable-dreamfusion commit {peer_commit(peer)} ({peer})")
        print(f"torch {torch.__version__}, device cpu, fp32, torch threads {torch.get_num_threads()}")
        print(f"stubbed modules: {', '.join(stubbed)}")
        print(f"options: backbone {opt.backbone}, {opt.h}x{opt.w}, batch {opt.batch_size}, optim {opt.optim}, "
              f"num_steps {opt.num_steps} + upsample_steps {opt.upsample_steps}, guidance_scale {opt.guidance_scale}, "
              f"bg_radius {opt.bg_radius}, latent_iter_ratio {opt.latent_iter_ratio} of iters {opt.iters}")
        print(f"SD: tiny random weights, native {native}², VAE input {vae_in}² (--sd-resize {args.sd_resize}), "
              f"latents {vae_in // vae_factor}², UNet batch 2 (uncond + text)")
        print(f"samples per view: {rays} rays x {per_ray} samples per ray = {rays * per_ray} "
              f"(network queries per view: {rays * (opt.num_steps + opt.upsample_steps + per_ray)}: density() on "
              f"the {opt.num_steps} + {opt.upsample_steps}, then forward() with an autograd normal on all {per_ray})")

        rows = []
        for i in range(args.warmup + args.steps):
            rows.append(run_step(trainer, it, timer))
            if i >= args.warmup:
                print(f"step {i - args.warmup + 1}: {step_line(rows[-1])}", flush=True)
        report(rows, args.warmup, opt.iters)

if __name__ == "__main__":
    main()
