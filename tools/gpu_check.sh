#!/usr/bin/env bash
# The GPU check: one run on a lent H100/H200 machine answers whether memcore's GPU code is correct,
# clean, deterministic and fast enough (docs/benchmarks.md, "GPU check", says how to run it).
#
#   bash tools/gpu_check.sh                # on the GPU machine, from the repository root
#   bash tools/gpu_check.sh --dry-run      # or MEMCORE_GPU_CHECK_CPU=1: the same phases on the CPU, toy sizes
#
# 1. Preflight, fail-fast, one line and exit status 2 on failure: diffusers importable (wheels
#    carried in .whl/ are installed to /tmp/site first), nvcc found, a CUDA GPU visible; then the
#    build (pip install -e . for the GPU's architecture); then memcore._C compiled with CUDA and the
#    cuda backend chosen for CUDA tensors.
# 2. Phases, each under `timeout`, never past the budget (MEMCORE_GPU_CHECK_BUDGET seconds from the
#    start, build included, default 400): a phase gets at most its cap and never the minimum time
#    kept for the phases after it; one with too little time left is skipped (NOT-RUN). Phases that
#    time nothing share the machine; the benchmarks run alone, last.
#      stage 1: a. tests (one file per op over every backend, the kernel code, the capture, then the suites whose defaults
#                  become CUDA on a GPU machine), every failure listed, in parallel with
#               b. compute-sanitizer memcheck, racecheck, synccheck over tools/gpu_sanitize.py;
#      stage 2: c. determinism (ops twice on SD 1.5 sizes; memcore localize on tiny twice) and
#               f. every tiny model family localizing on CUDA in float16;
#      stage 3: d. wanda_mask benchmark (tests/bench/test_bench_wanda_mask.py), then
#               e. capture overhead (tests/bench/test_bench_capture.py).
# 3. $OUT (default ./gpu_out) gets at most 8 files (tools/gpu_check.py OUT_FILES), summary.txt
#    holding one PASS/FAIL/NOT-RUN line per goal with its number. Exit status: 0 when every goal
#    passes, 1 otherwise, 2 when the preflight fails.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

START=$SECONDS
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_out}
BUDGET=${MEMCORE_GPU_CHECK_BUDGET:-400}
DRY=${MEMCORE_GPU_CHECK_CPU:-0}
[[ ${1:-} == --dry-run ]] && DRY=1
WORK=${MEMCORE_GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/memcore_gpu_check.XXXXXX")}
mkdir -p "$OUT" "$WORK" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$(cd "$WORK" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
if (( DRY )); then
  DEVICE=cpu DTYPE=float32 DRYFLAG=--dry-run CPUFLAG=--cpu
  export MEMCORE_BENCH_SMOKE=1
else
  DEVICE=cuda DTYPE=float16 DRYFLAG= CPUFLAG=
fi
# the test files of phase a: the GPU tests (and the CUDA launch plans against this build's kernels,
# where they exist), then suites whose default device becomes CUDA (float16)
# on a GPU machine (CLI, generate, targets, families, capture, examples) or that check CUDA stays
# uninitialized (lean import); overridable, e.g. for a dry run
TESTS=${MEMCORE_GPU_CHECK_TESTS:-tests/test_sqnorm_accumulate.py tests/test_geglu_accumulate.py tests/test_wanda_mask.py tests/test_prune_mask.py tests/test_kernel_code.py tests/test_cuda_launch.py tests/test_capture.py tests/test_compile.py tests/test_cli.py tests/test_generate.py tests/test_targets.py tests/test_families.py tests/test_lean_import.py tests/test_examples.py}
TESTS=$(for f in $TESTS; do [[ -e $f ]] && echo "$f"; done)  # files this checkout has
FAMILIES=${MEMCORE_GPU_CHECK_FAMILIES:-tiny tiny-sd2 tiny-sdxl tiny-pixart tiny-sd3}
MIN_PHASE=10  # a phase with less time than this is skipped

log() { echo "gpu_check: $*"; }
elapsed() { echo $(( SECONDS - START )); }

summary() {  # [--preflight-error MSG]: write summary.txt; print it
  timeout 60 "$PY" tools/gpu_check.py summary --work "$WORK" --out "$OUT" --seconds "$(elapsed)" $DRYFLAG "$@"
}

preflight() {  # STAGE [ARGS]: one line and exit 2 on failure
  local output rc
  output=$(timeout -k 5 90 "$PY" tools/gpu_check.py preflight "$@" $CPUFLAG 2>&1); rc=$?
  (( rc == 124 || rc == 137 )) && output+=$'\n'"gpu_check: preflight: the $1 check did not finish within 90 s"
  echo "$output" >> "$WORK/preflight.log"
  if (( rc != 0 )); then
    local line
    line=$(printf '%s\n' "$output" | grep -v '^\s*$' | tail -n 1)
    [[ $line == "gpu_check: preflight: "* ]] || line="gpu_check: preflight: $1 check crashed: $line"
    echo "$line"
    summary --preflight-error "${line#gpu_check: preflight: }" > /dev/null
    exit 2
  fi
  [[ -n $output ]] && echo "$output"
  return 0
}

write_phase() {  # NAME RC LIMIT SECONDS TIMED_OUT SKIPPED_JSON
  printf '{"name": "%s", "rc": %s, "limit": %s, "seconds": %s, "timed_out": %s, "skipped": %s}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" > "$WORK/phase_$1.json"
}

# run_phase NAME CAP RESERVE LOG CMD...: CMD under timeout for at most CAP seconds, and never into
# the RESERVE seconds kept for later phases; its output is appended to LOG; phase_NAME.json says
# how it ended
run_phase() {
  local name=$1 cap=$2 reserve=$3 log_file=$4; shift 4
  local left=$(( BUDGET - $(elapsed) - reserve ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < MIN_PHASE )); then
    write_phase "$name" null null 0 false '"no time left"'
    log "$name: skipped, no time left (${left} s before the ${reserve} s kept for later phases)"
    return 0
  fi
  log "$name: started (limit ${limit} s)"
  local t0=$SECONDS rc timed_out=false
  timeout -k 5 "$limit" "$@" >> "$log_file" 2>&1; rc=$?
  (( rc == 124 || rc == 137 )) && timed_out=true
  write_phase "$name" "$rc" "$limit" $(( SECONDS - t0 )) "$timed_out" null
  log "$name: exit status $rc after $(( SECONDS - t0 )) s$([[ $timed_out == true ]] && echo ', TIMED OUT')"
}

skip_phase() {  # NAME REASON
  write_phase "$1" null null 0 false "\"$2\""
  log "$1: skipped ($2)"
}

main() {
  # --- preflight and build ------------------------------------------------------------------
  if compgen -G ".whl/*.whl" > /dev/null; then
    timeout -k 5 120 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >> "$WORK/preflight.log" 2>&1 || { echo "gpu_check: preflight: installing the wheels in .whl/ failed: $(tail -n 1 "$WORK/preflight.log")"; summary --preflight-error "installing the wheels in .whl/ failed" > /dev/null; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  preflight gpu --arch-file "$WORK/arch" --info-file "$WORK/device.txt"
  local build_s=0
  if (( ! DRY )) || [[ ${MEMCORE_GPU_CHECK_BUILD:-0} == 1 ]]; then
    local arch=${MEMCORE_CUDA_ARCH:-$(cat "$WORK/arch" 2>/dev/null || echo 90)}
    log "building memcore._C with CUDA for sm_$arch"
    local t0=$SECONDS
    MEMCORE_CUDA_ARCH=$arch MAX_JOBS=$(nproc) timeout -k 5 240 "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
      > "$WORK/build.log" 2>&1
    local rc=$?
    build_s=$(( SECONDS - t0 ))
    if (( rc != 0 )); then
      local line="the build failed (exit status $rc after ${build_s} s): $(grep -v '^\s*$' "$WORK/build.log" | tail -n 1)"
      echo "gpu_check: preflight: $line"
      cp "$WORK/build.log" "$OUT/env.txt"
      summary --preflight-error "$line" > /dev/null
      exit 2
    fi
    log "built in ${build_s} s"
  fi
  preflight build
  {
    echo "== device"; cat "$WORK/device.txt"; echo
    timeout 30 nvidia-smi 2>&1 || true; echo
    echo "== memcore env"; timeout 60 "$PY" -m memcore env 2>&1; echo
    echo "== versions"
    timeout 60 "$PY" -c "import sys, torch, diffusers, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1
    timeout 60 "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
    nvcc --version 2>&1 | tail -n 2
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain 2>/dev/null | grep -q . && echo ' (with local changes)')"
    echo; echo "== build (${build_s} s)"; cat "$WORK/build.log" 2>/dev/null
  } > "$OUT/env.txt" 2>&1
  echo "$FAMILIES" > "$WORK/families.txt"

  # --- stage 1: a. tests, b. sanitizer --------------------------------------------------------
  local reserve_after_1=90 reserve_after_2=60   # minimum kept for stage 2 + 3, and for stage 3
  local pytest_args=(-p gpu_pytest_log -q -rfE --tb=short -p no:cacheprovider)
  timeout 30 "$PY" -c "import xdist" 2>/dev/null && pytest_args+=(-n "${MEMCORE_GPU_CHECK_WORKERS:-6}")
  timeout 30 "$PY" -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout 120)
  # shellcheck disable=SC2086  # TESTS is a list of paths
  run_phase tests 150 "$reserve_after_1" "$OUT/tests.log" \
    env GPU_CHECK_TESTS_JSONL="$WORK/tests.jsonl" PYTHONPATH="$PWD/tools${PYTHONPATH:+:$PYTHONPATH}" \
    "$PY" -m pytest "${pytest_args[@]}" $TESTS &
  if (( DRY )); then
    run_phase sanitize_driver 150 "$reserve_after_1" "$WORK/sanitize_driver.log" \
      "$PY" tools/gpu_sanitize.py --device cpu --backend cpu &
    for tool in memcheck racecheck synccheck; do skip_phase "sanitize_$tool" "dry run: no compute-sanitizer on the CPU"; done
  else
    local sanitizer
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    for tool in memcheck racecheck synccheck; do
      if [[ -z $sanitizer ]]; then
        skip_phase "sanitize_$tool" "compute-sanitizer not found"
        continue
      fi
      # no caching allocator: every tensor is its own allocation, so memcheck sees overruns
      run_phase "sanitize_$tool" 120 "$reserve_after_1" "$WORK/sanitize_$tool.log" \
        env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --print-limit 20 "$PY" tools/gpu_sanitize.py &
    done
  fi
  wait
  for tool in memcheck racecheck synccheck driver; do
    [[ -f $WORK/sanitize_$tool.log ]] && { echo "===== $tool"; cat "$WORK/sanitize_$tool.log"; echo; }
  done > "$OUT/sanitize.log"

  # --- stage 2: c. determinism, f. families -------------------------------------------------
  printf 'a painting of a fox\nthe great wave, print\na red car\n' > "$WORK/set_a.txt"
  printf 'the great wave, print\nportrait of a man in a hat\n' > "$WORK/set_b.txt"
  local small=(--timesteps 3 --steps 6 --sparsity 0.05 --batch-size 4)
  (( DRY )) && small=(--timesteps 2 --steps 3 --sparsity 0.05 --batch-size 4)
  run_phase determinism_ops 90 "$reserve_after_2" "$WORK/determinism_ops.log" \
    "$PY" tools/gpu_check.py determinism --jsonl "$WORK/determinism.jsonl" $CPUFLAG &
  run_phase determinism_localize 90 "$reserve_after_2" "$WORK/determinism_localize.log" \
    "$PY" tools/gpu_check.py localize-twice --jsonl "$WORK/determinism.jsonl" --work "$WORK/localize" \
    -- --model tiny --device "$DEVICE" --dtype "$DTYPE" --prompts "$WORK/set_a.txt" "${small[@]}" &
  for model in $FAMILIES; do
    run_phase "family_$model" 90 "$reserve_after_2" "$WORK/family_$model.log" \
      "$PY" -m memcore localize --model "$model" --device "$DEVICE" --dtype "$DTYPE" \
      --subsets "$WORK/set_a.txt" "$WORK/set_b.txt" "${small[@]}" --out "$WORK/masks_$model" &
  done
  wait
  for name in determinism_ops determinism_localize $(printf 'family_%s ' $FAMILIES); do
    [[ -f $WORK/$name.log ]] && { echo "===== $name"; cat "$WORK/$name.log"; echo; }
  done > "$OUT/localize.log"

  # --- stage 3: d. mask benchmark, e. capture overhead (alone on the machine) ------------------
  local bench_args=(--benchmark-only -q -p no:cacheprovider)
  run_phase bench_mask 90 30 "$WORK/bench_mask.log" \
    env MEMCORE_BENCH_JSONL="$WORK/bench_mask.jsonl" "$PY" -m pytest "${bench_args[@]}" \
    --benchmark-json "$WORK/bench_mask.json" tests/bench/test_bench_wanda_mask.py
  run_phase bench_capture 90 0 "$WORK/bench_capture.log" \
    env MEMCORE_BENCH_JSONL="$WORK/bench_capture.jsonl" "$PY" -m pytest "${bench_args[@]}" \
    --benchmark-json "$WORK/bench_capture.json" tests/bench/test_bench_capture.py
  for name in bench_mask bench_capture; do
    [[ -f $WORK/$name.log ]] && log "$name: $(grep -E '(passed|failed|error|skipped).* in [0-9.]+s' "$WORK/$name.log" | tail -n 1)"
  done
  timeout 60 "$PY" tools/gpu_check.py bench-report --work "$WORK" --out "$OUT" || log "bench report failed"

  # --- summary --------------------------------------------------------------------------------
  echo
  summary
}

: > "$OUT/run.log"
main "$@" 2>&1 | tee -a "$OUT/run.log"
exit "${PIPESTATUS[0]}"
