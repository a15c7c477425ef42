"""prune_mask: the front door for pruning code. Which weights of a Linear to remove, as a boolean
mask shaped like the weight, from the weight and its input's column norms (Wanda: Sun et al., *A
Simple and Effective Pruning Approach for Large Language Models*, ICLR 2024)::

    score[r, j] = |W[r, j]| * norm[j]                (float32)
    unstructured:  per row r, the k = floor(sparsity * in) lowest scores   (largest=True: highest)
    n:m:           per row r and every m consecutive columns, the n lowest scores (Wanda's 2:4, 4:8)
    ties: the lower column index is chosen first

``norm[j]`` is the l2 norm of input feature j over the calibration tokens; a mean or a sum of
squares (Wanda's ``scaler_row`` is the mean) ranks the same once its square root is taken, which
``squared=True`` does. With several rows of statistics ``[T, in]`` (one per call index, as memcore
collects them), the mask is the union over t.

It runs on :func:`memcore.ops.wanda_mask` and so on every backend that op has (C++ on the CPU,
CUDA, Triton, the PyTorch reference), with the same exact masks. An n:m mask is that op over
rows of m scores: the scores are formed once in float32 and passed as the weight, with unit norms
(``|s| * 1.0 == s`` exactly), so the n:m mask is exact on every backend too.
"""

from __future__ import annotations

import math
import numbers
from decimal import Decimal

import torch

from memcore.ops.wanda_mask import unpack_mask, wanda_mask


def prune_mask(
    weight: torch.Tensor,
    norms: torch.Tensor,
    sparsity: float | None = None,
    *,
    n: int = 0,
    m: int = 0,
    largest: bool = False,
    squared: bool = False,
) -> torch.Tensor:
    """The weights to prune, ``bool[out, in]`` on ``weight``'s device (``weight[mask] = 0`` prunes them).

    Args:
        weight: ``W[out, in]`` of a Linear, any floating dtype.
        norms: the input's column norms ``[in]`` (or ``[T, in]``: the union over T), any floating dtype.
        sparsity: the fraction of each row to prune, in [0, 1]; k = floor(sparsity * in) columns per
            row, with the sparsity read as the decimal it was written as (0.29 * 100 = 29). Not with
            ``n``/``m``.
        n, m: an n:m mask instead: n of every m consecutive weights per row (``in`` a multiple of m).
        largest: choose the highest scores instead of the lowest (memcore's memorized neurons).
        squared: ``norms`` are squared norms (Wanda's ``scaler_row``); their square root is used.

    Raises:
        ValueError: naming the argument at fault.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"prune_mask: weight must be a 2-D floating tensor, got {_describe(weight)}")
    out, in_features = weight.shape
    if not isinstance(norms, torch.Tensor) or not norms.is_floating_point() or norms.dim() not in (1, 2):
        raise ValueError(f"prune_mask: norms must be a floating tensor of shape [in] or [T, in], got {_describe(norms)}")
    if norms.shape[-1] != in_features or (norms.dim() == 2 and norms.shape[0] < 1):
        raise ValueError(f"prune_mask: norms must have {in_features} (in_features) columns, got shape {tuple(norms.shape)}")
    if norms.device != weight.device:
        raise ValueError(f"prune_mask: norms is on {norms.device} but weight is on {weight.device}")
    norms = norms.reshape(-1, in_features).to(torch.float32)
    # column norms are >= 0; a negative one would rank |W| x norm differently in the two modes
    if bool((norms < 0).any()):
        raise ValueError(f"prune_mask: {'squared ' if squared else ''}norms must not be negative")
    if squared:
        norms = norms.sqrt()
    structured = n != 0 or m != 0
    if structured:
        if sparsity is not None:
            raise ValueError("prune_mask: give either sparsity or n and m, not both")
        for name, value in (("n", n), ("m", m)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"prune_mask: {name} must be an integer, got {value!r}")
        if not 0 < n <= m:
            raise ValueError(f"prune_mask: n:m must have 0 < n <= m, got {n}:{m}")
        if in_features % m:
            raise ValueError(f"prune_mask: m={m} must divide in_features={in_features}")
        return _n_m(weight, norms, int(n), int(m), largest)
    if sparsity is None:
        raise ValueError("prune_mask: give sparsity (a fraction of each row) or n and m")
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= sparsity <= 1:
        raise ValueError(f"prune_mask: sparsity must be a number in [0, 1], got {sparsity!r}")
    k = math.floor(Decimal(repr(float(sparsity))) * in_features)
    packed = wanda_mask(weight, norms.contiguous(), None, k, largest)
    return unpack_mask(packed, in_features)


def _n_m(weight: torch.Tensor, norms: torch.Tensor, n: int, m: int, largest: bool) -> torch.Tensor:
    out, in_features = weight.shape
    abs_w = weight.to(torch.float32).abs()
    ones = torch.ones((1, m), dtype=torch.float32, device=weight.device)
    mask = torch.zeros((out, in_features), dtype=torch.bool, device=weight.device)
    for row in norms:  # the union over T
        scores = (abs_w * row).reshape(-1, m)
        mask |= unpack_mask(wanda_mask(scores, ones, None, n, largest), m).reshape(out, in_features)
    return mask


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} of shape {tuple(x.shape)}"
    return type(x).__name__
