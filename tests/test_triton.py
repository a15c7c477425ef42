"""The Triton backends against their references: on CUDA when there is one, else on the CPU under
Triton's interpreter.

The interpreter must be switched on (``TRITON_INTERPRET=1``) before triton is first imported
anywhere in the process, because triton's own library functions (``tl.sum``...) are decorated at
import: hence the first lines of this file. If something imported triton earlier (diffusers does,
so any test module collected before this one that imports diffusers), it is too late, and the
module is skipped with that reason; set ``TRITON_INTERPRET=1`` in the environment or first thing in
tests/conftest.py on CPU-only machines. The variable stays set for the rest of the session, which
only makes ``triton`` one more backend the CPU may be forced onto. The interpreter is slow, so
shapes are small, with a few SD widths on a handful of rows.

Masks compare byte for byte; statistics within a small multiple of plain PyTorch's own float32
error against the float64 reference; GEGLU outputs within 2x eager PyTorch's own error.

What the interpreter cannot show (the GPU's rounding of division, shared memory, atomics) is checked
on the code the GPU would run: the kernels are compiled for sm_90 here, without a GPU (Triton ships
ptxas), in a subprocess without the interpreter, and their PTX and metadata are read. Tests marked
``needs_cuda`` run the kernels on a GPU (odd widths, every dtype, run-to-run determinism).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any import of triton (torch does not import it)

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
if DEVICE.type == "cpu":
    import triton.language as tl  # noqa: E402
    from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

    if not isinstance(tl.sum, InterpretedFunction):
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 was set, so its interpreter cannot run; "
            "set TRITON_INTERPRET=1 in the environment (or first thing in tests/conftest.py)",
            allow_module_level=True,
        )

from memcore.ops import geglu_accumulate, sqnorm_accumulate, use_backend, wanda_mask  # noqa: E402
from memcore.ops.geglu_accumulate import geglu_accumulate_reference  # noqa: E402
from memcore.ops.sqnorm_accumulate import sqnorm_accumulate_reference  # noqa: E402
from memcore.ops.wanda_mask import nonfinite_flags, unpack_mask, wanda_mask_reference  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INF, NAN = float("inf"), float("nan")
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")

# --- helpers ----------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _statistic(x, acc0, row_start, row_end, token_norm, dtype) -> torch.Tensor:
    """The statistic computed plainly in ``dtype``: a row counts (token_norm) iff its sum of squares
    is positive and finite in that dtype."""
    rows = x.reshape(-1, x.shape[-1])[row_start:row_end].to(dtype)
    sq = rows.square()
    if token_norm:
        total = sq.sum(dim=1, keepdim=True)
        counted = (total > 0) & torch.isfinite(total)
        sq = torch.where(counted, sq / total, torch.zeros((), dtype=dtype))
    return acc0.to(dtype) + sq.sum(dim=0)


def _plain_statistic(x: torch.Tensor, acc0: torch.Tensor, row_start: int, row_end: int | None, token_norm: bool):
    """What plain float32 PyTorch computes for the statistic (the error yardstick)."""
    return _statistic(x, acc0, row_start, row_end, token_norm, torch.float32)


def _reference64(x, acc0, row_start, row_end, token_norm) -> torch.Tensor:
    return _statistic(x, acc0, row_start, row_end, token_norm, torch.float64)


def assert_statistic_close(got, x, acc0, row_start=0, row_end=None, token_norm=True):
    """|got - fp64| <= 2 |plain fp32 torch - fp64| + 4 ulp: a fast path no worse than eager PyTorch."""
    want = _reference64(x, acc0, row_start, row_end, token_norm)
    plain = _plain_statistic(x, acc0, row_start, row_end, token_norm).double()
    err = (got.double() - want).abs()
    bound = 2 * (plain - want).abs() + 4 * EPS32 * want.abs() + 1e-30
    bad = torch.nonzero(err > bound).flatten()
    assert bad.numel() == 0, (
        f"{bad.numel()} of {got.numel()} columns beyond the bound; first {bad[:5].tolist()}: "
        f"got {got[bad[:5]].tolist()}, want {want[bad[:5]].tolist()}, bound {bound[bad[:5]].tolist()}"
    )


def assert_mask_equal(got: torch.Tensor, want: torch.Tensor, in_features: int) -> None:
    assert got.dtype == torch.uint8 and got.shape == want.shape, (got.dtype, tuple(got.shape), tuple(want.shape))
    diff = torch.nonzero(unpack_mask(got, in_features) != unpack_mask(want, in_features))
    assert diff.numel() == 0, f"{len(diff)} mask bits differ, first (row, col): {diff[:10].tolist()}"
    assert torch.equal(got, want), "packed bytes differ (padding bits?)"


# --- wanda_mask -------------------------------------------------------------------------------


def _mask_inputs(out: int, cols: int, t: int, seed: int, dtype=torch.float32):
    """Half the rows random with zeros (and -0.0), half small integers (many tied scores); norms on a
    coarse grid so that S_mem == S_null and equal scores across columns occur."""
    gen = _gen(seed)
    weight = torch.randn(out, cols, generator=gen)
    weight[torch.rand(out, cols, generator=gen) < 0.15] = 0.0
    weight[torch.rand(out, cols, generator=gen) < 0.05] = -0.0
    weight[out // 2 :] = torch.randint(-2, 3, (out - out // 2, cols), generator=gen).float()
    norms = torch.randint(0, 5, (t, cols), generator=gen).float() * 0.5
    null = torch.randint(0, 5, (t, cols), generator=gen).float() * 0.5
    return weight.to(dtype), norms, null


def _on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def _check_mask(weight, norms, null, k, largest):
    with use_backend("triton"):
        got = wanda_mask(*_on_device(weight, norms, null), k, largest).cpu()
    assert_mask_equal(got, wanda_mask_reference(weight, norms, null, k, largest), weight.shape[1])


@pytest.mark.parametrize("with_null", [True, False], ids=["null", "no-null"])
@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("cols", [1, 7, 13, 33, 100])
def test_wanda_mask_exact(cols, t, largest, with_null):
    weight, norms, null = _mask_inputs(6, cols, t, seed=cols * 10 + t)
    for k in sorted({0, 1, max(1, cols // 3), cols}):
        _check_mask(weight, norms, null if with_null else None, k, largest)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
def test_wanda_mask_special_values(largest):
    # signed zeros, negative norms (negative scores), a subnormal and an overflowing product
    weight = torch.tensor([[0.0, -0.0, 1.0, -1.0, 2.0, 0.0, -3.0, 0.5, 1e-45, 3e38, -2.0, 1.0]])
    norms = torch.tensor([[-1.0, 1.0, -2.0, 0.0, 1.0, -0.0, -1.0, 2.0, 1.0, 10.0, 1.0, 0.5]])
    null = torch.tensor([[1.0, -1.0, -2.0, 0.0, 0.5, 0.0, -2.0, 2.0, 0.0, 10.0, 0.0, 0.5]])
    for k in range(weight.shape[1] + 1):
        for n in (None, null):
            _check_mask(weight, norms, n, k, largest)


def test_wanda_mask_all_zero_and_all_tied():
    for weight in (torch.zeros(3, 20), torch.ones(3, 20)):
        norms = torch.ones(2, 20)
        for k in (1, 5, 20):
            for largest in (True, False):
                _check_mask(weight, norms, None, k, largest)
                _check_mask(weight, norms, torch.zeros(2, 20), k, largest)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_wanda_mask_weight_dtypes(dtype):
    weight, norms, null = _mask_inputs(5, 37, 2, seed=3, dtype=dtype)
    _check_mask(weight, norms, null, 9, True)
    _check_mask(weight.t().contiguous().t(), norms, null, 9, False)  # column-major weight


@pytest.mark.parametrize("out,cols,k", [(3, 1280, 12), (2, 5120, 51)], ids=["1280", "5120"])
def test_wanda_mask_sd_widths(out, cols, k):
    gen = _gen(cols)
    weight = torch.randn(out, cols, generator=gen).half()
    norms = torch.rand(2, cols, generator=gen) * 4
    null = torch.rand(2, cols, generator=gen) * 4
    _check_mask(weight, norms, null, k, True)


def _wanda_triton(weight, norms, null, k, largest=True):
    from memcore._kernels.wanda_mask import wanda_mask_triton

    mask, flags = wanda_mask_triton(*_on_device(weight, norms, null), k, largest)
    assert flags.dtype == torch.int32 and flags.shape == (1,) and flags.device == weight.to(DEVICE).device
    return mask.cpu(), flags.cpu()


def _with_bad_weights(weight: torch.Tensor) -> list[torch.Tensor]:
    """Copies of weight with one NaN, inf or -inf: first row and column, last ones, the middle."""
    out = []
    for where, value in (((0, 0), NAN), ((-1, -1), INF), ((2, 9), -INF)):
        bad = weight.clone()
        bad[where] = value
        out.append(bad)
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter, on NaN and inf
def test_wanda_mask_flags_set_by_the_kernel():
    """The flag word says which inputs hold NaN or inf, as nonfinite_flags computes it, wherever the
    bad value sits, with or without null norms, for k = 0 too."""
    weight, norms, null = _mask_inputs(5, 19, 2, seed=7)
    _, flags = _wanda_triton(weight, norms, null, 4)
    assert flags.item() == 0
    bad_weights = _with_bad_weights(weight)
    bad_norms, bad_null = norms.clone(), null.clone()
    bad_norms[1, 18] = NAN
    bad_null[0, 0] = INF
    cases = [(w, norms, null) for w in bad_weights]
    cases += [(weight, bad_norms, null), (weight, norms, bad_null), (bad_weights[0], bad_norms, bad_null)]
    seen = set()
    for w, n, nn in cases:
        for k, with_null in ((4, True), (0, True), (19, False)):
            nn_k = nn if with_null else None
            _, flags = _wanda_triton(w, n, nn_k, k)
            want = nonfinite_flags(w, n, nn_k).item()
            assert flags.item() == want, (k, with_null, flags.item(), want)
            seen.add(want)
    assert seen == {0, 1, 2, 4, 1 | 2, 1 | 2 | 4}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_wanda_mask_flags_weight_dtypes(dtype):
    weight, norms, null = _mask_inputs(5, 19, 1, seed=8, dtype=dtype)
    assert _wanda_triton(weight, norms, null, 4)[1].item() == 0
    for bad in _with_bad_weights(weight):
        assert _wanda_triton(bad, norms, null, 4)[1].item() == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_wanda_mask_flags_edge_shapes():
    # no rows: the norms are still checked; a float64 weight beyond float32's range is finite
    norms = torch.ones(1, 6)
    norms[0, 3] = NAN
    mask, flags = _wanda_triton(torch.zeros(0, 6), norms, torch.full((1, 6), INF), 2)
    assert mask.shape == (0, 1) and flags.item() == 2 | 4
    weight = torch.tensor([[1e300, -2.0, 1e-300, 3.0]], dtype=torch.float64)
    norms = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    mask, flags = _wanda_triton(weight, norms, None, 2)
    assert flags.item() == 0
    assert_mask_equal(mask, wanda_mask_reference(weight, norms, None, 2), 4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_wanda_mask_op_raises_on_kernel_flags():
    weight, norms, null = _mask_inputs(3, 10, 1, seed=2)
    weight[1, 4] = NAN
    null[0, 9] = -INF
    with use_backend("triton"), pytest.raises(ValueError, match="weight and null_norms contain NaN or inf"):
        wanda_mask(*_on_device(weight, norms, null), 3)


# --- sqnorm_accumulate ------------------------------------------------------------------------

ACC_SHAPES = [(1, 1), (8, 64), (16, 100), (3, 5, 33), (6, 1280)]
ROW_RANGES = [(0, None), (2, 7), (4, 4), (0, 1)]


def _activations(shape, dtype, seed, scale=3.0):
    x = torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale
    x.reshape(-1, shape[-1])[1::5] = 0.0  # some zero rows
    return x.to(dtype)


def _acc0(cols, seed=1):
    return torch.rand(cols, generator=_gen(seed)) * 10


@pytest.mark.parametrize("token_norm", [True, False], ids=["token_norm", "raw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", ACC_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sqnorm_accumulate(shape, dtype, token_norm):
    x = _activations(shape, dtype, seed=len(shape) + shape[-1])
    rows = x.numel() // shape[-1]
    for row_start, row_end in ROW_RANGES:
        if (row_end or rows) > rows:
            continue
        acc0 = _acc0(shape[-1])
        got = acc0.to(DEVICE, copy=True)
        with use_backend("triton"):
            sqnorm_accumulate(x.to(DEVICE), got, row_start, row_end, token_norm)
        assert_statistic_close(got.cpu(), x, acc0, row_start, row_end, token_norm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_sqnorm_accumulate_other_dtypes(dtype):
    x = _activations((12, 40), dtype, seed=9)
    acc0 = _acc0(40)
    for token_norm in (True, False):
        got = acc0.to(DEVICE, copy=True)
        with use_backend("triton"):
            sqnorm_accumulate(x.to(DEVICE), got, 3, 11, token_norm)
        assert_statistic_close(got.cpu(), x, acc0, 3, 11, token_norm)


@pytest.mark.parametrize("token_norm", [True, False], ids=["token_norm", "raw"])
def test_sqnorm_accumulate_chunked_rows(token_norm):
    # rows wider than the one-block limit: the kernel walks them in chunks
    from memcore._kernels.sqnorm_accumulate import sqnorm_accumulate_triton

    x = _activations((9, 100), torch.float32, seed=4)
    x[2, 40:] *= 1e4  # the row scale changes between chunks
    for row_start, row_end in ((0, 9), (2, 7)):
        acc0 = _acc0(100)
        got = acc0.to(DEVICE, copy=True)
        sqnorm_accumulate_triton(x.to(DEVICE), got, row_start, row_end, token_norm, max_block_cols=32)
        assert_statistic_close(got.cpu(), x, acc0, row_start, row_end, token_norm)


def test_sqnorm_accumulate_extreme_magnitudes():
    # rows whose plain fp32 sum of squares over- or underflows: row scaling keeps xhat^2 exact
    x = torch.tensor([[1e30, -2e30, 3e30, 0.0], [1e-30, 2e-30, -3e-30, 4e-30], [0.0, 0.0, 0.0, 0.0]])
    got = torch.zeros(4, device=DEVICE)
    with use_backend("triton"):
        sqnorm_accumulate(x.to(DEVICE), got)
    want = torch.zeros(4)
    sqnorm_accumulate_reference(x, want)
    torch.testing.assert_close(got.cpu(), want, rtol=8 * EPS32, atol=0)


def _subnormal(dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps  # the smallest positive subnormal


def _special_rows(cols: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows that count, rows that do not), built in float64 and cast to dtype.

    Counted: ordinary, huge finite (1e25, 3e38: their fp32 squares overflow), tiny (1e-30: squares
    underflow), subnormal, and a huge value next to a subnormal one. Not counted: zeros, a single
    inf, -inf or NaN among ordinary values, inf next to NaN. A 16-bit cast may turn a huge row into
    an inf row or a tiny one into zeros: the reference sees the same values. float64 stays within
    the range where the reference's float64 squared norm is exact (|x| in [1e-150, 1e150]).
    """
    gen = _gen(seed)
    base = torch.randn(cols, generator=gen, dtype=torch.float64)
    signs = torch.where(torch.rand(cols, generator=gen) < 0.5, -1.0, 1.0).double()
    wide = dtype == torch.float64
    sub = 1e-150 if wide else _subnormal(dtype)
    counted = [base * 3, signs * 1e25, signs * (1e150 if wide else 3e38), base * 1e-30, signs * sub]
    mixed = torch.full((cols,), 0.0, dtype=torch.float64)
    mixed[0], mixed[-1] = (1e150 if wide else 3e38), sub
    counted.append(mixed)
    dropped = []
    for value in (0.0, INF, -INF, NAN):
        row = base.clone() if value != 0.0 else torch.zeros(cols, dtype=torch.float64)
        row[cols // 2] = value
        dropped.append(row)
    both = base.clone()
    both[0], both[-1] = INF, NAN
    dropped.append(both)
    return torch.stack(counted).to(dtype), torch.stack(dropped).to(dtype)


def assert_matches_reference(got: torch.Tensor, want: torch.Tensor, rows: int) -> None:
    """Column sums of at most ``rows`` terms in [0, 1] with a positive start, no cancellation: a few
    float32 roundings per term (the reference is float64)."""
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got, want, rtol=(4 + rows) * EPS32, atol=0)


def _sqnorm_triton(x, acc, row_start, row_end, token_norm, max_block_cols=None):
    from memcore._kernels.sqnorm_accumulate import sqnorm_accumulate_triton

    kwargs = {} if max_block_cols is None else {"max_block_cols": max_block_cols}
    sqnorm_accumulate_triton(x.reshape(-1, x.shape[-1]), acc, row_start, row_end, token_norm, **kwargs)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("max_block_cols", [None, 4], ids=["one-block", "chunked"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sqnorm_accumulate_special_rows(dtype, max_block_cols):
    """Zero and non-finite rows add exactly nothing; huge, tiny and subnormal rows add their exact
    normalized squares (no overflow or underflow); the squares as they are without token_norm."""
    counted, dropped = _special_rows(9, dtype, seed=3)
    acc0 = _acc0(9)
    got = acc0.to(DEVICE, copy=True)
    _sqnorm_triton(dropped.to(DEVICE), got, 0, len(dropped), True, max_block_cols)
    assert torch.equal(got.cpu(), acc0), "a zero or non-finite row added something"
    x = torch.cat([dropped[:3], counted, dropped[3:]])
    for row_start, row_end in ((0, len(x)), (2, len(x) - 1)):
        want = acc0.clone()
        sqnorm_accumulate_reference(x, want, row_start, row_end)
        got = acc0.to(DEVICE, copy=True)
        _sqnorm_triton(x.to(DEVICE), got, row_start, row_end, True, max_block_cols)
        assert_matches_reference(got.cpu(), want, len(x))
    want = acc0.clone()
    sqnorm_accumulate_reference(x, want, 0, None, token_norm=False)
    got = acc0.to(DEVICE, copy=True)
    _sqnorm_triton(x.to(DEVICE), got, 0, len(x), False, max_block_cols)
    torch.testing.assert_close(got.cpu(), want, rtol=(4 + len(x)) * EPS32, atol=0, equal_nan=True)


# --- geglu_accumulate -------------------------------------------------------------------------

# (leading shape, inner): P is leading + [2 * inner]
GEGLU_SHAPES = [((8,), 64), ((2, 5), 33), ((16,), 100), ((3,), 1280), ((2,), 5120)]


def assert_geglu_close(got: torch.Tensor, want: torch.Tensor, p: torch.Tensor) -> None:
    """X within 2x eager PyTorch's error against float64 GEGLU, plus one rounding of X and the error
    any float32 ``1 + erf(g / sqrt 2)`` makes in gelu's tail (a few eps32 of |h g|)."""
    h, g = p.double().chunk(2, dim=-1)
    exact = h * torch.nn.functional.gelu(g)
    eps = torch.finfo(p.dtype).eps
    err = (got.double() - exact).abs()
    bound = 2 * (want.double() - exact).abs() + eps * exact.abs() + 4 * EPS32 * (h * g).abs() + 1e-30
    bad = torch.nonzero(err > bound)
    assert bad.numel() == 0, (
        f"{len(bad)} of {got.numel()} outputs beyond the bound; first {bad[:5].tolist()}: "
        f"got {got[tuple(bad[:5].t())].tolist()}, exact {exact[tuple(bad[:5].t())].tolist()}"
    )


def assert_geglu_close_where_finite(got: torch.Tensor, want: torch.Tensor, p: torch.Tensor) -> None:
    """assert_geglu_close where eager X is finite (rows of P: [h | g])."""
    finite = want.isfinite()
    p_finite = torch.where(finite.repeat(1, 2), p, 0)
    assert_geglu_close(torch.where(finite, got, 0), torch.where(finite, want, 0), p_finite)


def _proj_out(leading, inner, dtype, seed):
    p = torch.randn((*leading, 2 * inner), generator=_gen(seed), dtype=torch.float64) * 2.5
    p.reshape(-1, 2 * inner)[1::4, :inner] = 0.0  # h = 0: zero rows of X
    return p.to(dtype)


def _check_geglu(p, row_start, row_end, token_norm, fn=None):
    inner = p.shape[-1] // 2
    acc0 = _acc0(inner, seed=p.shape[-1])
    got_acc = acc0.to(DEVICE, copy=True)
    if fn is None:
        with use_backend("triton"):
            got = geglu_accumulate(p.to(DEVICE), got_acc, row_start, row_end, token_norm)
    else:
        got = fn(p.to(DEVICE), got_acc, row_start, row_end, token_norm)
    got, got_acc = got.cpu(), got_acc.cpu()
    want = geglu_accumulate_reference(p, acc0.clone(), row_start, row_end, token_norm)
    assert got.dtype == p.dtype and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    assert_geglu_close(got.reshape(want.shape), want, p)
    # the statistic is that of the output as returned (rounded to P's dtype)
    assert_statistic_close(got_acc, got, acc0, row_start, row_end, token_norm)


@pytest.mark.parametrize("token_norm", [True, False], ids=["token_norm", "raw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("leading,inner", GEGLU_SHAPES, ids=lambda v: str(v))
def test_geglu_accumulate(leading, inner, dtype, token_norm):
    p = _proj_out(leading, inner, dtype, seed=inner)
    rows = p.numel() // p.shape[-1]
    for row_start, row_end in ROW_RANGES:
        if (row_end or rows) <= rows:
            _check_geglu(p, row_start, row_end, token_norm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_geglu_accumulate_other_dtypes(dtype):
    p = _proj_out((10,), 48, dtype, seed=5)
    for token_norm in (True, False):
        _check_geglu(p, 2, 9, token_norm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("token_norm", [True, False], ids=["token_norm", "raw"])
def test_geglu_accumulate_chunked_rows(token_norm, dtype):
    from memcore._kernels.geglu_accumulate import geglu_accumulate_triton

    p = _proj_out((7,), 40, dtype, seed=8)
    for row_start, row_end in ((0, 7), (2, 5), (3, 3)):
        _check_geglu(
            p,
            row_start,
            row_end,
            token_norm,
            fn=lambda *a: geglu_accumulate_triton(*a, max_block_cols=16),
        )


def test_geglu_accumulate_strided_input():
    p = _proj_out((6,), 24, torch.float32, seed=2)
    wide = torch.zeros(6, 64)
    wide[:, 8:56] = p
    _check_geglu(wide[:, 8:56], 0, None, True)


def _special_proj_out(inner: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """P = [h | g] whose X = h * gelu(g) rows are ordinary, huge (X near the dtype's largest finite
    value), tiny, subnormal, zero, inf (h inf; or finite h and g whose product overflows the dtype:
    300 * gelu(300) in fp16, 1e25 * gelu(1e25) in fp32 and bf16) or NaN (h NaN, g NaN, g = -inf);
    g = +inf is left out: eager gelu(+inf) is NaN on the CPU, inf elsewhere."""
    gen = _gen(seed)
    wide = dtype == torch.float64
    big = 1e150 if wide else 0.9 * torch.finfo(dtype).max
    sub = 1e-150 if wide else _subnormal(dtype)
    one = torch.ones(inner, dtype=torch.float64)
    h = torch.randn(inner, generator=gen, dtype=torch.float64)
    g = torch.randn(inner, generator=gen, dtype=torch.float64) * 2
    overflow = 300.0 if dtype == torch.float16 else (1e200 if wide else 1e25)
    rows = [
        (h, g),
        (one * big, one),  # gelu(1) = 0.84: X = 0.76 * max
        (h * 1e-30, one),
        (one * sub, one * 2),  # gelu(2) = 1.95: X = 2 * the smallest subnormal
        (torch.zeros(inner, dtype=torch.float64), g),
        (one * overflow, one * overflow),
    ]
    for h_bad, g_bad in ((INF, None), (NAN, None), (None, NAN), (None, -INF)):
        hh, gg = h.clone(), g.clone()
        if h_bad is not None:
            hh[inner // 2] = h_bad
        if g_bad is not None:
            gg[inner // 2] = g_bad
        rows.append((hh, gg))
    return torch.stack([torch.cat(pair) for pair in rows]).to(dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("max_block_cols", [None, 4], ids=["one-block", "chunked"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_geglu_accumulate_special_rows(dtype, max_block_cols):
    """Rows of X that are zero or not finite (also when P is finite) add exactly nothing; X's
    non-finite values sit where eager PyTorch puts them."""
    from memcore._kernels.geglu_accumulate import geglu_accumulate_triton

    kwargs = {} if max_block_cols is None else {"max_block_cols": max_block_cols}
    p = _special_proj_out(9, dtype, seed=4)
    acc0 = _acc0(9)
    for row_start, row_end in ((0, len(p)), (1, len(p) - 1), (4, len(p))):
        want_acc = acc0.clone()
        want = geglu_accumulate_reference(p, want_acc, row_start, row_end)
        got_acc = acc0.to(DEVICE, copy=True)
        got = geglu_accumulate_triton(p.to(DEVICE), got_acc, row_start, row_end, True, **kwargs).cpu()
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        assert_geglu_close_where_finite(got, want, p)
        if row_start == 4:
            assert torch.equal(got_acc.cpu(), acc0), "a zero or non-finite row of X added something"
        else:
            assert_matches_reference(got_acc.cpu(), want_acc, row_end - row_start)


def test_fused_capture_routes_prompt_ranges():
    """Capture through the Triton GEGLU (first prompt range) and statistic (second range) on the tiny
    pipeline, against unfused capture on the reference backend."""
    from memcore.capture import CaptureState, Destination, apply_capture
    from memcore.config import LocalizeConfig, resolve_generation
    from memcore.driver import initial_latent, is_guided, run_first_calls
    from memcore.models import load_pipeline
    from memcore.ops import use_backend
    from memcore.targets import find_targets

    pipe = load_pipeline("tiny", device=DEVICE, dtype="float32")
    net = pipe.unet
    targets = find_targets(net)
    generation = resolve_generation(pipe, LocalizeConfig(height=32, width=32))
    latent = initial_latent(pipe, generation)
    prompts = ["a painting of a fox", "the great wave", "a man in a hat"]
    results = {}
    for backend, fused in (("triton", True), ("reference", False)):
        parts = [{t.name: torch.zeros(1, t.linear.in_features, device=DEVICE) for t in targets} for _ in range(2)]
        state = CaptureState(num_calls=1, guided=is_guided(pipe, generation))
        with torch.no_grad(), use_backend(backend), apply_capture(net, targets, state, fused=fused):
            state.start_run([Destination(parts[0], 0, 2), Destination(parts[1], 2, 3)])
            run_first_calls(pipe, prompts, latent, generation, 1)
        results[backend] = parts
    for part in range(2):
        for name, acc in results["triton"][part].items():
            assert (acc > 0).all(), name
            torch.testing.assert_close(acc, results["reference"][part][name], rtol=1e-5, atol=1e-6, msg=name)


# --- determinism and the device of a launch -----------------------------------------------------


def _kernel_modules():
    from memcore._kernels import geglu_accumulate as geglu_module
    from memcore._kernels import sqnorm_accumulate as sqnorm_module
    from memcore._kernels import wanda_mask as wanda_module

    return sqnorm_module, geglu_module, wanda_module


def test_statistics_kernels_use_no_float_atomics():
    """Column sums go through a per-program workspace added up in program order, never through
    atomics whose order depends on scheduling (the compiled PTX is checked below as well)."""
    for module in _kernel_modules()[:2]:
        assert re.search(r"\batomic_\w+\(", inspect.getsource(module)) is None, module.__name__


def _repeat(fn, runs=2):
    return [fn() for _ in range(runs)]


def test_statistics_are_identical_from_run_to_run():
    """Several programs (uneven numbers of tiles) write the workspace; two runs give the same bytes
    (weak under the interpreter, which runs programs in order; the GPU tests repeat it there)."""
    from memcore._kernels._launch import blocks, programs

    x = _activations((40, 2048), torch.float32, seed=5).to(DEVICE)
    _, block_r, _ = blocks(40, 2048, 8192)
    assert programs(x.device, 40, block_r) > 1 and (40 // block_r) % programs(x.device, 40, block_r) != 0
    acc0 = _acc0(2048).to(DEVICE)

    def sqnorm_run():
        acc = acc0.clone()
        with use_backend("triton"):
            sqnorm_accumulate(x, acc, 1, 39)
        return acc.cpu().view(torch.int32)

    def geglu_run():
        acc = acc0[:1024].clone()
        with use_backend("triton"):
            out = geglu_accumulate(x, acc, 1, 39)
        return acc.cpu().view(torch.int32), out.cpu().view(torch.int32)

    first, second = _repeat(sqnorm_run)
    assert torch.equal(first, second)
    assert_statistic_close(first.view(torch.float32), x.cpu(), acc0.cpu(), 1, 39, True)
    (acc_a, out_a), (acc_b, out_b) = _repeat(geglu_run)
    assert torch.equal(acc_a, acc_b) and torch.equal(out_a, out_b)


def test_device_guard_selects_the_tensors_device():
    from memcore._kernels._launch import device_guard

    guard = device_guard(torch.device("cuda", 1))  # not entered: no CUDA needed to build it
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)


class _LaunchSpy:
    """Stands in for a kernel: records the devices of the guards active at each launch."""

    def __init__(self, name, kernel, active, launches):
        self.name, self.kernel, self.active, self.launches = name, kernel, active, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, list(self.active)))
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_every_launch_runs_under_the_device_guard(monkeypatch):
    """Triton compiles for and launches on the current device: every kernel launch of the three ops
    happens inside device_guard(the tensors' device), on every path."""
    active, launches = [], []

    @contextlib.contextmanager
    def spy_guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    modules = _kernel_modules()
    kernels = set()
    for module in modules:
        monkeypatch.setattr(module, "device_guard", spy_guard)
        for name in dir(module):
            if name.endswith("_kernel"):
                kernels.add(name)
                monkeypatch.setattr(module, name, _LaunchSpy(name, getattr(module, name), active, launches))
    sqnorm_module, geglu_module, wanda_module = modules
    x = _activations((5, 24), torch.float32, seed=1).to(DEVICE)
    for token_norm in (True, False):
        for max_cols in (32, 8):
            acc, acc_geglu = torch.zeros(24, device=DEVICE), torch.zeros(12, device=DEVICE)
            sqnorm_module.sqnorm_accumulate_triton(x, acc, 1, 4, token_norm, max_block_cols=max_cols)
            geglu_module.geglu_accumulate_triton(x, acc_geglu, 1, 4, token_norm, max_block_cols=max_cols // 2)
    weight, norms, null = _on_device(*_mask_inputs(3, 24, 1, seed=1))
    wanda_module.wanda_mask_triton(weight, norms, null, 5)
    assert {name for name, _ in launches} == kernels
    assert all(guards == [x.device] for _, guards in launches), launches


# --- the code the GPU runs, compiled here for sm_90 ---------------------------------------------

# Runs in a subprocess without the interpreter: calls the launchers on CPU tensors with every kernel
# launch replaced by a record of its arguments (ints equal to 1 become constants, as Triton
# specializes them), compiles each distinct launch for sm_90 and prints, per case, the kernels with
# their shared memory and the PTX instructions that matter.
_COMPILE_SCRIPT = r"""
import json, re, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
         torch.uint8: "u8", torch.int32: "i32"}
OPS = re.compile(r"\b((?:div|rcp|sqrt|atom|red)\.[a-z0-9_.]+)")
launches = []

def record(self, *args, grid, warmup, **kwargs):
    sig, consts = {}, {}
    for name, value in zip(self.arg_names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + TYPES[value.dtype]
        elif value == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
    for name, value in kwargs.items():
        if name in self.arg_names:
            sig[name], consts[name] = "constexpr", value
    launches.append((self, sig, consts, kwargs.get("num_warps", 4)))

JITFunction.run = record
from memcore._kernels.geglu_accumulate import geglu_accumulate_triton
from memcore._kernels.sqnorm_accumulate import sqnorm_accumulate_triton
from memcore._kernels.wanda_mask import wanda_mask_triton

results, compiled = [], {}
for case in json.load(sys.stdin):
    dtype, (rows, cols) = getattr(torch, case["dtype"]), case["shape"]
    launches.clear()
    if case["op"] == "sqnorm":
        sqnorm_accumulate_triton(torch.ones(rows, cols, dtype=dtype), torch.zeros(cols), 0, rows, case["token_norm"])
    elif case["op"] == "geglu":
        geglu_accumulate_triton(torch.ones(rows, 2 * cols, dtype=dtype), torch.zeros(cols), 0, rows, case["token_norm"])
    else:
        norms = torch.ones(case["t"], cols)
        wanda_mask_triton(torch.ones(rows, cols, dtype=dtype), norms, norms if case["null"] else None, case["k"], True)
    kernels = []
    for fn, sig, consts, warps in launches:
        key = repr((fn.__name__, sorted(sig.items()), sorted((k, str(v)) for k, v in consts.items()), warps))
        if key not in compiled:
            c = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps})
            ptx = c.asm["ptx"]
            compiled[key] = {"kernel": fn.__name__, "constants": {k: str(v) for k, v in consts.items()},
                             "shared": c.metadata.shared, "ops": sorted(set(OPS.findall(ptx))), "ftz": ".ftz" in ptx}
        kernels.append(compiled[key])
    results.append(kernels)
json.dump(results, sys.stdout)
"""

_COMPILE_CASES = {
    "sqnorm-fp16-1280": dict(op="sqnorm", dtype="float16", shape=[64, 1280], token_norm=True),
    "sqnorm-fp64-1000": dict(op="sqnorm", dtype="float64", shape=[64, 1000], token_norm=True),
    "sqnorm-bf16-1": dict(op="sqnorm", dtype="bfloat16", shape=[64, 1], token_norm=True),
    "sqnorm-fp32-12288": dict(op="sqnorm", dtype="float32", shape=[64, 12288], token_norm=True),
    "sqnorm-fp32-12288-raw": dict(op="sqnorm", dtype="float32", shape=[64, 12288], token_norm=False),
    "geglu-bf16-6137": dict(op="geglu", dtype="bfloat16", shape=[64, 6137], token_norm=True),
    "geglu-bf16-6144": dict(op="geglu", dtype="bfloat16", shape=[64, 6144], token_norm=True),
    "geglu-fp16-12273": dict(op="geglu", dtype="float16", shape=[64, 12273], token_norm=True),
    "geglu-fp16-12288": dict(op="geglu", dtype="float16", shape=[64, 12288], token_norm=True),
    "geglu-fp32-1-raw": dict(op="geglu", dtype="float32", shape=[1, 1], token_norm=False),
    "geglu-fp64-33": dict(op="geglu", dtype="float64", shape=[64, 33], token_norm=True),
    "wanda-fp16-11641": dict(op="wanda", dtype="float16", shape=[64, 11641], t=2, null=True, k=116),
    "wanda-fp16-11912": dict(op="wanda", dtype="float16", shape=[64, 11912], t=2, null=True, k=119),
    "wanda-fp32-4097": dict(op="wanda", dtype="float32", shape=[64, 4097], t=1, null=True, k=40),
    "wanda-bf16-1": dict(op="wanda", dtype="bfloat16", shape=[1, 1], t=1, null=False, k=1),
    "wanda-fp64-k0": dict(op="wanda", dtype="float64", shape=[64, 1280], t=2, null=False, k=0),
}
# what one block of an H100 / H200 may use
SHARED_MEMORY_LIMIT = 232448


@pytest.fixture(scope="module")
def compiled():
    """Per case of _COMPILE_CASES: the kernels its launcher runs, as compiled for sm_90."""
    try:
        from triton.backends import backends
    except ImportError:
        backends = {}
    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT],
        input=json.dumps(list(_COMPILE_CASES.values())),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(zip(_COMPILE_CASES, json.loads(proc.stdout)))


STAT_KERNELS = ("_sqnorm_tiles_kernel", "_sqnorm_row_norms_kernel", "_chunk_partials_kernel", "_add_partials_kernel")


@pytest.mark.slow
def test_compiled_kernels_fit_shared_memory(compiled):
    for case, kernels in compiled.items():
        assert kernels, case
        for kernel in kernels:
            assert kernel["shared"] <= SHARED_MEMORY_LIMIT, (case, kernel)
    # the widths where block sizes change: one block of 8192 or 16384 columns, or chunks
    assert {k["constants"]["BLOCK"] for c in ("wanda-fp16-11641", "wanda-fp16-11912") for k in compiled[c]} == {"16384"}
    assert compiled["geglu-bf16-6137"][0]["constants"]["BLOCK_C"] == "8192"
    assert compiled["geglu-fp16-12288"][0]["kernel"] == "_geglu_rows_kernel"


@pytest.mark.slow
def test_compiled_division_is_ieee(compiled):
    """No approximate division or root anywhere; every kernel that normalizes rows divides with
    div.rn (float32) or float64's div.rn."""
    normalizing = {"_sqnorm_tiles_kernel", "_sqnorm_row_norms_kernel", "_geglu_tiles_kernel", "_geglu_rows_kernel"}
    approximate = ("div.full", "div.approx", "rcp.approx", "sqrt.approx")
    checked = 0
    for case, kernels in compiled.items():
        for kernel in kernels:
            approx = [op for op in kernel["ops"] if op.startswith(approximate)]
            assert not approx, (case, kernel)
            if kernel["kernel"] in normalizing and kernel["constants"].get("TOKEN_NORM", "True") == "True":
                wanted = "div.rn.f64" if "fp64" in case else "div.rn.f32"
                assert wanted in kernel["ops"], (case, kernel)
                checked += 1
    assert checked >= 8


@pytest.mark.slow
def test_compiled_atomics(compiled):
    """Statistics kernels: no atomics at all (run-to-run identical sums); wanda: only the integer OR
    of the flag word."""
    for case, kernels in compiled.items():
        for kernel in kernels:
            atomics = [op for op in kernel["ops"] if op.startswith(("atom.", "red."))]
            if kernel["kernel"] == "_wanda_mask_kernel":
                assert atomics and all(op.endswith(".or.b32") for op in atomics), (case, kernel)
            else:
                assert not atomics, (case, kernel)
            if kernel["kernel"] in STAT_KERNELS:
                assert not kernel["ftz"], (case, kernel)  # subnormal squares are kept, as in the reference


# --- on a GPU: odd widths, every dtype, run-to-run determinism, a second device ------------------

GPU_WIDTHS = [1, 33, 1000, 4097, 12289]  # 12289: rows wider than one block


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return a.dtype == b.dtype and torch.equal(a.view(ints[a.element_size()]), b.view(ints[b.element_size()]))


def _with_bad_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[3] = INF
    x[7, -1] = NAN
    return x


@needs_cuda
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("cols", GPU_WIDTHS)
def test_gpu_sqnorm_accumulate_odd_widths(cols, dtype):
    x = _with_bad_rows(_activations((300, cols), dtype, seed=cols))
    clean = _activations((300, cols), dtype, seed=cols + 1)
    acc0 = _acc0(cols)
    for data, token_norm in ((x, True), (clean, False)):

        def run():
            acc = acc0.to(DEVICE, copy=True)
            with use_backend("triton"):
                sqnorm_accumulate(data.to(DEVICE), acc, 2, 297, token_norm)
            return acc.cpu()

        first, second = _repeat(run)
        assert _same_bits(first, second), "two runs differ"
        assert torch.isfinite(first).all()
        assert_statistic_close(first, data, acc0, 2, 297, token_norm)


@needs_cuda
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("inner", GPU_WIDTHS)
def test_gpu_geglu_accumulate_odd_widths(inner, dtype):
    p = _proj_out((300,), inner, dtype, seed=inner)
    p[3, :inner] = INF
    for token_norm in (True, False):
        if not token_norm:
            p = _proj_out((300,), inner, dtype, seed=inner + 1)
        acc0 = _acc0(inner)

        def run():
            acc = acc0.to(DEVICE, copy=True)
            with use_backend("triton"):
                out = geglu_accumulate(p.to(DEVICE), acc, 2, 297, token_norm)
            return out.cpu(), acc.cpu()

        (out, acc), (out2, acc2) = _repeat(run)
        assert _same_bits(acc, acc2) and _same_bits(out, out2), "two runs differ"
        want = geglu_accumulate_reference(p, acc0.clone(), 2, 297, token_norm)
        assert torch.equal(out.isfinite(), want.isfinite())
        assert_geglu_close_where_finite(out, want, p)
        assert_statistic_close(acc, out, acc0, 2, 297, token_norm)


@needs_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("cols", [1, 33, 1000, 4097, 11641])
def test_gpu_wanda_mask_odd_widths(cols, dtype):
    weight, norms, null = _mask_inputs(40, cols, 3, seed=cols, dtype=dtype)
    for k in sorted({0, 1, cols // 3, cols}):
        for largest in (True, False):
            want = wanda_mask_reference(weight, norms, null, k, largest)
            runs = _repeat(lambda: _wanda_triton(weight, norms, null, k, largest))
            assert_mask_equal(runs[0][0], want, cols)
            assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1].item() == runs[1][1].item() == 0
    weight[39, cols - 1] = NAN
    assert _wanda_triton(weight, norms, null, 1)[1].item() == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run there (and give the right values)."""
    device = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    x = _activations((64, 1280), torch.float16, seed=3)
    weight, norms, null = _mask_inputs(8, 100, 2, seed=3)
    acc, acc_geglu = torch.zeros(1280, device=device), torch.zeros(640, device=device)
    with use_backend("triton"):
        sqnorm_accumulate(x.to(device), acc)
        out = geglu_accumulate(x.to(device), acc_geglu)
        mask = wanda_mask(weight.to(device), norms.to(device), null.to(device), 10)
    assert torch.cuda.current_device() == 0
    assert_statistic_close(acc.cpu(), x, torch.zeros(1280))
    assert_statistic_close(acc_geglu.cpu(), out.cpu(), torch.zeros(640))
    assert_mask_equal(mask.cpu(), wanda_mask_reference(weight, norms, null, 10), 100)
