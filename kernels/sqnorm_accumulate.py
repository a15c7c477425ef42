"""Triton kernel of memcore::sqnorm_accumulate (see ``memcore/ops/sqnorm_accumulate.py``).

Math, for the rows r of ``x2d`` with ``row_start <= r < row_end`` and every column j::

    acc[j] += sum_r x[r, j]^2 / ||x[r]||^2     (token_norm; a row that is zero or holds inf/NaN adds 0)
    acc[j] += sum_r x[r, j]^2                  (otherwise)

Arithmetic is float32 in registers for 16- and 32-bit inputs, float64 for float64 inputs.

Row normalization without overflow, underflow or an approximate division: the largest magnitude of
a row is found as an integer maximum of the bit patterns of ``|x|`` (their integer order is the
order of the magnitudes, +inf above every finite value and NaN above +inf, so the maximum also says
whether the row is zero or not finite). From its exponent comes a power of two ``c`` (a normal
number) with ``max |c x|`` in [0.5, 4); ``y = c x`` is exact, ``s = sum y^2`` can neither overflow
nor underflow, and ``x^2 / ||x||^2 = y^2 * (1 / s)`` with one IEEE-rounded reciprocal per row
(``tl.math.div_rn``: a plain ``/`` compiles to the approximate ``div.full.f32`` on the GPU). The
per-element path has no division at all, so no approximate division is kept anywhere for speed;
the compiled PTX is checked for it (tests/test_triton.py). The per-element result,
``(y * y) * (1 / s)``, is two roundings from the exact ratio instead of the reference's one, well
within the float32 statistic's own error. A row counts iff its maximum magnitude is positive and
finite, which for 16- and 32-bit inputs is exactly the reference's "squared norm (float64) > 0 and
finite" (for float64 inputs the reference's float64 squared norm itself overflows beyond ~1e154
and underflows below ~1e-162; the kernel counts such finite nonzero rows, as the exact rule says).

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

import contextlib

import torch
import triton
import triton.language as tl

# Widest row held in registers as one block; wider rows are walked in chunks of WIDE_BLOCK_COLS.
MAX_BLOCK_COLS = 8192
WIDE_BLOCK_COLS = 2048
# Elements of one [BLOCK_R, BLOCK_C] tile (fp32 registers: 32 KiB per program).
TILE_ELEMENTS = 8192
# Grid: at most PROGRAMS_PER_SM programs per streaming multiprocessor on CUDA, and at least
# MIN_ROWS_PER_PROGRAM rows each: a program's workspace row (4 bytes a column, written once and read
# once) then costs at most a quarter of what it reads of a float16 x (16 rows x 2 bytes a column).
# Not measured on a GPU yet. Under the interpreter: up to INTERPRETER_PROGRAMS programs, any rows each.
PROGRAMS_PER_SM = 4
MIN_ROWS_PER_PROGRAM = 16
INTERPRETER_PROGRAMS = 4
# Columns per program of the kernel that adds the workspace into acc.
REDUCE_BLOCK = 1024

_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# bit patterns of +inf: a magnitude's bits at or above it mean inf or NaN
_INF_BITS32 = tl.constexpr(0x7F800000)
_INF_BITS64 = tl.constexpr(0x7FF0000000000000)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device for a launch (Triton compiles for, and launches on, the
    current device and its current stream); nothing to do on the CPU (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


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


@triton.jit
def row_norm(x, r_mask):
    """Per row of a [BLOCK_R, BLOCK_C] tile holding whole rows: (c, inv_s), the row's power-of-two scale
    and 1 / sum (c x)^2; inv_s = 0 for rows outside r_mask, zero rows and rows with inf/NaN."""
    mbits = tl.max(_magnitude_bits(x), axis=1)
    c = _pow2_scale(mbits)
    y = x * c[:, None]
    return c, _inverse_norm(tl.sum(y * y, axis=1), r_mask & _counted(mbits))


@triton.jit
def running_norm(mbits, s, x):
    """Fold a [BLOCK_R, BLOCK_C] chunk x of rows into their running (mbits, s): the bits of the largest
    magnitude so far and s = sum (c x)^2 for the scale c of mbits. Start from (0, 0)."""
    new_bits = tl.maximum(mbits, tl.max(_magnitude_bits(x), axis=1))
    c = _pow2_scale(new_bits)
    ratio = div_rn(c, _pow2_scale(mbits))  # a power of two (or its underflow): exact
    y = x * c[:, None]
    return new_bits, s * ratio * ratio + tl.sum(y * y, axis=1)


@triton.jit
def finish_norm(mbits, s, r_mask):
    """(c, inv_s) of rows from their final running (mbits, s), as :func:`row_norm` gives them."""
    return _pow2_scale(mbits), _inverse_norm(s, r_mask & _counted(mbits))


@triton.jit
def normalized_squares(x, c, inv_s):
    """x^2 / ||x||^2 per element of a tile from its rows' (c, inv_s); exactly 0 in rows not counted
    (whose x may be inf or NaN)."""
    y = x * c[:, None]
    return tl.where(inv_s[:, None] > 0.0, y * y * inv_s[:, None], 0.0)


@triton.jit
def _sqnorm_tiles_kernel(
    x_ptr,
    ws_ptr,
    row_start,
    row_end,
    cols,
    stride_row,
    TOKEN_NORM: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows of at most BLOCK_C columns: program p writes its column sums to ws[p, :cols]."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(row_end - row_start, BLOCK_R)
    r_off = tl.arange(0, BLOCK_R)
    c_off = tl.arange(0, BLOCK_C)
    c_mask = c_off < cols
    partial = tl.zeros([BLOCK_C], dtype=tl.float64)
    for tile in range(pid, n_tiles, nprog):
        rows = row_start + tile * BLOCK_R + r_off
        r_mask = rows < row_end
        ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_row + c_off[None, :]
        x = upcast(tl.load(ptrs, mask=r_mask[:, None] & c_mask[None, :], other=0.0))
        if TOKEN_NORM:
            c, inv_s = row_norm(x, r_mask)
            sq = normalized_squares(x, c, inv_s)
        else:
            sq = x * x
        partial += tl.sum(sq, axis=0).to(tl.float64)
    tl.store(ws_ptr + pid.to(tl.int64) * cols + c_off, partial.to(COMPUTE), mask=c_mask)


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
    """Wide rows, token_norm, first pass: (c, inv_s) of row row_start + i in norm[0, i], norm[1, i]."""
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
        c, inv_s = finish_norm(mbits, s, r_mask)
        tl.store(norm_ptr + i, c, mask=r_mask)
        tl.store(norm_ptr + n + i, inv_s, mask=r_mask)


@triton.jit
def _chunk_partials_kernel(
    x_ptr,
    norm_ptr,
    ws_ptr,
    row_start,
    row_end,
    cols,
    stride_row,
    TOKEN_NORM: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Wide rows: program (p, q) writes the sums over its tiles of columns [q BLOCK_C, (q + 1) BLOCK_C)
    to ws[p, those columns], normalizing with the (c, inv_s) of the first pass if TOKEN_NORM."""
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
            c = tl.load(norm_ptr + i, mask=r_mask, other=1.0)
            inv_s = tl.load(norm_ptr + n + i, mask=r_mask, other=0.0)
            sq = normalized_squares(x, c, inv_s)
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


def blocks(rows: int, cols: int, max_block_cols: int) -> tuple[bool, int, int]:
    """(chunked, BLOCK_R, BLOCK_C) for a [rows, cols] problem."""
    chunked = cols > max_block_cols
    block_c = min(WIDE_BLOCK_COLS, max_block_cols) if chunked else triton.next_power_of_2(cols)
    block_r = max(1, min(TILE_ELEMENTS // block_c, triton.next_power_of_2(max(rows, 1))))
    return chunked, block_r, block_c


def num_warps(block_r: int, block_c: int) -> int:
    """32 warps for a full tile (8 elements a thread): compiled for sm_90, every statistics kernel then
    needs at most 64 registers a thread, so one program of 1024 threads fits an SM's register file.
    (With 16 warps the float64 partial sums of an 8192-column tile took 110 registers.)"""
    return max(4, min(32, (block_r * block_c) // 256))


def programs(device: torch.device, rows: int, block_r: int) -> int:
    """Programs for ``rows`` rows in tiles of ``block_r``: a function of the shape and the device only."""
    tiles = triton.cdiv(rows, block_r)
    if device.type == "cuda":
        cap = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
        tiles_each = triton.cdiv(MIN_ROWS_PER_PROGRAM, block_r)
    else:
        cap, tiles_each = INTERPRETER_PROGRAMS, 1
    return max(1, min(cap, triton.cdiv(tiles, tiles_each)))


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


def wide_partials(
    x2d: torch.Tensor, norm: torch.Tensor | None, row_start: int, row_end: int, compute, block_r: int, block_c: int
) -> torch.Tensor:
    """The workspace of ``_chunk_partials_kernel`` for rows [row_start, row_end) of x2d (inside the guard);
    ``norm`` holds the rows' (c, inv_s) with token_norm, None without."""
    rows, cols = row_end - row_start, x2d.shape[1]
    chunks = triton.cdiv(cols, block_c)
    n_programs = max(1, programs(x2d.device, rows, block_r) // chunks)
    ws = workspace(n_programs, cols, compute, x2d.device)
    _chunk_partials_kernel[(n_programs, chunks)](
        x2d,
        x2d if norm is None else norm,  # a dummy pointer without token_norm
        ws,
        row_start,
        row_end,
        cols,
        x2d.stride(0),
        TOKEN_NORM=norm is not None,
        COMPUTE=compute,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps(block_r, block_c),
    )
    return ws


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
    compute = compute_dtype(x2d.dtype)
    chunked, block_r, block_c = blocks(n, cols, max_block_cols)
    warps = num_warps(block_r, block_c)
    with device_guard(x2d.device):
        if not chunked:
            n_programs = programs(x2d.device, n, block_r)
            ws = workspace(n_programs, cols, compute, x2d.device)
            _sqnorm_tiles_kernel[(n_programs,)](
                x2d,
                ws,
                row_start,
                row_end,
                cols,
                x2d.stride(0),
                TOKEN_NORM=bool(token_norm),
                COMPUTE=compute,
                BLOCK_R=block_r,
                BLOCK_C=block_c,
                num_warps=warps,
            )
        else:
            norm = None
            if token_norm:
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
                    num_warps=warps,
                )
            ws = wide_partials(x2d, norm, row_start, row_end, compute, block_r, block_c)
        add_partials(ws, acc)
