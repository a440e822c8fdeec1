"""``batch``: many prompts, one run folder each, on local worker processes or a Ray cluster; a manifest, resume,
bad lines named before anything runs, failures and dead workers that do not stop the others."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from csd_backend import cli
from csd_backend.batch.driver import cmd_batch
from csd_backend.batch.manifest import Manifest
from csd_backend.cli import main
from csd_backend.runs.stopping import STOP
from csd_backend.io import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: the tiny settings of test_cli_runs: a few steps take a fraction of a second
FLAGS = ["--preset", "preview-cpu", "--model", "analytic:16", "--steps", "4", "--checkpoint-every", "2",
         "--preview-every", "2", "--views", "1", "--view-size", "16", "--set", "camera.height=16",
         "--set", "camera.width=16", "--set", "render.num_samples_per_ray=16", "--set", "render.grid_resolution=16",
         "--mesh-resolution", "32", "--mesh-texture-size", "0"]


@pytest.fixture(autouse=True)
def one_thread_in_workers(monkeypatch):
    """Workers use one torch thread, like the reference runs of this process (bit-identical results)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def batch_args(prompts, out, *extra):
    return ["batch", str(prompts), *FLAGS, "--out", str(out), "--quiet", *extra]


def generate(out, prompt, steps=4, seed=0):
    """The reference: ``generate`` with the same flags."""
    flags = list(FLAGS)
    flags[flags.index("--steps") + 1] = str(steps)
    assert main(["generate", "--prompt", prompt, *flags, "--seed", str(seed), "--out", str(out), "--quiet"]) == 0


def same_scene(a, b) -> bool:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    return sa["step"] == sb["step"] and sa["scene"].keys() == sb["scene"].keys() and all(
        torch.equal(sa["scene"][k], sb["scene"][k]) for k in sa["scene"])


def records(out):
    return Manifest(out).records()


def write_jsonl(path, *lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------------------ local
def test_a_local_batch_writes_one_run_folder_per_prompt_and_a_complete_manifest(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n# a comment\n\na blue cube\na green cone\n")
    out = tmp_path / "batch"
    assert main(batch_args(prompts, out, "--workers", "2")) == 0, capsys.readouterr().err
    runs = ["0001-a-red-ball", "0002-a-blue-cube", "0003-a-green-cone"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == runs
    for run in runs:  # each folder as generate writes it, mesh included
        for name in ("config.json", "checkpoints/last.ckpt", "previews/step_00004.png", "renders/view_00.png",
                     "mesh.glb"):
            assert (out / run / name).is_file(), (run, name)
    state = Manifest(out).latest()
    assert list(state) == runs
    for run, line in zip(runs, (1, 4, 5)):
        rec = state[run]
        assert rec["status"] == "done" and rec["step"] == rec["steps"] == 4 and rec["seed"] == 0
        assert rec["seconds"] > 0 and rec["error"] is None
        assert rec["outputs"]["mesh"] == f"{run}/mesh.glb"
        assert all((out / p).is_file() for p in [rec["outputs"]["checkpoint"], *rec["outputs"]["renders"]])
    assert [(r["run"], r["status"]) for r in records(out) if r["run"] == runs[0]] == [
        (runs[0], "pending"), (runs[0], "running"), (runs[0], "done")]
    assert [r["line"] for r in records(out)[:3]] == [1, 4, 5]  # the lines of the file
    # the prior is loaded once per worker, not once per prompt
    running = [r for r in records(out) if r["status"] == "running"]
    loads = Counter(r["worker"] for r in running if r["prior"] == "loaded")
    assert set(loads.values()) == {1} and set(loads) == {r["worker"] for r in running}
    table = capsys.readouterr().out
    assert all(re.search(rf"^{run} +done +0 +4/4 ", table, re.M) for run in runs), table
    # exactly what generate writes for the same prompt and flags
    generate(tmp_path / "ref", "a blue cube")
    assert same_scene(out / runs[1], tmp_path / "ref")
    assert json.loads((out / runs[1] / "config.json").read_text()) == json.loads((tmp_path / "ref" / "config.json")
                                                                                  .read_text())


def test_jsonl_lines_and_seeds_plan_one_run_per_line_and_seed(tmp_path):
    from csd_backend.batch.plan import plan_runs, slug
    from csd_backend.batch.prompts_file import read_prompts

    prompts = write_jsonl(tmp_path / "p.jsonl",
                          {"prompt": "A Red Ball!", "seed": 5, "steps": 8, "set": {"optim.lr": 0.02}},
                          {"prompt": "a blue cube", "negative_prompt": "green", "preset": "csd-coarse",
                           "set": ["render.num_samples_per_ray=24"]})
    args = cli.build_parser().parse_args(batch_args(prompts, tmp_path / "o", "--seeds", "2", "--seed", "10"))
    specs = plan_runs(read_prompts(prompts), args, prompts.name)
    assert [s.id for s in specs] == ["0001-a-red-ball-seed5", "0002-a-red-ball-seed6", "0003-a-blue-cube-seed10",
                                     "0004-a-blue-cube-seed11"]
    a, c = specs[0].config, specs[2].config
    assert a["optim"]["steps"] == 8 and a["optim"]["lr"] == 0.02 and a["optim"]["seed"] == 5
    assert a["camera"]["height"] == 16  # the command line's --set, then the line's
    assert c["preset"] == "csd-coarse" and c["guidance"]["negative_prompt"] == "green"
    assert c["render"]["num_samples_per_ray"] == 24 and c["optim"]["steps"] == 4
    assert slug("Ünïcode: a  DSLR photo of a corgi, wearing a hat, 4k, ultra detailed") == \
        "unicode-a-dslr-photo-of-a-corgi-wearing"


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "a red ball", "sed": 3}', "p.jsonl line 2: sed: unknown key; a line may have prompt"),
    ('{"prompt": "a red ball",}', "p.jsonl line 2: is not valid JSON"),
    ('["a red ball"]', "p.jsonl line 2: must be a JSON object"),
    ('{"negative_prompt": "x"}', "p.jsonl line 2: prompt: is missing or empty"),
    ('{"prompt": "x", "seed": -1}', "p.jsonl line 2: seed: must be an integer >= 0"),
    ('{"prompt": "x", "steps": 0}', "p.jsonl line 2: steps: must be a positive integer"),
    ('{"prompt": "x", "preset": "fast"}', "p.jsonl line 2: preset: unknown preset 'fast'"),
    ('{"prompt": "x", "set": {"render.num_samples_per_ray": 1}}', "p.jsonl line 2: render.num_samples_per_ray:"),
    ('{"prompt": "x", "set": {"optim.stepz": 1}}', "p.jsonl line 2: optim.stepz: unknown setting"),
    ('{"prompt": "x", "set": {"optim.lr": NaN}}', "p.jsonl line 2: set.optim.lr: is not a finite number"),
])
def test_a_bad_line_is_named_before_anything_runs(tmp_path, capsys, line, expected):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red ball"}\n' + line + "\n")
    out = tmp_path / "out"
    assert main(batch_args(prompts, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # nothing ran, nothing was written


def test_bad_input_of_the_command_itself(tmp_path, capsys):
    text = tmp_path / "p.txt"
    text.write_bytes(b"a red ball\n\xff\xfe bad\n")
    assert main(batch_args(text, tmp_path / "o")) == 2
    assert capsys.readouterr().err.startswith("error: p.txt line 2: is not UTF-8 text")
    text.write_text("\n# only a comment\n")
    assert main(batch_args(text, tmp_path / "o")) == 2
    assert "holds no prompt" in capsys.readouterr().err
    assert main(batch_args(tmp_path / "missing.txt", tmp_path / "o")) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    text.write_text("a red ball\n")
    assert main(batch_args(text, tmp_path / "o", "--seeds", "0")) == 2
    assert capsys.readouterr().err.startswith("error: --seeds: must be a positive integer")
    assert main(batch_args(text, tmp_path / "o", "--workers", "0")) == 2
    assert capsys.readouterr().err.startswith("error: --workers: must be at least 1")
    assert main(batch_args(text, tmp_path / "o", "--cpus-per-run", "2")) == 2
    assert "--cpus-per-run: only applies with --ray" in capsys.readouterr().err
    assert main(["batch", "--resume", str(tmp_path)]) == 2
    assert "is not a batch folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(batch_args(text, tmp_path)) == 2  # outputs are never overwritten
    assert f"--out: {tmp_path} exists and is not empty" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "batch.json").write_text("{}")
    assert main(batch_args(text, tmp_path / "b")) == 2
    assert f"continue it with: python -m csd_backend batch --resume {tmp_path / 'b'}" in capsys.readouterr().err


def test_one_failed_run_does_not_stop_the_others_and_the_manifest_says_why(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    prompts = write_jsonl(tmp_path / "p.jsonl", {"prompt": "a red ball", "steps": 2},
                          {"prompt": "a blue cube", "set": {"prior.model": str(missing)}},
                          {"prompt": "a green cone", "steps": 2})
    out = tmp_path / "out"
    assert main(batch_args(prompts, out, "--no-mesh")) == 1
    captured = capsys.readouterr()
    state = Manifest(out).latest()
    assert [r["status"] for r in state.values()] == ["done", "failed", "done"]
    assert str(missing) in state["0002-a-blue-cube"]["error"] and "Traceback" not in captured.err
    assert re.search(r"^0002-a-blue-cube +failed ", captured.out, re.M) and "batch --resume" in captured.err.splitlines()[-1]


def _run_until_then_interrupt(args, flag: Path) -> subprocess.CompletedProcess:
    """``python -m csd_backend ARGS`` in its own process group, Ctrl-C'd (SIGINT to the group, as a terminal
    does) once ``flag`` exists."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # as from a terminal: SIGINT handled (a test runner started in the background, e.g. `cmd &` in a script,
    # passes SIGINT on ignored, and the batch then ignores Ctrl-C as every process of that job does)
    proc = subprocess.Popen([sys.executable, "-m", "csd_backend", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while not flag.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the batch did not reach the point to interrupt"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_resume_after_ctrl_c_finishes_only_what_was_missing(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", {"prompt": "a red ball", "steps": 2},
                          {"prompt": "a blue cube", "steps": 40, "seed": 7}, {"prompt": "a green cone"})
    out = tmp_path / "out"
    args = batch_args(prompts, out, "--workers", "1")
    first, second, third = "0001-a-red-ball", "0002-a-blue-cube", "0003-a-green-cone"
    r = _run_until_then_interrupt(args, out / second / "previews" / "step_00006.png")
    assert r.returncode == 130, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted the batch (1 of 3 runs finished") and "Traceback" not in r.stderr
    assert f"python -m csd_backend batch --resume {out}" in last
    state = Manifest(out).latest()
    assert state[first]["status"] == "done" and state[third]["status"] == "pending"
    assert state[second]["status"] == "interrupted"
    stopped_at = state[second]["step"]
    assert 6 <= stopped_at < 40 and load_checkpoint(out / second)["step"] == stopped_at  # saved where it stopped
    done_before = (out / first / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    n_before = len(records(out))

    # other settings are refused: a resumed batch keeps its plan
    assert main(["batch", "--resume", str(out), "--steps", "5"]) == 2
    assert "leave out --steps" in capsys.readouterr().err
    assert main(["batch", "--resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    new = records(out)[n_before:]
    assert first not in {rec["run"] for rec in new}  # the finished run was skipped ...
    assert (out / first / "checkpoints" / "last.ckpt").stat().st_mtime_ns == done_before
    resumed = next(rec for rec in new if rec["run"] == second and rec["status"] == "running")
    assert resumed["step"] == stopped_at  # ... the interrupted one resumed from its checkpoint ...
    assert [rec["status"] for rec in new if rec["run"] == third] == ["running", "done"]  # ... the last one ran
    assert all(rec["status"] == "done" for rec in Manifest(out).latest().values())
    generate(tmp_path / "ref", "a blue cube", steps=40, seed=7)
    assert same_scene(out / second, tmp_path / "ref")  # as if it had never stopped
    # nothing left to do
    assert main(["batch", "--resume", str(out), "--quiet"]) == 0
    assert "0 to run (3 finished before)" in capsys.readouterr().err


def test_a_local_worker_killed_mid_run_is_replaced_and_its_run_resumes(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", {"prompt": "a red ball", "steps": 30}, {"prompt": "a blue cube"})
    out = tmp_path / "out"
    killed, pids = [], {}

    def kill_the_worker(ev):  # SIGKILL: no checkpoint on the way out; the last periodic one is used
        if ev["type"] == "start":
            pids[ev["run"]] = ev["pid"]
        if ev["type"] == "progress" and ev["run"] == "0001-a-red-ball" and ev["step"] >= 4 and not killed:
            os.kill(pids[ev["run"]], signal.SIGKILL)
            killed.append(ev["step"])

    args = cli.build_parser().parse_args(batch_args(prompts, out, "--no-mesh"))
    assert cmd_batch(args, on_event=kill_the_worker) == 0
    assert killed
    runs = [(r["status"], r.get("attempt")) for r in records(out) if r["run"] == "0001-a-red-ball"]
    assert runs == [("pending", None), ("running", 1), ("pending", None), ("running", 2), ("done", 2)], runs
    requeue = [r for r in records(out) if r["run"] == "0001-a-red-ball"][2]
    assert "died (killed by SIGKILL)" in requeue["error"] and "attempt 2 of 3" in requeue["error"]
    generate(tmp_path / "ref", "a red ball", steps=30)
    assert same_scene(out / "0001-a-red-ball", tmp_path / "ref")
    assert Manifest(out).latest()["0002-a-blue-cube"]["status"] == "done"


def test_without_ray_installed_the_error_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball\n")
    assert main(batch_args(prompts, tmp_path / "o", "--ray", "auto")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ray: Ray is not installed") and 'pip install ".[ray]"' in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ Ray
@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for this module; its session folder is short (Ray's sockets need paths under
    108 bytes, which a deep pytest folder can exceed)."""
    import shutil
    import tempfile

    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", _temp_dir=temp)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_batch_survives_a_killed_worker_and_ctrl_c_with_results_equal_to_an_uninterrupted_run(
        ray_cluster, tmp_path, capsys):
    # the victim runs long enough (200 steps) that the Ctrl-C, set at its step ~11, lands before it ends
    prompts = write_jsonl(tmp_path / "p.jsonl", {"prompt": "a red ball", "steps": 200}, {"prompt": "a blue cube"},
                          {"prompt": "a green cone"})
    out = tmp_path / "out"
    victim, killed, stopped, pids, attempt = "0001-a-red-ball", [], [], {}, Counter()

    def kill_then_ctrl_c(ev):
        if ev["type"] == "start":
            pids[ev["run"]] = ev["pid"]
            attempt[ev["run"]] += 1
        if ev["type"] != "progress" or ev["run"] != victim:
            return
        if attempt[victim] == 1 and ev["step"] >= 4 and not killed:
            os.kill(pids[victim], signal.SIGKILL)  # the Ray worker process running that task
            killed.append(ev["step"])
        elif attempt[victim] == 2 and ev["step"] >= killed[0] + 6 and not stopped:
            STOP.signal, STOP.pending = "SIGINT", True  # what the driver's Ctrl-C handler records
            stopped.append(ev["step"])

    args = cli.build_parser().parse_args(batch_args(prompts, out, "--ray", "auto"))
    try:
        code = cmd_batch(args, on_event=kill_then_ctrl_c)
    finally:
        STOP.signal, STOP.pending = None, False
    assert code == 130, capsys.readouterr().err
    assert killed and stopped
    history = [r for r in records(out) if r["run"] == victim]
    assert [r["status"] for r in history] == ["pending", "running", "pending", "running", "interrupted"]
    assert "its worker died" in history[2]["error"] and history[3]["attempt"] == 2
    # Ray's retry resumed from a checkpoint, not from scratch (events reach the driver late: the worker may have
    # saved a later step than the one that triggered the kill)
    assert history[3]["step"] > 0 and history[3]["step"] % 2 == 0
    stopped_at = history[4]["step"]
    # saved on cancel (at the step it was in, or at the last periodic checkpoint if the cancel hit an update)
    assert stopped_at >= stopped[0] - 2 and load_checkpoint(out / victim)["step"] == stopped_at
    assert "batch --resume" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not list(out.glob(".csd-shared-check-*"))  # the shared-folder check cleaned up

    args = cli.build_parser().parse_args(["batch", "--resume", str(out), "--ray", "auto", "--quiet"])
    assert cmd_batch(args) == 0, capsys.readouterr().err
    state = Manifest(out).latest()
    assert all(rec["status"] == "done" for rec in state.values()) and len(state) == 3
    assert [r for r in records(out) if r["run"] == victim][-2]["step"] == stopped_at  # resumed where it stopped
    for run in state:
        assert (out / run / "mesh.glb").is_file() and (out / run / "renders" / "view_00.png").is_file()
    generate(tmp_path / "ref", "a red ball", steps=200)
    assert same_scene(out / victim, tmp_path / "ref")  # killed, resumed, cancelled, resumed: as if never stopped
    generate(tmp_path / "ref2", "a green cone")
    assert same_scene(out / "0003-a-green-cone", tmp_path / "ref2")


def test_ray_shared_folder_check_names_a_node_that_cannot_see_the_folder(ray_cluster, tmp_path, monkeypatch):
    """The check passes on the local cluster (every node is this machine); a node whose view of the same path is
    another, empty folder (a folder that is not shared) is named in an error before anything runs."""
    from csd_backend.batch import ray_runner
    from csd_backend.errors import ConfigError

    runner = ray_runner.RayRunner("auto")
    shared = tmp_path / "out"
    shared.mkdir()
    runner.check_shared_folder(shared)
    assert list(shared.iterdir()) == []  # the probe files are cleaned up

    elsewhere = tmp_path / "node-local"
    elsewhere.mkdir()

    def blind(probe, token, answer):  # this node mounts something else at the batch folder's path
        return ray_runner._sees_folder(probe.replace(str(shared), str(elsewhere)), token,
                                       answer.replace(str(shared), str(elsewhere)))

    reporter, task, _ = ray_runner._remotes(ray_cluster)
    monkeypatch.setattr(ray_runner, "_remotes", lambda ray: (reporter, task, ray.remote(blind)))
    with pytest.raises(ConfigError, match="not shared with every node") as info:
        runner.check_shared_folder(shared)
    assert info.value.field == "--out" and list(shared.iterdir()) == []
