"""Benchmark of statistics collection on an SD 1.5-sized UNet (SPEC section 6: target <= 3% overhead).

The UNet has SD 1.5's architecture with random weights (built once per module): float32 on the CPU,
2 calls at 256 px (latent 32 x 32); float16 on CUDA, 10 calls at 512 px. Each call takes a guidance
batch of 2 [uncond, cond] with random text embeddings [2, 77, 768]. The same calls run without
capture (the baseline) and inside :func:`memcore.capture.apply_capture` per statistics provider; the
hooks' own counter advances the call index. ``overhead_pct`` is the median over the baseline's.
On CUDA, when ``apply_capture`` has a ``fused`` switch, the unfused path (statistics from each
target's input) also runs, for the fastest provider (on the CPU it would add minutes).

    pytest tests/bench/test_bench_capture.py --benchmark-only
"""

from __future__ import annotations

import importlib
import inspect
import os

import pytest
import torch

from benchutil import DEVICE, ON_CUDA, PROVIDERS, measure, record, require, runnable

pytest.importorskip("diffusers")
capture = pytest.importorskip("memcore.capture")
from memcore.ops import use_backend  # noqa: E402
from memcore.targets import find_targets  # noqa: E402

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
CALLS = 10 if ON_CUDA else 2
PIXELS = 512 if ON_CUDA else 256
LATENT = PIXELS // 8  # SD's VAE scale factor
BATCH = 2  # classifier-free guidance: [uncond, cond]
DTYPE = torch.float16 if ON_CUDA else torch.float32
# a UNet call takes 4 to 10 s on two CPU cores: a fixed number of rounds (MEMCORE_BENCH_CPU_ROUNDS,
# default 2, enough to run the suite but not to resolve a few percent), warmed up once in the fixture
CPU_ROUNDS = int(os.environ.get("MEMCORE_BENCH_CPU_ROUNDS", "2"))
GROUP = f"capture: SD 1.5 UNet, {CALLS} calls at {PIXELS} px, batch {BATCH}, {str(DTYPE).removeprefix('torch.')}"

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
    with torch.no_grad():
        model = UNet2DConditionModel.from_config(SD15_UNET).to(DEVICE, DTYPE).eval()
    model.requires_grad_(False)
    yield model
    del model


@pytest.fixture(scope="module")
def unet_calls(unet):
    """The timed work: CALLS UNet calls on fixed random inputs (warmed up once here)."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(BATCH, 4, LATENT, LATENT, generator=generator).to(DEVICE, DTYPE)
    text = torch.randn(BATCH, 77, 768, generator=generator).to(DEVICE, DTYPE)
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
        return measure(benchmark, fn, budget_s=3.0, min_rounds=5, max_rounds=30)
    return measure(benchmark, fn, calibrate=False, min_rounds=CPU_ROUNDS)


def _info(benchmark, **info) -> None:
    record(benchmark, calls=CALLS, pixels=PIXELS, batch=BATCH, dtype=str(DTYPE).removeprefix("torch."), **info)


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
