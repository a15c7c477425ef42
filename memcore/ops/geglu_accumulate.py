"""geglu_accumulate: diffusers' GEGLU activation fused with the statistic of its output.

For the output P of a GEGLU's projection (``ff.net.0.proj``; any leading shape, last dim ``2 i``)::

    h, g = P.chunk(2, -1)                 (h = P[..., :i], g = P[..., i:])
    X    = h * gelu(g)                    (exact erf gelu, in P's dtype, as diffusers' GEGLU computes it)
    acc[j] += sum over rows r in [row_start, row_end) of xhat[r, j]^2   (see sqnorm_accumulate)

and returns X (shape ``P.shape[:-1] + (i,)``, P's dtype). X is the input of ``ff.net.2``, the layer
memcore prunes (docs/method.md section 1), so one fused pass produces both the activation the model needs and
the statistic of docs/method.md section 2 while X is in registers: no extra read of X (docs/method.md section 6).

The statistic is that of X as returned, i.e. of the rounded output rows, so
``geglu_accumulate(P, acc)`` adds exactly what ``sqnorm_accumulate(X, acc)`` would add.

Backends: ``reference`` (PyTorch: diffusers' expression, then the float64 statistic), ``cpu``
(C++/OpenMP) and ``cuda`` (CUDA kernel on the caller's stream) when the extension has them,
``triton`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memcore.ops import _backend
from memcore.ops._common import NATIVE_DTYPES, check_accumulator, check_float_dtype, rows_2d
from memcore.ops._ext import launch
from memcore.ops.sqnorm_accumulate import sqnorm_accumulate_reference

OP_NAME = "memcore::geglu_accumulate"


def geglu_accumulate_reference(
    proj_out: torch.Tensor, acc: torch.Tensor, row_start: int = 0, row_end: int | None = None, token_norm: bool = True
) -> torch.Tensor:
    """The definition of the op: diffusers' GEGLU in P's dtype, then the float64 statistic of X."""
    hidden_states, gate = proj_out.chunk(2, dim=-1)
    x = hidden_states * F.gelu(gate)
    sqnorm_accumulate_reference(x, acc, row_start, row_end, token_norm)
    return x


def _native(p: torch.Tensor, acc: torch.Tensor, row_start: int, row_end: int, token_norm: bool) -> torch.Tensor:
    p2 = rows_2d(p)
    rows, inner, dtype = p2.shape[0], p2.shape[1] // 2, NATIVE_DTYPES[p2.dtype]
    out = torch.empty((rows, inner), dtype=p2.dtype, device=p2.device)
    args = (p2.data_ptr(), dtype, rows, inner, row_start, row_end, acc.data_ptr(), out.data_ptr(), token_norm)
    # on CUDA, per-block partial sums go to a workspace, added in a fixed order
    launch("geglu_accumulate", p2.device, *args, workspace=(dtype, rows, inner, row_start, row_end, token_norm))
    return out


def _triton(p: torch.Tensor, acc: torch.Tensor, row_start: int, row_end: int, token_norm: bool) -> torch.Tensor:
    from memcore._kernels.geglu_accumulate import geglu_accumulate_triton

    return geglu_accumulate_triton(rows_2d(p), acc, row_start, row_end, token_norm)


_backend.register("geglu_accumulate", reference=geglu_accumulate_reference, triton=_triton, native=_native)


def geglu_accumulate_backend(device: torch.device) -> str:
    """The backend :func:`geglu_accumulate` runs on for tensors on ``device``, forcing included."""
    return _backend.chosen_backend("geglu_accumulate", device)


def _validate(proj_out: torch.Tensor, acc: torch.Tensor, row_start: int, row_end: int | None) -> int:
    """Dtype, shape, device and row-range checks (metadata only, shared with the fake); returns row_end."""
    check_float_dtype("geglu_accumulate", "proj_out", proj_out)
    if proj_out.dim() < 1 or proj_out.shape[-1] == 0 or proj_out.shape[-1] % 2 != 0:
        raise ValueError(
            "geglu_accumulate: proj_out must have a non-empty, even last dimension (2 * inner), "
            f"got shape {tuple(proj_out.shape)}"
        )
    inner = proj_out.shape[-1] // 2
    note = " (half of proj_out's last dim)"
    return check_accumulator("geglu_accumulate", "proj_out", proj_out, acc, inner, row_start, row_end, note)


def _out_shape(proj_out: torch.Tensor) -> tuple[int, ...]:
    return (*proj_out.shape[:-1], proj_out.shape[-1] // 2)


@torch.library.custom_op(OP_NAME, mutates_args=("acc",))
def geglu_accumulate(
    proj_out: torch.Tensor,
    acc: torch.Tensor,
    row_start: int = 0,
    row_end: int | None = None,
    token_norm: bool = True,
) -> torch.Tensor:
    """GEGLU of ``proj_out`` (``h * gelu(g)``), adding the statistic of its rows [row_start, row_end) to acc.

    Args:
        proj_out: P, the GEGLU projection's output, any leading shape, last dim ``2 * inner``
            (float16, bfloat16, float32 or float64).
        acc: float32 accumulator of shape [inner] on P's device, updated in place.
        row_start, row_end: the rows of X viewed as [-1, inner] whose statistic is added (default:
            all); X is computed for every row.
        token_norm: L2-normalize each row of X over features before squaring (docs/method.md section 2).

    Returns:
        X, of shape ``proj_out.shape[:-1] + (inner,)`` in P's dtype.
    """
    end = _validate(proj_out, acc, row_start, row_end)
    shape = _out_shape(proj_out)
    if proj_out.numel() == 0:
        return proj_out.new_empty(shape)
    _, impl = _backend.dispatch("geglu_accumulate", proj_out.device)
    return impl(proj_out, acc, row_start, end, token_norm).reshape(shape)


@geglu_accumulate.register_fake
def _(proj_out, acc, row_start=0, row_end=None, token_norm=True):
    _validate(proj_out, acc, row_start, row_end)
    return proj_out.new_empty(_out_shape(proj_out))
