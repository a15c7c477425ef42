"""``memcore detect`` keeps the rules every command keeps: a user mistake is one line and exit code 2,
found before the model loads wherever it can be, and leaves nothing behind (tests/cli_helpers.py)."""

from __future__ import annotations

import pytest
from cli_helpers import user_error

from memcore.detection import DetectConfig, roc
from memcore.errors import MemcoreError

FAST = ["--height", "64", "--width", "64", "--steps", "2", "--seeds", "0"]


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.txt"
    path.write_text("a painting of a fox\nthe great wave\n")
    return path


def detect_error(capsys, tmp_path, *args) -> str:
    return user_error(capsys, tmp_path, "detect", "--model", "tiny", *FAST, *args)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--guidance", "1"], "--guidance: must be greater than 1 for detection"),
        (["--guidance", "0.5"], "--guidance: must be greater than 1 for detection"),
        (["--guidance", "nan"], "--guidance: must be a finite number"),
        (["--top", "1"], "--top and --out-prompts go together"),
        (["--top", "0", "--out-prompts", "OUT/top.txt"], "--top: must be at least 1, got 0"),
        (["--top", "3", "--out-prompts", "OUT/top.txt"], "--top: is 3, more than the 2 prompts of"),
        (["--top", "1", "--out-prompts", "OUT/top.csv"], "--out-prompts: must end in .txt or .jsonl"),
        (["--timesteps", "0"], "--timesteps: must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["--seeds", "a"], "--seeds: bad item 'a'"),
        (["--seeds", "1,1"], "--seeds: seed 1 is given twice"),
        (["--control", "OUT/missing.txt"], "missing.txt: no such file"),
    ],
)
def test_mistakes_refused_before_the_model_loads(capsys, tmp_path, good, no_model, args, expected):
    args = [str(a).replace("OUT", str(tmp_path)) for a in args]
    message = detect_error(capsys, tmp_path, "--prompts", good, "--out", tmp_path / "det", *args)
    assert expected in message, message


def test_outputs_checked_before_the_model_loads(capsys, tmp_path, good, no_model):
    (tmp_path / "taken").mkdir()
    message = detect_error(capsys, tmp_path, "--prompts", good, "--out", tmp_path / "taken")
    assert message.startswith("--out") and "already exists" in message, message
    message = detect_error(
        capsys, tmp_path, "--prompts", good, "--out", tmp_path / "det", "--top", "1", "--out-prompts", good
    )
    assert "--out-prompts" in message and "is also the input --prompts" in message, message


def test_txt_cannot_hold_a_prompt_with_a_line_break(capsys, tmp_path, no_model):
    source = tmp_path / "p.jsonl"
    source.write_text('{"prompt": "two\\nlines"}\n{"prompt": "one"}\n')
    message = detect_error(
        capsys, tmp_path, "--prompts", source, "--out", tmp_path / "det", "--top", "1", "--out-prompts", tmp_path / "t.txt"
    )
    assert "--out-prompts: prompt 0 of" in message and ".jsonl" in message, message


def test_more_timesteps_than_calls(capsys, tmp_path, good):
    message = detect_error(capsys, tmp_path, "--prompts", good, "--out", tmp_path / "det", "--timesteps", "99")
    assert message.startswith("--timesteps: 99 is more than the"), message


def test_library_words():
    with pytest.raises(MemcoreError, match="guidance: must be greater than 1") as info:
        DetectConfig(guidance=1.0)
    assert info.value.param == "guidance"
    with pytest.raises(MemcoreError, match="seeds"):
        DetectConfig(seeds=())
    with pytest.raises(MemcoreError, match="at least one positive and one negative"):
        roc([], [1.0])
    with pytest.raises(MemcoreError, match="finite"):
        roc([float("nan")], [1.0])
