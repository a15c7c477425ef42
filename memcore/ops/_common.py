"""Helpers shared by memcore's ops (private): the dtypes the native kernels take, the row view of
an activation, and the argument checks of the statistics ops. Each op's own module holds its
reference, its registration in the backend table and its validation; what two ops share lives here.
"""

from __future__ import annotations

import torch

# dtype names understood by the native kernels (memcore._C)
NATIVE_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def check_float_dtype(op: str, name: str, x: torch.Tensor) -> None:
    """``x`` must have a dtype every backend takes (float16, bfloat16, float32 or float64)."""
    if x.dtype not in NATIVE_DTYPES:
        raise ValueError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous ``[rows, features]`` matrix (every leading dimension flattened)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


def check_accumulator(
    op: str, name: str, x: torch.Tensor, acc: torch.Tensor, features: int, row_start: int, row_end: int | None, note: str
) -> int:
    """The accumulator and row-range checks of the statistics ops; returns the resolved row_end.

    ``x`` (called ``name`` in messages) has rows of ``x.shape[-1]`` elements and ``features`` statistics.
    """
    if acc.dtype != torch.float32 or acc.dim() != 1 or acc.shape[0] != features:
        raise ValueError(
            f"{op}: acc must be a float32 vector of {features} features{note}, "
            f"got {acc.dtype} of shape {tuple(acc.shape)}"
        )
    if not acc.is_contiguous():
        raise ValueError(f"{op}: acc must be contiguous")
    if acc.device != x.device:
        raise ValueError(f"{op}: acc is on {acc.device} but {name} is on {x.device}")
    rows = x.numel() // x.shape[-1]
    end = rows if row_end is None else row_end
    if not 0 <= row_start <= end <= rows:
        raise ValueError(f"{op}: row range [{row_start}, {row_end}) does not fit {rows} rows")
    return end
