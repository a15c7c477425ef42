"""Triton kernel of memcore::geglu_accumulate (see ``memcore/ops/geglu_accumulate.py``).

Math, for every row r of P = ``p2d`` (``h = P[r, :inner]``, ``g = P[r, inner:]``)::

    gate[r]  = round_P(0.5 * g * (1 + erf(g / sqrt(2))))     (exact gelu, rounded to P's dtype)
    X[r]     = round_P(h * gate[r])
    acc[j]  += X[r, j]^2 / ||X[r]||^2   for row_start <= r < row_end   (token_norm; zero rows add 0)
    acc[j]  += X[r, j]^2                                                (otherwise)

gelu and the product are evaluated in float32 (float64 for a float64 P) and rounded to P's dtype
exactly where diffusers' eager ``hidden_states * F.gelu(gate)`` rounds: ``F.gelu`` returns P's
dtype, and the product of two fp16/bf16 values is exact in fp32, so each of the two roundings is the
one eager PyTorch makes; only erf's last bit can differ. The statistic is that of X as stored
(the rounded rows), in float32 registers, with the row-scaling of ``sqnorm_accumulate.py``.

Memory layout: ``p2d`` is row-major ``[rows, 2 * inner]`` (row stride ``stride_p`` elements, unit
column stride), float16/bfloat16/float32/float64; ``out`` is a contiguous ``[rows, inner]`` in P's
dtype; ``acc`` is a contiguous float32 ``[inner]``. Every row of X is computed and stored; only rows
in [row_start, row_end) enter the statistic.

Work split: tiles of BLOCK_R rows, walked by a persistent grid of a few programs per SM.

- ``inner <= MAX_BLOCK_COLS`` (every SD layer: inner <= 5120): a tile is one [BLOCK_R, BLOCK_C]
  block. P is read once, X written once, and the statistic is computed from the X still in
  registers: no extra pass over X in global memory. Column partial sums stay in registers and reach
  ``acc`` with one ``tl.atomic_add`` per column and program.
- Wider rows, token_norm: pass 1 walks the row in BLOCK_C chunks, storing X and finding the row
  scale and norm; pass 2 recomputes X from P (bit-identical) and adds its statistic with atomics.

float32 atomics make the last bits of ``acc`` depend on program completion order on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Block sizing is the statistics kernel's: rows of up to MAX_BLOCK_COLS (8192 >= SD's widest GEGLU,
# 5120) are one block, wider ones are chunked.
from memcore._kernels.sqnorm_accumulate import (
    _TORCH_DTYPES,
    MAX_BLOCK_COLS,
    _blocks,
    _grid_size,
    _num_warps,
    _row_scale,
    _safe_reciprocal,
)

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
    p_ptr, out_ptr, rows, cols, mask, inner, stride_p, COMPUTE: tl.constexpr, IS_BF16: tl.constexpr, STORE: tl.constexpr
):
    """X for a [BLOCK_R, BLOCK_C] tile (rows x column indices), stored if STORE; returns X as fp32."""
    p_row = p_ptr + rows.to(tl.int64)[:, None] * stride_p
    h_raw = tl.load(p_row + cols[None, :], mask=mask, other=0.0)
    g = tl.load(p_row + inner + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    gelu = g * 0.5 * (1.0 + tl.math.erf(g * SQRT1_2))
    gate = _round_to(gelu, h_raw.dtype, IS_BF16).to(COMPUTE)  # F.gelu returns P's dtype
    x = _round_to(h_raw.to(COMPUTE) * gate, h_raw.dtype, IS_BF16)
    if STORE:
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * inner + cols[None, :], x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _geglu_accumulate_kernel(
    p_ptr,
    out_ptr,
    acc_ptr,
    n_rows,
    row_start,
    row_end,
    inner,
    stride_p,
    TOKEN_NORM: tl.constexpr,
    CHUNKED: tl.constexpr,
    COMPUTE: tl.constexpr,
    IS_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(n_rows, BLOCK_R)
    r_off = tl.arange(0, BLOCK_R)
    c_off = tl.arange(0, BLOCK_C)

    if not CHUNKED:
        c_mask = c_off < inner
        partial = tl.zeros([BLOCK_C], dtype=tl.float32)
        for tile in range(pid, n_tiles, nprog):
            rows = tile * BLOCK_R + r_off
            r_mask = rows < n_rows
            mask = r_mask[:, None] & c_mask[None, :]
            x = _geglu_tile(p_ptr, out_ptr, rows, c_off, mask, inner, stride_p, COMPUTE, IS_BF16, True)
            counted = r_mask & (rows >= row_start) & (rows < row_end)
            if TOKEN_NORM:
                y, inv_s = _row_scale(x, counted)
                sq = y * y * inv_s[:, None]
            else:
                sq = x * x
            partial += tl.sum(tl.where(counted[:, None], sq, 0.0), axis=0)
        tl.atomic_add(acc_ptr + c_off, partial, mask=c_mask)
    else:
        for tile in range(pid, n_tiles, nprog):
            rows = tile * BLOCK_R + r_off
            r_mask = rows < n_rows
            counted = r_mask & (rows >= row_start) & (rows < row_end)
            m = tl.zeros([BLOCK_R], dtype=tl.float32)
            s = tl.zeros([BLOCK_R], dtype=tl.float32)
            for c0 in range(0, inner, BLOCK_C):
                cc = c0 + c_off
                c_mask = cc < inner
                mask = r_mask[:, None] & c_mask[None, :]
                x = _geglu_tile(p_ptr, out_ptr, rows, cc, mask, inner, stride_p, COMPUTE, IS_BF16, True)
                x = tl.where(counted[:, None], x, 0.0)
                if TOKEN_NORM:
                    # running row scale m = max |x| and s = sum (x / m)^2, rescaled when m grows
                    m_new = tl.maximum(m, tl.max(tl.abs(x), axis=1))
                    safe = tl.where(m_new > 0.0, m_new, 1.0)
                    ratio = m / safe
                    y = x / safe[:, None]
                    s = s * ratio * ratio + tl.sum(y * y, axis=1)
                    m = m_new
                else:
                    tl.atomic_add(acc_ptr + cc, tl.sum(x * x, axis=0), mask=c_mask)
            if TOKEN_NORM:
                m = tl.where(m > 0.0, m, 1.0)
                inv_s = _safe_reciprocal(s)
                for c0 in range(0, inner, BLOCK_C):
                    cc = c0 + c_off
                    c_mask = cc < inner
                    mask = counted[:, None] & c_mask[None, :]
                    x = _geglu_tile(p_ptr, out_ptr, rows, cc, mask, inner, stride_p, COMPUTE, IS_BF16, False)
                    y = x / m[:, None]
                    tl.atomic_add(acc_ptr + cc, tl.sum(y * y * inv_s[:, None], axis=0), mask=c_mask)


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
    if p2d.dim() != 2 or p2d.dtype not in _TORCH_DTYPES or p2d.stride(1) != 1 or p2d.shape[1] % 2 != 0:
        raise ValueError(
            "geglu_accumulate_triton: p2d must be a row-major 2-D float16/bfloat16/float32/float64 tensor "
            f"with an even number of columns, got {p2d.dtype} of shape {tuple(p2d.shape)} and strides {p2d.stride()}"
        )
    rows, inner = p2d.shape[0], p2d.shape[1] // 2
    if acc.dtype != torch.float32 or acc.shape != (inner,) or not acc.is_contiguous() or acc.device != p2d.device:
        raise ValueError(
            f"geglu_accumulate_triton: acc must be a contiguous float32 [{inner}] on {p2d.device}, "
            f"got {acc.dtype} of shape {tuple(acc.shape)} on {acc.device}"
        )
    if not 0 <= row_start <= row_end <= rows:
        raise ValueError(f"geglu_accumulate_triton: row range [{row_start}, {row_end}) does not fit {rows} rows")
    out = torch.empty((rows, inner), dtype=p2d.dtype, device=p2d.device)
    if rows == 0 or inner == 0:
        return out
    chunked, block_r, block_c = _blocks(rows, inner, max_block_cols)
    grid = (_grid_size(p2d.device, triton.cdiv(rows, block_r)),)
    _geglu_accumulate_kernel[grid](
        p2d,
        out,
        acc,
        rows,
        row_start,
        row_end,
        inner,
        p2d.stride(0),
        TOKEN_NORM=bool(token_norm),
        CHUNKED=chunked,
        COMPUTE=tl.float64 if p2d.dtype == torch.float64 else tl.float32,
        IS_BF16=p2d.dtype == torch.bfloat16,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=_num_warps(block_r, block_c),
    )
    return out
