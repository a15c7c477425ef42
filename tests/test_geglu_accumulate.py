"""memcore::geglu_accumulate against diffusers' GEGLU and the float64 statistic.

Every backend that can run on the CPU here (reference; cpu once the extension has it) is checked:
X against ``diffusers.models.activations.GEGLU`` itself, the accumulator against float64 within
twice plain PyTorch's own float32 error, bit-identical reruns, opcheck and validation. The Triton
backend is covered by tests/test_triton.py.
"""

from __future__ import annotations

import pytest
import torch

from memcore.ops import geglu_accumulate, geglu_accumulate_reference, use_backend
from memcore.ops._ext import extension
from memcore.ops.sqnorm_accumulate import NATIVE_DTYPES

EPS32 = torch.finfo(torch.float32).eps
_EXT = extension()
CPU_BACKENDS = ["reference"] + (["cpu"] if _EXT is not None and hasattr(_EXT, "geglu_accumulate_cpu") else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (leading shape of x, dim, inner): tiny, odd, and SD 1.x's three widths on a few tokens
MODULE_SHAPES = [((1, 1), 4, 1), ((3, 7), 16, 33), ((2, 64), 320, 1280), ((2, 16), 640, 2560), ((2, 8), 1280, 5120)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _geglu_module(dim: int, inner: int, dtype: torch.dtype, seed: int = 0):
    from diffusers.models.activations import GEGLU

    torch.manual_seed(seed)
    return GEGLU(dim, inner).to(dtype).eval()


def _run(backend, p, acc, row_start=0, row_end=None, token_norm=True):
    with use_backend(backend):
        return geglu_accumulate(p, acc, row_start, row_end, token_norm)


def _statistic(x, acc0, row_start, row_end, token_norm, dtype):
    """acc0 + the statistic of X's rows, computed in ``dtype`` (float64: the truth; float32: plain torch)."""
    rows = x.reshape(-1, x.shape[-1])[row_start:row_end].to(dtype)
    sq = rows.square()
    if token_norm:
        total = sq.sum(dim=1, keepdim=True)
        sq = torch.where(total > 0, sq / total, torch.zeros((), dtype=dtype))
    return acc0.to(dtype) + sq.sum(dim=0)


def assert_acc_close(got, x, acc0, row_start=0, row_end=None, token_norm=True):
    """|got - fp64| <= 2 |plain fp32 torch - fp64| + 1 ulp (a float64 sum rounded once is within 1/2 ulp)."""
    want = _statistic(x, acc0, row_start, row_end, token_norm, torch.float64)
    plain = _statistic(x, acc0, row_start, row_end, token_norm, torch.float32).double()
    err = (got.double() - want).abs()
    bound = 2 * (plain - want).abs() + EPS32 * want.abs() + 1e-30
    bad = torch.nonzero(err > bound).flatten()
    assert bad.numel() == 0, (
        f"{bad.numel()} of {got.numel()} columns beyond the bound; first {bad[:5].tolist()}: "
        f"got {got[bad[:5]].tolist()}, want {want[bad[:5]].tolist()}, bound {bound[bad[:5]].tolist()}"
    )


def assert_output_close(got, want, p):
    """X within 2x diffusers' own error against float64 GEGLU, plus one rounding of X and the error any
    float32 ``1 + erf(g / sqrt 2)`` makes in gelu's tail (a few eps32 of |h g|)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    h, g = p.double().chunk(2, dim=-1)
    exact = h * torch.nn.functional.gelu(g)
    err = (got.double() - exact).abs()
    bound = 2 * (want.double() - exact).abs() + torch.finfo(p.dtype).eps * exact.abs()
    bound += 4 * EPS32 * (h * g).abs() + 1e-30
    bad = torch.nonzero(err > bound)
    assert bad.numel() == 0, f"{len(bad)} of {got.numel()} outputs beyond the bound; first {bad[:5].tolist()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NATIVE_DTYPES[d])
@pytest.mark.parametrize("leading,dim,inner", MODULE_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_diffusers_geglu(backend, leading, dim, inner, dtype):
    module = _geglu_module(dim, inner, dtype)
    x = torch.randn((*leading, dim), generator=_gen(inner)).to(dtype)
    with torch.no_grad():
        want = module(x)
        p = module.proj(x)
    acc0 = torch.rand(inner, generator=_gen(1))
    for token_norm in (True, False):
        acc = acc0.clone()
        got = _run(backend, p, acc, token_norm=token_norm)
        if backend == "reference":
            assert torch.equal(got, want)  # the same expression as diffusers'
        else:
            assert_output_close(got, want, p)
        assert_acc_close(acc, got, acc0, token_norm=token_norm)


@pytest.mark.parametrize("token_norm", [True, False], ids=["token_norm", "raw"])
@pytest.mark.parametrize(
    "row_start,row_end", [(0, None), (0, 0), (3, 11), (14, 15), (5, None), (15, 15)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_row_ranges(backend, row_start, row_end, token_norm):
    p = torch.randn(3, 5, 2 * 33, generator=_gen(5)) * 2  # 15 rows
    p[0, 2, :33] = 0.0  # a zero row of X
    acc0 = torch.rand(33, generator=_gen(2)) * 10
    acc = acc0.clone()
    got = _run(backend, p, acc, row_start, row_end, token_norm)
    assert got.shape == (3, 5, 33)
    assert_output_close(got, geglu_accumulate_reference(p, acc0.clone()), p)
    assert_acc_close(acc, got, acc0, row_start, row_end, token_norm)
    if row_end == row_start:
        assert torch.equal(acc, acc0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NATIVE_DTYPES[d])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_runs_are_bit_identical(backend, dtype):
    p = (torch.randn(2, 300, 2 * 640, generator=_gen(7)) * 3).to(dtype)
    acc0 = torch.rand(640, generator=_gen(3))
    results = []
    for _ in range(2):
        acc = acc0.clone()
        results.append((_run(backend, p, acc, 10, 500), acc))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_and_empty(backend):
    base = torch.randn(10, 80, generator=_gen(4))
    p = base[:, 4:68]  # rows of 64 (inner 32) with a row stride of 80
    assert not p.is_contiguous()
    acc0 = torch.rand(32, generator=_gen(6))
    acc = acc0.clone()
    got = _run(backend, p, acc, 2, 9)
    want = geglu_accumulate_reference(p.contiguous(), acc0.clone())
    if backend == "reference":
        assert torch.equal(got, want)
    else:
        assert_output_close(got, want, p)
    assert_acc_close(acc, got, acc0, 2, 9)

    empty_acc = torch.ones(8)
    out = _run(backend, torch.zeros(0, 3, 16), empty_acc)
    assert out.shape == (0, 3, 8) and torch.equal(empty_acc, torch.ones(8))


@pytest.mark.parametrize("token_norm", [True, False], ids=["token_norm", "raw"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend, token_norm):
    p = torch.randn(2, 6, 40, generator=_gen(8))
    with use_backend(backend):
        torch.library.opcheck(geglu_accumulate, (p, torch.zeros(20)), {"row_start": 1, "token_norm": token_norm})
        torch.library.opcheck(geglu_accumulate, (p, torch.zeros(20), 2, 9, token_norm))


def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p = torch.empty(2, 7, 2 * 48, dtype=torch.bfloat16)
        out = geglu_accumulate(p, torch.zeros(48))
    assert out.shape == (2, 7, 48) and out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "p,acc,kw,name",
    [
        (torch.zeros(7, 26, dtype=torch.int32), torch.zeros(13), {}, "proj_out"),
        (torch.zeros(7, 25), torch.zeros(12), {}, "proj_out"),
        (torch.zeros(7, 0), torch.zeros(0), {}, "proj_out"),
        (torch.zeros(7, 26), torch.zeros(13, dtype=torch.float64), {}, "acc"),
        (torch.zeros(7, 26), torch.zeros(13, dtype=torch.float16), {}, "acc"),
        (torch.zeros(7, 26), torch.zeros(26), {}, "acc"),
        (torch.zeros(7, 26), torch.zeros(1, 13), {}, "acc"),
        (torch.zeros(7, 26), torch.zeros(26)[::2], {}, "acc"),
        (torch.zeros(7, 26), torch.zeros(13, device="meta"), {}, "acc"),
        (torch.zeros(7, 26), torch.zeros(13), {"row_end": 8}, "row range"),
        (torch.zeros(7, 26), torch.zeros(13), {"row_start": 5, "row_end": 4}, "row range"),
        (torch.zeros(7, 26), torch.zeros(13), {"row_start": -1}, "row range"),
        (torch.zeros(7, 26), torch.zeros(13), {"row_start": 8}, "row range"),
    ],
    ids=[
        "p-int32",
        "p-odd",
        "p-empty-features",
        "acc-float64",
        "acc-float16",
        "acc-long",
        "acc-2d",
        "acc-strided",
        "acc-device",
        "end-past",
        "start>end",
        "neg",
        "start-past",
    ],
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_validation_errors(backend, p, acc, kw, name):
    before = acc.clone() if acc.device.type == "cpu" else None
    with use_backend(backend), pytest.raises(ValueError, match=f"geglu_accumulate: {name}"):
        geglu_accumulate(p, acc, **kw)
    if before is not None:
        assert torch.equal(acc, before)


def test_exported_from_memcore_ops():
    import memcore.ops

    assert "geglu_accumulate" in memcore.ops.__all__ and "geglu_accumulate_reference" in memcore.ops.__all__
