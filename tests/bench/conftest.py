"""With ``MEMCORE_BENCH_JSONL=FILE``, append each finished benchmark to FILE as one JSON line.

pytest-benchmark writes its ``--benchmark-json`` file only when the session ends; a run stopped by
a time limit (tools/gpu_check.sh time-boxes every phase) would lose everything. The lines hold what
the summary needs: group, name, median, IQR and rounds in seconds, and the benchmark's extra_info.
"""

from __future__ import annotations

import json
import os

import pytest


@pytest.fixture(autouse=True)
def _append_finished_benchmark(request):
    yield
    path = os.environ.get("MEMCORE_BENCH_JSONL")
    bench = request.node.funcargs.get("benchmark") if path else None
    if bench is None or bench.stats is None:
        return
    stats = bench.stats.stats
    line = {
        "group": bench.group,
        "name": request.node.name,
        "stats": {"median": stats.median, "iqr": stats.iqr, "rounds": stats.rounds},
        "extra_info": dict(bench.extra_info),
    }
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")
