"""Benchmark of ``torchrun``: images (or scored prompts) per second of whole ``memcore`` commands, one
process against ``torchrun --standalone --nproc-per-node 2``.

Each round launches the command as a subprocess, as a user would, so the time includes Python's
start, the imports and the model load of every process, and process 0 writing the gathered results.
The tiny model on the CPU (float32): ``generate`` makes the 10 prompts of ``memorize_0`` under 8
seeds (80 images, batch 5: 16 pipeline calls, 8 per process) at 128 px and 4 steps; ``detect``
scores the same prompts with 8 seeds, 2 denoiser calls each (16 calls of 5 prompts).

Three launches per command: one process with ``OMP_NUM_THREADS=1`` (the same threads per process
as under torchrun, and the same bytes), two processes under torchrun with ``OMP_NUM_THREADS=1``
each, and one process with ``OMP_NUM_THREADS=2`` (the fair single-process baseline on two cores).
``speedup_vs_*`` in the torchrun row's extra_info is a baseline's median over torchrun's. The
torchrun row also checks that its files are those of the one-process, one-thread run.

    pytest tests/bench/test_bench_processes.py --benchmark-only
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchutil import SMOKE, record


ROOT = Path(__file__).resolve().parents[2]
PROMPTS, SEEDS, BATCH = "memorize_0", "0-7", 5
SIZE, STEPS = (64, 2) if SMOKE else (128, 4)
ROUNDS = 1 if SMOKE else 3
COMMON = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--prompts", PROMPTS, "--seeds", SEEDS,
          "--batch-size", str(BATCH), "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE)]
COMMANDS = {
    "generate": (["generate", *COMMON], 10 * 8, "images"),
    "detect": (["detect", *COMMON, "--timesteps", "2"], 10 * 8, "prompt-seeds"),
}
# (name, processes, OMP_NUM_THREADS per process); baselines first, so that the torchrun row finds them
LAUNCHES = [("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("torchrun 2 processes, 1 thread", 2, 1)]
_medians: dict[tuple[str, str], float] = {}


def _argv(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "memcore"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "memcore"]


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "summary.json"}  # detect's summary records its seconds


@pytest.mark.parametrize("launch", LAUNCHES, ids=[name for name, _, _ in LAUNCHES])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_processes(benchmark, tmp_path_factory, command, launch):
    name, processes, threads = launch
    args, units, unit = COMMANDS[command]
    base = tmp_path_factory.getbasetemp() / "processes"
    base.mkdir(exist_ok=True)
    out = base / f"{command}-{processes}p-{threads}t"
    argv = _argv(processes) + args + ["--out", str(out)]
    env = _env(threads)
    benchmark.group = f"processes: memcore {command}, tiny model, {SIZE} px, {STEPS} steps, {units} {unit}"

    def clear() -> None:
        shutil.rmtree(out, ignore_errors=True)

    def run() -> None:
        done = subprocess.run(argv, cwd=base, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]

    benchmark.pedantic(run, setup=clear, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median if benchmark.stats is not None else float("nan")
    _medians[command, name] = median
    record(benchmark, device="cpu", op=f"memcore {command}", provider=name, processes=processes,
           omp_num_threads=threads, units=units, unit=unit, per_second=round(units / median, 2))
    if processes > 1:
        for baseline, _, base_threads in LAUNCHES[:2]:
            if (command, baseline) in _medians:
                benchmark.extra_info[f"speedup_vs_{base_threads}_thread"] = round(_medians[command, baseline] / median, 2)
        single = base / f"{command}-1p-1t"
        if single.is_dir():  # same threads per process: the same bytes as one process
            assert _files(out) == _files(single)
