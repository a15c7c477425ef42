"""MemcoreError speaks in parameters: every error the Python API raises names the parameter in library
words, never a CLI flag; the CLI's spelling of the same errors is in test_cli.py."""

import pickle
from types import SimpleNamespace

import pytest
import torch
from test_analysis import A, B, make_mask

import memcore
from memcore import generate as gen
from memcore.analysis import analyze, check_comparable, density
from memcore.config import LocalizeConfig
from memcore.errors import Call, MemcoreError, Param, Pass
from memcore.io import check_output_dir, check_output_file
from memcore.mask import Mask, compute_mask
from memcore.models import load_pipeline
from memcore.prompts import load_prompts
from memcore.pruning import prune
from memcore.stats import Statistics, collect_stats, collect_subset_stats
from memcore.targets import find_targets

SMALL = {"timesteps": 2, "height": 64, "width": 64, "sparsity": 0.05, "progress": False}
GENERATE = {"steps": 2, "height": 64, "width": 64, "progress": False}


def test_message_in_library_words():
    exc = MemcoreError("must be in (0, 1], got 2", param="sparsity")
    assert str(exc) == "sparsity: must be in (0, 1], got 2" and exc.param == "sparsity"
    exc = MemcoreError("already exists; choose a new folder", param="out_dir", value="/tmp/x")
    assert str(exc) == "out_dir /tmp/x: already exists; choose a new folder" and exc.value == "/tmp/x"
    exc = MemcoreError("{what} was made from other weights; {force} to apply it anyway", what="the mask", force=Pass("force"))
    assert str(exc) == "the mask was made from other weights; pass force=True to apply it anyway"
    assert exc.param == "force" and exc.mentions == [Pass("force", True)]
    assert str(MemcoreError("x.txt: no such file")) == "x.txt: no such file" and MemcoreError("x").param is None


def test_fields_are_not_parsed_as_templates():
    # a value with braces goes in a field; a message without fields is never formatted
    exc = MemcoreError("folder {folder} does not exist", param="out", value="/a/{b}", folder="/a/{b}")
    assert str(exc) == "out /a/{b}: folder /a/{b} does not exist"
    assert str(MemcoreError("/a/{b}: no such file")) == "/a/{b}: no such file"


def test_render_with_another_spelling():
    exc = MemcoreError(
        "recompute with {per_step} ({mask}), or {force}", param="masks",
        per_step=Param("per_step", True), mask=Call("compute_mask", (Param("per_step", True),)), force=Pass("force"),
    )
    assert str(exc) == "masks: recompute with per_step=True (compute_mask(per_step=True)), or pass force=True"
    shout = {Param: lambda m: m.name.upper(), Pass: lambda m: "SET " + m.name.upper(), Call: lambda m: m.function + "!"}
    assert exc.render(lambda m: shout[type(m)](m)) == "MASKS: recompute with PER_STEP (compute_mask!), or SET FORCE"


def test_pickle_keeps_the_fields():
    exc = MemcoreError("{what}; {force} to apply it", param=None, value=None, what="mask", force=Pass("force"))
    again = pickle.loads(pickle.dumps(exc))
    assert str(again) == str(exc) and again.param == "force" and again.fields == exc.fields


@pytest.fixture(scope="module")
def ctx():
    """A tiny pipeline, statistics of tau = 2 and their mask; then the pipeline's weights change."""
    pipe = load_pipeline("tiny", device="cpu", dtype="float32")
    stats = collect_stats(pipe, ["a painting of a fox", "the great wave"], LocalizeConfig(**SMALL))
    mask = compute_mask(pipe, stats, sparsity=0.05)
    other = load_pipeline("tiny", device="cpu", dtype="float32")
    with torch.no_grad():
        find_targets(other)[0].linear.weight[0, 0] += 1
    return SimpleNamespace(pipe=pipe, other=other, stats=stats, mask=mask)


def _missing_cuda(ctx):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    load_pipeline("tiny", device="cuda")


# (id, the parameter the error names, what a Python caller does), each through the public API
CASES = [
    ("sparsity-0", "sparsity", lambda c: LocalizeConfig(sparsity=0)),
    ("sparsity-2", "sparsity", lambda c: memcore.LocalizeConfig(sparsity=2)),
    ("timesteps-0", "timesteps", lambda c: LocalizeConfig(timesteps=0)),
    ("rows", "rows", lambda c: LocalizeConfig(rows="uncond")),
    ("batch_size", "batch_size", lambda c: LocalizeConfig(batch_size=0)),
    ("steps", "steps", lambda c: LocalizeConfig(steps=0)),
    ("height", "height", lambda c: LocalizeConfig(height=12)),
    ("width", "width", lambda c: LocalizeConfig(width=0)),
    ("target-regex", "target", lambda c: LocalizeConfig(target="(")),
    ("target-empty", "target", lambda c: LocalizeConfig(target="")),
    ("target-none-match", "target", lambda c: find_targets(c.pipe, r"nothing\.here")),
    ("target-text-mlp", "target", lambda c: find_targets(c.pipe.unet, "text-mlp")),
    ("timesteps-beyond-calls", "timesteps", lambda c: collect_stats(c.pipe, ["a"], LocalizeConfig(steps=2, timesteps=5))),
    ("no-prompts", "prompts", lambda c: collect_stats(c.pipe, [], LocalizeConfig(**SMALL))),
    ("empty-subset", "subsets", lambda c: memcore.localize_subsets(c.pipe, {"a": ["x"], "b": []}, LocalizeConfig(**SMALL))),
    ("no-subsets", "subsets", lambda c: collect_subset_stats(c.pipe, {}, LocalizeConfig(**SMALL))),
    ("mask-sparsity", "sparsity", lambda c: compute_mask(c.pipe, c.stats, sparsity=1.5)),
    ("mask-timesteps-0", "timesteps", lambda c: compute_mask(c.pipe, c.stats, timesteps=0)),
    ("mask-timesteps-beyond-stats", "timesteps", lambda c: compute_mask(c.pipe, c.stats, timesteps=3)),
    ("mask-force", "force", lambda c: compute_mask(c.other, c.stats)),
    ("prune-force", "force", lambda c: prune(c.other, c.mask)),
    ("unpack-step", "per_step", lambda c: c.mask.unpack_step(next(iter(c.mask.layers)), 0)),
    ("dtype", "dtype", lambda c: load_pipeline("tiny", dtype="float8")),
    ("device", "device", lambda c: load_pipeline("tiny", device="nonsense")),
    ("device-cuda", "device", _missing_cuda),
    ("model-folder", "model", lambda c: load_pipeline("/nonexistent/model")),
    ("model-not-cached", "model", lambda c: load_pipeline("someone/not-cached-model")),
    ("out-file-is-dir", "out", lambda c: check_output_file(c.tmp, "out")),
    ("out-file-folder", "stats_out", lambda c: check_output_file(c.tmp / "no" / "s.safetensors", "stats_out")),
    ("out-dir-exists", "out", lambda c: check_output_dir(c.tmp, "out")),
    ("seeds-text", "seeds", lambda c: gen.parse_seeds("3-1")),
    ("seeds-list", "seeds", lambda c: gen.check_seeds([1, 1])),
    ("generate-out_dir", "out_dir", lambda c: gen.generate(c.pipe, ["a"], [0], out_dir=c.tmp, **GENERATE)),
    ("generate-prompts", "prompts", lambda c: gen.generate(c.pipe, "a fox", [0], out_dir=c.tmp / "g", **GENERATE)),
    ("generate-seeds", "seeds", lambda c: gen.generate(c.pipe, ["a"], [], out_dir=c.tmp / "g", **GENERATE)),
    ("generate-batch_size", "batch_size", lambda c: gen.generate(c.pipe, ["a"], [0], out_dir=c.tmp / "g", batch_size=0)),
    ("generate-steps", "steps", lambda c: gen.generate(c.pipe, ["a"], [0], out_dir=c.tmp / "g", steps=0)),
    ("generate-mask", "mask", lambda c: gen.generate(c.pipe, ["a"], [0], out_dir=c.tmp / "g", mask=c.tmp / "m.safetensors")),
    ("generate-force", "force", lambda c: gen.generate(c.other, ["a"], [0], out_dir=c.tmp / "g", mask=c.mask, **GENERATE)),
    ("analyze-out_dir", "out_dir", lambda c: analyze([make_mask(A), make_mask(B)], c.tmp / "file")),
    ("analyze-names-count", "names", lambda c: analyze([make_mask(A), make_mask(B)], c.tmp / "o", names=["x"])),
    ("analyze-names-empty", "names", lambda c: analyze([make_mask(A), make_mask(B)], c.tmp / "o", names=["x", " "])),
    ("analyze-names-twice", "names", lambda c: analyze([make_mask(A), make_mask(B)], c.tmp / "o", names=["x", "x"])),
    ("analyze-no-masks", "masks", lambda c: density([])),
    ("analyze-per-step", "per_step", lambda c: check_comparable([make_mask(A, per_step=False)], ["m"])),
    # errors about a file's content name the file, not a parameter
    ("prompt-file", None, lambda c: load_prompts(c.tmp / "none.txt")),
    ("mask-file", None, lambda c: Mask.load(c.tmp / "none.safetensors")),
    ("stats-file", None, lambda c: Statistics.load(c.tmp / "file")),
]


@pytest.mark.parametrize("param, action", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_library_errors_name_parameters_not_flags(ctx, tmp_path, param, action):
    (tmp_path / "file").write_text("not a mask")
    c = SimpleNamespace(**vars(ctx), tmp=tmp_path)
    with pytest.raises(MemcoreError) as info:
        action(c)
    exc, text = info.value, str(info.value)
    assert "--" not in text, text
    assert exc.param == param, (exc.param, text)
    if param is not None:  # the text names it too: as its subject, or as a setting to pass
        assert text.startswith(f"{param}") or f"{param}=" in text, text
    assert "\n" not in text


def test_force_advice_in_library_words(ctx):
    with pytest.raises(MemcoreError) as info:
        prune(ctx.other, ctx.mask)
    assert str(info.value).endswith("; pass force=True to apply it anyway")


def test_generate_checks_arguments_without_a_pipeline(tmp_path):
    out, seeds = gen.check_generate_arguments([3, 1], out_dir=tmp_path / "g", steps=2, height=64, batch_size=1)
    assert out == tmp_path / "g" and seeds == [3, 1] and not out.exists()
    with pytest.raises(MemcoreError, match=r"^width: must be a positive multiple of 8, got 60$"):
        gen.check_generate_arguments([0], out_dir=tmp_path / "g", width=60)
    with pytest.raises(MemcoreError, match=r"^mask .*none\.safetensors: no such file$"):
        gen.check_generate_arguments([0], out_dir=tmp_path / "g", mask=str(tmp_path / "none.safetensors"))
