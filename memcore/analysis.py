"""Where and when the memorized neurons sit: density and overlap of per-step masks.

The paper's subspace analysis compares masks computed for different prompt subsets of the same model
with the same settings. For each mask m, call index t and layer l it measures

    density[m, t, l] = |M_m[t][l]| / (out * in)           the fraction of weights in the mask
    IoU(a, b)[t, l]  = |M_a ∩ M_b| / |M_a ∪ M_b|           for each pair of DISTINCT masks a < b

and the same for the union masks (OR over call indices, ``mask.layers``). The IoU of two empty sets
is DEFINED as 1.0: two empty masks are identical. The tables carry the counts (``union``,
``empty_pairs``) so that a reader can tell a defined 1.0 from a measured one.

Chance baseline: two masks drawn uniformly at random with the same counts a and b out of n weights
share E = a * b / n weights on average (a hypergeometric mean), so

    chance = E / (a + b - E)        (1.0 when a = b = 0)

the IoU computed from the expected intersection. It is a ratio of expectations, not the expectation
of the ratio; the two agree to well under a percent for the layer sizes of real models. Pooled over
layers ("all"), E is the sum of the per-layer E: random masks keep each layer's count.

Averages: "by timestep" is the mean over layers (each layer counts once, whatever its size), "by
layer" the mean over call indices, "overall" the mean over both; densities are also averaged over
masks and IoUs over pairs. "all" (pooled) instead sums the counts of every layer before dividing, so
large layers weigh more.

Counts come from popcounts of the packed bits (the file's layout; padding bits are ignored), 64 bits at
a time: an AND and a popcount per (pair, layer) over arrays 8 times smaller than boolean masks. Five
SD 1.5 masks with tau = 10 take about a second.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memcore.errors import Call, MemcoreError, Param
from memcore.io import atomic_folder, check_distinct, check_output_folder
from memcore.mask import Mask

# Settings two masks must share to be compared (docs/method.md sections 2 and 3).
COMPARED_KEYS = (
    "weights_sha256",
    "target",
    "layers",
    "shapes",
    "sparsity",
    "timesteps",
    "timestep_values",
    "rows",
    "token_norm",
    "seed",
    "steps",
)
MEAN = "mean"  # an averaged axis (unweighted mean)
ALL = "all"  # layers pooled: counts summed before dividing
UNION = "union"  # the OR over call indices of a mask's per-step masks

ANALYSIS_COLUMNS = ("call", "timestep", "layer", "masks", "density", "pairs", "iou", "iou_chance", "empty_pairs")
DENSITY_COLUMNS = ("mask", "call", "timestep", "layer", "masked", "total", "density")
PAIRS_COLUMNS = (
    "mask_a",
    "mask_b",
    "call",
    "timestep",
    "layer",
    "count_a",
    "count_b",
    "total",
    "intersection",
    "union",
    "iou",
    "iou_chance",
)


# ---------------------------------------------------------------------------------------------
# counting


# numpy >= 2 counts bits natively (a POPCNT per 64-bit word); numpy 1.x looks each byte up in a table.
_BYTE_POPCOUNT = np.array([v.bit_count() for v in range(256)], dtype=np.uint8)


def popcount(words: np.ndarray) -> np.ndarray:
    """The number of set bits of an unsigned-int array, summed over its last axis (int64)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).sum(axis=-1, dtype=np.int64)
    return _popcount_table(words)


def _popcount_table(words: np.ndarray) -> np.ndarray:
    return _BYTE_POPCOUNT[words.view(np.uint8)].sum(axis=-1, dtype=np.int64)


def _words(packed: torch.Tensor, in_features: int) -> np.ndarray:
    """Packed rows [..., out, bytes] as one flat row of words per leading index, padding bits cleared.

    The words are the widest unsigned ints that divide the byte count, so that popcounts and ANDs
    touch 8 bytes at a time where they can.
    """
    flat = packed.detach().cpu().contiguous().numpy()
    spare = in_features % 8
    if spare:
        flat = flat.copy()
        flat[..., -1] &= (1 << spare) - 1
    flat = flat.reshape(*flat.shape[:-2], -1)
    for dtype in (np.uint64, np.uint32, np.uint16):
        if flat.shape[-1] % np.dtype(dtype).itemsize == 0:
            return flat.view(dtype)
    return flat


def chance_iou(a, b, n):
    """The IoU of two uniformly random masks of a and b ones out of n: E / (a + b - E), E = a * b / n.

    Works elementwise on numbers or arrays; 1.0 where a = b = 0 (two empty masks are identical).
    """
    a, b, n = (np.asarray(v, dtype=np.float64) for v in (a, b, n))
    expected = np.divide(a * b, n, out=np.zeros(np.broadcast(a, b, n).shape), where=n > 0)
    return _ratio(expected, a + b - expected)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, and 1.0 where den is 0 (an empty union)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.ones(np.broadcast(num, den).shape), where=den > 0)


@dataclass(frozen=True)
class Overlap:
    """Intersection counts of mask pairs over any grid of cells, with their IoU and chance baseline.

    All arrays share one shape (for example [pairs, calls, layers]).
    """

    count_a: np.ndarray  # ones in the first mask of each cell (int64)
    count_b: np.ndarray  # ones in the second mask
    total: np.ndarray  # weights in the cell
    intersection: np.ndarray
    expected: np.ndarray  # expected intersection of random masks with the same counts (float64)

    @classmethod
    def of(cls, count_a, count_b, total, intersection) -> Overlap:
        count_a, count_b, total, intersection = (
            np.asarray(v, dtype=np.int64) for v in (count_a, count_b, total, intersection)
        )
        total = np.broadcast_to(total, count_a.shape)
        expected = np.divide(count_a * count_b.astype(np.float64), total, out=np.zeros(count_a.shape), where=total > 0)
        return cls(count_a, count_b, total, intersection, expected)

    @property
    def union(self) -> np.ndarray:
        return self.count_a + self.count_b - self.intersection

    @property
    def iou(self) -> np.ndarray:
        """intersection / union; 1.0 where the union is empty (defined)."""
        return _ratio(self.intersection, self.union)

    @property
    def chance(self) -> np.ndarray:
        """expected / (a + b - expected); 1.0 where a = b = 0."""
        return _ratio(self.expected, self.count_a + self.count_b - self.expected)

    @property
    def empty(self) -> np.ndarray:
        """Where the union is empty, so the IoU is 1.0 by definition."""
        return self.union == 0

    def pooled(self, axis: int = -1) -> Overlap:
        """The cells along ``axis`` taken as one: counts and expected intersections summed."""
        return Overlap(*(getattr(self, f).sum(axis=axis) for f in _OVERLAP_FIELDS))

    def __getitem__(self, index) -> Overlap:
        """The cells at ``index`` (numpy indexing of every array)."""
        return Overlap(*(getattr(self, f)[index] for f in _OVERLAP_FIELDS))


_OVERLAP_FIELDS = ("count_a", "count_b", "total", "intersection", "expected")


# ---------------------------------------------------------------------------------------------
# inputs


MaskLike = Mask | str | os.PathLike


def _label(item: MaskLike, index: int) -> str:
    """How messages name an input: its path, or for a Mask object its subset name or position."""
    if isinstance(item, Mask):
        return str(item.metadata.get("subset") or f"mask{index}")
    return str(item)


def _names(items: Sequence[MaskLike], names: Sequence[str] | None) -> list[str]:
    """Distinct short names: ``names`` as given (duplicates refused), else file stems made distinct."""
    paths = [None if isinstance(item, Mask) else Path(item) for item in items]
    for i, path in enumerate(paths):
        if path is not None and path.resolve() in [p.resolve() for p in paths[:i] if p is not None]:
            raise MemcoreError(f"mask file {path} is given twice")
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(items):
            raise MemcoreError(f"{len(names)} names for {len(items)} masks", param="names")
        for i, name in enumerate(names):
            if not name.strip():
                raise MemcoreError(f"name {i} is empty", param="names")
            if name in names[:i]:
                raise MemcoreError("{name!r} is given twice; names must be distinct", param="names", name=name)
        return names
    out = [_label(item, i) if p is None else p.stem for i, (item, p) in enumerate(zip(items, paths, strict=True))]
    # Colliding stems take their folder's name ("a/mask", "b/mask"); whatever still collides its position.
    stems = list(out)
    for i, p in enumerate(paths):
        if p is not None and stems.count(stems[i]) > 1 and p.parent.name:
            out[i] = f"{p.parent.name}/{p.stem}"
    out = [f"{name}#{i + 1}" if out.count(name) > 1 else name for i, name in enumerate(out)]
    if len(set(out)) < len(out):
        raise MemcoreError(f"cannot tell the masks apart by name ({', '.join(out)}); give names")
    return out


def _load(items: Sequence[MaskLike] | MaskLike) -> tuple[list[Mask], list[str]]:
    if isinstance(items, (Mask, str, os.PathLike)):
        items = [items]
    masks = [item if isinstance(item, Mask) else Mask.load(item) for item in items]
    return masks, [_label(item, i) for i, item in enumerate(items)]


def check_comparable(
    masks: Sequence[Mask], names: Sequence[str], require_per_step: bool = True, keys: Sequence[str] = COMPARED_KEYS
) -> None:
    """Refuse masks of different models or settings, or (by default) without per-step masks.

    Each mask is compared with the first on ``keys`` of its metadata; the error names both masks (as
    ``names`` gives them: file paths, usually) and the first key that differs.
    """
    if require_per_step:
        for mask, name in zip(masks, names, strict=True):
            _check_per_step(mask, name)
    if not masks:
        return
    first, first_name = masks[0], names[0]
    for mask, name in zip(masks[1:], names[1:], strict=True):
        for key in keys:
            mine, theirs = first.metadata.get(key), mask.metadata.get(key)
            if mine != theirs:
                raise MemcoreError(
                    f"masks {first_name} and {name} differ in {key} ({_brief(mine)} vs {_brief(theirs)}); "
                    "only masks of the same model and settings can be compared"
                )


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:16] + "..." + text[-16:]


def _check_per_step(mask: Mask, name: str) -> None:
    meta = mask.metadata
    layers = meta.get("layers") or []
    if not meta.get("per_step") or any(layer not in mask.per_step for layer in layers):
        per_step = Param("per_step", True)
        raise MemcoreError(
            "{name}: mask has no per-step data; recompute it with {per_step} ({mask} or {localize}), "
            "or compare two masks with {iou}",
            name=name, per_step=per_step, mask=Call("compute_mask", (per_step,)),
            localize=Call("LocalizeConfig", (per_step,)), iou=Call("mask_iou"),
        )
    tau = meta.get("timesteps")
    for layer in layers:
        out, in_features = meta["shapes"][layer]
        steps = mask.per_step[layer]
        if steps.dtype != torch.uint8 or tuple(steps.shape) != (tau, out, (in_features + 7) // 8):
            raise MemcoreError(
                f"{name}: per-step mask of layer {layer} has shape {tuple(steps.shape)}, "
                f"expected ({tau}, {out}, {(in_features + 7) // 8})"
            )


def _timestep_values(mask: Mask, tau: int) -> list[float] | None:
    values = mask.metadata.get("timestep_values")
    return list(values) if values is not None and len(values) == tau else None


# ---------------------------------------------------------------------------------------------
# density


@dataclass(frozen=True)
class Density:
    """Memorized-neuron counts per (mask, call index, layer) and of the union masks per (mask, layer)."""

    names: list[str]
    layers: list[str]
    timestep_values: list[float] | None  # the scheduler timestep of each call index, when known
    masked: np.ndarray  # int64 [masks, calls, layers]
    union_masked: np.ndarray  # int64 [masks, layers]
    total: np.ndarray  # int64 [layers]: weights per layer

    @property
    def per_step(self) -> np.ndarray:
        """density[m, t, l]."""
        return self.masked / self.total

    @property
    def union(self) -> np.ndarray:
        """density of the union masks [m, l]."""
        return self.union_masked / self.total

    @property
    def by_timestep(self) -> np.ndarray:
        """[calls]: mean over masks and layers."""
        return self.per_step.mean(axis=(0, 2))

    @property
    def by_layer(self) -> np.ndarray:
        """[layers]: mean over masks and call indices."""
        return self.per_step.mean(axis=(0, 1))

    @property
    def overall(self) -> float:
        return float(self.per_step.mean())

    @property
    def pooled(self) -> np.ndarray:
        """[masks, calls]: all layers' weights pooled."""
        return self.masked.sum(axis=2) / self.total.sum()

    @property
    def union_pooled(self) -> np.ndarray:
        """[masks]: the union masks with all layers' weights pooled."""
        return self.union_masked.sum(axis=1) / self.total.sum()


class _Bits:
    """The bits of comparable masks as words (see :func:`_words`): per-step [tau, words], union [words]."""

    def __init__(self, masks: Sequence[Mask], per_step: bool = True):
        meta = masks[0].metadata
        self.layers = list(meta["layers"])
        self.total = np.array([math.prod(meta["shapes"][layer]) for layer in self.layers], dtype=np.int64)
        self.in_features = [meta["shapes"][layer][1] for layer in self.layers]
        self.union = [
            [_words(m.layers[l], n) for l, n in zip(self.layers, self.in_features, strict=True)] for m in masks
        ]
        self.steps = (
            [[_words(m.per_step[l], n) for l, n in zip(self.layers, self.in_features, strict=True)] for m in masks]
            if per_step
            else None
        )


def density(masks: Sequence[MaskLike] | MaskLike, names: Sequence[str] | None = None) -> Density:
    """The density of memorized neurons per (mask, call index, layer), and of the union masks.

    Args:
        masks: mask files or :class:`Mask` objects computed with ``per_step``, all of the same model
            and settings (see :func:`check_comparable`). One mask is enough.
        names: a short name per mask (default: file stems).
    """
    items = _as_items(masks)
    if not items:
        raise MemcoreError("none given", param="masks")
    names = _names(items, names)
    loaded, labels = _load(items)
    check_comparable(loaded, labels)
    return _density(_Bits(loaded), names, _timestep_values(loaded[0], _tau(loaded)))


def _as_items(masks) -> list:
    return [masks] if isinstance(masks, (Mask, str, os.PathLike)) else list(masks)


def _tau(masks: Sequence[Mask]) -> int:
    return int(masks[0].metadata["timesteps"])


def _density(bits: _Bits, names: list[str], timestep_values: list[float] | None) -> Density:
    masked = np.stack([np.stack([popcount(s) for s in steps], axis=1) for steps in bits.steps])  # [m, t, l]
    union = np.array([[popcount(u) for u in unions] for unions in bits.union], dtype=np.int64)
    return Density(names, bits.layers, timestep_values, masked, union, bits.total)


# ---------------------------------------------------------------------------------------------
# IoU


@dataclass(frozen=True)
class PairwiseIoU:
    """IoU of every pair of distinct masks (a < b), per (call index, layer) and on the union masks.

    The IoU of two empty masks is 1.0 by definition (``empty`` says where that happened).
    """

    names: list[str]
    layers: list[str]
    timestep_values: list[float] | None
    pairs: list[tuple[int, int]]  # indexes into ``names``, a < b
    steps: Overlap  # [pairs, calls, layers]
    union_masks: Overlap  # [pairs, layers]: the OR over call indices of each mask

    @property
    def iou(self) -> np.ndarray:
        """[calls, layers]: mean over pairs."""
        return self.steps.iou.mean(axis=0)

    @property
    def chance(self) -> np.ndarray:
        """[calls, layers]: the chance baseline, mean over pairs."""
        return self.steps.chance.mean(axis=0)

    @property
    def iou_by_timestep(self) -> np.ndarray:
        """[calls]: mean over pairs and layers (each layer counts once)."""
        return self.iou.mean(axis=1)

    @property
    def chance_by_timestep(self) -> np.ndarray:
        return self.chance.mean(axis=1)

    @property
    def iou_by_layer(self) -> np.ndarray:
        """[layers]: mean over pairs and call indices."""
        return self.iou.mean(axis=0)

    @property
    def chance_by_layer(self) -> np.ndarray:
        return self.chance.mean(axis=0)

    @property
    def iou_overall(self) -> float:
        return float(self.iou.mean())

    @property
    def chance_overall(self) -> float:
        return float(self.chance.mean())

    @property
    def union_iou(self) -> np.ndarray:
        """[layers]: IoU of the union masks, mean over pairs."""
        return self.union_masks.iou.mean(axis=0)

    @property
    def union_chance(self) -> np.ndarray:
        return self.union_masks.chance.mean(axis=0)


def pairwise_iou(masks: Sequence[MaskLike], names: Sequence[str] | None = None) -> PairwiseIoU:
    """The mean IoU over pairs of distinct masks per (call index, layer), and of the union masks.

    Only pairs a < b count: a mask is never compared with itself. The IoU of two empty masks is 1.0
    (defined); the chance baseline is :func:`chance_iou` of each pair's counts.

    Args:
        masks: two or more mask files or :class:`Mask` objects computed with ``per_step``, of the same
            model and settings (see :func:`check_comparable`).
        names: a short name per mask (default: file stems).
    """
    items = _as_items(masks)
    _check_two(items)
    names = _names(items, names)
    loaded, labels = _load(items)
    check_comparable(loaded, labels)
    bits = _Bits(loaded)
    dens = _density(bits, names, _timestep_values(loaded[0], _tau(loaded)))
    return _pairwise(bits, dens)


def _check_two(items: Sequence[MaskLike]) -> None:
    if len(items) < 2:
        given = ", ".join(_label(item, i) for i, item in enumerate(items)) or "none"
        raise MemcoreError(f"IoU needs at least two masks, got {len(items)}: {given}")


def _pairwise(bits: _Bits, dens: Density) -> PairwiseIoU:
    count = len(dens.names)
    pairs = [(a, b) for a in range(count) for b in range(a + 1, count)]
    inter = np.zeros((len(pairs), dens.masked.shape[1], len(bits.layers)), dtype=np.int64)
    union_inter = np.zeros((len(pairs), len(bits.layers)), dtype=np.int64)
    for p, (a, b) in enumerate(pairs):
        for l in range(len(bits.layers)):
            inter[p, :, l] = popcount(bits.steps[a][l] & bits.steps[b][l])
            union_inter[p, l] = popcount(bits.union[a][l] & bits.union[b][l])
    first, second = [a for a, _ in pairs], [b for _, b in pairs]
    steps = Overlap.of(dens.masked[first], dens.masked[second], dens.total, inter)
    unions = Overlap.of(dens.union_masked[first], dens.union_masked[second], dens.total, union_inter)
    return PairwiseIoU(dens.names, dens.layers, dens.timestep_values, pairs, steps, unions)


@dataclass(frozen=True)
class MaskIoU:
    """IoU of two (union) masks per layer and with all layers pooled."""

    layers: list[str]
    per_layer: Overlap  # [layers]
    overall: Overlap  # all layers pooled: sum of intersections / sum of unions

    @property
    def iou(self) -> dict[str, float]:
        return dict(zip(self.layers, self.per_layer.iou.tolist(), strict=True))

    @property
    def chance(self) -> dict[str, float]:
        return dict(zip(self.layers, self.per_layer.chance.tolist(), strict=True))

    @property
    def iou_all(self) -> float:
        return float(self.overall.iou)

    @property
    def chance_all(self) -> float:
        return float(self.overall.chance)


def mask_iou(a: MaskLike, b: MaskLike) -> MaskIoU:
    """The IoU of two masks (``mask.layers``, the union over call indices) per layer and pooled.

    Pooled: sum of intersections over sum of unions. The IoU of two empty masks is 1.0 (defined).
    The masks need the same layers and shapes only (not the same settings: comparing sparsities or
    prompt sets is a use of this function); no per-step data is needed.
    """
    loaded, labels = _load([a, b])
    check_comparable(loaded, labels, require_per_step=False, keys=("layers", "shapes"))
    bits = _Bits(loaded, per_step=False)
    counts = [[popcount(u) for u in unions] for unions in bits.union]
    inter = [popcount(x & y) for x, y in zip(bits.union[0], bits.union[1], strict=True)]
    per_layer = Overlap.of(counts[0], counts[1], bits.total, inter)
    return MaskIoU(bits.layers, per_layer, per_layer.pooled())


# ---------------------------------------------------------------------------------------------
# groups: memorized subsets against control subsets

GROUPS_COLUMNS = ("group", "pairs", "iou", "iou_chance", "union_iou", "union_iou_chance")
WITHIN, CONTROL, ACROSS = "memorized", "control", "memorized_vs_control"


@dataclass(frozen=True)
class GroupIoU:
    """Mean IoU over the pairs of masks within the memorized group, within the control group and
    across the two (one memorized and one control mask).

    ``iou`` and ``iou_chance`` average the per-step cells (mean over call indices and layers, then
    over pairs); ``union_iou`` and ``union_iou_chance`` the union masks with all layers pooled.
    """

    rows: dict[str, tuple[int, float, float, float, float]]  # group -> (pairs, iou, chance, union iou, chance)

    def iou(self, group: str) -> float:
        return self.rows[group][1]

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{group: {pairs, iou, iou_chance, union_iou, union_iou_chance}}``, the columns of groups.csv."""
        return {group: dict(zip(GROUPS_COLUMNS[1:], values, strict=True)) for group, values in self.rows.items()}

    def union_iou(self, group: str) -> float:
        return self.rows[group][3]


def group_iou(masks: Sequence[MaskLike], control: Sequence[MaskLike]) -> GroupIoU:
    """How much the memorized masks overlap with each other, compared with control masks.

    The Wanda score multiplies by |W|, which every mask of a model shares, so any two masks overlap
    beyond the position-chance baseline; control masks (from non-memorized prompts, same model and
    settings) tell how much of the overlap the memorized prompts add. Needs at least two masks in
    one of the groups and one in each.
    """
    items, controls = _as_items(masks), _as_items(control)
    if not items or not controls or len(items) + len(controls) < 3:
        raise MemcoreError(
            f"a group comparison needs memorized and control masks, with two in one group; got {len(items)} "
            f"memorized and {len(controls)} control"
        )
    loaded, labels = _load([*items, *controls])
    check_comparable(loaded, labels)
    bits = _Bits(loaded)
    names = [f"m{i}" for i in range(len(loaded))]
    pairwise = _pairwise(bits, _density(bits, names, _timestep_values(loaded[0], _tau(loaded))))
    return _groups(pairwise, len(items))


def _groups(pairwise: PairwiseIoU, memorized: int) -> GroupIoU:
    steps_iou = pairwise.steps.iou.mean(axis=(1, 2))
    steps_chance = pairwise.steps.chance.mean(axis=(1, 2))
    union = pairwise.union_masks.pooled(axis=1)
    buckets: dict[str, list[int]] = {WITHIN: [], CONTROL: [], ACROSS: []}
    for p, (a, b) in enumerate(pairwise.pairs):
        kinds = (a < memorized, b < memorized)
        buckets[WITHIN if all(kinds) else CONTROL if not any(kinds) else ACROSS].append(p)
    rows = {
        group: (
            len(index),
            float(steps_iou[index].mean()),
            float(steps_chance[index].mean()),
            float(union.iou[index].mean()),
            float(union.chance[index].mean()),
        )
        for group, index in buckets.items()
        if index
    }
    return GroupIoU(rows)


# ---------------------------------------------------------------------------------------------
# the analysis: tables and figures


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyze` computed and wrote."""

    names: list[str]
    density: Density
    pairwise: PairwiseIoU | None  # None with ``density_only``
    paths: list[Path]  # every file written: the CSV tables, then the figures
    groups: GroupIoU | None = None  # with ``control`` masks


def analyze(
    masks: Sequence[MaskLike],
    out_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
    density_only: bool = False,
    control: Sequence[MaskLike] = (),
) -> Analysis:
    """Density and pairwise IoU of per-step masks, written to ``out_dir`` as CSV tables and PNG figures.

    Files (``out_dir`` is created with its missing parents if needed, existing files of these names are
    replaced; the folder is checked and claimed before any work, and the files are written together
    at the end, atomically: an error or a signal leaves no file behind, see :func:`memcore.io.atomic_folder`):

    ``analysis.csv``, one row per (call, layer) cell, tidy (``pandas.read_csv`` reads it as is):
        call         call index 0 .. tau-1; ``union`` for the union masks (OR over calls); ``mean``
                     for the mean over call indices 0 .. tau-1
        timestep     the scheduler timestep of the call (empty for ``union`` and ``mean``)
        layer        the layer's full name; ``mean`` for the mean over layers (each counts once);
                     ``all`` for the layers pooled (counts summed before dividing)
        masks        the number of masks
        density      the fraction of the cell's weights in the mask, mean over masks
        pairs        the number of pairs of distinct masks (empty with ``density_only``)
        iou          the IoU, mean over pairs (1.0 for a pair whose union is empty)
        iou_chance   the chance baseline E / (a + b - E), E = a * b / n, mean over pairs
        empty_pairs  how many pair-cells averaged into the row had an empty union (IoU defined 1.0)
    ``density.csv``, per mask: mask, call, timestep, layer, masked, total, density; call is 0 .. tau-1
        or ``union``, layer a name or ``all`` (pooled).
    ``pairs.csv`` (not with ``density_only``), per pair of distinct masks: mask_a, mask_b, call,
        timestep, layer, count_a, count_b, total, intersection, union, iou, iou_chance; call is
        0 .. tau-1 or ``union``, layer a name or ``all`` (pooled: sums of counts; its chance uses the
        sum of the per-layer expected intersections).
    Figures (see :mod:`memcore.figures`): ``density_by_timestep.png``, ``density_by_layer.png``, and
        unless ``density_only``: ``iou_by_timestep.png``, ``iou_by_layer.png``, ``iou_heatmap.png``.

    Args:
        masks: mask files or :class:`Mask` objects computed with ``per_step``, of the same model and
            settings (see :func:`check_comparable`); at least two unless ``density_only``.
        out_dir: the folder of the outputs.
        names: a short name per mask (default: the file stems, made distinct).
        density_only: compute and write the densities only (one mask is enough).
        control: masks of control prompts (non-memorized), same model and settings: also write
            ``groups.csv``, the mean IoU within the memorized masks, within the control masks and
            across (columns group, pairs, iou, iou_chance, union_iou, union_iou_chance; see
            :func:`group_iou`). The tables and figures above cover ``masks`` only.
    """
    from memcore import figures

    written = _output_names(density_only, bool(_as_items(control)))
    out = check_output_folder(out_dir, "out_dir", written)
    check_distinct([("out_dir", out / name) for name in written], [("masks", _as_items(masks)), ("control", _as_items(control))])
    items = _as_items(masks)
    if not items:
        raise MemcoreError("none given", param="masks")
    if not density_only:
        _check_two(items)
    names = _names(items, names)
    figures.require_matplotlib()
    loaded, labels = _load(items)
    check_comparable(loaded, labels)
    bits = _Bits(loaded)
    dens = _density(bits, names, _timestep_values(loaded[0], _tau(loaded)))
    pairwise = None if density_only else _pairwise(bits, dens)
    groups = group_iou(loaded, _as_items(control)) if _as_items(control) else None

    with atomic_folder(out) as tmp:
        paths = [_write_csv(tmp / "analysis.csv", ANALYSIS_COLUMNS, _analysis_rows(dens, pairwise))]
        paths.append(_write_csv(tmp / "density.csv", DENSITY_COLUMNS, _density_rows(dens)))
        if pairwise is not None:
            paths.append(_write_csv(tmp / "pairs.csv", PAIRS_COLUMNS, _pair_rows(pairwise)))
        paths += figures.density_figures(dens, tmp)
        if pairwise is not None:
            paths += figures.iou_figures(pairwise, tmp)
        if groups is not None:
            rows = ([group, *values] for group, values in groups.rows.items())
            paths.append(_write_csv(tmp / "groups.csv", GROUPS_COLUMNS, rows))
    return Analysis(names, dens, pairwise, [out / p.name for p in paths], groups)


def _output_names(density_only: bool, control: bool) -> list[str]:
    """The files :func:`analyze` writes."""
    names = ["analysis.csv", "density.csv", "density_by_timestep.png", "density_by_layer.png"]
    if not density_only:
        names += ["pairs.csv", "iou_by_timestep.png", "iou_by_layer.png", "iou_heatmap.png"]
    return names + (["groups.csv"] if control else [])


def _write_csv(path: Path, columns: Sequence[str], rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def _calls(timestep_values: list[float] | None, tau: int) -> list[tuple[int, object]]:
    return [(t, "" if timestep_values is None else timestep_values[t]) for t in range(tau)]


def _block(density: np.ndarray, density_all: float, overlap: Overlap | None) -> np.ndarray:
    """The numbers of one call's rows: [layers + mean + all, (density, iou, iou_chance, empty_pairs)].

    ``density`` is [layers] (mean over masks), ``overlap`` [pairs, layers] (None: IoU left NaN).
    """
    count = len(density)
    out = np.full((count + 2, 4), np.nan)
    out[:, 0] = [*density, density.mean(), density_all]
    if overlap is not None:
        iou, chance, empty = overlap.iou.mean(axis=0), overlap.chance.mean(axis=0), overlap.empty.sum(axis=0)
        pooled = overlap.pooled(axis=1)
        out[:count, 1:] = np.stack([iou, chance, empty], axis=1)
        out[count, 1:] = iou.mean(), chance.mean(), empty.sum()
        out[count + 1, 1:] = pooled.iou.mean(), pooled.chance.mean(), pooled.empty.sum()
    return out


def _analysis_rows(dens: Density, pw: PairwiseIoU | None):
    """Rows of analysis.csv: each call index, the union masks, then the mean over call indices."""
    tau = dens.masked.shape[1]
    cells, pooled = dens.per_step.mean(axis=0), dens.pooled.mean(axis=0)  # [tau, layers], [tau]
    steps = np.stack([_block(cells[t], pooled[t], None if pw is None else pw.steps[:, t]) for t in range(tau)])
    mean = steps.mean(axis=0)
    mean[:, 3] = steps[:, :, 3].sum(axis=0)  # empty pairs are counted, not averaged
    union = _block(dens.union.mean(axis=0), dens.union_pooled.mean(), None if pw is None else pw.union_masks)
    labels = [*dens.layers, MEAN, ALL]
    blocks = [*((t, ts, steps[t]) for t, ts in _calls(dens.timestep_values, tau)), (UNION, "", union), (MEAN, "", mean)]
    for call, timestep, block in blocks:
        for layer, (d, iou, chance, empty) in zip(labels, block.tolist(), strict=True):
            if pw is None:
                yield [call, timestep, layer, len(dens.names), d, "", "", "", ""]
            else:
                yield [call, timestep, layer, len(dens.names), d, len(pw.pairs), iou, chance, int(empty)]


def _density_rows(dens: Density):
    tau = dens.masked.shape[1]
    total_all = int(dens.total.sum())
    for m, name in enumerate(dens.names):
        calls = [(t, ts, dens.masked[m, t]) for t, ts in _calls(dens.timestep_values, tau)]
        for call, timestep, masked in [*calls, (UNION, "", dens.union_masked[m])]:
            for layer, count, total in zip(dens.layers, masked.tolist(), dens.total.tolist(), strict=True):
                yield [name, call, timestep, layer, count, total, count / total]
            yield [name, call, timestep, ALL, int(masked.sum()), total_all, int(masked.sum()) / total_all]


def _pair_rows(pw: PairwiseIoU):
    tau = pw.steps.intersection.shape[1]
    blocks = [*((t, ts, pw.steps[:, t]) for t, ts in _calls(pw.timestep_values, tau)), (UNION, "", pw.union_masks)]
    for p, (a, b) in enumerate(pw.pairs):
        for call, timestep, overlap in blocks:
            cells = overlap[p]
            for layer, c in [*((name, cells[l]) for l, name in enumerate(pw.layers)), (ALL, cells.pooled(axis=0))]:
                yield [
                    pw.names[a],
                    pw.names[b],
                    call,
                    timestep,
                    layer,
                    int(c.count_a),
                    int(c.count_b),
                    int(c.total),
                    int(c.intersection),
                    int(c.union),
                    float(c.iou),
                    float(c.chance),
                ]
