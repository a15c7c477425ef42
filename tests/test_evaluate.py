"""memcore evaluate end to end on the tiny model, with random stand-ins for SSCD, CLIP and Inception."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import standins
from cli_helpers import run_cli, user_error
from memcore import evaluation as ev
from memcore import metrics
from memcore.runs import Run, partial_path

PROMPTS = ["a red car", "a blue house on a hill", "the cat"]
SMALL = ["--model", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "--batch-size", "2"]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Prompts, stand-in scorers, two ground-truth images (none for prompt 2), a reference folder, a mask."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    standins.write_sscd(root / "sscd.pt")
    standins.write_inception(root / "inception.pt")
    standins.write_clip(root / "clip")
    rng = np.random.default_rng(0)
    (root / "gt").mkdir()
    (root / "ref").mkdir()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "gt" / "0000.png")
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(root / "gt" / "0000_1.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "gt" / "0001.png")
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "ref" / f"{i}.png")
    from memcore.config import LocalizeConfig
    from memcore.localization import localize
    from memcore.models import load_pipeline

    mask, _ = localize(load_pipeline("tiny", "cpu", "float32"), PROMPTS, LocalizeConfig(steps=2, height=64, width=64, timesteps=2, progress=False))
    mask.save(root / "m.safetensors")
    return root


def scorer_args(root):
    return ["--ground-truth", root / "gt", "--sscd", root / "sscd.pt", "--clip", root / "clip",
            "--inception", root / "inception.pt", "--fid-reference", root / "ref"]


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    """One run of the three methods, with every score."""
    out = tmp_path_factory.mktemp("runs") / "run"
    code = _main(
        "evaluate", *SMALL, "--prompts", inputs / "p.txt", "--seeds", "0,1", "--mask", inputs / "m.safetensors",
        "--localize-seconds", "4.5", "--mitigation", "wen", "--wen-max-steps", "2", *scorer_args(inputs), "--out", out,
    )
    assert code == 0
    return out


def _main(*argv):
    from memcore.cli import main

    return main([str(a) for a in argv])


def read_rows(folder):
    with open(folder / "per_image.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_writes_every_image_row_and_method(finished):
    rows = read_rows(finished)
    assert [(r["method"], int(r["prompt"]), int(r["seed"])) for r in rows] == [
        (m, p, s) for m in ("none", "pruned", "wen") for p in range(3) for s in (0, 1)
    ]
    for row in rows:
        assert (finished / row["image"]).is_file()
        with Image.open(finished / row["image"]) as image:
            info = json.loads(image.text["memcore"])
        assert (info["method"], info["prompt_index"], info["seed"]) == (row["method"], int(row["prompt"]), int(row["seed"]))
        assert (info["mask_sha256"] is not None) == (row["method"] == "pruned")
    assert sorted(p.name for p in finished.iterdir()) == ["figure.png", "images", "per_image.csv", "summary.json"]
    assert not partial_path(finished).exists()
    with Image.open(finished / "figure.png") as figure:
        assert figure.format == "PNG"


def test_scores_are_those_of_the_saved_images(finished, inputs):
    """Every score recomputed from the PNG files with memcore.metrics directly."""
    scorers = ev.load_scorers(sscd=inputs / "sscd.pt", clip=inputs / "clip", inception=inputs / "inception.pt")
    truth = {i: ev.images_to_tensor([ev.read_image(p, "gt")]) for i, p in
             (("0", inputs / "gt" / "0000.png"), ("0b", inputs / "gt" / "0000_1.jpg"), ("1", inputs / "gt" / "0001.png"))}
    embed = {k: metrics.sscd_embed(scorers.sscd, v) for k, v in truth.items()}
    reference = {"0": np.concatenate([embed["0"], embed["0b"]]), "1": embed["1"].numpy()}
    summary = json.loads((finished / "summary.json").read_text())
    ref_features = metrics.inception_features(scorers.inception, ev.images_to_tensor([ev.read_image(p, "r") for p in sorted((inputs / "ref").iterdir())]))
    for method in ("none", "pruned", "wen"):
        rows = [r for r in read_rows(finished) if r["method"] == method]
        fid = method == "pruned"  # one Frechet distance of 2048 features takes seconds here
        images = ev.images_to_tensor([ev.read_image(finished / r["image"], "x") for r in rows])
        gen = metrics.sscd_embed(scorers.sscd, images)
        for row, g in zip(rows, gen):
            ref = reference.get(row["prompt"])
            expected = None if ref is None else float((g @ torch.tensor(ref).T).max())
            assert (row["sscd"] == "") == (expected is None)
            if expected is not None:
                assert float(row["sscd"]) == pytest.approx(expected, abs=1e-6)
        clip = metrics.clip_score(*scorers.clip, images, [PROMPTS[int(r["prompt"])] for r in rows])
        assert [float(r["clip"]) for r in rows] == pytest.approx(clip.tolist(), abs=1e-6)
        # the paper's aggregate: mean over prompts (with ground truth) of the mean over seeds
        per_prompt = {}
        for row in rows:
            if row["sscd"]:
                per_prompt.setdefault(row["prompt"], []).append(float(row["sscd"]))
        assert summary["methods"][method]["sscd"]["score"] == pytest.approx(np.mean([np.mean(v) for v in per_prompt.values()]))
        if fid:
            features = metrics.inception_features(scorers.inception, images)
            expected_fid = metrics.frechet_distance(*metrics.fid_statistics(features), *metrics.fid_statistics(ref_features))
            assert summary["methods"][method]["fid"] == pytest.approx(expected_fid, rel=1e-6)


def test_methods_start_from_the_same_noise_as_generate(finished, inputs, tmp_path, capsys):
    """evaluate's none and pruned images are generate's original and pruned images, pixel for pixel."""
    code, _, err = run_cli(capsys, "generate", *SMALL, "--prompts", inputs / "p.txt", "--seeds", "0,1",
                           "--mask", inputs / "m.safetensors", "--out", tmp_path / "g")
    assert code == 0, err
    for p in range(3):
        for s in (0, 1):
            assert np.array_equal(pixels(finished / f"images/none/p{p:03d}_s{s}.png"), pixels(tmp_path / f"g/images/p{p:03d}_s{s}.png"))
            assert np.array_equal(pixels(finished / f"images/pruned/p{p:03d}_s{s}.png"), pixels(tmp_path / f"g/images/p{p:03d}_s{s}_pruned.png"))


def test_time_counts_localize_and_prune_for_pruned(finished):
    summary = json.loads((finished / "summary.json").read_text())
    pruned = summary["methods"]["pruned"]["seconds"]
    assert pruned["localize"] == 4.5 and pruned["prune"] >= 0
    assert pruned["total"] == pytest.approx(pruned["generation"] + 4.5 + pruned["prune"], abs=1e-5)
    assert pruned["per_image"] == pytest.approx(pruned["total"] / 6, abs=1e-5)
    wen = summary["methods"]["wen"]
    assert wen["mitigation"]["max_steps"] == 2 and 0 <= wen["mitigation"]["reached_target"] <= 6
    rows = [r for r in read_rows(finished) if r["method"] == "wen"]
    assert wen["seconds"]["total"] == pytest.approx(sum(float(r["seconds"]) for r in rows), abs=1e-4)


def test_compare_redraws_the_figure(finished, tmp_path, capsys):
    code, out, err = run_cli(capsys, "evaluate", "--compare", finished, finished.parent / "run", "--out", tmp_path / "c.png")
    assert code == 0, err
    with Image.open(tmp_path / "c.png") as image:
        assert image.format == "PNG"


def test_labels_of_a_builtin_set_split_the_scores(tmp_path, capsys, inputs):
    code, _, err = run_cli(capsys, "evaluate", *SMALL, "--prompts", "mv_prompts_0", "--seeds", "0",
                           "--batch-size", "8", "--out", tmp_path / "run")
    assert code == 0, err
    from memcore import datasets

    labels = datasets.labels("mv_prompts_0")
    rows = read_rows(tmp_path / "run")
    assert [r["label"] for r in rows] == labels


def test_resumes_after_a_stop(inputs, tmp_path, monkeypatch, capsys):
    args = ["evaluate", *SMALL, "--prompts", inputs / "p.txt", "--seeds", "0,1", "--mask", inputs / "m.safetensors",
            "--sscd", inputs / "sscd.pt", "--ground-truth", inputs / "gt", "--out", tmp_path / "run"]
    original = Run.record
    count = []

    def stop(self, key, *a, **kw):
        if len(count) == 3:
            raise KeyboardInterrupt
        count.append(key)
        return original(self, key, *a, **kw)

    monkeypatch.setattr(Run, "record", stop)
    code, _, err = run_cli(capsys, *args)
    assert code == 130, err
    assert len(list((partial_path(tmp_path / "run") / "parts").glob("*.json"))) == 3
    monkeypatch.setattr(Run, "record", original)
    message = user_error(capsys, tmp_path, *[a if a != "0,1" else "0,2" for a in args])
    assert "other settings (seeds was [0, 1], is now [0, 2])" in message
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    code, _, err = run_cli(capsys, *args[:-1], tmp_path / "whole")
    assert code == 0, err
    resumed, whole = read_rows(tmp_path / "run"), read_rows(tmp_path / "whole")
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed] == [{k: v for k, v in r.items() if k != "seconds"} for r in whole]
    for row in whole:
        assert np.array_equal(pixels(tmp_path / "run" / row["image"]), pixels(tmp_path / "whole" / row["image"]))


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--sscd", "missing.pt", "--ground-truth", "GT"], "--sscd"),
        (["--ground-truth", "GT"], "--ground-truth: needs --sscd PATH"),
        (["--fid-reference", "GT"], "--fid-reference: needs --inception PATH"),
        (["--no-baseline"], "nothing to evaluate"),
        (["--localize-seconds", "3"], "--localize-seconds: must be a number >= 0 and goes with --mask"),
        (["--mitigation", "wen", "--guidance", "1"], "--guidance"),
        (["--sscd", "SSCD", "--ground-truth", "nowhere"], "--ground-truth nowhere: no such file or folder"),
        (["--sscd", "SSCD", "--ground-truth", "GT"], "--ground-truth"),  # an empty folder
        (["--clip", "no-such-clip"], "--clip"),
    ],
)
def test_mistakes_are_one_line_before_the_model_loads(inputs, tmp_path, capsys, monkeypatch, no_model, extra, expected):
    (tmp_path / "GT").mkdir()
    monkeypatch.chdir(tmp_path)
    extra = [str(inputs / "sscd.pt") if a == "SSCD" else a for a in extra]
    message = user_error(capsys, tmp_path, "evaluate", *SMALL, "--prompts", inputs / "p.txt", *extra, "--out", tmp_path / "run")
    assert expected in message


def test_unreadable_ground_truth_is_one_line(inputs, tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "0001.png").write_bytes(b"not a png")
    message = user_error(capsys, tmp_path, "evaluate", *SMALL, "--prompts", inputs / "p.txt", "--sscd", inputs / "sscd.pt",
                         "--ground-truth", tmp_path / "gt", "--out", tmp_path / "run")
    assert "0001.png" in message


def test_compare_mistakes(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "not a finished evaluate run" in user_error(capsys, tmp_path, "evaluate", "--compare", tmp_path / "empty", "--out", tmp_path / "c.png")
    assert "must be a .png file" in user_error(capsys, tmp_path, "evaluate", "--compare", tmp_path / "empty", "--out", tmp_path / "c.pdf")
    assert "drop --model" in user_error(capsys, tmp_path, "evaluate", "--compare", tmp_path / "empty", "--model", "tiny", "--out", tmp_path / "c.png")


@pytest.mark.slow
def test_two_processes_score_what_one_scores(inputs, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    args = ["evaluate", *SMALL, "--prompts", inputs / "p.txt", "--seeds", "0,1", "--mask", inputs / "m.safetensors",
            "--sscd", inputs / "sscd.pt", "--ground-truth", inputs / "gt", "--clip", inputs / "clip",
            "--inception", inputs / "inception.pt"]
    for n in (1, 2):
        launcher = [sys.executable, "-m", "memcore"] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "memcore"]
        done = subprocess.run(launcher + [str(a) for a in args] + ["--out", str(tmp_path / f"r{n}")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = read_rows(tmp_path / "r1"), read_rows(tmp_path / "r2")
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in one] == [{k: v for k, v in r.items() if k != "seconds"} for r in two]
    for row in one:
        assert (tmp_path / "r1" / row["image"]).read_bytes() == (tmp_path / "r2" / row["image"]).read_bytes()
    s1, s2 = (json.loads((tmp_path / f"r{n}" / "summary.json").read_text()) for n in (1, 2))
    for method in ("none", "pruned"):
        assert s1["methods"][method]["sscd"] == s2["methods"][method]["sscd"]
        assert s1["methods"][method]["clip"] == s2["methods"][method]["clip"]
    assert s2["processes"] == 2
