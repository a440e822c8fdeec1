"""benchmarks/gpu_check.sh --dry-run: the whole GPU check runs on a CPU with tiny sizes, so that it is known to work
before a GPU is lent (issue 12)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "(dry run on CPU)" in summary and "done on cpu" in summary, summary
    for part in ("cuda_tests", "bench_step", "bench_compiled", "bench_stage2", "bench_mvdream", "bench_gaussians"):
        assert f"{part}: exit 0" in summary, summary
        assert (tmp_path / f"{part}.txt").stat().st_size > 0
    step = (tmp_path / "bench_step.txt").read_text(encoding="utf-8")
    assert "step/floor" in step
    # the compiled path of issue 12 item 2 off and on, in the same run
    assert "HashGridEncoding/torch" in step and "CompiledHashGridEncoding/compiled" in step, step
    assert "torch/compiled" in (tmp_path / "bench_compiled.txt").read_text(encoding="utf-8")
    assert "marching tets" in (tmp_path / "bench_stage2.txt").read_text(encoding="utf-8")
    mvdream = (tmp_path / "bench_mvdream.txt").read_text(encoding="utf-8")
    assert "step/floor" in mvdream and "projected 10000 steps" in mvdream, mvdream
    gaussians = (tmp_path / "bench_gaussians.txt").read_text(encoding="utf-8")
    assert "densify" in gaussians and "gaussians" in gaussians and "volume" in gaussians, gaussians
