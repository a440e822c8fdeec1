"""The MVDream prior (issue 24 items 1–2): loading the original checkpoint layout and a diffusers-style folder, every
key accounted for, the UNet = SD 2.1's with a camera embedding and self-attention across views, the camera convention,
and the loader's errors. The tiny model is ``tests/tiny_mvdream.py``."""
from __future__ import annotations

import math

import pytest
import torch

from csd_backend.config import PriorConfig
from csd_backend.errors import ConfigError, ModelNotFoundError
from csd_backend.priors import load_prior
from csd_backend.priors.mvdream import MultiViewAttnProcessor, MVDreamPrior, mvdream_camera
from csd_backend.priors.mvdream_loader import is_mvdream, load_checkpoint_parts, load_mvdream
from csd_backend.render.cameras import make_cameras, orbit_cameras

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prior(tiny_mvdream):
    return load_mvdream(tiny_mvdream["checkpoint"], device="cpu", config=tiny_mvdream["tokenizer_folder"])


def _inputs(n=4, seed=0, t=500):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.full((n,), t)


# ------------------------------------------------------------------------------------------- loading
def test_every_key_of_the_original_checkpoint_is_loaded_or_named(tiny_mvdream):
    """The converted UNet, VAE and text encoder equal the reference components tensor for tensor (the strict load
    means none is missing), and the keys not loaded are exactly the ones with a reason."""
    from tiny_mvdream import TEXT_LAYERS, kept_text_encoder

    parts, unused = load_checkpoint_parts(tiny_mvdream["checkpoint"], str(tiny_mvdream["tokenizer_folder"]),
                                          offline=True, cache_dir=None)
    ref = tiny_mvdream["parts"]
    for name, want in (("unet", ref["unet"]), ("vae", ref["vae"]),
                       ("text_encoder", kept_text_encoder(ref["text_encoder"]))):
        got, exp = parts[name].state_dict(), want.state_dict()
        assert set(got) == set(exp), name
        assert all(torch.equal(got[k], exp[k]) for k in exp), name
    ckpt = torch.load(tiny_mvdream["checkpoint"], weights_only=True)
    last = f"cond_stage_model.model.transformer.resblocks.{TEXT_LAYERS - 1}."
    expected_unused = {k for k in ckpt if k.startswith(last)} | {
        "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"} | {
        k for k in ckpt if "." not in k and k not in ("betas", "alphas_cumprod")}
    assert set(unused) == expected_unused and len(expected_unused) == 12 + 2 + 10
    assert all(isinstance(why, str) and why for why in unused.values())


def _save(tiny_mvdream, folder, name, state):
    """``state`` as ``folder/name.pt`` with the tiny model's yaml next to it (as the published pair)."""
    path = folder / f"{name}.pt"
    torch.save(state, path)
    path.with_suffix(".yaml").write_text(tiny_mvdream["yaml"].read_text())
    return path


def test_unknown_or_missing_keys_are_errors(tiny_mvdream, tmp_path):
    ckpt = torch.load(tiny_mvdream["checkpoint"], weights_only=True)
    tok = tiny_mvdream["tokenizer_folder"]
    stray = _save(tiny_mvdream, tmp_path, "stray", dict(ckpt, **{"model.diffusion_model.extra_head.weight":
                                                                  torch.zeros(1)}))
    with pytest.raises(ModelNotFoundError, match="model.diffusion_model.extra_head.weight"):
        load_mvdream(stray, device="cpu", config=tok)
    other = _save(tiny_mvdream, tmp_path, "other", {"something.else": torch.zeros(1), **ckpt})
    with pytest.raises(ModelNotFoundError, match="'something.else'.*LatentDiffusionInterface"):
        load_mvdream(other, device="cpu", config=tok)
    missing = _save(tiny_mvdream, tmp_path, "missing",
                    {k: v for k, v in ckpt.items() if k != "model.diffusion_model.out.2.weight"})
    with pytest.raises(ModelNotFoundError, match="conv_out.weight"):
        load_mvdream(missing, device="cpu", config=tok)
    no_yaml = tmp_path / "no_yaml.pt"  # without its yaml: the published sizes, which this file does not have
    torch.save(ckpt, no_yaml)
    with pytest.raises(ModelNotFoundError, match="sd-v2-base.yaml.*model_channels is 320.*--model-config"):
        load_mvdream(no_yaml, device="cpu", config=tok)


def test_diffusers_style_folder_is_the_same_model(prior, tiny_mvdream):
    folder = load_mvdream(tiny_mvdream["folder"], device="cpu")
    assert isinstance(folder, MVDreamPrior) and folder.native_resolution == prior.native_resolution == 64
    ref = prior.unet.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in folder.unet.state_dict().items()) and set(ref) == set(
        folder.unet.state_dict())
    z, t = _inputs()
    cams = orbit_cameras(4).c2w
    a = prior.predict_noise(z, t, prior.encode_text(["a cat"] * 4), cameras=cams, num_views=4)
    b = folder.predict_noise(z, t, folder.encode_text(["a cat"] * 4), cameras=cams, num_views=4)
    assert torch.equal(a, b)


def test_load_prior_picks_the_mvdream_loader(tiny_mvdream, tiny_sd):
    p = load_prior(PriorConfig(model=str(tiny_mvdream["checkpoint"]),
                               model_config=str(tiny_mvdream["tokenizer_folder"]), device="cpu"))
    assert isinstance(p, MVDreamPrior) and p.multiview and p.name == "mvdream"
    assert isinstance(load_prior(PriorConfig(model=str(tiny_mvdream["folder"]), device="cpu")), MVDreamPrior)
    sd = load_prior(PriorConfig(model=str(tiny_sd["folder"]), device="cpu"))
    assert not isinstance(sd, MVDreamPrior) and not sd.multiview


def test_ldm_conversion_matches_diffusers_own(tiny_sd):
    """The engine's LDM → diffusers maps agree with diffusers' single-file conversion on an SD checkpoint."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    from csd_backend.priors.ldm_layout import unet_from_ldm, vae_from_ldm

    ckpt = load_file(str(tiny_sd["single_file"]))
    unet_cfg = dict(UNet2DConditionModel.load_config(tiny_sd["folder"] / "unet"))
    vae_cfg = dict(AutoencoderKL.load_config(tiny_sd["folder"] / "vae"))
    theirs_unet = single_file_utils.convert_ldm_unet_checkpoint(ckpt, unet_cfg)
    theirs_vae = single_file_utils.convert_ldm_vae_checkpoint(ckpt, vae_cfg)
    ours_unet, _ = unet_from_ldm({k[len("model.diffusion_model."):]: v for k, v in ckpt.items()
                                  if k.startswith("model.diffusion_model.")}, unet_cfg["layers_per_block"])
    ours_vae, _ = vae_from_ldm({k[len("first_stage_model."):]: v for k, v in ckpt.items()
                                if k.startswith("first_stage_model.")}, len(vae_cfg["block_out_channels"]))
    for ours, theirs in ((ours_unet, theirs_unet), (ours_vae, theirs_vae)):
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k], theirs[k].reshape(ours[k].shape)) for k in ours)


# ------------------------------------------------------------------------------------- the UNet
def test_one_view_and_a_zero_camera_embedding_is_the_plain_sd_unet(prior):
    from diffusers import UNet2DConditionModel

    cfg = dict(prior.unet.config)
    cfg.update(class_embed_type=None, projection_class_embeddings_input_dim=None)
    plain = UNet2DConditionModel.from_config(cfg).eval()
    state = {k: v for k, v in prior.unet.state_dict().items() if not k.startswith("class_embedding.")}
    plain.load_state_dict(state, strict=True)
    z, t = _inputs()
    emb = prior.encode_text(["a cat", "a dog", "a cat", "a thing"])
    saved = {k: v.clone() for k, v in prior.unet.class_embedding.linear_2.state_dict().items()}
    try:
        with torch.no_grad():  # the camera MLP's output layer at zero: the camera adds nothing
            prior.unet.class_embedding.linear_2.weight.zero_()
            prior.unet.class_embedding.linear_2.bias.zero_()
        got = prior.predict_noise(z, t, emb, cameras=orbit_cameras(4).c2w, num_views=1)
    finally:
        prior.unet.class_embedding.linear_2.load_state_dict(saved)
    with torch.no_grad():
        want = plain(z, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_views_of_one_object_attend_to_each_other(prior):
    z, t = _inputs()
    emb = prior.encode_text(["a cat"] * 4)
    cams = orbit_cameras(4).c2w
    joint = prior.predict_noise(z, t, emb, cameras=cams, num_views=4)
    alone = prior.predict_noise(z, t, emb, cameras=cams, num_views=1)
    assert ((joint - alone).abs().amax(dim=(1, 2, 3)) > 1e-3).all()  # every view's output changes
    z2 = z.clone()
    z2[3] += torch.randn_like(z2[3])  # another input for the last view only
    joint2 = prior.predict_noise(z2, t, emb, cameras=cams, num_views=4)
    alone2 = prior.predict_noise(z2, t, emb, cameras=cams, num_views=1)
    assert ((joint2[:3] - joint[:3]).abs().amax(dim=(1, 2, 3)) > 1e-4).all()  # the others see it
    assert torch.equal(alone2[:3], alone[:3])  # without joined attention they do not
    # two objects of two views: the groups do not see each other
    pair = prior.predict_noise(z2, t, emb, cameras=cams, num_views=2)
    pair_ref = prior.predict_noise(z, t, emb, cameras=cams, num_views=2)
    assert torch.equal(pair[:2], pair_ref[:2]) and not torch.equal(pair[2:], pair_ref[2:])


def test_joined_self_attention_is_mvdreams(prior):
    """One attention module against MVDream's formula written out: tokens of the views concatenated,
    softmax(q·kᵀ/√d)·v per head over all of them, then the output projection."""
    attn = prior.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    views, length, channels = 4, 16, attn.to_q.in_features
    x = torch.randn(2 * views, length, channels, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = MultiViewAttnProcessor(joint=True)(attn, x, num_views=views)
        joined = x.reshape(2, views * length, channels)
        heads = attn.heads
        q, k, v = (f(joined).reshape(2, views * length, heads, -1).transpose(1, 2)
                   for f in (attn.to_q, attn.to_k, attn.to_v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        want = attn.to_out[0]((w @ v).transpose(1, 2).reshape(2, views * length, -1)).reshape(2 * views, length, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_camera_embedding_changes_the_output_but_not_the_distance(prior):
    z, t = _inputs()
    emb = prior.encode_text(["a cat"] * 4)
    a = prior.predict_noise(z, t, emb, cameras=orbit_cameras(4).c2w, num_views=4)
    b = prior.predict_noise(z, t, emb, cameras=orbit_cameras(4, start_azimuth=40.0).c2w, num_views=4)
    assert ((a - b).abs().amax(dim=(1, 2, 3)) > 1e-4).all()
    far = prior.predict_noise(z, t, emb, cameras=orbit_cameras(4, distance=5.0).c2w, num_views=4)
    torch.testing.assert_close(far, a, rtol=1e-4, atol=1e-5)  # normalize_camera: only directions count (the
    # normalised camera rounds differently across CPUs: 1.1e-6 apart on an AMD EPYC without AVX-512; a camera change
    # moves the output by more than 1e-4, above)


def test_predict_noise_needs_cameras_and_whole_objects(prior):
    z, t = _inputs()
    emb = prior.encode_text(["a cat"] * 4)
    with pytest.raises(ValueError, match="cameras"):
        prior.predict_noise(z, t, emb)
    with pytest.raises(ValueError, match="objects of 3 views"):
        prior.predict_noise(z, t, emb, cameras=orbit_cameras(4).c2w, num_views=3)
    with pytest.raises(ConfigError, match="prior.controlnet"):
        prior.attach_controlnet("anything")


# ------------------------------------------------------------------------------------ camera convention
def _mvdream_get_camera(elevation: float, azimuth: float) -> torch.Tensor:
    """MVDream's training camera (camera_utils.get_camera, blender_coord=True) written out: a unit-distance OpenGL
    look-at in a y-up world, camera at (cos e·sin a, sin e, cos e·cos a), then flip_yz = [[1,0,0],[0,0,−1],[0,1,0]]
    on the left."""
    e, a = math.radians(elevation), math.radians(azimuth)
    pos = torch.tensor([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)], dtype=torch.float64)
    forward = -pos / pos.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    right = right / right.norm()
    up = torch.linalg.cross(right, forward)
    m = torch.eye(4, dtype=torch.float64)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up / up.norm(), -forward, pos
    flip = torch.tensor([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    return (flip @ m).float()


def test_camera_condition_on_fixed_poses():
    """Hand-computed: the engine camera at elevation 0, azimuth −90° (in front of −y) is MVDream's front view
    (azimuth 0); at azimuth 0 (on +x) MVDream's azimuth 90°; elevation 30° at distance 2.5 lands on the unit sphere."""
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    cases = [((0.0, -90.0, 1.0), [[1, 0, 0, 0], [0, 0, -1, -1], [0, 1, 0, 0], [0, 0, 0, 1]]),
             ((0.0, 0.0, 3.0), [[0, 0, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]),
             ((30.0, -90.0, 2.5), [[1, 0, 0, 0], [0, s, -c, -c], [0, c, s, s], [0, 0, 0, 1]])]
    for (elevation, azimuth, distance), want in cases:
        cam = make_cameras([elevation], [azimuth], [distance], [40.0], 64, 64)
        got = mvdream_camera(cam.c2w)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32).reshape(1, 16), atol=1e-6, rtol=0)
        assert torch.equal(cam.c2w[0, :3, 3].norm(), torch.tensor(float(distance))) or distance != 1.0


def test_engine_cameras_are_mvdreams_training_cameras():
    """For a grid of poses the engine's c2w at azimuth θ − 90° equals MVDream's get_camera at θ (after the unit
    normalisation): the engine world and camera axes are MVDream's Blender convention."""
    for elevation in (-10.0, 0.0, 15.0, 30.0, 60.0):
        for azimuth in (0.0, 45.0, 90.0, 180.0, 270.0, 333.0):
            cam = make_cameras([elevation], [azimuth - 90.0], [1.7], [40.0], 32, 32)
            torch.testing.assert_close(mvdream_camera(cam.c2w), _mvdream_get_camera(elevation, azimuth).reshape(1, 16),
                                       atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- errors
def test_loader_errors_name_what_and_the_fix(tiny_mvdream, tiny_sd, tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_mvdream(tmp_path / "nope.pt", device="cpu")
    with pytest.raises(ModelNotFoundError, match="no camera embedding"):  # a plain SD checkpoint
        load_mvdream(tiny_sd["single_file"], device="cpu", config=tiny_sd["folder"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(tiny_mvdream["yaml"].read_text().replace("model_channels: 32", "model_channels: 64"))
    with pytest.raises(ModelNotFoundError, match="model_channels is 64"):
        load_mvdream(tiny_mvdream["checkpoint"], device="cpu", config=bad_yaml)
    # no tokenizer anywhere: offline with an empty cache
    with pytest.raises(ModelNotFoundError) as info:
        load_mvdream(tiny_mvdream["checkpoint"], device="cpu", cache_dir=tmp_path / "empty-cache")
    msg = str(info.value)
    assert "holds no tokenizer" in msg and "HF_HUB_OFFLINE" in msg and "--model-config" in msg
    assert "huggingface-cli download stabilityai/stable-diffusion-2-1-base" in msg
    # the hub checkpoint, not cached and offline
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE") as info:
        load_mvdream("MVDream/MVDream", device="cpu", cache_dir=tmp_path / "empty-cache")
    assert "huggingface-cli download MVDream/MVDream sd-v2.1-base-4view.pt" in str(info.value)
    # a gated download
    import huggingface_hub

    import csd_backend.priors.hub as hub

    class GatedRepoError(Exception):
        pass

    def gated(*args, **kwargs):
        raise GatedRepoError("Access to model MVDream/MVDream is restricted")

    monkeypatch.setattr(hub, "hf_offline", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(ModelNotFoundError, match="gated") as info:
        load_mvdream("MVDream/MVDream", device="cpu", cache_dir=tmp_path / "empty-cache")
    assert "huggingface-cli login" in str(info.value)


def test_pickles_with_code_are_refused(tiny_mvdream, tmp_path):
    import argparse

    ckpt = torch.load(tiny_mvdream["checkpoint"], weights_only=True)
    torch.save({"state_dict": ckpt, "hparams": argparse.Namespace(lr=1)}, tmp_path / "code.ckpt")
    with pytest.raises(ModelNotFoundError, match="refused"):
        load_mvdream(tmp_path / "code.ckpt", device="cpu", config=tiny_mvdream["tokenizer_folder"])
    assert not is_mvdream(tmp_path / "code.ckpt")  # detection never runs the pickle either


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda(tiny_mvdream, prior):
    gpu = load_mvdream(tiny_mvdream["checkpoint"], device="cuda", config=tiny_mvdream["tokenizer_folder"])
    assert gpu.unet_dtype == torch.float16
    z, t = _inputs()
    cams = orbit_cameras(4).c2w
    a = gpu.predict_noise(z, t, gpu.encode_text(["a cat"] * 4), cameras=cams, num_views=4).cpu()
    b = prior.predict_noise(z, t, prior.encode_text(["a cat"] * 4), cameras=cams, num_views=4)
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)
