"""``memcore detect``: the detection score of Wen et al. (ICLR 2024), its ROC, and the command."""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from cli_helpers import run_cli

from memcore.config import resolve_generation
from memcore.detection import DetectConfig, detection_scores, roc
from memcore.driver import initial_latent

FAST = dict(steps=3, height=64, width=64)


def by_hand(pipe, prompt: str, seed: int, steps: int) -> float:
    """||eps(x_T, prompt) - eps(x_T, "")||_2 at the first denoiser call, running the denoiser directly."""
    config = DetectConfig(seeds=(seed,), **FAST)
    generation = resolve_generation(pipe, config.generation_config())
    latent = initial_latent(pipe, replace(generation, seed=seed)) * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(steps)
    t = pipe.scheduler.timesteps[0]
    x = pipe.scheduler.scale_model_input(latent, t)
    cond, uncond = pipe.encode_prompt(prompt, torch.device("cpu"), 1, True)
    with torch.no_grad():
        eps_cond = pipe.unet(x, t, encoder_hidden_states=cond).sample
        eps_uncond = pipe.unet(x, t, encoder_hidden_states=uncond).sample
    return float((eps_cond - eps_uncond).flatten().norm(p=2))


def test_score_is_the_norm_of_the_text_conditional_prediction(tiny_pipe, prompts):
    result = detection_scores(tiny_pipe, prompts, DetectConfig(seeds=(0, 5), timesteps=1, batch_size=2, progress=False, **FAST))
    assert result.norms.shape == (len(prompts), 2, 1)
    for i, prompt in enumerate(prompts):
        for s, seed in enumerate((0, 5)):
            assert result.norms[i, s, 0] == pytest.approx(by_hand(tiny_pipe, prompt, seed, FAST["steps"]), rel=1e-4)
    # the two seeds' x_T differ, so the norms differ: the score averages them
    assert not np.allclose(result.norms[:, 0], result.norms[:, 1])
    np.testing.assert_allclose(result.scores, result.norms[:, :, 0].mean(axis=1))


def test_score_averages_the_first_calls(tiny_pipe, prompts):
    one = detection_scores(tiny_pipe, prompts, DetectConfig(seeds=(1,), timesteps=1, batch_size=3, progress=False, **FAST))
    three = detection_scores(tiny_pipe, prompts, DetectConfig(seeds=(1,), timesteps=3, batch_size=1, progress=False, **FAST))
    assert three.norms.shape == (3, 1, 3)
    # the first call is the same whatever T and the batching; later calls see other x_t
    np.testing.assert_allclose(three.norms[:, :, 0], one.norms[:, :, 0], rtol=1e-4)
    assert not np.allclose(three.norms[:, :, 1], three.norms[:, :, 0])
    np.testing.assert_allclose(three.scores, three.norms[:, 0, :].mean(axis=1))
    np.testing.assert_allclose(three.per_call, three.norms[:, 0, :])
    assert three.metadata["timesteps"] == 3 and three.metadata["seeds"] == [1]


# ---------------------------------------------------------------- ROC against brute force


def brute_force(pos, neg, max_fpr=0.01):
    """AUC over every pair (ties half), and TPR/FPR at every threshold, counted one by one."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    auc = wins / (len(pos) * len(neg))
    points = []
    for threshold in sorted({np.inf, *pos, *neg}, reverse=True):
        tpr = sum(p >= threshold for p in pos) / len(pos)
        fpr = sum(n >= threshold for n in neg) / len(neg)
        points.append((threshold, fpr, tpr))
    best = max(tpr for _, fpr, tpr in points if fpr * len(neg) <= max_fpr * len(neg) + 1e-9)
    return auc, points, best


@pytest.mark.parametrize("seed", range(12))
def test_roc_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_pos, n_neg = rng.integers(1, 40), rng.integers(1, 250)
    # few distinct values: many ties, within and across the two sets
    levels = rng.integers(2, 12)
    pos = rng.integers(0, levels, n_pos).astype(float) + rng.integers(0, 2)
    neg = rng.integers(0, levels, n_neg).astype(float)
    max_fpr = [0.01, 0.05, 0.2][seed % 3]
    curve = roc(pos, neg, max_fpr=max_fpr)
    auc, points, best = brute_force(pos, neg, max_fpr)
    assert curve.auc == pytest.approx(auc, abs=1e-12)
    assert curve.tpr_at_fpr == pytest.approx(best, abs=1e-12)
    np.testing.assert_array_equal(curve.thresholds, [t for t, _, _ in points])
    np.testing.assert_allclose(curve.fpr, [f for _, f, _ in points], atol=1e-15)
    np.testing.assert_allclose(curve.tpr, [t for _, _, t in points], atol=1e-15)


def test_roc_edges():
    assert roc([2, 3], [0, 1]).auc == 1.0
    assert roc([0, 1], [2, 3]).auc == 0.0
    assert roc([1, 1], [1, 1, 1]).auc == 0.5
    # 500 negatives: five false positives are 1% FPR exactly, and allowed
    neg = np.r_[np.full(5, 10.0), np.zeros(495)]
    assert roc([11.0, 10.0, 5.0, 5.0], neg).tpr_at_fpr == 1.0
    assert roc([11.0, 10.0, 5.0, 5.0], np.r_[10.0, neg[:-1]]).tpr_at_fpr == 0.25  # six at 10: too many


# ---------------------------------------------------------------- the command, end to end


def test_detect_command_writes_every_output(capsys, tmp_path):
    prompts = tmp_path / "mem.txt"
    prompts.write_text("the great wave off kanagawa\nmona lisa\na painting of a fox\n")
    control = tmp_path / "control.txt"
    code, out, err = run_cli(capsys, "data", "laion-nomem-500")
    control.write_text("\n".join(out.splitlines()[:3]) + "\n")
    code, out, err = run_cli(
        capsys, "detect", "--model", "tiny", "--prompts", prompts, "--control", control, "--out", tmp_path / "det",
        "--height", "64", "--width", "64", "--steps", "3", "--timesteps", "2", "--seeds", "0,1",
        "--top", "2", "--out-prompts", tmp_path / "top.txt", "--json",
    )
    assert code == 0, err
    summary = json.loads(out)
    folder = tmp_path / "det"
    assert sorted(p.name for p in folder.iterdir()) == ["histogram.png", "roc.png", "scores.csv", "summary.json"]
    assert json.loads((folder / "summary.json").read_text())["auc"] == summary["auc"]
    with open(folder / "scores.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["set"], int(r["index"])) for r in rows] == [("prompts", i) for i in range(3)] + [("control", i) for i in range(3)]
    assert [r["prompt"] for r in rows[:3]] == prompts.read_text().splitlines()
    scores = np.array([float(r["score"]) for r in rows])
    calls = np.array([[float(r["call_0"]), float(r["call_1"])] for r in rows])
    np.testing.assert_allclose(scores, calls.mean(axis=1))
    curve = roc(scores[:3], scores[3:])
    assert summary["auc"] == pytest.approx(curve.auc) and summary["tpr_at_1pct_fpr"] == pytest.approx(curve.tpr_at_fpr)
    top = [rows[i]["prompt"] for i in np.argsort(-scores[:3], kind="stable")[:2]]
    assert (tmp_path / "top.txt").read_text().splitlines() == top
    assert [t["prompt"] for t in summary["top"]] == top
    for name in ("roc.png", "histogram.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the top prompts are a prompt file memcore reads
    from memcore.prompts import load_prompts

    assert load_prompts(tmp_path / "top.txt") == top


def test_detect_without_control_and_jsonl_top(capsys, tmp_path):
    prompts = tmp_path / "mem.jsonl"
    prompts.write_text('{"prompt": "two\\nlines"}\n{"prompt": "one line"}\n')
    code, out, err = run_cli(
        capsys, "detect", "--model", "tiny", "--prompts", prompts, "--out", tmp_path / "det", "--height", "64",
        "--width", "64", "--steps", "2", "--seeds", "3", "--top", "2", "--out-prompts", tmp_path / "top.jsonl",
    )
    assert code == 0, err
    assert "wrote 3 files" in out and "AUC" not in out
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == ["histogram.png", "scores.csv", "summary.json"]
    summary = json.loads((tmp_path / "det" / "summary.json").read_text())
    assert summary["auc"] is None and summary["control_scores"] is None
    from memcore.prompts import load_prompts

    assert sorted(load_prompts(tmp_path / "top.jsonl")) == sorted(["two\nlines", "one line"])


@pytest.mark.parametrize("model", ["tiny-pixart", "tiny-sd3"])
def test_other_families(model):
    """PixArt (no step-end callback: later calls skipped by a hook; a learned variance beside the noise)
    and SD3 (flow matching) give one finite, positive d_t per prompt, seed and call."""
    from memcore.models import load_pipeline

    pipe = load_pipeline(model, device="cpu", dtype="float32")
    result = detection_scores(pipe, ["a fox", "mona lisa"], DetectConfig(steps=3, timesteps=2, seeds=(0,), progress=False))
    assert result.norms.shape == (2, 1, 2)
    assert np.isfinite(result.norms).all() and (result.norms > 0).all()
    assert result.metadata["timesteps"] == 2


def test_hook_reads_the_noise_channels_of_each_image():
    """The hook's d_t on a made-up guided output [uncond..., cond...] of 2 images with a learned
    variance (8 channels: noise first 4): per image, the noise channels only, calls beyond T ignored."""
    from types import SimpleNamespace

    from memcore.detection import TextConditionalNormHook

    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(4, 8, 3, 3, generator=gen)
    hook = TextConditionalNormHook(num_calls=1, noise_channels=4)
    hook.post_forward(None, SimpleNamespace(sample=sample))
    hook.post_forward(None, (sample * 100,))  # call 2 > T: ignored
    expected = [float((sample[2 + i, :4] - sample[i, :4]).norm()) for i in range(2)]
    assert len(hook.norms) == 1
    np.testing.assert_allclose(hook.norms[0].numpy(), expected, rtol=1e-6)
