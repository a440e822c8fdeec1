"""The depth ControlNet (spec §4): the condition image, conditioning of the noise prediction, a texturing run with
it, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from csd_backend.config import PriorConfig
from csd_backend.errors import ConfigError, ModelNotFoundError
from csd_backend.priors import load_prior
from csd_backend.priors.controlnet import check_compatible, depth_condition

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_depth_condition_is_near_bright_over_the_foreground():
    depth = torch.tensor([[[1.0], [2.0]], [[1.5], [0.0]]]).view(1, 2, 2, 1)
    opacity = torch.tensor([[[1.0], [1.0]], [[1.0], [0.0]]]).view(1, 2, 2, 1)
    c = depth_condition(depth, opacity)
    assert c.shape == (1, 2, 2, 3)
    np.testing.assert_allclose(c[0, ..., 0].numpy(), [[1.0, 0.0], [0.5, 0.0]])
    # a volume's composited depth (opacity · d) gives the same map
    np.testing.assert_allclose(depth_condition(depth * 0.8, opacity * 0.8).numpy(), c.numpy(), atol=1e-6)
    assert depth_condition(depth, torch.zeros_like(opacity)).abs().sum() == 0  # nothing in view: all background


def test_controlnet_conditions_the_prediction_and_scale_zero_does_not(tiny_sd, tiny_controlnet):
    plain = load_prior(PriorConfig(model=str(tiny_sd["folder"]), device="cpu"))
    cond = load_prior(PriorConfig(model=str(tiny_sd["folder"]), device="cpu", controlnet=str(tiny_controlnet)))
    off = load_prior(PriorConfig(model=str(tiny_sd["folder"]), device="cpu", controlnet=str(tiny_controlnet),
                                 controlnet_scale=0.0))
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([300, 700])
    emb = plain.encode_text(["a red cube", ""])
    control = torch.rand(2, 64, 64, 3)
    base = plain.predict_noise(z, t, emb)
    with_cn = cond.predict_noise(z, t, emb, control=control)
    assert (with_cn - base).abs().max() > 1e-3
    assert torch.allclose(off.predict_noise(z, t, emb, control=control), base, atol=1e-6)
    assert torch.equal(cond.predict_noise(z, t, emb), base)  # no condition given: the plain UNet
    other = cond.predict_noise(z, t, emb, control=1 - control)
    assert (other - with_cn).abs().max() > 1e-4  # the condition itself matters


def test_texture_run_with_a_depth_controlnet(tiny_sd, tiny_controlnet, tmp_path, capsys):
    import trimesh

    from csd_backend.cli import main
    from csd_backend.io import load_checkpoint

    src = tmp_path / "box.obj"
    trimesh.creation.box().export(src)
    out = tmp_path / "run"
    args = ["texture", str(src), "--prompt", "a red box", "--model", str(tiny_sd["folder"]), "--preset", "texture-cpu",
            "--controlnet", str(tiny_controlnet), "--controlnet-scale", "0.5", "--steps", "2", "--out", str(out),
            "--quiet", "--views", "1", "--view-size", "16", "--mesh-texture-size", "32"]
    assert main(args) == 0, capsys.readouterr().err
    cfg = load_checkpoint(out)["config"]["prior"]
    assert cfg["controlnet"] == str(tiny_controlnet) and cfg["controlnet_scale"] == 0.5
    assert (out / "mesh.glb").is_file()
    assert main(["generate", "--resume", str(out), "--steps", "3", "--quiet", "--no-mesh", "--views", "1",
                 "--view-size", "16"]) == 0, capsys.readouterr().err


def test_the_loop_hands_the_depth_of_the_render_to_the_prior(tiny_sd, tiny_controlnet):
    from csd_backend.optimize import Optimization
    from csd_backend.presets import get_preset
    from csd_backend.convert.mesh_file import mesh_scene
    import trimesh

    box = trimesh.creation.box()
    cfg = get_preset("texture-cpu").replace(guidance={"prompt": "a red box"}, optim={"steps": 1},
                                            prior={"model": str(tiny_sd["folder"]), "device": "cpu",
                                                   "controlnet": str(tiny_controlnet)})
    prior = load_prior(cfg.prior)
    seen = []
    original = prior.predict_noise

    def spy(z_t, t, emb, control=None):
        seen.append(control)
        return original(z_t, t, emb, control=control)

    prior.predict_noise = spy
    Optimization(cfg, prior, scene=mesh_scene(box.vertices, box.faces, cfg.scene)).train_step()
    control = seen[0]
    assert control is not None and control.shape[-1] == 3
    fg = control[..., 0] > 0
    assert 0.02 < fg.float().mean() < 0.9 and float(control.max()) == pytest.approx(1.0)


def test_controlnet_errors_name_the_problem(tiny_sd, tiny_controlnet, tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a folder.*control_v11f1p_sd15_depth"):
        load_prior(PriorConfig(model=str(tiny_sd["folder"]), device="cpu", controlnet=str(tmp_path / "none")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_prior(PriorConfig(model=str(tiny_sd["folder"]), device="cpu", controlnet=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="prior.controlnet.*Stable Diffusion"):
        load_prior(PriorConfig(model="analytic:16", controlnet=str(tiny_controlnet)))
    prior = load_prior(PriorConfig(model=str(tiny_sd["folder"]), device="cpu", controlnet=str(tiny_controlnet)))
    prior.controlnet.register_to_config(cross_attention_dim=768)
    with pytest.raises(ConfigError, match="cross_attention_dim is 768"):
        check_compatible(prior.controlnet, prior.unet, "prior.controlnet")
