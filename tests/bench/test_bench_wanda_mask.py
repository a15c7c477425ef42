"""Benchmark of wanda_mask over the 16 target layers of Stable Diffusion 1.5 (docs/method.md sections 3 and 6).

One timed call masks all 16 layers (k = floor(0.01 * in)) for T call indices, with random weights
(fp16 on CUDA, fp32 on the CPU) and random positive norms and null norms. Reading W once is the floor
whatever T is: ``gbps`` in extra_info is the bytes of W over the median time (CUDA only). Beside the
backends, provider ``copy`` copies the same 16 weights device to device (one copy per layer into
buffers allocated once): the measured floor for moving those bytes (it reads W and writes as much).

The median (pytest-benchmark) is end to end: validation, dispatch, launches and the op's one read of
its flag word per layer. On CUDA ``kernel_ms`` in extra_info is the device time alone: the same 16
calls of the backend's implementation (no validation, no host synchronization) captured into a
CUDA graph and replayed, timed with CUDA events (``kernel_method`` says how; see
``benchutil.kernel_times``).

    pytest tests/bench/test_bench_wanda_mask.py --benchmark-only
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from benchutil import DEVICE, ON_CUDA, PROVIDERS, SMOKE, fastest, gbps, kernel_times, measure, median_ms, record, require

from memcore.ops import _backend, use_backend

wanda = importlib.import_module("memcore.ops.wanda_mask")  # the module: memcore.ops.wanda_mask is also the op

# docs/method.md section 1: the ff.net.2 weights [out, in] of SD 1.5 in forward-execution order
# (down_blocks.0-2 two each, mid_block one, up_blocks.1-3 three each)
LAYERS = [(320, 1280)] * 2 + [(640, 2560)] * 2 + [(1280, 5120)] * 3 + [(1280, 5120)] * 3 + [(640, 2560)] * 3 + [
    (320, 1280)
] * 3
if SMOKE:  # toy shapes with the same structure, to run this file on the CPU in seconds
    LAYERS = [(out // 40, cols // 40) for out, cols in LAYERS]
SPARSITY = 0.01
TS = (1, 10, 51)
# The CPU reference takes about 6, 17 and 70 s per call at T = 1, 10, 51 on two cores: a few uncalibrated
# rounds each, and T = 51 only for the fastest provider (the reference only when nothing else is built).
CPU_REFERENCE_ROUNDS = {1: 3, 10: 2, 51: 1}
COPY = "copy"  # the floor: a device-to-device copy of the same weights
# device-only timing on CUDA (on the CPU only in smoke runs: the reference would take minutes)
KERNEL_TIMES = ON_CUDA or SMOKE


@pytest.fixture(scope="module")
def weights() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    dtype = torch.float16 if ON_CUDA else torch.float32
    with torch.no_grad():
        return [torch.randn(shape, generator=generator).to(DEVICE, dtype) for shape in LAYERS]


def _norms(t: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(t, in_features, generator=generator) + 0.05).to(DEVICE)


@pytest.mark.parametrize("provider", (*PROVIDERS, COPY))
@pytest.mark.parametrize("t", TS, ids=lambda t: f"T{t}")
def test_wanda_mask(benchmark, weights, t, provider):
    if provider != COPY:
        require(wanda, provider)
    if not ON_CUDA and not SMOKE and t == max(TS) and provider not in (fastest(wanda), COPY):
        pytest.skip(f"T={t} on the CPU: only the fastest provider ({fastest(wanda)}) runs")
    benchmark.group = f"wanda_mask: 16 SD 1.5 layers, T={t}"
    generator = torch.Generator().manual_seed(t)
    calls = [
        (w, _norms(t, w.shape[1], generator), _norms(t, w.shape[1], generator), math.floor(SPARSITY * w.shape[1]))
        for w in weights
    ]

    if provider == COPY:
        buffers = [torch.empty_like(w) for w in weights]

        def run() -> None:
            for weight, buffer in zip(weights, buffers):
                buffer.copy_(weight)

        kernels = run
    else:
        impl = _backend.implementations("wanda_mask", DEVICE)[provider]

        def run() -> None:
            with use_backend(provider):
                for weight, norms, null_norms, k in calls:
                    wanda.wanda_mask(weight, norms, null_norms, k)

        def kernels() -> None:
            for weight, norms, null_norms, k in calls:
                impl(weight, norms, null_norms, k, True)

    if not ON_CUDA and not SMOKE and provider == "reference":
        median = measure(benchmark, run, calibrate=False, min_rounds=CPU_REFERENCE_ROUNDS[t])
    else:
        median = measure(benchmark, run)
    w_bytes = sum(w.numel() * w.element_size() for w in weights)
    record(benchmark, op="wanda_mask", provider=provider, T=t, dtype=str(weights[0].dtype).removeprefix("torch."))
    benchmark.extra_info["bytes_W"] = w_bytes
    if provider == COPY:
        benchmark.extra_info["floor"] = True
    if ON_CUDA:
        benchmark.extra_info["gbps"] = gbps(w_bytes, median)
    if KERNEL_TIMES:
        repeats = max(3, min(50, int(0.3 / max(median, 1e-6))))
        times, method = kernel_times(kernels, repeats)
        benchmark.extra_info.update(kernel_ms=median_ms(times), kernel_method=method, kernel_repeats=repeats)


@pytest.mark.parametrize("entry", ("per_layer", "grouped"))
@pytest.mark.parametrize("t", (1, 10), ids=lambda t: f"T{t}")
@pytest.mark.parametrize("provider", [name for name in PROVIDERS if name != "reference"])
def test_wanda_mask_grouped(benchmark, weights, t, entry, provider):
    """One call for the 16 layers (wanda_mask_grouped) against 16 calls (wanda_mask), per native
    backend: on the CPU the grouped call runs every row of every layer in one parallel region; Triton
    launches once per row width (3 launches); CUDA loops over the layers (the same 16 launches)."""
    require(wanda, provider)
    benchmark.group = f"wanda_mask on {provider}: 16 calls or one grouped call, 16 SD 1.5 layers, T={t}"
    generator = torch.Generator().manual_seed(t)
    norms = [_norms(t, w.shape[1], generator) for w in weights]
    nulls = [_norms(t, w.shape[1], generator) for w in weights]
    ks = [math.floor(SPARSITY * w.shape[1]) for w in weights]

    def run() -> None:
        with use_backend(provider):
            if entry == "grouped":
                wanda.wanda_mask_grouped(weights, norms, nulls, ks)
            else:
                for w, n, z, k in zip(weights, norms, nulls, ks):
                    wanda.wanda_mask(w, n, z, k)

    measure(benchmark, run)
    record(benchmark, op=f"wanda_mask {entry}", provider=provider, T=t, baseline=entry == "per_layer")
