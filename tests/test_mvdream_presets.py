"""The MVDream presets value for value (issue 24 item 5): ``csd-mvdream`` = the official CSD-MVDream run (R2:
CVMI-Lab/Classifier-Score-Distillation branch CSD-MVDream @ 481536c, ``csd.yaml``) and ``sds-mvdream`` =
threestudio-mvdream's ``configs/mvdream-sd21.yaml`` (bytedance/MVDream-threestudio), each with the defaults of the
classes they name; ``mvdream-cpu`` is csd-mvdream made small."""
from __future__ import annotations

import pytest

from csd_backend.guidance import coefficients
from csd_backend.presets import EXPORT_SETTINGS, MVDREAM_NEGATIVE_PROMPT, get_preset

#: R2 csd.yaml (and class defaults) keyed by the yaml path → (the engine's field, the value)
CSD_YAML = {
    "seed": ("optim.seed", 0),
    "data.batch_size [8,4]": ("camera.batch_size", [8, 4]),
    "data.n_view": ("camera.n_views", 4),
    "data.width [64, 256]": ("camera.width", [64, 256]),
    "data.height [64, 256]": ("camera.height", [64, 256]),
    "data.resolution_milestones": ("camera.resolution_milestones", [5000]),
    "data.camera_distance_range (relative)": ("camera.distance_range", [0.8, 1.0]),
    "data.relative_radius (default true)": ("camera.relative_distance", True),
    "data.fovy_range": ("camera.fovy_range", [15.0, 60.0]),
    "data.elevation_range": ("camera.elevation_range", [0.0, 30.0]),
    "data.azimuth_range (default)": ("camera.azimuth_range", [-180.0, 180.0]),
    "data elevation: half uniform, half asin(2u − 1) (random_multiview collate)": ("camera.elevation_sampling",
                                                                                  "csd-r1"),
    "data.camera_perturb": ("camera.camera_perturb", 0.0),
    "data.center_perturb": ("camera.center_perturb", 0.0),
    "data.up_perturb": ("camera.up_perturb", 0.0),
    "data.light_sample_strategy (default)": ("camera.light_sampling", "dreamfusion"),
    "data.light_position_perturb (default)": ("camera.light_position_perturb", 1.0),
    "data.light_distance_range (default)": ("camera.light_distance_range", [0.8, 1.5]),
    "data: no progressive first view in the multiview collate": ("camera.first_step_fixed_view", False),
    "data.eval_camera_distance": ("camera.eval_distance", 3.0),
    "data.eval_fovy_deg": ("camera.eval_fovy", 40.0),
    "data.eval_elevation_deg (default)": ("camera.eval_elevation", 15.0),
    "geometry.radius": ("scene.radius", 1.0),
    "geometry.normal_type": ("scene.normal_type", "analytic"),
    "geometry.density_bias": ("scene.density_bias", "blob_magic3d"),
    "geometry.density_blob_scale": ("scene.density_blob_scale", 10.0),
    "geometry.density_blob_std": ("scene.density_blob_std", 0.5),
    "pos_encoding_config.n_levels": ("scene.n_levels", 16),
    "pos_encoding_config.n_features_per_level": ("scene.n_features_per_level", 2),
    "pos_encoding_config.log2_hashmap_size": ("scene.log2_hashmap_size", 19),
    "pos_encoding_config.base_resolution": ("scene.base_resolution", 16),
    "pos_encoding_config.per_level_scale": ("scene.per_level_scale", 1.447269237440378),
    "geometry MLPs (default VanillaMLP 64 × 1, no bias)": ("scene.mlp_width", 64),
    "material.ambient_only_steps": ("render.ambient_only_steps", 5000),
    "material.diffuse_prob (default 0.75)": ("render.albedo_prob", 0.25),
    "material.textureless_prob": ("render.textureless_prob", 0.5),
    "material textureless = grey shading (R2 has no textureless_normal)": ("render.textureless_normal", False),
    "material.soft_shading": ("render.soft_shading", True),
    "material.ambient_light_color": ("render.ambient_light", 1.0),
    "material.diffuse_light_color": ("render.diffuse_light", 0.0),
    "background neural-environment-map": ("scene.background", "neural_env"),
    "background.random_aug (prob default 0.5)": ("scene.random_background_prob", 0.5),
    "background.share_aug_bg": ("scene.random_background_shared", True),
    "renderer.num_samples_per_ray": ("render.num_samples_per_ray", 512),
    "prompt_processor.negative_prompt": ("guidance.negative_prompt", MVDREAM_NEGATIVE_PROMPT),
    "prompt_processor.front_threshold": ("guidance.front_threshold", 30.0),
    "prompt_processor.back_threshold": ("guidance.back_threshold", 30.0),
    "guidance.view_dependent_prompting (default false)": ("guidance.view_dependent", False),
    "guidance: ε_y − ε_neg (CSD, ω1 = 1)": ("guidance.guidance_weight", 1.0),
    "guidance: the negative prompt in the uncond slot (ω2 = 1)": ("guidance.negative_weight", 1.0),
    "guidance: w = 1": ("guidance.weighting", "uniform"),
    "guidance.grad_normalize": ("guidance.grad_normalize", True),
    "guidance: std over H, W per sample and channel": ("guidance.grad_normalize_by", "std"),
    "guidance.grad_normalize_scale": ("guidance.grad_normalize_scale", 0.9),
    "guidance.grad_clip (default none)": ("guidance.grad_clip", None),
    "guidance: t = randint(min, max + 1, [1])": ("guidance.shared_timestep", True),
    "guidance.min_step_percent": ("guidance.min_step_percent", [0, 0.98, 0.02, 8000]),
    "guidance.max_step_percent": ("guidance.max_step_percent", [0, 0.98, 0.5, 8000]),
    "guidance.recon_loss": ("guidance.recon_loss", False),
    "guidance.recon_std_rescale": ("guidance.recon_std_rescale", 0.5),
    "guidance.guidance_scale 50 (diffusers form; unused without recon_loss) = 49 in the engine's form":
        ("guidance.cfg_scale", 49.0),
    "guidance.image_size": ("prior.max_resolution", 256),
    "loss.lambda_sds": ("loss.guidance", 1.0),
    "loss.lambda_orient": ("loss.orient", [0, 10.0, 1000.0, 5000]),
    "loss.lambda_sparsity": ("loss.sparsity", 0.0),
    "loss.lambda_opaque": ("loss.opaque", 0.0),
    "optimizer.name AdamW": ("optim.optimizer", "adamw"),
    "optimizer AdamW weight_decay (torch default)": ("optim.weight_decay", 0.01),
    "optimizer.args.betas": ("optim.betas", [0.9, 0.99]),
    "optimizer.args.eps": ("optim.eps", 1e-15),
    "optimizer.params (geometry.encoding 0.01, networks 0.001, background 0.001)":
        ("optim.group_lr", {"volume.encoding": 0.01, "volume.density_mlp": 0.001, "volume.feature_mlp": 0.001,
                            "background": 0.001}),
    "trainer.max_steps": ("optim.steps", 10000),
}

#: mvdream-sd21.yaml where it differs from csd.yaml (the rest is the same, checked with CSD_YAML)
SDS_YAML_DIFFERENCES = {
    "guidance_type multiview-diffusion-guidance: SDS": ("guidance.mode", "sds"),
    "guidance.guidance_scale 50 (ε_u + 50(ε_y − ε_u)) = 49 in the engine's form": ("guidance.cfg_scale", 49.0),
    "guidance.recon_loss": ("guidance.recon_loss", True),
    "guidance.recon_std_rescale": ("guidance.recon_std_rescale", 0.5),
    "guidance: no gradient normalisation": ("guidance.grad_normalize", False),
    "material no-material: albedo only, every step": ("render.albedo_prob", 1.0),
    "no-material: no shading phase": ("render.ambient_only_steps", 10001),
    "no-material: no soft shading": ("render.soft_shading", False),
    "loss.lambda_orient": ("loss.orient", 0.0),
}


def _wrong(preset: str, table: dict) -> list:
    d = get_preset(preset).to_dict()
    wrong = []
    for key, (path, want) in table.items():
        section, name = path.split(".")
        got = d[section][name]
        same = got == pytest.approx(want) if isinstance(want, (int, float)) and not isinstance(want, bool) else \
            got == want
        if not same:
            wrong.append(f"{key}: yaml {want!r}, preset {path} = {got!r}")
    return wrong


def test_csd_mvdream_is_r2s_csd_yaml():
    assert not _wrong("csd-mvdream", CSD_YAML), "\n".join(_wrong("csd-mvdream", CSD_YAML))


def test_sds_mvdream_is_threestudio_mvdreams_mvdream_sd21_yaml():
    same = {k: v for k, v in CSD_YAML.items() if v[0] not in {p for p, _ in SDS_YAML_DIFFERENCES.values()}}
    wrong = _wrong("sds-mvdream", {**same, **SDS_YAML_DIFFERENCES})
    assert not wrong, "\n".join(wrong)


def test_the_direction_coefficients():
    # CSD-MVDream: ε_y − ε_neg, no null branch, no noise term
    c = coefficients(get_preset("csd-mvdream").guidance, 0)
    assert (c.c, c.u, c.n, c.k) == (1.0, -1.0, 0.0, 0.0)
    # threestudio-mvdream: ε̂ = 50·ε_y − 49·ε_u = ε_u + 50(ε_y − ε_u)
    c = coefficients(get_preset("sds-mvdream").guidance, 0)
    assert (c.c, c.u, c.n) == (50.0, -49.0, 0.0)


def test_the_cpu_preset_is_csd_mvdream_made_small():
    cpu, full = get_preset("mvdream-cpu"), get_preset("csd-mvdream")
    assert cpu.camera.n_views == 4 and cpu.camera.batch_size == 4 and cpu.camera.resolution_milestones == []
    assert cpu.optim.steps == 150 and cpu.scene.n_levels == 8 and cpu.render.num_samples_per_ray == 96
    for name in ("grad_normalize_by", "grad_normalize_scale", "shared_timestep", "negative_prompt", "mode",
                 "negative_weight", "view_dependent"):
        assert getattr(cpu.guidance, name) == getattr(full.guidance, name), name
    # the schedules compressed to 150 steps as with_steps would: 8000/10000 and 5000/10000 of the run
    assert cpu.guidance.max_step_percent == [0, 0.98, 0.5, 120] and cpu.render.ambient_only_steps == 75
    assert EXPORT_SETTINGS["mvdream-cpu"]["face_budget"] == 20000
    # csd-mvdream stretched to a CPU-sized run keeps whole objects: milestones follow the run
    assert full.with_steps(150).camera.resolution_milestones == [75]
