"""Triton kernel of memcore::sqnorm_accumulate (see ``memcore/ops/sqnorm_accumulate.py``).

Math, for the rows r of ``x2d`` with ``row_start <= r < row_end`` and every column j::

    acc[j] += sum_r x[r, j]^2 / ||x[r]||^2     (token_norm; a row that is zero or holds inf/NaN adds 0)
    acc[j] += sum_r x[r, j]^2                  (otherwise)

Arithmetic is float32 in registers for 16- and 32-bit inputs, float64 for float64 inputs.

Row normalization of 16- and 32-bit inputs without overflow, underflow or an approximate division
(float64 inputs follow the reference's own arithmetic instead: the float64 sum of squares, a row
counting iff it is positive and finite, each square divided by it): the largest magnitude of
a row is found as an integer maximum of the bit patterns of ``|x|`` (their integer order is the
order of the magnitudes, +inf above every finite value and NaN above +inf, so the maximum also says
whether the row is zero or not finite). From its exponent comes a power of two ``c`` (a normal
number) with ``max |c x|`` in [0.5, 4); ``y = c x`` is exact, ``s = sum y^2`` can neither overflow
nor underflow, and ``x^2 / ||x||^2 = y^2 * (1 / s)`` with one IEEE-rounded reciprocal per row
(``tl.math.div_rn``: a plain ``/`` compiles to the approximate ``div.full.f32`` on the GPU). The
per-element path has no division at all, so no approximate division is kept anywhere for speed;
the compiled PTX is checked for it (tests/test_kernel_code.py). The per-element result,
``(y * y) * (1 / s)``, is two roundings from the exact ratio instead of the reference's one, well
within the float32 statistic's own error. A row counts iff its maximum magnitude is positive and
finite, which for these inputs is exactly the reference's "squared norm (float64) > 0 and finite".

Memory layout: ``x2d`` is row-major ``[rows, cols]`` with row stride ``stride_row`` elements and
unit column stride, any of float16/bfloat16/float32/float64; ``acc`` is a contiguous float32
``[cols]``.

Determinism: no floating-point atomics. Each program sums its tiles' column sums in float64
registers (so the error hardly depends on how many tiles a program walks, i.e. on the SM count) and
writes them, rounded to the compute dtype, to its own row of a workspace ``[programs, cols]``; a
second kernel adds the rows into ``acc`` in program order, in float64, rounding once. The number of
programs is a fixed function of the shape and the device (SM count), and every program walks a fixed
list of tiles, so ``acc`` is the same bit for bit from run to run on one device.

Work split: the row range is cut into tiles of BLOCK_R rows; program p walks tiles p, p + P, ...

- Narrow rows (``cols <= MAX_BLOCK_COLS``): a tile is one [BLOCK_R, BLOCK_C] block, loaded once;
  the program keeps its column partial sums in registers. x is read exactly once.
- Wide rows: a first kernel walks each row in BLOCK_C chunks for its scale and ``1 / s`` (token_norm
  only; two numbers per row in a small buffer); a second kernel on a (programs, chunks) grid adds
  ``y^2 / s`` per chunk of columns, its partial sums in registers.
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
    running_norm,
    torch_dtype,
    upcast,
)
from memcore._kernels._launch import MAX_BLOCK_COLS, blocks, device_guard, num_warps, programs


@triton.jit
def _sqnorm_row_norms_kernel(
    x_ptr,
    norm_ptr,
    row_start,
    row_end,
    cols,
    stride_row,
    COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Wide rows, token_norm, first pass: (c, w) of row row_start + i in norm[0, i], norm[1, i]."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n = row_end - row_start
    r_off = tl.arange(0, BLOCK_R)
    c_off = tl.arange(0, BLOCK_C)
    for tile in range(pid, tl.cdiv(n, BLOCK_R), nprog):
        i = tile * BLOCK_R + r_off
        r_mask = i < n
        row_ptrs = x_ptr + (row_start + i).to(tl.int64)[:, None] * stride_row
        mbits = tl.zeros([BLOCK_R], dtype=tl.int64 if COMPUTE == tl.float64 else tl.int32)
        s = tl.zeros([BLOCK_R], dtype=COMPUTE)
        for c0 in range(0, cols, BLOCK_C):
            cc = c0 + c_off
            x = tl.load(row_ptrs + cc[None, :], mask=r_mask[:, None] & (cc < cols)[None, :], other=0.0)
            mbits, s = running_norm(mbits, s, upcast(x))
        c, w = finish_norm(mbits, s, r_mask)
        tl.store(norm_ptr + i, c, mask=r_mask)
        tl.store(norm_ptr + n + i, w, mask=r_mask)


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
    check_rows_and_acc("sqnorm_accumulate_triton", "x2d", x2d, acc, row_start, row_end)
    cols = x2d.shape[1]
    n = row_end - row_start
    if n == 0 or cols == 0:
        return
    compute = compute_dtype(x2d.dtype)
    chunked, block_r, block_c = blocks(n, cols, max_block_cols)
    with device_guard(x2d.device):
        norm = None
        if chunked and token_norm:  # a first pass for the scale and norm of the wide rows
            norm = torch.empty((2, n), dtype=torch_dtype(compute), device=x2d.device)
            _sqnorm_row_norms_kernel[(programs(x2d.device, n, block_r),)](
                x2d,
                norm,
                row_start,
                row_end,
                cols,
                x2d.stride(0),
                COMPUTE=compute,
                BLOCK_R=block_r,
                BLOCK_C=block_c,
                num_warps=num_warps(block_r, block_c),
            )
        add_partials(column_partials(x2d, norm, row_start, row_end, token_norm, compute, block_r, block_c), acc)
