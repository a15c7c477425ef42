"""examples/table1.py: finetune -> attack -> localize -> prune -> attack, on tiny, end to end."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from memcore.attack import read_summary

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("table1", ROOT / "examples" / "table1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_settings_are_the_defaults():
    example = load_example()
    args = example.parse_args(["--data", "imagenette/", "--out", "x"])
    assert (args.model, args.duplicate, args.times, args.steps, args.batch_size, args.lr, args.samples, args.sparsity) == (
        "sd15", 100, 50, 15000, 4, 1e-5, 50, 0.01)
    with pytest.raises(SystemExit):
        example.parse_args(["--out", "x"])  # --data is needed without --small


def test_small_setting_end_to_end(tmp_path, capsys):
    example = load_example()
    out = tmp_path / "table1"
    argv = ["--small", "--out", str(out), "--steps", "3", "--save-every", "3", "--samples", "3", "--duplicate", "2",
            "--times", "3", "--image-steps", "2", "--timesteps", "2"]
    table = example.run(example.parse_args(argv))
    printed = capsys.readouterr().out
    for command in ("finetune", "attack", "localize"):
        assert f"$ memcore {command} " in printed
    before, after = read_summary(out / "attack-before"), read_summary(out / "attack-after")
    assert before["prompts"] == after["prompts"] == 2
    assert after["settings"]["mask_sha256"] and not before["settings"]["mask_sha256"]
    text = table.read_text()
    assert f"| before pruning | {before['flagged']} | {before['true_copies']} | 2 |" in text
    assert f"| after pruning | {after['flagged']} | {after['true_copies']} | 2 |" in text
    # the training images are the duplicated ones, named by caption index
    duplicated = [json.loads(line) for line in (out / "finetuned" / "duplicated.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in (out / "training-images").iterdir()) == ["0000.png", "0001.png"]
    assert (out / "training-images" / "0001.png").read_bytes() == (out / "scenes" / duplicated[1]["file_name"]).read_bytes()
    # localized on the flagged captions, or all duplicated captions when none was flagged
    with open(out / "attack-before" / "attack.csv", newline="") as handle:
        flagged = [row["text"] for row in csv.DictReader(handle) if row["flagged"] == "true"]
    expected = flagged or [d["caption"] for d in duplicated]
    assert (out / "localize-prompts.txt").read_text().splitlines() == expected
    # a rerun finds every step done and runs no command
    example.run(example.parse_args(argv))
    assert "$ memcore" not in capsys.readouterr().out
    assert table.read_text() == text
