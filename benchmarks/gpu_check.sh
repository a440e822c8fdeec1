#!/usr/bin/env bash
# The GPU check (issue 12): CUDA tests, the step benchmark with full-size SD-2.1-base-shaped random weights in fp16
# (csd-coarse at batch 4 and the preview preset: step split, UNet floor, ratio, peak memory, projected 10k-step
# time), each with the compiled path of item 2 off (torch) and on (compiled: hash grid and compositing through
# torch.compile), the encoding / compositing micro-benchmark (torch vs compiled), the stage-2 step split and the
# CSD-MVDream run (issue 24: full-size random MVDream in fp16, both phases of csd-mvdream, projected 10k-step time)
# and the Gaussian splats against the volume (issue 25: csd-gaussian with the torch splatter and with auto, i.e.
# gsplat when installed and working, beside csd-coarse at 128² and batch 1; step split, Gaussians over the run, the
# minutes of a 500-step run), in one call that fits a short GPU loan (about 10 minutes).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh             # from the repository root, on a CUDA machine
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh --dry-run  # the whole script on a CPU, tiny sizes (< 3 min)
#
# Everything goes to stdout and to $OUT (one .txt per part and summary.md). The GPU machine has torch,
# transformers, accelerate, peft, safetensors, scikit-image and numpy but no network: download the other
# dependencies beforehand, on a machine with network, for the GPU machine's Python (3.11 and x86_64 here):
#
#   pip download -d .whl --no-deps --only-binary=:all: --python-version 3.11 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -r benchmarks/gpu_wheels.txt
#
# (`.whl/` is git-ignored; carry it to the GPU machine with the checkout). The script installs from it with
# --no-index --no-deps, so it never touches torch. The compiled path needs Triton, which CUDA builds of torch ship.
# The CUDA tests compile the csd-coarse hash grid first; inductor's on-disk cache then serves the benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-$(pwd)/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
START=$(date +%s)
status() { echo "[gpu_check $(( $(date +%s) - START )) s] $*" | tee -a "$OUT/summary.md"; }
run_part() {  # name, timeout seconds, command...: never stops the script; records the exit code
  local name=$1 limit=$2; shift 2
  status "$name: $*"
  timeout "$limit" "$@" > >(tee "$OUT/$name.txt") 2>&1
  local rc=$?
  status "$name: exit $rc"
  echo '```' >> "$OUT/summary.md"; tail -n 25 "$OUT/$name.txt" >> "$OUT/summary.md"; echo '```' >> "$OUT/summary.md"
}

echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)$([[ $DRY == 1 ]] && echo ' (dry run on CPU)')" > "$OUT/summary.md"
$PY - <<'PY' 2>&1 | tee -a "$OUT/summary.md"
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
for name in ("diffusers", "transformers", "tinycudann", "nvdiffrast", "nerfacc", "triton"):
    try:
        m = __import__(name)
        print(f"{name} {getattr(m, '__version__', 'present')}")
    except Exception as e:
        print(f"{name}: not available ({type(e).__name__})")
PY

# 1. dependencies (GPU machine only: from the wheels downloaded beforehand, never torch)
if [[ $DRY == 0 ]] && ! $PY -c "import diffusers, trimesh, xatlas, fast_simplification, pytest" 2>/dev/null; then
  if [[ -d .whl ]]; then
    run_part install 300 $PY -m pip install --no-index --find-links .whl --no-deps -r benchmarks/gpu_wheels.txt
    run_part install_pack 120 $PY -m pip install --no-index --no-deps --no-build-isolation -e .
  else
    status "install: .whl/ is missing and some dependencies are not installed; see the header of this script"
  fi
fi

if [[ $DRY == 1 ]]; then
  # a 2-level hash grid: the compiled graphs of the CPU's dry run compile in seconds, not minutes; 2 cores: inductor
  # compiles in-process (a worker pool costs more than it saves)
  export TORCHINDUCTOR_COMPILE_THREADS=1
  TINY=(--set scene.n_levels=2 --set scene.log2_hashmap_size=12 --set scene.max_resolution=32)
  DEVICE=cpu; STEP_ARGS=(--presets preview-cpu --steps 1 --warmup 1 --threads 1 --backends torch,compiled "${TINY[@]}")
  COMPILED_ARGS=(--device cpu --presets preview-cpu --points 4096 --rays 1024 --repeats 1 --threads 1 "${TINY[@]}")
  STAGE2_ARGS=(--device cpu --preset refine-cpu --tet 16 --sizes 64 --steps 1 --threads 1)
  MVDREAM_ARGS=(--tiny --steps 1 --warmup 0 --threads 1 --set "camera.height=[16,32]" --set "camera.width=[16,32]"
                --set render.num_samples_per_ray=32 "${TINY[@]}")
  TESTS=(tests/test_cuda_parity.py tests/test_rasterizer.py -k "cuda or nvdiffrast")
  GAUSSIAN_ARGS=(--tiny --presets gaussian-preview-cpu,preview-cpu --size 16 --steps 2 --threads 1 --backends torch,auto
                 "${TINY[@]}")
else
  DEVICE=cuda; STEP_ARGS=(--device cuda --full-size --dtype float16 --presets csd-coarse,preview-cpu --steps 5 --warmup 3
                          --backends torch,compiled)
  COMPILED_ARGS=(--device cuda --presets csd-coarse --points 262144 1048576 --repeats 5)
  STAGE2_ARGS=(--device cuda --tet 128 256 --sizes 512 --steps 3)
  MVDREAM_ARGS=(--device cuda --dtype float16 --steps 3 --warmup 2)
  TESTS=(tests/test_cuda_parity.py tests/test_rasterizer.py)
  GAUSSIAN_ARGS=(--device cuda --full-size --dtype float16 --presets csd-gaussian,csd-coarse --size 128 --steps 60
                 --backends torch,auto)
fi

# 2. the CUDA tests (skipped on a CPU: the dry run only checks that they collect and run)
run_part cuda_tests 240 $PY -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}"
# 3. the step benchmark: csd-coarse (batch 4) and the preview preset, fp16, full-size random SD-2.1-base weights,
#    with the compiled path off (torch) and on (compiled), in the same process (one prior build)
run_part bench_step 300 $PY benchmarks/bench_step.py "${STEP_ARGS[@]}"
# 4. the compiled path's parts alone: hash-grid encoding and packed compositing, torch vs compiled
run_part bench_compiled 120 $PY benchmarks/bench_compiled.py "${COMPILED_ARGS[@]}"
# 5. stage 2 (DMTet): marching tets, rasterize, shade, prior, backward
run_part bench_stage2 240 $PY benchmarks/bench_stage2.py "${STAGE2_ARGS[@]}"
# 6. CSD-MVDream (csd-mvdream): 8 renders (2 objects x 4 views) at 64², then 4 at 256²; step, UNet floor, peak
#    memory and the projected time of the 10k-step run
run_part bench_mvdream 240 $PY benchmarks/bench_mvdream.py "${MVDREAM_ARGS[@]}"
# 7. Gaussian splats (csd-gaussian: torch splatter, then auto = gsplat when it works) beside the volume (csd-coarse)
#    at the same render size and batch: step split with densify, Gaussians over the run, peak memory, minutes a run
run_part bench_gaussians 240 $PY benchmarks/bench_gaussians.py "${GAUSSIAN_ARGS[@]}"
status "done on $DEVICE in $(( $(date +%s) - START )) s; results in $OUT"
