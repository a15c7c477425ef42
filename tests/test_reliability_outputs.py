"""Outputs are checked before any work, a second writer is refused at once, and signals leave nothing.

Library-level tests of memcore.io first, then the command line as a careless user drives it: paths
that can never be written (refused before the model loads), symbolic links, an output that is an
input, a run already writing the same output, and SIGTERM / SIGINT / SIGHUP in the middle of a save
(in a subprocess, deterministically: the save step sends the signal itself).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import listing, run_cli, user_error
from test_analysis import A, B, make_mask

from memcore import io
from memcore.errors import MemcoreError

FAST = ["--timesteps", "2", "--height", "64", "--width", "64", "--sparsity", "0.05"]
READ_ONLY = Path("/sys")  # sysfs refuses new files even to root; os.access would say yes
LONG = "m" * 250 + ".safetensors"  # 262 bytes: over the usual limit of 255
FITS = "m" * 240 + ".safetensors"  # 252 bytes: fits, but ".NAME.XXXXXXXX.tmp" would not


def leftovers(folder) -> list[str]:
    """Temporary and lock files under ``folder``."""
    return sorted(p for p in listing(folder) if p.endswith((".tmp", ".lock")) or ".tmp/" in p)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A prompt file, statistics of tau = 2 on the tiny model and their mask (with per-step data)."""
    from memcore.config import LocalizeConfig
    from memcore.mask import compute_mask
    from memcore.models import load_pipeline
    from memcore.stats import collect_stats

    folder = tmp_path_factory.mktemp("saved")
    (folder / "prompts.txt").write_text("a painting of a fox\nthe great wave, print\n")
    pipe = load_pipeline("tiny", device="cpu", dtype="float32")
    stats = collect_stats(pipe, ["a painting of a fox", "the great wave"], LocalizeConfig(timesteps=2, height=64, width=64, progress=False))
    stats.save(folder / "stats.safetensors")
    compute_mask(pipe, stats, sparsity=0.05, per_step=True).save(folder / "mask.safetensors")
    from PIL import Image  # an image folder for finetune

    (folder / "images").mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "images" / "red.png")
    (folder / "images" / "metadata.jsonl").write_text('{"file_name": "red.png", "text": "a red square"}\n')
    return folder


# ---------------------------------------------------------------------------------------------
# names


def test_temporary_and_lock_names_fit_the_name_limit(tmp_path):
    limit = io.name_max(tmp_path)
    for name in (FITS, "é" * 126 + ".x", "short.safetensors"):
        path = tmp_path / name
        prefix, suffix = io.temp_affixes(path)
        assert len(os.fsencode(prefix + "X" * 8 + suffix)) <= limit
        prefix.encode()  # cut at a character boundary: still valid text
        assert len(os.fsencode(io.lock_path(path).name)) <= limit
    assert io.temp_affixes(tmp_path / "m.safetensors") == (".m.safetensors.", ".tmp")  # short names unchanged
    assert io.lock_path(tmp_path / "m.safetensors") == tmp_path / ".m.safetensors.lock"
    # two long names that share their first 240 bytes keep distinct lock files
    assert io.lock_path(tmp_path / (FITS + "a")) != io.lock_path(tmp_path / (FITS + "b"))


def test_a_name_that_fits_is_written_through_a_shortened_temporary(tmp_path):
    with io.claimed_outputs():
        io.check_output_file(tmp_path / FITS, "out")
        with io.atomic_file(tmp_path / FITS) as tmp:
            assert len(os.fsencode(tmp.name)) <= io.name_max(tmp_path) < len(os.fsencode("." + FITS + ".12345678.tmp"))
            tmp.write_text("done")
    assert (tmp_path / FITS).read_text() == "done" and listing(tmp_path) == {FITS}


def test_a_name_over_the_limit_is_one_error(tmp_path):
    for check in (io.check_output_file, io.check_output_dir, io.check_output_folder):
        with pytest.raises(MemcoreError, match=r"^out .*: the name m+\.\.\. is 262 bytes long; this file system allows 255$"):
            check(tmp_path / LONG, "out")
    with pytest.raises(MemcoreError, match="262 bytes long"):
        with io.atomic_file(tmp_path / LONG):
            pass
    assert listing(tmp_path) == set()


# ---------------------------------------------------------------------------------------------
# checks


def test_an_unwritable_folder_is_found_by_creating_the_temporary(tmp_path):
    if os.geteuid() == 0:
        assert os.access(READ_ONLY, os.W_OK)  # what os.access says to root; the probe knows better
    for check in (io.check_output_file, io.check_output_dir, io.check_output_folder):
        with pytest.raises(MemcoreError, match=r"^out /sys/m: cannot write in folder /sys \(.+\)$"):
            check(READ_ONLY / "m", "out")
    with pytest.raises(MemcoreError, match=r"^/sys/m: cannot write in folder /sys"):
        with io.atomic_file(READ_ONLY / "m"):
            pass


def test_an_unwritable_folder_when_writing_is_one_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(io.tempfile, "mkdtemp", refuse)
    with pytest.raises(MemcoreError, match=r"cannot write in folder .* \(Permission denied\)$"):
        io.check_output_file(tmp_path / "m", "out")
    with pytest.raises(MemcoreError, match=r"cannot write in folder .* \(Permission denied\)$"):
        with io.atomic_dir(tmp_path / "d"):
            pass
    assert listing(tmp_path) == set()


def test_other_outputs_that_cannot_be(tmp_path):
    with pytest.raises(MemcoreError, match=r"^out /dev/null: exists and is not a regular file$"):
        io.check_output_file("/dev/null", "out")
    with pytest.raises(MemcoreError, match=r"folder .*/no does not exist$"):
        io.check_output_file(tmp_path / "no" / "m", "out")
    (tmp_path / "file").write_text("")
    with pytest.raises(MemcoreError, match=r"/file is not a folder$"):
        io.check_output_file(tmp_path / "file" / "m", "out")
    with pytest.raises(MemcoreError, match=r"/file is not a folder$"):
        io.check_output_folder(tmp_path / "file" / "a" / "b", "out")
    with pytest.raises(MemcoreError, match="already exists; choose a new folder"):
        io.check_output_dir(tmp_path / "file", "out")


def test_symbolic_links(tmp_path):
    target = tmp_path / "target.safetensors"
    target.write_text("old")
    (tmp_path / "link").symlink_to(target)
    # a link to a file writes its target, as open() would, and stays a link
    assert io.check_output_file(tmp_path / "link", "out") == tmp_path / "link"
    with io.atomic_file(tmp_path / "link") as tmp:
        assert tmp.parent == tmp_path
        tmp.write_text("new")
    assert (tmp_path / "link").is_symlink() and target.read_text() == "new"

    # dangling: followed when the target's folder exists, refused clearly otherwise
    (tmp_path / "dangling").symlink_to(tmp_path / "made.safetensors")
    with io.atomic_file(tmp_path / "dangling") as tmp:
        tmp.write_text("made")
    assert (tmp_path / "made.safetensors").read_text() == "made"
    (tmp_path / "nowhere").symlink_to("/nonexistent/folder/m.safetensors")
    for check in (io.check_output_file, io.check_output_dir, io.check_output_folder):
        with pytest.raises(MemcoreError, match=(
            r"^out .*/nowhere: is a dangling symbolic link to /nonexistent/folder/m.safetensors, whose folder does not exist$"
        )):
            check(tmp_path / "nowhere", "out")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(MemcoreError, match="symbolic link loop"):
        io.check_output_file(tmp_path / "loop", "out")
    # a folder through a dangling link is created at the target
    (tmp_path / "dirlink").symlink_to(tmp_path / "real_dir")
    io.check_output_dir(tmp_path / "dirlink", "out")
    with io.atomic_dir(tmp_path / "dirlink") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "real_dir" / "f").read_text() == "x" and (tmp_path / "dirlink").is_symlink()
    assert leftovers(tmp_path) == []


def test_check_distinct(tmp_path):
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "in_link").symlink_to(tmp_path / "in.txt")
    os.link(tmp_path / "in.txt", tmp_path / "hard")
    with pytest.raises(MemcoreError, match=r"^stats_out: must be another file than out$"):
        io.check_distinct([("out", tmp_path / "a"), ("stats_out", tmp_path / "." / "a")])
    with pytest.raises(MemcoreError, match=r"^stats_out: must be another folder than out$"):
        io.check_distinct([("out", tmp_path / "a"), ("stats_out", tmp_path / "x" / ".." / "a")], what="folder")
    for out in ("in.txt", "in_link", "hard"):
        with pytest.raises(MemcoreError, match=rf"^out .*/{out}: is also the input prompts \(writing would replace it\)"):
            io.check_distinct([("out", tmp_path / out)], [("prompts", "sdv1-500"), ("prompts", [None, tmp_path / "in.txt"])])
    io.check_distinct([("out", tmp_path / "a"), ("stats_out", tmp_path / "b")], [("prompts", tmp_path / "in.txt")])
    io.check_distinct([("out", tmp_path / "a")], [("prompts", "in.txt")])  # a built-in name, not this file


# ---------------------------------------------------------------------------------------------
# claims


HOLDER = textwrap.dedent(
    """
    import sys
    from memcore.io import check_output_dir, check_output_file, check_output_folder, claimed_outputs
    check = {"file": check_output_file, "dir": check_output_dir, "folder": check_output_folder}[sys.argv[1]]
    with claimed_outputs():
        check(sys.argv[2], "out")
        print("claimed", flush=True)
        sys.stdin.read()
    """
)


class Holder:
    """Another process that checked ``path`` and holds its claim until ``release()``."""

    def __init__(self, kind: str, path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, kind, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline()
        assert line == "claimed\n", (line, self.proc.wait(), kind, path)

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


@pytest.fixture
def holders():
    started: list[Holder] = []

    def start(kind, path):
        started.append(Holder(kind, path))
        return started[-1]

    yield start
    for holder in started:
        if holder.proc.poll() is None:
            holder.release()


def test_a_claim_lasts_for_its_block_and_leaves_nothing(tmp_path):
    out = tmp_path / "m.safetensors"
    io.check_output_file(out, "out")  # outside claimed_outputs: only tried
    assert listing(tmp_path) == set()
    with io.claimed_outputs():
        io.check_output_file(out, "out")
        io.check_output_file(out, "out")  # this process's claim: reused
        assert listing(tmp_path) == {".m.safetensors.lock"}
        assert (tmp_path / ".m.safetensors.lock").read_text() == f"{os.getpid()}\n"
        with io.atomic_file(out) as tmp:  # reuses the claim, keeps it after the write
            tmp.write_text("x")
        assert listing(tmp_path) == {".m.safetensors.lock", "m.safetensors"}
    assert listing(tmp_path) == {"m.safetensors"}
    with pytest.raises(MemcoreError):
        with io.claimed_outputs():
            io.check_output_file(out, "out")
            raise MemcoreError("later")
    assert listing(tmp_path) == {"m.safetensors"}


@pytest.mark.parametrize("kind", ["file", "dir", "folder"])
def test_a_second_writer_is_refused_at_once(tmp_path, holders, kind):
    out = tmp_path / "out"
    if kind == "folder":
        out.mkdir()
    holder = holders(kind, out)
    check = {"file": io.check_output_file, "dir": io.check_output_dir, "folder": io.check_output_folder}[kind]
    write = {"file": io.atomic_file, "dir": io.atomic_dir, "folder": io.atomic_folder}[kind]
    message = rf"another memcore run \(pid {holder.proc.pid}\) is writing it; wait for it to end or choose another path$"
    with pytest.raises(MemcoreError, match=rf"^out .*/out: {message}"):
        check(out, "out")
    with pytest.raises(MemcoreError, match=rf"^.*/out: {message}"):  # a library caller that skipped the check
        with write(out):
            raise AssertionError("the write began")
    held = listing(tmp_path)
    holder.release()
    assert leftovers(tmp_path) == [] and held - listing(tmp_path) == {"out/.memcore.lock" if kind == "folder" else ".out.lock"}
    check(out, "out")


CONTENDER = textwrap.dedent(
    """
    import os, sys, time
    from memcore.errors import MemcoreError
    from memcore.io import atomic_file, check_output_file, claimed_outputs
    out, marker, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    won = lost = 0
    time.sleep(max(0.0, start - time.time()))
    while time.time() < start + 1.5:
        try:
            with claimed_outputs():
                check_output_file(out, "out")
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another holds it too
                with atomic_file(out) as tmp:
                    open(tmp, "w").write(str(os.getpid()))
                os.close(fd)
                os.unlink(marker)
                won += 1
        except MemcoreError as e:
            assert "another memcore run" in str(e), e
            lost += 1
    print(won, lost)
    """
)


def test_claims_exclude_each_other_under_contention(tmp_path):
    """Four processes claim, write and release one output over and over for the same 1.5 s: never two
    holders at once (the marker file would exist), and no lock file is left, whoever removed it last."""
    out, marker, start = tmp_path / "m.safetensors", tmp_path / "holder", time.time() + 5
    procs = [
        subprocess.Popen([sys.executable, "-c", CONTENDER, out, marker, str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    counts = [tuple(map(int, out.split())) for out, _ in results]
    assert sum(won for won, _ in counts) > 10 and sum(lost for _, lost in counts) > 10, counts  # they did contend
    assert listing(tmp_path) == {"m.safetensors"}


# ---------------------------------------------------------------------------------------------
# writing


def test_atomic_dir_when_something_else_made_the_folder(tmp_path):
    with pytest.raises(MemcoreError, match=r"^.*/d: was created by something else while memcore wrote it \(File exists\); nothing was written$"):
        with io.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
            (tmp_path / "d").mkdir()
    assert listing(tmp_path) == {"d"}


def test_atomic_folder(tmp_path):
    # a new folder with missing parents appears whole, or not at all
    with pytest.raises(RuntimeError):
        with io.atomic_folder(tmp_path / "new" / "inner") as tmp:
            (tmp / "a.csv").write_text("1")
            raise RuntimeError("failed")
    assert listing(tmp_path) == set()
    with io.atomic_folder(tmp_path / "new" / "inner") as tmp:
        (tmp / "a.csv").write_text("1")
    assert listing(tmp_path) == {"new", "new/inner", "new/inner/a.csv"}
    # an existing folder: the files join it together; the others stay
    folder = tmp_path / "new" / "inner"
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with io.atomic_folder(folder) as tmp:
            (tmp / "a.csv").write_text("2")
            raise RuntimeError("failed")
    assert (folder / "a.csv").read_text() == "1" and listing(folder) == {"a.csv", "keep.txt"}
    with io.atomic_folder(folder) as tmp:
        (tmp / "a.csv").write_text("2")
        (tmp / "b.csv").write_text("3")
        assert tmp.parent == folder and tmp.name.startswith(".memcore.")
    assert listing(folder) == {"a.csv", "b.csv", "keep.txt"} and (folder / "a.csv").read_text() == "2"
    (folder / "c.csv").mkdir()
    with pytest.raises(MemcoreError, match=r"c\.csv: is a folder; nothing was written$"):
        with io.atomic_folder(folder) as tmp:
            (tmp / "a.csv").write_text("4")
            (tmp / "c.csv").write_text("4")
    assert (folder / "a.csv").read_text() == "2" and leftovers(tmp_path) == []
    with pytest.raises(MemcoreError, match=r"c\.csv is a folder$"):
        io.check_output_folder(folder, "out_dir", ["a.csv", "c.csv"])


def test_analyze_claims_and_writes_its_files_together(tmp_path, monkeypatch):
    from memcore import figures
    from memcore.analysis import analyze

    out = tmp_path / "analysis"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    real = figures.save_figure
    calls = []

    def fail_late(fig, path):
        calls.append(path)
        real(fig, path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(figures, "save_figure", fail_late)
    with pytest.raises(OSError):
        analyze([make_mask(A), make_mask(B)], out)
    assert listing(out) == {"notes.txt"}  # no table, no figure, no staging folder, no lock
    monkeypatch.setattr(figures, "save_figure", real)
    result = analyze([make_mask(A), make_mask(B)], out)
    assert listing(out) == {"notes.txt", *(p.name for p in result.paths)} and result.paths[0] == out / "analysis.csv"
    # an input that is one of its outputs
    make_mask(A).save(out / "pairs.csv")
    with pytest.raises(MemcoreError, match=r"^out_dir .*/pairs\.csv: is also the input masks"):
        analyze([out / "pairs.csv", make_mask(B)], out)


# ---------------------------------------------------------------------------------------------
# signals


def test_deferred_signals_and_restored_handlers():
    before = {s: signal.getsignal(s) for s in io.SIGNALS}
    with io.signals_as_exceptions():
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        done = []
        with pytest.raises(io.Interrupted) as info:
            with io.deferred_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # a signal to this process is handled here at the latest, were it not deferred
                done.append("cleanup")
        assert done == ["cleanup"] and info.value.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # after one Interrupted, later signals are ignored
        time.sleep(0.05)
    assert {s: signal.getsignal(s) for s in io.SIGNALS} == before
    with io.signals_as_exceptions(), pytest.raises(io.Interrupted) as info:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(1)
    assert isinstance(info.value, KeyboardInterrupt) and info.value.signum == signal.SIGHUP


def test_no_handlers_outside_the_main_thread():
    before, seen = signal.getsignal(signal.SIGTERM), []

    def worker():
        with io.signals_as_exceptions():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [before] and signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------
# the command line: refused before any work


def cli_outputs(saved, tmp_path, out_file, out_dir) -> dict[str, list]:
    """argv per command, writing ``out_file`` (a file output) or ``out_dir`` (a folder output)."""
    prompts, stats, mask = saved / "prompts.txt", saved / "stats.safetensors", saved / "mask.safetensors"
    return {
        "localize": ["localize", "--model", "tiny", "--prompts", prompts, "--out", out_file, *FAST],
        "localize-stats": ["localize", "--model", "tiny", "--prompts", prompts, "--out", tmp_path / "m.safetensors",
                           "--stats-out", out_file, *FAST],
        "subsets": ["localize", "--model", "tiny", "--subsets", prompts, "--out", out_dir, *FAST],
        "subsets-stats": ["localize", "--model", "tiny", "--subsets", prompts, "--out", tmp_path / "masks",
                          "--stats-out", out_dir, *FAST],
        "mask": ["mask", "--model", "tiny", "--stats", stats, "--out", out_file],
        "prune": ["prune", "--model", "tiny", "--mask", mask, "--out", out_dir],
        "generate": ["generate", "--model", "tiny", "--prompts", prompts, "--seeds", "0", "--steps", "2",
                     "--height", "64", "--width", "64", "--out", out_dir],
        "analyze": ["analyze", mask, mask, "--out", out_dir],
        "detect": ["detect", "--model", "tiny", "--prompts", prompts, "--seeds", "0", "--steps", "2",
                   "--height", "64", "--width", "64", "--out", out_dir],
        "evaluate": ["evaluate", "--model", "tiny", "--prompts", prompts, "--seeds", "0", "--steps", "2",
                     "--height", "64", "--width", "64", "--mask", mask, "--out", out_dir],
        "evaluate-compare": ["evaluate", "--compare", tmp_path, "--out", out_file],
        "attack": ["attack", "--model", "tiny", "--prompts", prompts, "--samples", "3", "--steps", "2",
                   "--height", "64", "--width", "64", "--out", out_dir],
        "finetune": ["finetune", "--model", "tiny", "--data", saved / "images", "--steps", "1", "--out", out_dir],
    }


COMMANDS = [
    "localize", "localize-stats", "subsets", "subsets-stats", "mask", "prune", "generate", "analyze", "detect", "evaluate",
    "evaluate-compare", "attack", "finetune",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unwritable_output_is_refused_before_the_model_loads(tmp_path, capsys, saved, no_model, command):
    argv = cli_outputs(saved, tmp_path, READ_ONLY / "m.safetensors", READ_ONLY / "out")[command]
    line = user_error(capsys, tmp_path, *argv)
    flag = "--stats-out" if command.endswith("-stats") else "--out"
    assert line.startswith(f"{flag} /sys/") and line.endswith(")") and ": cannot write in folder /sys (" in line, line


@pytest.mark.parametrize("command", COMMANDS)
def test_a_name_too_long_is_refused_before_the_model_loads(tmp_path, capsys, saved, no_model, command):
    argv = cli_outputs(saved, tmp_path, tmp_path / LONG, tmp_path / LONG)[command]
    line = user_error(capsys, tmp_path, *argv)
    assert line.endswith(": the name mmmmmmmmmmmmmmmmmmmmmmmm... is 262 bytes long; this file system allows 255"), line


@pytest.mark.parametrize("command", COMMANDS)
def test_a_dangling_link_is_refused_before_the_model_loads(tmp_path, capsys, saved, no_model, command):
    link = tmp_path / "link"
    link.symlink_to("/nonexistent/folder/out")
    argv = cli_outputs(saved, tmp_path, link, link)[command]
    line = user_error(capsys, tmp_path, *argv)
    flag = "--stats-out" if command.endswith("-stats") else "--out"
    assert line == f"{flag} {link}: is a dangling symbolic link to /nonexistent/folder/out, whose folder does not exist"


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_being_written_by_another_run_is_refused_at_once(tmp_path, capsys, saved, no_model, holders, command):
    argv = cli_outputs(saved, tmp_path, tmp_path / "held.safetensors", tmp_path / "held")[command]
    kind = {"localize": "file", "localize-stats": "file", "mask": "file", "analyze": "folder", "evaluate-compare": "file"}.get(command, "dir")
    holder = holders(kind, tmp_path / ("held.safetensors" if kind == "file" else "held"))
    started = time.perf_counter()
    line = user_error(capsys, tmp_path, *argv)
    assert time.perf_counter() - started < 10
    flag = "--stats-out" if command.endswith("-stats") else "--out"
    assert line.startswith(f"{flag} {tmp_path}/held")
    assert line.endswith(f": another memcore run (pid {holder.proc.pid}) is writing it; wait for it to end or choose another path")
    holder.release()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "argv, line",
    [
        (["localize", "--prompts", "{p}", "--out", "{t}/x", "--stats-out", "{t}/x"], "--stats-out: must be another file than --out"),
        (["localize", "--prompts", "{p}", "--out", "{t}/x", "--stats-out", "{t}/link_x"], "--stats-out: must be another file than --out"),
        (["localize", "--prompts", "{p}", "--out", "{p}"], "--out {p}: is also the input --prompts (writing would replace it); choose another path"),
        (["localize", "--prompts", "{p}", "--out", "{t}/m", "--stats-out", "{p}"],
         "--stats-out {p}: is also the input --prompts (writing would replace it); choose another path"),
        (["localize", "--subsets", "{p}", "--out", "{t}/o", "--stats-out", "{t}/o"], "--stats-out: must be another folder than --out"),
        (["mask", "--stats", "{s}", "--out", "{s}"], "--out {s}: is also the input --stats (writing would replace it); choose another path"),
        (["mask", "--stats", "{s}", "--out", "{t}/link_s"],
         "--out {t}/link_s: is also the input --stats (writing would replace it); choose another path"),
    ],
)
def test_an_output_that_is_an_input_or_another_output(tmp_path, capsys, saved, no_model, argv, line):
    (tmp_path / "link_x").symlink_to(tmp_path / "x")
    (tmp_path / "link_s").symlink_to(saved / "stats.safetensors")
    fill = {"p": saved / "prompts.txt", "s": saved / "stats.safetensors", "t": tmp_path}
    argv = [argv[0], "--model", "tiny", *(a.format(**fill) for a in argv[1:])]
    if argv[0] == "localize":
        argv += FAST
    before = (saved / "prompts.txt").read_bytes(), (saved / "stats.safetensors").read_bytes()
    assert user_error(capsys, tmp_path, *argv) == line.format(**fill)
    assert ((saved / "prompts.txt").read_bytes(), (saved / "stats.safetensors").read_bytes()) == before


def test_analyze_output_that_is_an_input(tmp_path, capsys, saved):
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "density.csv").write_bytes((saved / "mask.safetensors").read_bytes())
    line = user_error(capsys, tmp_path, "analyze", out / "density.csv", saved / "mask.safetensors", "--out", out)
    assert line == f"--out {out}/density.csv: is also the input masks (writing would replace it); choose another path"


def test_mask_writes_through_a_link_and_a_long_name(tmp_path, capsys, saved):
    target = tmp_path / "target.safetensors"
    target.write_text("old")
    (tmp_path / "link").symlink_to(target)
    code, _, err = run_cli(capsys, "mask", "--model", "tiny", "--stats", saved / "stats.safetensors", "--out", tmp_path / "link")
    assert code == 0, err
    assert (tmp_path / "link").is_symlink() and target.read_bytes()[:1] != b"o"  # a safetensors file now
    code, _, err = run_cli(capsys, "mask", "--model", "tiny", "--stats", saved / "stats.safetensors", "--out", tmp_path / FITS)
    assert code == 0, err
    assert listing(tmp_path) == {"link", "target.safetensors", FITS}


def test_prune_when_something_else_makes_the_folder(tmp_path, capsys, saved, monkeypatch):
    from diffusers import DiffusionPipeline

    out = tmp_path / "pruned"
    real = DiffusionPipeline.save_pretrained

    def save_and_race(self, folder, **kwargs):
        real(self, folder, **kwargs)
        out.mkdir()
        (out / "theirs").write_text("x")

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", save_and_race)
    code, _, err = run_cli(capsys, "prune", "--model", "tiny", "--mask", saved / "mask.safetensors", "--out", out)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"memcore prune: error: {out}: was created by something else while memcore wrote it (File exists); nothing was written"
    )
    assert listing(tmp_path) == {"pruned", "pruned/theirs"}


# ---------------------------------------------------------------------------------------------
# the command line: signals during a save, in a subprocess

DRIVER = textwrap.dedent(
    """
    import os, signal, sys, shutil
    import safetensors.torch
    from diffusers import DiffusionPipeline
    from memcore.cli import main

    first, second, complete = sys.argv[1], sys.argv[2], int(sys.argv[3])  # saves that complete before the signal
    argv = sys.argv[4:]
    saving = []  # the cleanup hooks below act only once the save has begun (the checks probe too)

    def send(name):
        os.kill(os.getpid(), getattr(signal, name))
        for _ in range(1000):  # Python runs its handler at the next check (a loop has one): here, at once
            pass

    real_save_file, real_save_pretrained = safetensors.torch.save_file, DiffusionPipeline.save_pretrained
    real_rmtree, real_unlink = shutil.rmtree, os.unlink

    def save_file(tensors, filename, metadata=None):  # part of the file, then the signal
        saving.append(filename)
        if len(saving) <= complete:
            return real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(b"partial")
        if first == "none":
            raise OSError(28, "No space left on device")
        send(first)

    def save_pretrained(self, folder, **kwargs):  # the whole folder, then the signal
        saving.append(folder)
        real_save_pretrained(self, folder, **kwargs)
        send(first)

    def rmtree(path, *args, **kwargs):  # a second signal as the cleanup begins
        if saving:
            send(second)
        real_rmtree(path, *args, **kwargs)

    def unlink(path, *args, **kwargs):
        if saving and str(path).endswith(".tmp"):
            send(second)
        real_unlink(path, *args, **kwargs)

    safetensors.torch.save_file = save_file
    DiffusionPipeline.save_pretrained = save_pretrained
    if second != "none":
        shutil.rmtree, os.unlink = rmtree, unlink
    sys.exit(main(argv))
    """
)


@pytest.mark.parametrize(
    "command, first, second, complete, code",
    [
        ("localize", "SIGTERM", "none", 1, 143),  # while the mask is saved, the statistics saved already
        ("localize", "SIGINT", "SIGTERM", 0, 130),  # a second signal while the temporary file is removed
        ("localize", "none", "SIGTERM", 0, 143),  # the first signal comes during the cleanup after an error
        ("subsets", "SIGHUP", "none", 0, 129),
        ("prune", "SIGTERM", "SIGINT", 0, 143),  # a second signal while the pipeline folder is removed
    ],
)
def test_a_signal_during_a_save_leaves_nothing(tmp_path, saved, command, first, second, complete, code):
    work = tmp_path / "work"
    work.mkdir()
    argv = {
        "localize": ["localize", "--model", "tiny", "--prompts", saved / "prompts.txt", "--out", work / "m.safetensors",
                     "--stats-out", work / "s.safetensors", *FAST],
        "subsets": ["localize", "--model", "tiny", "--subsets", saved / "prompts.txt", "--out", work / "masks", *FAST],
        "prune": ["prune", "--model", "tiny", "--mask", saved / "mask.safetensors", "--out", work / "pruned"],
    }[command]
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, tmp_path / "driver.py", first, second, str(complete), *map(str, argv)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr
    signum = first if first != "none" else second
    assert done.stderr.strip().splitlines()[-1] == f"memcore {argv[0]}: interrupted by {signum}"
    assert listing(work) == set()
