"""Shared pieces of the memcore benchmarks: device, providers, timing.

A provider is a memcore backend name (``memcore.ops.BACKENDS``) that an op module's ``_available``
offers for the benchmark device; it is forced with :func:`memcore.ops.use_backend` inside the timed
function, so the op's own validation and dispatch are part of what is measured. Providers are
discovered at run time: a backend that is not built (or not for this device) is skipped, one that
appears later is picked up without editing the benchmarks.

The device is CUDA when ``torch.cuda.is_available()``, else the CPU. Triton is never benchmarked on
the CPU (its interpreter is a debugging aid, not a backend to time).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType

import pytest
import torch

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
ON_CUDA = DEVICE.type == "cuda"

# memcore.ops.BACKENDS, restricted to those that can run on this device type (reference first).
PROVIDERS = ("reference", "cuda", "triton") if ON_CUDA else ("reference", "cpu")
# fastest first, as memcore's dispatcher prefers them
_SPEED_ORDER = ("cuda", "triton", "cpu", "reference")

# time each benchmark for about this long (seconds), within [MIN_ROUNDS, MAX_ROUNDS] rounds
BUDGET_S = 1.0 if ON_CUDA else 3.0
MIN_ROUNDS = 3 if ON_CUDA else 2
MAX_ROUNDS = 100 if ON_CUDA else 20


def runnable(module: ModuleType) -> list[str]:
    """The providers of an op module that can run on :data:`DEVICE`, in :data:`PROVIDERS` order."""
    available = module._available(DEVICE)
    return [name for name in PROVIDERS if name in available]


def require(module: ModuleType, provider: str) -> None:
    """Skip the calling benchmark unless ``provider`` runs ``module``'s op on :data:`DEVICE`."""
    if provider not in runnable(module):
        op = module.__name__.rsplit(".", 1)[-1]
        pytest.skip(f"{op}: backend {provider!r} not available on {DEVICE.type}")


def fastest(module: ModuleType) -> str:
    names = runnable(module)
    return next(name for name in _SPEED_ORDER if name in names)


def synchronize() -> None:
    if ON_CUDA:
        torch.cuda.synchronize(DEVICE)


def synced(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` followed by a device synchronization, so that the timer sees the kernels finish."""

    def timed() -> None:
        fn()
        synchronize()

    return timed


def _time_once(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    benchmark,
    fn: Callable[[], object],
    *,
    budget_s: float = BUDGET_S,
    min_rounds: int = MIN_ROUNDS,
    max_rounds: int = MAX_ROUNDS,
    calibrate: bool = True,
) -> float:
    """Time ``fn`` (synchronized on CUDA) with ``benchmark.pedantic``; return the median in seconds.

    With ``calibrate`` one or two untimed calls (also the warm-up) size the rounds to about ``budget_s``;
    without it, ``min_rounds`` rounds run with no warm-up (for slow calls already warmed up).
    """
    timed = synced(fn)
    rounds = min_rounds
    if calibrate:
        once = _time_once(timed)
        if once < budget_s:  # a cold first call (lazy init, allocator) would size the rounds too few
            once = min(once, _time_once(timed))
        rounds = max(min_rounds, min(max_rounds, int(budget_s / max(once, 1e-9))))
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    # no stats under --benchmark-disable (one plain call, as a smoke test)
    return benchmark.stats.stats.median if benchmark.stats is not None else float("nan")


def record(benchmark, **info) -> None:
    benchmark.extra_info.update({"device": str(DEVICE), **info})


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 1) if seconds > 0 else float("nan")
