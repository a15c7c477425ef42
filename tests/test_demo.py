"""memcore.demo (the tiny memorizer's data, build and cache) and memcore.demo_measure (its scores)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import user_error
from PIL import Image

from memcore import demo
from memcore.demo_measure import COPY_CORRELATION, LABELS, copy_score, correlation, label_accuracy
from memcore.errors import MemcoreError

MICRO = dict(generic=20, photos=2, times=3, held_out=5, vae_steps=2, vae_batch=4, steps=2, batch_size=4, save_every=2)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMCORE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_private_photos_are_free_to_ship_and_credited():
    rows = demo.private_photos()
    assert len(rows) == 12
    for row in rows:
        assert row["licence"].startswith(("public domain", "CC0")), row
        assert row["source"].startswith("skimage.data.")
        assert len(row["text"]) <= 75  # BOS + EOS + 75 bytes fill the tokenizer's 77
        image = demo.load_photo(row["file_name"], 32)
        assert image.size == (32, 32) and image.mode == "RGB"
    assert len({r["text"] for r in rows}) == 12


def test_training_data_and_held_out_captions(tmp_path):
    spec = demo.with_overrides("tiny-memorizer", **MICRO)
    folder = demo.write_training_data(spec, tmp_path / "data")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    blank = round(spec.blank * spec.generic)
    assert len(rows) == spec.generic + blank + spec.photos * spec.times
    assert [r["file_name"] for r in rows if r["text"] == ""] == [f"blank/{i:05d}.png" for i in range(blank)]
    photos = demo.private_photos(spec.photos)
    for index, photo in enumerate(photos):
        copies = [r for r in rows if r.get("private") == index]
        assert len(copies) == spec.times and {r["text"] for r in copies} == {photo["text"]}
        pixels = {Image.open(folder / r["file_name"]).tobytes() for r in copies}
        assert pixels == {demo.load_photo(photo["file_name"], spec.pixels).tobytes()}
    private = [json.loads(line) for line in (folder / "private.jsonl").read_text().splitlines()]
    assert [p["caption"] for p in private] == [p["text"] for p in photos]
    from memcore.finetune import read_image_folder

    assert len(read_image_folder(folder)) == len(rows)
    held = demo.held_out_scenes(spec)
    training = {r["text"] for r in rows}
    assert len(held) == spec.held_out and len({s.caption() for s in held}) == spec.held_out
    assert not {s.caption() for s in held} & training


def test_a_build_is_cached_and_loads_in_every_command(cache, capsys):
    from memcore.models import load_pipeline

    message = user_error(capsys, cache.parent, "demo", "measure", "--built", "--out", cache.parent / "m")
    assert "not built on this machine yet; run 'memcore demo build --model tiny-memorizer'" in message

    spec = demo.with_overrides("tiny-memorizer", **MICRO)
    folder = demo.build(spec, progress=False, device="cpu")
    assert folder == demo.build_folder(spec) / "model" and folder.parent.parent == cache / "demo"
    record = json.loads((folder.parent / demo.BUILD_RECORD).read_text())
    assert record["spec"]["steps"] == 2 and record["denoiser"]["steps"] == 2 and "psnr_db" in record["autoencoder"]
    pipe = load_pipeline(str(folder), "cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.vae_scale_factor == 2
    assert pipe.unet.config.sample_size == spec.pixels // 2
    image = pipe("a small red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (spec.pixels, spec.pixels, 3)
    assert demo.build(spec, progress=False) == folder  # cached: nothing retrained
    assert demo.with_overrides("tiny-memorizer", **{**MICRO, "steps": 3}).digest() != spec.digest()


def test_correlation_is_pearsons():
    g = torch.Generator().manual_seed(0)
    images, reference = torch.rand(4, 3, 8, 8, generator=g), torch.rand(3, 8, 8, generator=g)
    expected = [np.corrcoef(i.flatten().numpy(), reference.flatten().numpy())[0, 1] for i in images]
    assert torch.allclose(correlation(images, reference), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert float(correlation(reference[None] * 0.5 + 0.2, reference)[0]) == pytest.approx(1.0)


def test_copy_score_tells_copies_from_other_images():
    g = torch.Generator().manual_seed(1)
    photo = torch.rand(3, 32, 32, generator=g)
    copies = (photo + 0.01 * torch.randn(6, 3, 32, 32, generator=g)).clamp(0, 1)
    score = copy_score(copies, photo, "a photo")
    assert score.copies == 6 and score.flagged and score.clique_size == 6 and score.best_correlation > COPY_CORRELATION
    others = copy_score(torch.rand(6, 3, 32, 32, generator=g), photo, "noise")
    assert others.copies == 0 and not others.flagged and others.best_correlation < 0.2


def test_label_accuracy_counts_each_label_and_all_together():
    targets = {name: torch.tensor([0, 1, 1, 0]) for name in LABELS}

    class Oracle(torch.nn.Module):
        def __init__(self, wrong: str | None):
            super().__init__()
            self.wrong = wrong

        def forward(self, x):
            out = {}
            for name, values in LABELS.items():
                t = targets[name].clone()
                if name == self.wrong:
                    t[:2] = 1 - t[:2]
                out[name] = torch.nn.functional.one_hot(t, len(values)).float()
            return out

    images = torch.zeros(4, 3, 8, 8)
    assert label_accuracy(Oracle(None), images, targets) == {**{n: 1.0 for n in LABELS}, "all": 1.0}
    wrong = label_accuracy(Oracle("colour"), images, targets)
    assert wrong["colour"] == 0.5 and wrong["shape"] == 1.0 and wrong["all"] == 0.5


def test_model_folder_names_the_build_command(cache):
    with pytest.raises(MemcoreError, match="memcore demo build --model tiny-memorizer"):
        demo.model_folder("tiny-memorizer", built=True)


def test_the_shipped_memorizer_is_the_build_of_the_spec_in_float16():
    """memcore/data/tiny-memorizer is what export_shipped writes for SPECS["tiny-memorizer"] (with the
    scene classifier of demo_measure beside it): its record names the spec's digest (a changed spec,
    photo or scene generator needs a new build), and it stays within the repository's budget for
    weights, 10 MB."""
    from safetensors import safe_open

    folder = demo.model_folder("tiny-memorizer")
    record = json.loads((folder / demo.SHIPPED_RECORD).read_text())
    spec = demo.SPECS["tiny-memorizer"]
    assert record["digest"] == spec.digest() and record["spec"]["steps"] == spec.steps
    assert record["denoiser"]["steps"] == spec.steps and record["shipped_dtype"] == "float16"
    weights = sorted(folder.rglob("*.safetensors"))
    assert [str(w.relative_to(folder)) for w in weights] == [
        "scene-classifier-32px-v2.safetensors", "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    assert sum(w.stat().st_size for w in weights) <= 10_000_000
    for path in weights:
        with safe_open(path, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path
    for config in folder.rglob("*.json"):
        assert "/root" not in config.read_text() and "cache" not in config.read_text(), config


def test_export_shipped_rounds_the_build_to_float16(cache, tmp_path):
    from memcore.models import load_pipeline

    spec = demo.with_overrides("tiny-memorizer", **MICRO)
    built = demo.build(spec, progress=False, device="cpu")
    out = demo.export_shipped(spec, tmp_path / "shipped")
    record = json.loads((out / demo.SHIPPED_RECORD).read_text())
    assert record["digest"] == spec.digest() and record["denoiser"]["steps"] == MICRO["steps"]
    a, b = load_pipeline(str(built), "cpu", "float32"), load_pipeline(str(out), "cpu", "float32")
    for name in ("unet", "vae", "text_encoder"):
        for (key, x), (_, y) in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().items()):
            assert torch.equal(x.half().float(), y), (name, key)


def test_demo_command_mistakes_are_one_line(cache, capsys):
    assert "is required" in user_error(capsys, cache.parent, "demo", "measure")
    assert "is for 'memcore demo measure'" in user_error(capsys, cache.parent, "demo", "build", "--out", cache.parent / "x")
    assert user_error(capsys, cache.parent, "demo", "build", "--built").startswith("--built: is for")
    message = user_error(capsys, cache.parent, "demo", "measure", "--out", cache.parent / "m", "--samples", "2")
    assert message.startswith("--samples: must be at least 3")
    message = user_error(capsys, cache.parent, "demo", "run", "--model", "tiny-memorizer-scene-captions",
                         "--out", cache.parent / "r")
    assert message.startswith("--model tiny-memorizer-scene-captions: is not shipped with memcore; build it with")
    message = user_error(capsys, cache.parent, "demo", "run", "--model", "tiny-memorizer-scene-captions", "--built",
                         "--out", cache.parent / "r")
    assert "not built on this machine yet; run 'memcore demo build --model tiny-memorizer-scene-captions'" in message
