"""The command line end to end on tiny runs: progress per phase, resume with the same flags, SIGTERM, stopping
early, checked output folders, strict JSON, Ctrl-C after training, file modes and viewable previews."""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from csd_backend import cli
from csd_backend.cli import main
from csd_backend.runs import outputs as run_outputs
from csd_backend.io import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--set", "camera.height=16", "--set", "camera.width=16", "--set", "render.num_samples_per_ray=16",
        "--set", "render.grid_resolution=16"]


def gen_args(out, *extra, steps=4, prompt="a red ball"):
    return ["generate", "--prompt", prompt, "--model", "analytic:16", "--preset", "preview-cpu",
            "--steps", str(steps), "--out", str(out), "--checkpoint-every", "2", "--preview-every", "2",
            "--views", "1", "--view-size", "16", *TINY, *extra]


def quiet_no_mesh(args):
    return [*args, "--quiet", "--no-mesh"]


# ------------------------------------------------------------------------------------------------ item 6
def test_resume_with_the_same_flags_works_and_only_differences_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    first = quiet_no_mesh(gen_args(out))
    assert main(first) == 0
    planned = json.loads((out / "config.json").read_text())
    capsys.readouterr()
    # the very same command with --resume added (and --out equal to the run folder) continues the run ...
    assert main([*first, "--resume", str(out)]) == 0, capsys.readouterr().err
    # ... and with --steps 6 it extends it: the schedules stay those stretched for the planned 4 steps
    assert main([*quiet_no_mesh(gen_args(out, steps=6)), "--resume", str(out)]) == 0, capsys.readouterr().err
    state = load_checkpoint(out)
    assert state["step"] == 6 and state["config"]["optim"]["steps"] == 6
    assert state["config"]["guidance"] == planned["guidance"] and state["config"]["loss"] == planned["loss"]
    capsys.readouterr()

    def refused(args, *expected):
        assert main([*args, "--resume", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        for text in expected:
            assert text in err, err
        return err

    refused(quiet_no_mesh(gen_args(out, prompt="a blue ball")),
            "guidance.prompt: saved 'a red ball', new 'a blue ball'")
    refused(quiet_no_mesh(gen_args(out, "--seed", "5")), "optim.seed: saved 0, new 5")
    refused(quiet_no_mesh(gen_args(out, "--set", "render.num_samples_per_ray=32")),
            "render.num_samples_per_ray: saved 16, new 32")
    refused(quiet_no_mesh(gen_args(out, "--no-rescale-schedules")), "guidance.negative_weight: saved")
    refused(quiet_no_mesh(gen_args(tmp_path / "elsewhere")), "--out", "is not the folder of the run being resumed")
    err = refused([a if a != "preview-cpu" else "csd-coarse" for a in quiet_no_mesh(gen_args(out))],
                  "preset: saved 'preview-cpu', new 'csd-coarse'")
    assert "more)" in err  # the preset changes many settings: the first ones are named, then a count
    assert load_checkpoint(out)["step"] == 6  # nothing ran
    # flags that may change: the model spelling, the device, the views
    assert main(["generate", "--resume", str(out), "--model", "analytic:16", "--device", "cpu", "--views", "2",
                 "--view-size", "16", "--quiet", "--no-mesh", "--steps", "7"]) == 0


# ------------------------------------------------------------------------------------------------ item 8
def test_resume_with_fewer_steps_than_planned_warns_in_engine_and_cli(tmp_path, capsys, caplog):
    from csd_backend.errors import Cancelled
    from csd_backend.optimize import Optimization
    from csd_backend.priors.analytic import AnalyticPrior
    from engine_helpers import small_config

    opt = Optimization(small_config("red", steps=6), AnalyticPrior(16), out_dir=tmp_path)
    with pytest.raises(Cancelled):
        opt.run(cancel=lambda: opt.step >= 2)
    # the engine path (also used by the ComfyUI Optimize node) warns through the "csd_backend" logger
    with caplog.at_level("WARNING", logger="csd_backend"):
        Optimization.resume(tmp_path, AnalyticPrior(16), steps=4)
    assert any(r.name.startswith("csd_backend") and "ends at step 4 instead of 6" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="csd_backend"):
        Optimization.resume(tmp_path, AnalyticPrior(16), steps=6)
        Optimization.resume(tmp_path, AnalyticPrior(16), steps=9)
    assert not caplog.records  # as planned or longer: nothing to say
    # the command line prints it as a warning line
    assert main(["generate", "--resume", str(tmp_path), "--steps", "3", "--quiet", "--no-mesh", "--views", "1",
                 "--view-size", "16"]) == 0
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "ends at step 3" in ln)
    assert line.startswith("warning: steps 3 is below the 6 steps this run planned") and "schedules" in line
    assert load_checkpoint(tmp_path)["step"] == 3


# ------------------------------------------------------------------------------------------------ item 7
def test_sigterm_keeps_a_checkpoint_and_a_run_without_one_restarts_from_step_0(tmp_path, capsys):
    out = tmp_path / "run"
    args = gen_args(out, "--quiet", "--no-mesh", steps=100000)
    args[args.index("--checkpoint-every") + 1] = "0"  # no periodic checkpoint: SIGTERM must write one
    args[args.index("--preview-every") + 1] = "1"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "csd_backend", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    try:
        deadline = time.time() + 240
        while not (out / "previews" / "step_00001.png").exists():  # config.json is written, training runs
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "the run did not start"
            time.sleep(0.1)
        assert (out / "config.json").is_file()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    # torch's own logged warnings (its "W1207 12:00:00.000 ..." lines) may hold a traceback of its compile cache
    # (an entry written by a script whose __main__ imports torch fails to unpickle here; torch then recompiles)
    assert "Traceback" not in "\n".join(ln for ln in err.splitlines() if not re.match(r"[IWE]\d{4} ", ln))
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at step") and f"generate --resume {out}" in last
    done = load_checkpoint(out)["step"]
    assert done >= 1
    assert main(["generate", "--resume", str(out), "--steps", str(done + 1), "--quiet", "--no-mesh",
                 "--views", "1", "--view-size", "16"]) == 0
    assert load_checkpoint(out)["step"] == done + 1
    # killed before its first checkpoint (SIGKILL, power loss): config.json but no checkpoint → restart from 0
    for p in (out / "checkpoints").iterdir():
        p.unlink()
    capsys.readouterr()
    assert main(["generate", "--resume", str(out), "--steps", "2", "--quiet", "--no-mesh", "--views", "1",
                 "--view-size", "16"]) == 0
    err = capsys.readouterr().err
    assert "restarts from step 0" in err and "resuming" in err and "at step 0 of 2" in err
    assert load_checkpoint(out)["step"] == 2
    # ... which is the run its config.json describes, from the start
    from csd_backend.optimize import Optimization, read_run_config
    from csd_backend.priors.analytic import AnalyticPrior

    ref = Optimization(read_run_config(out).replace(optim={"steps": 2}), AnalyticPrior(16))
    ref.run()
    resumed = load_checkpoint(out)["scene"]
    for k, v in ref.scene.state_dict().items():
        assert torch.equal(v, resumed[k]), k


def test_the_cli_restores_the_sigterm_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["presets"]) == 0
    assert main(["generate", "--resume", str(tmp_path / "missing")]) == 2
    assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------------------------------------ item 10
def test_output_folder_problems_are_found_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import csd_backend.priors as priors

    loads = []
    real = priors.load_prior
    monkeypatch.setattr(priors, "load_prior", lambda cfg: loads.append(cfg) or real(cfg))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(quiet_no_mesh(gen_args(a_file))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out: ") and "is a file, not a folder" in err and err.count("\n") == 1
    assert main(quiet_no_mesh(gen_args(a_file / "sub"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out: cannot create the folder") and "Traceback" not in err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            assert main(quiet_no_mesh(gen_args(ro / "run"))) == 2
            assert "--out: cannot" in capsys.readouterr().err
        finally:
            ro.chmod(0o700)
    assert loads == []  # refused before any model was loaded
    # render and export check their --out the same way
    assert main(["render", str(tmp_path), "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(a_file / "mesh.glb")]) == 2
    assert f"--out: {a_file} is a file, not a folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(a_file / "sub" / "mesh.glb")]) == 2
    assert "--out: cannot create the folder" in capsys.readouterr().err


def test_a_failed_start_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert main(quiet_no_mesh(gen_args(out, "--model", str(tmp_path / "no-model")))) == 2
    assert "no-model" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # the same command works once the model is fixed


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e999", "[0, Infinity]"])
def test_non_finite_set_values_are_refused_naming_the_field(tmp_path, capsys, value):
    assert main(quiet_no_mesh(gen_args(tmp_path / "o", "--set", f"prior.resolution={value}"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prior.resolution: ") and "finite" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["0", "-3", "100000", "64.5", "true", '"big"'])
def test_prior_resolution_is_validated(tmp_path, capsys, value):
    assert main(quiet_no_mesh(gen_args(tmp_path / "o", "--set", f"prior.resolution={value}"))) == 2
    assert capsys.readouterr().err.startswith("error: prior.resolution: must be an integer in [8, 8192]")


def test_ctrl_c_after_training_is_one_line_with_the_commands_to_finish(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_outputs, "render_views", interrupted)
    out = tmp_path / "a"
    assert main(quiet_no_mesh(gen_args(out))) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("interrupted while rendering the views; the run itself is complete")
    assert f"Write the missing views and mesh later with: python -m csd_backend generate --resume {out}" in err[-1]
    assert load_checkpoint(out)["step"] == 4
    monkeypatch.undo()
    monkeypatch.setattr(run_outputs, "export_mesh", interrupted)
    out = tmp_path / "b"
    assert main([*gen_args(out), "--quiet"]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("interrupted while exporting the mesh") and "Traceback" not in last


# ------------------------------------------------------------------------------------------ items 5, 15, 16
def test_progress_bars_for_every_phase_and_quiet_hides_them(tmp_path, capsys):
    out = tmp_path / "run"
    args = gen_args(out, "--mesh-resolution", "32", "--mesh-texture-size", "64", steps=2)
    args[args.index("--views") + 1] = "2"
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "training: 100%" in err and "views: 100%" in err and "2/2" in err
    for stage in ("extraction", "simplification", "UVs", "baking"):
        assert f"{stage}: 100%" in err, err[-3000:]
    assert (out / "mesh.glb").is_file()
    assert main(["render", str(out), "--out", str(tmp_path / "v"), "--views", "3", "--size", "16"]) == 0
    assert "views: 100%" in capsys.readouterr().err
    assert main(["export", str(out), "--out", str(tmp_path / "m.ply"), "--resolution", "32",
                 "--texture-size", "0"]) == 0
    err = capsys.readouterr().err
    assert "extraction: 100%" in err and "simplification: 100%" in err
    # --quiet: no bars anywhere
    assert main(["render", str(out), "--out", str(tmp_path / "v2"), "--views", "2", "--size", "16", "--quiet"]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "q.ply"), "--resolution", "32", "--texture-size", "0",
                 "--quiet"]) == 0
    assert main([*gen_args(tmp_path / "q", "--mesh-resolution", "32", "--mesh-texture-size", "0", steps=2),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "%|" not in err and "views:" not in err and "extraction" not in err and "training" not in err


def test_outputs_follow_the_umask_and_previews_are_viewable(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(quiet_no_mesh(gen_args(out))) == 0
        assert main(["render", str(out), "--out", str(tmp_path / "views"), "--views", "1", "--size", "16",
                     "--quiet"]) == 0
    finally:
        os.umask(old)
    files = [out / "config.json", out / "checkpoints" / "last.ckpt", out / "checkpoints" / "previous.ckpt",
             out / "previews" / "step_00002.png", out / "renders" / "view_00.png"]
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    # the 16² training renders are saved as 256² PNGs, every render pixel a 16×16 block (nearest neighbour)
    preview = Image.open(out / "previews" / "step_00002.png")
    assert preview.size == (256, 256)
    import numpy as np

    px = np.asarray(preview)
    assert (px[:16, :16] == px[0, 0]).all() and (px[16:32, 16:32] == px[16, 16]).all()
    assert Image.open(out / "renders" / "view_00.png").size == (256, 256)
    # `render` writes exactly the --size asked for
    assert Image.open(next((tmp_path / "views").iterdir())).size == (16, 16)
    # config.json is strict JSON
    json.loads((out / "config.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
