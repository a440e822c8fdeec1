"""Typed configuration of a run. Defaults come from the spec (CSD_SPEC.md); presets override them.

One definition drives the presets (``presets.py``), the command line and the nodes: each section is a dataclass,
``RunConfig.from_dict`` accepts nested dicts (an unknown key is an error naming it), ``validate()`` checks every
value and raises ``ConfigError`` naming the field and the fix.
"""
from __future__ import annotations

import bisect
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from .config_checks import box, choice, in_range, int_range, is_number, positive, range_pair, vec
from .errors import ConfigError
from .gaussian_config import GaussianConfig
from .schedules import ScheduleSpec, schedule_value, validate_schedule

DEFAULT_NEGATIVE_PROMPT = "oversaturated color, ugly, tiling, low quality, noisy"

GUIDANCE_MODES = ("csd", "sds", "edit", "vsd")
OPTIMIZERS = ("adam", "adamw")
WEIGHTINGS = ("uniform", "sds", "fantasia3d")
#: grad_normalize: over the whole batch tensor (spec §1.1) or per render and channel (CSD-MVDream)
GRAD_NORMALIZATIONS = ("l2", "std")
NORMAL_TYPES = ("analytic", "finite_difference")
BACKGROUNDS = ("neural_env", "solid")
ELEVATION_SAMPLING = ("csd-r1", "threestudio", "uniform-sphere", "uniform")
LIGHT_SAMPLING = ("dreamfusion", "magic3d")
#: what a run optimises: the stage-1 volume (NeRF), the stage-2 deformable tetrahedral SDF grid (DMTet, a mesh),
#: a fixed mesh (a user's) whose texture is painted, or 3D Gaussian splats (``gaussian_config.py``)
SCENE_KINDS = ("volume", "dmtet", "mesh", "gaussians")
RASTERIZERS = ("auto", "torch", "nvdiffrast")
#: hash-grid encoding backends (``scene/backends.py``): compiled = the torch reference's math through torch.compile
ENCODING_BACKENDS = ("auto", "torch", "compiled", "tcnn")
#: packed-compositing backends of the volume renderer (``render/volume_renderer.py``)
RENDER_BACKENDS = ("auto", "torch", "compiled")


def schedule(default: Any, doc: str = "") -> Any:
    """A dataclass field holding a schedule (``schedules.py``): ``with_steps`` stretches it with the run."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"schedule": True})
    return field(default=default, metadata={"schedule": True})


def step_count(default: int) -> Any:
    """A dataclass field holding a step number (a phase boundary): ``with_steps`` stretches it with the run."""
    return field(default=default, metadata={"steps": True})


def schedule_fields(section) -> List[str]:
    return [f.name for f in dataclasses.fields(section) if f.metadata.get("schedule")]


@dataclass
class PriorConfig:
    """Which diffusion model to use. ``model`` is a diffusers folder, a single-file checkpoint or a hub id."""

    model: str = ""
    #: for single-file checkpoints: a diffusers folder or hub id to take the architecture's configs from (MVDream:
    #: its yaml, or a folder with the tokenizer)
    model_config: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float16 | float32 | bfloat16
    #: image size the render is resized to before encoding (None: the model's native size, 512 for SD 1.5/2.1-base;
    #: above the native size: a warning, and the native size)
    resolution: Optional[int] = None
    #: a cap on the default above (presets lower the cost with it; a smaller model keeps its own size, silently)
    max_resolution: Optional[int] = None
    #: a diffusers ControlNet folder (e.g. SD 1.5 depth) conditioning the prior on the depth of each render
    controlnet: Optional[str] = None
    #: the ControlNet's conditioning scale
    controlnet_scale: float = 1.0
    #: VSD: a second model (folder, file or hub id) whose UNet carries the LoRA, as threestudio's
    #: pretrained_model_name_or_path_lora (ProlificDreamer: stabilityai/stable-diffusion-2-1, 768 v); None: the prior's
    lora_base_model: Optional[str] = None


@dataclass
class GuidanceConfig:
    """Score distillation (spec §1, §5.6). CSD: c=ω1, u=−ω2, n=−(ω1−ω2), k=0."""

    mode: str = "csd"  # csd | sds | edit | vsd (ProlificDreamer, ``vsd.py``)
    prompt: str = ""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    #: edit mode: the description of the current scene; it takes the negative slot (spec §4)
    source_prompt: str = ""
    #: ω1, the weight of the positive classifier score
    guidance_weight: ScheduleSpec = schedule(1.0)
    #: ω2, the (annealed) weight of the negative prompt; stage 1 ramps 0 → 1 over 5000 steps
    negative_weight: ScheduleSpec = schedule([0, 0.0, 1.0, 5000])
    #: SDS: classifier-free guidance scale s in threestudio's ε_y + s(ε_y − ε_u) (DreamFusion: 100); VSD: s in the
    #: diffusers form ε_u + s(ε_y − ε_u) of the frozen prediction, as threestudio's VSD (ProlificDreamer: 7.5)
    cfg_scale: float = 100.0
    weighting: str = "uniform"  # uniform | sds | fantasia3d
    grad_normalize: bool = True
    #: how grad_normalize normalises: l2 (g / ‖g‖ over the whole batch tensor, spec §1.1) | std (per render and
    #: channel g / std over H, W, unbiased, + 1e-8: the CSD-MVDream guidance)
    grad_normalize_by: str = "l2"
    #: the normalised direction's share: g ← s·ĝ + (1 − s)·g (CSD-MVDream grad_normalize_scale: 0.9)
    grad_normalize_scale: float = 1.0
    #: one timestep for the whole batch (the MVDream guidances) instead of one per render (spec §1.1)
    shared_timestep: bool = False
    #: MVDream's x0-reconstruction form (threestudio-mvdream recon_loss): the direction is z − x̂0 with
    #: x̂0 = (z_t − sqrt(1 − ᾱ)·ε̂)/sqrt(ᾱ) of the guided ε̂ = c·ε_y + u·ε_neg + n·ε_∅ (the k·ε term is not used)
    recon_loss: bool = False
    #: with recon_loss: x̂0 ← r·x̂0·std(x̂0_y)/std(x̂0) + (1 − r)·x̂0, the stds over each object's views (unbiased,
    #: + 1e-8), x̂0_y from ε_y alone (threestudio-mvdream recon_std_rescale: 0.5)
    recon_std_rescale: float = 0.0
    #: optional clamp of the gradient to ±clip (a schedule); None: no clamp
    grad_clip: Optional[ScheduleSpec] = schedule(None)
    min_step_percent: ScheduleSpec = schedule(0.02)
    max_step_percent: ScheduleSpec = schedule([5000, 0.98, 0.5, 5001])
    view_dependent: bool = True
    #: Perp-Neg (spec §1.3, the official character config): interpolated view embeddings and the perpendicular
    #: component of the other views' scores as a negative term, scaled by ``perp_neg_scale`` (SDS: by ``cfg_scale``
    #: inside the guidance, threestudio's ε_u + s·(ε_y − ε_u + Δ_perp))
    perp_neg: bool = False
    perp_neg_scale: float = 3.0
    #: the weight functions f(r) = a·exp(−b·r) + c as [a, b, c]: front↔side, side↔back, front (in the back half)
    perp_neg_f_fs: List[float] = field(default_factory=lambda: [4.0, 0.5, -2.426])
    perp_neg_f_sb: List[float] = field(default_factory=lambda: [1.0, 0.5, -0.606])
    perp_neg_f_fsb: List[float] = field(default_factory=lambda: [1.0, 0.5, 0.967])
    front_threshold: float = 45.0
    back_threshold: float = 45.0
    overhead_threshold: float = 60.0
    #: VSD (mode vsd, ``vsd.py``): a LoRA of the prior's own UNet, conditioned on the camera, learns the renders;
    #: its AdamW learning rate (threestudio prolificdreamer.yaml: the ``guidance`` parameter group, 0.0001)
    lora_lr: float = 1e-4
    #: VSD: the LoRA's rank on the attention projections (threestudio's LoRAAttnProcessor: 4)
    lora_rank: int = 4
    #: VSD: probability that a LoRA training step drops the camera condition (threestudio lora_cfg_training: 0.1)
    camera_condition_drop: float = 0.1
    #: VSD: classifier-free guidance of the LoRA's camera condition in the direction (threestudio
    #: guidance_scale_lora: 1, the camera branch alone)
    lora_cfg_scale: float = 1.0
    #: VSD: noisy copies of each render in the LoRA's training step (threestudio lora_n_timestamp_samples: 1)
    lora_timestep_samples: int = 1


@dataclass
class SceneConfig:
    """The implicit volume (spec §5.1)."""

    radius: float = 2.0
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    #: per-level scale b; None derives it from ``max_resolution``: N_max = N_min·b^(L−1)
    per_level_scale: Optional[float] = None
    max_resolution: int = 2048
    #: hash-grid levels in use (a schedule, rounded down; None = all): threestudio's progressive band hash grid
    #: (start level 8, one more every 500 steps from step 2000) is ``[2000, 8, 16, 6000]``; the finer levels
    #: output zeros until they switch on
    active_levels: Optional[ScheduleSpec] = schedule(None)
    mlp_width: int = 64
    mlp_hidden_layers: int = 1
    density_bias: str = "blob_magic3d"  # blob_magic3d | blob_dreamfusion | none
    density_blob_scale: float = 10.0
    density_blob_std: float = 0.5
    normal_type: str = "analytic"  # analytic | finite_difference
    finite_difference_eps: float = 0.01
    background: str = "neural_env"  # neural_env | solid
    background_color: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    #: replace the background by a random solid colour per batch item with this probability (random_aug)
    random_background_prob: float = 0.5
    #: the random colour is one for the whole batch (threestudio share_aug_bg) instead of one per render
    random_background_shared: bool = False
    #: auto (on CUDA: tcnn when usable, else compiled when a trial torch.compile works, else torch; on the CPU:
    #: torch) | torch | compiled (torch.compile of the torch math, fused backward) | tcnn
    encoding_backend: str = "auto"
    #: volume (stage 1) | dmtet (stage 2: per-vertex SDF and deformation of a tetrahedral grid, re-meshed every
    #: step by marching tetrahedra) | mesh (fixed geometry, only the texture and background train)
    kind: str = "volume"
    #: dmtet: the grid's resolution in threestudio's sense (``load/tets/{res}_tets.npz``): res/2 cubes a side
    tet_resolution: int = 256
    #: dmtet / mesh: the box ``[[x0, y0, z0], [x1, y1, z1]]`` (world units) the geometry lives in; None: ±radius
    bbox: Optional[List[List[float]]] = None
    #: stage 1 → dmtet: the density level of the surface (spec §5.3: τ = 10), "auto" (the mean density where there
    #: is any, as the mesh export) or "silhouette" (the level whose surface has the volume's silhouettes: for short
    #: runs, whose soft density stays below 10)
    isosurface_threshold: Union[float, str] = 10.0
    #: dmtet: freeze the SDF and the deformation (only the texture and background train)
    fix_geometry: bool = False
    #: stage 1 → dmtet: keep the volume's trained background; False: a fresh one from the run's seed, as the official
    #: refine configs (threestudio converts the geometry and texture field only)
    keep_background: bool = False
    #: gaussians: the splats, their renderer, learning rates and density control
    gaussians: GaussianConfig = field(default_factory=GaussianConfig)

    def level_scale(self) -> float:
        if self.per_level_scale is not None:
            return float(self.per_level_scale)
        if self.n_levels == 1:
            return 1.0
        return math.exp(math.log(self.max_resolution / self.base_resolution) / (self.n_levels - 1))


@dataclass
class CameraConfig:
    """Camera sampling (spec §3.1). Angles in degrees; positions (r·cosφ·cosθ, r·cosφ·sinθ, r·sinφ), up = +z."""

    #: render size and views a step: a number, or one number per phase of ``resolution_milestones`` (threestudio's
    #: ``height: [64, 512]``)
    height: Union[int, List[int]] = 64
    width: Union[int, List[int]] = 64
    #: the official object config trains with 4 views a step (stratified azimuth)
    batch_size: Union[int, List[int]] = 4
    #: steps where the next phase's height/width/batch_size take over (ProlificDreamer: 64² → 512² at step 5000:
    #: ``[5000]``); empty: one phase
    resolution_milestones: List[int] = field(default_factory=list, metadata={"steps": True})
    elevation_range: List[float] = field(default_factory=lambda: [-10.0, 90.0])
    azimuth_range: List[float] = field(default_factory=lambda: [-180.0, 180.0])
    distance_range: List[float] = field(default_factory=lambda: [1.5, 2.0])
    fovy_range: List[float] = field(default_factory=lambda: [40.0, 70.0])
    #: stratified azimuth in the batch: (rand + i)/B·360 − 180
    stratified_azimuth: bool = True
    #: before this step, azimuth is only front (0±30°) or back (180±30°)
    front_back_only_steps: int = step_count(0)
    #: views of one object a step (MVDream: 4): the batch is batch_size / n_views objects, each seen by n_views
    #: consecutive cameras at equally spaced azimuths with one draw of elevation, distance, fovy, jitter and light
    #: (threestudio-mvdream's random-multiview sampler); 1: every camera drawn on its own
    n_views: int = 1
    #: distance_range is relative to the field of view: the distance is d / tan(fovy / 2), so the object fills the
    #: same part of every view (threestudio-mvdream relative_radius)
    relative_distance: bool = False
    #: csd-r1: half uniform in degrees, half the official asin(2u − 1) quirk; threestudio: half uniform in degrees,
    #: half uniform on the sphere (asin(U[sin e0, sin e1])); uniform-sphere; uniform (in degrees)
    elevation_sampling: str = "csd-r1"
    #: jitter of the camera position: uniform in ±camera_perturb per coordinate (world units; threestudio 0.1)
    camera_perturb: ScheduleSpec = schedule(0.0)
    #: jitter of the look-at point: normal with this std per coordinate (threestudio 0.2)
    center_perturb: ScheduleSpec = schedule(0.0)
    #: jitter of the up vector (+z) before orthogonalisation: normal with this std (threestudio 0.02)
    up_perturb: ScheduleSpec = schedule(0.0)
    #: the very first step renders at elevation 15°, azimuth 0 (threestudio progressive_until=0)
    first_step_fixed_view: bool = True
    light_distance_range: List[float] = field(default_factory=lambda: [1.5, 2.0])
    #: threestudio's light_sample_strategy: dreamfusion (around the camera, below) | magic3d (within 60° of the
    #: camera's direction: light elevation U[30°, 90°] and azimuth U[−180°, 180°] about it)
    light_sampling: str = "dreamfusion"
    #: dreamfusion light: direction = normalise(camera position + N(0, light_position_perturb²)) (threestudio 1.0)
    light_position_perturb: ScheduleSpec = schedule(0.1)
    #: evaluation / preview views
    eval_distance: float = 2.0
    eval_fovy: float = 70.0
    eval_elevation: float = 15.0

    def phase(self, step: int) -> int:
        """Index of the size phase at ``step`` (the phase starts at its milestone)."""
        return bisect.bisect_right(self.resolution_milestones, step)

    def size_at(self, step: int) -> Tuple[int, int, int]:
        """``(batch_size, height, width)`` of the training renders at ``step``."""
        k = self.phase(step)
        return tuple(v[k] if isinstance(v, list) else v for v in (self.batch_size, self.height, self.width))

    def sizes(self) -> List[Tuple[int, int, int]]:
        """``(batch_size, height, width)`` of every phase, in order (the last is the final size)."""
        return [self.size_at(m) for m in [0] + list(self.resolution_milestones)]


@dataclass
class RenderConfig:
    """Volume rendering (spec §5.2)."""

    num_samples_per_ray: int = 512
    grid_resolution: int = 32
    grid_update_every: int = 16
    grid_ema_decay: float = 0.95
    grid_threshold: float = 0.01
    grid_warmup_steps: int = 256
    #: prune samples with alpha below this before the differentiable pass (nerfacc alpha_thre)
    alpha_threshold: float = 0.01
    #: stop marching once transmittance falls below this (nerfacc early_stop_eps)
    early_stop_eps: float = 1e-4
    stratified: bool = True
    #: shading after the warm-up: probability of albedo; the rest is split by textureless_prob
    ambient_only_steps: int = step_count(2001)
    albedo_prob: float = 0.5
    #: of the non-albedo renders, the fraction that is "textureless" (the rest is Lambertian "diffuse")
    textureless_prob: float = 1.0
    #: textureless renders show the normal map n·0.5+0.5 (CSD) instead of grey Lambertian shading
    textureless_normal: bool = True
    ambient_light: float = 0.1
    diffuse_light: float = 0.9
    #: training renders lit by the light use diffuse d ~ U[0, 1] drawn per step and ambient 1 − d instead of the two
    #: above (threestudio's soft_shading, Magic3D)
    soft_shading: bool = False
    chunk_size: int = 1 << 18
    #: mesh scenes (dmtet, mesh): auto (nvdiffrast on CUDA when usable, else torch) | torch | nvdiffrast
    rasterizer: str = "auto"
    #: volume scenes, the packed compositing (per-ray transmittance, weights, per-ray sums): auto (compiled on CUDA
    #: when a trial torch.compile works, else torch; on the CPU: torch) | torch | compiled (torch.compile)
    backend: str = "auto"


@dataclass
class LossConfig:
    """Loss weights (schedules) for stage 1 (spec §3.1)."""

    guidance: ScheduleSpec = schedule(1.0)
    orient: ScheduleSpec = schedule([5000, 1.0, 20.0, 5001])
    sparsity: ScheduleSpec = schedule(1.0)
    opaque: ScheduleSpec = schedule(0.0)
    #: mesh scenes: mean over mesh edges of 1 − cos of the vertex normals at its ends (stage 2: 1000)
    normal_consistency: ScheduleSpec = schedule(0.0)
    laplacian: ScheduleSpec = schedule(0.0)  #: mesh scenes: uniform Laplacian smoothing of the vertices


@dataclass
class OptimConfig:
    steps: int = 10000
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-15
    #: learning rates of parts of the scene by parameter-name prefix, e.g. {"background": 0.001} (threestudio's
    #: optimizer.params); every other parameter uses ``lr``
    group_lr: Dict[str, float] = field(default_factory=dict)
    #: a schedule multiplying every learning rate at each step, e.g. ``[75, 1.0, 0.1, 150]``: a tenth from step 150
    lr_scale: ScheduleSpec = schedule(1.0)
    #: the scene's optimiser (threestudio's optimizer.name): adam | adamw (decoupled weight decay)
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500
    preview_every: int = 100


@dataclass
class RunConfig:
    prior: PriorConfig = field(default_factory=PriorConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    scene: SceneConfig = field(default_factory=SceneConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    preset: str = ""

    # ------------------------------------------------------------ conversion
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RunConfig":
        return merge_config(cls(), data)

    def replace(self, **sections: Dict[str, Any]) -> "RunConfig":
        """A copy with the given sections' fields overridden, e.g. ``cfg.replace(optim={"steps": 10})``."""
        return merge_config(self, sections)

    def with_steps(self, steps: int, rescale_schedules: bool = True) -> "RunConfig":
        """A copy that runs ``steps`` steps; with ``rescale_schedules`` every schedule and phase boundary (the
        fields declared with ``schedule()`` / ``step_count()``) is stretched by ``steps / current steps`` so a
        shorter run keeps the same phases."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            raise ConfigError("steps", f"must be a positive integer, got {steps!r}")
        new = copy.deepcopy(self)
        if rescale_schedules and steps != self.optim.steps:
            f = steps / self.optim.steps
            for section in (new.guidance, new.scene, new.scene.gaussians, new.camera, new.render, new.loss, new.optim):
                for fld in dataclasses.fields(section):
                    v = getattr(section, fld.name)
                    if fld.metadata.get("schedule") and isinstance(v, list) and len(v) in (3, 4):
                        setattr(section, fld.name, _rescale_schedule(v, f))
                    elif fld.metadata.get("steps"):  # a count held at its field's least value (a length: 1)
                        least = fld.metadata.get("least", 0)
                        setattr(section, fld.name, [max(least, int(round(x * f))) for x in v] if isinstance(v, list)
                                else max(least, int(round(v * f))))
        new.optim.steps = steps
        return new

    # ------------------------------------------------------------ validation
    def validate(self, require_model: bool = True) -> "RunConfig":
        g, s, c, r, o = self.guidance, self.scene, self.camera, self.render, self.optim
        if require_model and not self.prior.model.strip():
            raise ConfigError("model", "no diffusion model given; pass a diffusers folder, a .safetensors file or a hub id")
        for name in ("resolution", "max_resolution"):
            if getattr(self.prior, name) is not None:
                int_range(f"prior.{name}", getattr(self.prior, name), 8, 8192)
        if self.prior.controlnet is not None and not isinstance(self.prior.controlnet, str):
            raise ConfigError("prior.controlnet", f"must be a folder path or null, got {self.prior.controlnet!r}")
        in_range("prior.controlnet_scale", self.prior.controlnet_scale, 0.0, 10.0)
        base = self.prior.lora_base_model
        if base is not None and (not isinstance(base, str) or not base.strip() or g.mode != "vsd"):
            raise ConfigError("prior.lora_base_model", f"{base!r}: only VSD (guidance.mode vsd) trains a LoRA; give "
                                                       f"a model folder, file or hub id with mode vsd, or none")
        choice("guidance.mode", g.mode, GUIDANCE_MODES)
        choice("guidance.weighting", g.weighting, WEIGHTINGS)
        choice("guidance.grad_normalize_by", g.grad_normalize_by, GRAD_NORMALIZATIONS)
        in_range("guidance.grad_normalize_scale", g.grad_normalize_scale, 0.0, 1.0)
        in_range("guidance.recon_std_rescale", g.recon_std_rescale, 0.0, 1.0)
        for name in ("prompt", "negative_prompt", "source_prompt"):
            if not isinstance(getattr(g, name), str):
                raise ConfigError(name, f"must be text, got {type(getattr(g, name)).__name__}")
        for section, names in ((g, ("grad_normalize", "view_dependent", "perp_neg", "shared_timestep", "recon_loss")),
                               (r, ("stratified", "textureless_normal", "soft_shading")),
                               (c, ("stratified_azimuth", "first_step_fixed_view", "relative_distance")),
                               (s, ("random_background_shared",))):
            for name in names:
                if not isinstance(getattr(section, name), bool):
                    raise ConfigError(name, f"must be true or false, got {getattr(section, name)!r}")
        if not g.prompt.strip():
            raise ConfigError("prompt", "the prompt is empty; describe the object to generate, e.g. 'a DSLR photo of a corgi'")
        if g.mode == "edit" and not g.source_prompt.strip():
            raise ConfigError("source_prompt", "edit mode needs the description of the current scene as the source prompt")
        for name in ("guidance_weight", "negative_weight"):
            validate_schedule(getattr(g, name), f"guidance.{name}")
        for name in ("min_step_percent", "max_step_percent"):
            validate_schedule(getattr(g, name), f"guidance.{name}", minimum=0.0)
        for step in _schedule_knots(g.min_step_percent, g.max_step_percent, total=self.optim.steps):
            lo, hi = schedule_value(g.min_step_percent, step), schedule_value(g.max_step_percent, step)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ConfigError("guidance.min_step_percent/max_step_percent",
                                  f"need 0 <= min <= max <= 1 at every step; at step {step} min is {lo} and max is {hi}")
        if g.grad_clip is not None:
            validate_schedule(g.grad_clip, "guidance.grad_clip", positive=True)
        positive("guidance.cfg_scale", g.cfg_scale, allow_zero=True)
        positive("guidance.perp_neg_scale", g.perp_neg_scale, allow_zero=True)
        positive("guidance.lora_lr", g.lora_lr)
        int_range("guidance.lora_rank", g.lora_rank, 1, 1024)
        in_range("guidance.camera_condition_drop", g.camera_condition_drop, 0.0, 1.0)
        positive("guidance.lora_cfg_scale", g.lora_cfg_scale, allow_zero=True)
        int_range("guidance.lora_timestep_samples", g.lora_timestep_samples, 1, 64)
        for name in ("perp_neg_f_fs", "perp_neg_f_sb", "perp_neg_f_fsb"):
            vec(f"guidance.{name}", getattr(g, name), 3, -1e3, 1e3)
        if g.perp_neg and not g.view_dependent:
            raise ConfigError("guidance.perp_neg", "Perp-Neg interpolates the view-dependent prompts: turn "
                                                   "view_dependent on, or perp_neg off")
        for name in ("front_threshold", "back_threshold"):
            in_range(f"guidance.{name}", getattr(g, name), 0.0, 180.0)
        in_range("guidance.overhead_threshold", g.overhead_threshold, -90.0, 90.0)

        positive("scene.radius", s.radius)
        for name in ("n_levels", "n_features_per_level", "base_resolution", "mlp_width"):
            int_range(f"scene.{name}", getattr(s, name), 1, 1 << 16)
        int_range("scene.log2_hashmap_size", s.log2_hashmap_size, 4, 26)
        int_range("scene.mlp_hidden_layers", s.mlp_hidden_layers, 0, 16)
        if s.per_level_scale is None and s.max_resolution < s.base_resolution:
            raise ConfigError("scene.max_resolution", f"{s.max_resolution} is below base_resolution {s.base_resolution}")
        if s.per_level_scale is not None:
            positive("scene.per_level_scale", s.per_level_scale)
        if s.active_levels is not None:  # values above n_levels mean every level (threestudio clamps too)
            validate_schedule(s.active_levels, "scene.active_levels", minimum=1.0)
        choice("scene.density_bias", s.density_bias, ("blob_magic3d", "blob_dreamfusion", "none"))
        choice("scene.normal_type", s.normal_type, NORMAL_TYPES)
        choice("scene.background", s.background, BACKGROUNDS)
        choice("scene.encoding_backend", s.encoding_backend, ENCODING_BACKENDS)
        positive("scene.density_blob_std", s.density_blob_std)
        positive("scene.density_blob_scale", s.density_blob_scale, allow_zero=True)
        positive("scene.finite_difference_eps", s.finite_difference_eps)
        in_range("scene.random_background_prob", s.random_background_prob, 0.0, 1.0)
        vec("scene.background_color", s.background_color, 3, 0.0, 1.0)
        choice("scene.kind", s.kind, SCENE_KINDS)
        s.gaussians.validate()
        if not isinstance(s.tet_resolution, int) or isinstance(s.tet_resolution, bool) or s.tet_resolution % 2 \
                or not 8 <= s.tet_resolution <= 512:
            raise ConfigError("scene.tet_resolution", f"must be an even integer in [8, 512] (threestudio's 32, 64, "
                                                      f"128 or 256), got {s.tet_resolution!r}")
        if s.bbox is not None:
            box("scene.bbox", s.bbox)
        if s.isosurface_threshold not in ("auto", "silhouette"):
            if isinstance(s.isosurface_threshold, str):
                raise ConfigError("scene.isosurface_threshold", f"{s.isosurface_threshold!r}: give a density "
                                                                f"(spec: 10), 'auto' or 'silhouette'")
            positive("scene.isosurface_threshold", s.isosurface_threshold)
        for name in ("fix_geometry", "keep_background"):
            if not isinstance(getattr(s, name), bool):
                raise ConfigError(f"scene.{name}", f"must be true or false, got {getattr(s, name)!r}")

        _camera_phases(c)
        range_pair("camera.elevation_range", c.elevation_range, -90.0, 90.0)
        range_pair("camera.azimuth_range", c.azimuth_range, -360.0, 360.0)
        range_pair("camera.distance_range", c.distance_range, 1e-3, 1e4)
        range_pair("camera.fovy_range", c.fovy_range, 1.0, 179.0)
        range_pair("camera.light_distance_range", c.light_distance_range, 1e-3, 1e4)
        choice("camera.elevation_sampling", c.elevation_sampling, ELEVATION_SAMPLING)
        choice("camera.light_sampling", c.light_sampling, LIGHT_SAMPLING)
        int_range("camera.front_back_only_steps", c.front_back_only_steps, 0, 1 << 30)
        if min(c.distance_range) <= 0:
            raise ConfigError("camera.distance_range", "distances must be positive")

        int_range("render.num_samples_per_ray", r.num_samples_per_ray, 4, 8192)
        int_range("render.grid_resolution", r.grid_resolution, 4, 512)
        int_range("render.grid_update_every", r.grid_update_every, 1, 1 << 20)
        in_range("render.grid_ema_decay", r.grid_ema_decay, 0.0, 1.0)
        in_range("render.albedo_prob", r.albedo_prob, 0.0, 1.0)
        in_range("render.textureless_prob", r.textureless_prob, 0.0, 1.0)
        in_range("render.alpha_threshold", r.alpha_threshold, 0.0, 1.0)
        int_range("render.chunk_size", r.chunk_size, 1024, 1 << 30)
        choice("render.rasterizer", r.rasterizer, RASTERIZERS)
        choice("render.backend", r.backend, RENDER_BACKENDS)
        int_range("render.ambient_only_steps", r.ambient_only_steps, 0, 1 << 40)
        int_range("render.grid_warmup_steps", r.grid_warmup_steps, 0, 1 << 40)
        in_range("render.grid_threshold", r.grid_threshold, 0.0, 1e6)
        in_range("render.early_stop_eps", r.early_stop_eps, 0.0, 1.0)
        in_range("render.ambient_light", r.ambient_light, 0.0, 1.0)
        in_range("render.diffuse_light", r.diffuse_light, 0.0, 1.0)
        positive("camera.eval_distance", c.eval_distance)
        in_range("camera.eval_fovy", c.eval_fovy, 1.0, 179.0)
        in_range("camera.eval_elevation", c.eval_elevation, -90.0, 90.0)
        for name in ("camera_perturb", "center_perturb", "up_perturb", "light_position_perturb"):
            validate_schedule(getattr(c, name), f"camera.{name}", minimum=0.0)

        for name in ("guidance", "orient", "sparsity", "opaque", "normal_consistency", "laplacian"):
            validate_schedule(getattr(self.loss, name), f"loss.{name}", minimum=0.0)

        int_range("steps", o.steps, 1, 10_000_000)
        positive("optim.lr", o.lr)
        validate_schedule(o.lr_scale, "optim.lr_scale", positive=True)
        vec("optim.betas", o.betas, 2, 0.0, 0.999999)
        choice("optim.optimizer", o.optimizer, OPTIMIZERS)
        in_range("optim.weight_decay", o.weight_decay, 0.0, 1.0)
        positive("optim.eps", o.eps)
        if not isinstance(o.group_lr, dict):
            raise ConfigError("optim.group_lr", f"must be a mapping of parameter-name prefix to learning rate, e.g. "
                                                f'{{"background": 0.001}}, got {o.group_lr!r}')
        for prefix, lr in o.group_lr.items():
            if not isinstance(prefix, str) or not prefix:
                raise ConfigError("optim.group_lr", f"keys must be parameter-name prefixes such as 'background', "
                                                    f"got {prefix!r}")
            positive(f"optim.group_lr.{prefix}", lr)
        int_range("optim.checkpoint_every", o.checkpoint_every, 0, 1 << 30)
        int_range("optim.preview_every", o.preview_every, 0, 1 << 30)
        int_range("seed", o.seed, 0, 2**63 - 1)
        return self


def _camera_phases(c: "CameraConfig") -> None:
    """Milestones: increasing positive steps; height/width/batch_size: a number or one per phase; every batch whole
    objects of ``n_views`` views."""
    m = c.resolution_milestones
    if (not isinstance(m, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in m)
            or any(a >= b for a, b in zip(m, m[1:]))):
        raise ConfigError("camera.resolution_milestones", f"must be a list of increasing steps (>= 0), e.g. "
                                                          f"[5000] (or [] for one size), got {m!r}")
    n = len(m) + 1
    for name, lo, hi in (("height", 8, 4096), ("width", 8, 4096), ("batch_size", 1, 256)):
        value = getattr(c, name)
        if isinstance(value, list):
            if len(value) != n:
                raise ConfigError(f"camera.{name}", f"has {len(value)} values for {n} phases (resolution_milestones "
                                                    f"{m}): give one number, or {n} numbers")
            for v in value:
                int_range(f"camera.{name}", v, lo, hi)
        else:
            int_range(f"camera.{name}", value, lo, hi)
    int_range("camera.n_views", c.n_views, 1, 64)
    for batch in (c.batch_size if isinstance(c.batch_size, list) else [c.batch_size]):
        if batch % c.n_views:
            raise ConfigError("camera.n_views", f"a batch of {batch} renders is not whole objects of {c.n_views} "
                                                f"views: make camera.batch_size a multiple of n_views (MVDream: "
                                                f"batch 8 then 4, 4 views)")
    if c.n_views > 1 and c.front_back_only_steps:
        raise ConfigError("camera.front_back_only_steps", "the front/back-only warm-up draws single views; with "
                                                          f"n_views {c.n_views} set it to 0")


def _schedule_knots(*specs, total: int = 0):
    """Steps where piecewise-linear schedules can reach their extremes: 0, every knot, and the last step."""
    steps = {0, max(total - 1, 0)}
    for spec in specs:
        if isinstance(spec, (list, tuple)) and len(spec) in (3, 4):
            s0, s1 = (0, spec[2]) if len(spec) == 3 else (spec[0], spec[3])
            steps.update({int(s0), int(s1)})
    return sorted(steps)


def _rescale_schedule(v: List[float], f: float) -> List[float]:
    if len(v) == 3:
        return [v[0], v[1], int(round(v[2] * f))]
    return [int(round(v[0] * f)), v[1], v[2], int(round(v[3] * f))]


def merge_config(base, overrides: Dict[str, Any], prefix: str = ""):
    """Deep-copy ``base`` (a dataclass) with ``overrides`` (nested dicts) applied. Unknown keys raise."""
    new = copy.deepcopy(base)
    if overrides is None:
        return new
    if not isinstance(overrides, dict):
        raise ConfigError(prefix.rstrip(".") or "config", f"expected a mapping, got {type(overrides).__name__}")
    names = {f.name: f for f in dataclasses.fields(new)}
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(path, f"unknown setting; valid ones are: {', '.join(sorted(names))}")
        current = getattr(new, key)
        if dataclasses.is_dataclass(current):
            setattr(new, key, merge_config(current, value, prefix=f"{path}."))
        else:
            setattr(new, key, copy.deepcopy(value))
    return new


ConfigLike = Union[RunConfig, Dict[str, Any]]
