"""Triton kernel of memcore::wanda_mask (see ``memcore/ops/wanda_mask.py``); bit-exact with its reference.

Math, for row r of ``W[out, in]`` and each t < T (docs/method.md section 3)::

    S_mem[j]  = |W[r, j]| * norms[t, j]            (float32 product)
    top[j]    = j among the k largest (LARGEST) or k smallest S_mem; ties: the lower column wins
    M_t[j]    = top[j] AND S_mem[j] > |W[r, j]| * null_norms[t, j]     (HAS_NULL only)
    mask[r]   = OR over t of M_t

Each program takes ROWS rows (one for rows of 4096 columns or more) as a [ROWS, BLOCK] block,
BLOCK = next_power_of_2(in) >= 8 (SD 1.x: 2048, 4096, 8192). |W| is loaded once (upcast to
float32) and kept in registers for every t; no score matrix is ever written. At the end the
[ROWS, BLOCK] mask is viewed as [ROWS, BLOCK / 8, 8] and each byte is a shifted sum of its 8 bits.

Top k without sorting: each score is mapped to a uint32 key whose unsigned order is the float order
(the usual sign-flip of the IEEE bit pattern, after turning -0.0 into +0.0 so that the two zeros
tie as they compare equal; for the k smallest the key is complemented). The k-th best key ``kth``
is the largest v with ``count(key >= v) >= k``; it is built bit by bit from the top, 32 counting
steps. Then the selection is every key beyond ``kth`` plus, in column order, the first
``k - count(key > kth)`` keys equal to it (a cumulative sum over the row): exactly the reference's
tie rule. Scores need not be >= 0 (the op accepts any finite norms).

Candidate filter (``FILTER``; where k <= GROUPS and 4 k slots are at most a quarter of the row, as
for SD 1.x at s = 0.01: k = 12, 25, 51 in rows of 1280 to 5120): the 32 counting steps would each
sweep the whole row. Instead the row is cut into GROUPS groups of 32 columns; the k-th best group
maximum L is found with the 32 steps over the GROUPS maxima, and L <= kth (k groups hold a key >= L
each). The keys >= L, usually a few times k, are packed in column order (a cumulative sum gives each
its slot) into the program's CAP scratch slots a row, and the 32 steps run over those slots. The
whole row is swept about six times a call index instead of 34. A block with a row of more than CAP
candidates (ties at the bound) falls back to the 32 steps over its rows, so the result is exact
either way. The scratch (int32 ``[programs, ROWS, CAP]``) is written and read by its own program
only, between barriers. Designed for the memory floor, tested exact in the interpreter and compiled
for sm_90 here; its speed is not measured on a GPU yet.

Non-finite inputs: while it reads them, every program checks its rows of W (in W's own dtype) and
the norms for NaN or inf and ORs the bits BAD_WEIGHT / BAD_NORMS / BAD_NULL_NORMS into an int32 flag
word with an integer ``atomic_or`` (order-independent, so deterministic); the op reads the word once
after the kernel and raises. No extra pass over W. With ``k = 0`` (or no rows) the kernel still runs
to check the values, without selecting anything.

Arithmetic is exact: products, comparisons and integer operations, no division.

Layers: the kernel reads its layers from an int64 table, a row a layer (the addresses of W, the
norms, the null norms and the mask, the shape, k, W's strides, and the first program of the layer);
program p takes ROWS rows of the last layer whose first program is <= p, and sets that layer's flag
word. One launch serves every layer of one weight dtype and one row block, so
:func:`wanda_mask_grouped_triton` launches once per (dtype, BLOCK) (SD 1.5's 16 layers: three), and
:func:`wanda_mask_triton` is a launch of one layer.

Memory layout: ``weight`` any float dtype with strides (stride_wr, stride_wc); ``norms`` and
``null_norms`` contiguous float32 ``[T, in]``; the output is ``uint8[out, ceil(in / 8)]`` row-major,
bit i (least significant first) of byte b holding column ``8 b + i``, padding bits zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memcore._kernels._common import upcast
from memcore._kernels._launch import device_guard, mask_blocks, mask_filter, mask_num_warps

# bits per packed byte
BITS = 8
# widest row: Triton's largest block. Rows beyond ~16K columns (SDXL: 10240) spill registers: for
# sm_90, rows of 10241 to 16384 columns (one block of 16384) compile to 128 registers a thread, 272
# bytes of spills and 2 KiB of shared memory (the H100/H200 limit is 227 KiB).
MAX_IN_FEATURES = 1 << 20
INT32_MIN = tl.constexpr(-(1 << 31))
# bits of the flag word, as memcore.ops.wanda_mask defines them
BAD_WEIGHT = tl.constexpr(1)
BAD_NORMS = tl.constexpr(2)
BAD_NULL_NORMS = tl.constexpr(4)


@triton.jit
def _order_key(s, LARGEST: tl.constexpr):
    """uint32 keys of fp32 scores: a larger key is a better score (larger, or smaller if not LARGEST)."""
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 == +0.0: give them one bit pattern
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed int order == float order
    if not LARGEST:
        key = ~key
    return (key ^ INT32_MIN).to(tl.uint32, bitcast=True)  # signed -> unsigned order


@triton.jit
def _kth_key(key, valid, k, BITS_IN_KEY: tl.constexpr):
    """Per row of a [R, C] block of keys, the k-th best valid key: the largest v with
    count(valid key >= v) >= k, built bit by bit from the top (one counting pass a bit)."""
    kth = tl.zeros([key.shape[0]], dtype=tl.uint32)
    for i in tl.static_range(BITS_IN_KEY):
        cand = kth | (tl.full([], 1, dtype=tl.uint32) << (BITS_IN_KEY - 1 - i))
        count = tl.sum((valid & (key >= cand[:, None])).to(tl.int32), axis=1)
        kth = tl.where(count >= k, cand, kth)
    return kth


@triton.jit
def _take_k(key, valid, k, kth):
    """Per row, the keys beyond the k-th best ``kth``, then the first ties with it in column order up
    to k in all: the reference's tie rule."""
    beyond = valid & (key > kth[:, None])
    tied = valid & (key == kth[:, None])
    needed = k - tl.sum(beyond.to(tl.int32), axis=1)
    rank = tl.cumsum(tied.to(tl.int32), axis=1)  # 1-based rank of each tie in column order
    return beyond | (tied & (rank <= needed[:, None]))


@triton.jit
def _kth_key_filtered(key, valid, k, scratch_ptr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                      GROUPS: tl.constexpr, CAP: tl.constexpr):
    """:func:`_kth_key` through a candidate filter (needs k <= GROUPS).

    The row is cut into GROUPS groups; the k-th best of the groups' maxima, L, is a lower bound of
    the k-th best key (k groups hold a key >= L each). The keys >= L, usually a few times k, are
    packed in column order into this program's [ROWS, CAP] scratch rows, and the bit-by-bit search
    runs over those CAP slots instead of the BLOCK columns. A block with a row of more than CAP
    candidates (many ties at the bound) searches its whole rows instead.
    """
    held = tl.where(valid, key, 0)  # 0 is no valid key's better: a lower bound stays a lower bound
    group_max = tl.max(tl.reshape(held, [ROWS, GROUPS, BLOCK // GROUPS]), axis=2)
    bound = _kth_key(group_max, group_max == group_max, k, 32)
    cand = valid & (key >= bound[:, None])
    count = tl.sum(cand.to(tl.int32), axis=1)
    if tl.max(count, axis=0) <= CAP:
        slot = tl.cumsum(cand.to(tl.int32), axis=1) - 1
        rows = tl.arange(0, ROWS)
        tl.debug_barrier()  # the previous call index's reads of the scratch rows are done
        tl.store(scratch_ptr + rows[:, None] * CAP + slot, key, mask=cand)
        tl.debug_barrier()
        slots = tl.arange(0, CAP)
        in_use = slots[None, :] < count[:, None]
        packed = tl.load(scratch_ptr + rows[:, None] * CAP + slots[None, :], mask=in_use, other=0)
        kth = _kth_key(packed, in_use, k, 32)
    else:
        kth = _kth_key(key, valid, k, 32)
    return kth


@triton.jit
def _nonfinite(v):
    """1 if any element of the [R, C] block v (float32 or float64) is inf or NaN, else 0 (int32)."""
    return tl.max(tl.max(((v != v) | (tl.abs(v) == float("inf"))).to(tl.int32), axis=1), axis=0)


# Columns of the layer table (int64 [layers, FIELDS]) that the kernel reads its layer from.
(W_ADDR, NORMS_ADDR, NULL_ADDR, OUT_ADDR, OUT_FEATURES, IN_FEATURES, K, STRIDE_WR, STRIDE_WC, FIRST_PROGRAM) = (
    tl.constexpr(column) for column in range(10)
)
FIELDS = tl.constexpr(10)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _field(entry, column: tl.constexpr):
    return tl.load(entry + column)


@triton.jit
def _wanda_mask_kernel(
    table_ptr,
    flags_ptr,
    scratch_ptr,
    n_layers,
    n_t,
    W_DTYPE: tl.constexpr,
    LAYERS: tl.constexpr,
    HAS_NULL: tl.constexpr,
    LARGEST: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    FILTER: tl.constexpr,
    GROUPS: tl.constexpr,
    CAP: tl.constexpr,
):
    """Program p takes ROWS rows of the layer whose programs start at or before p (the table's
    FIRST_PROGRAM column, increasing); every layer of the launch has rows of at most BLOCK columns."""
    pid = tl.program_id(0)
    li = tl.arange(0, LAYERS)
    firsts = tl.load(table_ptr + li * FIELDS + FIRST_PROGRAM, mask=li < n_layers, other=1 << 62)
    layer = tl.sum((firsts <= pid).to(tl.int32), axis=0) - 1
    entry = table_ptr + layer * FIELDS
    w_ptr = _field(entry, W_ADDR).to(tl.pointer_type(W_DTYPE), bitcast=True)
    norms_ptr = _field(entry, NORMS_ADDR).to(tl.pointer_type(tl.float32), bitcast=True)
    out_ptr = _field(entry, OUT_ADDR).to(tl.pointer_type(tl.uint8), bitcast=True)
    out_features = _field(entry, OUT_FEATURES)
    in_features = _field(entry, IN_FEATURES)
    k = _field(entry, K).to(tl.int32)
    nbytes = (in_features + 7) // 8
    rows = (pid - _field(entry, FIRST_PROGRAM)) * ROWS + tl.arange(0, ROWS)
    scratch = scratch_ptr + pid.to(tl.int64) * (ROWS * CAP)  # this program's candidate rows
    col = tl.arange(0, BLOCK)
    r_mask = rows < out_features
    c_mask = col < in_features
    valid = r_mask[:, None] & c_mask[None, :]
    w_offsets = rows[:, None] * _field(entry, STRIDE_WR) + col[None, :] * _field(entry, STRIDE_WC)
    w = tl.load(w_ptr + w_offsets, mask=valid, other=0.0)
    w32 = upcast(w).to(tl.float32)  # exact for 16-bit weights, NaN and inf included
    # a float64 weight is checked as it is: beyond float32's range is not NaN or inf
    bad = _nonfinite(w if w.dtype == tl.float64 else w32) * BAD_WEIGHT
    abs_w = tl.abs(w32)
    mask = tl.zeros([ROWS, BLOCK], dtype=tl.int1)
    for t in range(n_t):
        norm = tl.load(norms_ptr + t * in_features + col, mask=c_mask, other=0.0)
        bad |= _nonfinite(norm[None, :]) * BAD_NORMS
        if HAS_NULL:
            null_ptr = _field(entry, NULL_ADDR).to(tl.pointer_type(tl.float32), bitcast=True)
            null = tl.load(null_ptr + t * in_features + col, mask=c_mask, other=0.0)
            bad |= _nonfinite(null[None, :]) * BAD_NULL_NORMS
        if k > 0:
            s_mem = abs_w * norm[None, :]
            key = _order_key(s_mem, LARGEST)
            if FILTER:
                kth = _kth_key_filtered(key, valid, k, scratch, ROWS, BLOCK, GROUPS, CAP)
            else:
                kth = _kth_key(key, valid, k, 32)
            selected = _take_k(key, valid, k, kth)
            if HAS_NULL:
                selected = selected & (s_mem > abs_w * null[None, :])
            mask = mask | selected
    # an integer OR: the same word whatever order the programs finish in; only programs that found
    # something touch it
    tl.atomic_or(flags_ptr + layer, bad, mask=bad != 0)
    # pack: column 8 b + i -> bit i of byte b
    bits = tl.reshape(mask.to(tl.int32), [ROWS, BLOCK // 8, 8]) << tl.arange(0, 8)[None, None, :]
    packed = tl.sum(bits, axis=2).to(tl.uint8)
    byte = tl.arange(0, BLOCK // 8)
    tl.store(out_ptr + rows[:, None] * nbytes + byte[None, :], packed, mask=r_mask[:, None] & (byte < nbytes)[None, :])


def _check(weight: torch.Tensor, norms: torch.Tensor, null_norms: torch.Tensor | None, k: int, where: str) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{where}weight must be a 2-D floating tensor, got {weight.dtype} of shape {tuple(weight.shape)}")
    in_features = weight.shape[1]
    if in_features > MAX_IN_FEATURES:
        raise ValueError(f"{where}in_features={in_features} exceeds {MAX_IN_FEATURES}")
    if norms.dtype != torch.float32 or norms.dim() != 2 or norms.shape[1] != in_features or norms.shape[0] < 1:
        raise ValueError(
            f"{where}norms must be float32 [T >= 1, {in_features}], got {norms.dtype} of shape {tuple(norms.shape)}"
        )
    if null_norms is not None and (null_norms.dtype != torch.float32 or null_norms.shape != norms.shape):
        raise ValueError(
            f"{where}null_norms must be float32 of shape {tuple(norms.shape)}, "
            f"got {null_norms.dtype} of shape {tuple(null_norms.shape)}"
        )
    for name, tensor in (("norms", norms), ("null_norms", null_norms)):
        if tensor is not None and tensor.device != weight.device:
            raise ValueError(f"{where}{name} is on {tensor.device} but weight is on {weight.device}")
    if not 0 <= k <= in_features:
        raise ValueError(f"{where}k must be in [0, {in_features}], got {k}")


def wanda_mask_triton(
    weight: torch.Tensor,
    norms: torch.Tensor,
    null_norms: torch.Tensor | None,
    k: int,
    largest: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed mask ``uint8[out, ceil(in / 8)]`` of docs/method.md section 3 (see the module docstring) and the
    int32[1] flag word of the inputs holding NaN or inf (bits BAD_WEIGHT, BAD_NORMS, BAD_NULL_NORMS),
    both on weight's device; the kernel sets the flags while it reads the values for the mask."""
    _check(weight, norms, null_norms, k, "wanda_mask_triton: ")
    masks, flags = _launch([weight], [norms], None if null_norms is None else [null_norms], [k], largest)
    return masks[0], flags


def wanda_mask_grouped_triton(
    weights: list[torch.Tensor],
    norms: list[torch.Tensor],
    null_norms: list[torch.Tensor] | None,
    ks: list[int],
    largest: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`wanda_mask_triton` of many layers (one device, one T), and their int32 [layers] flag
    words: one launch for all the layers whose weights share a dtype and a row block (SD 1.5's 16
    layers: three launches, one per width)."""
    for i, (w, n, k) in enumerate(zip(weights, norms, ks)):
        _check(w, n, None if null_norms is None else null_norms[i], k, f"wanda_mask_grouped_triton: layer {i}: ")
    return _launch(weights, norms, null_norms, ks, largest)


def _launch(weights, norms, null_norms, ks, largest) -> tuple[list[torch.Tensor], torch.Tensor]:
    device = weights[0].device
    # other float types (float8...) are exactly float32 values, as the reference reads them
    weights = [w if w.dtype in _TL_DTYPES else w.to(torch.float32) for w in weights]
    masks = [torch.empty((w.shape[0], (w.shape[1] + BITS - 1) // BITS), dtype=torch.uint8, device=device) for w in weights]
    flags = torch.zeros(len(weights), dtype=torch.int32, device=device)
    norms = [n.contiguous() for n in norms]
    nulls = None if null_norms is None else [n.contiguous() for n in null_norms]
    launches: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        launches.setdefault((w.dtype, mask_blocks(1, w.shape[1])[1]), []).append(i)
    with device_guard(device):
        for (dtype, block), layers in launches.items():
            rows = max(mask_blocks(weights[i].shape[0], weights[i].shape[1])[0] for i in layers)
            groups, cap = mask_filter(block, max(ks[i] for i in layers))
            table, first = [], 0
            for i in layers:
                w, null = weights[i], (None if nulls is None else nulls[i])
                table.append([
                    w.data_ptr(), norms[i].data_ptr(), 0 if null is None else null.data_ptr(), masks[i].data_ptr(),
                    w.shape[0], w.shape[1], ks[i], w.stride(0), w.stride(1), first,
                ])
                first += max(1, triton.cdiv(w.shape[0], rows))  # no rows: one program still checks the norms
            # per program, ROWS x CAP candidate keys (written and read by that program only)
            scratch = torch.empty((first * rows * cap,) if cap else (1,), dtype=torch.int32, device=device)
            layer_flags = flags[layers[0] : layers[0] + 1] if len(layers) == 1 else torch.zeros(len(layers), dtype=torch.int32, device=device)
            _wanda_mask_kernel[(first,)](
                torch.tensor(table, dtype=torch.int64).to(device),
                layer_flags,
                scratch,
                len(layers),
                norms[layers[0]].shape[0],
                W_DTYPE=_TL_DTYPES[dtype],
                LAYERS=triton.next_power_of_2(len(layers)),
                HAS_NULL=nulls is not None,
                LARGEST=bool(largest),
                ROWS=rows,
                BLOCK=block,
                FILTER=cap > 0,
                GROUPS=max(groups, 1),
                CAP=max(cap, 1),
                num_warps=mask_num_warps(rows, block),
            )
            if len(layers) > 1:
                flags[layers] = layer_flags
    return masks, flags
