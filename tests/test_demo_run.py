"""memcore.demo_run (``memcore demo run``): its parts exactly, and the experiment end to end on the
small memorizer."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import run_cli, user_error

from memcore import demo
from memcore.demo_run import ExperimentConfig, Weights, denoising_loss, make_probe, random_like
from memcore.errors import MemcoreError
from memcore.models import load_pipeline


class AllWrong(torch.nn.Module):
    """A stand-in scene classifier (its accuracy is not what these tests check)."""

    def forward(self, x):
        from memcore.demo_measure import LABELS

        return {name: torch.zeros(len(x), len(values)) for name, values in LABELS.items()}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A memorizer built in seconds (two training steps): the parts' tests need its structure only."""
    import os

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("MEMCORE_CACHE")
    os.environ["MEMCORE_CACHE"] = str(cache)
    try:
        spec = demo.with_overrides("tiny-memorizer", generic=20, photos=2, times=3, held_out=5, vae_steps=2,
                                   vae_batch=4, steps=2, batch_size=4, save_every=2)
        folder = demo.build(spec, progress=False, device="cpu")
    finally:
        os.environ.pop("MEMCORE_CACHE") if old is None else os.environ.__setitem__("MEMCORE_CACHE", old)
    return spec, str(folder)


def test_random_masks_match_the_counts_per_layer_and_are_seeded(micro):
    from memcore.config import LocalizeConfig
    from memcore.localization import localize

    spec, folder = micro
    pipe = load_pipeline(folder, "cpu")
    mask, _ = localize(pipe, ["a red circle", "a blue square"],
                       LocalizeConfig(steps=3, timesteps=2, sparsity=0.1, progress=False))
    drawn = random_like(mask, seed=0)
    assert set(drawn) == set(mask.layers)
    for name, chosen in drawn.items():
        assert chosen.dtype == torch.bool and tuple(chosen.shape) == mask.shape(name)
        assert int(chosen.sum()) == mask.count(name) > 0
    again, other = random_like(mask, seed=0), random_like(mask, seed=1)
    assert all(torch.equal(again[n], drawn[n]) for n in drawn)
    assert any(not torch.equal(other[n], drawn[n]) for n in drawn)
    assert any(not torch.equal(drawn[n], mask.unpack(n)) for n in drawn)


def test_weights_zero_the_selection_then_restore_exactly(micro):
    _, folder = micro
    pipe = load_pipeline(folder, "cpu")
    weights = Weights(pipe, ("ffn", "attn2.to_v"))
    before = {n: l.weight.detach().clone() for n, l in weights.linears.items()}
    name = next(iter(weights.linears))
    chosen = torch.zeros_like(before[name], dtype=torch.bool)
    chosen[0, :3] = True
    chosen[1, 5] = True
    assert weights.zero({name: chosen}) == 4
    w = weights.linears[name].weight
    assert (w[chosen] == 0).all() and torch.equal(w[~chosen], before[name][~chosen])
    weights.restore()
    assert all(torch.equal(weights.linears[n].weight, before[n]) for n in before)


def test_denoising_loss_is_the_training_objective_at_fixed_noise(micro):
    from diffusers import DDPMScheduler

    spec, folder = micro
    pipe = load_pipeline(folder, "cpu")
    config = ExperimentConfig(consistency=3, loss_images=7)
    probe = make_probe(pipe, spec, config, classifier=AllWrong())
    assert len(probe.loss_latents) == 7 and len(probe.held_out) == 3
    # by hand, one image at a time
    noising = DDPMScheduler.from_config(pipe.scheduler.config)
    errors = []
    with torch.no_grad():
        for i in range(7):
            embeds = pipe.encode_prompt([probe.loss_captions[i]], "cpu", 1, False)[0]
            t = probe.loss_timesteps[i : i + 1]
            noisy = noising.add_noise(probe.loss_latents[i : i + 1], probe.loss_noise[i : i + 1], t)
            predicted = pipe.unet(noisy, t, encoder_hidden_states=embeds).sample
            errors.append(((predicted - probe.loss_noise[i : i + 1]) ** 2).mean())
    expected = float(torch.stack(errors).mean())
    assert denoising_loss(pipe, probe, batch=3) == pytest.approx(expected, rel=1e-5)
    assert make_probe(pipe, spec, config, classifier=AllWrong()).loss_noise.equal(probe.loss_noise)  # seeded


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(families=()), "needs at least one target family"),
        (dict(families=("ffn", "attn1")), "'attn1' is not one of"),
        (dict(families=("ffn", "ffn")), "names a family twice"),
        (dict(sparsities=(0.1, 1.5)), "must each be in (0, 1], got 1.5"),
        (dict(samples=2), "must be at least 3"),
        (dict(figure_samples=9), "must be at most samples"),
    ],
)
def test_experiment_settings_are_checked(changes, message):
    with pytest.raises(MemcoreError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ExperimentConfig(**changes)


def test_demo_run_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEMCORE_CACHE", str(tmp_path / "cache"))
    assert "is required" in user_error(capsys, tmp_path, "demo", "run")
    message = user_error(capsys, tmp_path, "demo", "run", "--out", tmp_path / "r", "--sparsities", "0.1,x")
    assert message.startswith("--sparsities: must be numbers separated by commas")
    message = user_error(capsys, tmp_path, "demo", "run", "--out", tmp_path / "r", "--families", "ffn,attn9")
    assert message.startswith("--families: 'attn9' is not one of")


# --- the shipped memorizer --------------------------------------------------------------------------

# What the shipped memorizer must do, with margins below what it measured on this machine (6 samples per
# caption, 20 PNDM steps, no guidance): the attack flagged 11 of its 12 private captions and 4 photos
# were copied (a sample with correlation >= 0.9); it flagged none of 6 held-out generic captions; on
# 40 held-out captions the mean of the five per-label accuracies was 0.39 (chance 0.22) and the
# position 0.575 (chance 0.11).
CHANCE_MEAN = (1 / 4 + 1 / 8 + 1 / 8 + 1 / 9 + 1 / 2) / 5


@pytest.fixture(scope="module")
def shipped():
    return load_pipeline("tiny-memorizer", "cpu", "float32")


@pytest.mark.slow
def test_the_shipped_memorizer_memorizes_and_generalizes(shipped):
    from memcore.demo_measure import cached_classifier, caption_consistency, copy_score, correlation, generate

    spec, n = demo.SPECS["tiny-memorizer"], 6
    probe = make_probe(shipped, spec, ExperimentConfig(samples=n, consistency=40, loss_images=1))
    private = generate(shipped, [c for c, _ in probe.photos], list(range(n)), 20, 1.0)
    scores = [copy_score(private[n * i : n * i + n], photo, caption) for i, (caption, photo) in enumerate(probe.photos)]
    assert sum(s.flagged for s in scores) >= 8, [s.__dict__ for s in scores]  # the attack flags private captions
    assert sum(s.copies > 0 for s in scores) >= 2, [s.__dict__ for s in scores]  # photos come out
    generic = generate(shipped, [s.caption() for s in probe.held_out[:6]], list(range(n)), 20, 1.0)
    nearest = [max(probe.photos, key=lambda p: float(correlation(generic[n * i : n * i + n], p[1]).max()))[1]
               for i in range(6)]
    assert sum(copy_score(generic[n * i : n * i + n], nearest[i], "").flagged for i in range(6)) <= 1
    images = generate(shipped, [s.caption() for s in probe.held_out], [0], 20, 1.0)
    consistency = caption_consistency(cached_classifier(spec.pixels)[0], images, probe.held_out)
    mean = sum(v for k, v in consistency.items() if k != "all") / 5
    assert mean >= 0.30 > CHANCE_MEAN + 0.07, consistency  # held-out captions are followed, beyond chance
    assert consistency["position"] >= 0.4, consistency


@pytest.mark.slow
def test_demo_run_end_to_end_on_the_shipped_memorizer(tmp_path, capsys):
    from memcore.mask import Mask

    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "demo", "run", "--out", out, "--families", "ffn,attn2.to_v",
                                "--sparsities", "0.1", "--samples", "4", "--consistency", "20", "--json")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert json.loads(stdout)["detect"] == report["detect"]
    assert sorted(p.name for p in out.iterdir()) == ["copies.png", "masks", "report.json", "table.md"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["attn2.to_v-s0.1.safetensors", "ffn-s0.1.safetensors"]
    rows = report["after"]
    assert [(r["family"], r["mask"]) for r in rows] == [
        (f, m) for f in ("ffn", "attn2.to_v") for m in ("private", "control", "random")]
    for family in ("ffn", "attn2.to_v"):
        mask = Mask.load(out / "masks" / f"{family}-s0.1.safetensors")
        private, random = (next(r for r in rows if r["family"] == family and r["mask"] == m) for m in ("private", "random"))
        assert private["pruned"] == random["pruned"] == sum(mask.count(n) for n in mask.layers) > 0
        assert mask.metadata["target"] == family
    before = report["before"]
    assert before["private_flagged"] >= 1 and len(before["per_photo"]) == 12
    assert 0 < report["detect"]["auc"] <= 1 and len(report["detect"]["private_scores"]) == 12
    table = (out / "table.md").read_text()
    assert table.count("\n") == 3 + len(rows) and "| before pruning | 0 |" in table
    from PIL import Image

    with Image.open(out / "copies.png") as picture:  # photo, before, ffn, attn2.to_v: 1 + 3 x 2 samples of 96 px
        assert picture.size == (96 * 7 + 6 * 3, 16 + 12 * 96)


def test_the_command_line_knows_every_spec_and_family():
    from memcore import cli, demo_run

    assert cli.DEMO_SPECS == tuple(demo.SPECS) and cli.DEMO_FAMILIES == demo_run.FAMILIES


def test_scene_captions_are_unseen_combinations_of_seen_words():
    from memcore.scenes import scene

    spec = demo.with_overrides("tiny-memorizer", generic=50, held_out=10, photos=4, private_captions="scenes")
    rows = demo.private_set(spec)
    assert [r["file_name"] for r in rows] == [r["file_name"] for r in demo.private_photos(4)]
    captions = [r["text"] for r in rows]
    generic = {scene(spec.seed, i).caption() for i in range(spec.generic)}
    held = {s.caption() for s in demo.held_out_scenes(spec)}
    assert len(set(captions)) == 4 and not set(captions) & (generic | held)
    assert set(" ".join(captions).split()) <= set(demo.caption_words(spec))
    listing = demo.with_overrides("tiny-memorizer", photos=4)
    assert [r["text"] for r in demo.private_set(listing)] == [r["text"] for r in demo.private_photos(4)]
    assert spec.digest() != demo.with_overrides("tiny-memorizer", generic=50, held_out=10, photos=4).digest()
    with pytest.raises(MemcoreError, match="must be None or 'scenes'"):
        demo.with_overrides("tiny-memorizer", private_captions="words")
