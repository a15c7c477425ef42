"""What memcore's files hold, per format version: the one check made before anything reads them.

Formats (the ``format`` field of each file names its own):

``memcore.mask/1``
    safetensors; a ``memcore`` metadata entry (JSON object) and one uint8 tensor per layer,
    ``[out, ceil(in / 8)]``, with ``per_step`` also ``<layer>.per_step`` ``[timesteps, out, ceil(in / 8)]``
    whose OR over the first axis is the layer's tensor (padding bits aside).
``memcore.stats/1``
    safetensors; a ``memcore`` metadata entry and float32 ``mem/<layer>`` and ``null/<layer>``,
    ``[timesteps, in]``, finite and >= 0 (sums of squares).
``memcore.images/1``
    the ``manifest.json`` of a folder written by ``memcore generate``: prompts, seeds, settings,
    the mask applied, the grid and the images, every one of them in the folder.

Each version has a table, field -> (check, required), checked in order (a field's check may rely on the
fields above it). Required are the fields a reader relies on (for statistics, also those a mask
computed from them must carry); the other fields memcore writes are checked when present; fields a
table does not know are kept and ignored (a writer of the same version may add informational fields;
a new meaning for a field is a new version). The tensors are then checked against the metadata: every
expected one present with its dtype and shape, none other.

Any failure is one :class:`MemcoreError` naming the file and the field or tensor::

    mask.safetensors: field 'shapes' lacks layer 'down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2'
    stats.safetensors: tensor 'mem/x' is [5, 64] but the file claims timesteps 10 and in_features 64
    mask.safetensors: written by a newer memcore (memcore.mask/2); this one reads memcore.mask/1
    stats.safetensors: is a memcore mask, not a statistics file

Writers check what they are about to write against the same tables.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from memcore.config import ROWS
from memcore.errors import MemcoreError
from memcore.models import DTYPES
from memcore.targets import FAMILIES, check_family

MASK = "memcore.mask/1"
STATS = "memcore.stats/1"
IMAGES = "memcore.images/1"

# What a file of each family is called in messages.
NOUNS = {"mask": "mask", "stats": "statistics file", "images": "manifest of generated images"}
_FORMAT = re.compile(r"memcore\.([a-z]+)/([0-9]+)")
_SEED_LIMIT = 2**64  # torch.manual_seed takes 0 .. 2**64 - 1


class Invalid(Exception):
    """Content that breaks its schema. ``field`` is filled in by the table that checked it."""

    def __init__(self, text: str, field: str | None = None) -> None:
        super().__init__(text)
        self.text, self.field = text, field

    def describe(self) -> str:
        return self.text if self.field is None else f"field {self.field!r} {self.text}"


# A check takes a field's value and the metadata object it is in, and raises Invalid.
Check = Callable[[object, Mapping], None]
Table = dict[str, tuple[Check, bool]]  # field -> (check, required)


# ---------------------------------------------------------------------------------------------
# values


def show(value: object, limit: int = 60) -> str:
    """A value as JSON spells it, on one line, cut in the middle when long."""
    try:
        text = json.dumps(value, sort_keys=True)
    except (TypeError, ValueError, RecursionError):  # not JSON (an object in memory), or nested too deeply
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit // 2 - 2] + "..." + text[-(limit // 2 - 2) :]


def _name(name: str) -> str:
    """A layer or tensor name as messages quote it (escaped, cut when long)."""
    text = repr(name)
    return text if len(text) <= 90 else text[:43] + "..." + text[-43:]


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a finite float (a bool is not a number here)."""
    return is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _expect(test: Callable[[object], bool], expected: str) -> Check:
    def check(value: object, meta: Mapping) -> None:
        if not test(value):
            raise Invalid(f"must be {expected}, got {show(value)}")

    return check


def integer(low: int, high: int | None = None, high_text: str | None = None) -> Check:
    """An int in [low, high) (high None: no bound); a bool is not an int."""
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high_text or high})"
    return _expect(lambda v: is_int(v) and v >= low and (high is None or v < high), expected)


def number(low: float | None = None, high: float | None = None, low_open: bool = False) -> Check:
    """A finite number in [low, high] ((low, high] with ``low_open``)."""
    if low is None:
        return _expect(is_number, "a finite number")
    expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]" if high is not None else f"a number >= {low:g}"

    def test(v: object) -> bool:
        return is_number(v) and (v > low if low_open else v >= low) and (high is None or v <= high)

    return _expect(test, expected)


def one_of(choices) -> Check:
    choices = tuple(choices)
    return _expect(lambda v: isinstance(v, str) and v in choices, "one of " + ", ".join(choices))


def literal(value: str) -> Check:
    return _expect(lambda v: v == value, show(value))


def nullable(check: Check) -> Check:
    def nullable_check(value: object, meta: Mapping) -> None:
        if value is not None:
            check(value, meta)

    return nullable_check


TEXT = _expect(lambda v: isinstance(v, str) and v != "", "a non-empty string")
STRING = _expect(lambda v: isinstance(v, str), "a string")
BOOL = _expect(lambda v: isinstance(v, bool), "true or false")
SHA256 = _expect(lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None, "64 hexadecimal digits")
POSITIVE = integer(1)
SEED = integer(0, _SEED_LIMIT, "2**64")
DTYPE = one_of(DTYPES)


def target(value: object, meta: Mapping) -> None:
    """A target family or a valid regular expression (:func:`memcore.targets.check_family`)."""
    if isinstance(value, str):
        try:
            check_family(value)
            return
        except MemcoreError:
            pass
    raise Invalid(f"must be a target family ({', '.join(FAMILIES)}) or a valid regular expression, got {show(value)}")


def list_of(item: Check, what: str, min_length: Callable[[Mapping], int] = lambda meta: 1) -> Check:
    """A list of at least ``min_length(meta)`` items, each passing ``item``."""

    def check(value: object, meta: Mapping) -> None:
        if not isinstance(value, (list, tuple)):
            raise Invalid(f"must be a list of {what}, got {show(value)}")
        if len(value) < min_length(meta):
            raise Invalid(f"must be a list of at least {min_length(meta)} {what}, got {len(value)}")
        for i, v in enumerate(value):
            try:
                item(v, meta)
            except Invalid as exc:
                raise Invalid(f"item {i} {exc.text}") from None

    return check


def unique(check: Check, what: str) -> Check:
    def unique_check(value: object, meta: Mapping) -> None:
        check(value, meta)
        seen = set()
        for v in value:
            if v in seen:
                raise Invalid(f"names {what} {_name(v) if isinstance(v, str) else show(v)} twice")
            seen.add(v)

    return unique_check


LAYERS = unique(list_of(TEXT, "layer names"), "layer")


# A check of one layer's entry in a per-layer object: (value, metadata, layer name).
LayerCheck = Callable[[object, Mapping, str], None]


def any_layer(check: Check) -> LayerCheck:
    return lambda value, meta, layer: check(value, meta)


def per_layer(item: LayerCheck, what: str) -> Check:
    """An object with exactly the layers of field ``layers`` as keys, each value passing ``item``."""

    def check(value: object, meta: Mapping) -> None:
        if not isinstance(value, dict):
            raise Invalid(f"must be an object of {what} per layer, got {show(value)}")
        for layer in meta["layers"]:
            if layer not in value:
                raise Invalid(f"lacks layer {_name(layer)}")
        for layer in value:
            if layer not in meta["layers"]:
                raise Invalid(f"has layer {_name(layer)}, which field 'layers' does not list")
        for layer in meta["layers"]:
            try:
                item(value[layer], meta, layer)
            except Invalid as exc:
                raise Invalid(f"of layer {_name(layer)} {exc.text}") from None

    return check


def _is_shape(v: object) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(is_int(n) and n >= 1 for n in v)


SHAPES = per_layer(any_layer(_expect(_is_shape, "[out, in], two positive integers")), "[out, in] shapes")


def _calls(meta: Mapping) -> int:
    return meta["timesteps"]


CALL_TIMESTEPS = list_of(number(), "finite numbers", min_length=_calls)


def timestep_values(value: object, meta: Mapping) -> None:
    """The timestep of each of the mask's calls: ``timesteps`` of them, the first of ``call_timesteps``."""
    list_of(number(), "finite numbers")(value, meta)
    if len(value) != meta["timesteps"]:
        raise Invalid(f"holds {len(value)} timesteps but field 'timesteps' is {meta['timesteps']}")
    calls = meta.get("call_timesteps")
    if calls is not None and list(value) != list(calls[: len(value)]):
        raise Invalid(f"is {show(value)} but field 'call_timesteps' starts {show(list(calls[: len(value)]))}")


def top_k_of_layer(value: object, meta: Mapping, layer: str) -> None:
    """k = top_k(sparsity, in) of the layer (docs/method.md section 3)."""
    from memcore.mask import top_k

    in_features = meta["shapes"][layer][1]
    want = top_k(meta["sparsity"], in_features)
    if not is_int(value) or value != want:
        raise Invalid(f"must be {want} (sparsity {show(meta['sparsity'])} of {in_features} inputs), got {show(value)}")


def _check_table(obj: object, table: Table, prefix: str = "") -> None:
    """Every field of ``table`` in ``obj`` (a JSON object), in order; Invalid names the field."""
    if not isinstance(obj, dict):
        raise Invalid(f"must be an object, got {show(obj)}", prefix.rstrip(".") or None)
    for key, (check, required) in table.items():
        if key not in obj:
            if required:
                raise Invalid("is missing", prefix + key)
            continue
        try:
            check(obj[key], obj)
        except Invalid as exc:
            if exc.field is not None:  # a nested table named it
                raise
            raise Invalid(exc.text, prefix + key) from None


# ---------------------------------------------------------------------------------------------
# memcore.stats/1 and memcore.mask/1


# What masks and statistics record alike: the model, its layers, and the settings of the run.
_RUN: Table = {
    "format": (STRING, True),
    "memcore_version": (STRING, False),
    "model_id": (TEXT, True),
    "target": (target, True),
    "weights_sha256": (SHA256, True),
    "dtype": (DTYPE, True),
    "layers": (LAYERS, True),
    "shapes": (SHAPES, True),
}
_SETTINGS: Table = {
    "rows": (one_of(ROWS), True),
    "token_norm": (BOOL, True),
    "seed": (SEED, True),
    "steps": (POSITIVE, True),
    "batch_size": (POSITIVE, False),
    "guidance": (number(), False),
    "height": (POSITIVE, False),
    "width": (POSITIVE, False),
    "scheduler": (TEXT, False),
    "prompts_sha256": (SHA256, False),
    "subset": (TEXT, False),
    "prompt_set": (TEXT, False),
}

STATS_V1: Table = {
    **_RUN,
    "timesteps": (POSITIVE, True),
    "call_timesteps": (CALL_TIMESTEPS, True),
    "num_prompts": (POSITIVE, True),
    **_SETTINGS,
    "collect_seconds": (number(0), False),
}

MASK_V1: Table = {
    **_RUN,
    "sparsity": (number(0, 1, low_open=True), True),
    "timesteps": (POSITIVE, True),
    "call_timesteps": (CALL_TIMESTEPS, False),
    "timestep_values": (timestep_values, True),
    "per_step": (BOOL, True),
    "num_prompts": (POSITIVE, False),
    **_SETTINGS,
    "k": (per_layer(top_k_of_layer, "k"), False),
    "density": (per_layer(any_layer(number(0, 1)), "densities"), False),
}


def _dims(shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _tensor(tensors: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple, claim: str, missing: str):
    """``tensors[name]`` once it is there with ``dtype`` and ``shape``; ``claim`` says where the shape comes from."""
    if name not in tensors:
        raise Invalid(f"tensor {_name(name)} is missing ({missing})")
    tensor = tensors[name]
    if tensor.dtype != dtype:
        raise Invalid(f"tensor {_name(name)} is {_dtype(tensor)}, not {str(dtype).removeprefix('torch.')}")
    if tuple(tensor.shape) != shape:
        raise Invalid(f"tensor {_name(name)} is {_dims(tensor.shape)} but the file claims {claim}")
    return tensor


def _unexpected(tensors: Mapping[str, torch.Tensor], expected: set[str], explain: Callable[[str], str]) -> None:
    for name in tensors:
        if name not in expected:
            raise Invalid(f"tensor {_name(name)} {explain(name)}")


def stats_tensors(meta: Mapping, tensors: Mapping[str, torch.Tensor]) -> None:
    """float32 ``mem/<layer>`` and ``null/<layer>``, [timesteps, in], finite and >= 0; nothing else."""
    tau = meta["timesteps"]
    for layer in meta["layers"]:
        in_features = meta["shapes"][layer][1]
        for part in ("mem", "null"):
            name = f"{part}/{layer}"
            claim = f"timesteps {tau} and in_features {in_features}"
            missing = f"field 'layers' lists layer {_name(layer)}"
            tensor = _tensor(tensors, name, torch.float32, (tau, in_features), claim, missing)
            if not torch.isfinite(tensor).all():
                raise Invalid(f"tensor {_name(name)} holds NaN or infinite values")
            if (tensor < 0).any():
                raise Invalid(f"tensor {_name(name)} holds negative values (statistics are sums of squares)")
    expected = {f"{part}/{layer}" for layer in meta["layers"] for part in ("mem", "null")}
    _unexpected(tensors, expected, lambda name: "is not a statistic of a layer of field 'layers'")


PER_STEP = ".per_step"


def _same_bits(a: np.ndarray, b: np.ndarray, in_features: int) -> bool:
    """Packed rows ``a`` and ``b`` hold the same bits, padding bits aside."""
    spare = in_features % 8
    if not spare:
        return np.array_equal(a, b)
    keep = np.uint8((1 << spare) - 1)
    return np.array_equal(a[..., :-1], b[..., :-1]) and np.array_equal(a[..., -1] & keep, b[..., -1] & keep)


def mask_tensors(meta: Mapping, tensors: Mapping[str, torch.Tensor]) -> None:
    """uint8 packed masks per layer and, with ``per_step``, per call; their OR is the layer's mask."""
    tau, per_step = meta["timesteps"], meta["per_step"]
    for layer in meta["layers"]:
        out, in_features = meta["shapes"][layer]
        packed = (out, (in_features + 7) // 8)
        claim = f"shape {_dims((out, in_features))}, packed {_dims(packed)}"
        union = _tensor(tensors, layer, torch.uint8, packed, claim, "field 'layers' lists it")
        if not per_step:
            continue
        name = layer + PER_STEP
        claim = f"timesteps {tau} and shape {_dims((out, in_features))}, packed {_dims((tau, *packed))}"
        steps = _tensor(tensors, name, torch.uint8, (tau, *packed), claim, "field 'per_step' is true")
        # numpy's reduce is one pass; torch's bitwise_or over the calls was measured 100x slower here
        ored = np.bitwise_or.reduce(steps.numpy(), axis=0)
        if not _same_bits(ored, union.numpy(), in_features):
            raise Invalid(f"tensor {_name(layer)} is not the union of tensor {_name(name)}")

    def explain(name: str) -> str:
        if name.endswith(PER_STEP) and name.removesuffix(PER_STEP) in meta["layers"]:
            return "is there but field 'per_step' is false"
        return "is not a layer of field 'layers'"

    expected = set(meta["layers"]) | ({layer + PER_STEP for layer in meta["layers"]} if per_step else set())
    _unexpected(tensors, expected, explain)


# ---------------------------------------------------------------------------------------------
# memcore.images/1: the manifest of memcore generate


def _relative_path(value: object) -> bool:
    if not isinstance(value, str) or not value or "\\" in value:
        return False
    path = PurePosixPath(value)
    return not path.is_absolute() and ".." not in path.parts and str(path) == value


RELATIVE_PATH = _expect(_relative_path, "a path inside the folder, relative, with / between names")


def nested(table: Table, name: str) -> Check:
    def check(value: object, meta: Mapping) -> None:
        _check_table(value, table, f"{name}.")

    return check


IMAGE_SETTINGS: Table = {
    "steps": (POSITIVE, True),
    "guidance": (number(), True),
    "height": (POSITIVE, True),
    "width": (POSITIVE, True),
    "scheduler": (TEXT, True),
}
MASK_SUMMARY: Table = {
    "path": (nullable(TEXT), True),
    "model_id": (TEXT, False),
    "target": (target, False),
    "sparsity": (number(0, 1, low_open=True), False),
    "timesteps": (POSITIVE, False),
    "weights_sha256": (SHA256, False),
    "layers": (POSITIVE, True),
    "zeroed": (integer(0), True),
    "force": (BOOL, True),
}
MITIGATION_SUMMARY: Table = {  # memcore.generate's record of --mitigation wen (memcore.mitigation.WenSettings)
    "method": (literal("wen"), True),
    "lr": (number(0, low_open=True), True),
    "target_loss": (number(0), True),
    "max_steps": (POSITIVE, True),
    "optimizer": (TEXT, False),
    "denoiser_call": (integer(0), False),
    "frozen_tokens": (list_of(integer(0), "token positions", min_length=lambda meta: 0), False),
    "seconds": (number(0), True),
    "seconds_per_image": (number(0), True),
    "reached_target": (integer(0), True),
    "images": (POSITIVE, True),
}
IMAGE_MITIGATION: Table = {  # one image's optimization
    "steps": (integer(0), True),
    "initial_loss": (number(0), True),
    "loss": (number(0), True),
    "reached_target": (BOOL, True),
    "seconds": (number(0), True),
}
GRID: Table = {
    "path": (RELATIVE_PATH, True),
    "size": (_expect(_is_shape, "[width, height], two positive integers"), True),
    "rows": (literal("prompts"), True),
    "columns": (literal("seeds"), True),
}


def grid_size(meta: Mapping) -> None:
    """The grid's size follows from the prompts, seeds and image size (memcore.generate)."""
    from memcore.generate import grid_size as geometry

    settings, size = meta["settings"], meta["grid"]["size"]
    want = list(geometry(len(meta["prompts"]), len(meta["seeds"]), settings["width"], settings["height"], meta["mask"] is not None))
    if list(size) != want:
        raise Invalid(
            f"is {show(size)} but {len(meta['prompts'])} prompts and {len(meta['seeds'])} seeds of "
            f"{settings['width']}x{settings['height']} images make {show(want)}",
            "grid.size",
        )


def images(value: object, meta: Mapping) -> None:
    """One entry per (prompt, seed): its original and, with a mask, its pruned image; with a
    mitigation, the optimization of its embedding."""
    if not isinstance(value, list):
        raise Invalid(f"must be a list of images, got {show(value)}")
    pruned, mitigated = meta["mask"] is not None, meta.get("mitigation") is not None
    seen = set()
    for i, item in enumerate(value):
        entry: Table = {
            "prompt": (integer(0, len(meta["prompts"])), True),
            "seed": (_expect(lambda v: is_int(v) and v in meta["seeds"], "one of field 'seeds'"), True),
            "original": (RELATIVE_PATH, True),
            "pruned": (RELATIVE_PATH, pruned),
            "mitigation": (nested(IMAGE_MITIGATION, f"images[{i}].mitigation"), mitigated),
        }
        _check_table(item, entry, f"images[{i}].")
        for field, present in (("pruned", pruned), ("mitigation", mitigated)):
            if not present and field in item:
                raise Invalid(f"is there but field '{'mask' if field == 'pruned' else field}' is null", f"images[{i}].{field}")
        key = (item["prompt"], item["seed"])
        if key in seen:
            raise Invalid(f"repeats prompt {key[0]} and seed {key[1]}", f"images[{i}]")
        seen.add(key)
    want = len(meta["prompts"]) * len(meta["seeds"])
    if len(value) != want:
        raise Invalid(f"has {len(value)} entries, not one per prompt and seed ({want})")


IMAGES_V1: Table = {
    "format": (STRING, True),
    "model_id": (TEXT, True),
    "dtype": (DTYPE, True),
    "prompts": (list_of(STRING, "prompts"), True),
    "seeds": (unique(list_of(SEED, "seeds"), "seed"), True),
    "settings": (nested(IMAGE_SETTINGS, "settings"), True),
    "batch_size": (POSITIVE, True),
    "mask": (nullable(nested(MASK_SUMMARY, "mask")), True),
    "mitigation": (nullable(nested(MITIGATION_SUMMARY, "mitigation")), False),
    "grid": (nested(GRID, "grid"), True),
    "images": (images, True),
}


def manifest_files(meta: Mapping, folder: Path) -> None:
    """Every file the manifest names is in ``folder``."""
    named = [("grid.path", meta["grid"]["path"])]
    for i, item in enumerate(meta["images"]):
        named += [(f"images[{i}].{kind}", item[kind]) for kind in ("original", "pruned") if kind in item]
    for field, path in named:
        if not (folder / path).is_file():
            raise Invalid(f"names {path}, which is not in the folder", field)


# ---------------------------------------------------------------------------------------------
# formats


@dataclass(frozen=True)
class Format:
    """One version of one family of files: its metadata table and its check of the tensors."""

    name: str  # "memcore.mask/1"
    table: Table
    rules: tuple[Callable[[Mapping], None], ...] = ()  # across fields, once the table passed
    tensors: Callable[[Mapping, Mapping[str, torch.Tensor]], None] | None = None

    @property
    def family(self) -> str:
        return _FORMAT.fullmatch(self.name).group(1)


FORMATS = {
    f.name: f
    for f in (
        Format(MASK, MASK_V1, tensors=mask_tensors),
        Format(STATS, STATS_V1, tensors=stats_tensors),
        Format(IMAGES, IMAGES_V1, rules=(grid_size,)),
    )
}


def _format(meta: dict, expected: str) -> Format:
    """The format ``meta`` says it is in, if it is a version of ``expected``'s family this memcore reads."""
    want = FORMATS[expected]
    noun = NOUNS[want.family]
    value = meta.get("format")
    if value is None:
        raise Invalid(f"not a memcore {noun} (field 'format' is missing)")
    found = _FORMAT.fullmatch(value) if isinstance(value, str) else None
    if found is None or found.group(1) not in NOUNS:
        raise Invalid(f"not a memcore {noun} (field 'format' is {show(value)})")
    family, version = found.group(1), int(found.group(2))
    if family != want.family:
        raise Invalid(f"is a memcore {NOUNS[family]}, not a {noun}")
    if value in FORMATS:
        return FORMATS[value]
    known = sorted(int(_FORMAT.fullmatch(name).group(2)) for name, f in FORMATS.items() if f.family == family)
    if version > known[-1]:
        raise Invalid(f"written by a newer memcore ({value}); this one reads {expected}")
    raise Invalid(f"unknown format {value}; this memcore reads {expected}")


def check(
    where: str,
    metadata: object,
    expected: str,
    tensors: Mapping[str, torch.Tensor] | None = None,
    folder: str | Path | None = None,
) -> dict:
    """``metadata`` once it passes the schema of its format, a version of ``expected``'s family.

    Args:
        where: how the error names the file.
        metadata: the parsed JSON object (a file's ``memcore`` metadata, or a manifest).
        expected: the format the caller reads (``MASK``, ``STATS``, ``IMAGES``).
        tensors: the file's tensors (masks and statistics), checked against the metadata.
        folder: for a manifest, the folder whose files it must name.

    Raises:
        MemcoreError: one line naming ``where`` and the first field or tensor at fault.
    """
    try:
        if not isinstance(metadata, dict):
            subject = "must" if expected == IMAGES else "the memcore metadata must"
            raise Invalid(f"{subject} be a JSON object, got {show(metadata)}")
        fmt = _format(metadata, expected)
        _check_table(metadata, fmt.table)
        for rule in fmt.rules:
            rule(metadata)
        if fmt.tensors is not None:
            fmt.tensors(metadata, tensors or {})
        if folder is not None and fmt.name == IMAGES:
            manifest_files(metadata, Path(folder))
    except Invalid as exc:
        raise MemcoreError(f"{where}: {exc.describe()}") from None
    return metadata


def parse(where: str, text: str | None, expected: str) -> object:
    """The JSON value of ``text`` (a file's memcore metadata or manifest), or a one-line error."""
    noun = NOUNS[FORMATS[expected].family]
    if text is None:
        raise MemcoreError(f"{where}: not a memcore {noun} (no 'memcore' metadata)")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        reason = exc if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise MemcoreError(f"{where}: not a memcore {noun}: not JSON ({reason})") from None


def dumps(value: dict, **kwargs) -> str:
    """JSON of what memcore writes: strict (NaN and infinities are refused, as strict parsers do)."""
    return json.dumps(value, allow_nan=False, **kwargs)
