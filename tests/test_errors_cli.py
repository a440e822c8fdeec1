"""Bad input gives a clear error naming the field and the fix; the command line runs the main job end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from csd_backend.cli import main
from csd_backend.config import RunConfig
from csd_backend.errors import ConfigError, ModelNotFoundError
from csd_backend.optimize import Optimization
from csd_backend.presets import PRESETS, get_preset
from csd_backend.priors import load_prior
from csd_backend.priors.analytic import AnalyticPrior
from engine_helpers import small_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sections, field", [
    ({"guidance": {"prompt": "   "}}, "prompt"),
    ({"optim": {"steps": 0}}, "steps"),
    ({"optim": {"steps": -5}}, "steps"),
    ({"optim": {"lr": -1.0}}, "optim.lr"),
    ({"guidance": {"mode": "no-such-mode"}}, "guidance.mode"),
    ({"guidance": {"weighting": "linear"}}, "guidance.weighting"),
    ({"guidance": {"negative_weight": [0, 1]}}, "guidance.negative_weight"),
    ({"guidance": {"mode": "edit", "source_prompt": ""}}, "source_prompt"),
    ({"camera": {"elevation_range": [45.0, -10.0]}}, "camera.elevation_range"),
    ({"camera": {"height": 0}}, "camera.height"),
    ({"camera": {"fovy_range": [40.0, 200.0]}}, "camera.fovy_range"),
    ({"scene": {"radius": 0.0}}, "scene.radius"),
    ({"render": {"num_samples_per_ray": 1}}, "render.num_samples_per_ray"),
    ({"scene": {"log2_hashmap_size": 40}}, "scene.log2_hashmap_size"),
    ({"guidance": {"grad_clip": -1.0}}, "guidance.grad_clip"),
    ({"guidance": {"guidance_weight": float("nan")}}, "guidance.guidance_weight"),
    ({"guidance": {"negative_prompt": None}}, "negative_prompt"),
    ({"guidance": {"view_dependent": "false"}}, "view_dependent"),
    ({"render": {"ambient_only_steps": "5"}}, "render.ambient_only_steps"),
    ({"scene": {"density_blob_std": 0.0}}, "scene.density_blob_std"),
    ({"scene": {"finite_difference_eps": 0.0}}, "scene.finite_difference_eps"),
    ({"loss": {"sparsity": -1.0}}, "loss.sparsity"),
    ({"prior": {"resolution": float("inf")}}, "prior.resolution"),
    ({"prior": {"resolution": 4}}, "prior.resolution"),
    ({"prior": {"resolution": 512.0}}, "prior.resolution"),
    ({"guidance": {"min_step_percent": 0.6, "max_step_percent": [10, 0.98, 0.5, 11]}},
     "guidance.min_step_percent/max_step_percent"),
])
def test_invalid_config_names_the_field(sections, field):
    cfg = small_config("red").replace(**sections)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert e.value.field == field
    assert str(e.value).startswith(field)


def test_unknown_setting_and_preset():
    with pytest.raises(ConfigError, match="unknown setting; valid ones are"):
        RunConfig.from_dict({"optim": {"stepz": 3}})
    with pytest.raises(ConfigError, match="unknown preset 'fast'; choose one of: csd-coarse"):
        get_preset("fast")


def test_missing_model_errors():
    with pytest.raises(ConfigError, match="no diffusion model given"):
        load_prior(small_config().prior.__class__(model=""))
    with pytest.raises(ModelNotFoundError) as e:
        load_prior(small_config().prior.__class__(model="/nonexistent/models/sd21"))
    assert "/nonexistent/models/sd21" in str(e.value)


def test_missing_model_on_the_command_line_says_how_to_try_without_weights(tmp_path, capsys):
    from csd_backend.cli import main

    code = main(["generate", "--prompt", "a corgi", "--model", str(tmp_path / "no-such-model"), "--preset",
                 "preview-cpu", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "--model toy" in err and "--model analytic" in err
    assert "Traceback" not in err


def test_render_size_the_prior_cannot_take(tiny_sd):
    from csd_backend.priors.stable_diffusion import load_stable_diffusion

    prior = load_stable_diffusion(tiny_sd["folder"], resolution=40)
    with pytest.raises(ConfigError, match="render size"):
        Optimization(small_config("red"), prior)


def test_every_preset_is_valid_and_rescales():
    for name in PRESETS:
        cfg = get_preset(name).replace(guidance={"prompt": "x", "source_prompt": "y"}, prior={"model": "m"})
        cfg.validate()
    short = get_preset("csd-coarse").with_steps(1000)
    assert short.guidance.negative_weight == [0, 0.0, 1.0, 500]
    assert short.guidance.max_step_percent == [500, 0.98, 0.5, 500]
    assert short.render.ambient_only_steps == 200
    assert short.optim.steps == 1000
    kept = get_preset("csd-coarse").with_steps(1000, rescale_schedules=False)
    assert kept.guidance.negative_weight == [0, 0.0, 1.0, 5000]
    with pytest.raises(ConfigError, match="steps"):
        get_preset("csd-coarse").with_steps(0)


def test_prompt_embeddings_are_cached():
    prior = AnalyticPrior(8)
    calls = []
    orig = prior._encode_text_uncached
    prior._encode_text_uncached = lambda prompts: calls.append(list(prompts)) or orig(prompts)
    prior.encode_text(["red", "", "red"])
    prior.encode_text(["red", "blue"])
    assert calls == [["red", ""], ["blue"]]


# ------------------------------------------------------------------- CLI
def run_cli(*args, env=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "csd_backend", *args], capture_output=True, text=True, env=e,
                          cwd=str(ROOT), timeout=300)


def test_cli_help_documents_every_flag():
    r = run_cli("generate", "--help")
    assert r.returncode == 0
    for flag in ("--prompt", "--negative-prompt", "--model", "--preset", "--steps", "--seed", "--out", "--resume",
                 "--model-config", "--init-scene", "--source-prompt", "--preview-every", "--set"):
        assert flag in r.stdout


def test_cli_generate_resume_and_render(tmp_path):
    out = tmp_path / "run"
    args = ["generate", "--prompt", "a red ball", "--model", "analytic:16", "--preset", "preview-cpu",
            "--steps", "6", "--out", str(out), "--preview-every", "3", "--checkpoint-every", "2", "--views", "2",
            "--view-size", "24", "--quiet", "--set", "camera.height=24", "--set", "camera.width=24",
            "--set", "render.num_samples_per_ray=32", "--no-mesh"]
    assert main(args) == 0
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step_00003.png", "step_00006.png"]
    assert sorted(p.name for p in (out / "renders").iterdir()) == ["view_00.png", "view_01.png"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["guidance"]["prompt"] == "a red ball" and cfg["optim"]["steps"] == 6
    assert cfg["camera"]["height"] == 24
    # the same out folder is refused (never overwritten) ...
    assert main(args) == 2
    # ... and the run can be extended with --resume
    assert main(["generate", "--resume", str(out), "--steps", "8", "--quiet", "--views", "1", "--view-size", "16",
                 "--no-mesh"]) == 0
    from csd_backend.io import load_checkpoint

    assert load_checkpoint(out)["step"] == 8
    assert (out / "renders" / "view_00_00001.png").exists() or len(list((out / "renders").iterdir())) == 3
    assert main(["render", str(out), "--out", str(tmp_path / "views"), "--views", "2", "--size", "16"]) == 0
    assert len(list((tmp_path / "views").iterdir())) == 2
    # edit the saved scene: the source description takes the negative slot
    edited = tmp_path / "edited"
    assert main(["generate", "--preset", "csd-edit", "--init-scene", str(out), "--source-prompt", "a red ball",
                 "--prompt", "a blue ball", "--model", "analytic:16", "--steps", "3", "--out", str(edited),
                 "--quiet", "--no-mesh", "--views", "1", "--view-size", "16", "--set", "camera.height=24",
                 "--set", "camera.width=24", "--set", "render.num_samples_per_ray=32"]) == 0
    cfg = json.loads((edited / "config.json").read_text())
    assert cfg["guidance"]["mode"] == "edit" and cfg["guidance"]["source_prompt"] == "a red ball"
    assert cfg["scene"]["n_levels"] == 8  # the edited scene keeps the settings of the scene it started from


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["generate", "--prompt", "x", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                 "--preset", "preview-cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and "Traceback" not in err
    assert main(["generate", "--prompt", "", "--model", "analytic", "--out", str(tmp_path / "o2")]) == 2
    assert "prompt" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--model", "analytic", "--out", str(tmp_path / "o3"),
                 "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err
    assert main(["generate", "--resume", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--resume", str(tmp_path / "empty"), "--seed", "3"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    # a file name Windows reserves is refused before the scene is even loaded (there is no run here)
    assert main(["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "CON.glb")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "reserve" in err.lower()
    with pytest.raises(SystemExit):
        main(["generate", "--preset", "nope"])


def test_cli_main_job_with_tiny_sd_single_file(tmp_path, tiny_sd):
    out = tmp_path / "sd"
    r = run_cli("generate", "--prompt", "a chair", "--model", str(tiny_sd["single_file"]), "--model-config",
                str(tiny_sd["folder"]), "--preset", "csd-coarse", "--steps", "2", "--out", str(out), "--quiet",
                "--resolution", "64", "--views", "1", "--view-size", "16", "--set", "camera.height=16",
                "--set", "camera.width=16", "--set", "render.num_samples_per_ray=32", "--mesh-resolution", "32",
                "--mesh-texture-size", "128")
    assert r.returncode == 0, r.stderr[-2000:]
    # --quiet is quiet: no third-party loading bars or installation advice
    assert "Loading weights" not in r.stderr and "accelerate" not in r.stderr, r.stderr[-2000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    # a 2-step scene may have no surface yet: then generate says how to export later instead of failing
    assert (out / "mesh.glb").is_file() or "export" in r.stderr
