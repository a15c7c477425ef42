"""Benchmark of the statistics ops at the distinct SD 1.5 layer shapes (docs/method.md sections 2 and 6).

Per shape (inner width, tokens per image) and guidance batch (rows = batch * tokens), side by side:

- ``plain GEGLU``: ``h * gelu(g)`` from the projection P ``[rows, 2 * inner]``, what a forward does anyway;
- ``sqnorm_accumulate`` per provider: the statistic of X = GEGLU(P), work added to the plain GEGLU;
- ``geglu_accumulate`` per provider: GEGLU and statistic fused, to replace the plain GEGLU;
- ``GEGLU + reference statistic``: the unfused pure-PyTorch path.

Activations are fp16 on CUDA, fp32 on the CPU; accumulators float32. ``bytes`` is what the op must
read and write (P, X); ``gbps`` (CUDA only) is that over the median time.

    pytest tests/bench/test_bench_statistics.py --benchmark-only
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from benchutil import DEVICE, ON_CUDA, PROVIDERS, gbps, measure, record, require

from memcore.ops import use_backend

# the modules (memcore.ops.<op> is also the op itself)
gm = importlib.import_module("memcore.ops.geglu_accumulate")
sq = importlib.import_module("memcore.ops.sqnorm_accumulate")

# (inner features of ff.net.2, tokens per image at 512 px): docs/method.md section 1's distinct shapes
SHAPES = [(1280, 4096), (2560, 1024), (5120, 256), (5120, 64)]
BATCHES = (2, 16)
CASES = [(inner, tokens, batch) for inner, tokens in SHAPES for batch in BATCHES]


def _geglu(p: torch.Tensor) -> torch.Tensor:
    h, g = p.chunk(2, dim=-1)
    return h * F.gelu(g)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"i{c[0]}-tok{c[1]}-b{c[2]}")
def case(request) -> dict:
    """P and X = GEGLU(P) for one (inner, tokens, batch); one case alive at a time."""
    inner, tokens, batch = request.param
    rows = batch * tokens
    dtype = torch.float16 if ON_CUDA else torch.float32
    generator = torch.Generator().manual_seed(inner + rows)
    with torch.no_grad():
        p = torch.randn(rows, 2 * inner, generator=generator).to(DEVICE, dtype)
        x = _geglu(p)
    return {
        "p": p,
        "x": x,
        "inner": inner,
        "rows": rows,
        "group": f"statistics: inner {inner}, {tokens} tokens x batch {batch} = {rows} rows",
        "info": {"inner": inner, "tokens": tokens, "batch": batch, "rows": rows, "dtype": str(dtype).removeprefix("torch.")},
    }


def _finish(benchmark, case: dict, median: float, nbytes: int, **info) -> None:
    record(benchmark, **case["info"], **info)
    benchmark.extra_info["bytes"] = nbytes
    if ON_CUDA:
        benchmark.extra_info["gbps"] = gbps(nbytes, median)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _acc(case: dict) -> torch.Tensor:
    return torch.zeros(case["inner"], dtype=torch.float32, device=DEVICE)


def test_plain_geglu(benchmark, case):
    benchmark.group = case["group"]
    p = case["p"]
    median = measure(benchmark, lambda: _geglu(p))
    _finish(benchmark, case, median, _nbytes(p, case["x"]), op="plain GEGLU", provider="torch", baseline=True)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sqnorm_accumulate(benchmark, case, provider):
    require(sq, provider)
    benchmark.group = case["group"]
    x, acc = case["x"], _acc(case)

    def run() -> None:
        with use_backend(provider):
            sq.sqnorm_accumulate(x, acc)

    median = measure(benchmark, run)
    # unfused: this runs after the plain GEGLU, so its whole time is added to it
    _finish(benchmark, case, median, _nbytes(x), op="sqnorm_accumulate", provider=provider, adds_to_baseline=True)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_geglu_accumulate(benchmark, case, provider):
    require(gm, provider)
    benchmark.group = case["group"]
    p, acc = case["p"], _acc(case)

    def run() -> None:
        with use_backend(provider):
            gm.geglu_accumulate(p, acc)

    median = measure(benchmark, run)
    _finish(benchmark, case, median, _nbytes(p, case["x"]), op="geglu_accumulate", provider=provider)


def test_geglu_then_reference_statistic(benchmark, case):
    benchmark.group = case["group"]
    p, acc = case["p"], _acc(case)

    def run() -> None:
        sq.sqnorm_accumulate_reference(_geglu(p), acc)

    median = measure(benchmark, run)
    _finish(benchmark, case, median, _nbytes(p, case["x"]), op="GEGLU + reference statistic", provider="torch")
