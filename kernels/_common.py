"""Triton helpers shared by memcore's kernels (private): exact upcasts, the overflow-free row
normalization of the statistics (see ``sqnorm_accumulate.py`` for the method), and the per-program
partial sums that make the statistics deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memcore._kernels._launch import REDUCE_BLOCK, num_warps, programs

TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# bit patterns of +inf: a magnitude's bits at or above it mean inf or NaN
_INF_BITS32 = tl.constexpr(0x7F800000)
_INF_BITS64 = tl.constexpr(0x7FF0000000000000)


def compute_dtype(dtype: torch.dtype):
    """Triton dtype of the arithmetic for inputs of ``dtype``: float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def upcast(x):
    """x in float32 (float64 stays float64), exactly. bfloat16 is widened with integer ops: the same
    bits as the GPU's conversion, where the interpreter's conversion mangles bf16 subnormals."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif x.dtype == tl.float64:
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def _magnitude_bits(x):
    """|x| as an integer of x's width (fp32 or fp64): ordered as the magnitudes, inf < NaN on top."""
    if x.dtype == tl.float64:
        return x.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    else:
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _counted(mbits):
    """Whether a row whose largest magnitude has bits ``mbits`` counts: positive and finite."""
    if mbits.dtype == tl.int64:
        return (mbits > 0) & (mbits < _INF_BITS64)
    else:
        return (mbits > 0) & (mbits < _INF_BITS32)


@triton.jit
def _pow2_scale(mbits):
    """The power of two c (a normal number) for a row whose largest magnitude m has bits ``mbits``.

    For m with biased exponent E (m in [2^(E - bias), 2^(E - bias + 1))) c = 2^(bias - 1 - E), so c m
    is in [0.5, 1); clamped to the normal range, which leaves c m in [2^-23, 1] for a subnormal m
    (2^-52 in float64) and in [1, 4) for the two largest exponents. Any value for inf/NaN rows.
    """
    if mbits.dtype == tl.int64:
        e = (mbits >> 52).to(tl.int32)
        b = tl.minimum(tl.maximum(2045 - e, 1), 2046)
        return (b.to(tl.int64) << 52).to(tl.float64, bitcast=True)
    else:
        e = mbits >> 23
        b = tl.minimum(tl.maximum(253 - e, 1), 254)
        return (b << 23).to(tl.float32, bitcast=True)


@triton.jit
def div_rn(a, b):
    """a / b rounded to nearest as IEEE division: ``tl.math.div_rn`` in float32, where a plain ``/``
    compiles to the approximate ``div.full.f32`` (2 ulp); float64 ``/`` is ``div.rn.f64`` already."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _inverse_norm(s, counted):
    """1 / s, IEEE-rounded, for counted rows; 0 for the others (s > 0 wherever counted)."""
    return tl.where(counted, div_rn(tl.full(s.shape, 1.0, s.dtype), tl.where(counted, s, 1.0)), 0.0)


# Row weights. Each row that counts gets a pair (c, w) with which normalized_squares gives its
# x^2 / ||x||^2; rows that do not count get w = 0. For 16- and 32-bit inputs (float32 arithmetic) c
# is the row's power-of-two scale and w = 1 / sum (c x)^2: no overflow or underflow anywhere. For
# float64 inputs the arithmetic is the reference's own: c = 1, w = sum x^2 in float64, a row counts
# iff w is positive and finite, and each square is divided by w (one IEEE division an element), so
# rows whose float64 squared norm overflows or underflows are treated exactly as the reference
# treats them.


@triton.jit
def _plain_weight(s, counted):
    """float64 rows: w = s where the row counts (s positive and finite), else 0."""
    return tl.where(counted & (s > 0.0) & (s < float("inf")), s, 0.0)


@triton.jit
def row_norm(x, r_mask):
    """Per row of a [BLOCK_R, BLOCK_C] tile holding whole rows: its (c, w); w = 0 for rows outside
    r_mask, zero rows and rows with inf/NaN."""
    if x.dtype == tl.float64:
        return tl.full([x.shape[0]], 1.0, tl.float64), _plain_weight(tl.sum(x * x, axis=1), r_mask)
    else:
        mbits = tl.max(_magnitude_bits(x), axis=1)
        c = _pow2_scale(mbits)
        y = x * c[:, None]
        return c, _inverse_norm(tl.sum(y * y, axis=1), r_mask & _counted(mbits))


@triton.jit
def running_norm(mbits, s, x):
    """Fold a [BLOCK_R, BLOCK_C] chunk x of rows into their running (mbits, s): the bits of the largest
    magnitude so far and s = sum (c x)^2 for the scale c of mbits (float64: s = sum x^2, mbits
    unused). Start from (0, 0)."""
    if x.dtype == tl.float64:
        return mbits, s + tl.sum(x * x, axis=1)
    else:
        new_bits = tl.maximum(mbits, tl.max(_magnitude_bits(x), axis=1))
        c = _pow2_scale(new_bits)
        ratio = div_rn(c, _pow2_scale(mbits))  # a power of two (or its underflow): exact
        y = x * c[:, None]
        return new_bits, s * ratio * ratio + tl.sum(y * y, axis=1)


@triton.jit
def finish_norm(mbits, s, r_mask):
    """(c, w) of rows from their final running (mbits, s), as :func:`row_norm` gives them."""
    if s.dtype == tl.float64:
        return tl.full(s.shape, 1.0, tl.float64), _plain_weight(s, r_mask)
    else:
        return _pow2_scale(mbits), _inverse_norm(s, r_mask & _counted(mbits))


@triton.jit
def normalized_squares(x, c, w):
    """x^2 / ||x||^2 per element of a tile from its rows' (c, w); exactly 0 in rows not counted
    (whose x may be inf or NaN)."""
    if x.dtype == tl.float64:
        return tl.where(w[:, None] > 0.0, (x * x) / tl.where(w > 0.0, w, 1.0)[:, None], 0.0)
    else:
        y = x * c[:, None]
        return tl.where(w[:, None] > 0.0, y * y * w[:, None], 0.0)


@triton.jit
def _column_partials_kernel(
    x_ptr,
    norm_ptr,
    ws_ptr,
    row_start,
    row_end,
    cols,
    stride_row,
    TOKEN_NORM: tl.constexpr,
    WHOLE_ROWS: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (p, q) writes the sums over its tiles (p, p + P, ...) of columns [q BLOCK_C, (q + 1)
    BLOCK_C) to ws[p, those columns]. With TOKEN_NORM each row is normalized: by its own norm when a
    tile holds whole rows (WHOLE_ROWS: x is read exactly once), else with the (c, w) that a first
    pass over the wide rows left in norm[0, i], norm[1, i]."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n = row_end - row_start
    r_off = tl.arange(0, BLOCK_R)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cc < cols
    partial = tl.zeros([BLOCK_C], dtype=tl.float64)
    for tile in range(pid, tl.cdiv(n, BLOCK_R), nprog):
        i = tile * BLOCK_R + r_off
        r_mask = i < n
        ptrs = x_ptr + (row_start + i).to(tl.int64)[:, None] * stride_row + cc[None, :]
        x = upcast(tl.load(ptrs, mask=r_mask[:, None] & c_mask[None, :], other=0.0))
        if TOKEN_NORM:
            if WHOLE_ROWS:
                c, w = row_norm(x, r_mask)
            else:
                c = tl.load(norm_ptr + i, mask=r_mask, other=1.0)
                w = tl.load(norm_ptr + n + i, mask=r_mask, other=0.0)
            sq = normalized_squares(x, c, w)
        else:
            sq = x * x
        partial += tl.sum(sq, axis=0).to(tl.float64)
    tl.store(ws_ptr + pid.to(tl.int64) * cols + cc, partial.to(COMPUTE), mask=c_mask)


@triton.jit
def _add_partials_kernel(ws_ptr, acc_ptr, n_parts, cols, BLOCK: tl.constexpr):
    """acc[j] += sum over p of ws[p, j], in float64, p in increasing order; rounded once to float32."""
    cc = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c_mask = cc < cols
    total = tl.load(acc_ptr + cc, mask=c_mask, other=0.0).to(tl.float64)
    ptrs = ws_ptr + cc
    for _ in range(n_parts):
        total += tl.load(ptrs, mask=c_mask, other=0.0).to(tl.float64)
        ptrs += cols
    tl.store(acc_ptr + cc, total.to(tl.float32), mask=c_mask)


def torch_dtype(compute) -> torch.dtype:
    """The torch dtype of a Triton compute dtype (of the workspace and the row norms)."""
    return torch.float64 if compute == tl.float64 else torch.float32


def workspace(n_programs: int, cols: int, compute, device: torch.device) -> torch.Tensor:
    """The per-program partial sums: every program writes its whole row, so no zeroing is needed."""
    return torch.empty((n_programs, cols), dtype=torch_dtype(compute), device=device)


def add_partials(ws: torch.Tensor, acc: torch.Tensor) -> None:
    """acc += ws.sum(0), in a fixed order (call inside :func:`device_guard`)."""
    cols = acc.shape[0]
    _add_partials_kernel[(triton.cdiv(cols, REDUCE_BLOCK),)](ws, acc, ws.shape[0], cols, BLOCK=REDUCE_BLOCK)


def column_partials(
    x2d: torch.Tensor,
    norm: torch.Tensor | None,
    row_start: int,
    row_end: int,
    token_norm: bool,
    compute,
    block_r: int,
    block_c: int,
) -> torch.Tensor:
    """The workspace of ``_column_partials_kernel`` for rows [row_start, row_end) of x2d (call inside
    the device guard). Rows of at most ``block_c`` columns are normalized by their own norm; wider ones
    (token_norm) with the (c, w) in ``norm`` from a first pass."""
    rows, cols = row_end - row_start, x2d.shape[1]
    chunks = triton.cdiv(cols, block_c)
    n_programs = max(1, programs(x2d.device, rows, block_r) // chunks)
    ws = workspace(n_programs, cols, compute, x2d.device)
    _column_partials_kernel[(n_programs, chunks)](
        x2d,
        x2d if norm is None else norm,  # a dummy pointer where no first pass ran
        ws,
        row_start,
        row_end,
        cols,
        x2d.stride(0),
        TOKEN_NORM=bool(token_norm),
        WHOLE_ROWS=chunks == 1,
        COMPUTE=compute,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps(block_r, block_c),
    )
    return ws


def check_rows_and_acc(
    op: str, name: str, x2d: torch.Tensor, acc: torch.Tensor, row_start: int, row_end: int, halves: bool = False
) -> None:
    """The launchers' checks: ``x2d`` row-major 2-D of a dtype the kernels take (``halves``: an even
    number of columns, [h | g]); ``acc`` contiguous float32 with one entry per column (per half column)
    on x2d's device; the row range within x2d's rows."""
    if x2d.dim() != 2 or x2d.dtype not in TORCH_DTYPES or x2d.stride(1) != 1 or (halves and x2d.shape[1] % 2):
        even = " with an even number of columns" if halves else ""
        raise ValueError(
            f"{op}: {name} must be a row-major 2-D float16/bfloat16/float32/float64 tensor{even}, "
            f"got {x2d.dtype} of shape {tuple(x2d.shape)} and strides {x2d.stride()}"
        )
    features = x2d.shape[1] // 2 if halves else x2d.shape[1]
    if acc.dtype != torch.float32 or acc.shape != (features,) or not acc.is_contiguous() or acc.device != x2d.device:
        raise ValueError(
            f"{op}: acc must be a contiguous float32 [{features}] on {x2d.device}, "
            f"got {acc.dtype} of shape {tuple(acc.shape)} on {acc.device}"
        )
    if not 0 <= row_start <= row_end <= x2d.shape[0]:
        raise ValueError(f"{op}: row range [{row_start}, {row_end}) does not fit {x2d.shape[0]} rows")
