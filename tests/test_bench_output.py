"""`pytest --benchmark-only` lists the benchmarks and one count of the tests it leaves out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_only_deselects_other_tests_instead_of_skipping_each():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--benchmark-only", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/test_scenes.py", "tests/bench/test_bench_wanda_mask.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert any("deselected" in line for line in lines), run.stdout
    assert not [line for line in lines if line.startswith("tests/test_scenes.py")], run.stdout
    assert [line for line in lines if line.startswith("tests/bench/test_bench_wanda_mask.py")], run.stdout


def test_the_mask_benchmarks_run_in_their_smoke_setting():
    """The benchmark files are skipped by plain pytest; this runs a few of them on toy shapes, so that
    a benchmark broken by a change fails here."""
    import os

    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--benchmark-only", "-q", "-p", "no:cacheprovider",
         "tests/bench/test_bench_wanda_mask.py", "-k", "grouped or (T1 and (cpu or copy))"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "MEMCORE_BENCH_SMOKE": "1"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]
