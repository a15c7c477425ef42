"""sqnorm_accumulate: per-feature sum of squared (row-normalized) activations.

For an input X viewed as a matrix of rows (every leading dimension flattened, features last) and a
range of rows [row_start, row_end), it adds to a float32 accumulator ``acc[j]``::

    acc[j] += sum_r xhat[r, j]^2,   xhat[r] = X[r] / ||X[r]||_2   (token_norm=True)
    acc[j] += sum_r X[r, j]^2                                       (token_norm=False)

This is the statistic of docs/method.md section 2 (``norm = sqrt(acc)`` is Wanda's activation norm), and it is
what other pruning code needs for Wanda on any Linear: feed it the Linear's input.

With ``token_norm``, a row whose squared norm ``sum_j X[r, j]^2`` (exact, i.e. float64 for 16- and
32-bit inputs) is 0 or not finite (the row holds an inf or a NaN) contributes nothing: it has no
direction to count. Every backend follows this rule, and no backend overflows on large finite rows.
Without ``token_norm`` the squares are added as they are.

Backends: ``reference`` (float64 PyTorch, any device), ``cpu`` (C++/OpenMP, float64 accumulation
within a call), ``cuda`` (CUDA kernels on the caller's stream, float64 accumulation, the same result
from run to run).
"""

from __future__ import annotations

import torch

from memcore.ops import _backend
from memcore.ops._common import NATIVE_DTYPES, check_accumulator, check_float_dtype, rows_2d
from memcore.ops._ext import launch

OP_NAME = "memcore::sqnorm_accumulate"

def sqnorm_accumulate_reference(
    x: torch.Tensor, acc: torch.Tensor, row_start: int = 0, row_end: int | None = None, token_norm: bool = True
) -> None:
    """The definition of the op, in float64: adds the statistic of rows [row_start, row_end) to acc."""
    rows = x.reshape(-1, x.shape[-1])[row_start:row_end].to(torch.float64)
    sq = rows.square()
    if token_norm:
        total = sq.sum(dim=1, keepdim=True)
        counted = (total > 0) & torch.isfinite(total)
        sq = torch.where(counted, sq / total, torch.zeros((), dtype=sq.dtype, device=sq.device))
    acc += sq.sum(dim=0).to(torch.float32)


def _native(x: torch.Tensor, acc: torch.Tensor, row_start: int, row_end: int, token_norm: bool) -> None:
    x2 = rows_2d(x)
    dtype, rows, cols = NATIVE_DTYPES[x2.dtype], x2.shape[0], x2.shape[1]
    args = (x2.data_ptr(), dtype, rows, cols, row_start, row_end, acc.data_ptr(), token_norm)
    # on CUDA, per-block partial sums go to a workspace, added in a fixed order
    launch("sqnorm_accumulate", x2.device, *args, workspace=(dtype, rows, cols, row_start, row_end, token_norm))


def _triton(x: torch.Tensor, acc: torch.Tensor, row_start: int, row_end: int, token_norm: bool) -> None:
    from memcore._kernels.sqnorm_accumulate import sqnorm_accumulate_triton

    sqnorm_accumulate_triton(rows_2d(x), acc, row_start, row_end, token_norm)


_backend.register("sqnorm_accumulate", reference=sqnorm_accumulate_reference, triton=_triton, native=_native)


def _validate(x: torch.Tensor, acc: torch.Tensor, row_start: int, row_end: int | None) -> int:
    check_float_dtype("sqnorm_accumulate", "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"sqnorm_accumulate: x must have a non-empty last (feature) dimension, got shape {tuple(x.shape)}")
    return check_accumulator("sqnorm_accumulate", "x", x, acc, x.shape[-1], row_start, row_end, "")


@torch.library.custom_op(OP_NAME, mutates_args=("acc",))
def sqnorm_accumulate(
    x: torch.Tensor, acc: torch.Tensor, row_start: int = 0, row_end: int | None = None, token_norm: bool = True
) -> None:
    """Add the (row-normalized) column sums of squares of rows [row_start, row_end) of x into acc.

    Args:
        x: activations, any leading shape, features last (float16, bfloat16, float32 or float64).
        acc: float32 accumulator of shape [features] on x's device, updated in place.
        row_start, row_end: the rows of x viewed as [-1, features] to use (default: all).
        token_norm: L2-normalize each row over features before squaring (docs/method.md section 2).
    """
    end = _validate(x, acc, row_start, row_end)
    if end == row_start:
        return
    _, impl = _backend.dispatch("sqnorm_accumulate", x.device)
    impl(x, acc, row_start, end, token_norm)


@sqnorm_accumulate.register_fake
def _(x, acc, row_start=0, row_end=None, token_norm=True) -> None:
    _validate(x, acc, row_start, row_end)  # metadata only: a traced call fails as an eager one would
