"""pytest plugin: append every test outcome to ``$GPU_CHECK_TESTS_JSONL`` as it happens.

    GPU_CHECK_TESTS_JSONL=tests.jsonl python3 -m pytest -p gpu_pytest_log ...   (tools/ on PYTHONPATH)

One JSON line per report: ``{"nodeid", "when", "outcome"}`` with outcome ``passed``, ``failed``,
``skipped``, ``error`` (setup, teardown or collection failed), ``xfailed`` or ``xpassed``. Lines are
written at once, so a run killed by a time limit keeps every result it reached; under pytest-xdist
only the controller writes (it receives the workers' reports).
"""

from __future__ import annotations

import json
import os

_path: str | None = None


def _write(nodeid: str, when: str, outcome: str) -> None:
    with open(_path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"nodeid": nodeid, "when": when, "outcome": outcome}) + "\n")


def pytest_configure(config) -> None:
    global _path
    if not hasattr(config, "workerinput"):  # not inside an xdist worker
        _path = os.environ.get("GPU_CHECK_TESTS_JSONL") or None


def pytest_collectreport(report) -> None:
    if _path and report.failed:
        _write(report.nodeid, "collect", "error")


def pytest_runtest_logreport(report) -> None:
    if not _path:
        return
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.when == "call":
        outcome = report.outcome
    elif report.failed:
        outcome = "error"
    elif report.skipped:
        outcome = "skipped"
    else:
        return  # setup and teardown that passed
    _write(report.nodeid, report.when, outcome)
