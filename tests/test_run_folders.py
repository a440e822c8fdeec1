"""A run folder's life on the command line (``csd_backend/runs``): one writer at a time (``run.lock``), a full disk,
output flags checked before the first step, a finished run completed by ``--resume``, what ``config.json`` says,
damaged files, Ctrl-C told at once."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from csd_backend.cli import main
from csd_backend.errors import CheckpointError
from csd_backend.io import load_checkpoint
from csd_backend.runs import lock as run_lock
from csd_backend.runs.lock import LOCK_FILE, RunLock, RunLockedError
from csd_backend.runs.stopping import AGAIN, NOTICE
from test_cli_runs import ROOT, gen_args, quiet_no_mesh

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def default_signals() -> None:
    """In the child before it starts: SIGINT and SIGTERM as in a terminal's foreground job (a child inherits
    "ignored" from its parent, and Python then leaves Ctrl-C ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_cli(args, out: Path, wait_for: str = "previews/step_00001.png") -> subprocess.Popen:
    """``python -m csd_backend ARGS`` in a subprocess, returned once ``out/wait_for`` exists."""
    proc = subprocess.Popen([sys.executable, "-m", "csd_backend", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=str(ROOT),
                            preexec_fn=default_signals if os.name == "posix" else None)
    deadline = time.time() + 240
    while not (out / wait_for).exists():
        if proc.poll() is not None:
            pytest.fail(proc.communicate()[1][-2000:])
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the run did not start")
        time.sleep(0.1)
    return proc


# ------------------------------------------------------------------------------------------------ the lock
def test_a_second_writer_is_refused_naming_the_holder_and_a_crashed_holder_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    long_run = gen_args(out, "--quiet", "--no-mesh", steps=100000)
    long_run[long_run.index("--preview-every") + 1] = "1"
    proc = start_cli(long_run, out, wait_for="checkpoints/last.ckpt")
    try:
        info = json.loads((out / LOCK_FILE).read_text())
        assert info["pid"] == proc.pid and info["host"] == socket.gethostname()
        assert main(["generate", "--resume", str(out), "--quiet", "--no-mesh"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by PID {proc.pid} on {socket.gethostname()}" in err and "Traceback" not in err
        proc.kill()  # a crash: the lock file stays behind, its holder is gone
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / LOCK_FILE).is_file()
    done = load_checkpoint(out)["step"]
    assert main(["generate", "--resume", str(out), "--steps", str(done + 1), "--quiet", "--no-mesh", "--views",
                 "1", "--view-size", "16"]) == 0
    err = capsys.readouterr().err
    assert "taking over a stale lock" in err and f"PID {proc.pid}" in err
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_lock_rules(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with RunLock(folder, "first"):
        with pytest.raises(RunLockedError, match="already in use by this process"):
            RunLock(folder, "second").acquire()
    assert not (folder / LOCK_FILE).exists()
    # a lock of another host cannot be checked: refused, saying how to remove it
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0, "command": "x"}))
    with pytest.raises(RunLockedError, match=f"delete {folder / LOCK_FILE}"):
        RunLock(folder).acquire()
    # a lock whose PID was reused by another process (different start time) is stale
    (folder / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": 0,
                                                "process_start": "no such start", "command": "x"}))
    RunLock(folder).acquire().release()
    # so is a damaged lock file
    (folder / LOCK_FILE).write_text("{half")
    lock = RunLock(folder).acquire()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not run_lock._HELD


def test_a_batch_run_folder_in_use_is_not_written(tmp_path):
    from csd_backend.batch.execute import PriorCache, execute
    from csd_backend.batch.plan import RunSpec
    from csd_backend.presets import get_preset
    from csd_backend.runs.outputs import RunOutputs

    cfg = get_preset("preview-cpu").replace(guidance={"prompt": "a red ball"}, prior={"model": "analytic:16"},
                                            camera={"height": 16, "width": 16},
                                            render={"num_samples_per_ray": 16}).with_steps(2)
    spec = RunSpec(id="0001-a-red-ball", index=1, line=1, prompt="a red ball", seed=0, config=cfg.to_dict())
    (tmp_path / spec.folder).mkdir()
    (tmp_path / spec.folder / LOCK_FILE).write_text(json.dumps(
        {"pid": os.getppid(), "host": socket.gethostname(), "started": 0, "command": "generate"}))
    end = execute(spec, tmp_path, RunOutputs(views=1, view_size=16, mesh=False, quiet=True), lambda ev: None,
                  PriorCache())
    assert end["status"] == "failed" and f"in use by PID {os.getppid()}" in end["error"]
    assert [p.name for p in (tmp_path / spec.folder).iterdir()] == [LOCK_FILE]


# ------------------------------------------------------------------------------------------- a full disk
def _disk_full_after(monkeypatch, calls: int, error: BaseException):
    """``torch.save`` fails like a full disk after ``calls`` successful saves; the disk shows 0 bytes free."""
    real = torch.save
    done = [0]

    def save(obj, f, *args, **kwargs):
        if done[0] >= calls:
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise error
        done[0] += 1
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr("csd_backend.io.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 0))


def test_a_full_disk_while_saving_a_checkpoint_names_the_file_the_space_and_the_intact_checkpoint(
        tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _disk_full_after(monkeypatch, 1, RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos "
                                                  "4160 vs 4032"))
    assert main(quiet_no_mesh(gen_args(out, steps=4))) == 1  # checkpoints at steps 2 and 4
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "inline_container" not in err
    line = err.splitlines()[-1]
    assert line.startswith(f"error: could not write {out / 'checkpoints' / 'last.ckpt'}: the disk is full "
                           "(0 bytes free on its disk)")
    assert "The checkpoint of step 2" in line and f"generate --resume {out}" in line
    monkeypatch.undo()
    assert load_checkpoint(out)["step"] == 2  # intact, and the run goes on from it
    assert main(quiet_no_mesh(["generate", "--resume", str(out), "--views", "1", "--view-size", "16"])) == 0
    assert load_checkpoint(out)["step"] == 4


def test_a_full_disk_while_writing_the_mesh_says_training_is_complete(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = Path.write_bytes

    def write_bytes(self, data):
        if ".mesh.glb." in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    args = [*gen_args(out, "--mesh-resolution", "32", "--mesh-texture-size", "0"), "--quiet"]
    assert main(args) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: could not write {out / 'mesh.glb'}: the disk is full (")
    assert "The training is complete" in line and f"generate --resume {out}" in line
    monkeypatch.undo()
    views = sorted(p.name for p in (out / "renders").iterdir())
    assert main(["generate", "--resume", str(out), "--quiet", "--views", "1", "--view-size", "16",
                 "--mesh-resolution", "32", "--mesh-texture-size", "0"]) == 0
    assert (out / "mesh.glb").is_file() and sorted(p.name for p in (out / "renders").iterdir()) == views


# --------------------------------------------------------------------------------------------- output flags
@pytest.mark.parametrize("flag,value", [("--views", "-1"), ("--view-size", "0"), ("--view-size", "-16"),
                                        ("--mesh-resolution", "1"), ("--mesh-texture-size", "5"),
                                        ("--mesh-face-budget", "2")])
def test_output_flags_are_checked_before_the_first_step(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    args = gen_args(out, "--quiet")
    i = args.index(flag) if flag in args else None
    if i is None:
        args += [flag, value]
    else:
        args[i + 1] = value
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}: ") and "Traceback" not in err
    assert not out.exists()  # nothing ran


def test_no_views_is_a_run_without_renders_and_render_needs_one(tmp_path, capsys):
    out = tmp_path / "run"
    args = quiet_no_mesh(gen_args(out))
    args[args.index("--views") + 1] = "0"
    assert main(args) == 0
    assert "no renders (--views 0)" in capsys.readouterr().err and not (out / "renders").exists()
    assert main(["render", str(out), "--out", str(tmp_path / "v"), "--views", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --views: ")


def test_render_names_views_like_generate_and_refuses_a_folder_with_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(quiet_no_mesh(gen_args(out))) == 0
    views = tmp_path / "views"
    assert main(["render", str(out), "--out", str(views), "--views", "2", "--size", "16", "--quiet"]) == 0
    assert sorted(p.name for p in views.iterdir()) == ["view_00.png", "view_01.png"]
    assert main(["render", str(out), "--out", str(views), "--views", "2", "--size", "16", "--quiet"]) == 2
    assert "is not empty" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ finishing a run later
def test_interrupted_views_and_mesh_are_finished_by_resume_without_duplicates(tmp_path, capsys, monkeypatch):
    from csd_backend.runs import outputs as run_outputs

    out = tmp_path / "run"
    real = run_outputs.save_png
    saved = []

    def save_then_stop(image, path, *args):
        if "renders" in str(path) and len(saved) == 1:
            raise KeyboardInterrupt
        saved.append(path)
        return real(image, path, *args)

    monkeypatch.setattr(run_outputs, "save_png", save_then_stop)
    args = [*gen_args(out, "--mesh-resolution", "32", "--mesh-texture-size", "0"), "--quiet"]
    args[args.index("--views") + 1] = "3"
    assert main(args) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("interrupted while rendering the views") and f"generate --resume {out}" in last
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "renders").iterdir()) == ["view_00.png"]
    before = (out / "renders" / "view_00.png").read_bytes()
    resume = ["generate", "--resume", str(out), "--quiet", "--views", "3", "--view-size", "16",
              "--mesh-resolution", "32", "--mesh-texture-size", "0"]
    assert main(resume) == 0
    assert "nothing to train" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "renders").iterdir()) == ["view_00.png", "view_01.png", "view_02.png"]
    assert (out / "renders" / "view_00.png").read_bytes() == before and (out / "mesh.glb").is_file()
    assert main(resume) == 0  # once more: nothing is missing, nothing is written
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["config.json", "mesh.glb"]


# ----------------------------------------------------------------------------------------- what a run says
def test_config_json_records_what_the_run_resolved(tmp_path):
    from csd_backend.optimize import read_run_config

    out = tmp_path / "run"
    assert main(quiet_no_mesh(gen_args(out))) == 0
    data = json.loads((out / "config.json").read_text())
    assert data["prior"]["resolution"] is None and data["prior"]["device"] == "auto"  # the settings, as given
    assert data["resolved"] == {"prior.model": "analytic", "prior.resolution": 16, "prior.device": "cpu",
                                "scene.encoding_backend": "torch", "render.backend": "torch"}
    assert read_run_config(out).prior.resolution is None  # the record is not a setting


def test_a_damaged_config_json_is_refused_on_resume_and_says_what_to_do(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(quiet_no_mesh(gen_args(out))) == 0
    (out / "config.json").write_text("{not json")
    resume = quiet_no_mesh(["generate", "--resume", str(out), "--steps", "6", "--views", "1", "--view-size", "16"])
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert "cannot use" in err and "delete config.json to resume with those" in err
    (out / "config.json").unlink()
    assert main(resume) == 0 and load_checkpoint(out)["step"] == 6


def test_with_both_checkpoints_damaged_no_checkpoint_is_said_to_be_kept(tmp_path):
    out = tmp_path / "run"
    assert main(quiet_no_mesh(gen_args(out))) == 0
    ck = out / "checkpoints"
    assert (ck / "previous.ckpt").is_file()
    for name in ("last.ckpt", "previous.ckpt"):
        data = bytearray((ck / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ck / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(out)
    assert "damaged too: no intact checkpoint is left" in str(info.value) and "is intact" not in str(info.value)


def test_the_short_schedule_form_is_documented_where_it_is_refused():
    from csd_backend.errors import ConfigError
    from csd_backend.schedules import schedule_value, validate_schedule

    assert schedule_value([1.0, 3.0, 10], 5) == pytest.approx(2.0)  # [start_value, end_value, end_step]: from 0
    with pytest.raises(ConfigError, match=r"\[start_value, end_value, end_step\] \(from step 0\) or "
                                          r"\[start_step, start_value, end_value, end_step\]"):
        validate_schedule([1, 2], "guidance.negative_weight")


def test_forgetting_the_preset_on_a_cpu_warns_at_once_with_the_time_and_the_cpu_preset(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["generate", "--prompt", "a red ball", "--model", "analytic:16", "--steps", "1", "--out", str(out),
            "--quiet", "--no-mesh", "--views", "1", "--view-size", "16", "--set", "camera.height=16",
            "--set", "camera.width=16", "--set", "camera.batch_size=1", "--set", "render.num_samples_per_ray=16"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning: no --preset given: csd-coarse (1 steps) is sized for a GPU" in err
    assert "--preset preview-cpu" in err
    args[args.index("--out") + 1] = str(tmp_path / "b")
    assert main([*args, "--preset", "csd-coarse"]) == 0
    assert "no --preset given" not in capsys.readouterr().err  # asked for: no warning


# ----------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_is_told_at_once_and_a_second_one_never_skips_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    # slow steps (a big render of the analytic prior): the first Ctrl-C lands inside a step
    args = ["generate", "--prompt", "a red ball", "--model", "analytic:64", "--preset", "preview-cpu",
            "--steps", "1000", "--out", str(out), "--quiet", "--no-mesh", "--checkpoint-every", "0",
            "--preview-every", "1", "--set", "camera.height=64", "--set", "camera.width=64",
            "--set", "camera.batch_size=2", "--set", "render.num_samples_per_ray=192",  # about 2 s a step
            # a 2^21 hash table: a checkpoint of ~400 MB takes a second or more to save, so the second Ctrl-C (sent
            # once the notice is seen) lands while the command is still stopping (with the preset's 2^16 table
            # the stop took milliseconds and the second signal sometimes came after it)
            "--set", "scene.log2_hashmap_size=21"]
    proc = start_cli(args, out)
    lines: list = []  # (seconds since the first Ctrl-C, line) as they arrive
    reader = threading.Thread(target=lambda: [lines.append((time.time(), line)) for line in proc.stderr])
    reader.start()
    try:
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        while time.time() - t0 < 10 and not any(NOTICE in line for _, line in lines):
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the second Ctrl-C"
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:  # stuck: the CLI prints every thread's stack on SIGUSR1
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            proc.kill()
            reader.join(timeout=10)
            pytest.fail("the run did not stop:\n" + "".join(line for _, line in lines)[-6000:])
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(line for _, line in lines)
    told = next((t - t0 for t, line in lines if NOTICE in line), None)
    assert told is not None and told < 5, err[-2000:]
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert AGAIN in err
    assert load_checkpoint(out)["step"] >= 1
    assert err.strip().splitlines()[-1].startswith("interrupted at step")


def test_cli_errors_name_the_flag_that_sets_the_field(tmp_path, capsys):
    """Engine errors name configuration fields (the nodes show them with their widgets); the command line adds
    its flag."""
    assert main(quiet_no_mesh(gen_args(tmp_path / "a", "--set", "prior.resolution=3"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: prior.resolution: ") and err.endswith(
        "(on the command line: --resolution or --set prior.resolution=...)")
    assert main(quiet_no_mesh(gen_args(tmp_path / "b", "--set", "render.num_samples_per_ray=0"))) == 2
    assert capsys.readouterr().err.strip().endswith("(on the command line: --set render.num_samples_per_ray=...)")


def test_previews_say_what_they_show(tmp_path):
    """Training switches between colour and shape-only renders: each preview is captioned with its step and
    shading (preview-cpu renders albedo first, normal maps later)."""
    import numpy as np
    from PIL import Image

    from csd_backend.render.shading import shading_label
    from csd_backend.config import RenderConfig

    out = tmp_path / "run"
    assert main(quiet_no_mesh(gen_args(out))) == 0
    arr = np.asarray(Image.open(out / "previews" / "step_00002.png").convert("RGB")).astype(int)
    assert arr.shape[:2] == (256, 256)  # the caption is drawn inside: the size is unchanged
    band = arr[-14:]
    assert (band.max(-1) >= 250).sum() > 20 and np.median(band) < 90  # white text on a dark band
    assert shading_label(RenderConfig(textureless_normal=True), "textureless") == "normal map (shape only)"
    assert shading_label(RenderConfig(), "albedo") == "colour (albedo)"


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX only")
def test_sigusr1_prints_every_threads_stack_and_the_run_goes_on(tmp_path):
    out = tmp_path / "run"
    args = ["generate", "--prompt", "a red ball", "--model", "analytic:16", "--preset", "preview-cpu", "--steps",
            "100000", "--out", str(out), "--quiet", "--no-mesh", "--preview-every", "1",
            "--set", "camera.height=16", "--set", "camera.width=16"]
    proc = start_cli(args, out)
    try:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        assert proc.poll() is None, "the run stopped on SIGUSR1"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "most recent call first" in err and proc.returncode == 130, err[-2000:]
    assert load_checkpoint(out)["step"] >= 1
