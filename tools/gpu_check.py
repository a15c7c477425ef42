"""The Python half of tools/gpu_check.sh: preflight checks, determinism checks and the summary.

    python3 tools/gpu_check.py preflight gpu|build [--cpu] [--arch-file FILE] [--info-file FILE]
    python3 tools/gpu_check.py determinism --jsonl FILE [--cpu]
    python3 tools/gpu_check.py localize-twice --jsonl FILE --work DIR -- LOCALIZE_ARGS...
    python3 tools/gpu_check.py compare-localize --jsonl FILE MASK_A MASK_B STATS_A STATS_B
    python3 tools/gpu_check.py bench-report --work DIR --out DIR
    python3 tools/gpu_check.py summary --work DIR --out DIR [--dry-run] [--preflight-error MSG]

The shell script runs each phase under ``timeout`` and leaves what it produced in a work folder
(outside ``$OUT``): one ``phase_<name>.json`` per phase (exit status, limit, seconds, whether it
timed out or was skipped) beside the phase's data, written as it goes so that a phase cut short
keeps its partial results. ``summary`` reads that folder and writes ``summary.txt``: one PASS, FAIL
or NOT-RUN line per goal, each with its measured number. A goal whose data is incomplete (phase
timed out, skipped or missing) is NOT-RUN with whatever partial number there is, unless the partial
data already fail it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's memcore, whatever else is installed

# Everything the script may leave in $OUT (the lent machine returns at most 8 files).
OUT_FILES = (
    "summary.txt",  # one line per goal
    "env.txt",  # device, driver, versions, build
    "run.log",  # everything the script printed
    "tests.log",  # the pytest runs
    "sanitize.log",  # compute-sanitizer, one section per tool
    "bench.json",  # pytest-benchmark JSON of the mask and capture benchmarks
    "bench.md",  # the same as tables (tests/bench/summarize.py)
    "localize.log",  # determinism and model-family localize runs
)
MAX_OUT_FILES = 8

SPEEDUP_GOAL = 50.0  # mask at least this many times faster than the reference
FLOOR_GOAL = 5.0  # mask kernels within this factor of the copy of the same bytes
OVERHEAD_GOAL = 3.0  # capture overhead in percent
MASK_TS = (1, 10, 51)
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
TEST_PHASES = ("tests",)
FAMILIES = ("tiny", "tiny-sd2", "tiny-sdxl", "tiny-pixart", "tiny-sd3")
SANITIZE_DONE = "gpu_sanitize: done"

GOALS = (
    ("speedup", f"mask >= {SPEEDUP_GOAL:g}x faster than the reference"),
    ("floor", f"mask within {FLOOR_GOAL:g}x of the copy floor"),
    ("capture", f"capture overhead <= {OVERHEAD_GOAL:g}%"),
    ("determinism", "deterministic"),
    ("sanitizer", "sanitizer clean"),
    ("tests", "tests pass"),
    ("families", "families run"),
)
PASS, FAIL, NOT_RUN = "PASS", "FAIL", "NOT-RUN"


def fail_line(message: str) -> int:
    print(f"gpu_check: preflight: {message}", file=sys.stderr, flush=True)
    return 1


# --- preflight ----------------------------------------------------------------------------------


def preflight_gpu(cpu: bool, arch_file: str | None, info_file: str | None) -> int:
    """Before the build, cheapest first: nvcc found, a CUDA GPU visible, diffusers importable."""
    if not cpu and shutil.which("nvcc") is None:
        return fail_line("nvcc not found on PATH or in /usr/local/cuda/bin: the build would have no CUDA kernels")
    import torch

    if not cpu and not torch.cuda.is_available():
        return fail_line(f"no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda}: torch.cuda.is_available() is False)")
    try:
        import diffusers  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is the one-line answer
        return fail_line(f"diffusers is not importable ({type(exc).__name__}: {exc}); carry its wheels in .whl/ (docs/benchmarks.md, GPU check)")
    if cpu:
        info = f"cpu (dry run), torch {torch.__version__}"
    else:
        major, minor = torch.cuda.get_device_capability(0)
        info = f"{torch.cuda.get_device_name(0)}, compute capability {major}.{minor}, torch {torch.__version__}"
        if arch_file:
            Path(arch_file).write_text(f"{major}{minor}\n", encoding="utf-8")
        print(f"gpu_check: {info}", flush=True)
    if info_file:
        Path(info_file).write_text(info + "\n", encoding="utf-8")
    return 0


def preflight_build(cpu: bool) -> int:
    """After the build: memcore._C loads, has CUDA kernels, and the dispatcher picks them."""
    import torch

    from memcore.ops import _backend
    from memcore.ops._ext import extension, extension_error

    if extension() is None:
        return fail_line(f"memcore._C did not load: {extension_error()}")
    if not cpu and not extension().compiled_with_cuda():
        return fail_line("memcore._C was compiled without CUDA (compiled_with_cuda() is False): the build found no nvcc")
    device, want = (torch.device("cpu"), "cpu") if cpu else (torch.device("cuda"), "cuda")
    for op in ("sqnorm_accumulate", "geglu_accumulate", "wanda_mask"):
        try:
            chosen = _backend.chosen_backend(op, device)
        except Exception as exc:  # noqa: BLE001 - e.g. MEMCORE_BACKEND naming a backend that cannot run
            return fail_line(f"backend selection for {op} on {device.type} tensors failed: {exc}")
        if chosen != want:
            from memcore.ops import _ext

            status = getattr(_ext, "cuda_backend_status", lambda: "")()  # the device probe, where there is one
            return fail_line(
                f"backend {chosen!r}, not {want!r}, is chosen for {op} on {device.type} tensors "
                f"(MEMCORE_BACKEND={os.environ.get('MEMCORE_BACKEND', '')!r}{'; cuda: ' + status if status else ''})"
            )
    return 0


# --- determinism ----------------------------------------------------------------------------------

# (rows = guidance batch 2 x tokens at 512 px, inner width) of the SD 1.5 feed-forward layers
STAT_SHAPES = ((2 * 4096, 1280), (2 * 1024, 2560), (2 * 256, 5120), (2 * 64, 5120))
SD15_LAYERS = [(320, 1280)] * 2 + [(640, 2560)] * 2 + [(1280, 5120)] * 6 + [(640, 2560)] * 3 + [(320, 1280)] * 3


def _same_bits(a, b) -> bool:
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _diff(a, b) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
    if a.dtype.is_floating_point:
        differ = int((a != b).sum())
        return f"{differ} of {a.numel()} values differ, max |a - b| = {float((a.double() - b.double()).abs().max()):.3g}"
    return f"{int((a != b).sum())} of {a.numel()} bytes differ"


def _emit(jsonl: str, check: str, equal: bool, detail: str) -> None:
    with open(jsonl, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"check": check, "equal": equal, "detail": detail}) + "\n")
    print(f"gpu_check: determinism: {'same' if equal else 'DIFFERENT'}: {check}{'' if equal else ': ' + detail}", flush=True)


def determinism(jsonl: str, cpu: bool, shrink: int = 16) -> int:
    """Each op twice on the same SD 1.5-sized random inputs, per native backend; bytes compared.

    On the CPU (``cpu``: a dry run) the shapes are divided by ``shrink``.
    """
    import torch

    from memcore.ops import _backend, geglu_accumulate, sqnorm_accumulate, use_backend, wanda_mask

    device = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.float16
    stat_shapes = [(max(2, rows // shrink), max(1, inner // shrink)) for rows, inner in STAT_SHAPES] if cpu else STAT_SHAPES
    layers = [(max(1, out // shrink), max(1, cols // shrink)) for out, cols in SD15_LAYERS] if cpu else SD15_LAYERS
    available = _backend.available_backends("wanda_mask", device)
    backends = [name for name in (("cpu",) if cpu else ("cuda", "triton")) if name in available]
    generator = torch.Generator(device=device).manual_seed(0)
    equal_all = True
    for backend in backends:
        with use_backend(backend):
            for rows, inner in stat_shapes:
                x = torch.randn(rows, inner, device=device, generator=generator).to(dtype)
                accs = []
                for _ in range(2):
                    acc = torch.zeros(inner, device=device)
                    sqnorm_accumulate(x, acc, rows // 2, None, True)  # the cond half, as --rows cond
                    sqnorm_accumulate(x, acc, 0, rows // 2, True)
                    accs.append(acc)
                same = _same_bits(*accs)
                equal_all &= same
                _emit(jsonl, f"sqnorm_accumulate {backend} {rows}x{inner} {str(dtype)[6:]}", same, _diff(*accs))
                p = torch.randn(rows, 2 * inner, device=device, generator=generator).to(dtype)
                outs = []
                for _ in range(2):
                    acc = torch.zeros(inner, device=device)
                    outs.append((geglu_accumulate(p, acc, 0, None, True), acc))
                same_x, same_acc = _same_bits(outs[0][0], outs[1][0]), _same_bits(outs[0][1], outs[1][1])
                equal_all &= same_x and same_acc
                check = f"geglu_accumulate {backend} {rows}x{2 * inner} {str(dtype)[6:]}"
                _emit(jsonl, check + " (X)", same_x, _diff(outs[0][0], outs[1][0]))
                _emit(jsonl, check + " (statistic)", same_acc, _diff(outs[0][1], outs[1][1]))
            masks = []
            for _ in range(2):
                gen = torch.Generator(device=device).manual_seed(1)
                run = []
                for out, cols in layers:
                    w = torch.randn(out, cols, device=device, generator=gen).to(dtype)
                    norms = torch.rand(10, cols, device=device, generator=gen)
                    null = torch.rand(10, cols, device=device, generator=gen)
                    run.append(wanda_mask(w, norms, null, math.floor(0.01 * cols)))
                masks.append(torch.cat([m.flatten() for m in run]))
            same = _same_bits(*masks)
            equal_all &= same
            _emit(jsonl, f"wanda_mask {backend} 16 SD 1.5 layers T=10", same, _diff(*masks))
    if not backends:
        _emit(jsonl, f"native backends on {device.type}", False, "none available")
        return 1
    return 0 if equal_all else 1


def compare_localize(jsonl: str, label: str, mask_a: str, mask_b: str, stats_a: str, stats_b: str) -> int:
    """Two localize outputs: every tensor byte for byte, metadata except the collection time."""
    from safetensors import safe_open

    ok = True
    for kind, a, b in (("mask", mask_a, mask_b), ("statistics", stats_a, stats_b)):
        if not (Path(a).exists() and Path(b).exists()):
            _emit(jsonl, f"{label} {kind} file", False, f"missing: {a if not Path(a).exists() else b}")
            ok = False
            continue
        with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
            meta_a, meta_b = (json.loads(f.metadata().get("memcore", "{}")) for f in (fa, fb))
            for meta in (meta_a, meta_b):
                meta.pop("collect_seconds", None)
            differ = [k for k in sorted(set(fa.keys()) | set(fb.keys())) if k not in fa.keys() or k not in fb.keys() or not _same_bits(fa.get_tensor(k), fb.get_tensor(k))]
            meta_differ = sorted(k for k in set(meta_a) | set(meta_b) if meta_a.get(k) != meta_b.get(k))
            count = len(list(fa.keys()))
        same = not differ and not meta_differ
        ok &= same
        detail = f"{len(differ)} of {count} tensors differ ({', '.join(differ[:3])}); metadata keys differ: {meta_differ}"
        _emit(jsonl, f"{label} {kind} file ({count} tensors)", same, detail)
    return 0 if ok else 1


def localize_twice(jsonl: str, work: Path, localize_args: list[str]) -> int:
    """``memcore localize`` twice at once with the same arguments, then :func:`compare_localize`."""
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for run in ("a", "b"):
        argv = [sys.executable, "-m", "memcore", "localize", *localize_args]
        argv += ["--out", str(work / f"mask_{run}.safetensors"), "--stats-out", str(work / f"stats_{run}.safetensors")]
        print("gpu_check: " + " ".join(argv), flush=True)
        runs.append(subprocess.Popen(argv, cwd=ROOT))
    codes = [r.wait() for r in runs]
    if any(codes):
        _emit(jsonl, "localize twice", False, f"memcore localize exit statuses {codes}")
        return 1
    def value(flag: str) -> str:
        return localize_args[localize_args.index(flag) + 1] if flag in localize_args[:-1] else "default"

    label = f"localize {value('--model')} ({value('--device')}, {value('--dtype')})"
    files = [str(work / f"{kind}_{run}.safetensors") for kind in ("mask", "stats") for run in ("a", "b")]
    return compare_localize(jsonl, label, *files)


# --- loading what the phases left ---------------------------------------------------------------


@dataclass
class Results:
    """What the phases left in the work folder (see :func:`load_results`)."""

    phases: dict = field(default_factory=dict)  # name -> {"rc", "limit", "seconds", "timed_out", "skipped"}
    tests: list = field(default_factory=list)  # tools/gpu_pytest_log.py records
    sanitizer: dict = field(default_factory=dict)  # tool -> log text
    determinism: list = field(default_factory=list)  # {"check", "equal", "detail"}
    bench: list = field(default_factory=list)  # pytest-benchmark entries (stats, extra_info)
    families: tuple = FAMILIES
    subject: str = "cuda"  # the backend whose numbers the goals judge
    dry_run: bool = False
    preflight_error: str | None = None
    device: str = "?"


def _read_jsonl(path: Path) -> list:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut off by a kill
    return records


def bench_entries(work: Path, phase: str) -> list:
    """A bench phase's entries: its pytest-benchmark JSON, else the lines it appended as it went."""
    full = work / f"bench_{phase}.json"
    if full.exists():
        try:
            return json.loads(full.read_text(encoding="utf-8"))["benchmarks"]
        except (json.JSONDecodeError, KeyError):
            pass
    return _read_jsonl(work / f"bench_{phase}.jsonl")


def load_results(work: Path, dry_run: bool = False, preflight_error: str | None = None) -> Results:
    results = Results(dry_run=dry_run, preflight_error=preflight_error, subject="cpu" if dry_run else "cuda")
    for path in sorted(work.glob("phase_*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        results.phases[record["name"]] = record
    results.tests = _read_jsonl(work / "tests.jsonl")
    for tool in SANITIZER_TOOLS:
        log = work / f"sanitize_{tool}.log"
        if log.exists():
            results.sanitizer[tool] = log.read_text(encoding="utf-8", errors="replace")
    results.determinism = _read_jsonl(work / "determinism.jsonl")
    results.bench = bench_entries(work, "mask") + bench_entries(work, "capture")
    families = work / "families.txt"
    if families.exists():
        results.families = tuple(families.read_text(encoding="utf-8").split())
    device = work / "device.txt"
    if device.exists():
        results.device = device.read_text(encoding="utf-8").strip() or "?"
    return results


# --- the goals ------------------------------------------------------------------------------------


def _phase_note(results: Results, names) -> tuple[bool, str]:
    """(complete, note): whether every named phase ran to its end, and why not."""
    notes = []
    for name in names:
        phase = results.phases.get(name)
        if phase is None:
            notes.append(f"{name} did not run")
        elif phase.get("skipped"):
            notes.append(f"{name} skipped: {phase['skipped']}")
        elif phase.get("timed_out"):
            notes.append(f"{name} timed out after {phase.get('limit')} s")
    return not notes, "; ".join(notes)


def _verdict(failed: bool, complete: bool, passed: bool) -> str:
    if failed:
        return FAIL
    if not complete:
        return NOT_RUN
    return PASS if passed else FAIL


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def goal_tests(results: Results) -> tuple[str, str]:
    final: dict[str, str] = {}
    rank = {"error": 4, "failed": 3, "passed": 2, "xfailed": 2, "xpassed": 2, "skipped": 1}
    for record in results.tests:
        node, outcome = record.get("nodeid", "?"), record.get("outcome", "?")
        if rank.get(outcome, 0) >= rank.get(final.get(node, ""), 0):
            final[node] = outcome
    counts = {k: sum(1 for o in final.values() if o == k) for k in ("passed", "failed", "error", "skipped")}
    counts["passed"] += sum(1 for o in final.values() if o in ("xfailed", "xpassed"))
    bad = [node for node, o in final.items() if o in ("failed", "error")]
    complete, note = _phase_note(results, TEST_PHASES)
    for name in TEST_PHASES:  # pytest itself broke (internal error, usage error, nothing collected)
        phase = results.phases.get(name, {})
        if complete and phase.get("rc") not in (0, 1):
            complete, note = False, _join(note, f"{name} ended with pytest exit status {phase.get('rc')}")
    number = f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, {counts['skipped']} skipped"
    status = _verdict(bool(bad), complete, counts["passed"] > 0)
    first = f"first: {bad[0]}" if bad else "no test passed" if status == FAIL else ""
    detail = _join(first, (f"partial: {note}" if final else note) if note else "")
    return status, number + (f" ({detail})" if detail else "")


_SAN_ERRORS = re.compile(r"ERROR SUMMARY: (\d+) errors?")
_RACE_ERRORS = re.compile(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)")


def sanitizer_counts(log: str) -> tuple[int | None, bool]:
    """(errors reported, or None when no summary line; whether the driver ran to its end)."""
    found = [int(m) for m in _SAN_ERRORS.findall(log)] + [int(e) for e, _ in _RACE_ERRORS.findall(log)]
    return (max(found) if found else None), SANITIZE_DONE in log


def goal_sanitizer(results: Results) -> tuple[str, str]:
    parts, failed, complete, total = [], False, True, 0
    for tool in SANITIZER_TOOLS:
        phase = results.phases.get(f"sanitize_{tool}")
        errors, done = sanitizer_counts(results.sanitizer.get(tool, ""))
        if errors:
            failed = True
            total += errors
            parts.append(f"{tool} {errors} errors")
        elif phase is None or phase.get("skipped"):
            complete = False
            parts.append(f"{tool} not run" + (f" ({phase['skipped']})" if phase else ""))
        elif errors == 0 and done:
            parts.append(f"{tool} 0")
        else:
            complete = False
            why = f"timed out after {phase.get('limit')} s" if phase.get("timed_out") else f"exit status {phase.get('rc')}"
            parts.append(f"{tool} incomplete ({why}{'' if errors is None else ', 0 errors so far'})")
    number = f"{total} errors" if complete or failed else "incomplete"
    return _verdict(failed, complete, True), f"{number} ({', '.join(parts)})"


def goal_determinism(results: Results) -> tuple[str, str]:
    records = results.determinism
    different = [r["check"] for r in records if not r.get("equal")]
    complete, note = _phase_note(results, ("determinism_ops", "determinism_localize"))
    number = f"{len(records) - len(different)}/{len(records)} byte-identical"
    detail = _join(f"different: {', '.join(different[:4])}" if different else "", note)
    return _verdict(bool(different), complete and bool(records), True), f"{number}" + (f" ({detail})" if detail else "")


def _mask_entries(results: Results) -> dict[tuple[str, int], dict]:
    out = {}
    for bench in results.bench:
        info = bench.get("extra_info", {})
        if info.get("op") == "wanda_mask" and "T" in info:
            out[(info.get("provider"), int(info["T"]))] = bench
    return out


def goal_speedup(results: Results) -> tuple[str, str]:
    entries, subject = _mask_entries(results), results.subject
    ratios, parts = {}, []
    for t in MASK_TS:
        ref, sub = entries.get(("reference", t)), entries.get((subject, t))
        if ref and sub:
            ratios[t] = ref["stats"]["median"] / sub["stats"]["median"]
            parts.append(f"T={t} {ratios[t]:.1f}x ({1e3 * sub['stats']['median']:.3g} ms vs {1e3 * ref['stats']['median']:.3g} ms)")
        else:
            parts.append(f"T={t} missing")
    complete = len(ratios) == len(MASK_TS)  # all numbers there: a late timeout does not matter
    note = _phase_note(results, ("bench_mask",))[1]
    if not ratios:
        return NOT_RUN, _join(f"no {subject} and reference numbers", note)
    worst = min(ratios.values())
    failed = worst < SPEEDUP_GOAL
    text = f"{worst:.1f}x at worst ({subject} vs reference, end-to-end medians: {', '.join(parts)}"
    return _verdict(failed, complete, True), text + (f"; {note}" if note and not complete else "") + ")"


def goal_floor(results: Results) -> tuple[str, str]:
    entries, subject = _mask_entries(results), results.subject
    ratios, parts, method = {}, [], ""
    for t in MASK_TS:
        sub, copy = entries.get((subject, t)), entries.get(("copy", t))
        kernel = sub and sub.get("extra_info", {}).get("kernel_ms")
        floor = copy and copy.get("extra_info", {}).get("kernel_ms")
        if kernel and floor:
            ratios[t] = kernel / floor
            method = sub["extra_info"].get("kernel_method", "")
            parts.append(f"T={t} {ratios[t]:.2f}x ({kernel:.3g} ms vs {floor:.3g} ms)")
        else:
            parts.append(f"T={t} missing")
    complete, note = len(ratios) == len(MASK_TS), _phase_note(results, ("bench_mask",))[1]
    if not ratios:
        return NOT_RUN, _join(f"no device-only {subject} and copy times", note)
    worst = max(ratios.values())
    text = f"{worst:.2f}x at worst ({subject} vs copy of the same bytes, device-only [{method}]: {', '.join(parts)}"
    return _verdict(worst > FLOOR_GOAL, complete, True), text + (f"; {note}" if note and not complete else "") + ")"


def goal_capture(results: Results) -> tuple[str, str]:
    entry = next((b for b in results.bench if str(b.get("extra_info", {}).get("op", "")).startswith("capture (interleaved")), None)
    if entry is None:
        return NOT_RUN, _join("no interleaved capture measurement", _phase_note(results, ("bench_capture",))[1])
    info = entry["extra_info"]
    pct = info["event_overhead_pct"]
    provider = info.get("provider", "?")
    detail = (
        f"{provider} statistics, {info.get('calls')} UNet calls at {info.get('pixels')} px, batch {info.get('batch')}, "
        f"{info.get('dtype')}: {info.get('event_capture_ms')} ms vs {info.get('event_baseline_ms')} ms, "
        f"median of {info.get('event_rounds')} paired rounds, {info.get('timer')}"
    )
    others = [
        f"{b['extra_info'].get('provider')} {b['extra_info']['overhead_pct']:+.1f}%"
        for b in results.bench
        if "overhead_pct" in b.get("extra_info", {})
    ]
    if others:
        detail += f"; pytest-benchmark medians: {', '.join(others)}"
    if provider != results.subject:
        detail += f"; note: the dispatcher chose {provider}, not {results.subject}"
    return _verdict(pct > OVERHEAD_GOAL, True, True), f"{pct:+.2f}% ({detail})"


def goal_families(results: Results) -> tuple[str, str]:
    ran, failed, missing = [], [], []
    for model in results.families:
        phase = results.phases.get(f"family_{model}")
        if phase is None or phase.get("skipped"):
            missing.append(f"{model} not run" + (f" ({phase['skipped']})" if phase else ""))
        elif phase.get("timed_out"):
            missing.append(f"{model} timed out after {phase.get('limit')} s")
        elif phase.get("rc") != 0:
            failed.append(f"{model} exit status {phase.get('rc')}")
        else:
            ran.append(f"{model} {phase.get('seconds')} s")
    number = f"{len(ran)}/{len(results.families)} ran"
    detail = ", ".join(failed + missing + ran)
    return _verdict(bool(failed), not missing, True), f"{number} ({detail})"


EVALUATORS = {
    "speedup": goal_speedup,
    "floor": goal_floor,
    "capture": goal_capture,
    "determinism": goal_determinism,
    "sanitizer": goal_sanitizer,
    "tests": goal_tests,
    "families": goal_families,
}


def goal_lines(results: Results) -> list[str]:
    """One ``STATUS  goal: number (detail)`` line per goal, in GOALS order."""
    lines = []
    for key, goal in GOALS:
        if results.preflight_error:
            status, text = NOT_RUN, "preflight failed"
        else:
            try:
                status, text = EVALUATORS[key](results)
            except Exception as exc:  # noqa: BLE001 - a malformed record must not hide the other goals
                status, text = NOT_RUN, f"could not evaluate: {type(exc).__name__}: {exc}"
        lines.append(f"{status:<8}{goal}: {text}")
    return lines


def summary_text(results: Results, seconds: float | None = None) -> str:
    head = [f"memcore GPU check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {results.device}"]
    if seconds is not None:
        head[0] += f", {seconds:.0f} s"
    if results.dry_run:
        head.append("DRY RUN on the CPU (MEMCORE_GPU_CHECK_CPU=1): the goals judge the cpu backend at toy sizes; these numbers say nothing about a GPU")
    if results.preflight_error:
        head.append(f"preflight failed: {results.preflight_error}")
    return "\n".join(head + goal_lines(results)) + "\n"


def write_summary(work: Path, out: Path, dry_run: bool, preflight_error: str | None, seconds: float | None) -> str:
    results = load_results(work, dry_run, preflight_error)
    text = summary_text(results, seconds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text(text, encoding="utf-8")
    return text


# --- benchmark report ---------------------------------------------------------------------------


def bench_report(work: Path, out: Path) -> int:
    """bench.json (the mask and capture runs in one pytest-benchmark document, or their partial
    lines) and bench.md (tests/bench/summarize.py's tables)."""
    documents = []
    for phase in ("mask", "capture"):
        full = work / f"bench_{phase}.json"
        try:
            documents.append(json.loads(full.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            partial = _read_jsonl(work / f"bench_{phase}.jsonl")
            if partial:
                documents.append({"partial": True, "benchmarks": partial})
    if not documents:
        return 0
    merged = {k: v for k, v in documents[0].items() if k != "benchmarks"}
    merged["benchmarks"] = [b for d in documents for b in d["benchmarks"]]
    merged["partial"] = any(d.get("partial") for d in documents)
    (out / "bench.json").write_text(json.dumps(merged, indent=1), encoding="utf-8")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "bench"))
    from summarize import summarize

    text = summarize(merged)
    if merged["partial"]:
        text = "(partial: a benchmark phase was cut short; these are the benchmarks it finished)\n\n" + text
    (out / "bench.md").write_text(text, encoding="utf-8")
    return 0


# --- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preflight")
    p.add_argument("stage", choices=["gpu", "build"])
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--arch-file")
    p.add_argument("--info-file")
    p = sub.add_parser("determinism")
    p.add_argument("--jsonl", required=True)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--shrink", type=int, default=16, help="on the CPU, divide the SD 1.5 shapes by this")
    p = sub.add_parser("localize-twice")
    p.add_argument("--jsonl", required=True)
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("localize_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("compare-localize")
    p.add_argument("--jsonl", required=True)
    p.add_argument("--label", default="localize tiny")
    p.add_argument("files", nargs=4, metavar="FILE")
    p = sub.add_parser("bench-report")
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p = sub.add_parser("summary")
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--preflight-error")
    p.add_argument("--seconds", type=float)
    args = parser.parse_args(argv)
    if args.command == "preflight":
        return preflight_gpu(args.cpu, args.arch_file, args.info_file) if args.stage == "gpu" else preflight_build(args.cpu)
    if args.command == "determinism":
        return determinism(args.jsonl, args.cpu, args.shrink)
    if args.command == "localize-twice":
        rest = args.localize_args[1:] if args.localize_args[:1] == ["--"] else args.localize_args
        return localize_twice(args.jsonl, args.work, rest)
    if args.command == "compare-localize":
        return compare_localize(args.jsonl, args.label, *args.files)
    if args.command == "bench-report":
        return bench_report(args.work, args.out)
    text = write_summary(args.work, args.out, args.dry_run, args.preflight_error, args.seconds)
    print(text, end="")
    return 0 if all(line.startswith(PASS) for line in text.splitlines() if line.startswith((PASS, FAIL, NOT_RUN))) else 1


if __name__ == "__main__":
    sys.exit(main())
