"""Every file memcore reads is checked against the schema of its format version before use.

A valid mask and statistics file are made once on the tiny model, then altered one way at a time (the
metadata rewritten, tensors dropped, reshaped, retyped or added) and given to every command that
reads them: each answer is exit code 2 and one line naming the file and the field or tensor at fault,
with no traceback and nothing written. Then the library: the schema of each format, the writers
(their output passes their own schema; NaN never reaches a file) and provenance warnings.
"""

import json
import logging
import math
import shutil

import pytest
import torch
from cli_helpers import run_cli, user_error
from safetensors import safe_open
from safetensors.torch import save_file

from memcore import schema
from memcore.config import LocalizeConfig
from memcore.errors import MemcoreError
from memcore.generate import generate, load_manifest
from memcore.mask import Mask, check_same_weights, compute_mask
from memcore.models import load_pipeline
from memcore.stats import Statistics, collect_stats, collect_subset_stats
from memcore.targets import find_targets

PROMPTS = ["a painting of a fox", "the great wave"]


def tiny():
    return load_pipeline("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Statistics (tau 2, 64 px), their per-step mask (s = 0.05) and a prompt file, saved."""
    folder = tmp_path_factory.mktemp("made")
    pipe = tiny()
    stats = collect_stats(pipe, PROMPTS, LocalizeConfig(timesteps=2, height=64, width=64, progress=False))
    stats.save(folder / "stats.safetensors")
    compute_mask(pipe, stats, sparsity=0.05, per_step=True).save(folder / "mask.safetensors")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS))
    return folder


def read(path):
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["memcore"]), {key: handle.get_tensor(key) for key in handle.keys()}


NO_METADATA = object()


def rewrite(source, target, edit):
    """``source`` with ``edit(metadata, tensors)`` applied (in place; it may return the metadata
    text to write instead as a string, or NO_METADATA), saved as ``target`` with safetensors' own writer."""
    meta, tensors = read(source)
    text = edit(meta, tensors)
    if not isinstance(text, str) and text is not NO_METADATA:
        text = json.dumps(meta)  # NaN stays NaN: the file is what a careless editor would write
    save_file(tensors, str(target), metadata=None if text is NO_METADATA else {"memcore": text})


def first(meta):
    return meta["layers"][0]


def set_field(key, value):
    def edit(meta, tensors):
        meta[key] = value

    return edit


def drop_field(key):
    def edit(meta, tensors):
        del meta[key]

    return edit


def shapes_lack_first(meta, tensors):
    del meta["shapes"][first(meta)]


def layers_lack_first(meta, tensors):
    meta["layers"].remove(first(meta))


def drop_tensor(name):
    def edit(meta, tensors):
        del tensors[name.format(L=first(meta))]

    return edit


def replace_tensor(name, change):
    def edit(meta, tensors):
        key = name.format(L=first(meta))
        tensors[key] = change(tensors[key])

    return edit


def add_tensor(name, value):
    def edit(meta, tensors):
        tensors[name.format(L=first(meta))] = value

    return edit


def claim_three_calls(meta, tensors):
    meta["timesteps"] = 3
    if "timestep_values" in meta:
        meta["timestep_values"] = meta["call_timesteps"][:3]


def drop_per_step_tensors(meta, tensors):
    for name in [n for n in tensors if n.endswith(".per_step")]:
        del tensors[name]


def flip_union_bit(meta, tensors):
    packed = tensors[first(meta)].clone()
    packed[0, 0] ^= 1
    tensors[first(meta)] = packed


def wrong_k(meta, tensors):
    meta["k"][first(meta)] += 1


def nan_in(name):
    def edit(meta, tensors):
        key = name.format(L=first(meta))
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = math.nan

    return edit


def other_file(name):
    def edit(meta, tensors):
        return None

    edit.copy_from = name
    return edit


# (id, class of alteration, edit, what the message names: {L} is the first layer)
MASK_CASES = [
    ("not-json", "metadata not an object", lambda m, t: "{layers: ", "not JSON"),
    ("list", "metadata not an object", lambda m, t: "[1, 2]", "the memcore metadata must be a JSON object, got [1, 2]"),
    ("string", "metadata not an object", lambda m, t: '"mask"', 'the memcore metadata must be a JSON object, got "mask"'),
    ("no-metadata", "metadata not an object", lambda m, t: NO_METADATA, "no 'memcore' metadata"),
    ("no-format", "missing key", drop_field("format"), "field 'format' is missing"),
    ("no-layers", "missing key", drop_field("layers"), "field 'layers' is missing"),
    ("no-shapes", "missing key", drop_field("shapes"), "field 'shapes' is missing"),
    ("no-timesteps", "missing key", drop_field("timesteps"), "field 'timesteps' is missing"),
    ("no-per-step", "missing key", drop_field("per_step"), "field 'per_step' is missing"),
    ("no-hash", "missing key", drop_field("weights_sha256"), "field 'weights_sha256' is missing"),
    ("no-dtype", "missing key", drop_field("dtype"), "field 'dtype' is missing"),
    ("no-model", "missing key", drop_field("model_id"), "field 'model_id' is missing"),
    ("timesteps-bool", "wrong type", set_field("timesteps", True), "field 'timesteps' must be an integer >= 1, got true"),
    ("timesteps-text", "wrong type", set_field("timesteps", "2"), "field 'timesteps' must be an integer"),
    ("per-step-text", "wrong type", set_field("per_step", "yes"), "field 'per_step' must be true or false"),
    ("target-number", "wrong type", set_field("target", 3), "field 'target' must be a target family"),
    ("layers-text", "wrong type", set_field("layers", "down_blocks"), "field 'layers' must be a list of layer names"),
    ("shapes-list", "wrong type", set_field("shapes", [[1, 2]]), "field 'shapes' must be an object"),
    ("seed-float", "wrong type", set_field("seed", 1.5), "field 'seed' must be an integer"),
    ("token-norm-int", "wrong type", set_field("token_norm", 1), "field 'token_norm' must be true or false"),
    ("sparsity-text", "wrong type", set_field("sparsity", "0.05"), "field 'sparsity' must be a number in (0, 1]"),
    ("model-list", "wrong type", set_field("model_id", ["memcore/tiny"]), "field 'model_id' must be a non-empty string"),
    ("sparsity-0", "out of range", set_field("sparsity", 0), "field 'sparsity' must be a number in (0, 1], got 0"),
    ("sparsity-2", "out of range", set_field("sparsity", 2), "field 'sparsity' must be a number in (0, 1], got 2"),
    ("sparsity-nan", "out of range", set_field("sparsity", math.nan), "field 'sparsity' must be a number in (0, 1], got NaN"),
    ("timesteps-0", "out of range", set_field("timesteps", 0), "field 'timesteps' must be an integer >= 1, got 0"),
    ("seed-negative", "out of range", set_field("seed", -1), "field 'seed' must be an integer in [0, 2**64), got -1"),
    ("seed-huge", "out of range", set_field("seed", 2**64), "field 'seed' must be an integer in [0, 2**64)"),
    ("rows", "out of range", set_field("rows", "uncond"), "field 'rows' must be one of both, cond"),
    ("dtype", "out of range", set_field("dtype", "float8"), "field 'dtype' must be one of float32, float16, bfloat16"),
    ("hash", "out of range", set_field("weights_sha256", "abc"), "field 'weights_sha256' must be 64 hexadecimal digits"),
    ("target-regex", "out of range", set_field("target", "(unclosed"), "field 'target' must be a target family"),
    ("k", "out of range", wrong_k, "field 'k' of layer '{L}' must be"),
    ("density", "out of range", lambda m, t: m["density"].update({first(m): 1.5}), "field 'density' of layer '{L}' must be a number in [0, 1]"),
    ("layers-twice", "out of range", lambda m, t: m["layers"].append(first(m)), "field 'layers' names layer '{L}' twice"),
    ("shapes-zero", "out of range", lambda m, t: m["shapes"].update({first(m): [0, 8]}), "field 'shapes' of layer '{L}' must be [out, in]"),
    ("values-short", "out of range", lambda m, t: m["timestep_values"].pop(), "field 'timestep_values' holds 1 timesteps but field 'timesteps' is 2"),
    ("values-other", "out of range", lambda m, t: m["timestep_values"].reverse(), "field 'timestep_values' is"),
    ("shapes-lack-layer", "layer missing", shapes_lack_first, "field 'shapes' lacks layer '{L}'"),
    ("layers-lack-layer", "layer missing", layers_lack_first, "field 'shapes' has layer '{L}', which field 'layers' does not list"),
    ("k-lacks-layer", "layer missing", lambda m, t: m["k"].pop(first(m)), "field 'k' lacks layer '{L}'"),
    ("no-tensor", "layer missing", drop_tensor("{L}"), "tensor '{L}' is missing"),
    ("narrow", "tensor of another width", replace_tensor("{L}", lambda x: x[:, :1].contiguous()), "tensor '{L}' is [16, 1] but the file claims shape [16, 64], packed [16, 8]"),
    ("fewer-rows", "tensor of another width", replace_tensor("{L}", lambda x: x[:-1].contiguous()), "tensor '{L}' is [15, 8] but the file claims shape [16, 64]"),
    ("float", "tensor of another dtype", replace_tensor("{L}", lambda x: x.float()), "tensor '{L}' is float32, not uint8"),
    ("bool", "tensor of another dtype", replace_tensor("{L}.per_step", lambda x: x.bool()), "tensor '{L}.per_step' is bool, not uint8"),
    ("three-calls", "calls claimed but not stored", claim_three_calls, "tensor '{L}.per_step' is [2, 16, 8] but the file claims timesteps 3 and shape [16, 64], packed [3, 16, 8]"),
    ("calls-beyond-run", "calls claimed but not stored", set_field("timesteps", 60), "field 'call_timesteps' must be a list of at least 60"),
    ("no-per-step", "per_step claimed but absent", drop_per_step_tensors, "tensor '{L}.per_step' is missing (field 'per_step' is true)"),
    ("one-per-step", "per_step claimed but absent", drop_tensor("{L}.per_step"), "tensor '{L}.per_step' is missing"),
    ("extra", "unexpected tensor", add_tensor("extra", torch.zeros(2, dtype=torch.uint8)), "tensor 'extra' is not a layer of field 'layers'"),
    ("per-step-false", "unexpected tensor", set_field("per_step", False), "tensor '{L}.per_step' is there but field 'per_step' is false"),
    ("union", "tensors disagree", flip_union_bit, "tensor '{L}' is not the union of tensor '{L}.per_step'"),
    ("mask-2", "newer version", set_field("format", "memcore.mask/2"), "written by a newer memcore (memcore.mask/2); this one reads memcore.mask/1"),
    ("mask-0", "unknown version", set_field("format", "memcore.mask/0"), "unknown format memcore.mask/0"),
    ("stats-file", "wrong kind of file", other_file("stats.safetensors"), "is a memcore statistics file, not a mask"),
    ("images", "wrong kind of file", set_field("format", "memcore.images/1"), "is a memcore manifest of generated images, not a mask"),
    ("other-format", "wrong kind of file", set_field("format", "other.mask/1"), "not a memcore mask (field 'format' is \"other.mask/1\")"),
]

STATS_CASES = [
    ("list", "metadata not an object", lambda m, t: "[]", "the memcore metadata must be a JSON object, got []"),
    ("null", "metadata not an object", lambda m, t: "null", "the memcore metadata must be a JSON object, got null"),
    ("no-layers", "missing key", drop_field("layers"), "field 'layers' is missing"),
    ("no-call-timesteps", "missing key", drop_field("call_timesteps"), "field 'call_timesteps' is missing"),
    ("no-num-prompts", "missing key", drop_field("num_prompts"), "field 'num_prompts' is missing"),
    ("no-target", "missing key", drop_field("target"), "field 'target' is missing"),
    ("timesteps-bool", "wrong type", set_field("timesteps", True), "field 'timesteps' must be an integer >= 1, got true"),
    ("num-prompts-bool", "wrong type", set_field("num_prompts", False), "field 'num_prompts' must be an integer >= 1, got false"),
    ("calls-text", "wrong type", set_field("call_timesteps", "981"), "field 'call_timesteps' must be a list of finite numbers"),
    ("calls-item", "wrong type", lambda m, t: m["call_timesteps"].__setitem__(1, "x"), "field 'call_timesteps' item 1 must be a finite number"),
    ("guidance-nan", "out of range", set_field("guidance", math.nan), "field 'guidance' must be a finite number, got NaN"),
    ("guidance-inf", "out of range", set_field("guidance", math.inf), "field 'guidance' must be a finite number, got Infinity"),
    ("height-0", "out of range", set_field("height", 0), "field 'height' must be an integer >= 1"),
    ("seconds", "out of range", set_field("collect_seconds", -1), "field 'collect_seconds' must be a number >= 0"),
    ("prompts-hash", "out of range", set_field("prompts_sha256", "A" * 64), "field 'prompts_sha256' must be 64 hexadecimal digits"),
    ("subset-empty", "out of range", set_field("subset", ""), "field 'subset' must be a non-empty string"),
    ("shapes-lack-layer", "layer missing", shapes_lack_first, "field 'shapes' lacks layer '{L}'"),
    ("narrow", "tensor of another width", replace_tensor("mem/{L}", lambda x: x[:, :8].contiguous()), "tensor 'mem/{L}' is [2, 8] but the file claims timesteps 2 and in_features 64"),
    ("float64", "tensor of another dtype", replace_tensor("null/{L}", lambda x: x.double()), "tensor 'null/{L}' is float64, not float32"),
    ("three-calls", "calls claimed but not stored", set_field("timesteps", 3), "tensor 'mem/{L}' is [2, 64] but the file claims timesteps 3 and in_features 64"),
    ("calls-beyond-run", "calls claimed but not stored", set_field("timesteps", 60), "field 'call_timesteps' must be a list of at least 60"),
    ("no-null", "missing null tensor", drop_tensor("null/{L}"), "tensor 'null/{L}' is missing (field 'layers' lists layer '{L}')"),
    ("extra", "unexpected tensor", add_tensor("mem/other", torch.zeros(2, 16)), "tensor 'mem/other' is not a statistic of a layer"),
    ("nan", "NaN in statistics", nan_in("mem/{L}"), "tensor 'mem/{L}' holds NaN or infinite values"),
    ("negative", "NaN in statistics", replace_tensor("null/{L}", lambda x: -x), "tensor 'null/{L}' holds negative values"),
    ("stats-2", "newer version", set_field("format", "memcore.stats/2"), "written by a newer memcore (memcore.stats/2); this one reads memcore.stats/1"),
    ("mask-file", "wrong kind of file", other_file("mask.safetensors"), "is a memcore mask, not a statistics file"),
]


def _ids(cases):
    return [f"{cls.replace(' ', '-')}:{name}" for name, cls, _, _ in cases]


def altered(made, work, source, edit):
    bad = work / "bad.safetensors"
    rewrite(made / getattr(edit, "copy_from", source), bad, edit)
    return bad


@pytest.fixture
def work(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture
def model_loads(monkeypatch):
    """Records model loads (each gets a fresh tiny model): every command must refuse a bad file
    before loading anything."""
    import memcore.models

    loads = []

    def load(*args, **kwargs):
        loads.append(args)
        return tiny()

    monkeypatch.setattr(memcore.models, "load_pipeline", load)
    return loads


MASK_COMMANDS = ["prune", "analyze", "iou", "generate"]


@pytest.mark.parametrize("command", MASK_COMMANDS)
@pytest.mark.parametrize("name, cls, edit, expect", MASK_CASES, ids=_ids(MASK_CASES))
def test_altered_mask_is_refused_by_every_command(made, work, capsys, model_loads, command, name, cls, edit, expect):
    bad = altered(made, work, "mask.safetensors", edit)
    good = made / "mask.safetensors"
    argv = {
        "prune": ["prune", "--model", "tiny", "--mask", bad, "--out", work / "pruned"],
        "analyze": ["analyze", good, bad, "--out", work / "analysis"],
        "iou": ["iou", good, bad],
        "generate": ["generate", "--model", "tiny", "--prompts", made / "prompts.txt", "--seeds", "0", "--mask", bad,
                     "--out", work / "images", "--steps", "1", "--height", "64", "--width", "64"],
    }[command]
    message = user_error(capsys, work, *argv)
    layer = first(read(good)[0])
    assert message.startswith(f"{bad}: ") and expect.format(L=layer) in message, message
    assert model_loads == []


@pytest.mark.parametrize("name, cls, edit, expect", STATS_CASES, ids=_ids(STATS_CASES))
def test_altered_statistics_are_refused(made, work, capsys, model_loads, name, cls, edit, expect):
    bad = altered(made, work, "stats.safetensors", edit)
    message = user_error(capsys, work, "mask", "--model", "tiny", "--stats", bad, "--out", work / "m.safetensors")
    layer = first(read(made / "stats.safetensors")[0])
    assert message.startswith(f"{bad}: ") and expect.format(L=layer) in message, message
    assert model_loads == []
    with pytest.raises(MemcoreError):  # the library says the same
        Statistics.load(bad)


def test_unaltered_files_pass_every_command(made, tmp_path, capsys):
    """What the alterations start from is accepted: each refusal above is the alteration's doing."""
    mask, stats = made / "mask.safetensors", made / "stats.safetensors"
    rewrite(mask, tmp_path / "copy.safetensors", lambda m, t: None)  # the rewriting itself changes nothing
    for argv in (
        ["prune", "--model", "tiny", "--mask", tmp_path / "copy.safetensors", "--out", tmp_path / "pruned"],
        ["analyze", mask, tmp_path / "copy.safetensors", "--out", tmp_path / "analysis"],
        ["iou", mask, tmp_path / "copy.safetensors"],
        ["mask", "--model", "tiny", "--stats", stats, "--out", tmp_path / "m.safetensors", "--sparsity", "0.1"],
        ["generate", "--model", "tiny", "--prompts", made / "prompts.txt", "--seeds", "0", "--mask", mask,
         "--out", tmp_path / "images", "--steps", "1", "--height", "64", "--width", "64"],
    ):
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, (argv[0], err)


# ---------------------------------------------------------------------------------------------
# the library


def test_every_writer_passes_its_own_schema(made, tmp_path):
    """Masks with and without per-step data, of fewer calls than the statistics, statistics of
    subsets of a built-in set, and manifests with and without a mask: written, then read back
    through the schema. Their JSON is strict (no NaN, no Infinity)."""
    from memcore.prompts import load_prompts

    pipe = tiny()
    config = LocalizeConfig(timesteps=2, height=64, width=64, progress=False, rows="cond", token_norm=False)
    subsets = collect_subset_stats(pipe, {"memorize_0": load_prompts("memorize_0"), "mine": ["a fox"]}, config)
    written = []
    for name, stats in subsets.items():
        stats.save(tmp_path / f"stats_{name}.safetensors")
        written.append(tmp_path / f"stats_{name}.safetensors")
        for per_step, tau in ((False, 1), (True, 2)):
            path = tmp_path / f"mask_{name}_{per_step}.safetensors"
            compute_mask(pipe, stats, sparsity=0.3, timesteps=tau, per_step=per_step).save(path)
            written.append(path)
    assert Statistics.load(written[0]).metadata["prompt_set"] == "memorize_0"
    for path in written:
        meta, tensors = read(path)
        expected = schema.STATS if "stats" in path.name else schema.MASK
        assert schema.check(str(path), meta, expected, tensors) is meta
        with safe_open(str(path), framework="pt") as handle:
            json.loads(handle.metadata()["memcore"], parse_constant=_refuse)

    for mask in (None, made / "mask.safetensors"):
        out = tmp_path / f"images_{mask is None}"
        generate(tiny(), PROMPTS, [0, 3], out_dir=out, mask=mask, steps=1, height=64, width=64, progress=False)
        manifest = load_manifest(out)
        assert manifest["format"] == "memcore.images/1" and (manifest["mask"] is None) == (mask is None)
        json.loads((out / "manifest.json").read_text(), parse_constant=_refuse)


def _refuse(token):
    raise AssertionError(f"{token} in strict JSON")


def test_nan_never_reaches_a_file(made, tmp_path):
    stats = Statistics.load(made / "stats.safetensors")
    stats.metadata["guidance"] = math.nan
    with pytest.raises(MemcoreError, match=r"stats\.safetensors \(not written\): field 'guidance' must be a finite number, got NaN"):
        stats.save(tmp_path / "stats.safetensors")
    mask = Mask.load(made / "mask.safetensors")
    mask.metadata["density"][first(mask.metadata)] = math.inf
    with pytest.raises(MemcoreError, match=r"field 'density' of layer '.*' must be a number in \[0, 1\], got Infinity"):
        mask.save(tmp_path / "mask.safetensors")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_schema_of_a_mask(made):
    meta, tensors = read(made / "mask.safetensors")
    assert schema.check("m", meta, schema.MASK, tensors) is meta

    def refusal(change, tensors=tensors):
        altered = json.loads(json.dumps(meta))
        change(altered)
        with pytest.raises(MemcoreError) as info:
            schema.check("m", altered, schema.MASK, tensors)
        return str(info.value)

    layer = first(meta)
    assert refusal(lambda m: m.pop("sparsity")) == "m: field 'sparsity' is missing"
    assert refusal(lambda m: m.update(timesteps=False)) == "m: field 'timesteps' must be an integer >= 1, got false"
    # k follows the sparsity: a sparsity edited alone disagrees with the recorded k
    assert refusal(lambda m: m.update(sparsity=0.5)) == f"m: field 'k' of layer '{layer}' must be 32 (sparsity 0.5 of 64 inputs), got 3"
    # fields the table does not know are kept and ignored; optional ones may be absent
    extra = {**meta, "note": {"any": ["thing"]}}
    assert schema.check("m", extra, schema.MASK, tensors)["note"] == {"any": ["thing"]}
    lean = {k: v for k, v in meta.items() if k not in ("k", "density", "num_prompts", "call_timesteps", "memcore_version")}
    schema.check("m", lean, schema.MASK, tensors)
    # a name that could break the one-line contract is escaped
    text = refusal(lambda m: m["shapes"].update({"a\nb": [1, 1]}))
    assert "\n" not in text and "'a\\nb'" in text


def test_union_of_the_per_step_masks_ignores_padding_bits():
    from test_analysis import A, L1, make_mask

    mask = make_mask(A)  # L1 has 13 inputs: the last byte of a row holds 5 weights and 3 padding bits
    tensors = {**mask.layers, **{name + ".per_step": t for name, t in mask.per_step.items()}}
    padded = mask.layers[L1].clone()
    padded[0, -1] |= 0b1110_0000
    schema.check("m", mask.metadata, schema.MASK, {**tensors, L1: padded})
    flipped = mask.layers[L1].clone()
    flipped[0, -1] ^= 0b0001_0000  # column 12, a weight
    with pytest.raises(MemcoreError, match=f"^m: tensor '{L1}' is not the union of tensor '{L1}.per_step'$"):
        schema.check("m", mask.metadata, schema.MASK, {**tensors, L1: flipped})


def test_schema_of_statistics(made):
    meta, tensors = read(made / "stats.safetensors")
    assert schema.check("s", meta, schema.STATS, tensors) is meta
    with pytest.raises(MemcoreError, match=r"^s: tensor 'mem/.*' holds negative values"):
        schema.check("s", meta, schema.STATS, {**tensors, f"mem/{first(meta)}": -tensors[f"mem/{first(meta)}"]})
    with pytest.raises(MemcoreError, match=r"^s: tensor 'null/.*' is missing"):
        schema.check("s", meta, schema.STATS, {k: v for k, v in tensors.items() if not k.startswith("null/")})
    # a huge integer is an integer, not an overflow
    with pytest.raises(MemcoreError, match=r"^s: field 'seed' must be an integer in \[0, 2\*\*64\), got 1000000"):
        schema.check("s", {**meta, "seed": 10**400}, schema.STATS, tensors)


@pytest.mark.parametrize(
    "found, message",
    [
        ("memcore.mask/1", None),
        ("memcore.mask/2", "m: written by a newer memcore (memcore.mask/2); this one reads memcore.mask/1"),
        ("memcore.mask/17", "m: written by a newer memcore (memcore.mask/17); this one reads memcore.mask/1"),
        ("memcore.mask/0", "m: unknown format memcore.mask/0; this memcore reads memcore.mask/1"),
        ("memcore.stats/1", "m: is a memcore statistics file, not a mask"),
        ("memcore.stats/9", "m: is a memcore statistics file, not a mask"),
        ("memcore.thing/1", 'm: not a memcore mask (field \'format\' is "memcore.thing/1")'),
        (7, "m: not a memcore mask (field 'format' is 7)"),
    ],
)
def test_format_versions(made, found, message):
    meta, tensors = read(made / "mask.safetensors")
    meta["format"] = found
    if message is None:
        schema.check("m", meta, schema.MASK, tensors)
        return
    with pytest.raises(MemcoreError) as info:
        schema.check("m", meta, schema.MASK, tensors)
    assert str(info.value) == message


@pytest.fixture(scope="module")
def images(made, tmp_path_factory):
    out = tmp_path_factory.mktemp("images") / "out"
    generate(tiny(), PROMPTS, [0, 5], out_dir=out, mask=made / "mask.safetensors", steps=1, height=64, width=64, progress=False)
    return out


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("format"), "field 'format' is missing"),
        (lambda m: m.update(format="memcore.images/2"), "written by a newer memcore (memcore.images/2)"),
        (lambda m: m.update(format="memcore.mask/1"), "is a memcore mask, not a manifest of generated images"),
        (lambda m: m["settings"].pop("height"), "field 'settings.height' is missing"),
        (lambda m: m["settings"].update(guidance=None), "field 'settings.guidance' must be a finite number, got null"),
        (lambda m: m.update(seeds=[0, 0]), "field 'seeds' names seed 0 twice"),
        (lambda m: m.update(seeds=[0, -5]), "field 'seeds' item 1 must be an integer in [0, 2**64)"),
        (lambda m: m["mask"].update(zeroed=True), "field 'mask.zeroed' must be an integer >= 0, got true"),
        (lambda m: m["grid"].update(size=[1, 1]), "field 'grid.size' is [1, 1] but 2 prompts and 2 seeds of 64x64 images make"),
        (lambda m: m["images"].pop(), "field 'images' has 3 entries, not one per prompt and seed (4)"),
        (lambda m: m["images"][1].update(seed=7), "field 'images[1].seed' must be one of field 'seeds', got 7"),
        (lambda m: m["images"][1].update(seed=0), "field 'images[1]' repeats prompt 0 and seed 0"),
        (lambda m: m["images"][2].pop("pruned"), "field 'images[2].pruned' is missing"),
        (lambda m: m["images"][0].update(original="../../etc/passwd"), "field 'images[0].original' must be a path inside the folder"),
        (lambda m: m["images"][0].update(original="images/none.png"), "field 'images[0].original' names images/none.png, which is not in the folder"),
        (lambda m: m.update(mask=None), "field 'images[0].pruned' is there but field 'mask' is null"),
    ],
)
def test_manifest_schema(images, tmp_path, change, message):
    folder = tmp_path / "copy"
    shutil.copytree(images, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    load_manifest(folder)
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MemcoreError) as info:
        load_manifest(folder)
    assert str(info.value).startswith(f"{folder / 'manifest.json'}: ") and message in str(info.value), str(info.value)


def test_manifest_files(images, tmp_path):
    with pytest.raises(MemcoreError, match="no such folder"):
        load_manifest(tmp_path / "none")
    with pytest.raises(MemcoreError, match="no manifest.json; not a folder written by memcore generate"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(MemcoreError, match="manifest.json: not a memcore manifest of generated images: not JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe")
    with pytest.raises(MemcoreError, match="cannot read it"):
        load_manifest(tmp_path)


# ---------------------------------------------------------------------------------------------
# provenance


@pytest.fixture(scope="module")
def local_copy(tmp_path_factory):
    """The tiny model saved to a folder: the same weights under another model id (the folder)."""
    folder = tmp_path_factory.mktemp("copy") / "tiny-copy"
    tiny().save_pretrained(folder)
    return folder


def _warnings(caplog):
    return [r for r in caplog.records if r.name == "memcore" and r.levelno == logging.WARNING]


def test_same_weights_under_another_name_warn_once(made, local_copy, caplog):
    from memcore.pruning import prune

    mask = Mask.load(made / "mask.safetensors")
    copy = load_pipeline(str(local_copy), device="cpu", dtype="float32")
    with caplog.at_level(logging.WARNING, logger="memcore"):
        assert prune(copy, mask) > 0  # accepted: a local copy of the same model is legitimate
    (record,) = _warnings(caplog)
    assert record.getMessage() == (
        f"memcore: the mask was made for model 'memcore/tiny' and is used with model {str(local_copy)!r}; "
        "their target weights are the same"
    )
    caplog.clear()
    stats = Statistics.load(made / "stats.safetensors")
    with caplog.at_level(logging.WARNING, logger="memcore"):
        compute_mask(load_pipeline(str(local_copy), device="cpu", dtype="float32"), stats, sparsity=0.05)
    (record,) = _warnings(caplog)
    assert "the statistics file was made for model 'memcore/tiny'" in record.getMessage()


def test_same_model_or_no_model_given_does_not_warn(made, caplog):
    mask = Mask.load(made / "mask.safetensors")
    pipe = tiny()
    with caplog.at_level(logging.WARNING, logger="memcore"):
        check_same_weights(find_targets(pipe), mask.metadata, "the mask", model=pipe)
        check_same_weights(find_targets(pipe), {**mask.metadata, "model_id": "x"}, "the mask")  # identity unknown
        check_same_weights(find_targets(pipe), {**mask.metadata, "model_id": "x"}, "the mask", model=pipe.unet)
    assert _warnings(caplog) == []
    with caplog.at_level(logging.WARNING, logger="memcore"):
        check_same_weights(find_targets(pipe), {**mask.metadata, "model_id": "x"}, "the mask", model=pipe)
    assert len(_warnings(caplog)) == 1


def test_generate_with_a_local_copy_warns_once(made, local_copy, tmp_path, capsys, caplog):
    argv = ["generate", "--model", local_copy, "--prompts", made / "prompts.txt", "--seeds", "0", "--mask",
            made / "mask.safetensors", "--out", tmp_path / "images", "--steps", "1", "--height", "64", "--width", "64"]
    with caplog.at_level(logging.WARNING, logger="memcore"):
        code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert len(_warnings(caplog)) == 1


def test_the_same_command_writes_the_same_mask_bytes(made, tmp_path, capsys):
    """Determinism: two runs of one command give the same mask file, byte for byte, and statistics
    files with the same tensors (only their metadata's collection time differs)."""
    runs = []
    for run in ("a", "b"):
        mask, stats = tmp_path / f"{run}.safetensors", tmp_path / f"{run}_stats.safetensors"
        code, _, err = run_cli(
            capsys, "localize", "--model", "tiny", "--prompts", made / "prompts.txt", "--timesteps", "2",
            "--height", "64", "--width", "64", "--sparsity", "0.05", "--per-step", "--out", mask, "--stats-out", stats,
        )
        assert code == 0, err
        runs.append((mask.read_bytes(), Statistics.load(stats)))
    (mask_a, stats_a), (mask_b, stats_b) = runs
    assert mask_a == mask_b
    assert Mask.load(tmp_path / "a.safetensors").density() > 0  # a mask with something in it
    for layer in stats_a.layers:
        assert torch.equal(stats_a.mem[layer], stats_b.mem[layer]) and torch.equal(stats_a.null[layer], stats_b.null[layer])
    assert {k: v for k, v in stats_a.metadata.items() if k != "collect_seconds"} == {
        k: v for k, v in stats_b.metadata.items() if k != "collect_seconds"
    }
