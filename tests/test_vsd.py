"""VSD (ProlificDreamer) guidance: the direction by hand, the LoRA's training on the prior's own (frozen) UNet,
exact resume, and the error for a prior that cannot carry a LoRA."""
from __future__ import annotations

import resource

import pytest
import torch

from csd_backend.config import GuidanceConfig, OptimConfig
from csd_backend.errors import ConfigError
from csd_backend.guidance import ScoreDistillation, coefficients
from csd_backend.optimize import Optimization
from csd_backend.priors.analytic import AnalyticPrior
from csd_backend.priors.stable_diffusion import load_stable_diffusion, v_to_eps
from engine_helpers import small_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def prior(tiny_sd):
    # 32² prior input (4×4 latents): the tiny UNet's smallest size, fast
    return load_stable_diffusion(tiny_sd["folder"], device="cpu", resolution=32)


def vsd_guidance(**over) -> GuidanceConfig:
    base = dict(prompt="red", negative_prompt="", mode="vsd", cfg_scale=7.5, weighting="sds", grad_normalize=False,
                view_dependent=False, max_step_percent=0.98)
    return GuidanceConfig(**{**base, **over})


def vsd_config(steps: int, **over):
    return small_config("red", steps=steps, guidance={**vars(vsd_guidance()), **over.pop("guidance", {})},
                        camera={"height": 16, "width": 16, "batch_size": 2}, prior={"model": "tiny"}, **over)


def cameras(B: int) -> torch.Tensor:
    c2w = torch.eye(4).repeat(B, 1, 1)
    c2w[:, :3, 3] = torch.arange(1.0, 3 * B + 1).view(B, 3)
    return c2w


# ------------------------------------------------------------------------------------------------ the direction
@pytest.mark.parametrize("lora_cfg_scale", [1.0, 2.0])
def test_vsd_direction_is_frozen_cfg_minus_lora_weighted(prior, lora_cfg_scale):
    """g = (1 − ᾱ_t)·(ε_u + s(ε_y − ε_u) − ε_lora) on fixed ε tensors (the UNet calls replaced by fakes); with a
    LoRA guidance scale s_l the LoRA part is ε_∅cam + s_l(ε_cam − ε_∅cam) (threestudio guidance_scale_lora)."""
    sd = ScoreDistillation(vsd_guidance(lora_cfg_scale=lora_cfg_scale), prior)
    B, s = 2, 7.5
    gen = torch.Generator().manual_seed(1)
    eps_y, eps_u, eps_cam, eps_none = (torch.randn(B, 4, 4, 4, generator=gen) for _ in range(4))
    plain, negative = sd.prompts.plain, sd.prompts.negative

    def frozen(z_t, t, emb, **kw):  # ε by prompt: the view-independent positive, or the negative ""
        assert prior.unet.class_embedding is None  # the plain UNet for the frozen branches
        out = []
        for i in range(0, emb.shape[0], B):
            out.append(eps_y if torch.equal(emb[i], plain) else eps_u)
            assert torch.equal(emb[i], plain) or torch.equal(emb[i], negative)
        return torch.cat(out, 0)

    lora_calls = []

    def lora(z_t, t, cam):
        assert prior.unet.class_embedding is sd.vsd.camera_embedding  # the camera embedding only inside
        lora_calls.append(cam.clone())
        blocks = cam.split(B)  # the camera branch, then (with a LoRA guidance scale) the zero-camera branch
        return torch.cat([eps_cam if block.any() else eps_none for block in blocks], 0)

    prior.predict_noise = frozen
    sd.vsd._lora_unet = lora
    sd.vsd.train_step = lambda z, c2w, generator=None: torch.zeros(())  # not under test here
    t = torch.tensor([100, 800])
    c2w = cameras(B)
    out = sd(torch.rand(B, 16, 16, 3, requires_grad=True), torch.zeros(B), torch.zeros(B), 0, t=t, noise=torch.randn(B, 4, 4, 4),
             c2w=c2w)
    assert prior.unet.class_embedding is None
    assert torch.equal(lora_calls[0][:B], c2w.reshape(B, 16))  # the flattened c2w is the LoRA's condition
    if lora_cfg_scale == 1.0:
        assert lora_calls[0].shape[0] == B  # scale 1: the camera branch alone
        e_lora = eps_cam
    else:
        assert lora_calls[0].shape[0] == 2 * B and not lora_calls[0][B:].any()
        e_lora = eps_none + lora_cfg_scale * (eps_cam - eps_none)
    w = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
    want = w * (eps_u + s * (eps_y - eps_u) - e_lora)
    torch.testing.assert_close(out.grad, want, rtol=1e-5, atol=1e-5)
    c = coefficients(sd.cfg, 0)
    assert (c.c, c.u, c.n, c.k) == (7.5, -6.5, 0.0, 0.0)
    # the loss's gradient on the latents is g / B (the stop-gradient trick)
    z_grad, = torch.autograd.grad(out.loss, out.z)
    torch.testing.assert_close(z_grad, out.grad / B)


def test_lora_prediction_is_converted_from_v(prior):
    """A v-prediction UNet's LoRA output is turned into ε (threestudio: z_t·σ + v·α) and its training target is v."""
    sd = ScoreDistillation(vsd_guidance(), prior)
    prior.prediction_type = "v_prediction"
    v = torch.randn(2, 4, 4, 4)
    sd.vsd._lora_unet = lambda z_t, t, cam: v
    z_t, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    torch.testing.assert_close(sd.vsd.predict(z_t, t, cameras(2)), v_to_eps(v, z_t, prior.alphas_cumprod[t]))


# -------------------------------------------------------------------------------------------- the LoRA's step
def _lora_loss(vsd, z0: torch.Tensor, c2w: torch.Tensor) -> float:
    """The LoRA's denoising loss on a fixed batch (fixed t and noise, camera kept)."""
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, 1000, (z0.shape[0],), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    with torch.no_grad(), vsd._lora_active():
        pred = vsd._lora_unet(vsd.prior.add_noise(z0, noise, t), t, vsd.camera_condition(c2w))
    return float(((pred - noise) ** 2).mean())


def test_lora_step_learns_on_the_frozen_unet_without_touching_it(prior):
    unet = prior.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in unet.state_dict().items()}
    n_params = sum(p.numel() for p in unet.parameters())
    gen = torch.Generator().manual_seed(0)
    z_t = torch.randn(3, 4, 4, 4, generator=gen)
    t = torch.tensor([5, 500, 990])
    emb = prior.encode_text(["red", "", "a cube"])
    plain = prior.predict_noise(z_t, t, emb)

    sd = ScoreDistillation(vsd_guidance(lora_lr=3e-3, camera_condition_drop=0.0), prior,
                           optim=OptimConfig(betas=[0.9, 0.99]))
    vsd = sd.vsd
    # one UNet: the LoRA and the camera embedding are the only new weights (no second UNet)
    lora_params = sum(p.numel() for p in vsd.lora.values())
    cam_params = sum(p.numel() for p in vsd.camera_embedding.parameters())
    assert sum(p.numel() for p in unet.parameters()) == n_params + lora_params
    assert 0 < lora_params + cam_params < 0.1 * n_params
    assert all(not p.requires_grad for p in unet.parameters())  # the adapters are off outside LoRA calls
    z0 = torch.randn(2, 4, 4, 4, generator=gen)
    c2w = cameras(2)
    start = _lora_loss(vsd, z0, c2w)
    cam_before = [p.clone() for p in vsd.camera_embedding.parameters()]
    losses = []
    for _ in range(8):  # the training draws (t, noise) of the fixed batch above: the same seed, the same order
        losses.append(float(vsd.train_step(z0, c2w, torch.Generator().manual_seed(123))))
        vsd.step()
    assert losses[0] == pytest.approx(start, rel=1e-5)  # the training step computes the loss measured here
    end = _lora_loss(vsd, z0, c2w)
    assert end < 0.9 * start and losses[-1] < losses[0], (start, end, losses)
    assert any(not torch.equal(a, b) for a, b in zip(cam_before, vsd.camera_embedding.parameters()))
    # the frozen UNet: every original weight unchanged bit for bit, in place, and its predictions those of the
    # plain UNet (the adapters disabled, no class embedding)
    base = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    assert base.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(base[k], v), k
        assert base[k].data_ptr() == ptrs[k], k
    assert unet.class_embedding is None
    assert torch.equal(prior.predict_noise(z_t, t, emb), plain)
    # closing the run removes its adapter and unwraps the UNet: it is the original module tree again
    vsd.close()
    assert unet.state_dict().keys() == before.keys()
    assert torch.equal(prior.predict_noise(z_t, t, emb), plain)


def test_two_vsd_runs_on_one_prior_keep_their_own_lora(prior):
    a = ScoreDistillation(vsd_guidance(), prior).vsd
    b = ScoreDistillation(vsd_guidance(), prior).vsd
    with torch.no_grad():
        for p in a.lora.values():
            p.add_(0.05)
    z_t, t = torch.randn(1, 4, 4, 4), torch.tensor([300])
    b.camera_embedding.load_state_dict(a.camera_embedding.state_dict())
    assert not torch.equal(a.predict(z_t, t, cameras(1)), b.predict(z_t, t, cameras(1)))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.predict(z_t, t, cameras(1)), b.predict(z_t, t, cameras(1)))


# ------------------------------------------------------------------------------------------------------ resume
def test_vsd_resume_equals_an_uninterrupted_run(prior, tmp_path):
    cfg = vsd_config(steps=4, optim={"checkpoint_every": 2})
    full = Optimization(cfg, prior, out_dir=tmp_path / "full")
    full.run()
    part = Optimization(cfg.replace(optim={"steps": 2}), prior, out_dir=tmp_path / "part")
    part.run()
    from csd_backend.io import load_checkpoint

    saved = load_checkpoint(tmp_path / "part")["guidance"]["vsd"]
    assert saved["lora"].keys() == part.guidance.vsd.lora.keys() and saved["optimizer"]["state"]
    del part
    resumed = Optimization.resume(tmp_path / "part", prior, steps=4)
    assert resumed.step == 2
    resumed.run()
    a, b = full.scene.state_dict(), resumed.scene.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = full.guidance.state_dict()["vsd"], resumed.guidance.state_dict()["vsd"]
    for k in la["lora"]:
        assert torch.equal(la["lora"][k], lb["lora"][k]), k
    for k in la["camera_embedding"]:
        assert torch.equal(la["camera_embedding"][k], lb["camera_embedding"][k]), k


def test_a_checkpoint_without_the_lora_is_refused(prior):
    from csd_backend.errors import CheckpointError

    opt = Optimization(vsd_config(steps=1), prior)
    state = opt.state_dict()
    del state["guidance"]
    with pytest.raises(CheckpointError, match="guidance"):
        Optimization(vsd_config(steps=1), prior).load_state_dict(state)


# ------------------------------------------------------------------------------------------------------ errors
def test_vsd_needs_a_prior_with_a_diffusers_unet():
    with pytest.raises(ConfigError) as info:
        Optimization(small_config("red", guidance={"prompt": "red", "mode": "vsd"}), AnalyticPrior(resolution=16))
    assert info.value.field == "guidance.mode"
    assert "Stable Diffusion" in str(info.value) and "mode csd or sds" in str(info.value)


def test_vsd_settings_are_validated():
    for name, value in [("lora_lr", 0.0), ("camera_condition_drop", 1.5), ("lora_rank", 0),
                        ("lora_timestep_samples", 0), ("lora_cfg_scale", -1.0)]:
        with pytest.raises(ConfigError, match=f"guidance.{name}"):
            small_config("red", guidance={"prompt": "red", "mode": "vsd", name: value}).validate(require_model=False)


# ------------------------------------------------------------------------------------------------------ memory
def test_tiny_vsd_run_memory(prior, capsys):
    """A few VSD steps with the tiny prior: the extra weights are the LoRA, the camera embedding and AdamW's two
    moments of each (reported; the peak resident memory of the process is printed for the notes)."""
    opt = Optimization(vsd_config(steps=3), prior)
    opt.run()
    vsd = opt.guidance.vsd
    extra = sum(p.numel() * p.element_size() for p in vsd.parameters())
    moments = sum(v.numel() * v.element_size() for s in vsd.optimizer.state.values() for v in s.values()
                  if torch.is_tensor(v) and v.dim() > 0)
    unet_bytes = sum(p.numel() * p.element_size() for n, p in prior.unet.named_parameters() if "lora_" not in n)
    assert moments == 2 * extra and extra < 0.1 * unet_bytes
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with capsys.disabled():
        print(f"\n[vsd tiny run] UNet {unet_bytes / 2**20:.2f} MiB, LoRA + camera embedding {extra / 2**10:.1f} KiB, "
              f"AdamW moments {moments / 2**10:.1f} KiB; process peak RSS so far {peak_mib:.0f} MiB")


# ------------------------------------------------------------------------------------------------------ presets
def test_prolificdreamer_preset_has_the_configs_values():
    """vsd-prolificdreamer against threestudio's configs/prolificdreamer.yaml (@28d9d80), value for value, with the
    defaults of the classes it names (random-camera-datamodule, stable-diffusion-vsd-guidance)."""
    from csd_backend.presets import get_preset

    c = get_preset("vsd-prolificdreamer")
    g, s, cam, r, loss, o = c.guidance, c.scene, c.camera, c.render, c.loss, c.optim
    assert (g.mode, g.cfg_scale, g.weighting, g.grad_normalize, g.grad_clip, g.negative_prompt) == (
        "vsd", 7.5, "sds", False, None, "")
    assert (g.min_step_percent, g.max_step_percent) == (0.02, [5000, 0.98, 0.5, 5001])
    assert (g.front_threshold, g.back_threshold, g.view_dependent, g.perp_neg) == (30.0, 30.0, True, False)
    assert (g.lora_lr, g.lora_rank, g.camera_condition_drop, g.lora_cfg_scale, g.lora_timestep_samples) == (
        1e-4, 4, 0.1, 1.0, 1)
    assert (s.radius, s.n_levels, s.n_features_per_level, s.log2_hashmap_size, s.base_resolution) == (
        1.0, 16, 2, 19, 16)
    assert s.per_level_scale == 1.447269237440378 and s.active_levels is None
    assert (s.density_bias, s.density_blob_scale, s.density_blob_std) == ("blob_magic3d", 10.0, 0.5)
    assert (s.background, s.random_background_prob) == ("neural_env", 0.5)
    assert (cam.height, cam.width, cam.batch_size, cam.resolution_milestones) == ([64, 512], [64, 512], 1, [5000])
    assert (cam.elevation_range, cam.distance_range, cam.fovy_range) == ([-10.0, 45.0], [1.0, 1.5], [40.0, 70.0])
    assert (cam.camera_perturb, cam.center_perturb, cam.up_perturb) == (0.0, 0.0, 0.0)
    assert (cam.eval_distance, cam.eval_fovy, cam.light_position_perturb, cam.light_distance_range) == (
        1.5, 70.0, 1.0, [0.8, 1.5])
    assert r.num_samples_per_ray == 512 and r.ambient_only_steps > o.steps and r.albedo_prob == 1.0
    assert (loss.guidance, loss.orient, loss.sparsity, loss.opaque) == (1.0, 0.0, 10.0, [10000, 0.0, 1000.0, 10001])
    assert (o.steps, o.betas, o.eps, o.seed) == (25000, [0.9, 0.99], 1e-15, 0)
    assert o.group_lr == {"volume.encoding": 0.01, "volume.density_mlp": 0.001, "volume.feature_mlp": 0.001,
                          "background": 0.001}
    # optimizer.name AdamW, no weight_decay in optimizer.args: torch's default 0.01 in every group
    assert (o.optimizer, o.weight_decay) == ("adamw", 0.01)
    assert c.prior.lora_base_model is None  # the user's: --lora-base-model stabilityai/stable-diffusion-2-1
    preview = get_preset("vsd-preview-cpu")
    assert preview.guidance.mode == "vsd" and preview.optim.steps == 150
    assert (preview.optim.optimizer, preview.optim.weight_decay) == ("adam", 0.0)  # as before


def test_prolificdreamer_scene_optimizer_is_adamw_with_decoupled_decay():
    """One AdamW step with zero gradients leaves only the decay: every parameter times 1 − lr_group·0.01 (its
    group's learning rate: 0.01 on the hash grid, 0.001 on the MLPs and the background); Adam (the other presets)
    leaves it as it is."""
    from csd_backend.optimize import scene_optimizer
    from csd_backend.presets import get_preset
    from csd_backend.scene.volume import Scene

    cfg = get_preset("vsd-prolificdreamer")
    scene = Scene(cfg.replace(scene={"log2_hashmap_size": 12}).scene)
    opt = scene_optimizer(scene, cfg.optim)
    assert type(opt) is torch.optim.AdamW and {g["weight_decay"] for g in opt.param_groups} == {0.01}
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    want_lr = {"volume.encoding": 0.01, "volume.density_mlp": 0.001, "volume.feature_mlp": 0.001, "background": 0.001}
    before = {}
    for name, p in scene.named_parameters():
        assert lr[id(p)] == next(v for k, v in want_lr.items() if name.startswith(k + ".")), name
        before[name] = p.detach().clone()
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in scene.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] * (1 - lr[id(p)] * 0.01), rtol=1e-6, atol=0), name
    adam = scene_optimizer(scene, get_preset("vsd-preview-cpu").optim)
    assert type(adam) is torch.optim.Adam and {g["weight_decay"] for g in adam.param_groups} == {0}
    with pytest.raises(ConfigError, match="optim.optimizer"):
        small_config(optim={"optimizer": "sgd"}).validate(require_model=False)


# ------------------------------------------------------------------------------- a second model for the LoRA
@pytest.fixture
def two_models(tiny_sd, tiny_sd_v):
    """The tiny prior with the tiny v-prediction model as VSD's LoRA base model (threestudio's SD 2.1-base + 2.1)."""
    from csd_backend.config import PriorConfig
    from csd_backend.priors import load_prior

    return load_prior(PriorConfig(model=str(tiny_sd["folder"]), lora_base_model=str(tiny_sd_v["folder"]),
                                  device="cpu", resolution=32))


def test_the_lora_base_model_carries_the_lora(two_models, tiny_sd_v):
    prior, base = two_models, two_models.lora_prior
    assert base is not None and base.source == str(tiny_sd_v["folder"]) and base.prediction_type == "v_prediction"
    sd = ScoreDistillation(vsd_guidance(), prior)
    assert sd.vsd.prior is base and sd.vsd.unet is base.unet and sd.vsd.separate_model
    assert any("lora_" in n for n, _ in base.unet.named_parameters())
    assert not any("lora_" in n for n, _ in prior.unet.named_parameters())  # the frozen prior: no adapters
    # the plain prompt through the base model's own text encoder (threestudio's embedding for SD 2.1 / 2.1-base,
    # which share theirs; the tiny pair does not)
    assert torch.equal(sd.vsd.plain, base.encode_text(["red"])[0])
    assert not torch.equal(sd.vsd.plain, sd.prompts.plain)


def test_direction_with_a_lora_base_model_by_hand(two_models):
    """threestudio's two-model compute_grad_vsd: the LoRA UNet sees the prior's noisy latents and its v output is
    turned into ε with *its own* scheduler's ᾱ (z_t·σ + v·α); w(t) and the frozen part are the prior's."""
    prior, base = two_models, two_models.lora_prior
    base.alphas_cumprod = torch.linspace(0.9999, 0.05, 1000)  # a schedule of its own, to tell the two apart
    sd = ScoreDistillation(vsd_guidance(), prior)
    B, s = 2, 7.5
    gen = torch.Generator().manual_seed(3)
    eps_y, eps_u, v = (torch.randn(B, 4, 4, 4, generator=gen) for _ in range(3))
    plain = sd.prompts.plain
    prior.predict_noise = lambda z_t, t, emb, **kw: torch.cat(
        [eps_y if torch.equal(emb[i], plain) else eps_u for i in range(0, emb.shape[0], B)], 0)
    seen = {}

    def lora(z_t, t, cam):
        seen.update(z_t=z_t.clone(), t=t.clone())
        return v

    sd.vsd._lora_unet = lora
    sd.vsd.train_step = lambda z, c2w, generator=None: torch.zeros(())
    t, noise = torch.tensor([150, 850]), torch.randn(B, 4, 4, 4, generator=gen)
    out = sd(torch.rand(B, 16, 16, 3), torch.zeros(B), torch.zeros(B), 0, t=t, noise=noise, c2w=cameras(B))
    z_t = prior.add_noise(out.z.detach(), noise, t)  # the prior's schedule
    torch.testing.assert_close(seen["z_t"], z_t)
    assert torch.equal(seen["t"], t)
    a = base.alphas_cumprod[t].view(-1, 1, 1, 1)
    e_lora = z_t * (1 - a).sqrt() + v * a.sqrt()
    w = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
    torch.testing.assert_close(out.grad, w * (eps_u + s * (eps_y - eps_u) - e_lora), rtol=1e-5, atol=1e-5)


def test_the_lora_base_model_trains_on_its_own_schedule_and_v_target(two_models):
    """threestudio's train_lora with scheduler_lora: noisy latents from the base model's own ᾱ, target v =
    sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·z0 (get_velocity), t uniform over all timesteps; the prior's UNet is not touched."""
    prior, base = two_models, two_models.lora_prior
    base.alphas_cumprod = torch.linspace(0.9999, 0.05, 1000)
    frozen = {k: v.clone() for k, v in prior.unet.state_dict().items()}
    vsd = ScoreDistillation(vsd_guidance(camera_condition_drop=0.0), prior).vsd
    z0, c2w = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4)), cameras(2)
    loss = vsd.train_step(z0, c2w, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same draws in the same order: t, then the noise
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    a = base.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t, target = a.sqrt() * z0 + (1 - a).sqrt() * noise, a.sqrt() * noise - (1 - a).sqrt() * z0
    with torch.no_grad(), vsd._lora_active():
        pred = vsd._lora_unet(z_t, t, vsd.camera_condition(c2w))
    assert float(loss) == pytest.approx(float(((pred - target) ** 2).mean()), rel=1e-5)
    vsd.step()
    for k, v in prior.unet.state_dict().items():
        assert torch.equal(v, frozen[k]), k


def test_a_run_with_a_lora_base_model_resumes_only_with_one(two_models, tiny_sd, tmp_path):
    from csd_backend.errors import CheckpointError
    from csd_backend.io import load_checkpoint

    cfg = vsd_config(steps=2, optim={"checkpoint_every": 1}).replace(prior={"lora_base_model": "tiny-v"})
    Optimization(cfg, two_models, out_dir=tmp_path).run()
    assert load_checkpoint(tmp_path)["guidance"]["vsd"]["separate_model"] is True
    plain = load_stable_diffusion(tiny_sd["folder"], device="cpu", resolution=32)
    with pytest.raises(CheckpointError, match="with its LoRA base model"):
        Optimization.resume(tmp_path, plain, steps=3)
    resumed = Optimization.resume(tmp_path, two_models, steps=3)
    resumed.run()
    assert resumed.step == 3


def test_lora_base_model_errors_name_the_field(tiny_sd, tiny_sd_v, tmp_path):
    from csd_backend.config import PriorConfig
    from csd_backend.errors import ModelNotFoundError
    from csd_backend.priors import load_prior

    sd_folder = str(tiny_sd["folder"])
    with pytest.raises(ModelNotFoundError, match="prior.lora_base_model.*does not exist"):
        load_prior(PriorConfig(model=sd_folder, lora_base_model=str(tmp_path / "missing"), device="cpu"))
    with pytest.raises(ConfigError) as info:  # a base model without a diffusers UNet
        no_unet = load_prior(PriorConfig(model=sd_folder, lora_base_model="analytic:16", device="cpu", resolution=32))
        ScoreDistillation(vsd_guidance(), no_unet)
    assert info.value.field == "prior.lora_base_model" and "no LoRA base model" in str(info.value)
    analytic = AnalyticPrior(resolution=16)  # a prior whose input is not the base model's VAE latents
    analytic.lora_prior = load_stable_diffusion(tiny_sd_v["folder"], device="cpu")
    with pytest.raises(ConfigError) as info:
        ScoreDistillation(vsd_guidance(), analytic)
    assert info.value.field == "prior.lora_base_model" and "latents" in str(info.value)
    with pytest.raises(ConfigError, match="prior.lora_base_model.*only VSD"):  # another mode has no LoRA
        small_config(prior={"lora_base_model": sd_folder}).validate(require_model=False)


def test_lora_base_model_flag():
    from csd_backend.cli import build_parser
    from csd_backend.runs.flags import build_config

    args = build_parser().parse_args(["generate", "--prompt", "a red cube", "--model", "toy", "--preset",
                                      "vsd-prolificdreamer", "--lora-base-model", "stabilityai/stable-diffusion-2-1",
                                      "--out", "unused"])
    cfg = build_config(args, args.preset, None)
    assert cfg.prior.lora_base_model == "stabilityai/stable-diffusion-2-1"
    assert cfg.validate(require_model=True) is cfg
