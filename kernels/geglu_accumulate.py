"""Triton kernel of memcore::geglu_accumulate (see ``memcore/ops/geglu_accumulate.py``).

Math, for every row r of P = ``p2d`` (``h = P[r, :inner]``, ``g = P[r, inner:]``)::

    gate[r]  = round_P(0.5 * g * (1 + erf(g / sqrt(2))))     (exact gelu, rounded to P's dtype)
    X[r]     = round_P(h * gate[r])
    acc[j]  += X[r, j]^2 / ||X[r]||^2   for row_start <= r < row_end   (token_norm; a row of X that
                                                 is zero or holds inf/NaN adds 0)
    acc[j]  += X[r, j]^2                                                (otherwise)

gelu and the product are evaluated in float32 (float64 for a float64 P) and rounded to P's dtype
exactly where diffusers' eager ``hidden_states * F.gelu(gate)`` rounds: ``F.gelu`` returns P's
dtype, and the product of two fp16/bf16 values is exact in fp32, so each of the two roundings is the
one eager PyTorch makes; only erf's last bit can differ (erf has no division; the compiler may turn
the exact fp32 product rounded to fp16 into one ``mul.f16``, the same value). The statistic is that
of X as stored (the rounded rows: a finite fp16 P can give an inf X, which then does not count), in
float32 registers (float64 for float64), with the row normalization of ``sqnorm_accumulate.py``.

Memory layout: ``p2d`` is row-major ``[rows, 2 * inner]`` (row stride ``stride_p`` elements, unit
column stride), float16/bfloat16/float32/float64; ``out`` is a contiguous ``[rows, inner]`` in P's
dtype; ``acc`` is a contiguous float32 ``[inner]``. Every row of X is computed and stored; only rows
in [row_start, row_end) enter the statistic.

Work split and determinism as in ``sqnorm_accumulate.py``: tiles of BLOCK_R rows, program p walks
tiles p, p + P, ... and writes its column sums to its own row of a workspace, which a second kernel
adds into ``acc`` in program order; no floating-point atomics.

- ``inner <= MAX_BLOCK_COLS`` (every SD GEGLU: inner <= 5120): a tile is one [BLOCK_R, BLOCK_C]
  block. P is read once, X written once, and the statistic is computed from the X still in
  registers: no extra pass over X in global memory.
- Wider rows: one kernel walks each row in BLOCK_C chunks, storing X and (token_norm) finding the
  row's scale and norm; the statistic is then added from the stored X by the chunked kernel of
  ``_common.py`` (one extra read of X, only for these rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memcore._kernels._common import (
    add_partials,
    check_rows_and_acc,
    column_partials,
    compute_dtype,
    finish_norm,
    normalized_squares,
    row_norm,
    running_norm,
    torch_dtype,
    upcast,
    workspace,
)
from memcore._kernels._launch import MAX_BLOCK_COLS, blocks, device_guard, num_warps, programs

# 1 / sqrt(2)
SQRT1_2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _round_bf16(x):
    """fp32 -> bfloat16, round to nearest even, with integer ops.

    The same result as the GPU's ``cvt.rn.bf16.f32``, and correct under TRITON_INTERPRET=1, whose
    fp32 -> bf16 cast truncates.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _round_to(x, dtype: tl.constexpr, IS_BF16: tl.constexpr):
    if IS_BF16:
        return _round_bf16(x)
    else:
        return x.to(dtype)


@triton.jit
def _geglu_tile(
    p_ptr, out_ptr, rows, cols, mask, inner, stride_p, IS_BF16: tl.constexpr, STORE: tl.constexpr
):
    """X for a [BLOCK_R, BLOCK_C] tile (rows x column indices), stored if STORE; returns X in float32
    (float64 for float64 P)."""
    p_row = p_ptr + rows.to(tl.int64)[:, None] * stride_p
    h_raw = tl.load(p_row + cols[None, :], mask=mask, other=0.0)
    g = upcast(tl.load(p_row + inner + cols[None, :], mask=mask, other=0.0))
    gelu = g * 0.5 * (1.0 + tl.math.erf(g * SQRT1_2))
    gate = upcast(_round_to(gelu, h_raw.dtype, IS_BF16))  # F.gelu returns P's dtype
    x = _round_to(upcast(h_raw) * gate, h_raw.dtype, IS_BF16)
    if STORE:
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * inner + cols[None, :], x, mask=mask)
    return upcast(x)


@triton.jit
def _geglu_tiles_kernel(
    p_ptr,
    out_ptr,
    ws_ptr,
    n_rows,
    row_start,
    row_end,
    inner,
    stride_p,
    TOKEN_NORM: tl.constexpr,
    COMPUTE: tl.constexpr,
    IS_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows of at most BLOCK_C outputs: X of every row; program p writes its column sums to ws[p, :inner]."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r_off = tl.arange(0, BLOCK_R)
    c_off = tl.arange(0, BLOCK_C)
    c_mask = c_off < inner
    partial = tl.zeros([BLOCK_C], dtype=tl.float64)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_R), nprog):
        rows = tile * BLOCK_R + r_off
        r_mask = rows < n_rows
        mask = r_mask[:, None] & c_mask[None, :]
        x = _geglu_tile(p_ptr, out_ptr, rows, c_off, mask, inner, stride_p, IS_BF16, True)
        counted = r_mask & (rows >= row_start) & (rows < row_end)
        if TOKEN_NORM:
            c, w = row_norm(x, counted)
            sq = normalized_squares(x, c, w)
        else:
            sq = tl.where(counted[:, None], x * x, 0.0)
        partial += tl.sum(sq, axis=0).to(tl.float64)
    tl.store(ws_ptr + pid.to(tl.int64) * inner + c_off, partial.to(COMPUTE), mask=c_mask)


@triton.jit
def _geglu_rows_kernel(
    p_ptr,
    out_ptr,
    norm_ptr,
    n_rows,
    row_start,
    row_end,
    inner,
    stride_p,
    TOKEN_NORM: tl.constexpr,
    COMPUTE: tl.constexpr,
    IS_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Wide rows: X of every row in BLOCK_C chunks; with TOKEN_NORM, (c, w) of row row_start + i
    in norm[0, i], norm[1, i] (the statistic is then added from the stored X)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n = row_end - row_start
    r_off = tl.arange(0, BLOCK_R)
    c_off = tl.arange(0, BLOCK_C)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_R), nprog):
        rows = tile * BLOCK_R + r_off
        r_mask = rows < n_rows
        mbits = tl.zeros([BLOCK_R], dtype=tl.int64 if COMPUTE == tl.float64 else tl.int32)
        s = tl.zeros([BLOCK_R], dtype=COMPUTE)
        for c0 in range(0, inner, BLOCK_C):
            cc = c0 + c_off
            mask = r_mask[:, None] & (cc < inner)[None, :]
            x = _geglu_tile(p_ptr, out_ptr, rows, cc, mask, inner, stride_p, IS_BF16, True)
            if TOKEN_NORM:
                mbits, s = running_norm(mbits, s, x)
        if TOKEN_NORM:
            counted = r_mask & (rows >= row_start) & (rows < row_end)
            c, w = finish_norm(mbits, s, counted)
            tl.store(norm_ptr + rows - row_start, c, mask=counted)
            tl.store(norm_ptr + n + rows - row_start, w, mask=counted)


def geglu_accumulate_triton(
    p2d: torch.Tensor,
    acc: torch.Tensor,
    row_start: int,
    row_end: int,
    token_norm: bool,
    *,
    max_block_cols: int = MAX_BLOCK_COLS,
) -> torch.Tensor:
    """X = GEGLU(p2d) as ``[rows, inner]`` in P's dtype, adding the statistic of rows [row_start, row_end).

    ``max_block_cols`` (a power of two) is the widest row kept as one block; tests lower it to run
    the chunked path on small shapes.
    """
    check_rows_and_acc("geglu_accumulate_triton", "p2d", p2d, acc, row_start, row_end, halves=True)
    rows, inner = p2d.shape[0], p2d.shape[1] // 2
    out = torch.empty((rows, inner), dtype=p2d.dtype, device=p2d.device)
    if rows == 0 or inner == 0:
        return out
    compute = compute_dtype(p2d.dtype)
    chunked, block_r, block_c = blocks(rows, inner, max_block_cols)
    n_programs = programs(p2d.device, rows, block_r)
    n = row_end - row_start
    constants = dict(
        TOKEN_NORM=bool(token_norm),
        COMPUTE=compute,
        IS_BF16=p2d.dtype == torch.bfloat16,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps(block_r, block_c),
    )
    with device_guard(p2d.device):
        if not chunked:
            ws = workspace(n_programs, inner, compute, p2d.device)
            _geglu_tiles_kernel[(n_programs,)](
                p2d, out, ws, rows, row_start, row_end, inner, p2d.stride(0), **constants
            )
            add_partials(ws, acc)
        else:
            norm = torch.empty((2, n), dtype=torch_dtype(compute), device=p2d.device) if token_norm else None
            norm_arg = out if norm is None else norm  # a dummy pointer without token_norm
            _geglu_rows_kernel[(n_programs,)](
                p2d, out, norm_arg, rows, row_start, row_end, inner, p2d.stride(0), **constants
            )
            if n > 0:
                _, block_r, block_c = blocks(n, inner, max_block_cols)
                add_partials(column_partials(out, norm, row_start, row_end, token_norm, compute, block_r, block_c), acc)
    return out
