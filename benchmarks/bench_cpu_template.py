"""Time the CPU template end to end: ``example_workflows/api/01-CPU-demo-text-to-3D-with-the-toy-prior.json`` run
through the same graph runner as the tests (``tests/comfy_stubs.py``: ComfyUI's folder_paths / progress bar /
interrupt stubbed, every node run as ComfyUI runs it, inside ``torch.inference_mode``), as shipped: the toy prior
that ships with the pack (model ``toy``), so nothing is downloaded or built.

    python benchmarks/bench_cpu_template.py                    # the whole template, as shipped (toy prior)
    python benchmarks/bench_cpu_template.py --steps 20         # train 20 steps, extrapolate to the template's
    python benchmarks/bench_cpu_template.py --sd21-random      # the same graph with a full-size SD model (below)
    python benchmarks/bench_cpu_template.py --sd21-random --threads 2 --model-dir /data/sd21-random

Prints the time of every node, the Optimize phases (start-up, per-step time, the final preview render) and the
total; with ``--steps`` the training time is extrapolated from the measured steps to the template's step count
(the schedules are stretched to the run length, so a short run has the same mix of 2- and 3-branch steps) and
the total is marked as an estimate.

``--sd21-random`` measures what a real Stable Diffusion model costs in this graph: CSD Load Diffusion Model gets a
full-size SD-2.1-base-shaped model of random weights saved as a diffusers folder
(``models/diffusers/stable-diffusion-2-1-base``, loaded like the real one) at prior resolution 128 (renders reach
the VAE at 128² instead of 512²). Random weights cost exactly what the real weights cost, but the scene they train
is not the object a real prompt gives, so the mesh (faces to unwrap and bake) may differ in size. Building the
random model (about 1 min, 5.2 GB on disk, reused from ``--model-dir``) is not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests", ROOT / "benchmarks"):
    sys.path.insert(0, str(p))

TEMPLATE = "01-CPU-demo-text-to-3D-with-the-toy-prior"
MODEL_NAME = "stable-diffusion-2-1-base"  # the folder name of the random SD model (--sd21-random)
#: the prior resolution of the --sd21-random runs: renders reach the VAE at 128² (the native 512² is far too slow)
SD21_RANDOM_RESOLUTION = 128


def _timed_classes(classes, marks):
    """Subclasses that record wall and CPU time around each node's function (the node code is unchanged)."""
    out = {}
    for name, cls in classes.items():
        fn_name = cls.FUNCTION

        def run(self, *args, __fn=fn_name, __cls=cls, __name=name, **kwargs):
            marks.append(("start", __name, time.perf_counter(), time.process_time()))
            try:
                return getattr(super(type(self), self), __fn)(*args, **kwargs)
            finally:
                marks.append(("end", __name, time.perf_counter(), time.process_time()))

        out[name] = type(cls.__name__, (cls,), {fn_name: run})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="train this many steps and extrapolate (default: the "
                                                            "template's step count, no extrapolation)")
    ap.add_argument("--template", default=TEMPLATE, help="another API workflow of example_workflows/api (e.g. "
                                                         "02-text-to-3D-CSD-paper-settings-GPU with --steps 3 "
                                                         "--sd21-random: the paper settings on a CPU)")
    ap.add_argument("--sd21-random", action="store_true",
                    help="replace the template's model by a full-size SD-2.1-base-shaped model of random weights at "
                         f"prior resolution {SD21_RANDOM_RESOLUTION} (what a real SD model costs in this graph)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "csd3d-bench-sd21-base-random"),
                    help="--sd21-random: where the random SD-2.1-base-shaped diffusers folder is built and reused")
    ap.add_argument("--workdir", default=None, help="ComfyUI-like folders (models, output); default: a temp dir")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()

    import pytest
    import torch

    import comfy_stubs as cs
    from full_size_sd import save_sd21_base_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = save_sd21_base_folder(Path(args.model_dir)) if args.sd21_random else None
    build_s = time.perf_counter() - t0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="csd3d-bench-"))
    mp = pytest.MonkeyPatch()
    env = cs.install(mp, work)
    link = env.models_dir / "diffusers" / MODEL_NAME
    if model is not None and not link.exists():
        link.symlink_to(model.resolve(), target_is_directory=True)
    marks = []
    steps_log = []  # (step, wall, cpu) at every progress update of Optimize
    classes = cs.node_classes(cs.load_pack())
    classes = _timed_classes(classes, marks)

    def on_progress(env_, value, total):
        if prompt[env_.current_node]["class_type"] == "CSDOptimize":
            steps_log.append((value, time.perf_counter(), time.process_time()))

    env.on_progress_after = on_progress
    prompt = cs.load_api(args.template)
    opt_id = next(k for k, v in prompt.items() if v["class_type"] == "CSDOptimize")
    template_steps = int(prompt[opt_id]["inputs"]["steps"])
    steps = int(args.steps or template_steps)
    prompt[opt_id]["inputs"]["steps"] = steps
    prompt[opt_id]["inputs"]["run_name"] = f"bench_{os.getpid()}"
    loader = next(v for v in prompt.values() if v["class_type"] == "CSDLoadDiffusionModel")
    if args.sd21_random:
        loader["inputs"].update({"model": f"diffusers/{MODEL_NAME}", "resolution": SD21_RANDOM_RESOLUTION})
    load0 = os.getloadavg()
    print(f"template {args.template}: {template_steps} steps as shipped, running {steps}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; model {loader['inputs']['model']} at prior resolution "
          f"{loader['inputs']['resolution'] or 'native'}"
          + (f"; random weights built/reused in {build_s:.0f} s" if model is not None else ""),
          flush=True)
    t_run = time.perf_counter()
    run = cs.execute_prompt(prompt, classes, env)
    total_wall = time.perf_counter() - t_run
    load1 = os.getloadavg()

    spans = {}
    open_ = {}
    for kind, name, wall, cpu in marks:
        if kind == "start":
            open_[name] = (wall, cpu)
        else:
            w0, c0 = open_.pop(name)
            spans[name] = (w0, wall, cpu - c0)
    rows = []
    for nid in run.order:
        name = prompt[nid]["class_type"]
        w0, w1, cpu = spans[name]
        rows.append((nid, name, w1 - w0, cpu))
    print(f"{'node':<6}{'class':<24}{'wall s':>10}{'cpu s':>10}")
    for nid, name, wall, cpu in rows:
        print(f"{nid:<6}{name:<24}{wall:>10.1f}{cpu:>10.1f}")

    o_start, o_end, _ = spans["CSDOptimize"]
    values = [s for s, _, _ in steps_log]
    assert values == list(range(1, steps + 1)), values
    walls = [o_start] + [w for _, w, _ in steps_log]
    per_step = [b - a for a, b in zip(walls, walls[1:])]
    first, rest = per_step[0], per_step[1:] or per_step
    tail = o_end - steps_log[-1][1]  # the final preview render (and returning the scene)
    step_mean = statistics.mean(rest)
    train_est = first + step_mean * (template_steps - 1)
    others = sum(wall for _, name, wall, _ in rows if name != "CSDOptimize")
    total_est = others + train_est + tail
    cpus = [c for _, _, c in steps_log]
    cpu_step = (cpus[-1] - cpus[0]) / max(1, len(cpus) - 1)  # process CPU seconds (all threads) per step
    print(f"Optimize: first step (start-up included) {first:.1f} s, then {step_mean:.2f} s/step (median "
          f"{statistics.median(rest):.2f}, min {min(rest):.2f}, max {max(rest):.2f}; CPU time {cpu_step:.2f} "
          f"s/step over all threads); final preview render {tail:.1f} s")
    if steps != template_steps:
        print(f"training extrapolated to {template_steps} steps: {train_est:.0f} s")
    mesh_file = next((v["result"][0] for v in run.outputs.values() if "result" in v), None)
    extract_id = next(k for k, v in prompt.items() if v["class_type"] == "CSDExtractMesh")
    textured = run.results[extract_id][1]
    print(f"mesh {mesh_file}: {textured.num_vertices} vertices, {textured.num_faces} faces, texture "
          f"{textured.texture.shape[1]}×{textured.texture.shape[0]}, "
          f"{(env.output_dir / mesh_file).stat().st_size / 1e6:.1f} MB")
    label = "TOTAL (measured)" if steps == template_steps else "TOTAL (estimate: measured nodes + extrapolated training)"
    import resource

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # kB on Linux
    print(f"{label}: {total_est:.0f} s = {total_est / 60:.1f} min; wall time of this run {total_wall:.0f} s; "
          f"peak memory {peak_gb:.1f} GB; load average after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "template": args.template, "model": loader["inputs"]["model"], "template_steps": template_steps,
            "steps_run": steps, "threads": torch.get_num_threads(),
            "load_before": load0, "load_after": load1,
            "nodes": [{"id": n, "class": c, "wall_s": w, "cpu_s": p} for n, c, w, p in rows],
            "first_step_s": first, "step_s": per_step, "cpu_step_s": cpu_step, "preview_render_s": tail, "training_s": train_est,
            "total_s": total_est, "measured_total": steps == template_steps, "run_wall_s": total_wall,
            "mesh_faces": int(textured.num_faces), "peak_rss_gb": peak_gb}, indent=1))
    mp.undo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
