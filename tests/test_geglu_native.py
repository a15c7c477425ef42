"""The C++ kernel geglu_accumulate_cpu, called directly on torch tensors (data pointers).

out = h * gelu(g) (exact gelu, computed in float32 or float64, rounded once) against torch's own
GEGLU in the same dtype and against float64; acc against a float64 statistic of the rounded out.
"""

from __future__ import annotations

import math

import pytest
import torch

from memcore.ops._ext import extension
from memcore.ops.sqnorm_accumulate import NATIVE_DTYPES, sqnorm_accumulate_reference

pytestmark = pytest.mark.skipif(
    extension() is None, reason="memcore._C is not built (pip install -e . builds it)"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1, 1), (7, 13), (33, 100), (256, 320), (128, 1280), (9, 5120)]
EPS32 = torch.finfo(torch.float32).eps


def native(p: torch.Tensor, acc: torch.Tensor, row_start: int, row_end: int, token_norm: bool) -> torch.Tensor:
    """Run the kernel on a contiguous [rows, 2 * inner] p; returns out, updates acc in place."""
    rows, width = p.shape
    out = torch.empty(rows, width // 2, dtype=p.dtype)
    extension().geglu_accumulate_cpu(
        p.data_ptr(), NATIVE_DTYPES[p.dtype], rows, width // 2, row_start, row_end, acc.data_ptr(), out.data_ptr(),
        token_norm,
    )
    return out


def make_p(rows: int, inner: int, dtype: torch.dtype, seed: int = 0, zero_rows: tuple[int, ...] = ()) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(rows, 2 * inner, generator=gen, dtype=torch.float64) * 2.5
    for r in zero_rows:
        p[r, :inner] = 0.0  # h = 0: a zero output row
    return p.to(dtype)


def exact_geglu(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h * gelu(g) in float64 from p's stored values, and the scale |h * g| of its rounding error."""
    h, g = p.to(torch.float64).chunk(2, dim=-1)
    return h * torch.nn.functional.gelu(g), (h * g).abs()


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` values at |x| (float64), subnormals included."""
    info = torch.finfo(dtype)
    mant = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}[dtype]
    exp = torch.floor(torch.log2(x.abs().clamp_min(info.tiny)))
    return torch.exp2(exp - mant)


def stat_reference(out: torch.Tensor, acc0: torch.Tensor, row_start: int, row_end: int, token_norm: bool):
    """The statistic of the kernel's own (rounded) out: the op's float64 reference."""
    acc = acc0.clone()
    sqnorm_accumulate_reference(out, acc, row_start, row_end, token_norm)
    return acc


def assert_out_close(out: torch.Tensor, p: torch.Tensor) -> None:
    """out is round(h * round(gelu(g))) as eager PyTorch computes GEGLU in the dtype: within half an
    ulp of the dtype per rounding (the first one scaled by |h|) plus float32's own error."""
    dtype = p.dtype
    exact, scale = exact_geglu(p)
    err = (out.to(torch.float64) - exact).abs()
    # float32 (float64) evaluation: a few eps of the result, plus the cancellation in 1 + erf(g / sqrt 2)
    # for negative g, which is eps of |h * g| / 2 per rounding
    work_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    bound = 4 * work_eps * (exact.abs() + scale)
    if dtype in (torch.float16, torch.bfloat16):
        h64, g64 = p.to(torch.float64).chunk(2, dim=-1)
        gelu64 = torch.nn.functional.gelu(g64)
        bound = bound + 0.5 * ulp(exact, dtype) + h64.abs() * 0.5 * ulp(gelu64, dtype)
    bad = (err > bound).nonzero()
    assert bad.numel() == 0, f"{len(bad)} outputs off, first at {bad[0].tolist()}: err {err[tuple(bad[0])]:.3g}"

    # and against torch's eager GEGLU in the same dtype (which rounds gelu(g) before multiplying)
    h, g = p.chunk(2, dim=-1)
    eager = (h * torch.nn.functional.gelu(g)).to(torch.float64)
    torch_err = (eager - exact).abs()
    # (float64's "exact" is torch's own evaluation, so allow a couple of eps besides)
    slack = 2 * work_eps * float((exact.abs() + scale).max())
    assert float(err.max()) <= 2 * float(torch_err.max()) + slack, (float(err.max()), float(torch_err.max()))
    tol = {torch.float32: 8 * EPS32, torch.float64: 8 * torch.finfo(torch.float64).eps}.get(dtype)
    if tol is None:  # half / bfloat16: torch rounds gelu(g), then the product (up to 1.5 ulp off)
        assert bool(((out.to(torch.float64) - eager).abs() <= 2 * ulp(exact, dtype) + bound).all())
    else:
        assert bool(((out.to(torch.float64) - eager).abs() <= tol * (exact.abs() + scale) + 1e-300).all())


@pytest.mark.parametrize("token_norm", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NATIVE_DTYPES[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_torch(shape, dtype, token_norm):
    rows, inner = shape
    p = make_p(rows, inner, dtype, seed=rows * inner)
    acc0 = torch.rand(inner, generator=torch.Generator().manual_seed(1))
    acc = acc0.clone()
    out = native(p, acc, 0, rows, token_norm)
    assert out.dtype == dtype and tuple(out.shape) == (rows, inner)
    assert_out_close(out, p)
    torch.testing.assert_close(acc, stat_reference(out, acc0, 0, rows, token_norm), rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NATIVE_DTYPES[d])
@pytest.mark.parametrize("row_range", [(0, 0), (0, 64), (64, 128), (10, 75), (127, 128)])
@pytest.mark.parametrize("token_norm", [True, False])
def test_row_ranges(dtype, row_range, token_norm):
    start, end = row_range
    p = make_p(128, 320, dtype, seed=3)
    acc0 = torch.rand(320, generator=torch.Generator().manual_seed(2))
    acc = acc0.clone()
    out = native(p, acc, start, end, token_norm)
    assert_out_close(out, p)  # every row gets its output, whatever the statistic range
    want = stat_reference(out, acc0, start, end, token_norm)
    torch.testing.assert_close(acc, want, rtol=4 * EPS32, atol=0)
    if start == end:
        assert torch.equal(acc, acc0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NATIVE_DTYPES[d])
def test_zero_rows_add_nothing(dtype):
    zero_rows = (0, 5, 6, 99)
    p = make_p(100, 77, dtype, seed=5, zero_rows=zero_rows)
    acc = torch.zeros(77)
    out = native(p, acc, 0, 100, True)
    assert not out[list(zero_rows)].any()
    # each nonzero row contributes exactly 1 in total
    assert float(acc.double().sum()) == pytest.approx(100 - len(zero_rows), rel=1e-5)
    torch.testing.assert_close(acc, stat_reference(out, torch.zeros(77), 0, 100, True), rtol=4 * EPS32, atol=0)
    # only zero rows: nothing at all
    acc = torch.zeros(77)
    native(p, acc, 5, 7, True)
    assert not acc.any()


# h values of special output rows (g = 2, gelu(2) = 1.95): out = h * gelu(g) holds them, rounded
SPECIAL_H = {
    "zeros": 0.0,
    "inf": float("inf"),
    "neg_inf": float("-inf"),
    "nan": float("nan"),
    "huge_1e25": 1e25,
    "huge_1.5e38": 1.5e38,
    "huge_1e200": 1e200,
    "tiny_1e-30": 1e-30,
    "float32_subnormal": 1e-41,
    "float64_square_subnormal": 1e-160,
    "float16_subnormal": 1e-6,
}


@pytest.mark.parametrize("token_norm", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NATIVE_DTYPES[d])
@pytest.mark.parametrize("inner", [3, 77, 300])
def test_special_rows_match_reference(inner, dtype, token_norm):
    """Rows of out that are zero, hold an inf or a NaN (whole rows and single entries), huge or tiny."""
    gen = torch.Generator().manual_seed(inner)
    rows = []
    for value in SPECIAL_H.values():
        rows.append(torch.randn(2 * inner, generator=gen, dtype=torch.float64))
        whole = torch.randn(2 * inner, generator=gen, dtype=torch.float64)
        whole[:inner] = value * (1 + 0.1 * torch.rand(inner, generator=gen, dtype=torch.float64))
        whole[inner:] = 2.0
        rows.append(whole)
        single = torch.randn(2 * inner, generator=gen, dtype=torch.float64)
        single[inner // 2] = value
        rows.append(single)
    p = torch.stack(rows).to(dtype)
    acc0 = torch.rand(inner, generator=gen)
    acc = acc0.clone()
    out = native(p, acc, 0, p.shape[0], token_norm)
    want = stat_reference(out, acc0, 0, p.shape[0], token_norm)
    torch.testing.assert_close(acc, want, rtol=4 * EPS32, atol=0, equal_nan=not token_norm)
    if token_norm:
        totals = out.double().square().sum(dim=1)
        counted = int(((totals > 0) & torch.isfinite(totals)).sum())
        assert counted < p.shape[0]  # some rows are skipped
        assert torch.isfinite(acc).all()
        assert float((acc - acc0).double().sum()) == pytest.approx(counted, rel=1e-5)


def test_special_gate_values():
    g = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, 8.0, -8.0, 30.0, -30.0, 1e4, -1e4])
    p = torch.cat([torch.full_like(g, 1.5), g]).reshape(1, -1)
    out = native(p, torch.zeros(g.numel()), 0, 1, False)
    assert_out_close(out, p)  # 1 + erf(g / sqrt 2) cancels for negative g, in torch's float32 too
    assert out[0, 8] == 45.0 and out[0, 10] == 1.5e4 and out[0, 9] == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NATIVE_DTYPES[d])
@pytest.mark.parametrize("token_norm", [True, False])
def test_deterministic(dtype, token_norm):
    p = make_p(2048, 320, dtype, seed=7)  # several row chunks
    acc1, acc2 = torch.zeros(320), torch.zeros(320)
    out1 = native(p, acc1, 0, 2048, token_norm)
    out2 = native(p, acc2, 0, 2048, token_norm)
    assert torch.equal(out1, out2)
    assert torch.equal(acc1, acc2)
    # a statistic accumulated in two calls agrees with one call (to float rounding)
    acc3 = torch.zeros(320)
    native(p, acc3, 0, 1024, token_norm)
    native(p, acc3, 1024, 2048, token_norm)
    torch.testing.assert_close(acc3, acc1, rtol=4 * EPS32, atol=0)


def test_matches_sqnorm_accumulate_of_the_output():
    from memcore.ops.sqnorm_accumulate import sqnorm_accumulate_reference

    p = make_p(300, 640, torch.float16, seed=11)
    acc = torch.zeros(640)
    out = native(p, acc, 100, 300, True)
    want = torch.zeros(640)
    sqnorm_accumulate_reference(out, want, 100, 300, True)
    torch.testing.assert_close(acc, want, rtol=4 * EPS32, atol=0)
    assert math.isclose(float(acc.double().sum()), 200.0, rel_tol=1e-5)


def test_empty_and_errors():
    ext = extension()
    p = make_p(4, 8, torch.float32)
    acc = torch.zeros(8)
    out = torch.empty(4, 8)
    ext.geglu_accumulate_cpu(p.data_ptr(), "float32", 0, 8, 0, 0, acc.data_ptr(), out.data_ptr(), True)  # no rows
    with pytest.raises(ValueError, match="row range"):
        ext.geglu_accumulate_cpu(p.data_ptr(), "float32", 4, 8, 3, 5, acc.data_ptr(), out.data_ptr(), True)
    with pytest.raises(ValueError, match="row range"):
        ext.geglu_accumulate_cpu(p.data_ptr(), "float32", 4, 8, 3, 2, acc.data_ptr(), out.data_ptr(), True)
    with pytest.raises(ValueError, match="shape"):
        ext.geglu_accumulate_cpu(p.data_ptr(), "float32", 4, 0, 0, 4, acc.data_ptr(), out.data_ptr(), True)
    with pytest.raises(ValueError, match="dtype"):
        ext.geglu_accumulate_cpu(p.data_ptr(), "int32", 4, 8, 0, 4, acc.data_ptr(), out.data_ptr(), True)
    assert not acc.any()


def test_float32_gelu_is_as_accurate_as_torch():
    """The vectorizable erf (a rational fit evaluated in double) against torch's float32 gelu.

    With h = 1, out = gelu(g) rounded once to float32. Over a dense grid of g covering both tails, the
    error against the float64 gelu stays within half an ulp of the result plus what one float32
    rounding of 1 + erf costs (eps32 |g| / 2, the error scale of any float32 ``1 + erf``), and both its
    largest and its mean error are below torch's float32 gelu's.
    """
    g = torch.cat([torch.linspace(-12, 12, 2_000_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 5.54, -5.54])])
    g = g.to(torch.float32)
    p = torch.cat([torch.ones_like(g), g]).reshape(1, -1)  # one row: h = 1, then g
    out = native(p, torch.zeros(g.numel()), 0, 0, True)[0].double()
    exact = torch.nn.functional.gelu(g.double())
    err = (out - exact).abs()
    bound = ulp(exact, torch.float32) / 2 + EPS32 * g.double().abs() / 2
    bad = torch.nonzero(err > bound).flatten()
    assert bad.numel() == 0, f"{bad.numel()} beyond the bound, first g {g[bad[:5]].tolist()}, err {err[bad[:5]].tolist()}"
    torch_err = (torch.nn.functional.gelu(g).double() - exact).abs()
    assert err.max() < torch_err.max() and err.mean() < torch_err.mean(), (err.max(), torch_err.max(), err.mean(), torch_err.mean())
