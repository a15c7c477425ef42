#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see docs/benchmarks.md): build with CUDA, run the GPU
# tests, then the benchmarks, and leave logs and the benchmark JSON in $OUT (or ./gpu_out).
# The machine has torch, triton, transformers, pybind11, cmake and ninja but no diffusers: carry
# wheels in .whl/ (diffusers, accelerate) and they are installed to /tmp/site first.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
MEMCORE_CUDA_ARCH=90 MAX_JOBS=16 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -5
python3 -m memcore env | tee "$OUT/env.txt"
timeout 240 python3 -m pytest -q -x tests/test_cuda.py tests/test_triton.py 2>&1 | tee "$OUT/gpu_tests.log"
# every family end to end on the GPU (fused GEGLU capture, prompt ranges routed across subsets)
printf 'a painting of a fox\nthe great wave, print\na red car\n' > "$OUT/set_a.txt"
printf 'the great wave, print\nportrait of a man in a hat\n' > "$OUT/set_b.txt"
for model in tiny tiny-sdxl tiny-pixart; do
  timeout 60 python3 -m memcore localize --model "$model" --device cuda --subsets "$OUT/set_a.txt" "$OUT/set_b.txt" \
    --timesteps 3 --steps 6 --sparsity 0.05 --out "$OUT/masks_$model" 2>&1 | tail -3 | tee -a "$OUT/families.log"
done
timeout 300 python3 -m pytest tests/bench --ignore=tests/bench/test_bench_subsets.py --benchmark-only -q --benchmark-json "$OUT/bench_gpu.json" 2>&1 | tail -20 | tee "$OUT/bench.log"
python3 tests/bench/summarize.py "$OUT/bench_gpu.json" | tee "$OUT/bench_gpu.md"
