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
"""

from __future__ import annotations

import os

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
from memcore.ops.wanda_mask import unpack_mask, wanda_mask_reference  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps

# --- helpers ----------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plain_statistic(x: torch.Tensor, acc0: torch.Tensor, row_start: int, row_end: int | None, token_norm: bool):
    """What plain float32 PyTorch computes for the statistic (the error yardstick)."""
    rows = x.reshape(-1, x.shape[-1])[row_start:row_end].float()
    sq = rows.square()
    if token_norm:
        total = sq.sum(dim=1, keepdim=True)
        sq = torch.where(total > 0, sq / total, torch.zeros(()))
    return acc0 + sq.sum(dim=0)


def _reference64(x, acc0, row_start, row_end, token_norm) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])[row_start:row_end].double()
    sq = rows.square()
    if token_norm:
        total = sq.sum(dim=1, keepdim=True)
        sq = torch.where(total > 0, sq / total, torch.zeros((), dtype=torch.float64))
    return acc0.double() + sq.sum(dim=0)


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
