"""The MVDream nodes (issue 24 item 6): CSD Load Diffusion Model lists and loads MVDream (the original checkpoint in
models/checkpoints with its yaml beside it, a diffusers-style folder in models/diffusers), and CSD MVDream runs the
multi-view presets from the prompts alone. The template (09-text-to-3D-CSD-MVDream-multi-view-GPU) runs end to end in test_workflows.py."""
from __future__ import annotations

import shutil
import sys

import pytest
import torch

import comfy_stubs as cs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_sd, tiny_mvdream):
    env = cs.install(monkeypatch, tmp_path)
    shutil.copy(tiny_mvdream["checkpoint"], env.models_dir / "checkpoints" / "tiny-4view.pt")
    shutil.copy(tiny_mvdream["yaml"], env.models_dir / "checkpoints" / "tiny-4view.yaml")
    (env.models_dir / "diffusers" / "tiny-mvdream").symlink_to(tiny_mvdream["folder"], target_is_directory=True)
    (env.models_dir / "diffusers" / "tiny-sd").symlink_to(tiny_sd["folder"], target_is_directory=True)
    return env


@pytest.fixture
def classes(env):
    return cs.node_classes(cs.load_pack())


def _load(classes, model, config_from="(auto)"):
    node = classes["CSDLoadDiffusionModel"]()
    return node.load(model=model, device="cpu", dtype="auto", resolution=0, config_from=config_from)[0]


def test_the_loader_lists_and_loads_mvdream(classes):
    spec = classes["CSDLoadDiffusionModel"].INPUT_TYPES()["required"]
    assert {"checkpoints/tiny-4view.pt", "diffusers/tiny-mvdream"} <= set(spec["model"][0])
    assert "MVDream" in classes["CSDLoadDiffusionModel"].DESCRIPTION
    folder = _load(classes, "diffusers/tiny-mvdream")
    # the checkpoint has no tokenizer: config_from names a Stable Diffusion 2.x-style folder to take it from
    single = _load(classes, "checkpoints/tiny-4view.pt", config_from="diffusers/tiny-sd")
    for prior in (folder, single):
        assert prior.multiview and prior.name == "mvdream"
    assert all(torch.equal(a, b) for a, b in zip(folder.unet.state_dict().values(), single.unet.state_dict().values()))


def test_the_mvdream_node_takes_a_multi_view_prior_and_the_multi_view_presets(env, classes):
    from csd_backend.errors import ConfigError

    cls = classes["CSDMVDream"]
    spec = cls.INPUT_TYPES()["required"]
    assert spec["preset"][0] == ["csd-mvdream", "mvdream-cpu", "sds-mvdream"]
    assert spec["preset"][1]["default"] == "csd-mvdream" and cls.RETURN_TYPES == ("CSD_SCENE", "IMAGE")
    sd = _load(classes, "diffusers/tiny-sd")
    with pytest.raises(ConfigError, match="prior.*multi-view prior"):
        cls().generate(sd, "a cat", "ugly", "mvdream-cpu", 2, 0, 1, 1, "mv", False)


def test_the_mvdream_node_trains_the_presets_run(env, classes):
    from csd_backend.io import load_checkpoint

    prior = _load(classes, "diffusers/tiny-mvdream")
    scene, preview = classes["CSDMVDream"]().generate(prior, "a cat", "ugly", "mvdream-cpu", 2, 3, 1, 1, "mv", False)
    assert scene.kind == "volume" and preview.shape[0] == 1
    state = load_checkpoint(env.output_dir / "csd3d" / "runs" / "mv_00001")
    c = state["config"]
    assert state["step"] == 2 and state["prior"] == "mvdream"
    assert c["guidance"]["prompt"] == "a cat" and c["guidance"]["negative_prompt"] == "ugly"
    assert c["camera"]["n_views"] == 4 and c["guidance"]["grad_normalize_by"] == "std" and c["optim"]["seed"] == 3
    # resume continues the run with its saved settings
    scene2, _ = classes["CSDMVDream"]().generate(prior, "a cat", "ugly", "mvdream-cpu", 3, 3, 1, 1, "mv", True)
    assert load_checkpoint(env.output_dir / "csd3d" / "runs" / "mv_00001")["step"] == 3
    assert sys.modules[f"{cs.PACK_MODULE}.nodes.mvdream"].multiview_presets() == ["csd-mvdream", "mvdream-cpu",
                                                                               "sds-mvdream"]
