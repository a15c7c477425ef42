"""memcore.ops' backend table: one registration per op, one answer for which backends can run it and
which one does, used by memcore env."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import run_cli

from memcore.errors import MemcoreError
from memcore.ops import _backend, available_backends, backend_report, chosen_backend, use_backend
from memcore.ops._ext import extension

OPS = ["geglu_accumulate", "sqnorm_accumulate", "wanda_mask", "wanda_mask_grouped"]


def expected_cpu_backends() -> list[str]:
    names = ["reference"]
    if extension() is not None:
        names.append("cpu")
    if _backend.triton_usable(torch.device("cpu")):
        names.append("triton")
    return names


def test_every_op_is_registered_once_with_every_backend_it_has():
    assert _backend.registered_ops() == OPS
    for op in OPS:
        entry = _backend._TABLE[op]
        assert entry.reference is not None and entry.triton is not None and entry.native is not None
        assert available_backends(op, "cpu") == expected_cpu_backends()


def test_the_chosen_backend_follows_preference_and_forcing(monkeypatch):
    monkeypatch.delenv("MEMCORE_BACKEND", raising=False)
    preferred = "cpu" if extension() is not None else "reference"
    with use_backend(None):
        assert {op: chosen_backend(op, "cpu") for op in OPS} == dict.fromkeys(OPS, preferred)
    with use_backend("reference"):
        assert chosen_backend("wanda_mask", torch.device("cpu")) == "reference"
    monkeypatch.setenv("MEMCORE_BACKEND", "reference")
    assert chosen_backend("sqnorm_accumulate", "cpu") == "reference"
    with use_backend("cuda"), pytest.raises(MemcoreError, match="'cuda' was forced but cannot run wanda_mask on cpu"):
        chosen_backend("wanda_mask", "cpu")
    with pytest.raises(ValueError, match="unknown memcore op 'nope'"):
        available_backends("nope", "cpu")


def test_the_report_answers_for_every_op_even_when_forcing_fails(monkeypatch):
    monkeypatch.delenv("MEMCORE_BACKEND", raising=False)
    with use_backend(None):
        report = backend_report("cpu")
    assert list(report) == OPS and all(row["chosen"] == report[OPS[0]]["chosen"] for row in report.values())
    with use_backend("cuda"):
        report = backend_report("cpu")
    assert all(row["chosen"] is None and "cannot run" in row["error"] for row in report.values())


def test_memcore_env_shows_the_table(capsys, monkeypatch):
    monkeypatch.delenv("MEMCORE_BACKEND", raising=False)
    code, out, _ = run_cli(capsys, "env", "--json")
    assert code == 0
    ops = json.loads(out)["ops_cpu"]
    assert list(ops) == OPS
    assert ops["wanda_mask"].endswith(f"(available: {', '.join(expected_cpu_backends())})")
