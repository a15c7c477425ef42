"""Shared pieces of the memcore benchmarks: device, providers, timing.

A provider is a memcore backend name (``memcore.ops.BACKENDS``) that memcore.ops' backend table (``available_backends``)
offers for the benchmark device; it is forced with :func:`memcore.ops.use_backend` inside the timed
function, so the op's own validation and dispatch are part of what is measured. Providers are
discovered at run time: a backend that is not built (or not for this device) is skipped, one that
appears later is picked up without editing the benchmarks.

The device is CUDA when ``torch.cuda.is_available()``, else the CPU. Triton is never benchmarked on
the CPU (its interpreter is a debugging aid, not a backend to time).

Environment: ``MEMCORE_BENCH_SMOKE=1`` shrinks every benchmark to toy shapes and short budgets (to
run the benchmark code itself on the CPU in seconds; the numbers mean nothing);
``MEMCORE_BENCH_JSONL=FILE`` appends one line per finished benchmark to FILE (tests/bench/conftest.py),
so a run killed by a time limit keeps what it measured.
"""

from __future__ import annotations

import os
import statistics
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

SMOKE = os.environ.get("MEMCORE_BENCH_SMOKE", "") not in ("", "0")

# torch intra-op threads of the model-level benchmarks on the CPU (None: torch's default, always on
# CUDA). One by default: on a 2-core machine shared with other jobs, two threads made rounds 10 to 20
# times slower and far noisier (tests/bench/test_bench_evaluate.py).
THREADS = None if ON_CUDA else int(os.environ.get("MEMCORE_BENCH_THREADS", "1"))

# time each benchmark for about this long (seconds), within [MIN_ROUNDS, MAX_ROUNDS] rounds
BUDGET_S = 0.05 if SMOKE else 1.0 if ON_CUDA else 3.0
MIN_ROUNDS = 3 if ON_CUDA else 2
MAX_ROUNDS = 100 if ON_CUDA else 20


def runnable(module: ModuleType) -> list[str]:
    """The providers of an op module that can run on :data:`DEVICE`, in :data:`PROVIDERS` order
    (memcore.ops' backend table answers)."""
    from memcore.ops import available_backends

    available = available_backends(module.__name__.rsplit(".", 1)[-1], DEVICE)
    return [name for name in PROVIDERS if name in available]


def require(module: ModuleType, provider: str) -> None:
    """Skip the calling benchmark unless ``provider`` runs ``module``'s op on :data:`DEVICE`."""
    if provider not in runnable(module):
        op = module.__name__.rsplit(".", 1)[-1]
        pytest.skip(f"{op}: backend {provider!r} not available on {DEVICE.type}")


def fastest(module: ModuleType) -> str:
    names = runnable(module)
    return next(name for name in _SPEED_ORDER if name in names)


@pytest.fixture(scope="module")
def bench_threads():
    """Run a module's benchmarks with :data:`THREADS` torch threads; use with
    ``pytestmark = pytest.mark.usefixtures("bench_threads")`` after ``from benchutil import bench_threads``."""
    if THREADS is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


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


def device_time(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` keeps the device busy, from its first launch to its last completion: CUDA events
    on the current stream around one call (synchronized), ``time.perf_counter`` on the CPU."""
    if not ON_CUDA:
        return _time_once(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def kernel_times(fn: Callable[[], object], repeats: int) -> tuple[list[float], str]:
    """Device-only seconds per call of ``fn`` (already warmed up), ``repeats`` times, and the method.

    On CUDA ``fn`` is captured into a CUDA graph once and each replay is timed with CUDA events:
    host-side work (validation, dispatch, launch latency) drops out and what remains is the kernels
    back to back. Code that cannot be captured is timed with events around eager calls instead (the
    method says so). On the CPU there is no such split: ``time.perf_counter`` around each call.
    """
    if not ON_CUDA:
        return [_time_once(fn) for _ in range(repeats)], "perf_counter"
    replay, method = fn, "events"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up on a side stream, as graph capture wants
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        replay, method = graph.replay, "graph"
        replay()
    except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager timing
        method = f"events (no graph: {type(exc).__name__})"
    synchronize()
    return [device_time(replay) for _ in range(repeats)], method


def median_ms(seconds: list[float]) -> float:
    return round(1e3 * statistics.median(seconds), 4)
