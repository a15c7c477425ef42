"""Benchmark of statistics collection on an SD 1.5-sized UNet (docs/method.md section 6: target <= 3% overhead).

The UNet has SD 1.5's published architecture (tests/configs/sd15_unet.json) with random weights,
built once per module: float32 on the CPU, 2 calls at 256 px (latent 32 x 32); float16 on CUDA, 4
calls at 512 px (latent 64 x 64), built on the GPU. Each call takes a guidance batch of 2
[uncond, cond] with random text embeddings [2, 77, 768]. The same calls run without capture (the
baseline) and inside :func:`memcore.capture.apply_capture` per statistics provider; the hooks' own
counter advances the call index. ``overhead_pct`` is the median over the baseline's. On CUDA, when
``apply_capture`` has a ``fused`` switch, the unfused path (statistics from each target's input) also
runs, for the fastest provider (on the CPU it would add minutes).

``test_capture_overhead_interleaved`` measures the overhead the way ``memcore localize`` captures
(the dispatcher's backend, fusion as ``apply_capture`` decides) with rounds of the baseline and of
the captured calls alternating, each timed by the device (CUDA events; ``time.perf_counter`` on the
CPU): ``event_overhead_pct`` is the median over rounds of captured / baseline - 1, so slow drift of
clocks or load cancels.

``MEMCORE_BENCH_SMOKE=1`` uses the tiny model's UNet at 64 px instead (the code path only).

    pytest tests/bench/test_bench_capture.py --benchmark-only
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import statistics
from pathlib import Path

import pytest
import torch

from benchutil import DEVICE, ON_CUDA, PROVIDERS, SMOKE, device_time, measure, record, require, runnable

import memcore.capture as capture
from memcore.ops import geglu_accumulate_backend, use_backend  # noqa: E402
from memcore.targets import find_targets  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_UNET = Path(__file__).resolve().parents[2] / "memcore" / "tiny" / "unet.json"
UNET_CONFIG = json.loads((TINY_UNET if SMOKE else CONFIGS / "sd15_unet.json").read_text(encoding="utf-8"))
CALLS = 4 if ON_CUDA else 2
PIXELS = 64 if SMOKE else 512 if ON_CUDA else 256
LATENT = PIXELS // 8  # SD's VAE scale factor
BATCH = 2  # classifier-free guidance: [uncond, cond]
DTYPE = torch.float16 if ON_CUDA else torch.float32
# a UNet call takes 4 to 10 s on two CPU cores: a fixed number of rounds (MEMCORE_BENCH_CPU_ROUNDS,
# default 2, enough to run the suite but not to resolve a few percent), warmed up once in the fixture
CPU_ROUNDS = int(os.environ.get("MEMCORE_BENCH_CPU_ROUNDS", "2"))
# baseline and captured rounds of the interleaved measurement
INTERLEAVED_ROUNDS = 3 if SMOKE else 12 if ON_CUDA else CPU_ROUNDS
GROUP = f"capture: {'tiny' if SMOKE else 'SD 1.5'} UNet, {CALLS} calls at {PIXELS} px, batch {BATCH}, {str(DTYPE).removeprefix('torch.')}"

HAS_FUSED_SWITCH = "fused" in inspect.signature(capture.apply_capture).parameters
MODES = ("fused", "unfused") if HAS_FUSED_SWITCH and ON_CUDA else ("default",)
_medians: dict[str, float] = {}


def _stat_modules(mode: str) -> list:
    """The statistics op modules that capture calls in ``mode``."""
    names = ["sqnorm_accumulate"] if mode == "unfused" else ["sqnorm_accumulate", "geglu_accumulate"]
    return [importlib.import_module(f"memcore.ops.{name}") for name in names if hasattr(capture, name)]


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.no_grad(), DEVICE:  # random init on the device itself (seconds on a GPU, not minutes)
        model = UNet2DConditionModel.from_config(UNET_CONFIG).to(DEVICE, DTYPE).eval()
    model.requires_grad_(False)
    yield model
    del model


@pytest.fixture(scope="module")
def unet_calls(unet):
    """The timed work: CALLS UNet calls on fixed random inputs (warmed up once here)."""
    generator = torch.Generator().manual_seed(0)
    channels, text_dim = UNET_CONFIG["in_channels"], UNET_CONFIG["cross_attention_dim"]
    sample = torch.randn(BATCH, channels, LATENT, LATENT, generator=generator).to(DEVICE, DTYPE)
    text = torch.randn(BATCH, 77, text_dim, generator=generator).to(DEVICE, DTYPE)
    timesteps = [torch.tensor(981 - 20 * i, device=DEVICE) for i in range(CALLS)]

    def run() -> None:
        with torch.no_grad():
            for t in timesteps:
                unet(sample, t, encoder_hidden_states=text)

    with torch.no_grad():
        unet(sample, timesteps[0], encoder_hidden_states=text)
    return run


def _measure(benchmark, fn) -> float:
    if ON_CUDA:
        return measure(benchmark, fn, budget_s=2.0, min_rounds=5, max_rounds=30)
    if SMOKE:
        return measure(benchmark, fn, calibrate=False, min_rounds=2)
    return measure(benchmark, fn, calibrate=False, min_rounds=CPU_ROUNDS)


def _info(benchmark, **info) -> None:
    record(benchmark, calls=CALLS, pixels=PIXELS, batch=BATCH, dtype=str(DTYPE).removeprefix("torch."), **info)


@pytest.mark.benchmark(group=GROUP)
def test_capture_overhead_interleaved(benchmark, unet, unet_calls):
    """Baseline and capture rounds alternate (the baseline runs as pedantic's untimed setup); both
    are timed by the device. The pytest-benchmark median is that of the captured rounds."""
    targets = find_targets(unet)
    accumulators = {t.name: torch.zeros(CALLS, t.linear.in_features, dtype=torch.float32, device=DEVICE) for t in targets}
    state = capture.CaptureState(num_calls=CALLS)
    baseline_s: list[float] = []
    captured_s: list[float] = []

    def captured_calls() -> None:
        with capture.apply_capture(unet, targets, state):
            state.start_run(accumulators)
            unet_calls()

    captured_calls()  # warm-up (kernel compilation, allocator)

    def baseline() -> None:
        baseline_s.append(device_time(unet_calls))

    def captured() -> None:
        captured_s.append(device_time(captured_calls))

    benchmark.pedantic(captured, setup=baseline, rounds=INTERLEAVED_ROUNDS, iterations=1, warmup_rounds=0)
    assert state.call_index == CALLS - 1
    assert all(bool((acc.sum(dim=1) > 0).all()) for acc in accumulators.values())

    pairs = list(zip(baseline_s, captured_s))
    overhead = 100 * (statistics.median(c / b for b, c in pairs) - 1)
    provider = geglu_accumulate_backend(DEVICE)
    _info(benchmark, op="capture (interleaved, device-timed)", provider=provider, layers=len(targets))
    benchmark.extra_info.update(
        event_baseline_ms=round(1e3 * statistics.median(baseline_s), 3),
        event_capture_ms=round(1e3 * statistics.median(captured_s), 3),
        event_overhead_pct=round(overhead, 2),
        event_rounds=len(pairs),
        timer="cuda events" if ON_CUDA else "perf_counter",
    )


@pytest.mark.benchmark(group=GROUP)
def test_unet_without_capture(benchmark, unet_calls):
    _medians["baseline"] = _measure(benchmark, unet_calls)
    _info(benchmark, op="UNet calls", provider="no capture", baseline=True)


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
def test_unet_with_capture(benchmark, unet, unet_calls, mode, provider):
    modules = _stat_modules(mode)
    for module in modules:
        require(module, provider)
    if mode == "unfused":
        best = [name for name in ("cuda", "triton", "cpu", "reference") if all(name in runnable(m) for m in modules)][0]
        if provider != best:
            pytest.skip(f"unfused capture runs only for the fastest provider ({best})")
    targets = find_targets(unet)
    accumulators = {t.name: torch.zeros(CALLS, t.linear.in_features, dtype=torch.float32, device=DEVICE) for t in targets}
    state = capture.CaptureState(num_calls=CALLS)
    kwargs = {"fused": mode == "fused"} if mode != "default" else {}

    def run() -> None:
        state.start_run(accumulators)
        with use_backend(provider):
            unet_calls()

    with capture.apply_capture(unet, targets, state, **kwargs):
        median = _measure(benchmark, run)
    # the hooks did fire: every layer has a statistic for every call
    assert state.call_index == CALLS - 1
    assert all(bool((acc.sum(dim=1) > 0).all()) for acc in accumulators.values())

    ops = ",".join(m.__name__.rsplit(".", 1)[-1] for m in modules)
    _info(benchmark, op="capture" if mode == "default" else f"capture ({mode})", provider=provider, ops=ops, layers=len(targets))
    if "baseline" in _medians:
        benchmark.extra_info["overhead_pct"] = round(100 * (median / _medians["baseline"] - 1), 2)
