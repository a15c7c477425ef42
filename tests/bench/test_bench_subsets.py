"""Benchmark of ``localize --subsets``: one run for every subset against one run per subset.

The tiny model (CPU, float32, 128 px, tau 10, batch 8) localizes the paper's subsets memorize_0..3
(built-in sets, 10 prompts each, 40 distinct). One run generates each distinct prompt once and the
empty prompt once; separate runs generate every subset's prompts and the empty prompt per subset.
``speedup`` is the separate runs' median over the single run's.

    pytest tests/bench/test_bench_subsets.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from benchutil import measure, record

from memcore.config import LocalizeConfig  # noqa: E402
from memcore.localization import localize, localize_subsets  # noqa: E402
from memcore.models import load_pipeline  # noqa: E402
from memcore.prompts import load_subsets  # noqa: E402

CONFIG = LocalizeConfig(timesteps=10, batch_size=8, progress=False)
GROUP = "subsets: tiny model, memorize_0..3, tau 10, 128 px, batch 8"
_medians: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup():
    return load_pipeline("tiny", device="cpu"), load_subsets(["memorize_0..3"])


def _info(benchmark, subsets, mode: str) -> None:
    prompts = sum(len(p) for p in subsets.values())
    distinct = len({p for ps in subsets.values() for p in ps})
    record(benchmark, op="localize", provider=mode, subsets=len(subsets), prompts=prompts, distinct_prompts=distinct)


@pytest.mark.benchmark(group=GROUP)
def test_one_run_for_all_subsets(benchmark, setup):
    pipe, subsets = setup
    with torch.no_grad():
        _medians["one run"] = measure(benchmark, lambda: localize_subsets(pipe, subsets, CONFIG), calibrate=False, min_rounds=3)
    _info(benchmark, subsets, "one run")


@pytest.mark.benchmark(group=GROUP)
def test_one_run_per_subset(benchmark, setup):
    pipe, subsets = setup

    def separate() -> None:
        for prompts in subsets.values():
            localize(pipe, prompts, CONFIG)

    with torch.no_grad():
        median = measure(benchmark, separate, calibrate=False, min_rounds=3)
    _info(benchmark, subsets, "one run per subset")
    if "one run" in _medians:
        benchmark.extra_info["speedup"] = round(median / _medians["one run"], 2)
