"""MVDream runs end to end with the tiny model (issue 24 items 5 and 7): a few steps of mvdream-cpu train a volume
with 4-view objects, a resumed run equals an uninterrupted one bit for bit, the command line takes the checkpoint,
and the multi-view prior works with every scene kind (volume, DMTet, a user's mesh)."""
from __future__ import annotations

import pytest
import torch

from csd_backend.errors import Cancelled
from csd_backend.optimize import Optimization
from csd_backend.presets import get_preset
from csd_backend.priors.mvdream_loader import load_mvdream

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"scene": {"n_levels": 4, "log2_hashmap_size": 12, "max_resolution": 64, "mlp_width": 16},
         "camera": {"height": 16, "width": 16},
         "render": {"num_samples_per_ray": 24, "grid_warmup_steps": 2, "grid_update_every": 2}}


@pytest.fixture(scope="module")
def prior(tiny_mvdream):
    return load_mvdream(tiny_mvdream["checkpoint"], device="cpu", config=tiny_mvdream["tokenizer_folder"])


def _cfg(tiny_mvdream, steps=4, **sections):
    cfg = get_preset("mvdream-cpu").with_steps(steps)
    over = {k: dict(v) for k, v in SMALL.items()}
    over.update(prior={"model": str(tiny_mvdream["checkpoint"]), "model_config": str(tiny_mvdream["tokenizer_folder"])},
                guidance={"prompt": "a cat"}, optim={"checkpoint_every": 2, "preview_every": 0})
    for name, values in sections.items():
        over.setdefault(name, {}).update(values)
    return cfg.replace(**over)


def _params(scene):
    return [p.detach().clone() for p in scene.state_dict().values()]


def test_a_run_trains_on_whole_objects(tiny_mvdream, prior, monkeypatch):
    calls = []
    predict = prior.predict_noise

    def spy(z_t, t, embeddings, **kw):
        calls.append((z_t.shape[0], t.clone(), kw["num_views"], kw["cameras"].shape))
        return predict(z_t, t, embeddings, **kw)

    monkeypatch.setattr(prior, "predict_noise", spy)
    opt = Optimization(_cfg(tiny_mvdream, steps=3), prior)
    before = _params(opt.scene)
    infos = [opt.train_step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(i.losses["total"])) for i in infos)
    # two branches (the prompt, MVDream's negative prompt) of one 4-view object, one t per step
    for n, t, views, cams in calls:
        assert n == 8 and views == 4 and cams == (8, 4, 4) and len(set(t.tolist())) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(opt.scene)))


def test_resume_is_bit_identical(tiny_mvdream, prior, tmp_path):
    cfg = _cfg(tiny_mvdream, steps=4, scene={"random_background_prob": 0.5})
    full = Optimization(cfg, prior, out_dir=tmp_path / "full")
    full.run()
    part = Optimization(cfg, prior, out_dir=tmp_path / "part")
    with pytest.raises(Cancelled):
        part.run(cancel=lambda: part.step >= 2)
    torch.rand(100)  # the VAE samples from torch's global RNG: the checkpoint must restore it
    resumed = Optimization.resume(tmp_path / "part", prior)
    assert resumed.step == 2
    resumed.run()
    for a, b in zip(_params(full.scene), _params(resumed.scene)):
        assert torch.equal(a, b)


def test_the_command_line_takes_the_mvdream_checkpoint(tiny_mvdream, tmp_path, capsys):
    from csd_backend.cli import main

    out = tmp_path / "run"
    args = ["generate", "--prompt", "a cat", "--model", str(tiny_mvdream["checkpoint"]), "--model-config",
            str(tiny_mvdream["tokenizer_folder"]), "--preset", "mvdream-cpu", "--steps", "2", "--out", str(out),
            "--quiet", "--no-mesh", "--views", "1", "--view-size", "16"]
    for section, values in SMALL.items():
        args += [a for k, v in values.items() for a in ("--set", f"{section}.{k}={v}")]
    assert main(args) == 0, capsys.readouterr().err
    from csd_backend.io import load_checkpoint

    state = load_checkpoint(out)
    assert state["prior"] == "mvdream" and state["config"]["camera"]["n_views"] == 4 and state["step"] == 2


def test_every_scene_kind_trains_with_four_views(tiny_mvdream, prior):
    """The camera sampler and the guidance are the same for every kind: a DMTet grid from a volume and a user's
    fixed mesh train with whole 4-view objects."""
    from test_stage2 import blob_scene, icosphere, stage2_config

    from csd_backend.convert.mesh_file import mesh_scene
    from csd_backend.convert.volume_to_dmtet import volume_to_dmtet

    views = {"batch_size": 4, "n_views": 4, "relative_distance": True, "distance_range": [0.8, 1.0],
             "fovy_range": [30.0, 40.0], "height": 16, "width": 16}
    guidance = {k: v for k, v in get_preset("mvdream-cpu").to_dict()["guidance"].items()
                if k not in ("min_step_percent", "max_step_percent")}
    for kind in ("dmtet", "mesh"):
        cfg = stage2_config("a cat", steps=2, kind=kind, camera=views, guidance={**guidance, "prompt": "a cat"},
                            prior={"model": str(tiny_mvdream["checkpoint"])})
        if kind == "dmtet":
            start = volume_to_dmtet(blob_scene(), 32, 10.0)
        else:
            start = mesh_scene(*icosphere(), cfg.scene)
        opt = Optimization(cfg, prior, scene=start)
        before = _params(opt.scene)
        infos = [opt.train_step() for _ in range(2)]
        assert all(torch.isfinite(torch.tensor(i.losses["guidance"])) for i in infos), kind
        assert any(not torch.equal(a, b) for a, b in zip(before, _params(opt.scene))), kind


def test_gaussian_splats_train_with_four_views(tiny_mvdream, prior):
    """Issue 24 item 7 for the Gaussian scene kind (issue 25): gaussian-preview-cpu's splats with MVDream's
    guidance train on whole 4-view objects, and the prior sees the views of each object together."""
    calls = []
    predict = prior.predict_noise

    def spy(z_t, t, embeddings, **kw):
        calls.append((z_t.shape[0], kw["num_views"]))
        return predict(z_t, t, embeddings, **kw)

    guidance = {k: v for k, v in get_preset("mvdream-cpu").to_dict()["guidance"].items()
                if k not in ("min_step_percent", "max_step_percent")}
    cfg = get_preset("gaussian-preview-cpu").with_steps(2).replace(
        prior={"model": str(tiny_mvdream["checkpoint"]), "model_config": str(tiny_mvdream["tokenizer_folder"])},
        guidance={**guidance, "prompt": "a cat"}, scene={"gaussians": {"num_points": 200}},
        camera={"batch_size": 4, "n_views": 4, "relative_distance": True, "distance_range": [0.8, 1.0],
                "fovy_range": [30.0, 40.0], "height": 16, "width": 16},
        optim={"checkpoint_every": 0, "preview_every": 0})
    import unittest.mock as mock

    with mock.patch.object(prior, "predict_noise", spy):
        opt = Optimization(cfg, prior)
        assert opt.scene.kind == "gaussians"
        before = _params(opt.scene)
        infos = [opt.train_step() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(i.losses["guidance"])) for i in infos)
    assert calls and all(n == 8 and views == 4 for n, views in calls)
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(opt.scene)))
