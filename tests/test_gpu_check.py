"""tools/gpu_check.sh and its Python half, on the CPU: the summary lines from fake phase results
(pass, fail, timeout, missing), the files each path leaves in $OUT, the pytest plugin, the
sanitizer driver, the determinism and localize comparisons, and the preflight failing in one line
on a machine without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gc = _load("gpu_check")
GOAL_NAMES = [goal for _, goal in gc.GOALS]


# --- fake phase results -------------------------------------------------------------------------


def _phase(work: Path, name: str, rc=0, timed_out=False, skipped=None, seconds=12, limit=90) -> None:
    record = {"name": name, "rc": rc, "limit": limit, "seconds": seconds, "timed_out": timed_out, "skipped": skipped}
    (work / f"phase_{name}.json").write_text(json.dumps(record))


def _lines(work: Path, name: str, records: list[dict]) -> None:
    with open(work / name, "a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def _bench(provider: str, t: int, median_ms: float, kernel_ms: float | None) -> dict:
    info = {"op": "wanda_mask", "provider": provider, "T": t, "device": "cuda"}
    if kernel_ms is not None:
        info.update(kernel_ms=kernel_ms, kernel_method="graph")
    return {"group": f"wanda_mask: 16 SD 1.5 layers, T={t}", "name": f"test_wanda_mask[T{t}-{provider}]",
            "stats": {"median": median_ms / 1e3, "iqr": 0.0, "rounds": 10}, "extra_info": info}


def _capture(overhead_pct: float) -> dict:
    info = {"op": "capture (interleaved, device-timed)", "provider": "cuda", "calls": 4, "pixels": 512, "batch": 2,
            "dtype": "float16", "event_baseline_ms": 100.0, "event_capture_ms": 100.0 + overhead_pct,
            "event_overhead_pct": overhead_pct, "event_rounds": 12, "timer": "cuda events", "device": "cuda"}
    return {"group": "capture", "name": "test_capture_overhead_interleaved",
            "stats": {"median": 0.1, "iqr": 0.0, "rounds": 12}, "extra_info": info}


SAN_DONE = "gpu_sanitize: done, 333 op calls, 0 mismatches\n"


def fake_work(work: Path, *, test_outcomes=("passed", "passed", "skipped"), mask_speed_ms=0.2, kernel_ms=0.1,
              copy_ms=0.04, overhead=1.25, sanitizer_errors=0, deterministic=True, family_rc=0) -> Path:
    """A work folder as a complete run leaves it, every goal met unless told otherwise."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "device.txt").write_text("NVIDIA H200, compute capability 9.0, torch 2.11.0\n")
    _phase(work, "tests", rc=0 if "failed" not in test_outcomes else 1)
    _lines(work, "tests.jsonl", [{"nodeid": f"tests/test_cuda.py::test_{i}", "when": "call", "outcome": o} for i, o in enumerate(test_outcomes)])
    for tool in gc.SANITIZER_TOOLS:
        _phase(work, f"sanitize_{tool}", rc=0)
        summary = f"========= ERROR SUMMARY: {sanitizer_errors} errors\n"
        if tool == "racecheck":
            summary = f"========= RACECHECK SUMMARY: {sanitizer_errors} hazards displayed ({sanitizer_errors} errors, 0 warnings)\n"
        (work / f"sanitize_{tool}.log").write_text("========= COMPUTE-SANITIZER\n" + SAN_DONE + summary)
    _phase(work, "determinism_ops")
    _phase(work, "determinism_localize")
    _lines(work, "determinism.jsonl", [
        {"check": "sqnorm_accumulate cuda 8192x1280 float16", "equal": True, "detail": ""},
        {"check": "wanda_mask cuda 16 SD 1.5 layers T=10", "equal": deterministic, "detail": "3 of 9 bytes differ"},
        {"check": "localize tiny (cuda, float16) mask file (16 tensors)", "equal": True, "detail": ""},
    ])
    benches = []
    for t in gc.MASK_TS:
        benches += [_bench("reference", t, 20.0 * t, 15.0 * t), _bench("cuda", t, mask_speed_ms, kernel_ms), _bench("copy", t, 0.05, copy_ms)]
    _phase(work, "bench_mask")
    (work / "bench_mask.json").write_text(json.dumps({"machine_info": {}, "commit_info": {}, "benchmarks": benches}))
    _phase(work, "bench_capture")
    (work / "bench_capture.json").write_text(json.dumps({"benchmarks": [_capture(overhead)]}))
    for model in gc.FAMILIES:
        _phase(work, f"family_{model}", rc=family_rc if model == "tiny-sd3" else 0)
    return work


def summary_lines(work: Path, **kwargs) -> list[str]:
    lines = gc.goal_lines(gc.load_results(work, **kwargs))
    assert len(lines) == len(gc.GOALS)
    for line, goal in zip(lines, GOAL_NAMES):  # one line per goal, in order, status first
        assert re.match(rf"^(PASS|FAIL|NOT-RUN) +{re.escape(goal)}: ", line), line
    return lines


def status(line: str) -> str:
    return line.split()[0]


# --- the summary ----------------------------------------------------------------------------------


def test_everything_passes_with_its_numbers(tmp_path):
    lines = summary_lines(fake_work(tmp_path))
    assert [status(line) for line in lines] == ["PASS"] * 7, "\n".join(lines)
    speedup, floor, capture, determinism, sanitizer, tests, families = lines
    assert "100.0x at worst" in speedup and "T=51 5100.0x" in speedup  # 20 ms / 0.2 ms at T=1
    assert "2.50x at worst" in floor and "graph" in floor  # 0.1 / 0.04
    assert "+1.25%" in capture and "12 paired rounds" in capture
    assert determinism.startswith("PASS    deterministic: 3/3 byte-identical")
    assert "0 errors (memcheck 0, racecheck 0, synccheck 0)" in sanitizer
    assert "2 passed, 0 failed, 0 errors, 1 skipped" in tests
    assert "5/5 ran" in families


def test_failures_carry_their_numbers(tmp_path):
    work = fake_work(tmp_path, test_outcomes=("passed", "failed", "passed"), mask_speed_ms=1.0, kernel_ms=0.5,
                     overhead=4.5, sanitizer_errors=2, deterministic=False, family_rc=1)
    _lines(work, "tests.jsonl", [{"nodeid": "tests/test_triton.py", "when": "collect", "outcome": "error"}])
    lines = summary_lines(work)
    assert [status(line) for line in lines] == ["FAIL"] * 7, "\n".join(lines)
    speedup, floor, capture, determinism, sanitizer, tests, families = lines
    assert "20.0x at worst" in speedup and "T=1 20.0x (1 ms vs 20 ms)" in speedup
    assert "12.50x at worst" in floor
    assert "+4.50%" in capture
    assert "2/3 byte-identical" in determinism and "wanda_mask cuda" in determinism
    assert "6 errors (memcheck 2 errors, racecheck 2 errors, synccheck 2 errors)" in sanitizer
    assert "2 passed, 1 failed, 1 errors" in tests and "first: tests/test_cuda.py::test_1" in tests
    assert "4/5 ran" in families and "tiny-sd3 exit status 1" in families


def test_timeouts_report_partial_results(tmp_path):
    work = fake_work(tmp_path)
    _phase(work, "tests", rc=124, timed_out=True, limit=150)  # all it reached passed: not yet a pass
    _phase(work, "sanitize_racecheck", rc=124, timed_out=True)
    (work / "sanitize_racecheck.log").write_text("========= COMPUTE-SANITIZER\n")
    _phase(work, "determinism_localize", rc=124, timed_out=True)
    # the mask benchmark was killed after T=1 and T=10: only its per-benchmark lines are left
    (work / "bench_mask.json").unlink()
    _phase(work, "bench_mask", rc=137, timed_out=True)
    _lines(work, "bench_mask.jsonl", [_bench(p, t, m, k) for t in (1, 10) for p, m, k in
                                      (("reference", 20.0, 15.0), ("cuda", 0.2, 0.1), ("copy", 0.05, 0.04))])
    _phase(work, "family_tiny-sdxl", rc=124, timed_out=True)
    lines = summary_lines(work)
    assert [status(line) for line in lines] == ["NOT-RUN", "NOT-RUN", "PASS", "NOT-RUN", "NOT-RUN", "NOT-RUN", "NOT-RUN"], "\n".join(lines)
    speedup, floor, _, determinism, sanitizer, tests, families = lines
    assert "100.0x at worst" in speedup and "T=51 missing" in speedup and "timed out" in speedup
    assert "2.50x at worst" in floor and "T=51 missing" in floor
    assert "3/3 byte-identical" in determinism and "determinism_localize timed out" in determinism
    assert "racecheck incomplete (timed out after 90 s)" in sanitizer and "memcheck 0" in sanitizer
    assert "2 passed, 0 failed" in tests and "partial: tests timed out after 150 s" in tests
    assert "4/5 ran" in families and "tiny-sdxl timed out after 90 s" in families


def test_a_failure_before_a_timeout_is_a_failure(tmp_path):
    work = fake_work(tmp_path, test_outcomes=("passed", "failed"), mask_speed_ms=2.0)
    _phase(work, "tests", rc=124, timed_out=True)
    (work / "bench_mask.json").unlink()
    _phase(work, "bench_mask", rc=124, timed_out=True)
    _lines(work, "bench_mask.jsonl", [_bench("reference", 1, 20.0, None), _bench("cuda", 1, 2.0, None)])
    speedup, floor, *_, tests, _ = summary_lines(work)
    assert status(tests) == "FAIL" and "1 failed" in tests
    assert status(speedup) == "FAIL" and "10.0x at worst" in speedup
    assert status(floor) == "NOT-RUN" and "no device-only cuda and copy times" in floor


def test_missing_results_are_not_run(tmp_path):
    lines = summary_lines(tmp_path)
    assert [status(line) for line in lines] == ["NOT-RUN"] * 7, "\n".join(lines)
    assert "0/5 ran" in lines[-1] and "tests did not run" in lines[-2]


def test_skipped_phases_say_why(tmp_path):
    work = fake_work(tmp_path)
    for tool in gc.SANITIZER_TOOLS:
        _phase(work, f"sanitize_{tool}", rc=None, skipped="compute-sanitizer not found")
        (work / f"sanitize_{tool}.log").unlink()
    _phase(work, "tests", rc=None, skipped="no time left")
    (work / "tests.jsonl").unlink()
    lines = summary_lines(work)
    assert status(lines[4]) == "NOT-RUN" and "memcheck not run (compute-sanitizer not found)" in lines[4]
    assert status(lines[5]) == "NOT-RUN" and "tests skipped: no time left" in lines[5]


def test_preflight_failure_marks_every_goal_not_run(tmp_path):
    fake_work(tmp_path / "work")
    text = gc.write_summary(tmp_path / "work", tmp_path / "out", False, "no CUDA GPU visible", 3.0)
    assert "preflight failed: no CUDA GPU visible" in text
    assert [status(line) for line in text.splitlines()[2:]] == ["NOT-RUN"] * 7


def test_dry_run_judges_the_cpu_backend(tmp_path):
    work = fake_work(tmp_path)
    benches = json.loads((work / "bench_mask.json").read_text())
    for bench in benches["benchmarks"]:
        bench["extra_info"]["provider"] = bench["extra_info"]["provider"].replace("cuda", "cpu")
    (work / "bench_mask.json").write_text(json.dumps(benches))
    text = gc.summary_text(gc.load_results(work, dry_run=True))
    assert "DRY RUN" in text.splitlines()[1]
    assert "PASS    mask >= 50x faster than the reference: 100.0x at worst (cpu vs reference" in text


def test_sanitizer_log_parsing():
    assert gc.sanitizer_counts("========= ERROR SUMMARY: 0 errors\n" + SAN_DONE) == (0, True)
    assert gc.sanitizer_counts("========= ERROR SUMMARY: 1 error\n") == (1, False)
    race = "========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warning)\n========= ERROR SUMMARY: 0 errors\n"
    assert gc.sanitizer_counts(race) == (2, False)
    assert gc.sanitizer_counts("Traceback (most recent call last):\n") == (None, False)


# --- the files in $OUT ------------------------------------------------------------------------------


def _written_names() -> set[str]:
    """Every file name the script and its helper write under $OUT, read from their source."""
    script = (TOOLS / "gpu_check.sh").read_text()
    helper = (TOOLS / "gpu_check.py").read_text()
    names = set(re.findall(r'\$OUT/([A-Za-z0-9_.-]+)', script))
    names |= set(re.findall(r'out / "([A-Za-z0-9_.-]+)"', helper))
    return names


def test_every_path_writes_at_most_8_files():
    assert len(gc.OUT_FILES) <= gc.MAX_OUT_FILES == 8
    names = _written_names()
    assert names and names <= set(gc.OUT_FILES), names - set(gc.OUT_FILES)
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", name) for name in names)  # names the lent machine returns


def test_summary_and_report_write_only_their_files(tmp_path):
    out = tmp_path / "out"
    gc.write_summary(fake_work(tmp_path / "work"), out, False, None, 300.0)
    assert gc.bench_report(tmp_path / "work", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "summary.txt"]
    assert "### wanda_mask: 16 SD 1.5 layers, T=51" in (out / "bench.md").read_text()


def test_bench_report_from_partial_lines(tmp_path):
    work = fake_work(tmp_path / "work")
    (work / "bench_mask.json").unlink()
    (work / "bench_capture.json").unlink()
    _lines(work, "bench_mask.jsonl", [_bench("reference", 1, 20.0, 15.0), _bench("cuda", 1, 0.2, 0.1)])
    out = tmp_path / "out"
    out.mkdir()
    gc.bench_report(work, out)
    merged = json.loads((out / "bench.json").read_text())
    assert merged["partial"] and len(merged["benchmarks"]) == 2
    assert (out / "bench.md").read_text().startswith("(partial")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure on a machine without a GPU")
def test_preflight_fails_in_one_line_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "MEMCORE_GPU_CHECK_WORK": str(tmp_path / "work")}
    env.pop("MEMCORE_GPU_CHECK_CPU", None)
    done = subprocess.run(["bash", str(TOOLS / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    output = (done.stdout + done.stderr).strip().splitlines()
    assert len(output) == 1 and output[0].startswith("gpu_check: preflight: "), output
    assert "no CUDA GPU visible" in output[0] or "nvcc not found" in output[0]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) <= gc.MAX_OUT_FILES and set(files) <= set(gc.OUT_FILES)
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert summary[1] == "preflight failed: " + output[0].removeprefix("gpu_check: preflight: ")
    assert [status(line) for line in summary[2:]] == ["NOT-RUN"] * 7


# --- the pieces the phases run ------------------------------------------------------------------------


def test_pytest_plugin_records_a_collection_error(tmp_path):
    (tmp_path / "test_broken.py").write_text("import not_a_module_anywhere\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "GPU_CHECK_TESTS_JSONL": str(work / "tests.jsonl"), "PYTHONPATH": str(TOOLS)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "gpu_pytest_log", "-q", "-p", "no:cacheprovider",
                           "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stdout  # a collection error interrupts the session
    _phase(work, "tests", rc=done.returncode)
    results = gc.load_results(work)
    assert results.tests == [{"nodeid": "test_broken.py", "when": "collect", "outcome": "error"}]
    verdict, text = gc.goal_tests(results)
    assert verdict == "FAIL" and "1 errors" in text and "first: test_broken.py" in text


def test_pytest_plugin_counts_a_full_run(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert False\n"
        "def test_skip(): pytest.skip('no')\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError\n"
        "def test_error(broken): pass\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "GPU_CHECK_TESTS_JSONL": str(work / "tests.jsonl"), "PYTHONPATH": str(TOOLS)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "gpu_pytest_log", "-q", "-p", "no:cacheprovider",
                           "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stdout
    _phase(work, "tests", rc=done.returncode)
    results = gc.load_results(work)
    assert {r["nodeid"].split("::")[-1]: r["outcome"] for r in results.tests} == {
        "test_ok": "passed", "test_bad": "failed", "test_skip": "skipped", "test_error": "error"}
    verdict, text = gc.goal_tests(results)
    assert verdict == "FAIL" and text.startswith("1 passed, 1 failed, 1 errors, 1 skipped (first: ")


def test_sanitize_driver_runs_every_op_on_the_cpu():
    done = subprocess.run([sys.executable, str(TOOLS / "gpu_sanitize.py"), "--device", "cpu", "--backend", "cpu", "--widths", "1,33"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    calls = int(re.search(r"done, (\d+) op calls, 0 mismatches", last).group(1))
    assert calls > 100
    assert gc.sanitizer_counts(done.stdout + "========= ERROR SUMMARY: 0 errors\n") == (0, True)


def test_determinism_on_the_cpu(tmp_path):
    jsonl = tmp_path / "determinism.jsonl"
    assert gc.determinism(str(jsonl), cpu=True, shrink=64) == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 4 * 3 + 1 and all(r["equal"] for r in records)


def test_compare_localize_finds_a_changed_tensor(tmp_path):
    from safetensors.torch import save_file

    def write(path, mask, seconds):
        save_file({"layer": mask}, str(path), metadata={"memcore": json.dumps({"model_id": "tiny", "collect_seconds": seconds})})

    mask = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    write(tmp_path / "a.st", mask, 1.0)
    write(tmp_path / "b.st", mask, 2.0)  # only the collection time differs: the same
    changed = mask.clone()
    changed[1, 2] ^= 1
    write(tmp_path / "c.st", changed, 1.0)
    jsonl = tmp_path / "d.jsonl"
    files = [str(tmp_path / n) for n in ("a.st", "b.st", "a.st", "c.st")]
    assert gc.compare_localize(str(jsonl), "localize tiny", *files) == 1
    first, second = (json.loads(line) for line in jsonl.read_text().splitlines())
    assert first["equal"] and not second["equal"] and "1 of 1 tensors differ (layer)" in second["detail"]
