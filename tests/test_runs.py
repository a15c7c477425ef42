"""Sharded, resumable runs (memcore.runs): 1 process against 2 under torchrun, and resuming after a stop."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memcore import generate as gen
from memcore.errors import MemcoreError
from memcore.runs import Ranks, Run, launched_ranks, partial_path

PROMPTS = ["a painting of a fox", "a red car", "the moon over the sea", "an old map of the city", "a bowl of fruit"]
SEEDS = [0, 3]
SMALL = ["--model", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "--batch-size", "2"]


def test_shares_are_disjoint_and_cover_everything():
    items = list(range(11))
    for world in (1, 2, 3, 5):
        shares = [Ranks(rank, world).mine(items) for rank in range(world)]
        assert sorted(sum(shares, [])) == items
        assert all(share == items[rank::world] for rank, share in enumerate(shares))


def test_work_items_do_not_depend_on_the_processes():
    items = gen.work_items(5, [0, 3], 2, "original")
    assert [(i.seed, i.start, list(i.prompts)) for i in items] == [
        (0, 0, [0, 1]), (0, 2, [2, 3]), (0, 4, [4]), (3, 0, [0, 1]), (3, 2, [2, 3]), (3, 4, [4]),
    ]
    assert len({i.key for i in items}) == len(items)


def test_launched_ranks(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launched_ranks() == Ranks()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched_ranks() == Ranks(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(MemcoreError, match="RANK"):
        launched_ranks()


def test_run_records_resumes_and_refuses_other_settings(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), Run(out, kind="generate", settings={"steps": 2}) as run:
        run.record("a", [{"x": 1}], {"v": np.arange(3.0)})
        raise RuntimeError("stopped")
    assert not out.exists() and partial_path(out).is_dir()  # the finished item is kept
    with pytest.raises(MemcoreError, match=r"other settings \(steps was 2, is now 3\)"):
        Run(out, kind="generate", settings={"steps": 3}).__enter__()
    with pytest.raises(MemcoreError, match="unfinished 'memcore generate' run, not a 'detect' one"):
        Run(out, kind="detect", settings={"steps": 2}).__enter__()
    with Run(out, kind="generate", settings={"steps": 2}) as run:
        assert run.resumed == 1 and run.done("a") and not run.done("b")
        rows, arrays = run.load("a")
        assert rows == [{"x": 1}] and np.array_equal(arrays["v"], np.arange(3.0))
        run.record("b", [])
        (run.folder / "result.txt").write_text("done")
    assert sorted(p.name for p in out.iterdir()) == ["result.txt"]  # records and run.json are gone
    assert not partial_path(out).exists()
    with pytest.raises(MemcoreError, match="already exists"):
        Run(out, kind="generate", settings={"steps": 2}).__enter__()


def test_a_run_stopped_before_any_item_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), Run(tmp_path / "out", kind="generate", settings={}):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_a_run_is_left_alone(tmp_path):
    partial_path(tmp_path / "out").mkdir()
    with pytest.raises(MemcoreError, match="is not an unfinished memcore run"):
        Run(tmp_path / "out", kind="generate", settings={}).__enter__()


@pytest.fixture(scope="module")
def pipe():
    from memcore.models import load_pipeline

    return load_pipeline("tiny", device="cpu", dtype="float32")


def test_generate_resumes_where_it_stopped(tmp_path, pipe, monkeypatch):
    kwargs = {"steps": 2, "height": 64, "width": 64, "batch_size": 2, "progress": False}
    prompts = PROMPTS[:3]  # 4 calls: prompts 0-1 and 2, under each of 2 seeds
    whole = gen.generate(pipe, prompts, SEEDS, out_dir=tmp_path / "whole", **kwargs)

    recorded = []
    original = Run.record

    def stop_after_two(self, key, *args, **kw):
        if len(recorded) == 2:
            raise KeyboardInterrupt
        recorded.append(key)
        return original(self, key, *args, **kw)

    monkeypatch.setattr(Run, "record", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        gen.generate(pipe, prompts, SEEDS, out_dir=tmp_path / "resumed", **kwargs)
    monkeypatch.setattr(Run, "record", original)
    assert not (tmp_path / "resumed").exists()
    assert len(list((tmp_path / "resumed.partial" / "parts").glob("*.json"))) == 2

    seen = []
    real_call = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__", lambda self, *a, **kw: seen.append(kw) or real_call(self, *a, **kw))
    result = gen.generate(pipe, prompts, SEEDS, out_dir=tmp_path / "resumed", **kwargs)
    assert len(seen) == len(gen.work_items(len(prompts), SEEDS, 2, "original")) - 2  # the two finished calls are skipped
    for a, b in zip(whole.images + [whole.grid, whole.manifest], result.images + [result.grid, result.manifest]):
        assert a.read_bytes() == b.read_bytes(), b.name
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["grid.png", "images", "manifest.json"]


def test_png_text_chunk_records_the_image(tmp_path, pipe):
    from PIL import Image

    result = gen.generate(pipe, PROMPTS[:2], [5], out_dir=tmp_path / "g", steps=2, height=64, width=64, progress=False)
    with Image.open(result.images[1]) as image:
        info = json.loads(image.text["memcore"])
    assert info["prompt"] == PROMPTS[1] and info["prompt_index"] == 1 and info["seed"] == 5
    assert info["model"] == "memcore/tiny" and info["settings"]["steps"] == 2 and info["mask_sha256"] is None


def _memcore(args, processes, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    env.pop("WORLD_SIZE", None)
    launcher = [sys.executable, "-m", "memcore"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "-m", "memcore"]
    done = subprocess.run(launcher + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _same_files(a: Path, b: Path, skip=()):
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in names:
        if name.name not in skip:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
def test_two_processes_write_what_one_writes(tmp_path):
    """generate with a mask (the pruning waits for every original) and detect with a control set,
    under torchrun --nproc-per-node 2 (gloo, CPU), against one process: the same bytes."""
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "c.txt").write_text("a dog\na tree in winter\nthree cups\n")
    _memcore(["localize", *SMALL[:8], "--prompts", "p.txt", "--timesteps", "2", "--out", "m.safetensors"], 1, tmp_path)
    for processes in (1, 2):
        _memcore(["generate", *SMALL, "--prompts", "p.txt", "--seeds", "0,3", "--mask", "m.safetensors",
                  "--out", f"g{processes}"], processes, tmp_path)
        done = _memcore(["detect", *SMALL, "--prompts", "p.txt", "--control", "c.txt", "--seeds", "0-2",
                         "--timesteps", "2", "--out", f"d{processes}"], processes, tmp_path)
        assert done.stdout.count("wrote") == 1  # process 0 alone reports
    _same_files(tmp_path / "g1", tmp_path / "g2")
    _same_files(tmp_path / "d1", tmp_path / "d2", skip={"summary.json"})  # its seconds differ
    one, two = (json.loads((tmp_path / f"d{n}" / "summary.json").read_text()) for n in (1, 2))
    assert one["auc"] == two["auc"] and one["top"] == two["top"]


def test_resuming_removes_what_a_killed_process_was_writing(tmp_path):
    """A process killed mid-write (SIGKILL: torchrun's last resort, the OOM killer, a lost node) leaves
    its temporary file; the run that resumes removes it, so that it does not end up in OUT."""
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), Run(out, kind="generate", settings={}) as run:
        run.record("a", [])
        (run.folder / "images").mkdir()
        (run.folder / "images" / "p000_s0.png").write_bytes(b"png")
        raise RuntimeError("stopped")
    folder = partial_path(out)
    left = [folder / "images" / ".p000_s1.png.k3j9x0qa.tmp", folder / "parts" / ".b.json.0a1b2c3d.tmp"]
    for path in left:
        path.write_bytes(b"half")
    (folder / ".memcore.zz11yy22.tmp").mkdir()
    with Run(out, kind="generate", settings={}) as run:
        assert run.done("a") and not run.done("b")
        assert not any(path.exists() for path in left)
        run.record("b", [])
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["images", "images/p000_s0.png"]
