"""What careless or hostile input to --target ends with: one line, exit code 2, and soon.

Regular expressions from users and files run under one time budget over the module names, and
patterns that would unroll into huge programs are refused before they are compiled.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import memcore.targets as targets
from cli_helpers import user_error
from memcore.config import LocalizeConfig
from memcore.errors import MemcoreError
from memcore.localization import localize
from memcore.targets import check_family, compile_pattern, find_targets, matching_names

# Backtracks catastrophically on the regex engine too: each digit can be eaten by either branch.
CATASTROPHIC = r"(.|.)*\d\d"


@pytest.fixture
def short_budget(monkeypatch):
    monkeypatch.setattr(targets, "PATTERN_BUDGET_S", 0.3)


# ---------------------------------------------------------------------------------------------
# regular expressions


def test_catastrophic_pattern_is_stopped_by_the_budget(tiny_pipe, short_budget):
    linears = [name for name, m in tiny_pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)]
    started = time.monotonic()
    with pytest.raises(MemcoreError) as caught:
        find_targets(tiny_pipe, CATASTROPHIC)
    assert time.monotonic() - started < 30  # not the years the pattern would take
    error = caught.value
    assert error.param == "target"
    assert str(error) == (
        f"target {CATASTROPHIC!r}: the regular expression did not finish within 0.3 s over {len(linears)} "
        "module names (catastrophic backtracking?); simplify it"
    )


def test_the_budget_is_for_the_whole_search(monkeypatch):
    # every match is instant, but the clock says a second passes per name: a budget per name would
    # never run out, one for the whole search runs out at the third name
    clock = iter(range(1000))
    monkeypatch.setattr(targets.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(targets, "PATTERN_BUDGET_S", 2.5)
    with pytest.raises(MemcoreError, match="did not finish within 2.5 s over 10 module names"):
        matching_names(r"name\d", [f"name{i}" for i in range(10)])
    clock = iter(range(1000))  # two names take two of the 2.5 s
    assert matching_names(r"name[01]", ["name1", "other"]) == ["name1"]


def test_a_pattern_that_hangs_python_re_is_answered_at_once(tiny_pipe):
    # (.*)*x backtracks forever on Python's re over these names; the regex engine sees no "x" at the end
    with pytest.raises(MemcoreError, match="no matching Linear layers"):
        find_targets(tiny_pipe, "(.*)*x")


ORDINARY = [
    r"mid_block\..*\.attn1\.to_(q|k)",
    r".*ff\.net\.2",
    r"(down|up)_blocks\.[0-9]+\..*to_[kv]",
    r".*attn2\.to_(?:k|v)",
    r"(?i).*TO_OUT\.0",
    r".*\.proj_(in|out)",
    r"[a-z_]+\.\d\..*",
    r".*(?<!attn1)\.to_q",
    r"(?P<block>down|up)_blocks\..*(?P=block)?.*",
    r".*\bff\b.*",
    r"^down.*$",
    r".{10,40}",
    r"[^.]+\.[^.]+",
    r"(?x) mid_block \. .* \. to_v   # verbose",
    r".*?net\.(?=2)2",
    r"(up|down)_blocks\.1\.(attentions|resnets)\.\d+(\..+)?",
    r"time_embedding\.linear_[12]|conv_in",
]


@pytest.mark.parametrize("pattern", ORDINARY)
def test_patterns_match_as_python_re_does(tiny_pipe, pattern):
    names = [name for name, _ in tiny_pipe.unet.named_modules()]
    expected = [name for name in names if re.fullmatch(pattern, name)]
    assert matching_names(pattern, names) == expected
    assert expected or pattern.startswith(r"time_embedding"), "the comparison should select something"


@pytest.mark.parametrize("pattern", ["(", "a)", r"\p{L}", "(?i)a(?i)", "a{2,1}", "[z-a]", "(?P<x>a)(?P<x>b)"])
def test_syntax_is_that_of_python_re(pattern):
    with pytest.raises(re.error):
        re.compile(pattern)
    with pytest.raises(MemcoreError, match=r"not a family \(ffn, .*\) nor a valid regular expression"):
        check_family(pattern)


@pytest.mark.parametrize("pattern", ["(x{3000}){3000}", "((a{100}){100}){100}", "(?:x{1000}|y){1000}"])
def test_patterns_that_unroll_into_huge_programs_are_refused_before_compiling(monkeypatch, pattern):
    # the regex engine would take seconds and gigabytes to compile these
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled")

    monkeypatch.setattr(targets.regex, "compile", no_compile)
    with pytest.raises(MemcoreError, match="too large once its repetitions are unrolled"):
        check_family(pattern)


def test_modest_repetitions_compile():
    assert compile_pattern(r"(x{100}){100}|a{1,65535}|(b{0,3000}){0,3000}|.*").fullmatch("a")


def test_deeply_nested_groups_are_one_error():
    for depth in (400, 5000):
        with pytest.raises(MemcoreError, match="nests its groups too deep"):
            check_family("(" * depth + "a" + ")" * depth)


def test_every_user_pattern_goes_through_matching_names(tiny_pipe, monkeypatch):
    seen = []
    original = targets.matching_names

    def spy(target, names):
        seen.append(target)
        return original(target, names)

    monkeypatch.setattr(targets, "matching_names", spy)
    find_targets(tiny_pipe, r".*attn2\.to_v")
    for family in targets.FAMILIES:
        find_targets(tiny_pipe, family)
    assert seen == [r".*attn2\.to_v"]


def test_cli_target_catastrophic(tmp_path, capsys, short_budget):
    message = user_error(
        capsys, tmp_path, "localize", "--model", "tiny", "--prompts", "memorize_0",
        "--target", CATASTROPHIC, "--out", tmp_path / "mask.safetensors",
    )
    assert message.startswith(f"--target {CATASTROPHIC!r}: the regular expression did not finish within 0.3 s over ")
    assert message.endswith("module names (catastrophic backtracking?); simplify it")


def test_cli_target_too_large(tmp_path, capsys):
    message = user_error(
        capsys, tmp_path, "localize", "--model", "tiny", "--prompts", "memorize_0",
        "--target", "(x{3000}){3000}", "--out", tmp_path / "mask.safetensors",
    )
    assert "too large once its repetitions are unrolled" in message


def test_cli_prune_with_a_mask_recording_a_catastrophic_target(tmp_path, capsys, tiny_pipe, short_budget):
    settings = LocalizeConfig(timesteps=1, height=64, width=64, progress=False)
    mask, _ = localize(tiny_pipe, ["a painting of a fox"], settings)
    real = tmp_path / "real.safetensors"
    mask.save(real)
    # the same file with only its recorded target changed
    with safe_open(str(real), framework="pt") as handle:
        metadata = handle.metadata()
    recorded = json.loads(metadata["memcore"])
    assert recorded["format"] == "memcore.mask/1" and recorded["target"] == "ffn"
    recorded["target"] = CATASTROPHIC
    hostile = tmp_path / "hostile.safetensors"
    save_file(load_file(real), hostile, metadata={**metadata, "memcore": json.dumps(recorded)})
    message = user_error(capsys, tmp_path, "prune", "--model", "tiny", "--mask", hostile, "--out", tmp_path / "pruned")
    assert message.startswith(f"--target {CATASTROPHIC!r}: the regular expression did not finish within 0.3 s over ")
