"""Triton kernel of memcore::sqnorm_accumulate (see ``memcore/ops/sqnorm_accumulate.py``).

Math, for the rows r of ``x2d`` with ``row_start <= r < row_end`` and every column j::

    acc[j] += sum_r x[r, j]^2 / ||x[r]||^2     (token_norm; a zero row adds 0)
    acc[j] += sum_r x[r, j]^2                  (otherwise)

Everything is float32 in registers whatever x's dtype. With token_norm each row is first scaled by
its largest magnitude m (y = x / m, so ||y||^2 is in [1, cols]) and ``x[r, j]^2 / ||x[r]||^2`` is
computed as ``y[r, j]^2 / ||y[r]||^2``: no overflow or underflow of the row norm for any finite
fp32/bf16 input, where a plain ``sum(x^2)`` in fp32 overflows above |x| ~ 1.8e19.

Memory layout: ``x2d`` is row-major ``[rows, cols]`` with row stride ``stride_row`` elements and
unit column stride, any of float16/bfloat16/float32/float64; ``acc`` is a contiguous float32
``[cols]``.

Work split: the row range is cut into tiles of BLOCK_R rows; a persistent grid of at most a few
programs per SM walks the tiles (tile = pid, pid + nprog, ...).

- Narrow rows (``cols <= MAX_BLOCK_COLS``): a tile is one [BLOCK_R, BLOCK_C] block, loaded once;
  each program keeps its column partial sums in registers and adds them into ``acc`` with one
  ``tl.atomic_add`` per column at the end. x is read exactly once.
- Wide rows: the row is walked in BLOCK_C chunks, once for the row scale and norm (token_norm only)
  and once to add ``y^2 / ||y||^2`` into ``acc`` with one atomic per column and tile.

float32 atomics make the last bits of ``acc`` depend on the order the programs finish in on a GPU;
the cpu backend is the deterministic one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Widest row held in registers as one block; wider rows are walked in chunks of WIDE_BLOCK_COLS.
MAX_BLOCK_COLS = 8192
WIDE_BLOCK_COLS = 2048
# Elements of one [BLOCK_R, BLOCK_C] tile (fp32 registers: 32 KiB per program).
TILE_ELEMENTS = 8192
# Persistent grid: programs per streaming multiprocessor on CUDA; programs in all under the interpreter.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4

_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _safe_reciprocal(s):
    """1 / s where s > 0, else 0."""
    positive = s > 0.0
    return tl.where(positive, 1.0 / tl.where(positive, s, 1.0), 0.0)


@triton.jit
def _row_scale(x, r_mask):
    """Per row of an fp32 tile: (y, inv_s) with y = x / max|x| and inv_s = 1 / sum(y^2) (0 for a zero row).

    ``y^2 * inv_s`` is then ``x^2 / ||x||^2`` without over- or underflowing the norm.
    """
    m = tl.max(tl.abs(x), axis=1)
    m = tl.where(r_mask & (m > 0.0), m, 1.0)
    y = x / m[:, None]
    s = tl.sum(y * y, axis=1)
    return y, _safe_reciprocal(s)


@triton.jit
def _sqnorm_accumulate_kernel(
    x_ptr,
    acc_ptr,
    row_start,
    row_end,
    cols,
    stride_row,
    TOKEN_NORM: tl.constexpr,
    CHUNKED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(row_end - row_start, BLOCK_R)
    r_off = tl.arange(0, BLOCK_R)
    c_off = tl.arange(0, BLOCK_C)

    if not CHUNKED:
        c_mask = c_off < cols
        partial = tl.zeros([BLOCK_C], dtype=tl.float32)
        for tile in range(pid, n_tiles, nprog):
            rows = row_start + tile * BLOCK_R + r_off
            r_mask = rows < row_end
            ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_row + c_off[None, :]
            x = tl.load(ptrs, mask=r_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
            if TOKEN_NORM:
                y, inv_s = _row_scale(x, r_mask)
                sq = y * y * inv_s[:, None]
            else:
                sq = x * x
            partial += tl.sum(sq, axis=0)
        tl.atomic_add(acc_ptr + c_off, partial, mask=c_mask)
    else:
        for tile in range(pid, n_tiles, nprog):
            rows = row_start + tile * BLOCK_R + r_off
            r_mask = rows < row_end
            row_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_row
            m = tl.full([BLOCK_R], 1.0, dtype=tl.float32)
            inv_s = tl.full([BLOCK_R], 1.0, dtype=tl.float32)
            if TOKEN_NORM:
                # one pass for the scale m and s = sum (x / m)^2, rescaling s when m grows
                m = tl.zeros([BLOCK_R], dtype=tl.float32)
                s = tl.zeros([BLOCK_R], dtype=tl.float32)
                for c0 in range(0, cols, BLOCK_C):
                    cc = c0 + c_off
                    x = tl.load(row_ptrs + cc[None, :], mask=r_mask[:, None] & (cc < cols)[None, :], other=0.0)
                    x = x.to(tl.float32)
                    m_new = tl.maximum(m, tl.max(tl.abs(x), axis=1))
                    safe = tl.where(m_new > 0.0, m_new, 1.0)
                    ratio = m / safe
                    y = x / safe[:, None]
                    s = s * ratio * ratio + tl.sum(y * y, axis=1)
                    m = m_new
                m = tl.where(m > 0.0, m, 1.0)
                inv_s = _safe_reciprocal(s)
            for c0 in range(0, cols, BLOCK_C):
                cc = c0 + c_off
                c_mask = cc < cols
                x = tl.load(row_ptrs + cc[None, :], mask=r_mask[:, None] & c_mask[None, :], other=0.0)
                x = x.to(tl.float32)
                if TOKEN_NORM:
                    y = x / m[:, None]
                    sq = y * y * inv_s[:, None]
                else:
                    sq = x * x
                tl.atomic_add(acc_ptr + cc, tl.sum(sq, axis=0), mask=c_mask)


def _blocks(rows: int, cols: int, max_block_cols: int) -> tuple[bool, int, int]:
    """(chunked, BLOCK_R, BLOCK_C) for a [rows, cols] problem."""
    chunked = cols > max_block_cols
    block_c = min(WIDE_BLOCK_COLS, max_block_cols) if chunked else triton.next_power_of_2(cols)
    block_r = max(1, min(TILE_ELEMENTS // block_c, triton.next_power_of_2(max(rows, 1))))
    return chunked, block_r, block_c


def _num_warps(block_r: int, block_c: int) -> int:
    return max(4, min(16, (block_r * block_c) // 512))


def _grid_size(device: torch.device, tiles: int) -> int:
    if device.type == "cuda":
        cap = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = INTERPRETER_PROGRAMS
    return max(1, min(tiles, cap))


def sqnorm_accumulate_triton(
    x2d: torch.Tensor,
    acc: torch.Tensor,
    row_start: int,
    row_end: int,
    token_norm: bool,
    *,
    max_block_cols: int = MAX_BLOCK_COLS,
) -> None:
    """Add the statistic of rows [row_start, row_end) of ``x2d`` to ``acc`` (see the module docstring).

    ``max_block_cols`` (a power of two) is the widest row kept as one block; tests lower it to run
    the chunked path on small shapes.
    """
    if x2d.dim() != 2 or x2d.dtype not in _TORCH_DTYPES or x2d.stride(1) != 1:
        raise ValueError(
            "sqnorm_accumulate_triton: x2d must be a row-major 2-D float16/bfloat16/float32/float64 tensor, "
            f"got {x2d.dtype} of shape {tuple(x2d.shape)} and strides {x2d.stride()}"
        )
    rows, cols = x2d.shape
    if acc.dtype != torch.float32 or acc.shape != (cols,) or not acc.is_contiguous() or acc.device != x2d.device:
        raise ValueError(
            f"sqnorm_accumulate_triton: acc must be a contiguous float32 [{cols}] on {x2d.device}, "
            f"got {acc.dtype} of shape {tuple(acc.shape)} on {acc.device}"
        )
    if not 0 <= row_start <= row_end <= rows:
        raise ValueError(f"sqnorm_accumulate_triton: row range [{row_start}, {row_end}) does not fit {rows} rows")
    n = row_end - row_start
    if n == 0 or cols == 0:
        return
    chunked, block_r, block_c = _blocks(n, cols, max_block_cols)
    grid = (_grid_size(x2d.device, triton.cdiv(n, block_r)),)
    _sqnorm_accumulate_kernel[grid](
        x2d,
        acc,
        row_start,
        row_end,
        cols,
        x2d.stride(0),
        TOKEN_NORM=bool(token_norm),
        CHUNKED=chunked,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=_num_warps(block_r, block_c),
    )
