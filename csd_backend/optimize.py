"""The optimisation loop: sample cameras → render → guidance + regularisers → Adam step.

``Optimization`` owns a *copy* of the scene (inputs are never mutated), the renderer with its occupancy grid,
the guidance, the optimiser and the RNG. Every random draw comes from one seeded ``torch.Generator`` (plus
torch's global RNG, which the VAE's posterior sampling uses); both are in the checkpoint, so a resumed run
continues exactly as an uninterrupted one.

Host syncs on CUDA (``sync_free``, on for a CUDA device): the loop itself makes none per step. Draws of the CPU
generator reach the GPU by non-blocking copies from pinned memory (the same numbers as on the CPU); the
non-finite-loss check keeps a device-side record that ``check_finite`` reads every ``finite_check_every`` steps
and before every checkpoint (so a checkpoint never holds weights updated from a non-finite loss, and the run
still stops with the same error); ``StepInfo``'s losses, timesteps and preview are read from the device when a
caller first uses them (one transfer for all). What still syncs each step: the volume renderer's packed sample
counts (``render/volume_renderer.py``, three) and whatever the progress callback reads. On the CPU syncs cost
nothing, so there the loss is checked before every update and ``StepInfo`` is filled at once, as before.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from . import io
from .auto_backends import resolve_auto_backends
from .config import OptimConfig, RunConfig
from .errors import Cancelled, CheckpointError, ConfigError, CSDError, DiskFullError, EmptySceneError
from .guidance import ScoreDistillation
from .priors.base import DiffusionPrior
from .priors.controlnet import depth_condition
from .regularizers import REGULARIZERS
from .render.cameras import sample_cameras
from .render.shading import soft_shading_ratio
from .scene_kinds import make_renderer, make_scene
from .schedules import schedule_value
from .transfer import to_device_async

#: a scene of any kind (``scene_kinds.py``): the volume ``Scene`` or a ``MeshScene``
Scene = torch.nn.Module

log = logging.getLogger(__name__)

#: the resolved configuration written into every run folder when the run starts
RUN_CONFIG_FILE = "config.json"
#: its entry recording what the settings left to run time ("auto", None) as the run resolved them
RESOLVED_KEY = "resolved"

#: CUDA runs: how often (in steps) the device-side non-finite-loss record is read (one host sync)
FINITE_CHECK_EVERY = 10


@dataclass
class StepInfo:
    step: int  # steps completed so far (1-based after the first step)
    total: int
    losses: Dict[str, float]
    shading: str
    timesteps: list
    coefficients: Optional[object] = None  # guidance.Coefficients used at this step
    preview: Optional[torch.Tensor] = None  # [1, H, W, 3] the current render, detached, on the CPU
    seconds: float = 0.0
    num_samples: int = 0  # packed samples rendered this step (after empty-space skipping)
    timings: Dict[str, float] = field(default_factory=dict)


def _read_on_use(name: str) -> property:
    def get(self):
        if name not in self.__dict__:
            self._materialize()
        return self.__dict__[name]

    def set(self, value):
        self.__dict__[name] = value

    return property(get, set)


class _DeferredStepInfo(StepInfo):
    """A ``StepInfo`` whose ``losses``, ``timesteps`` and ``preview`` stay on the device until first read (then one
    transfer for all): building it costs no host sync. ``seconds`` is the host's time for the step (the GPU may
    still be working on it unless the loop was profiling)."""

    losses = _read_on_use("losses")
    timesteps = _read_on_use("timesteps")
    preview = _read_on_use("preview")

    def __init__(self, scalars: Dict[str, object], timesteps: torch.Tensor, preview: torch.Tensor, **fields):
        self.__dict__.update(fields)
        tensors = [k for k, v in scalars.items() if isinstance(v, torch.Tensor)]
        stacked = torch.stack([scalars[k].detach().float().reshape(()) for k in tensors]) if tensors else None
        plain = {k: float(v) for k, v in scalars.items() if k not in tensors}  # keeps no autograd graph alive
        self._pending = (list(scalars), plain, tensors, stacked, timesteps.detach(), preview.detach())

    def _materialize(self) -> None:
        order, plain, tensors, stacked, timesteps, preview = self._pending
        read = {**plain, **(dict(zip(tensors, stacked.tolist())) if stacked is not None else {})}
        self.__dict__["losses"] = {k: read[k] for k in order}
        self.__dict__["timesteps"] = timesteps.tolist()
        self.__dict__["preview"] = preview.cpu()


class Optimization:
    """One stage of text-to-3D optimisation."""

    def __init__(self, config: RunConfig, prior: DiffusionPrior, scene: Optional[Scene] = None,
                 out_dir: Optional[io.PathLike] = None, require_model: bool = False):
        self.config = config
        if scene is not None:  # optimise a copy of a given scene (editing); its own settings win
            self.config = config = config.replace(scene=dataclasses.asdict(scene.cfg))
        config.validate(require_model=require_model)
        self.prior = prior
        self.device = prior.device
        o = config.optim
        torch.manual_seed(o.seed)  # before building the scene: its initial weights follow the seed
        for _, height, width in config.camera.sizes():  # fail early on a size it cannot take, in any phase
            prior.input_size(height, width)
        if getattr(prior, "multiview", False) and config.camera.n_views == 1:
            log.warning("the %s prior is a multi-view model but camera.n_views is 1: each render is seen alone, not "
                        "as MVDream was trained (4 views an object; the *-mvdream presets set it)", prior.name)
        # "auto" backends on a CPU: compiled where the run repays the compile (auto_backends.py); config keeps auto
        built = resolve_auto_backends(config, self.device) if scene is None else config
        #: the first steps compile the CPU kernels that "auto" chose (a progress bar says so)
        self.compiles_kernels = built is not config
        self.scene = (copy.deepcopy(scene) if scene is not None else make_scene(built.scene, self.device)
                      ).to(self.device)
        self.renderer = make_renderer(built.render, built.scene, self.device)
        self.guidance = ScoreDistillation(config.guidance, prior, optim=o)
        self.optimizer = scene_optimizer(self.scene, o)
        self.generator = torch.Generator().manual_seed(o.seed)
        #: no host sync per step (module docstring); on for CUDA, where a sync stalls the GPU's queue
        self.sync_free = self.device.type == "cuda"
        self.finite_check_every = FINITE_CHECK_EVERY
        self._nonfinite: Optional[tuple] = None  # sync_free: (first bad step or -1, its loss values, their names)
        self.step = 0
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.profile = False
        self.timings: Dict[str, float] = {}
        self._updating = False  # inside optimizer.step()
        self._step_start: dict = {}
        self.saved_step: Optional[int] = None  # the step of the checkpoint this object last wrote (None: none yet)

    # ----------------------------------------------------------------- state
    @property
    def updating(self) -> bool:
        """True inside the parameter update: an interrupt there leaves half-updated weights (no checkpoint of
        them is written), so a signal handler may rather wait until the step is complete."""
        return self._updating

    @property
    def checkpoint_path(self) -> Optional[Path]:
        return self.out_dir / "checkpoints" / "last.ckpt" if self.out_dir is not None else None

    def state_dict(self) -> dict:
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"config": self.config.to_dict(), "step": self.step, "scene": self.scene.state_dict(),
                 "renderer": self.renderer.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": rng,
                 "prior": getattr(self.prior, "name", "prior")}
        if self.guidance.has_state:  # VSD: its LoRA, camera embedding and their optimiser
            state["guidance"] = self.guidance.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        try:
            self.scene.load_state_dict(state["scene"])
            self.renderer.load_state_dict(state["renderer"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.guidance.has_state:  # a guidance with trained state (VSD) needs it back
                self.guidance.load_state_dict(state["guidance"])
            self.step = int(state["step"])
            self.scene.update_step(self.step)
            self.generator.set_state(state["rng"]["generator"])
            torch.set_rng_state(state["rng"]["torch"])
            cuda_state = state["rng"].get("cuda")
            if isinstance(cuda_state, torch.Tensor) and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda_state, self.device)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint does not match this configuration: {e}") from e

    def save_checkpoint(self, path: Optional[io.PathLike] = None) -> Path:
        self.check_finite()  # never save weights updated from a non-finite loss
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise CSDError("no checkpoint path: give the Optimization an out_dir or pass a path")
        try:
            saved = io.save_checkpoint(path, self.state_dict())
        except DiskFullError as e:
            raise DiskFullError(f"{e}. {intact_checkpoint(path)}", e.path, e.free) from e
        if path == self.checkpoint_path:
            self.saved_step = self.step
        return saved

    def _save_unless_saved(self) -> None:
        """Save the run's checkpoint unless it already holds this step (so previous.ckpt stays one step older)."""
        self.check_finite()
        if self.out_dir is not None and self.saved_step != self.step:
            self.save_checkpoint()

    @classmethod
    def resume(cls, checkpoint: io.PathLike, prior: DiffusionPrior, out_dir: Optional[io.PathLike] = None,
               steps: Optional[int] = None) -> "Optimization":
        """Continue a run from its checkpoint (a file or a run folder). ``steps`` may extend the run.

        A run folder with a ``config.json`` but no checkpoint yet (the run was stopped before its first one)
        restarts from step 0 with that configuration. ``steps`` below the planned total (but not below the
        steps done) ends the run early, with a warning: its schedules stay as planned."""
        folder = Path(checkpoint)
        if folder.is_dir() and run_checkpoint(folder) is None and (folder / RUN_CONFIG_FILE).is_file():
            config = read_run_config(folder)
            config = _resumed_steps(config, 0, steps)
            log.warning("%s has no checkpoint yet (the run stopped before its first one): it restarts from step 0 "
                        "with the settings of its %s", folder, RUN_CONFIG_FILE)
            return cls(config, prior, out_dir=out_dir if out_dir is not None else folder)
        state = io.load_checkpoint(checkpoint)
        config = RunConfig.from_dict(state["config"])
        done = int(state.get("step", 0))
        config = _resumed_steps(config, done, steps)
        saved_prior = state.get("prior")
        if saved_prior and saved_prior != getattr(prior, "name", "prior"):
            raise CheckpointError(f"this run was trained with a '{saved_prior}' prior, not "
                                  f"'{getattr(prior, 'name', 'prior')}'; resume it with the model it started with "
                                  f"({config.prior.model or 'see its config.json'})")
        if out_dir is None:
            p = io.find_checkpoint(checkpoint)
            out_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        opt = cls(config, prior, out_dir=out_dir)
        opt.load_state_dict(state)
        same_plan = config.optim.steps == RunConfig.from_dict(state["config"]).optim.steps
        if same_plan and opt.checkpoint_path is not None and \
                io.find_checkpoint(checkpoint).resolve() == opt.checkpoint_path.resolve():
            opt.saved_step = done  # its checkpoint holds this step: a run with nothing left to train rewrites nothing
        return opt

    # ------------------------------------------------------------------ step
    def choose_shading(self, step: int) -> str:
        r = self.config.render
        if step < r.ambient_only_steps:
            return "albedo"
        if torch.rand(1, generator=self.generator).item() < r.albedo_prob:
            return "albedo"
        return "textureless" if torch.rand(1, generator=self.generator).item() < r.textureless_prob else "diffuse"

    def _tick(self, name: str, t0: float) -> float:
        if self.profile:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - t0
            return now
        return t0

    def _step_start_state(self) -> dict:
        """What a step changes before its parameter update: the RNGs and the renderer's state (the occupancy
        grid, 32³: cheap)."""
        return {"step": self.step, "generator": self.generator.get_state(), "torch": torch.get_rng_state(),
                "renderer": {k: v.clone() for k, v in self.renderer.state_dict().items()}}

    def train_step(self) -> StepInfo:
        cfg, s, gen = self.config, self.step, self.generator
        self._step_start = self._step_start_state()  # to save a clean state if interrupted mid-step
        t_start = time.perf_counter()
        self.scene.train()
        self.renderer.train()
        self.scene.update_step(s)
        t0 = time.perf_counter()
        self.renderer.update(s, self.scene, gen)
        t0 = self._tick("grid", t0)

        cams = sample_cameras(cfg.camera, s, gen)
        shading = self.choose_shading(s)
        B = len(cams)
        bg_colors = None
        if cfg.scene.random_background_prob > 0 and torch.rand(1, generator=gen).item() < cfg.scene.random_background_prob:
            shared = cfg.scene.random_background_shared  # one colour for the batch (threestudio share_aug_bg)
            bg_colors = to_device_async(torch.rand(1 if shared else B, 3, generator=gen).repeat(B if shared else 1, 1),
                                        self.device)
        weights = {name: schedule_value(getattr(cfg.loss, name), s) for name in ("guidance", *REGULARIZERS)}
        need_normals = weights["orient"] > 0 or shading != "albedo"
        angles = cams.elevation, cams.azimuth  # on the CPU: the view-dependent prompt lookup needs no GPU sync
        out = self.renderer.render(self.scene, _cameras_to(cams, self.device), shading, bg_colors, need_normals,
                                   gen, ambient_ratio=soft_shading_ratio(cfg.render, shading, gen))
        t0 = self._tick("render", t0)

        control = depth_condition(out.depth, out.opacity) if self.prior.controlnet is not None else None
        g = self.guidance(out.rgb, *angles, s, generator=gen, control=control, c2w=cams.c2w,
                          n_views=cfg.camera.n_views)
        t0 = self._tick("prior", t0)
        losses = {"guidance": g.loss}
        total = weights["guidance"] * g.loss
        for name, fn in REGULARIZERS.items():
            if weights[name] > 0:
                losses[name] = fn(out)
                total = total + weights[name] * losses[name]
        self._watch_finite(s, [("loss", total), *((f"{k} loss", v) for k, v in g.extra_losses.items())])
        if not total.requires_grad:  # an attribute: no host sync
            raise self._empty_scene_error(s)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        t0 = self._tick("backward", t0)
        self._updating = True
        scaled_step(self.optimizer, schedule_value(cfg.optim.lr_scale, s))
        self.guidance.update()  # VSD: the LoRA's step, with the scene's (its gradients come from the guidance call)
        t0 = self._tick("optimizer", t0)
        # part of the update: Gaussian scenes densify, prune and set the next step's position lr here
        self.renderer.after_update(s + 1, self.scene, self.optimizer, out, gen)
        self.step += 1  # inside the update: an interrupt sees the step before it or the complete one
        self._updating = False
        t0 = self._tick("densify", t0)
        if self.sync_free:
            if self.step % self.finite_check_every == 0:
                self.check_finite()
            return _DeferredStepInfo({**losses, "total": total, "grad_norm": g.grad_norm, **g.extra_losses}, g.t,
                                     out.rgb[:1].detach().float(), step=self.step, total=cfg.optim.steps,
                                     shading=shading, coefficients=g.coefficients,
                                     seconds=time.perf_counter() - t_start, num_samples=out.num_samples, timings={})
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["total"] = float(total.detach())
        values["grad_norm"] = float(g.grad_norm)
        values.update({k: float(v) for k, v in g.extra_losses.items()})
        return StepInfo(step=self.step, total=cfg.optim.steps, losses=values, shading=shading,
                        timesteps=g.t.tolist(), coefficients=g.coefficients, preview=out.rgb[:1].detach().float().cpu(),
                        seconds=time.perf_counter() - t_start, num_samples=out.num_samples)

    # ------------------------------------------------------------- finite check
    def _empty_scene_error(self, step: int) -> EmptySceneError:
        where = f" in {self.checkpoint_path}" if self.out_dir is not None else ""
        return EmptySceneError(
            f"the object vanished at step {step}: nothing the training renders show depends on a trained parameter "
            f"(a volume's density fell so low everywhere that the renderer skips every ray sample: "
            f"render.alpha_threshold, render.grid_threshold), and nothing can bring it back. Try another optim.seed, "
            f"fewer optim.steps, or a lower loss.sparsity. The last checkpoint is kept{where}.")

    @staticmethod
    def _nonfinite_error(name: str, value: float, step: int) -> CSDError:
        return CSDError(f"the {name} became {value} at step {step}; lower optim.lr (guidance.lora_lr for the lora "
                        f"loss) or check the prior's dtype (fp16 on CPU is not supported). The last checkpoint is "
                        f"kept.")

    def _watch_finite(self, step: int, named: list) -> None:
        """Stop on a non-finite loss. Without ``sync_free``: checked now, before the update. With it: recorded on
        the device (the first bad step and its values) and raised by ``check_finite``."""
        if not self.sync_free:
            for name, value in named:
                if not torch.isfinite(value):
                    raise self._nonfinite_error(name, float(value.detach()), step)
            return
        names = [name for name, _ in named]
        values = torch.stack([v.detach().float().reshape(()) for _, v in named])  # [n]
        if self._nonfinite is None or self._nonfinite[2] != names:
            self.check_finite()  # the set of losses changed: settle the old record first
            self._nonfinite = (torch.full((), -1, dtype=torch.long, device=values.device), values, names)
        first, kept, _ = self._nonfinite
        new = (first < 0) & ~torch.isfinite(values).all()
        self._nonfinite = (torch.where(new, step, first), torch.where(new, values, kept), names)

    def check_finite(self) -> None:
        """Raise the error of the first non-finite loss recorded on the device (``sync_free`` runs; one host sync).
        The loop calls it every ``finite_check_every`` steps, before every checkpoint and at the end."""
        if self._nonfinite is None:
            return
        first, values, names = self._nonfinite
        step = int(first)
        if step >= 0:
            vals = values.tolist()
            name, value = next(((n, v) for n, v in zip(names, vals) if not math.isfinite(v)), (names[0], vals[0]))
            raise self._nonfinite_error(name, value, step)

    # ------------------------------------------------------------------- run
    def _save_on_interrupt(self) -> None:
        """What an interrupt (Ctrl-C, SIGTERM) keeps. After a complete step: that step. Before a step's parameter
        update: the weights are those of the last finished step, so the RNGs and the grid are rewound to that
        step's start and saved (the resumed run then equals an uninterrupted one). Inside the update: the weights
        are half-updated, so the last periodic checkpoint stays."""
        if self.out_dir is None or self._updating:
            return
        if self._step_start.get("step") == self.step:  # this step started and has not been updated yet
            self.generator.set_state(self._step_start["generator"])
            torch.set_rng_state(self._step_start["torch"])
            self.renderer.load_state_dict(self._step_start["renderer"])
        self._save_unless_saved()

    def run(self, progress: Optional[Callable[[StepInfo], None]] = None,
            cancel: Optional[Callable[[], bool]] = None) -> Scene:
        """Optimise until ``config.optim.steps``. ``progress`` is called after every step; when ``cancel``
        returns True the run saves its checkpoint (if it has an out_dir) and raises ``Cancelled``."""
        o = self.config.optim
        try:  # Ctrl-C / SIGTERM anywhere in the loop, not only inside train_step
            while self.step < o.steps:
                if cancel is not None and cancel():
                    self._save_unless_saved()
                    raise Cancelled(f"cancelled at step {self.step} of {o.steps}"
                                    + (f"; resume from {self.checkpoint_path}" if self.out_dir is not None else ""))
                try:
                    info = self.train_step()
                except torch.OutOfMemoryError as e:
                    c = self.config
                    batch, height, width = c.camera.size_at(self.step)
                    where = f" The last checkpoint is kept in {self.checkpoint_path}." if self.out_dir else ""
                    raise CSDError(
                        f"out of memory at step {self.step} on {self.device}. Try, in this order: fp16 weights "
                        f"(dtype float16 on CUDA), a smaller camera.batch_size (now {batch}), fewer "
                        f"render.num_samples_per_ray (now {c.render.num_samples_per_ray}), a smaller render "
                        f"({height}x{width}) or prior resolution, or the preview-cpu preset." + where
                    ) from e
                except Exception as e:
                    if not isinstance(e, CSDError):
                        self.check_finite()  # sync_free: a failure that follows a non-finite loss reports that loss
                    raise
                if self.out_dir is not None and o.checkpoint_every > 0 and self.step % o.checkpoint_every == 0:
                    self.save_checkpoint()
                if progress is not None:
                    try:
                        progress(info)
                    except BaseException:
                        # the state right after a step is consistent: keep it so the run can resume
                        self._save_unless_saved()
                        raise
        except KeyboardInterrupt:
            self._save_on_interrupt()
            raise
        self._save_unless_saved()
        return self.scene

    def resolved(self) -> Dict[str, object]:
        """The values the configuration leaves to run time ("auto", None: the prior's input size, the device, the
        dtype, the backends), as this run resolved them, by config field."""
        dtype = getattr(self.prior, "unet_dtype", None)
        encoding = next((m.backend_name for m in self.scene.modules() if hasattr(m, "backend_name")), None)
        out = {"prior.model": getattr(self.prior, "source", None) or self.prior.name,
               "prior.resolution": getattr(self.prior, "resolution", None), "prior.device": str(self.device),
               "prior.dtype": None if dtype is None else str(dtype).replace("torch.", ""),
               "scene.encoding_backend": encoding, **getattr(self.renderer, "resolved_backends", {})}
        return {k: v for k, v in out.items() if v is not None}

    def write_config(self, folder: Optional[io.PathLike] = None) -> Path:
        """``config.json`` of the run folder: the configuration, and under ``"resolved"`` what ran (``resolved``)."""
        folder = Path(folder) if folder is not None else self.out_dir
        return io.write_json(folder / RUN_CONFIG_FILE, {**self.config.to_dict(), RESOLVED_KEY: self.resolved()})

    def trained_scene(self) -> Scene:
        """A detached copy of the current scene (safe to hand out; later steps do not change it)."""
        return copy.deepcopy(self.scene).eval()


def _cameras_to(cams, device):
    """``cams.to(device)``; to CUDA without a host sync (non-blocking copies of the camera tensors)."""
    if torch.device(device).type != "cuda":
        return cams.to(device)
    return dataclasses.replace(cams, **{f.name: to_device_async(getattr(cams, f.name), device)
                                        for f in dataclasses.fields(cams)
                                        if isinstance(getattr(cams, f.name), torch.Tensor)})


def scene_optimizer(scene: torch.nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """The scene's optimiser: ``o.optimizer`` (torch's Adam, or AdamW with decoupled weight decay, as threestudio's
    ``optimizer.name``) over ``parameter_groups``, with the run's betas, eps and ``weight_decay`` in every group."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[o.optimizer]
    extra = {"weight_decay": float(o.weight_decay)} if o.optimizer == "adamw" or o.weight_decay else {}
    own = getattr(scene, "parameter_groups", None)  # a scene with its own per-parameter rates (Gaussian splats)
    groups = own(o) if own is not None else parameter_groups(scene, o.lr, o.group_lr)
    return cls(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **extra)


def scaled_step(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """One ``optimizer.step()`` with every group's learning rate times ``scale`` (``optim.lr_scale``); the groups'
    own rates are restored after it, so a rate that a scene schedules itself (splats' position lr) composes with
    the scale, and a checkpoint holds the unscaled rates."""
    if scale == 1.0:
        optimizer.step()
        return
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * scale
    try:
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, rates):
            group["lr"] = lr


def parameter_groups(scene: torch.nn.Module, lr: float, group_lr: Dict[str, float]) -> list:
    """Adam parameter groups: parameters whose name starts with a ``group_lr`` prefix (the longest match wins) get
    that learning rate, the others ``lr``. A prefix that matches no parameter is a ``ConfigError``."""
    names = [n for n, _ in scene.named_parameters()]
    for prefix in group_lr:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"optim.group_lr.{prefix}", f"matches no parameter of the scene; use a part such as "
                                                          f"{', '.join(tops)} (or a deeper name like volume.encoding)")
    groups: Dict[float, list] = {}
    for name, p in scene.named_parameters():
        match = max((k for k in group_lr if name == k or name.startswith(k + ".")), key=len, default=None)
        groups.setdefault(lr if match is None else float(group_lr[match]), []).append(p)
    return [{"params": ps, "lr": value} for value, ps in groups.items()]


def _resumed_steps(config: RunConfig, done: int, steps: Optional[int]) -> RunConfig:
    """``config`` ending at ``steps`` (None: as planned). Fewer than ``done`` is refused; fewer than planned warns."""
    if steps is None:
        return config
    planned = config.optim.steps
    if steps < done:
        raise ConfigError("steps", f"the run being resumed has already done {done} steps; give at least "
                                   f"{done} (more extends the run)")
    if steps < planned:
        log.warning("steps %d is below the %d steps this run planned: it ends at step %d instead of %d, with its "
                    "schedules still as planned for %d steps (not compressed), so it is not the result of a "
                    "%d-step run. Resume without steps, or with %d, to finish it as planned.",
                    steps, planned, steps, planned, planned, steps, planned)
    return config.replace(optim={"steps": steps})


def intact_checkpoint(path: Path) -> str:
    """Which checkpoint of a run is intact after a failed save of ``path`` (saves replace the file only once the
    new one is complete), for the error message."""
    for candidate in (path, io.previous_path(path)):
        if candidate.is_file():
            try:
                step = io.load_checkpoint(candidate)["step"]
            except CSDError:
                continue
            return (f"The checkpoint of step {step} ({candidate}) is intact: free some space, then resume the run "
                    "from it")
    return "No checkpoint of this run was written yet: free some space, then start it again"


def run_checkpoint(folder: io.PathLike) -> Optional[Path]:
    """The checkpoint a run folder resumes from, or None when it has none (yet)."""
    try:
        return io.find_checkpoint(folder)
    except CheckpointError:
        return None


def read_run_config(folder: io.PathLike) -> RunConfig:
    """The validated configuration saved in a run folder's ``config.json``."""
    path = Path(folder) / RUN_CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data.pop(RESOLVED_KEY, None)  # a record of the run, not a setting
        return RunConfig.from_dict(data).validate(require_model=False)
    except (OSError, ValueError) as e:  # unreadable, not JSON, or an invalid setting (ConfigError is a ValueError)
        kept = run_checkpoint(folder)
        fix = (f"The run's settings are also stored in its checkpoint {kept}: delete {path.name} to resume with "
               f"those, or restore it." if kept is not None else "It is the only record of this run's settings "
               "(it stopped before its first checkpoint): restore it, or start the run again.")
        raise CheckpointError(f"cannot use {path}: {e}. {fix}") from None


def load_scene(checkpoint: io.PathLike, map_location="cpu") -> tuple[Scene, RunConfig]:
    """The scene (and run config) saved in a run checkpoint."""
    state = io.load_checkpoint(checkpoint, map_location)
    config = RunConfig.from_dict(state["config"])
    scene = make_scene(config.scene)
    try:
        scene.load_state_dict(state["scene"])
    except RuntimeError as e:
        raise CheckpointError(f"the scene in {checkpoint} does not match its own configuration: {e}") from e
    scene.update_step(int(state.get("step", config.optim.steps)))
    return scene.eval(), config

