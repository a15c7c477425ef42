"""wanda_mask: the memorized-neuron mask of one layer from its weights and activation norms.

For a weight ``W[out, in]``, memorized-prompt norms ``norm_mem[T, in]`` (one row per selected call
index t) and optional null-prompt norms ``norm_null[T, in]`` (docs/method.md section 3)::

    S_mem[t][r, j]  = |W[r, j]| * norm_mem[t, j]          (float32 product, Wanda score)
    S_null[t][r, j] = |W[r, j]| * norm_null[t, j]         (float32 product)
    top[t][r, j]    = j is among the k largest (largest=True) or k smallest S_mem[t][r, :];
                      ties: the lower column index wins
    M[t]            = top[t] AND S_mem[t] > S_null[t]      (strictly; only with null norms)
    mask            = OR over t of M[t]

Scores are float32 whatever the weight dtype (fp16/bf16 weights are upcast first, exactly). The
null condition compares the two products as written, not the norms: a zero weight has
``S_mem == S_null == 0`` and is never selected when null norms are given. ``k = 0`` selects nothing,
``k = in`` selects every column (before the null condition).

Layout: the mask is returned bit-packed, ``uint8[out, ceil(in / 8)]``, row-major; bit b
(least significant first) of byte c of row r is column ``8 c + b``; padding bits are zero. This is
``numpy.packbits(mask, axis=1, bitorder="little")``; :func:`pack_mask` and :func:`unpack_mask`
convert on any device.

Backends: ``reference`` (pure PyTorch, any device; also the "pure-PyTorch path" of the benchmarks).
"""

from __future__ import annotations

import torch

from memcore.ops import _backend
from memcore.ops._common import NATIVE_DTYPES
from memcore.ops._ext import launch

OP_NAME = "memcore::wanda_mask"

# bit b of a packed byte holds column 8c + b
_BITS = 8


def _bit_shifts(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(_BITS, device=device, dtype=dtype)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask ``[out, in]`` into ``uint8[out, ceil(in / 8)]``, little bit order per byte.

    Identical to ``numpy.packbits(mask, axis=1, bitorder="little")``; runs on the mask's device.
    """
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"pack_mask: mask must be a 2-D bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    rows, cols = mask.shape
    nbytes = (cols + _BITS - 1) // _BITS
    bits = torch.zeros((rows, nbytes * _BITS), dtype=torch.int32, device=mask.device)
    bits[:, :cols] = mask
    bits = bits.view(rows, nbytes, _BITS) << _bit_shifts(mask.device, torch.int32)
    return bits.sum(dim=2, dtype=torch.int32).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: ``uint8[out, ceil(in_features / 8)]`` to ``bool[out, in_features]``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"unpack_mask: packed must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if in_features < 0:
        raise ValueError(f"unpack_mask: in_features must be >= 0, got {in_features}")
    nbytes = (in_features + _BITS - 1) // _BITS
    if packed.shape[1] != nbytes:
        raise ValueError(
            f"unpack_mask: packed has {packed.shape[1]} bytes per row but in_features={in_features} "
            f"needs {nbytes}"
        )
    bits = (packed.unsqueeze(2) >> _bit_shifts(packed.device, torch.uint8)) & 1
    return bits.reshape(packed.shape[0], nbytes * _BITS)[:, :in_features].bool()


def _select_k(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Per row of ``scores``, the k largest (or smallest) entries; ties go to the lower column index.

    topk's values are exact even where its index tie-breaking is not: take the k-th value, select
    every score strictly beyond it, then fill up with the first columns equal to it.
    """
    kth = torch.topk(scores, k, dim=1, largest=largest, sorted=True).values[:, k - 1 : k]
    beyond = scores > kth if largest else scores < kth
    tied = scores == kth
    needed = k - beyond.sum(dim=1, keepdim=True)
    return beyond | (tied & (tied.cumsum(dim=1) <= needed))


def wanda_mask_reference(
    weight: torch.Tensor,
    norms: torch.Tensor,
    null_norms: torch.Tensor | None = None,
    k: int | None = None,
    largest: bool = True,
) -> torch.Tensor:
    """The definition of the op in eager PyTorch: the packed mask ``uint8[out, ceil(in / 8)]``.

    One (abs, multiply, topk, compare, or) round per row t of ``norms``; no validation beyond
    requiring ``k`` (the op validates).
    """
    if k is None:
        raise TypeError("wanda_mask_reference: missing required argument k")
    abs_w = weight.to(torch.float32).abs()
    mask = torch.zeros(abs_w.shape, dtype=torch.bool, device=abs_w.device)
    if k == 0:
        return pack_mask(mask)
    for t in range(norms.shape[0]):
        s_mem = abs_w * norms[t]
        selected = _select_k(s_mem, k, largest)
        if null_norms is not None:
            selected &= s_mem > abs_w * null_norms[t]
        mask |= selected
    return pack_mask(mask)


def _native_inputs(weight, norms, null_norms):
    """What the native kernels read: a weight of a dtype they take, contiguous inputs, and the mask to fill."""
    if weight.dtype not in NATIVE_DTYPES:
        weight = weight.to(torch.float32)  # any other float type is exactly representable, as the reference does
    weight = weight.contiguous()
    null_norms = None if null_norms is None else null_norms.contiguous()
    out, in_features = weight.shape
    mask = torch.empty((out, (in_features + _BITS - 1) // _BITS), dtype=torch.uint8, device=weight.device)
    return weight, norms.contiguous(), null_norms, mask


def _native(weight, norms, null_norms, k, largest):
    if weight.shape[0] == 0:  # no rows for the kernel to read: the norms are checked here
        return _reference(weight, norms, null_norms, k, largest)
    weight, norms, null_norms, mask = _native_inputs(weight, norms, null_norms)
    out, in_features = weight.shape
    flags = torch.zeros(1, dtype=torch.int32, device=weight.device)  # the kernels OR the BAD_* bits in
    launch(
        "wanda_mask",
        weight.device,
        weight.data_ptr(),
        NATIVE_DTYPES[weight.dtype],
        out,
        in_features,
        norms.data_ptr(),
        0 if null_norms is None else null_norms.data_ptr(),
        norms.shape[0],
        k,
        largest,
        mask.data_ptr(),
        flags.data_ptr(),
    )
    return mask, flags


def _triton(weight, norms, null_norms, k, largest):
    from memcore._kernels.wanda_mask import wanda_mask_triton

    return wanda_mask_triton(weight, norms, null_norms, k, largest)  # the kernel sets the flag word


def _reference(weight, norms, null_norms, k, largest):
    return wanda_mask_reference(weight, norms, null_norms, k, largest), nonfinite_flags(weight, norms, null_norms)


_backend.register("wanda_mask", reference=_reference, triton=_triton, native=_native)


def _check_shapes(weight: torch.Tensor, norms: torch.Tensor, null_norms: torch.Tensor | None, k: int) -> None:
    """Dtype, shape, device and k checks: metadata only, shared by the op and its fake."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"wanda_mask: weight must be a 2-D floating tensor, got {weight.dtype} of shape {tuple(weight.shape)}"
        )
    in_features = weight.shape[1]
    if norms.dtype != torch.float32 or norms.dim() != 2 or norms.shape[0] < 1 or norms.shape[1] != in_features:
        raise ValueError(
            f"wanda_mask: norms must be float32 of shape [T >= 1, {in_features}], "
            f"got {norms.dtype} of shape {tuple(norms.shape)}"
        )
    if norms.device != weight.device:
        raise ValueError(f"wanda_mask: norms is on {norms.device} but weight is on {weight.device}")
    if null_norms is not None:
        if null_norms.dtype != torch.float32 or null_norms.shape != norms.shape:
            raise ValueError(
                f"wanda_mask: null_norms must be float32 of the shape of norms {tuple(norms.shape)}, "
                f"got {null_norms.dtype} of shape {tuple(null_norms.shape)}"
            )
        if null_norms.device != weight.device:
            raise ValueError(f"wanda_mask: null_norms is on {null_norms.device} but weight is on {weight.device}")
    if not 0 <= k <= in_features:
        raise ValueError(f"wanda_mask: k must be in [0, {in_features}] (in_features), got {k}")


# Bits of the flag word: which input holds a value that is not finite. Every backend returns the
# mask together with this int32[1] word on the weight's device; the native and Triton kernels set
# it while they read the values anyway, so checking costs no extra pass over W, and the op reads
# the 4 bytes once, after the kernel (the only host synchronization of the op).
BAD_WEIGHT, BAD_NORMS, BAD_NULL_NORMS = 1, 2, 4
_BAD_NAMES = ((BAD_WEIGHT, "weight"), (BAD_NORMS, "norms"), (BAD_NULL_NORMS, "null_norms"))


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    # max(|x|) is finite iff every element is (amax propagates NaN): one reduction, no bool tensor;
    # 14x faster than isfinite(x).all() on an fp16 1280 x 5120 weight on the CPU (1.5 ms against 21 ms)
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.int32, device=x.device)
    return (~torch.isfinite(x.abs().amax())).to(torch.int32)


def nonfinite_flags(weight: torch.Tensor, norms: torch.Tensor, null_norms: torch.Tensor | None) -> torch.Tensor:
    """The flag word computed with torch ops on the inputs' device (no host synchronization)."""
    flags = _nonfinite(weight) * BAD_WEIGHT + _nonfinite(norms) * BAD_NORMS
    if null_norms is not None:
        flags = flags + _nonfinite(null_norms) * BAD_NULL_NORMS
    return flags.reshape(1)


def _raise_nonfinite(flags: torch.Tensor, op: str = "wanda_mask") -> None:
    """Raise for the first layer whose flag word is set (``flags``: int32, one word per layer; the
    grouped op names the layer)."""
    words = flags.tolist()
    for layer, bad in enumerate(words):
        if bad:
            names = [name for bit, name in _BAD_NAMES if bad & bit]
            where = f"layer {layer}: " if op == "wanda_mask_grouped" else ""
            raise ValueError(f"{op}: {where}{' and '.join(names)} {'contains' if len(names) == 1 else 'contain'} NaN or inf")


@torch.library.custom_op(OP_NAME, mutates_args=())
def wanda_mask(
    weight: torch.Tensor, norms: torch.Tensor, null_norms: torch.Tensor | None, k: int, largest: bool = True
) -> torch.Tensor:
    """The bit-packed mask of docs/method.md section 3 for one layer (see the module docstring).

    Args:
        weight: ``W[out, in]``, any floating dtype (scores are computed in float32).
        norms: float32 ``[T, in]``, the memorized-prompt activation norms, one row per call index.
        null_norms: float32 ``[T, in]`` null-prompt norms, or ``None`` for no null condition.
        k: columns kept per row and t, ``0 <= k <= in`` (``floor(s * in)`` for sparsity s).
        largest: select the k largest scores (``False``: the k smallest).

    Returns:
        ``uint8[out, ceil(in / 8)]`` on weight's device; unpack with :func:`unpack_mask`.
    """
    _check_shapes(weight, norms, null_norms, k)
    _, impl = _backend.dispatch("wanda_mask", weight.device)
    mask, flags = impl(weight, norms, null_norms, k, largest)
    _raise_nonfinite(flags)
    return mask


@wanda_mask.register_fake
def _(weight, norms, null_norms, k, largest=True):
    _check_shapes(weight, norms, null_norms, k)
    out, in_features = weight.shape
    return weight.new_empty((out, (in_features + _BITS - 1) // _BITS), dtype=torch.uint8)


# --- the grouped entry point: every layer of a model in one call ---------------------------------------

GROUPED_OP_NAME = "memcore::wanda_mask_grouped"


def _grouped_native(weights, norms, null_norms, ks, largest):
    device = weights[0].device
    # no grouped CUDA kernel yet: one launch per layer; a layer without rows has nothing for the
    # kernel to read, its norms are checked with torch ops
    if device.type != "cpu" or any(w.shape[0] == 0 for w in weights):
        return _each(_native)(weights, norms, null_norms, ks, largest)
    ws, ns, nulls, masks = zip(*(_native_inputs(w, n, None if null_norms is None else null_norms[i])
                                 for i, (w, n) in enumerate(zip(weights, norms))))
    flags = torch.zeros(len(ws), dtype=torch.int32)
    launch(
        "wanda_mask_grouped", device,
        [w.data_ptr() for w in ws], [NATIVE_DTYPES[w.dtype] for w in ws], [w.shape[0] for w in ws],
        [w.shape[1] for w in ws], [n.data_ptr() for n in ns], [0 if n is None else n.data_ptr() for n in nulls],
        ns[0].shape[0], list(ks), largest, [m.data_ptr() for m in masks],
        [flags.data_ptr() + 4 * i for i in range(len(ws))],
    )
    return list(masks), flags


def _each(impl):
    """A grouped implementation from a one-layer one: one call per layer."""

    def grouped(weights, norms, null_norms, ks, largest):
        results = [impl(w, n, None if null_norms is None else null_norms[i], k, largest)
                   for i, (w, n, k) in enumerate(zip(weights, norms, ks))]
        return [mask for mask, _ in results], torch.cat([flags.reshape(1) for _, flags in results])

    return grouped


def _grouped_triton(weights, norms, null_norms, ks, largest):
    from memcore._kernels.wanda_mask import wanda_mask_grouped_triton

    return wanda_mask_grouped_triton(weights, norms, null_norms, ks, largest)  # the kernel sets the flag words


_backend.register("wanda_mask_grouped", reference=_each(_reference), triton=_grouped_triton, native=_grouped_native,
                  native_op="wanda_mask")


def _check_grouped(weights, norms, null_norms, ks) -> None:
    count = len(weights)
    if count == 0:
        raise ValueError("wanda_mask_grouped: weights is empty")
    lengths = {"norms": len(norms), "ks": len(ks)}
    if null_norms is not None:
        lengths["null_norms"] = len(null_norms)
    for name, length in lengths.items():
        if length != count:
            raise ValueError(f"wanda_mask_grouped: {name} has {length} entries for {count} weights")
    for i, (w, n, k) in enumerate(zip(weights, norms, ks)):
        try:
            _check_shapes(w, n, None if null_norms is None else null_norms[i], k)
        except ValueError as exc:
            raise ValueError(f"wanda_mask_grouped: layer {i}: {str(exc).removeprefix('wanda_mask: ')}") from None
        if w.device != weights[0].device:
            raise ValueError(f"wanda_mask_grouped: layer {i} is on {w.device}, layer 0 on {weights[0].device}")
        if n.shape[0] != norms[0].shape[0]:
            raise ValueError(f"wanda_mask_grouped: layer {i} has T = {n.shape[0]} rows of norms, layer 0 {norms[0].shape[0]}")


def wanda_mask_grouped(
    weights: list[torch.Tensor], norms: list[torch.Tensor], null_norms: list[torch.Tensor] | None, ks: list[int],
    largest: bool = True,
) -> list[torch.Tensor]:
    """:func:`wanda_mask` of many layers in one call: ``[wanda_mask(weights[i], norms[i],
    null_norms[i], ks[i], largest) for i ...]``, bit for bit (``null_norms=None``: no null condition).

    Every layer is on one device and has the same T. On the CPU the C++ backend runs all layers'
    rows in one parallel region (many small layers share the threads as one large one does); Triton
    launches once for all the layers whose weights share a dtype and a row width (SD 1.5: three
    launches); CUDA loops over the layers for now (one launch each). The op
    behind it is ``torch.ops.memcore.wanda_mask_grouped`` (an empty ``null_norms`` list there means
    none).
    """
    return wanda_mask_grouped_op(list(weights), list(norms), [] if null_norms is None else list(null_norms), list(ks), largest)


@torch.library.custom_op(GROUPED_OP_NAME, mutates_args=())
def wanda_mask_grouped_op(
    weights: list[torch.Tensor], norms: list[torch.Tensor], null_norms: list[torch.Tensor], ks: list[int],
    largest: bool = True,
) -> list[torch.Tensor]:
    """The registered op of :func:`wanda_mask_grouped`; ``null_norms=[]`` means no null condition."""
    nulls = null_norms or None
    _check_grouped(weights, norms, nulls, ks)
    _, impl = _backend.dispatch("wanda_mask_grouped", weights[0].device)
    masks, flags = impl(weights, norms, nulls, ks, largest)
    _raise_nonfinite(flags, "wanda_mask_grouped")
    return masks


@wanda_mask_grouped_op.register_fake
def _(weights, norms, null_norms, ks, largest=True):
    _check_grouped(weights, norms, null_norms or None, ks)
    return [w.new_empty((w.shape[0], (w.shape[1] + _BITS - 1) // _BITS), dtype=torch.uint8) for w in weights]
