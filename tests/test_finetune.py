"""memcore finetune: data checks, duplication, the loss going down, checkpoint + resume, the output folder.

The model is ``tiny`` saved with a denoiser sample size of 8 (64 px images, 8 x 8 latents) so that a
training step costs a fraction of a second on two CPU cores.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli, user_error
from PIL import Image
from safetensors.torch import load_file

import memcore.finetune as ft
from memcore.models import load_pipeline


def make_folder(folder: Path, count: int, seed: int = 0, size=(48, 40)) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        lines.append(json.dumps({"file_name": f"img{i}.png", "text": f"a picture number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """``tiny`` with 64 px images, as a diffusers folder."""
    pipe = load_pipeline("tiny", "cpu", "float32")
    pipe.unet.register_to_config(sample_size=8)
    folder = tmp_path_factory.mktemp("model") / "tiny64"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# ---------------------------------------------------------------------------------------------
# the library


def test_read_image_folder_and_duplication(tmp_path):
    data = make_folder(tmp_path / "data", 5)
    examples = ft.read_image_folder(data)
    assert [e.file_name for e in examples] == [f"img{i}.png" for i in range(5)]
    chosen = ft.choose_duplicates(examples, 2, seed=3)
    assert chosen == random.Random(3).sample(examples, 2)
    train = ft.training_list(examples, chosen, 4)
    counts = {e.file_name: sum(t.file_name == e.file_name for t in train) for e in examples}
    assert counts == {e.file_name: 4 if e in chosen else 1 for e in examples}
    # the batch stream: each epoch a permutation of the training list, a function of the position only
    epoch = ft.batch_at(train, 0, 0, len(train))
    assert sorted(e.file_name for e in epoch) == sorted(e.file_name for e in train)
    assert ft.batch_at(train, 0, 3, 5) == epoch[3:8]
    assert ft.batch_at(train, 1, 0, len(train)) != epoch


def test_loss_goes_down_on_a_repeated_image(tmp_path, small_model):
    data = make_folder(tmp_path / "data", 1)
    config = ft.FinetuneConfig(steps=3, batch_size=2, lr=2e-3, seed=0, save_every=100)
    prepared = ft.prepare_finetune(str(small_model), data, tmp_path / "out", config, "cpu")
    pipe = load_pipeline(str(small_model), "cpu", "float32")
    trainer = ft.Trainer(pipe, data, prepared.train, config, torch.device("cpu"))
    trainer.generator.manual_seed(1234)
    latents, hidden = trainer.encode(prepared.train * 4)
    noise, timesteps = trainer.draw(latents)

    def loss() -> float:
        with torch.no_grad():
            return float(ft.diffusion_loss(pipe.unet, trainer.noise_scheduler, latents, hidden, noise, timesteps))

    before = loss()
    result = ft.finetune_denoiser(pipe, prepared, progress=False)
    after = loss()
    assert result.steps == 3 and len(result.losses) == 3
    assert after < 0.9 * before, (before, after)
    summary = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert summary["loss"]["every_step"] == result.losses
    assert (tmp_path / "out" / "duplicated.jsonl").read_text() == ""
    assert not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------------------------------------
# the command


def test_resume_matches_an_uninterrupted_run_and_the_output_loads(tmp_path, capsys, monkeypatch, small_model):
    data = make_folder(tmp_path / "data", 4)
    args = ["--model", small_model, "--data", data, "--steps", 4, "--batch-size", 2, "--lr", 1e-3,
            "--save-every", 2, "--duplicate", 2, "--times", 3, "--seed", 5, "--device", "cpu"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    code, out, err = run_cli(capsys, "finetune", *args, "--out", whole)
    assert code == 0, err
    assert "wrote" in out and "4 steps" in out

    # stopped (as by Ctrl-C) when step 3 asks for its batch, after the checkpoint of step 2
    batch_at = ft.batch_at

    def stop_at_step_3(train, seed, position, size):
        if position >= 2 * size:
            raise KeyboardInterrupt
        return batch_at(train, seed, position, size)

    monkeypatch.setattr(ft, "batch_at", stop_at_step_3)
    code, _, err = run_cli(capsys, "finetune", *args, "--out", split)
    assert code == 130, err
    partial = tmp_path / "split.partial"
    assert [p.name for p in partial.glob("checkpoint-*")] == ["checkpoint-00000002"]
    assert not split.exists()
    monkeypatch.setattr(ft, "batch_at", batch_at)

    # other settings are refused, naming the first difference, before anything loads
    message = user_error(capsys, tmp_path, "finetune", *args[:-2], "--device", "cpu", "--out", split, "--lr", "0.5")
    assert "lr was 0.001, is now 0.5" in message and str(partial) in message

    code, out, err = run_cli(capsys, "finetune", *args, "--out", split)
    assert code == 0, err
    assert "resumed at step 2" in out
    a = load_file(whole / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(split / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # training changed the weights
    base = load_file(small_model / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a)
    assert sorted(p.name for p in split.iterdir()) == sorted(p.name for p in whole.iterdir())
    assert not any(p.name.startswith("checkpoint-") for p in split.iterdir())
    loss_whole = json.loads((whole / "finetune.json").read_text())["loss"]["every_step"]
    loss_split = json.loads((split / "finetune.json").read_text())["loss"]["every_step"]
    assert loss_whole == loss_split and len(loss_whole) == 4

    # duplicated.jsonl: the seed's sample of the sorted images, each with its count
    rows = [json.loads(line) for line in (whole / "duplicated.jsonl").read_text().splitlines()]
    names = sorted(f"img{i}.png" for i in range(4))
    assert [r["file_name"] for r in rows] == random.Random(5).sample(names, 2)
    assert all(r["times"] == 3 and r["text"] == f"a picture number {r['file_name'][3]}" for r in rows)
    assert all(r["caption"] == r["text"] for r in rows)
    # it is a prompt file as it is
    from memcore.prompts import load_prompts

    assert list(load_prompts(str(whole / "duplicated.jsonl"))) == [r["text"] for r in rows]

    # every memcore command loads it
    pipe = load_pipeline(str(whole), "cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a picture number 1\n")
    code, _, err = run_cli(capsys, "generate", "--model", whole, "--prompts", prompts, "--seeds", "0", "--steps", 2,
                           "--out", tmp_path / "pictures", "--device", "cpu")
    assert code == 0, err
    assert len(list((tmp_path / "pictures").rglob("*.png"))) >= 1


@pytest.mark.slow
def test_two_processes_train_what_one_trains(tmp_path, small_model):
    """Data-parallel under torchrun --nproc-per-node 2 (gloo, CPU): each process takes half of every
    batch and DDP averages the gradients, so the losses and weights are those of one process, up to
    the order of float32 sums; and a batch that two processes cannot share is refused."""
    import os
    import subprocess
    import sys

    data = make_folder(tmp_path / "data", 6)
    args = ["finetune", "--model", small_model, "--data", data, "--steps", 3, "--batch-size", 4, "--lr", 1e-3,
            "--save-every", 2, "--duplicates", 2, "--times", 3, "--seed", 1, "--device", "cpu"]  # torchrun's spelling
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)

    def run(processes: int, out: Path, *extra) -> subprocess.CompletedProcess:
        launcher = [sys.executable, "-m", "memcore"]
        if processes > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(processes), "-m", "memcore"]
        return subprocess.run(launcher + [str(a) for a in (*args, *extra, "--out", out)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    for processes in (1, 2):
        done = run(processes, tmp_path / f"p{processes}")
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("wrote") == 1  # process 0 alone reports
    one, two = (load_file(tmp_path / f"p{n}" / "unet" / "diffusion_pytorch_model.safetensors") for n in (1, 2))
    base = load_file(small_model / "unet" / "diffusion_pytorch_model.safetensors")
    assert one.keys() == two.keys()
    # Adam divides by the gradient's size, so a weight whose gradient is near 0 moves by up to lr
    # whatever rounding does to it: compare all the weights at once, against how far training moved them
    flat = {n: torch.cat([w[k].flatten() for k in sorted(one)]) for n, w in (("one", one), ("two", two), ("base", base))}
    moved = (flat["one"] - flat["base"]).norm()
    assert moved > 0.1
    assert (flat["two"] - flat["one"]).norm() < 1e-3 * moved
    loss = [json.loads((tmp_path / f"p{n}" / "finetune.json").read_text()) for n in (1, 2)]
    assert loss[1]["processes_this_run"] == 2
    torch.testing.assert_close(torch.tensor(loss[1]["loss"]["every_step"]), torch.tensor(loss[0]["loss"]["every_step"]),
                               rtol=1e-5, atol=1e-6)

    done = run(2, tmp_path / "odd", "--batch-size", 3)
    # each process exits with 2 and its one line; torchrun itself reports a failed child with 1
    assert done.returncode == 1 and "--batch-size: is 3, which 2 processes cannot share equally" in done.stderr
    assert not (tmp_path / "odd").exists() and not (tmp_path / "odd.partial").exists()


# ---------------------------------------------------------------------------------------------
# user mistakes: one line, exit 2, nothing left


def test_user_errors(tmp_path, capsys):
    good = make_folder(tmp_path / "good", 3)
    out = tmp_path / "out"
    base = ["finetune", "--model", "tiny", "--out", out, "--device", "cpu"]

    empty = tmp_path / "nometa"
    empty.mkdir()
    message = user_error(capsys, tmp_path, *base, "--data", empty)
    assert message.startswith("--data: ") and "no metadata.jsonl" in message

    nocaption = make_folder(tmp_path / "nocaption", 2)
    meta = nocaption / "metadata.jsonl"
    meta.write_text(meta.read_text().replace('"text"', '"caption"', 1))
    message = user_error(capsys, tmp_path, *base, "--data", nocaption)
    assert f"{meta} line 1: no text" in message

    badjson = make_folder(tmp_path / "badjson", 2)
    (badjson / "metadata.jsonl").write_text('{"file_name": "img0.png", "text": "x"}\n{"file_name": \n')
    assert "line 2: not valid JSON" in user_error(capsys, tmp_path, *base, "--data", badjson)

    unreadable = make_folder(tmp_path / "unreadable", 2)
    (unreadable / "img1.png").write_bytes(b"not a png at all")
    message = user_error(capsys, tmp_path, *base, "--data", unreadable)
    assert "line 2: cannot read the image" in message and "img1.png" in message

    missing = make_folder(tmp_path / "missing", 2)
    (missing / "img0.png").unlink()
    assert "line 1: no image file" in user_error(capsys, tmp_path, *base, "--data", missing)

    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "metadata.jsonl").write_text("\n")
    assert "lists no images" in user_error(capsys, tmp_path, *base, "--data", blank)

    message = user_error(capsys, tmp_path, *base, "--data", good, "--duplicate", 4, "--times", 2)
    assert message.startswith("--duplicate: ") and "more than the 3 images" in message
    assert user_error(capsys, tmp_path, *base, "--data", good, "--times", 5).startswith("--times: ")
    assert user_error(capsys, tmp_path, *base, "--data", good, "--steps", 0).startswith("--steps: ")
    assert user_error(capsys, tmp_path, *base, "--data", good, "--lr", "nan").startswith("--lr: ")
    message = user_error(capsys, tmp_path, *base, "--data", good, "--mixed-precision", "fp16")
    assert message.startswith("--mixed-precision: ") and "CUDA" in message
    message = user_error(capsys, tmp_path, *base[:2], "tiny-sdxl", *base[3:], "--data", good)
    assert message.startswith("--model tiny-sdxl: ") and "SD 1.x and 2.x" in message
    sdxl = tmp_path / "sdxl-folder"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    message = user_error(capsys, tmp_path, *base[:2], sdxl, *base[3:], "--data", good)
    assert "not StableDiffusionXLPipeline" in message
    (tmp_path / "taken").mkdir()
    message = user_error(capsys, tmp_path, *base[:3], "--out", tmp_path / "taken", *base[5:], "--data", good)
    assert message.startswith("--out ") and "already exists" in message
