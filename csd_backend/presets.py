"""Named configurations (data, not code branches). Each is a set of overrides on ``RunConfig``'s defaults.

- ``csd-coarse``: spec stage 1 (object config, `csd-if-object.yaml`) coefficients with an SD prior; renders at
  64² upsampled to 512 for the VAE; batch 4 with stratified azimuth, as the official object config.
- ``csd-coarse-character``: the character config (`csd-if.yaml`): radius 1, 12 levels up to 512, front/back
  warm-up for 1000 steps, thresholds 30°, orientation 1→100 and sparsity 10→1 over 5000 steps, Perp-Neg (scale 3,
  spec §1.3) as the official character config.
- ``csd-coarse-if`` / ``csd-coarse-character-if``: the two official stage-1 configs exactly, with their prior
  (spec §3.1): DeepFloyd IF stage I in 64² pixel space (``--model DeepFloyd/IF-I-XL-v1.0`` or an IF folder), the
  renders taken at 64 as they are. ``csd-coarse-if`` is `csd-if-object.yaml` (``csd-coarse`` with the IF prior);
  ``csd-coarse-character-if`` is `csd-if.yaml` (``csd-coarse-character`` with the IF prior; Perp-Neg on, scale 3).
- ``sds-dreamfusion``: the DreamFusion baseline exactly as threestudio's `dreamfusion-sd.yaml` (threestudio
  @28d9d80): CFG 100 in threestudio's form, w = 1 − ᾱ, progressive band hash grid, background lr 1e-3, camera /
  centre / up jitter, dreamfusion light jitter, threestudio's elevation sampling, view thresholds 45°.
- ``csd-edit``: edit an existing scene: the source description in the negative slot, ω1 = ω2 = 1, stage-2-like
  t-range and weighting, short.
- ``preview-cpu``: a small grid, few samples and 150 steps of 4 views that converge on a laptop CPU; the opacity
  pushed to 0 or 1 (``loss.opaque`` 0 → 100 over the run) so that so short a run ends as a surface, not a cloud, and
  the sparsity 3 → 1 over the run (a tighter early shape).

VSD (ProlificDreamer, ``guidance.mode`` vsd, ``vsd.py``: a camera-conditioned LoRA of the prior's own UNet learns
the renders and is subtracted from the frozen CFG prediction):

- ``vsd-prolificdreamer``: threestudio `prolificdreamer.yaml` (threestudio @28d9d80) stage 1 (``coarse``), value for
  value where a field exists: SD 2.1-base, CFG 7.5 (diffusers form), w = 1 − ᾱ, t ∈ [0.02, 0.98] → [0.02, 0.5] at step
  5000, no gradient normalisation or clipping, negative prompt "", view thresholds 30°; LoRA rank 4 on every
  attention's q/k/v/out, its AdamW at lr 1e-4 (the ``guidance`` parameter group) with the run's betas and eps,
  camera condition (c2w) dropped with probability 0.1, one timestep sample; NeRF radius 1, hash grid 16 levels ×
  2 features, 2^19, base 16, per-level scale 1.4473 (max 4096), blob_magic3d density (10, 0.5), softplus,
  neural environment background with random solid colours half the time (random_aug), 512 samples per ray, renders
  always albedo (``no-material`` and ``normal_type: null``: no shading, no normals); 64² renders until step 5000,
  then 512² (``resolution_milestones: [5000]``; stretched with the run's length), batch 1, elevation
  [−10°, 45°], distance [1, 1.5], fovy [40°, 70°], no camera/centre/up jitter, threestudio elevation sampling and
  dreamfusion light defaults, eval distance 1.5; sparsity 10, opaque 0 → 1000 at step 10000, orientation 0; lr 0.01
  on the hash grid and 0.001 on the MLPs and background, betas (0.9, 0.99), eps 1e-15, AdamW with torch's default
  weight decay 0.01 in every group (``optim.optimizer: adamw``); 25000 steps. The LoRA's second model, SD 2.1 (768,
  v-prediction, ``pretrained_model_name_or_path_lora``), is ``prior.lora_base_model`` (``--lora-base-model``) when
  given; without it the LoRA adapts the prior's own UNet (threestudio's single-model path).
  Not reproduced (no field maps them): ``lambda_lora`` (the LoRA loss has its own optimiser, so its weight would only
  rescale what Adam normalises); ``sqrt_anneal`` and ``use_img_loss`` (off in the config); validation and test
  settings.
- ``vsd-preview-cpu``: the same guidance with preview-cpu's small grid (8 levels up to 256, 2^16), 96 samples per
  ray, 64² renders throughout, prior input at most 256 and 150 steps (t-range switch at step 75) on a laptop CPU;
  sparsity 1 and lr 0.01 on every part with Adam (no weight decay), as preview-cpu (ProlificDreamer's sparsity 10
  and MLP lr 0.001 erase the object within 150 steps: measured with the toy prior, "a red cube"), and the LoRA at lr
  1e-3 so that it follows the scene in so few steps.

MVDream (``priors/mvdream.py``: multi-view SD 2.1 conditioned on each object's 4 cameras; ``camera.n_views`` 4):

- ``csd-mvdream``: the official CSD-MVDream run (spec §1.2 R2, `csd.yaml` of the CSD-MVDream branch) value for value:
  ε_y − ε_neg with MVDream's long negative prompt, std normalisation 0.9·g/std + 0.1·g, one t per step falling from
  0.98 to [0.02, 0.5] over 8000 steps, batch [8, 4] of 4-view objects at 64² then 256² from step 5000, elevation
  0–30°, fovy 15–60°, distance 0.8–1.0 relative to the field of view, radius 1, hash grid up to 4096, AdamW (lr 0.01
  on the encoding, 0.001 on the MLPs and background), orientation 10 → 1000, 10k steps.
- ``sds-mvdream``: threestudio-mvdream's `mvdream-sd21.yaml`: SDS in MVDream's x0-reconstruction form with CFG 50
  (``cfg_scale`` 49 in the engine's form) and the std rescale 0.5, albedo renders only.
- ``mvdream-cpu``: csd-mvdream with one 4-view object at 64², preview-cpu's grid and 150 steps, for a CPU.

Stage 2 (``scene.kind`` dmtet: a stage-1 run converted to a deformable tetrahedral SDF grid and refined through
the rasterizer; the scene's hash grid, radius and background kind come from the stage-1 run, the background's
weights start afresh from the run's seed as in the official refine configs unless ``scene.keep_background``):

- ``csd-refine``: spec §3.2 (`csd-sd-refine.yaml`): 512², SD 2.1-base, w = 1 − ᾱ, ω2 1 → 0.5 over 10k steps,
  t ∈ [0.02, 0.5], normal consistency 1000, 50 % albedo / 50 % normal-map renders from step 0, lr 1e-3, tet
  resolution 256. ``csd-refine-object`` is the object config (radius 2.0, the only difference; a refined scene
  keeps the radius of the run it is converted from either way).
- ``sds-refine``: threestudio `magic3d-refine-sd.yaml`, value for value: SDS with CFG 100, lr 0.01, β2 0.99, normal
  consistency 10000, tet resolution 128, 5000 steps, the surface at the "auto" level (magic3d-coarse-sd.yaml's),
  magic3d light sampling, soft shading, a fresh background.
- ``refine-cpu``: a 64 tet grid, 64² renders and 150 steps that run on a laptop CPU; it keeps the volume's trained
  background (``scene.keep_background``).

Texturing a user's mesh (``scene.kind`` mesh: fixed geometry; spec §4, inferred there): stage-2 CSD coefficients,
renders half albedo, half Lambertian-shaded (a normal-map render carries no texture gradient):

- ``csd-texture``: 512², SD, 5000 steps, lr 0.01 on the texture field and background.
- ``texture-cpu``: 64² renders and 150 steps on a laptop CPU.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

from .config import RunConfig
from .errors import ConfigError

_STAGE1_OBJECT: Dict[str, Any] = {
    "guidance": {"mode": "csd", "guidance_weight": 1.0, "negative_weight": [0, 0.0, 1.0, 5000],
                 "weighting": "uniform", "grad_normalize": True, "min_step_percent": 0.02,
                 "max_step_percent": [5000, 0.98, 0.5, 5001], "front_threshold": 30.0, "back_threshold": 30.0},
    "scene": {"radius": 2.0, "n_levels": 16, "n_features_per_level": 2, "log2_hashmap_size": 19,
              "base_resolution": 16, "per_level_scale": 1.381912879967776, "max_resolution": 2048,
              "random_background_prob": 0.5},
    "camera": {"height": 64, "width": 64, "batch_size": 4, "elevation_range": [-10.0, 90.0],
               "stratified_azimuth": True, "front_back_only_steps": 0, "elevation_sampling": "csd-r1",
               "camera_perturb": 0.0, "center_perturb": 0.0, "up_perturb": 0.0, "light_position_perturb": 0.1,
               "light_distance_range": [1.5, 2.0]},
    "render": {"num_samples_per_ray": 512, "ambient_only_steps": 2001, "albedo_prob": 0.5, "textureless_prob": 1.0,
               "textureless_normal": True},
    "loss": {"orient": [5000, 1.0, 20.0, 5001], "sparsity": 1.0, "opaque": 0.0},
    "optim": {"steps": 10000, "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-15, "checkpoint_every": 500,
              "preview_every": 200},
    "prior": {"resolution": None, "max_resolution": 512},
}


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# spec §3.2: the stage-2 (DMTet) character config, csd-sd-refine.yaml
_STAGE2_CSD: Dict[str, Any] = _merge(_STAGE1_OBJECT, {
    "guidance": {"mode": "csd", "guidance_weight": 1.0, "negative_weight": [0, 1.0, 0.5, 10000],
                 "weighting": "sds", "grad_normalize": False, "min_step_percent": 0.02, "max_step_percent": 0.5,
                 "front_threshold": 45.0, "back_threshold": 45.0, "overhead_threshold": 60.0},
    "scene": {"kind": "dmtet", "tet_resolution": 256, "isosurface_threshold": 10.0, "fix_geometry": False,
              "radius": 1.0, "random_background_prob": 0.5},
    "camera": {"height": 512, "width": 512, "batch_size": 1, "distance_range": [1.5, 2.0], "fovy_range": [40.0, 70.0],
               "elevation_range": [-10.0, 45.0], "azimuth_range": [-180.0, 180.0], "stratified_azimuth": False,
               "front_back_only_steps": 0, "eval_distance": 1.5, "eval_fovy": 70.0},
    "render": {"ambient_only_steps": 0, "albedo_prob": 0.5, "textureless_prob": 1.0, "textureless_normal": True},
    "loss": {"guidance": 1.0, "orient": 0.0, "sparsity": 0.0, "opaque": 0.0, "normal_consistency": 1000.0,
             "laplacian": 0.0},
    "optim": {"steps": 10000, "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-15, "checkpoint_every": 500,
              "preview_every": 200},
    "prior": {"resolution": None, "max_resolution": 512},
})

PRESETS: Dict[str, Dict[str, Any]] = {
    "csd-coarse": _STAGE1_OBJECT,
    "csd-coarse-character": _merge(_STAGE1_OBJECT, {
        "scene": {"radius": 1.0, "n_levels": 12, "per_level_scale": 1.3703509847201883, "max_resolution": 512},
        "guidance": {"perp_neg": True, "perp_neg_scale": 3.0},
        "camera": {"batch_size": 1, "elevation_range": [-10.0, 45.0], "stratified_azimuth": False,
                   "front_back_only_steps": 1000},
        "render": {"ambient_only_steps": 5001},
        "loss": {"orient": [0, 1.0, 100.0, 5000], "sparsity": [0, 10.0, 1.0, 5000]},
    }),
    # threestudio configs/dreamfusion-sd.yaml (and the defaults of the classes it names), value for value
    "sds-dreamfusion": _merge(_STAGE1_OBJECT, {
        "guidance": {"mode": "sds", "cfg_scale": 100.0, "weighting": "sds", "grad_normalize": False,
                     "front_threshold": 45.0, "back_threshold": 45.0, "overhead_threshold": 60.0,
                     "negative_prompt": "", "min_step_percent": 0.02, "max_step_percent": 0.98},
        "scene": {"radius": 2.0, "n_levels": 16, "n_features_per_level": 2, "log2_hashmap_size": 19,
                  "base_resolution": 16, "per_level_scale": 1.447269237440378, "max_resolution": 4096,
                  "active_levels": [2000, 8, 16, 6000], "density_bias": "blob_magic3d", "density_blob_scale": 10.0,
                  "density_blob_std": 0.5, "normal_type": "analytic", "background": "neural_env",
                  "random_background_prob": 0.0},
        "camera": {"batch_size": 1, "height": 64, "width": 64, "elevation_range": [-10.0, 45.0],
                   "distance_range": [1.5, 2.0], "fovy_range": [40.0, 70.0], "stratified_azimuth": True,
                   "elevation_sampling": "threestudio", "camera_perturb": 0.1, "center_perturb": 0.2,
                   "up_perturb": 0.02, "light_position_perturb": 1.0, "light_distance_range": [0.8, 1.5],
                   "eval_distance": 2.0, "eval_fovy": 70.0, "eval_elevation": 15.0},
        "render": {"num_samples_per_ray": 512, "ambient_only_steps": 2001, "albedo_prob": 0.25,
                   "textureless_prob": 0.5, "textureless_normal": False, "ambient_light": 0.1, "diffuse_light": 0.9},
        "loss": {"guidance": 1.0, "orient": [0, 10.0, 1000.0, 5000], "sparsity": 1.0, "opaque": 0.0},
        "optim": {"steps": 10000, "lr": 1e-2, "betas": [0.9, 0.99], "eps": 1e-15, "group_lr": {"background": 1e-3}},
        "prior": {"resolution": None, "max_resolution": 512},
    }),
    "csd-edit": _merge(_STAGE1_OBJECT, {
        "guidance": {"mode": "edit", "guidance_weight": 1.0, "negative_weight": 1.0, "weighting": "sds",
                     "grad_normalize": False, "min_step_percent": 0.02, "max_step_percent": 0.5},
        "render": {"ambient_only_steps": 0},
        "loss": {"orient": 20.0, "sparsity": 1.0},
        "optim": {"steps": 2000},
    }),
    "preview-cpu": _merge(_STAGE1_OBJECT, {
        "guidance": {"negative_weight": [0, 0.0, 1.0, 75], "max_step_percent": [75, 0.98, 0.5, 76]},
        "scene": {"n_levels": 8, "log2_hashmap_size": 16, "per_level_scale": None, "max_resolution": 256},
        # 4 views a step, stratified in azimuth (the official object config's batch). Measured with the toy prior,
        # csd, 5 objects × 3 seeds: mean silhouette IoU 0.807 → 0.857 at batch 1 → 4 (seeds 0-1: 0.797 → 0.856, batch
        # 2: 0.706), for 1.4× (the demo, torch path) to 3.3× (compiled) the time a step. README, "Shape quality"
        "camera": {"height": 64, "width": 64, "batch_size": 4},
        "render": {"num_samples_per_ray": 96, "ambient_only_steps": 56, "grid_warmup_steps": 32,
                   "grid_update_every": 8},
        # the opacity's binary entropy, 0 → 100 over the run: a short run at 64² otherwise ends as a soft, half-
        # transparent cloud (the mesh and the silhouette then depend on the threshold). Measured with the toy prior,
        # 3 seeds × 5 objects: CSD's mean silhouette IoU 0.649 → 0.759, Chamfer 0.135 → 0.049. Sparsity 3 → 1 over
        # the run: the early shape is otherwise bloated (a lumpy cube, a mug wider than tall); a constant 3 erodes
        # thin parts late (the ring). Ablations: README, "Shape quality"
        "loss": {"orient": [75, 1.0, 20.0, 76], "sparsity": [0, 3.0, 1.0, 150], "opaque": [0, 0.0, 100.0, 150]},
        # 150 steps: the CPU template runs the same 150 (a longer run: README, "Shape quality")
        "optim": {"steps": 150, "lr": 1e-2, "checkpoint_every": 50, "preview_every": 25},
        "prior": {"resolution": None, "max_resolution": 256},
    }),
    "csd-refine": _STAGE2_CSD,
    "csd-refine-object": _merge(_STAGE2_CSD, {"scene": {"radius": 2.0}}),
    # threestudio configs/magic3d-refine-sd.yaml (and the defaults of the classes it names; the conversion level is
    # magic3d-coarse-sd.yaml's "auto", which the refine config does not override)
    "sds-refine": _merge(_STAGE2_CSD, {
        "guidance": {"mode": "sds", "cfg_scale": 100.0, "weighting": "sds", "grad_normalize": False,
                     "negative_prompt": "", "min_step_percent": 0.02, "max_step_percent": 0.5},
        "scene": {"tet_resolution": 128, "radius": 2.0, "per_level_scale": 1.447269237440378,
                  "max_resolution": 4096, "random_background_prob": 0.0, "isosurface_threshold": "auto",
                  "keep_background": False},
        "camera": {"fovy_range": [30.0, 45.0], "eval_distance": 2.0, "eval_fovy": 70.0, "stratified_azimuth": True,
                   "elevation_sampling": "threestudio", "camera_perturb": 0.1, "center_perturb": 0.2,
                   "up_perturb": 0.02, "light_sampling": "magic3d", "light_position_perturb": 1.0,
                   "light_distance_range": [0.8, 1.5]},
        "render": {"albedo_prob": 0.25, "textureless_prob": 0.5, "textureless_normal": False, "soft_shading": True},
        "loss": {"normal_consistency": 10000.0},
        "optim": {"steps": 5000, "lr": 1e-2, "betas": [0.9, 0.99]},
    }),
    "refine-cpu": _merge(_STAGE2_CSD, {
        "guidance": {"negative_weight": [0, 1.0, 0.5, 150]},
        # a short stage-1 run is soft (its density rarely reaches the spec's τ = 10): the level of its silhouettes;
        # it keeps the trained background (the official refine configs start a fresh one; the README's measured
        # stage-2 shape scores are of this setting)
        "scene": {"tet_resolution": 64, "radius": 2.0, "isosurface_threshold": "silhouette", "keep_background": True},
        "camera": {"height": 64, "width": 64, "eval_distance": 2.0},
        "optim": {"steps": 150, "lr": 1e-3, "checkpoint_every": 50, "preview_every": 25},
        "prior": {"resolution": None, "max_resolution": 256},
    }),
    "csd-texture": _merge(_STAGE2_CSD, {
        "guidance": {"negative_weight": [0, 1.0, 0.5, 5000]},
        "scene": {"kind": "mesh", "fix_geometry": True, "radius": 1.0},
        "render": {"albedo_prob": 0.5, "textureless_prob": 0.0},
        "loss": {"normal_consistency": 0.0},
        "optim": {"steps": 5000, "lr": 1e-2},
    }),
    "texture-cpu": _merge(_STAGE2_CSD, {
        # t up to 0.98 (stage 1's range; the stage-2 presets stop at 0.5): a colour is carried by the high noise
        # levels, which 150 steps from a grey start need. Measured with the toy prior on the vase, 3 seeds: the
        # mean albedo's largest channel error 0.145-0.343 (only green within 0.15) -> 0.096-0.149 (all five)
        "guidance": {"negative_weight": [0, 1.0, 0.5, 150], "max_step_percent": 0.98},
        # preview-cpu's small hash grid: Adam over the full 16 × 2^19 table dominates a CPU step
        "scene": {"kind": "mesh", "fix_geometry": True, "radius": 1.0, "n_levels": 8, "log2_hashmap_size": 16,
                  "per_level_scale": None, "max_resolution": 256},
        "camera": {"height": 64, "width": 64, "eval_distance": 2.0},
        "render": {"albedo_prob": 0.5, "textureless_prob": 0.0},
        "loss": {"normal_consistency": 0.0},
        "optim": {"steps": 150, "lr": 1e-2, "checkpoint_every": 50, "preview_every": 25},
        "prior": {"resolution": None, "max_resolution": 256},
    }),
}

# spec §3.1 with the official prior, DeepFloyd IF stage I (64² pixel space: the 64² renders go in as they are)
PRESETS.update({
    "csd-coarse-if": _merge(_STAGE1_OBJECT, {"prior": {"resolution": None, "max_resolution": 64}}),
    "csd-coarse-character-if": _merge(PRESETS["csd-coarse-character"], {
        "guidance": {"perp_neg": True, "perp_neg_scale": 3.0},
        "prior": {"resolution": None, "max_resolution": 64},
    }),
})


# VSD: threestudio configs/prolificdreamer.yaml, stage coarse (see the module docstring for what is not mapped)
_VSD_PROLIFICDREAMER: Dict[str, Any] = _merge(_STAGE1_OBJECT, {
    "guidance": {"mode": "vsd", "cfg_scale": 7.5, "weighting": "sds", "grad_normalize": False, "grad_clip": None,
                 "negative_prompt": "", "guidance_weight": 1.0, "negative_weight": 0.0, "min_step_percent": 0.02,
                 "max_step_percent": [5000, 0.98, 0.5, 5001], "view_dependent": True, "perp_neg": False,
                 "front_threshold": 30.0, "back_threshold": 30.0, "overhead_threshold": 60.0,
                 "lora_lr": 1e-4, "lora_rank": 4, "camera_condition_drop": 0.1, "lora_cfg_scale": 1.0,
                 "lora_timestep_samples": 1},
    "scene": {"radius": 1.0, "n_levels": 16, "n_features_per_level": 2, "log2_hashmap_size": 19,
              "base_resolution": 16, "per_level_scale": 1.447269237440378, "max_resolution": 4096,
              "active_levels": None, "mlp_width": 64, "mlp_hidden_layers": 1, "density_bias": "blob_magic3d",
              "density_blob_scale": 10.0, "density_blob_std": 0.5, "background": "neural_env",
              "random_background_prob": 0.5},
    # 64² renders until step 5000, then 512² (threestudio: "drastically reduces VRAM usage as empty space is pruned
    # in early training")
    "camera": {"height": [64, 512], "width": [64, 512], "batch_size": 1, "resolution_milestones": [5000],
               "elevation_range": [-10.0, 45.0],
               "azimuth_range": [-180.0, 180.0], "distance_range": [1.0, 1.5], "fovy_range": [40.0, 70.0],
               "stratified_azimuth": True, "front_back_only_steps": 0, "elevation_sampling": "threestudio",
               "camera_perturb": 0.0, "center_perturb": 0.0, "up_perturb": 0.0, "light_position_perturb": 1.0,
               "light_distance_range": [0.8, 1.5], "first_step_fixed_view": True, "eval_distance": 1.5,
               "eval_fovy": 70.0, "eval_elevation": 15.0},
    # no-material + normal_type null: every render is the albedo (no shading, so no normals are needed)
    "render": {"num_samples_per_ray": 512, "ambient_only_steps": 25001, "albedo_prob": 1.0},
    "loss": {"guidance": 1.0, "orient": 0.0, "sparsity": 10.0, "opaque": [10000, 0.0, 1000.0, 10001]},
    # optimizer AdamW without weight_decay in its args: torch's default 0.01 in every group (the guidance group is
    # the LoRA's own AdamW, vsd.py)
    "optim": {"steps": 25000, "lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-15, "seed": 0, "optimizer": "adamw",
              "weight_decay": 0.01,
              "group_lr": {"volume.encoding": 0.01, "volume.density_mlp": 0.001, "volume.feature_mlp": 0.001,
                           "background": 0.001},
              "checkpoint_every": 500, "preview_every": 200},
    "prior": {"resolution": None, "max_resolution": 512},
})
PRESETS.update({
    "vsd-prolificdreamer": _VSD_PROLIFICDREAMER,
    "vsd-preview-cpu": _merge(_VSD_PROLIFICDREAMER, {
        "guidance": {"max_step_percent": [75, 0.98, 0.5, 76], "lora_lr": 1e-3},
        "scene": {"n_levels": 8, "log2_hashmap_size": 16, "per_level_scale": None, "max_resolution": 256},
        "render": {"num_samples_per_ray": 96, "ambient_only_steps": 151, "grid_warmup_steps": 32,
                   "grid_update_every": 8},
        "loss": {"sparsity": 1.0, "opaque": [60, 0.0, 1000.0, 61]},
        "optim": {"steps": 150, "lr": 0.01, "group_lr": {}, "optimizer": "adam", "weight_decay": 0.0,
                  "checkpoint_every": 50, "preview_every": 25},
        "prior": {"resolution": None, "max_resolution": 256},
        "camera": {"height": 64, "width": 64, "resolution_milestones": []},
    }),
})


# Gaussian splats (scene.kind gaussians): DreamGaussian (Tang et al. 2024, configs/text.yaml and the code it runs,
# gs_renderer.py / main.py / guidance/sd_utils.py) for the scene, its optimiser, density control and cameras; every
# GaussianConfig default is DreamGaussian's (gaussian_config.py says where each comes from)
_DREAMGAUSSIAN: Dict[str, Any] = _merge(_STAGE1_OBJECT, {
    # SH degree 0, 5000 random points in a ball of radius 0.5, opacity 0.1; position lr 1e-3 → 2e-5 over 300 steps
    # (× spatial_lr_scale 10), feature 0.01, opacity 0.05, scaling and rotation 0.005; densify every 50 steps at
    # gradient 0.01, opacity reset every 700 (after the run); radius 2: the export's box (the splats stay within ±1)
    "scene": {"kind": "gaussians", "radius": 2.0, "background": "solid", "background_color": [1.0, 1.0, 1.0],
              "random_background_prob": 0.5, "gaussians": {"num_points": 5000, "sh_degree": 0}},
    # batch 1 (iters 500 of batch_size 1), camera radius 2.5, fovy 49.1, elevation U[-30, 30], azimuth U[-180, 180]
    # (DreamGaussian draws whole degrees), renders 128² → 256² → 512² at 30 % and 60 % of the run
    "camera": {"batch_size": 1, "height": [128, 256, 512], "width": [128, 256, 512],
               "resolution_milestones": [150, 300], "distance_range": [2.5, 2.5], "fovy_range": [49.1, 49.1],
               "elevation_range": [-30.0, 30.0], "azimuth_range": [-180.0, 180.0], "elevation_sampling": "uniform",
               "stratified_azimuth": False, "first_step_fixed_view": False, "eval_distance": 2.5,
               "eval_fovy": 49.1, "eval_elevation": 15.0},
    # colour only (no shading, no normals); no regularisers
    "render": {"ambient_only_steps": 501, "albedo_prob": 1.0},
    "loss": {"orient": 0.0, "sparsity": 0.0, "opaque": 0.0},
    # Adam eps 1e-15 (the splats' own rates come from scene.gaussians; optim.lr is the background's)
    "optim": {"steps": 500, "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-15, "checkpoint_every": 100,
              "preview_every": 50},
    "prior": {"resolution": None, "max_resolution": 512},
})
PRESETS.update({
    # CSD's stage-1 object coefficients (csd-coarse) compressed to the 500 steps: ω2 0 → 1 over the first half,
    # t ∈ [0.02, 0.98] then [0.02, 0.5] from step 250, uniform w(t), gradient normalisation, view thresholds 30°
    "csd-gaussian": _merge(_DREAMGAUSSIAN, {
        "guidance": {"negative_weight": [0, 0.0, 1.0, 250], "max_step_percent": [250, 0.98, 0.5, 251]},
    }),
    # DreamGaussian's text-to-3D as it is: SDS with CFG 100, w = 1 − ᾱ, no view-dependent prompts, empty negative
    # prompt, t annealed linearly 0.98 → 0.02 (t = 1 − step/500, clipped: min = max, so one timestep a step)
    "sds-gaussian": _merge(_DREAMGAUSSIAN, {
        "guidance": {"mode": "sds", "cfg_scale": 100.0, "weighting": "sds", "grad_normalize": False,
                     "negative_prompt": "", "view_dependent": False, "negative_weight": 0.0,
                     "min_step_percent": [9, 0.98, 0.02, 489], "max_step_percent": [9, 0.98, 0.02, 489]},
    }),
    # the toy prior on a 2-core CPU: its 64² input and preview-cpu's cameras (what the toy was trained on), 2000
    # splats binned in 8-pixel tiles, 120 steps with csd-gaussian's schedules compressed to them. Measured with the
    # toy prior (README "Gaussian splats": the ablation): the start ball as large as the objects the cameras frame
    # (radius 0.3: DreamGaussian's 0.5 fills as much of its 2.5-distant, 49° views as 0.3 of these), colour and
    # opacity at 4x DreamGaussian's rates (its 500 steps of change in 120), half its position rate (less drift
    # outwards), and preview-cpu's sparsity 3 -> 1 (the volume's term on the rendered opacity)
    "gaussian-preview-cpu": _merge(_DREAMGAUSSIAN, {
        "guidance": {"negative_weight": [0, 0.0, 1.0, 60], "max_step_percent": [60, 0.98, 0.5, 61]},
        "scene": {"gaussians": {"num_points": 2000, "init_radius": 0.3, "tile_size": 8, "densify_every": 25,
                                "position_lr_steps": 72, "position_lr_scale": 5.0, "feature_lr": 0.04,
                                "opacity_lr": 0.2, "max_gaussians": 20000}},
        "loss": {"sparsity": [0, 3.0, 1.0, 120]},
        "camera": {"height": 64, "width": 64, "resolution_milestones": [], "distance_range": [1.5, 2.0],
                   "fovy_range": [40.0, 70.0], "elevation_range": [-10.0, 90.0], "elevation_sampling": "csd-r1",
                   "eval_distance": 2.0, "eval_fovy": 70.0},
        "render": {"ambient_only_steps": 121},
        "optim": {"steps": 120, "checkpoint_every": 40, "preview_every": 20},
        "prior": {"resolution": None, "max_resolution": 256},
    }),
})


# MVDream (spec §1.2 R2 column, §8 item 9): the official CSD-MVDream run, CVMI-Lab/Classifier-Score-Distillation branch
# CSD-MVDream @ 481536c csd.yaml, with the defaults of the classes it names (random-multiview-camera-datamodule,
# diffuse-with-point-light-material, neural-environment-map-background, nerf-volume-renderer,
# csd-multiview-diffusion-guidance); tests/test_mvdream_presets.py compares every value
MVDREAM_NEGATIVE_PROMPT = ("ugly, bad anatomy, blurry, pixelated obscure, unnatural colors, poor lighting, dull, "
                           "and unclear, cropped, lowres, low quality, artifacts, duplicate, morbid, mutilated, poorly "
                           "drawn face, deformed, dehydrated, bad proportions")
_CSD_MVDREAM: Dict[str, Any] = _merge(_STAGE1_OBJECT, {
    # ε_y − ε_neg (the negative prompt in the "uncond" slot, no null branch), w = 1, one t per step, both ends of the
    # t range falling from 0.98 over 8000 steps; guidance_scale 50 is used only with recon_loss (off): in the
    # engine's form ε_y + s(ε_y − ε_u) that is s = 49 (= ε_u + 50(ε_y − ε_u))
    "guidance": {"mode": "csd", "guidance_weight": 1.0, "negative_weight": 1.0, "weighting": "uniform",
                 "grad_normalize": True, "grad_normalize_by": "std", "grad_normalize_scale": 0.9, "grad_clip": None,
                 "min_step_percent": [0, 0.98, 0.02, 8000], "max_step_percent": [0, 0.98, 0.5, 8000],
                 "shared_timestep": True, "view_dependent": False, "perp_neg": False, "front_threshold": 30.0,
                 "back_threshold": 30.0, "overhead_threshold": 60.0, "negative_prompt": MVDREAM_NEGATIVE_PROMPT,
                 "cfg_scale": 49.0, "recon_loss": False, "recon_std_rescale": 0.5},
    "scene": {"radius": 1.0, "n_levels": 16, "n_features_per_level": 2, "log2_hashmap_size": 19,
              "base_resolution": 16, "per_level_scale": 1.447269237440378, "max_resolution": 4096,
              "active_levels": None, "mlp_width": 64, "mlp_hidden_layers": 1, "density_bias": "blob_magic3d",
              "density_blob_scale": 10.0, "density_blob_std": 0.5, "normal_type": "analytic",
              "background": "neural_env", "random_background_prob": 0.5, "random_background_shared": True},
    # batch [8, 4] of 4-view objects, 64² renders, 256² from step 5000; distance relative to the field of view
    "camera": {"height": [64, 256], "width": [64, 256], "batch_size": [8, 4], "resolution_milestones": [5000],
               "n_views": 4, "relative_distance": True, "distance_range": [0.8, 1.0], "fovy_range": [15.0, 60.0],
               "elevation_range": [0.0, 30.0], "azimuth_range": [-180.0, 180.0], "elevation_sampling": "csd-r1",
               "stratified_azimuth": True, "front_back_only_steps": 0, "first_step_fixed_view": False,
               "camera_perturb": 0.0, "center_perturb": 0.0, "up_perturb": 0.0, "light_sampling": "dreamfusion",
               "light_position_perturb": 1.0, "light_distance_range": [0.8, 1.5], "eval_distance": 3.0,
               "eval_fovy": 40.0, "eval_elevation": 15.0},
    # albedo until step 5000, then 25 % albedo / 37.5 % grey-Lambertian / 37.5 % shaded, soft shading (diffuse
    # d ~ U[0, 1], ambient 1 − d); ambient 1 and diffuse 0 otherwise (evaluation)
    "render": {"num_samples_per_ray": 512, "ambient_only_steps": 5000, "albedo_prob": 0.25, "textureless_prob": 0.5,
               "textureless_normal": False, "soft_shading": True, "ambient_light": 1.0, "diffuse_light": 0.0},
    "loss": {"guidance": 1.0, "orient": [0, 10.0, 1000.0, 5000], "sparsity": 0.0, "opaque": 0.0},
    "optim": {"steps": 10000, "lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-15, "optimizer": "adamw",
              "weight_decay": 0.01, "seed": 0, "checkpoint_every": 500, "preview_every": 200,
              "group_lr": {"volume.encoding": 0.01, "volume.density_mlp": 0.001, "volume.feature_mlp": 0.001,
                           "background": 0.001}},
    "prior": {"resolution": None, "max_resolution": 256},
})
PRESETS.update({
    "csd-mvdream": _CSD_MVDREAM,
    # threestudio-mvdream configs/mvdream-sd21.yaml (bytedance/MVDream-threestudio): SDS in MVDream's x0 form with
    # ε̂ = ε_u + 50(ε_y − ε_u) (s = 49 in the engine's form), x̂0 rescaled to the unguided std per object by 0.5;
    # no-material (albedo only, no normals), no orientation loss
    "sds-mvdream": _merge(_CSD_MVDREAM, {
        "guidance": {"mode": "sds", "cfg_scale": 49.0, "grad_normalize": False, "recon_loss": True,
                     "recon_std_rescale": 0.5},
        "render": {"ambient_only_steps": 10001, "albedo_prob": 1.0, "soft_shading": False},
        "loss": {"orient": 0.0},
    }),
    # csd-mvdream on a CPU (and the tiny test MVDream): one 4-view object a step at 64², preview-cpu's small grid and
    # samples, 150 steps (the schedules compressed), lr 0.01 on every part with Adam (no weight decay)
    "mvdream-cpu": _merge(_CSD_MVDREAM, {
        "scene": {"n_levels": 8, "log2_hashmap_size": 16, "per_level_scale": None, "max_resolution": 256},
        "camera": {"height": 64, "width": 64, "batch_size": 4, "resolution_milestones": []},
        "render": {"num_samples_per_ray": 96, "ambient_only_steps": 75, "grid_warmup_steps": 32,
                   "grid_update_every": 8},
        "guidance": {"min_step_percent": [0, 0.98, 0.02, 120], "max_step_percent": [0, 0.98, 0.5, 120]},
        "loss": {"orient": [0, 10.0, 1000.0, 75]},
        "optim": {"steps": 150, "lr": 0.01, "group_lr": {}, "optimizer": "adam", "weight_decay": 0.0,
                  "checkpoint_every": 50, "preview_every": 25},
    }),
})


#: the mesh export of the runs a preset makes (``ExportConfig`` fields; a preset not listed takes the export's
#: defaults, 256³ and 100k faces, as the GPU presets do). The CPU presets train on 64² renders (a pixel is 0.02–0.04
#: units on the object) with a hash grid of at most 256 cells over the 4-unit box (0.016 units a cell): a 128³ grid
#: over the object's box (about 0.008 units) samples every detail such a scene holds, and 20000 faces have edges of
#: about a render pixel on the bumpy surface of a trained preview. The demo cone at 128³ / 20000 faces lies 0.004
#: units (Chamfer) from its undecimated 256³ mesh, at 256³ / 100k 0.003. The generate flags ``--mesh-resolution``,
#: ``--mesh-face-budget`` and the flags of ``export`` override them.
CPU_EXPORT: Dict[str, Any] = {"resolution": 128, "face_budget": 20000}
EXPORT_SETTINGS: Dict[str, Dict[str, Any]] = {
    name: CPU_EXPORT for name in ("preview-cpu", "vsd-preview-cpu", "refine-cpu", "texture-cpu", "mvdream-cpu",
                                  "gaussian-preview-cpu")}


def export_settings(preset: str) -> Dict[str, Any]:
    """The ``ExportConfig`` settings of the runs made with ``preset`` (empty: the export's defaults)."""
    return dict(EXPORT_SETTINGS.get(preset, {}))


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> RunConfig:
    """The ``RunConfig`` of a named preset (without model or prompt)."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    cfg = RunConfig.from_dict(PRESETS[name])
    cfg.preset = name
    return cfg
