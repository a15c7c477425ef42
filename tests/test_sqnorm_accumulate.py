"""The C++/OpenMP backend of memcore::sqnorm_accumulate against its float64 reference."""

from __future__ import annotations

import pytest
import torch

from memcore.ops import use_backend
from memcore.ops._ext import extension
from memcore.ops.sqnorm_accumulate import NATIVE_DTYPES, sqnorm_accumulate, sqnorm_accumulate_reference

needs_ext = pytest.mark.skipif(
    extension() is None, reason="memcore._C is not built (pip install -e . builds it); the cpu backend is absent"
)

EPS32 = torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (7, 13), (3, 5, 33), (4096, 320), (2, 64, 1280)]


def _input(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _init_acc(features, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(features, generator=g, dtype=torch.float32) * 10


def _run_cpu(x, acc, **kw):
    with use_backend("cpu"):
        sqnorm_accumulate(x, acc, **kw)
    return acc


def _check(x, acc0, **kw):
    got = _run_cpu(x, acc0.clone(), **kw)
    want = acc0.clone()
    sqnorm_accumulate_reference(x, want, **kw)
    # both sum in float64 and round once to float32; allow a few ulps of the value
    torch.testing.assert_close(got, want, rtol=4 * EPS32, atol=0)
    return got


@needs_ext
@pytest.mark.parametrize("token_norm", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NATIVE_DTYPES[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, token_norm):
    x = _input(shape, dtype)
    _check(x, torch.zeros(shape[-1]), token_norm=token_norm)


@needs_ext
@pytest.mark.parametrize("token_norm", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NATIVE_DTYPES[d])
def test_adds_to_existing_acc(dtype, token_norm):
    x = _input((2, 64, 1280), dtype, seed=3)
    acc0 = _init_acc(1280)
    got = _check(x, acc0, token_norm=token_norm)
    assert torch.all(got >= acc0)
    # two calls over halves add up to one call over everything
    halves = _run_cpu(x, acc0.clone(), row_end=64, token_norm=token_norm)
    _run_cpu(x, halves, row_start=64, token_norm=token_norm)
    torch.testing.assert_close(halves, got, rtol=4 * EPS32, atol=0)


@needs_ext
@pytest.mark.parametrize("token_norm", [True, False])
def test_token_norm_rows_sum_to_one(token_norm):
    x = _input((100, 77), torch.float32)
    acc = _run_cpu(x, torch.zeros(77), token_norm=token_norm)
    expected = 100.0 if token_norm else float(x.double().square().sum())
    assert float(acc.double().sum()) == pytest.approx(expected, rel=1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NATIVE_DTYPES[d])
def test_zero_rows_add_nothing(dtype):
    x = _input((9, 40), dtype)
    x[[0, 4, 8]] = 0
    got = _check(x, torch.zeros(40), token_norm=True)
    assert torch.isfinite(got).all()
    only_zero = _run_cpu(torch.zeros(5, 40, dtype=dtype), torch.zeros(40), token_norm=True)
    assert torch.equal(only_zero, torch.zeros(40))


# rows the statistic must survive: (name, builder(cols, generator) -> float64 row)
SPECIAL_ROWS = {
    "zeros": lambda n, g: torch.zeros(n, dtype=torch.float64),
    "one_inf": lambda n, g: _with(torch.randn(n, generator=g, dtype=torch.float64), 3, float("inf")),
    "one_neg_inf": lambda n, g: _with(torch.randn(n, generator=g, dtype=torch.float64), 0, float("-inf")),
    "inf_and_neg_inf": lambda n, g: _with(_with(torch.zeros(n, dtype=torch.float64), 1, float("inf")), 2, float("-inf")),
    "one_nan": lambda n, g: _with(torch.randn(n, generator=g, dtype=torch.float64), n - 1, float("nan")),
    "all_nan": lambda n, g: torch.full((n,), float("nan"), dtype=torch.float64),
    "huge_1e25": lambda n, g: torch.randn(n, generator=g, dtype=torch.float64) * 1e25,
    "huge_3e38": lambda n, g: (1 + 0.13 * torch.rand(n, generator=g, dtype=torch.float64)) * 3e38,
    "one_huge": lambda n, g: _with(torch.randn(n, generator=g, dtype=torch.float64), 2, 3.3e38),
    "huge_1e200": lambda n, g: torch.randn(n, generator=g, dtype=torch.float64) * 1e200,
    "tiny_1e-30": lambda n, g: torch.randn(n, generator=g, dtype=torch.float64) * 1e-30,
    "float32_subnormal": lambda n, g: torch.randn(n, generator=g, dtype=torch.float64) * 1e-41,
    "smallest_float32": lambda n, g: torch.full((n,), 1.401298464324817e-45, dtype=torch.float64),
    "float64_square_subnormal": lambda n, g: torch.randn(n, generator=g, dtype=torch.float64) * 1e-160,
    "float64_subnormal": lambda n, g: torch.randn(n, generator=g, dtype=torch.float64) * 1e-310,
    "float16_subnormal": lambda n, g: torch.randn(n, generator=g, dtype=torch.float64) * 1e-6,
}


def _with(row, j, value):
    row[j] = value
    return row


def special_matrix(cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Ordinary rows interleaved with every SPECIAL_ROWS row, converted to dtype as torch does."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for build in SPECIAL_ROWS.values():
        rows.append(torch.randn(cols, generator=g, dtype=torch.float64))
        rows.append(build(cols, g))
    rows.append(torch.randn(cols, generator=g, dtype=torch.float64))
    return torch.stack(rows).to(dtype)


@needs_ext
@pytest.mark.parametrize("token_norm", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NATIVE_DTYPES[d])
@pytest.mark.parametrize("cols", [5, 37, 300])
def test_special_rows_match_reference(cols, dtype, token_norm):
    x = special_matrix(cols, dtype, seed=cols)
    acc0 = _init_acc(cols)
    got = _run_cpu(x, acc0.clone(), token_norm=token_norm)
    want = acc0.clone()
    sqnorm_accumulate_reference(x, want, token_norm=token_norm)
    torch.testing.assert_close(got, want, rtol=4 * EPS32, atol=0, equal_nan=not token_norm)
    if token_norm:
        # a zero, inf or NaN row adds nothing, every other row exactly 1 in total
        totals = x.double().square().sum(dim=1)
        counted = int(((totals > 0) & torch.isfinite(totals)).sum())
        assert torch.isfinite(got).all()
        assert float((got - acc0).double().sum()) == pytest.approx(counted, rel=1e-5)
        # and each special row alone: nothing for the skipped ones, a finite unit for the others
        for r in range(x.shape[0]):
            alone = _run_cpu(x, torch.zeros(cols), row_start=r, row_end=r + 1)
            assert float(alone.double().sum()) == pytest.approx(float(counted_row(x[r])), rel=1e-5), r


def counted_row(row: torch.Tensor) -> bool:
    total = row.double().square().sum()
    return bool(total > 0 and torch.isfinite(total))


@needs_ext
@pytest.mark.parametrize("token_norm", [True, False])
@pytest.mark.parametrize(
    "row_start,row_end",
    [(0, 0), (7, 7), (15, 15), (3, 11), (0, 1), (14, 15), (5, None)],
    ids=lambda v: str(v),
)
def test_row_ranges(row_start, row_end, token_norm):
    x = _input((3, 5, 33), torch.float32, seed=5)  # 15 rows
    acc0 = _init_acc(33)
    got = _check(x, acc0, row_start=row_start, row_end=row_end, token_norm=token_norm)
    if row_end == row_start:
        assert torch.equal(got, acc0)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: NATIVE_DTYPES[d])
def test_every_16_bit_pattern_converts_exactly(dtype):
    # one row holding every bit pattern (subnormals, inf, nan included): acc[j] = x[j]^2 exactly
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, -1)
    got = _run_cpu(x, torch.zeros(x.shape[1]), token_norm=False)
    want = x[0].double().square().float()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@needs_ext
def test_empty_input():
    acc = _run_cpu(torch.zeros(0, 8), torch.ones(8))
    assert torch.equal(acc, torch.ones(8))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NATIVE_DTYPES[d])
def test_deterministic_across_runs_and_threads(dtype):
    x = _input((3000, 700), dtype, seed=7)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3, before, before):
            torch.set_num_threads(threads)
            results.append(_run_cpu(x, _init_acc(700), token_norm=True))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        assert torch.equal(r, results[0])


@needs_ext
@pytest.mark.parametrize("token_norm", [True, False])
def test_non_contiguous_input(token_norm):
    base = _input((48, 40), torch.float32, seed=11)
    x = base.t()  # [40, 48], a transposed view
    assert not x.is_contiguous()
    got = _check(x, torch.zeros(48), token_norm=token_norm)
    torch.testing.assert_close(got, _run_cpu(x.contiguous(), torch.zeros(48), token_norm=token_norm), rtol=0, atol=0)
    sliced = _input((10, 64), torch.bfloat16)[:, ::2]
    _check(sliced, torch.zeros(32), row_start=2, row_end=9, token_norm=token_norm)


@pytest.mark.parametrize(
    "acc,kw",
    [
        (torch.zeros(13, dtype=torch.float64), {}),
        (torch.zeros(13, dtype=torch.float16), {}),
        (torch.zeros(12), {}),
        (torch.zeros(1, 13), {}),
        (torch.zeros(26)[::2], {}),
        (torch.zeros(13), {"row_end": 8}),
        (torch.zeros(13), {"row_start": 5, "row_end": 4}),
        (torch.zeros(13), {"row_start": -1}),
        (torch.zeros(13), {"row_start": 8}),
    ],
    ids=["acc-float64", "acc-float16", "acc-short", "acc-2d", "acc-strided", "end-past", "start>end", "neg", "start-past"],
)
def test_validation_errors(acc, kw):
    x = _input((7, 13), torch.float32)
    with use_backend("reference"), pytest.raises(ValueError, match="sqnorm_accumulate"):
        sqnorm_accumulate(x, acc, **kw)
    if extension() is not None:
        with use_backend("cpu"), pytest.raises(ValueError, match="sqnorm_accumulate"):
            sqnorm_accumulate(x, acc, **kw)


def test_validation_bad_input_dtype():
    with pytest.raises(ValueError, match="x must be"):
        sqnorm_accumulate(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(4))


@needs_ext
def test_binding_rejects_unknown_dtype_and_bad_range():
    ext = extension()
    x = torch.ones(4, 3)
    acc = torch.zeros(3)
    with pytest.raises(ValueError, match="dtype"):
        ext.sqnorm_accumulate_cpu(x.data_ptr(), "int8", 4, 3, 0, 4, acc.data_ptr(), True)
    with pytest.raises(ValueError, match="row range"):
        ext.sqnorm_accumulate_cpu(x.data_ptr(), "float32", 4, 3, 0, 5, acc.data_ptr(), True)
    assert torch.equal(acc, torch.zeros(3))
    assert isinstance(ext.compiled_with_cuda(), bool)
    assert ext.openmp_threads() >= 1


@needs_ext
@pytest.mark.parametrize("token_norm", [True, False])
def test_opcheck(token_norm):
    x = _input((2, 6, 20), torch.float32)
    with use_backend("cpu"):
        torch.library.opcheck(sqnorm_accumulate, (x, torch.zeros(20)), {"row_start": 1, "token_norm": token_norm})
        torch.library.opcheck(sqnorm_accumulate, (x, torch.zeros(20), 2, 9, token_norm))
