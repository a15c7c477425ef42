"""Launch heuristics of memcore's Triton kernels (private): block shapes, warps and program counts,
and the guard that makes a tensor's device the current one. Shared by every kernel module; the
numbers are said here once.
"""

from __future__ import annotations

import contextlib

import torch
import triton

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
# The mask kernel: elements of one [ROWS, BLOCK] block; rows narrower than this share a program.
MASK_TILE_ELEMENTS = 4096
# bits per packed mask byte: a mask row is padded to at least one byte
MASK_BITS = 8


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device for a launch (Triton compiles for, and launches on, the
    current device and its current stream); nothing to do on the CPU (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


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


def mask_blocks(out_features: int, in_features: int) -> tuple[int, int]:
    """(ROWS, BLOCK) of the mask kernel: a row padded to a power of two >= 8 columns, rows per program
    up to MASK_TILE_ELEMENTS."""
    block = max(MASK_BITS, triton.next_power_of_2(in_features))
    rows = max(1, min(MASK_TILE_ELEMENTS // block, triton.next_power_of_2(max(out_features, 1))))
    return rows, block


def mask_num_warps(rows: int, block: int) -> int:
    """One warp per 256 elements of the block (8 a thread), 16 at the most."""
    return max(1, min(16, rows * block // 256))


# The mask kernel's candidate filter: groups of MASK_GROUP columns, and room for up to
# MASK_CANDIDATES_PER_K x k candidates a row (a power of two, at most a quarter of the row).
MASK_GROUP = 32
MASK_CANDIDATES_PER_K = 4
MIN_MASK_CAP = 64


def mask_filter(block: int, k: int) -> tuple[int, int]:
    """(GROUPS, CAP) of the mask kernel's candidate filter for rows of ``block`` columns, or (0, 0)
    where it does not pay: k beyond the number of groups, or no fewer slots than a quarter row."""
    groups = block // MASK_GROUP
    if k < 1 or k > groups:
        return 0, 0
    cap = max(MIN_MASK_CAP, triton.next_power_of_2(MASK_CANDIDATES_PER_K * k))
    if cap > block // 4:
        return 0, 0
    return groups, cap
