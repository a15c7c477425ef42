"""The built-in prompt sets: names, ranges, `memcore data`, masks from a name against masks from a file,
and (only here, when the folder exists) every set against the published file it comes from."""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import resources
from pathlib import Path

import pytest
import torch

from memcore import datasets
from memcore.cli import main
from memcore.errors import MemcoreError
from memcore.mask import Mask
from memcore.prompts import BuiltinPrompts, load_prompts, load_subsets

NAMES = datasets.names()
LISTS = ["sdv1-500", "sd1-mem345", "sd2-mem219", "synthetic-nomem-500", "coco-10k", "laion-nomem-500"]
FAMILIES = {"memorize": 60, "memorize_sd2": 10, "mv_prompts": 5, "tv_prompts": 5}


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- the registry


def test_names_and_families():
    assert NAMES[: len(LISTS)] == LISTS
    numbered = NAMES[len(LISTS) :]
    assert numbered == [f"{family}_{i}" for family, count in FAMILIES.items() for i in range(count)]
    assert [label for label, _ in datasets.groups()] == [
        *LISTS, "memorize_0..59", "memorize_sd2_0..9", "mv_prompts_0..4", "tv_prompts_0..4"
    ]


@pytest.mark.parametrize("name", NAMES)
def test_every_set_loads_with_its_row_count(name):
    found = datasets.get(name)
    prompts = load_prompts(name)
    assert isinstance(prompts, BuiltinPrompts) and prompts.set_name == name
    assert len(prompts) == found.rows > 0
    assert all(isinstance(p, str) and p and p == p.strip() for p in prompts)
    assert found.source.startswith("github.com/") and found.licence.startswith(("MIT", "as sdv1-500")) and found.citation


def test_known_prompts_and_sizes():
    base = load_prompts("sdv1-500")
    assert base[0] == "The No Limits Business Woman Podcast"
    assert base[-1] == "I Survived Sunnydale High | Unisex T-Shirt"
    assert load_prompts("memorize_0")[0] == "Chelmsford Brown Area Rug by Andover Mills"
    assert set(load_prompts("sd1-mem345")) <= set(base)
    sizes = [10] * 10 + [20] * 10 + [30] * 10 + [40] * 10 + [50] * 10 + [40] * 10
    assert [datasets.get(f"memorize_{i}").rows for i in range(60)] == sizes
    for name in NAMES[len(LISTS) :]:
        subset = load_prompts(name)
        assert set(subset) <= set(base) and len(set(subset)) == len(subset), name


def test_a_set_is_a_fresh_list_each_time():
    first = load_prompts("memorize_3")
    first.append("changed")
    assert load_prompts("memorize_3") == first[:-1]


def test_duplicates_in_a_set_are_kept_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="memcore"):
        prompts = load_prompts("coco-10k")
    assert len(prompts) == 10_000 and len(set(prompts)) == 10_000 - 34
    assert "coco-10k: 34 duplicate prompts kept" in caplog.text


def test_shipped_files_and_licences_are_package_data():
    data = resources.files("memcore") / "data"
    for s in datasets.builtin_sets():
        assert (data / s.file).is_file()
    for licence, holder in [("LICENSE-NeMo.txt", "ml-research@TUDarmstadt"), ("LICENSE-MemAttn.txt", "Jie Ren")]:
        text = (data / licence).read_text(encoding="utf-8")
        assert text.startswith("MIT License") and f"Copyright (c) 2024 {holder}" in text
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"data/*"' in pyproject


# ---------------------------------------------------------------- resolution rules


def test_an_existing_file_wins_over_a_set_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "memorize_0").write_text("a fox")  # no extension: read as a file, and refused as one
    with pytest.raises(MemcoreError, match=r"^memorize_0: unknown prompt file extension ''"):
        load_prompts("memorize_0")
    (tmp_path / "memorize_0").unlink()
    (tmp_path / "memorize_0").mkdir()
    with pytest.raises(MemcoreError, match="is a directory"):
        load_prompts("memorize_0")


@pytest.mark.parametrize(
    "arg, expect",
    [
        ("memorise_0", "; did you mean memorize_0?"),
        ("missing/prompts.txt", ""),
        ("sdv1-5000", "; did you mean sdv1-500?"),
    ],
)
def test_unknown_name_is_one_line(arg, expect):
    with pytest.raises(MemcoreError) as e:
        load_prompts(arg)
    message = str(e.value)
    assert message == f"{arg}: no such file, and no built-in prompt set of that name ('memcore data' lists them){expect}"


def test_subsets_from_ranges_names_files_and_folders(tmp_path):
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "b_10.txt").write_text("x\ny")
    (folder / "b_2.txt").write_text("z")
    own = tmp_path / "own.csv"
    own.write_text("prompt\na cat\n")
    subsets = load_subsets(["memorize_3..5", own, "sd2-mem219", folder, "mv_prompts_0..0", "memorize_sd2_8..9"])
    assert list(subsets) == [
        "memorize_3", "memorize_4", "memorize_5", "own", "sd2-mem219", "b_2", "b_10", "mv_prompts_0",
        "memorize_sd2_8", "memorize_sd2_9",
    ]
    assert subsets["memorize_4"] == load_prompts("memorize_4") and subsets["own"] == ["a cat"]
    assert subsets["b_10"] == ["x", "y"] and subsets["memorize_sd2_9"] == load_prompts("memorize_sd2_9")
    assert datasets.expand_range("memorize_0..9") == [f"memorize_{i}" for i in range(10)]
    assert datasets.expand_range("tv_prompts_0..4") == [f"tv_prompts_{i}" for i in range(5)]
    assert datasets.expand_range("memorize_0") is None and datasets.expand_range("memorize_0..") is None


@pytest.mark.parametrize(
    "arg, expect",
    [
        ("memorize_5..2", "memorize_5..2: empty range (5 is after 2)"),
        ("memorize_0..99", "memorize_0..99: the built-in sets memorize_N go from memorize_0 to memorize_59"),
        ("mv_prompts_3..5", "mv_prompts_3..5: the built-in sets mv_prompts_N go from mv_prompts_0 to mv_prompts_4"),
        ("nothing_0..3", "nothing_0..3: no built-in prompt sets named nothing_N ('memcore data' lists them)"),
        ("memorize_x", "memorize_x: no such file, and no built-in prompt set of that name"),
    ],
)
def test_bad_subsets_are_one_line_errors(arg, expect):
    with pytest.raises(MemcoreError) as e:
        load_subsets([arg])
    assert str(e.value).startswith(expect) and "\n" not in str(e.value)


def test_a_set_and_a_file_of_the_same_name_are_refused(tmp_path):
    (tmp_path / "memorize_1.txt").write_text("a fox")
    with pytest.raises(MemcoreError, match=r"subset name 'memorize_1' is also the name of .*memorize_1\.txt"):
        load_subsets([tmp_path / "memorize_1.txt", "memorize_0..2"])


# ---------------------------------------------------------------- memcore data


def test_data_lists_sets_with_families_collapsed(capsys):
    code, out, err = run(capsys, "data")
    assert code == 0 and not err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["NAME", "ROWS"] and lines[-1].startswith("A name works wherever")
    rows = {line.split()[0]: line.split()[1] for line in lines[1:-1] if not line.startswith(" ")}
    assert rows == {
        "sdv1-500": "500", "sd1-mem345": "345", "sd2-mem219": "219", "synthetic-nomem-500": "500",
        "coco-10k": "10000", "laion-nomem-500": "500", "memorize_0..59": "10-50", "memorize_sd2_0..9": "10",
        "mv_prompts_0..4": "10", "tv_prompts_0..4": "10",
    }
    assert "github.com/renjie3/MemAttn, MIT" in out and "cite: Ren et al., ECCV 2024" in out
    assert "CC BY 4.0 (COCO Consortium)" in out and "Chavhan et al." in out


def test_data_json(capsys):
    code, out, _ = run(capsys, "data", "--json")
    sets = json.loads(out)
    assert code == 0 and [s["name"] for s in sets] == NAMES
    by_name = {s["name"]: s for s in sets}
    assert by_name["memorize_12"]["rows"] == 20 and by_name["memorize_12"]["family"] == "memorize"
    assert by_name["sdv1-500"]["family"] is None and by_name["sdv1-500"]["licence"].startswith("MIT")
    assert set(by_name["coco-10k"]) == {"name", "rows", "description", "source", "licence", "citation", "file", "family"}


def test_data_prints_one_set(capsys):
    code, out, _ = run(capsys, "data", "memorize_sd2_3")
    assert code == 0 and out == "\n".join(load_prompts("memorize_sd2_3")) + "\n"
    code, out, _ = run(capsys, "data", "tv_prompts_1", "--json")
    info = json.loads(out)
    assert code == 0 and info["name"] == "tv_prompts_1" and info["prompts"] == load_prompts("tv_prompts_1")


def test_data_unknown_name(capsys):
    code, out, err = run(capsys, "data", "memorize_60")
    assert code == 2 and not out
    assert err == "memcore data: error: memorize_60: not a built-in prompt set ('memcore data' lists them)\n"


# ---------------------------------------------------------------- masks: a name and a file give the same mask

FAST = ["--model", "tiny", "--timesteps", "2", "--height", "64", "--width", "64", "--sparsity", "0.05", "--batch-size", "8"]


def _same_masks(a: Mask, b: Mask) -> None:
    assert a.layers.keys() == b.layers.keys() and a.per_step.keys() == b.per_step.keys()
    for name in a.layers:
        assert torch.equal(a.layers[name], b.layers[name]), name
    for name in a.per_step:
        assert torch.equal(a.per_step[name], b.per_step[name]), name
    # only the field naming the source may differ; the sha256 of the prompt list may not
    assert {k: v for k, v in a.metadata.items() if k != "prompt_set"} == {
        k: v for k, v in b.metadata.items() if k != "prompt_set"
    }


def test_mask_from_a_set_equals_mask_from_its_file(tmp_path, capsys):
    copy = tmp_path / "copy.txt"
    copy.write_text("\n".join(load_prompts("memorize_0")), encoding="utf-8")
    for source, out in (("memorize_0", "named.safetensors"), (copy, "file.safetensors")):
        code, _, err = run(capsys, "localize", *FAST, "--prompts", source, "--out", tmp_path / out)
        assert code == 0, err
    named, from_file = Mask.load(tmp_path / "named.safetensors"), Mask.load(tmp_path / "file.safetensors")
    _same_masks(named, from_file)
    assert named.metadata["prompt_set"] == "memorize_0" and "prompt_set" not in from_file.metadata
    assert named.metadata["num_prompts"] == 10 and sum(named.count(n) for n in named.layers) > 0


def test_subset_masks_from_a_range_equal_masks_from_files(tmp_path, capsys):
    files = tmp_path / "files"
    files.mkdir()
    for name in ("memorize_0", "memorize_1"):
        (files / f"{name}.txt").write_text("\n".join(load_prompts(name)), encoding="utf-8")
    for source, out in (("memorize_0..1", "named"), (files, "from_files")):
        code, _, err = run(capsys, "localize", *FAST, "--per-step", "--subsets", source, "--out", tmp_path / out)
        assert code == 0, err
    for name in ("memorize_0", "memorize_1"):
        named = Mask.load(tmp_path / "named" / f"{name}.safetensors")
        from_file = Mask.load(tmp_path / "from_files" / f"{name}.safetensors")
        _same_masks(named, from_file)
        assert named.metadata["subset"] == from_file.metadata["subset"] == name
        assert named.metadata["prompt_set"] == name


# ---------------------------------------------------------------- against the published files
# The one place in the tests that reads the reference data beside the repository; skipped without it.

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"published prompt files not found at {SHARED}")
PUBLISHED = {
    "sdv1-500": "memorized/sdv1_500_labeled_vm_tm.csv",
    "sd1-mem345": "memorized/sd1_mem345.txt",
    "sd2-mem219": "memorized/sd2_mem219.txt",
    "synthetic-nomem-500": "non_memorized/synthetic_nomem_500.txt",
    "coco-10k": "non_memorized/coco2014_val_10000.csv",
    "laion-nomem-500": "non_memorized/laion_unmemorized_500.csv",
}


def _published(name: str) -> Path:
    return SHARED / PUBLISHED.get(name, f"memorized/subsets/{name}.txt")


@needs_shared
@pytest.mark.parametrize("name", NAMES)
def test_set_equals_its_published_file(name):
    assert load_prompts(name) == load_prompts(_published(name))


@needs_shared
@pytest.mark.parametrize("name", LISTS)
def test_shipped_list_is_the_published_file(name):
    shipped = (resources.files("memcore") / "data" / datasets.get(name).file).read_bytes()
    assert hashlib.sha256(shipped).digest() == hashlib.sha256(_published(name).read_bytes()).digest()


@needs_shared
def test_every_published_subset_is_a_set():
    published = {p.stem for p in (SHARED / "memorized" / "subsets").glob("*.txt")}
    assert published == set(NAMES[len(LISTS) :])


@needs_shared
def test_unshipped_published_files_read():
    # the same 500 as the jsonl Wen et al. publish (not shipped: no licence), in the same order
    assert load_prompts(SHARED / "memorized/sdv1_500_memorized.jsonl") == load_prompts("sdv1-500")
    membench = load_prompts(SHARED / "memorized/membench/SD1_final.csv")
    assert len(membench) == 3000 and membench[0] == "fire us army garden flag single"
    coco = SHARED / "non_memorized/coco_prompts.txt"
    lines = coco.read_text(encoding="utf-8").split("\n")
    assert load_prompts(coco) == [s for line in lines if (s := line.strip())] and len(load_prompts(coco)) == 480
    assert len(load_prompts(SHARED / "non_memorized/non_mem.txt")) == 116
