"""memcore.evaluation: per-image scores against the metrics functions, the summaries against brute
force on hand-made rows, the FID reference from a folder and from a .npz, the one-line errors, the
table, the figure and the comparison of run folders. Models are the tiny stand-ins of standins.py."""

import argparse
import collections
import csv
import io
import json
import math
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from memcore import datasets, evaluation, metrics
from memcore.cli import FlagWords
from memcore.errors import MemcoreError
from standins import write_clip, write_inception, write_sscd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {
        "sscd": write_sscd(folder / "sscd.pt"),
        "clip": write_clip(folder / "clip"),
        "inception": write_inception(folder / "inception.pt"),
    }


@pytest.fixture(scope="module")
def scorers(models):
    return evaluation.load_scorers(**models)


def _random_images(n, size=(24, 20), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _one_line(caught) -> str:
    text = str(caught.value)
    assert "\n" not in text, text
    return text


# --- datasets.labels ------------------------------------------------------------------------------


def test_labels_of_sdv1_500_and_its_subsets():
    labels = datasets.labels("sdv1-500")
    assert len(labels) == len(datasets.get("sdv1-500").prompts()) == 500
    assert collections.Counter(labels) == {"TM": 388, "VM": 112}
    # the type column read independently of memcore
    text = (datasets._data("sdv1_500_labeled_vm_tm.csv")).read_text(encoding="utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=";"))
    assert labels == [row["type"] for row in rows]
    for name in ("memorize_0", "memorize_55", "mv_prompts_0", "tv_prompts_0"):
        subset = datasets.get(name)
        assert datasets.labels(name) == [labels[i] for i in subset.indices]
        assert len(datasets.labels(name)) == len(subset.prompts())
    assert datasets.labels("coco-10k") is None and datasets.labels("sd1-mem345") is None
    with pytest.raises(MemcoreError, match="not a built-in prompt set"):
        datasets.labels("no-such-set")


# --- loading the scorers --------------------------------------------------------------------------


def _evaluate_parser():
    """A parser with the options evaluate will have, to see how the CLI spells the errors' parameters."""
    parser = argparse.ArgumentParser(prog="memcore")
    sub = parser.add_subparsers(dest="command").add_parser("evaluate")
    for flag in ("--sscd", "--clip", "--inception", "--fid-reference", "--ground-truth", "--sscd-preprocessing"):
        sub.add_argument(flag)
    return parser


@pytest.mark.parametrize("which", ["sscd", "clip", "inception"])
def test_load_scorers_errors_name_the_option(tmp_path, which, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    missing = tmp_path / "missing"
    with pytest.raises(MemcoreError) as caught:
        evaluation.load_scorers(**{which: missing})
    assert str(missing) in _one_line(caught) and caught.value.param == which
    flag = {"sscd": "--sscd", "clip": "--clip", "inception": "--inception"}[which]
    assert caught.value.render(FlagWords(_evaluate_parser(), "evaluate")).startswith(f"{flag}: {missing}")


def test_load_scorers_checks_the_preprocessing(models):
    with pytest.raises(MemcoreError, match="sscd_preprocessing: must be one of wen, sscd, got 'dcr'"):
        evaluation.load_scorers(sscd=models["sscd"], sscd_preprocessing="dcr")
    empty = evaluation.load_scorers()
    assert empty.sscd is None and empty.clip is None and empty.inception is None


# --- images and per-image scores ------------------------------------------------------------------


def _write_ground_truth(folder, images_by_index, ext="png"):
    folder.mkdir(exist_ok=True)
    for index, images in images_by_index.items():
        for k, image in enumerate(images):
            name = f"{index:04d}.{ext}" if k == 0 else f"{index:04d}_{k}.{ext}"
            image.save(folder / name)
    return folder


def test_images_to_tensor_is_uint8_over_255():
    images = _random_images(3)
    x = evaluation.images_to_tensor(images)
    assert x.shape == (3, 3, 20, 24) and x.dtype == torch.float32
    for i, image in enumerate(images):
        expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
        assert torch.equal(x[i], expected)
    with pytest.raises(ValueError, match="one size"):
        evaluation.images_to_tensor([*images, *_random_images(1, size=(8, 8))])


def test_scores_in_memory_equal_scores_of_the_saved_files(scorers, tmp_path):
    gt_images = {0: _random_images(2, size=(30, 26), seed=1), 2: _random_images(1, size=(17, 33), seed=2)}
    truth = evaluation.GroundTruth.load(_write_ground_truth(tmp_path / "gt", gt_images), 3, scorers)
    generated = _random_images(4, seed=3)
    prompts, indices = ["a fox", "a wave", "a hat", "a fox"], [0, 1, 2, 0]
    in_memory = evaluation.score_images(scorers, generated, prompts, indices, truth)
    for i, image in enumerate(generated):
        image.save(tmp_path / f"gen{i}.png")
    saved = [evaluation.read_image(tmp_path / f"gen{i}.png", "images") for i in range(4)]
    from_files = evaluation.score_images(scorers, saved, prompts, indices, truth)
    assert in_memory.sscd == from_files.sscd and in_memory.clip == from_files.clip
    assert np.array_equal(in_memory.features, from_files.features)
    # prompt 1 has no ground truth: no SSCD score; the others are scored
    assert in_memory.sscd[1] is None and all(isinstance(in_memory.sscd[i], float) for i in (0, 2, 3))


def test_score_images_against_the_metrics_functions(scorers, tmp_path):
    gt_images = {0: _random_images(3, size=(30, 26), seed=4), 1: _random_images(1, seed=5)}
    truth = evaluation.GroundTruth.load(_write_ground_truth(tmp_path / "gt", gt_images, "jpg"), 2, scorers)
    assert truth.missing == () and [len(truth.files[i]) for i in (0, 1)] == [3, 1]
    generated = _random_images(3, seed=6)
    got = evaluation.score_images(scorers, generated, ["x", "y", "x"], [0, 1, 0], truth)
    pixels = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 255 for im in generated])
    embedded = metrics.sscd_embed(scorers.sscd, pixels)
    for i, index in enumerate([0, 1, 0]):
        # the ground truth as read from disk (JPEG decoded by PIL), each image embedded alone
        refs = torch.cat([
            metrics.sscd_embed(scorers.sscd, evaluation.images_to_tensor([Image.open(p).convert("RGB")]))
            for p in truth.files[index]
        ])
        cosines = [float(embedded[i] @ r) for r in refs]
        assert got.sscd[i] == pytest.approx(max(cosines), abs=1e-6)
    model, processor = scorers.clip
    assert got.clip == pytest.approx(metrics.clip_score(model, processor, pixels, ["x", "y", "x"]).tolist(), abs=0)
    assert got.features.shape == (3, 2048) and got.features.dtype == np.float64
    assert np.array_equal(got.features, metrics.inception_features(scorers.inception, pixels))
    # without models or ground truth: None
    bare = evaluation.score_images(evaluation.Scorers(), generated, ["x"] * 3, [0, 1, 0], truth)
    assert bare.sscd == [None] * 3 and bare.clip == [None] * 3 and bare.features is None
    no_truth = evaluation.score_images(scorers, generated, ["x"] * 3, [0, 1, 0])
    assert no_truth.sscd == [None] * 3 and no_truth.clip == got.clip


# --- ground truth errors --------------------------------------------------------------------------


def test_ground_truth_missing_prompts(scorers, tmp_path):
    folder = _write_ground_truth(tmp_path / "gt", {1: _random_images(1), 3: _random_images(2)})
    (folder / "report.csv").write_text("not an image\n")  # other names are ignored
    truth = evaluation.GroundTruth.load(folder, 5, scorers)
    assert truth.missing == (0, 2, 4)
    assert sorted(truth.embeddings) == [1, 3] and truth.embeddings[3].shape == (2, 8)
    assert torch.allclose(truth.embeddings[3].norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("case", ["no-folder", "a-file", "empty", "out-of-range", "corrupt", "no-sscd"])
def test_ground_truth_errors_are_one_line(scorers, tmp_path, case):
    folder = tmp_path / "gt"
    named = str(folder)
    if case == "a-file":
        folder.write_text("x")
    elif case == "empty":
        folder.mkdir()
        (folder / "notes.txt").write_text("x")
    elif case == "out-of-range":
        _write_ground_truth(folder, {0: _random_images(1), 12: _random_images(1)})
        named = str(folder / "0012.png")
    elif case == "corrupt":
        _write_ground_truth(folder, {0: _random_images(1)})
        (folder / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        named = str(folder / "0001.png")
    elif case == "no-sscd":
        _write_ground_truth(folder, {0: _random_images(1)})
    use = evaluation.Scorers() if case == "no-sscd" else scorers
    with pytest.raises(MemcoreError) as caught:
        evaluation.GroundTruth.load(folder, 10, use)
    text = _one_line(caught)
    assert caught.value.param == "ground_truth"
    if case == "no-sscd":
        assert "pass sscd=PATH" in text
        assert caught.value.render(FlagWords(_evaluate_parser(), "evaluate")).endswith("use --sscd PATH")
    else:
        assert named in text
    if case == "out-of-range":
        assert "names prompt 12 but the list has 10 prompts" in text
    assert caught.value.render(FlagWords(_evaluate_parser(), "evaluate")).startswith("--ground-truth: ")


# --- FID reference --------------------------------------------------------------------------------


def test_fid_from_a_folder_equals_fid_from_its_npz(scorers, tmp_path, monkeypatch):
    folder = tmp_path / "ref"
    folder.mkdir()
    # two sizes, so that the features come in several batches
    for i, image in enumerate(_random_images(5, seed=7) + _random_images(3, size=(16, 16), seed=8)):
        image.save(folder / f"ref{i}.png")
    (folder / ".hidden.png").write_bytes(b"temporary")
    (folder / "notes.txt").write_text("ignored")
    from_folder = evaluation.FIDReference.load(folder, scorers)
    assert from_folder.features.shape == (8, 2048)
    files = sorted(folder.glob("ref*.png"))
    expected = np.concatenate([
        metrics.inception_features(scorers.inception, evaluation.images_to_tensor([Image.open(f)])) for f in files
    ])
    np.testing.assert_allclose(from_folder.features, expected, rtol=0, atol=1e-5)  # float32 model, batch of 1 or 5
    metrics.save_fid_statistics(tmp_path / "ref.npz", from_folder.mu, from_folder.sigma)
    from_npz = evaluation.FIDReference.load(tmp_path / "ref.npz", scorers)
    assert from_npz.features is None

    generated = evaluation.score_images(scorers, _random_images(6, seed=9), ["p"] * 6, list(range(6))).features
    rows = [{"prompt": i, "seed": 0, "sscd": None, "clip": None, "seconds": 1.0} for i in range(6)]
    # a Frechet distance of 2048-d statistics takes seconds here: the statistics it is given are compared
    # instead (the formula itself is tested in test_metrics.py, and below at a smaller size)
    calls = []
    monkeypatch.setattr(metrics, "frechet_distance", lambda *stats: calls.append(stats) or float(len(calls)))
    a = evaluation.summarize(rows, generated, from_folder)
    b = evaluation.summarize(rows, generated, from_npz)
    mu, sigma = metrics.fid_statistics(generated)
    for stats in calls:
        assert all(np.array_equal(x, y) for x, y in zip(stats, (mu, sigma, from_folder.mu, from_folder.sigma), strict=True))
    assert (a["fid"], b["fid"]) == (1.0, 2.0)
    # KID with the reference features, m = min(1000, 6, 8) = 6, as clean-fid picks it
    kid_mean, kid_std = metrics.kid(generated, from_folder.features, subsets=100, subset_size=6)
    assert a["kid"] == {"mean": kid_mean, "std": kid_std, "subsets": 100, "subset_size": 6}
    assert b["kid"] is None and b["notes"] == [
        "no KID: the FID reference is a .npz of statistics; KID needs a folder of reference images"
    ]
    json.dumps(a, allow_nan=False), json.dumps(b, allow_nan=False)


def test_fid_and_kid_of_small_features(monkeypatch):
    rng = np.random.default_rng(10)
    generated, ref = rng.standard_normal((40, 16)), rng.standard_normal((30, 16)) * 1.3 + 0.2
    reference = evaluation.FIDReference("ref", *metrics.fid_statistics(ref), ref)
    rows = [{"prompt": i, "seed": 0, "sscd": None, "clip": None, "seconds": None} for i in range(40)]
    summary = evaluation.summarize(rows, generated, reference)
    assert summary["fid"] == metrics.frechet_distance(*metrics.fid_statistics(generated), reference.mu, reference.sigma)
    assert summary["fid"] > 0.1
    kid_mean, kid_std = metrics.kid(generated, ref, subsets=100, subset_size=30)
    assert summary["kid"] == {"mean": kid_mean, "std": kid_std, "subsets": 100, "subset_size": 30}
    one = evaluation.summarize(rows[:1], generated[:1], reference)
    assert one["fid"] is None and one["kid"] is None and one["notes"] == ["FID and KID need at least 2 images, got 1"]
    # more than 1000 images on both sides: subsets of 1000 (the KID itself is not computed here)
    seen = []
    monkeypatch.setattr(metrics, "kid", lambda x, y, subsets, subset_size: seen.append((len(x), len(y), subsets, subset_size)) or (0.0, 0.0))
    big = evaluation.FIDReference("ref", reference.mu, reference.sigma, np.repeat(ref, 40, axis=0))
    rows = [{"prompt": i, "seed": 0, "sscd": None, "clip": None, "seconds": None} for i in range(1001)]
    assert evaluation.summarize(rows, np.repeat(generated, 26, axis=0)[:1001], big)["kid"]["subset_size"] == 1000
    assert seen == [(1001, 1200, 100, 1000)]


@pytest.mark.parametrize("case", ["missing", "not-npz", "bad-npz", "one-image", "corrupt", "no-inception"])
def test_fid_reference_errors_are_one_line(scorers, tmp_path, case):
    path = tmp_path / "ref"
    named = str(path)
    if case == "not-npz":
        path = tmp_path / "ref.txt"
        path.write_text("x")
        named = str(path)
    elif case == "bad-npz":
        path = tmp_path / "ref.npz"
        np.savez(path, mu=np.zeros(3))
        named = str(path)
    elif case in ("one-image", "corrupt", "no-inception"):
        path.mkdir()
        _random_images(1)[0].save(path / "a.png")
        if case == "corrupt":
            (path / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg")
            named = str(path / "b.jpg")
        if case == "no-inception":
            _random_images(1)[0].save(path / "b.png")
    use = evaluation.Scorers() if case == "no-inception" else scorers
    with pytest.raises(MemcoreError) as caught:
        evaluation.FIDReference.load(path, use)
    assert named in _one_line(caught) and caught.value.param == "fid_reference"
    assert caught.value.render(FlagWords(_evaluate_parser(), "evaluate")).startswith("--fid-reference: ")


def test_fid_dimension_mismatch_is_one_line(tmp_path):
    metrics.save_fid_statistics(tmp_path / "small.npz", np.zeros(4), np.eye(4))
    reference = evaluation.FIDReference.load(tmp_path / "small.npz", evaluation.Scorers())
    rows = [{"prompt": 0, "seed": s, "sscd": None, "clip": None, "seconds": None} for s in range(3)]
    with pytest.raises(MemcoreError, match="statistics of 4 features") as caught:
        evaluation.summarize(rows, np.zeros((3, 2048)), reference)
    assert caught.value.param == "fid_reference"


# --- summaries ------------------------------------------------------------------------------------


def _rows():
    """Hand-made rows: 4 prompts, uneven seeds, prompt 3 without ground truth, exact thresholds."""
    table = {
        (0, 0): 0.9, (0, 1): 0.5, (0, 2): 0.7,   # 0.5 and 0.7 are not "above"
        (1, 0): 0.2, (1, 1): 0.71,
        (2, 0): 0.6,
        (3, 0): None, (3, 1): None,
    }
    clip = {key: 0.1 * (key[0] + 1) + 0.01 * key[1] for key in table}
    return [
        {"prompt": p, "seed": s, "sscd": v, "clip": clip[p, s], "seconds": 0.5 + p} for (p, s), v in table.items()
    ]


def _brute_sscd(rows, thresholds=(0.5, 0.7)):
    scored = [r for r in rows if r["sscd"] is not None]
    prompts = sorted({r["prompt"] for r in scored})
    per_prompt = []
    for p in prompts:
        values = [r["sscd"] for r in scored if r["prompt"] == p]
        per_prompt.append(sum(values) / len(values))
    out = {
        "score": sum(per_prompt) / len(per_prompt),
        "mean": sum(r["sscd"] for r in scored) / len(scored),
        "max": max(r["sscd"] for r in scored),
        "images": len(scored),
        "prompts": len(prompts),
    }
    for t in thresholds:
        out[f"above_{t:g}"] = sum(1 for r in scored if r["sscd"] > t) / len(scored)
    return out


def test_summarize_against_brute_force():
    rows = _rows()
    summary = evaluation.summarize(rows)
    expected = _brute_sscd(rows)
    assert summary["sscd"] == {k: pytest.approx(v, abs=1e-12) for k, v in expected.items()}
    # by hand: prompt means 0.7, 0.455, 0.6 -> 0.585; image mean 3.61 / 6; strictly above 0.5: 0.9, 0.7, 0.71, 0.6
    assert summary["sscd"]["score"] == pytest.approx((0.7 + 0.455 + 0.6) / 3, abs=1e-12)
    assert summary["sscd"]["mean"] == pytest.approx(3.61 / 6, abs=1e-12)
    assert summary["sscd"]["above_0.5"] == pytest.approx(4 / 6) and summary["sscd"]["above_0.7"] == pytest.approx(2 / 6)
    assert summary["images"] == 8 and summary["prompts"] == 4
    assert summary["notes"] == ["1 prompt has no ground-truth image and no SSCD score"]
    clip_means = [sum(r["clip"] for r in rows if r["prompt"] == p) / sum(1 for r in rows if r["prompt"] == p) for p in range(4)]
    assert summary["clip"]["score"] == pytest.approx(sum(clip_means) / 4, abs=1e-12)
    assert summary["clip"]["mean"] == pytest.approx(sum(r["clip"] for r in rows) / 8, abs=1e-12)
    assert summary["seconds"] == {"total": pytest.approx(sum(r["seconds"] for r in rows)),
                                  "per_image": pytest.approx(sum(r["seconds"] for r in rows) / 8)}
    assert summary["fid"] is None and summary["kid"] is None
    json.dumps(summary, allow_nan=False)
    # other thresholds; the boundary is strict
    custom = evaluation.summarize(rows, thresholds=(0.6, 0.9))
    assert custom["sscd"]["above_0.6"] == pytest.approx(3 / 6) and custom["sscd"]["above_0.9"] == 0.0


def test_summarize_by_label():
    rows = _rows()
    labels = ["VM", "TM", "VM", "TM"]
    summary = evaluation.summarize(rows, labels=labels)
    by_label = summary["sscd"]["by_label"]
    assert set(by_label) == {"VM", "TM"}
    for label in ("VM", "TM"):
        expected = _brute_sscd([r for r in rows if labels[r["prompt"]] == label])
        assert by_label[label] == {k: pytest.approx(v, abs=1e-12) for k, v in expected.items()}
    assert by_label["TM"]["prompts"] == 1  # prompt 3 (TM) has no score
    with pytest.raises(ValueError, match="labels"):
        evaluation.summarize(rows, labels=["VM"])


def test_summarize_without_scores():
    rows = [{"prompt": p, "seed": 0, "sscd": None, "clip": None, "seconds": None} for p in range(3)]
    summary = evaluation.summarize(rows, labels=["VM", "TM", "VM"])
    assert summary == {"images": 3, "prompts": 3, "sscd": None, "clip": None, "fid": None, "kid": None,
                       "seconds": None, "notes": []}
    with pytest.raises(ValueError, match="nan"):
        evaluation.summarize([{"prompt": 0, "seed": 0, "sscd": math.nan, "clip": None, "seconds": None}])


# --- table, figure, comparison --------------------------------------------------------------------


def test_per_image_csv(tmp_path):
    rows = [
        {"method": "wen", "prompt": 0, "seed": 1, "label": "VM", "image": "wen/0000_1.png", "sscd": 0.25, "clip": None, "seconds": 2.0},
        {"method": "none", "prompt": 2, "seed": 0, "image": "none/0002_0.png", "sscd": None, "clip": 0.3, "seconds": 1.5},
        {"method": "pruned", "prompt": 0, "seed": 0, "label": "TM", "image": "p.png", "sscd": 0.1, "clip": 0.2, "seconds": 1.0},
        {"method": "none", "prompt": 0, "seed": 10, "label": "TM", "image": "n.png", "sscd": 1 / 3, "clip": 0.2, "seconds": 1.0},
        {"method": "none", "prompt": 0, "seed": 9, "label": "TM", "image": "m.png", "sscd": 0.5, "clip": 0.2, "seconds": 1.0},
    ]
    path = evaluation.write_per_image_csv(rows, tmp_path / "images.csv")
    with open(path, encoding="utf-8", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == list(evaluation.CSV_COLUMNS)
    assert [(r[0], r[1], r[2]) for r in table[1:]] == [
        ("none", "0", "9"), ("none", "0", "10"), ("none", "2", "0"), ("pruned", "0", "0"), ("wen", "0", "1")
    ]
    assert table[3] == ["none", "2", "0", "", "none/0002_0.png", "", "0.3", "1.5"]
    assert float(table[2][5]) == 1 / 3  # exact round trip
    assert [p.name for p in tmp_path.iterdir()] == ["images.csv"]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _summary(sscd, clip, seconds):
    return {"images": 4, "prompts": 2, "sscd": {"score": sscd}, "clip": {"score": clip}, "fid": None, "kid": None,
            "seconds": {"total": 4 * seconds, "per_image": seconds}, "notes": []}


def test_draw_comparison_writes_a_png_of_the_expected_size(tmp_path):
    from memcore.figures import DPI

    points = [("none", _summary(0.6, 0.32, 1.0)), ("pruned", _summary(0.3, 0.30, 1.0)), ("wen", _summary(0.35, 0.31, 2.5)),
              ("no-scores", {"sscd": None, "clip": None, "seconds": None})]
    path = evaluation.draw_comparison(points, tmp_path / "comparison.png")
    expected = (round(evaluation.FIGURE_SIZE[0] * DPI), round(evaluation.FIGURE_SIZE[1] * DPI))
    assert _png_size(path) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["comparison.png"]
    evaluation.draw_comparison([("none", {"sscd": None, "clip": None, "seconds": None})], tmp_path / "empty.png")
    assert _png_size(tmp_path / "empty.png") == expected


def _run_folder(folder, methods):
    folder.mkdir()
    summary = {"format": evaluation.FORMAT, "methods": methods}
    (folder / "summary.json").write_text(json.dumps(summary, allow_nan=False))
    return folder


def test_compare_two_run_folders(tmp_path, monkeypatch):
    a = _run_folder(tmp_path / "sd1", {"wen": _summary(0.3, 0.3, 2.0), "none": _summary(0.6, 0.32, 1.0)})
    b = _run_folder(tmp_path / "sd1-pruned", {"pruned": _summary(0.2, 0.29, 1.0), "custom": _summary(0.4, 0.2, 1.1)})
    drawn = []
    real = evaluation.draw_comparison
    monkeypatch.setattr(evaluation, "draw_comparison", lambda points, path: drawn.append(points) or real(points, path))
    out = evaluation.compare([a, b], tmp_path / "compare.png")
    assert _png_size(out)[0] > 0
    assert [label for label, _ in drawn[0]] == ["sd1/none", "sd1/wen", "sd1-pruned/pruned", "sd1-pruned/custom"]
    assert drawn[0][0][1]["sscd"]["score"] == 0.6
    evaluation.compare([a], tmp_path / "one.png")
    assert [label for label, _ in drawn[1]] == ["none", "wen"]


@pytest.mark.parametrize("case", ["no-folder", "no-summary", "not-json", "wrong-format", "no-methods"])
def test_compare_errors_name_the_folder(tmp_path, case):
    good = _run_folder(tmp_path / "good", {"none": _summary(0.5, 0.3, 1.0)})
    bad = tmp_path / "bad"
    if case != "no-folder":
        bad.mkdir()
    if case == "not-json":
        (bad / "summary.json").write_text("{half")
    elif case == "wrong-format":
        (bad / "summary.json").write_text(json.dumps({"format": "memcore.evaluation/0", "methods": {}}))
    elif case == "no-methods":
        (bad / "summary.json").write_text(json.dumps({"format": evaluation.FORMAT, "methods": {}}))
    with pytest.raises(MemcoreError) as caught:
        evaluation.compare([good, bad], tmp_path / "compare.png")
    assert str(bad) in _one_line(caught)
    assert not (tmp_path / "compare.png").exists()
