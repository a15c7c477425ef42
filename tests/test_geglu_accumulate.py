"""memcore::geglu_accumulate on every backend, against the one oracle of tests/helpers.py.

Every behavioural test runs on each backend (reference, cpu, triton, cuda; absent ones are skipped
with the reason) with the same rule: X within twice eager PyTorch's own error against float64 GEGLU
(``assert_geglu_close``), its non-finite values where eager PyTorch puts them, and the statistic that
of X as returned (``assert_statistic_close``; ``assert_sums_close`` where the float32 yardstick breaks
down). Covered: diffusers' GEGLU module, tiny to SD 1.5 widths in every dtype, row ranges, zero rows,
special rows (huge, tiny, subnormal, inf, NaN; in h, in g and from an overflowing product), special
gate values, strided input, agreement with sqnorm_accumulate of X, run-to-run bit identity, opcheck
and fake tensors. Triton on the CPU runs in its interpreter, so its shapes are small and the widest
ones run on a GPU only. Validation, which runs before any backend, is checked once.

Backend-specific kernel facts, in tests named after their backend: Triton's chunked path for rows
wider than one block and its several-program launch; the C++ kernel's direct binding (its float32
gelu is as accurate as torch's, its argument checks); the CUDA kernels with and without their
shared-memory plans (the ``smem_fallback`` fixture).
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from helpers import (  # noqa: F401 (smem_fallback: a fixture, used by name)
    DTYPES,
    EPS32,
    HAS_CUDA,
    INF,
    NAN,
    acc0,
    assert_geglu_close,
    assert_statistic_close,
    assert_sums_close,
    backend_device,
    backends,
    dtype_id,
    forced,
    interpreted,
    proj_out,
    run_geglu,
    run_sqnorm,
    same_bits,
    skip_on_interpreter,
    smem_fallback,  # noqa: F401  (a fixture,
    special_rows,
    statistic,
)

from memcore.ops import geglu_accumulate, sqnorm_accumulate, use_backend
from memcore.ops._common import NATIVE_DTYPES
from memcore.ops._ext import extension

OP = "geglu_accumulate"
ALL = backends(OP)
TRITON = backends(OP, only=("triton",))
CPU = backends(OP, only=("cpu",))
CUDA = backends(OP, only=("cuda",))
TOKEN_NORM = pytest.mark.parametrize("token_norm", [True, False], ids=["token_norm", "raw"])
EVERY_DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
TRITON_BLOCK_COLS = 8192  # memcore._kernels._launch.MAX_BLOCK_COLS (importing it imports triton)


def on_gpu(backend: str) -> bool:
    return backend_device(backend).type == "cuda"


# Off a GPU, X keeps to about CPU_X elements where a test allows: past 2 * CPU_X elements (P), torch's
# own ops in the oracle go multi-threaded, which is slow on a small shared machine; CPU_X is just
# enough for the C++ kernel's parallel path (rows * inner >= 16384). In Triton's interpreter, one
# tile's worth (8192 elements, about 0.05 s).
CPU_X = 16384
INTERPRETER_X = 8192


def assert_non_finite_where_eager(got: torch.Tensor, p: torch.Tensor) -> None:
    """inf and NaN of X exactly where eager PyTorch's ``h * gelu(g)`` has them (assert_geglu_close
    compares non-finite values after nan_to_num, where a NaN and a 0 look alike)."""
    h, g = p.chunk(2, dim=-1)
    eager = h * torch.nn.functional.gelu(g)
    assert torch.equal(got.isnan(), eager.isnan()), "NaN of X differ from eager PyTorch's"
    assert torch.equal(got.isinf(), eager.isinf()), "inf of X differ from eager PyTorch's"


def check(backend, p, row_start=0, row_end=None, token_norm=True, start=None):
    """Run ``backend`` on p; X and the statistic of X's rows [row_start, row_end) against the oracle.
    Returns (X, acc) on the CPU."""
    start = acc0(p.shape[-1] // 2) if start is None else start
    x, acc = run_geglu(backend, p, start, row_start, row_end, token_norm)
    assert_geglu_close(x, p)
    assert_statistic_close(acc, x, start, row_start, row_end, token_norm)
    return x, acc


def run_here(backend, p, start, row_start=0, row_end=None, token_norm=True):
    """Like helpers.run_geglu, but (X, acc) stay on the backend's device, for GPU shapes whose oracle
    is cheaper there (helpers' asserts run on any device)."""
    device = backend_device(backend)
    acc = start.to(device, copy=True)
    with forced(backend):
        x = geglu_accumulate(p.to(device), acc, row_start, row_end, token_norm)
    return x, acc


def fit(backend: str, leading: tuple[int, ...], inner: int) -> tuple[int, ...]:
    """``leading`` on a GPU; elsewhere at most CPU_X // inner rows (INTERPRETER_X // inner in Triton's
    interpreter), at least one."""
    if on_gpu(backend):
        return leading
    cap = max(1, (INTERPRETER_X if interpreted(backend) else CPU_X) // inner)
    return leading if math.prod(leading) <= cap else (cap,)


# --- against diffusers' GEGLU ---------------------------------------------------------------------

# (leading shape of the module's input, dim, inner): tiny, odd, and SD 1.x's three widths on a few
# tokens (fewer off a GPU: see fit)
MODULE_SHAPES = [((1, 1), 4, 1), ((3, 7), 16, 33), ((2, 64), 320, 1280), ((2, 16), 640, 2560), ((2, 8), 1280, 5120)]


@functools.cache
def geglu_module(dim: int, inner: int):
    """diffusers' GEGLU in float32, made once (the SD widths have millions of weights)."""
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    return GEGLU(dim, inner).eval()


@functools.cache
def module_io(leading: tuple[int, ...], dim: int, inner: int, dtype: torch.dtype):
    """(P, X) of diffusers' GEGLU in ``dtype``: its projection's output and the module's output, for
    a random input of shape leading + [dim] (once for all the backends that share the shape)."""
    module = copy.deepcopy(geglu_module(dim, inner)).to(dtype)
    x = torch.randn((*leading, dim), generator=torch.Generator().manual_seed(inner)).to(dtype)
    with torch.no_grad():
        return module.proj(x), module(x)


@EVERY_DTYPE
@pytest.mark.parametrize("leading,dim,inner", MODULE_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", ALL)
def test_matches_diffusers_geglu(backend, leading, dim, inner, dtype):
    p, want = module_io(fit(backend, leading, inner), dim, inner, dtype)
    h, g = p.chunk(2, dim=-1)
    assert torch.equal(h * torch.nn.functional.gelu(g), want), "diffusers' GEGLU is no longer the oracle's eager X"
    for token_norm in (True, False):
        got, _ = check(backend, p, token_norm=token_norm)
        if backend == "reference":
            assert torch.equal(got, want)  # the same expression as diffusers'


# --- widths, dtypes and row ranges ----------------------------------------------------------------

# (leading shape, inner): P is leading + [2 inner], every fourth row of X zero; off a GPU, fewer rows
# (see fit)
SHAPES = [
    ((1,), 1),
    ((300,), 1),
    ((7,), 13),
    ((2, 5), 33),
    ((300,), 33),
    ((33,), 100),
    ((256,), 64),  # on the CPU: 4 chunks of the C++ kernel, in parallel
    ((256,), 320),
    ((300,), 1000),
    ((128,), 1280),
    ((9,), 5120),  # one Triton block of 8192 columns
    ((300,), 4097),
    ((300,), 12289),  # wider than one Triton block: chunked
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in Triton's interpreter, on the inf row
@EVERY_DTYPE
@pytest.mark.parametrize("leading,inner", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", ALL)
def test_widths_and_dtypes(backend, leading, inner, dtype):
    if inner > TRITON_BLOCK_COLS:
        skip_on_interpreter(backend, f"{inner}-wide rows (chunked; test_triton_chunked_rows runs that path here)")
    check_widths(backend, fit(backend, leading, inner), inner, dtype)


def check_widths(backend, leading, inner, dtype):
    """With token_norm, rows with an inf row among them, a range that leaves out rows at both ends,
    twice (bit-identical; once in Triton's interpreter, which runs its programs in order); without,
    every row of clean P."""
    p = proj_out(leading, inner, dtype, seed=inner)
    rows = math.prod(leading)
    with_inf = p.clone()
    if rows > 1:
        with_inf.view(rows, -1)[min(3, rows - 1), :inner] = INF
    start = acc0(inner)
    cut = min(2, rows // 3)
    runs = [run_geglu(backend, with_inf, start, cut, rows - cut) for _ in range(1 if interpreted(backend) else 2)]
    x, acc = runs[0]
    assert_non_finite_where_eager(x, with_inf)
    assert_geglu_close(x, with_inf)
    assert torch.isfinite(acc).all()
    assert_statistic_close(acc, x, start, cut, rows - cut)
    for x_again, acc_again in runs[1:]:
        assert same_bits(x_again, x) and same_bits(acc_again, acc), "two runs differ"
    check(backend, p, 0, None, False, start)


# (leading shape, inner, row ranges, (a, b, c): [a, b) then [b, c) onto the same acc): 15 rows in one
# tile; 128 rows: up to 2 chunks of the C++ kernel (in parallel) and 2 Triton tiles
ROW_RANGE_CASES = {
    "15-rows": ((3, 5), 33, [(0, 0), (3, 11), (14, 15), (15, 15)], (3, 11, None)),
    "128-rows": ((128,), 128, [(0, 64), (10, 75), (127, 128)], (0, 64, 128)),
}


@TOKEN_NORM
@EVERY_DTYPE
@pytest.mark.parametrize("case", ROW_RANGE_CASES)
@pytest.mark.parametrize("backend", ALL)
def test_row_ranges(backend, case, dtype, token_norm):
    if interpreted(backend) and case == "128-rows" and dtype != torch.float32:
        pytest.skip("row ranges across Triton tiles: float32 in the interpreter (slow); every dtype on a GPU")
    leading, inner, ranges, (a, b, c) = ROW_RANGE_CASES[case]
    p = proj_out(leading, inner, dtype, seed=5)
    start = acc0(inner, seed=2)
    accs = {}
    for row_start, row_end in ranges:
        x, accs[row_start, row_end] = check(backend, p, row_start, row_end, token_norm, start)
        if row_start == row_end:
            assert torch.equal(accs[row_start, row_end], start), "an empty row range added something"
    # a second call over the next rows adds to what the first left
    _, both = run_geglu(backend, p, accs[a, b], b, c, token_norm)
    assert_statistic_close(both, x, start, a, c, token_norm)


@EVERY_DTYPE
@pytest.mark.parametrize("backend", ALL)
def test_zero_rows_add_nothing(backend, dtype):
    p = proj_out((100,), 77, dtype, seed=5)  # h = 0 in rows 1, 5, 9, ...
    p[[0, 6, 99], :77] = 0.0
    zero = (p[:, :77] == 0).all(dim=1)
    x, acc = check(backend, p, start=torch.zeros(77))
    assert not x[zero].any() and x[~zero].any(dim=1).all()
    # each other row adds 1 in total
    assert float(acc.double().sum()) == pytest.approx(int((~zero).sum()), rel=1e-5)
    _, only_zero = run_geglu(backend, p, torch.zeros(77), 5, 7)
    assert not only_zero.any(), "a zero row added something"


# --- special values -------------------------------------------------------------------------------


def special_proj_out(inner: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, int]:
    """(P, first) for rows of X that are ordinary, huge, tiny, subnormal, zero, inf or NaN; rows from
    ``first`` on surely give a zero or non-finite row of X (they add nothing with token_norm).

    h = helpers.special_rows with g = 2 (gelu(2) = 1.95: X holds h's values, rounded; a huge h may
    overflow to inf); then X near the dtype's largest finite value (the whole row, or one value among
    ordinary ones), finite h and g whose product overflows the dtype (300 gelu(300) in float16,
    1e25 gelu(1e25) in float32 and bfloat16), an all-NaN row, +inf next to -inf, and NaN from h,
    from g, or from g = -inf. g = +inf is left out: 0.5 g (1 + erf) at +inf is inf or NaN depending
    on how gelu is evaluated (eager PyTorch has given NaN on the CPU and inf on a GPU).
    """
    gen = torch.Generator().manual_seed(seed)
    counted, dropped = (rows.double() for rows in special_rows(inner, dtype, seed))
    wide = dtype == torch.float64
    one = torch.ones(inner, dtype=torch.float64)
    h = torch.randn(inner, generator=gen, dtype=torch.float64)
    g = torch.randn(inner, generator=gen, dtype=torch.float64) * 2
    mid = inner // 2

    def with_value(row, value):
        row = row.clone()
        row[mid] = value
        return row

    big = 1e150 if wide else 0.9 * torch.finfo(dtype).max  # gelu(1) = 0.84: X = 0.76 max
    overflow = 300.0 if dtype == torch.float16 else (1e200 if wide else 1e25)
    maybe = [torch.cat([row, 2 * one]) for row in counted]
    maybe += [torch.cat([one * big, one]), torch.cat([with_value(h, big), one]), torch.cat([one, one]) * overflow]
    inf_and_neg_inf = torch.cat([one[:mid] * INF, one[mid:] * -INF])
    surely = [torch.cat([row, 2 * one]) for row in (*dropped, one * NAN, inf_and_neg_inf)]
    surely += [torch.cat([with_value(h, NAN), g])] + [torch.cat([h, with_value(g, bad)]) for bad in (NAN, -INF)]
    return torch.stack(maybe + surely).to(dtype), len(maybe)


def check_special_rows(run, inner, dtype):
    """``run(p, acc0, row_start, row_end, token_norm) -> (X, acc)`` on special_proj_out's rows."""
    p, first = special_proj_out(inner, dtype, seed=inner)
    n = len(p)
    start = acc0(inner)
    for row_start, row_end in ((0, n), (1, n - 1)):
        x, acc = run(p, start, row_start, row_end, True)
        assert_non_finite_where_eager(x, p)
        assert_geglu_close(x, p)
        assert_sums_close(acc, statistic(x, start, row_start, row_end), row_end - row_start)
    _, acc = run(p, start, first, n, True)
    assert torch.equal(acc, start), "a zero or non-finite row of X added something"
    # without token_norm: the plain squares, inf and NaN included
    x, acc = run(p, start, 0, n, False)
    want = statistic(x, start, token_norm=False).float()
    torch.testing.assert_close(acc, want, rtol=(4 + n) * EPS32, atol=0, equal_nan=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in Triton's interpreter, on inf and NaN
@pytest.mark.parametrize("inner", [3, 77, 300, 4097], ids=lambda n: f"inner={n}")
@EVERY_DTYPE
@pytest.mark.parametrize("backend", ALL)
def test_special_rows(backend, dtype, inner):
    """Zero and non-finite rows of X add exactly nothing (also when P is finite); huge, tiny and
    subnormal rows add their normalized squares without overflow or underflow."""
    if inner > 300 and not on_gpu(backend):
        pytest.skip(f"{inner}-wide special rows: a GPU width (the CPU kernels have no boundary there); runs on a GPU")
    if inner == 77:
        skip_on_interpreter(backend, "a third width of special rows")
    check_special_rows(lambda *args: run_geglu(backend, *args), inner, dtype)


@EVERY_DTYPE
@pytest.mark.parametrize("backend", ALL)
def test_special_gate_values(backend, dtype):
    """g at 0, -0, tiny, and far in both tails, where 1 + erf(g / sqrt 2) cancels for negative g."""
    g = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, 8.0, -8.0, 30.0, -30.0, 1e4, -1e4], dtype=torch.float64)
    p = torch.cat([torch.full_like(g, 1.5), g]).reshape(1, -1).to(dtype)
    x, _ = check(backend, p, token_norm=False)
    assert x[0, 8] == 45.0 and x[0, 9] == 0.0  # gelu(30) = 30, gelu(-30) = -0
    if dtype in (torch.float32, torch.float64):
        assert x[0, 10] == 1.5e4


# --- layout, the statistic's definition, determinism ----------------------------------------------


def run_view(backend, base, view, start, row_start=0, row_end=None, token_norm=True):
    """Like run_geglu on ``view(base)``, the view taken on the backend's device (a copy of a view that
    is not dense would be contiguous)."""
    device = backend_device(backend)
    p, acc = view(base.to(device)), start.to(device, copy=True)
    assert not p.is_contiguous() and p.stride(-1) == 1
    with forced(backend):
        x = geglu_accumulate(p, acc, row_start, row_end, token_norm)
    return x.cpu(), acc.cpu()


@pytest.mark.parametrize("backend", ALL)
def test_strided_input(backend):
    base = proj_out((10,), 40, torch.float32, seed=4)
    start = acc0(32)
    sliced = base[:, 4:68]  # rows of 64 (inner 32) with a row stride of 80
    for row_start, row_end, token_norm in ((2, 9, True), (0, None, False)):
        x, acc = run_view(backend, base, lambda b: b[:, 4:68], start, row_start, row_end, token_norm)
        assert_geglu_close(x, sliced)
        assert_statistic_close(acc, x, start, row_start, row_end, token_norm)
    # leading dimensions in another order
    base = proj_out((4, 3), 24, torch.float32, seed=2)
    start = acc0(24)
    x, acc = run_view(backend, base, lambda b: b.transpose(0, 1), start, 1, 11)
    assert_geglu_close(x, base.transpose(0, 1))
    assert_statistic_close(acc, x, start, 1, 11)


def test_empty_input():
    """No rows: an empty X, acc untouched (before any backend is chosen)."""
    acc = torch.ones(8)
    out = geglu_accumulate(torch.zeros(0, 3, 16, dtype=torch.bfloat16), acc)
    assert out.shape == (0, 3, 8) and out.dtype == torch.bfloat16 and torch.equal(acc, torch.ones(8))


@EVERY_DTYPE
@pytest.mark.parametrize("backend", ALL)
def test_statistic_is_sqnorm_accumulate_of_x(backend, dtype):
    """geglu_accumulate(P, acc) adds what sqnorm_accumulate(X, acc) adds."""
    rows = 300 if on_gpu(backend) else 24
    p = proj_out((rows,), 640, dtype, seed=11)
    zeros = torch.zeros(640)
    x, acc = check(backend, p, rows // 3, rows, True, zeros)
    # sqnorm_accumulate on the same backend, within the same bound of the same oracle
    assert_statistic_close(run_sqnorm(backend, x, zeros, rows // 3, rows), x, zeros, rows // 3, rows)
    counted = int((x[rows // 3 :].double().square().sum(dim=1) > 0).sum())
    assert float(acc.double().sum()) == pytest.approx(counted, rel=1e-5)


def check_run_to_run(backend, rows, inner, row_start, row_end, dtype, token_norm, runs=2):
    p = proj_out((rows,), inner, dtype, seed=7).to(backend_device(backend))
    start = acc0(inner, seed=3).to(p.device)
    results = [run_here(backend, p, start, row_start, row_end, token_norm) for _ in range(runs)]
    for x, acc in results[1:]:
        assert same_bits(x, results[0][0]) and same_bits(acc, results[0][1]), "two runs differ"
    x, acc = results[0]
    assert_geglu_close(x, p)
    assert_statistic_close(acc, x, start, row_start, row_end, token_norm)


# rows, inner, row range: many blocks per column on a GPU; 4 chunks of the C++ kernel, in parallel, on
# the CPU; 5 Triton tiles on 4 programs under the interpreter (see test_triton_run_to_run_shape)
RUN_TO_RUN_GPU = (8192, 1280, 100, 8000)
RUN_TO_RUN_CPU = (256, 64, 10, 250)
RUN_TO_RUN_INTERPRETER = (40, 1024, 1, 39)


def run_to_run_shape(backend):
    if interpreted(backend):
        return RUN_TO_RUN_INTERPRETER
    return RUN_TO_RUN_GPU if backend_device(backend).type == "cuda" else RUN_TO_RUN_CPU


@TOKEN_NORM
@EVERY_DTYPE
@pytest.mark.parametrize("backend", ALL)
def test_runs_are_bit_identical(backend, dtype, token_norm):
    if interpreted(backend) and dtype != torch.float32:
        pytest.skip("run-to-run identity under Triton's interpreter, which runs programs in order: float32 only")
    check_run_to_run(backend, *run_to_run_shape(backend), dtype, token_norm)


# --- SD 1.5 shapes ----------------------------------------------------------------------------------

# (tokens per image, inner) of SD 1.5's GEGLUs at 64x64, 32x32, 16x16 and 8x8 latents
SD15_SHAPES = [(4096, 1280), (1024, 2560), (256, 5120), (64, 5120)]


@pytest.mark.parametrize("batch", [2, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("tokens,inner", SD15_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", ALL)
def test_sd15_shapes(backend, tokens, inner, dtype, batch):
    """The statistic of the second half of a batch (the prompt range of a guided run), also as
    sqnorm_accumulate computes it from X."""
    skip_on_interpreter(backend, "SD 1.5 shape")
    if not on_gpu(backend) and (batch > 2 or tokens > 64 or dtype != torch.float16):
        pytest.skip("SD 1.5 shape: on the CPU only the smallest, in float16 (the others, of 10 to 700 MB, on a GPU)")
    device = backend_device(backend)  # the oracle too: up to 168M values of P
    gen = torch.Generator(device=device).manual_seed(inner)
    p = torch.randn(batch, tokens, 2 * inner, generator=gen, device=device).to(dtype)
    half = batch * tokens // 2
    zeros = torch.zeros(inner, device=device)
    x, acc = run_here(backend, p, zeros, half, None, True)
    assert_geglu_close(x, p)
    assert_statistic_close(acc, x, zeros, half, None, True)
    by_sqnorm = zeros.clone()
    with forced(backend):
        sqnorm_accumulate(x, by_sqnorm, half, None)
    assert_statistic_close(by_sqnorm, x, zeros, half, None, True)
    x_raw, acc = run_here(backend, p, zeros, half, None, False)
    assert torch.equal(x_raw, x), "X depends on token_norm"
    assert_statistic_close(acc, x, zeros, half, None, False)


@TOKEN_NORM
@EVERY_DTYPE
@pytest.mark.parametrize("backend", ALL)
def test_shared_memory_boundary_widths(backend, dtype, token_norm):
    """Widths where the CUDA kernel's row no longer fits 48 KiB or the opt-in shared memory (on this
    GPU when there is one, else those of an H100); 12289 is also past one Triton block."""
    skip_on_interpreter(backend, "shared-memory boundary widths")
    if not on_gpu(backend) and not token_norm:
        pytest.skip("CUDA and Triton boundaries, none of the CPU kernels: on the CPU with token_norm only")
    rows = 3 if on_gpu(backend) else 1
    for inner in boundary_widths(dtype, token_norm):
        p = torch.randn(rows, 2 * inner, generator=torch.Generator().manual_seed(inner)).to(dtype)
        check(backend, p, 0, rows, token_norm)


def boundary_widths(dtype: torch.dtype, token_norm: bool) -> list[int]:
    """The boundary widths measured on an H100, and this GPU's own from its static shared memory and
    opt-in limit (per column: a double column sum, and with token_norm the row's value)."""
    widths = {6136, 6137, 6144, 6145, 12272, 12273, 12288, 12289}
    ext = extension()
    if HAS_CUDA and ext is not None and ext.compiled_with_cuda():
        device = torch.device("cuda", torch.cuda.current_device())
        optin = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
        static = dict(ext.cuda_kernel_static_smem(device.index)).get(f"geglu_accumulate<{NATIVE_DTYPES[dtype]}>")
        if optin is not None and static is not None:
            per_column = 8 + ((8 if dtype == torch.float64 else 4) if token_norm else 0)
            edges = [(48 * 1024 - static) // per_column, (int(optin) - static) // per_column]
            widths |= {e + d for e in edges for d in (-1, 0, 1, 2)}
    return sorted(widths)


# --- torch.library: opcheck and fake tensors ------------------------------------------------------


@TOKEN_NORM
@pytest.mark.parametrize("backend", ALL)
def test_opcheck(backend, token_norm):
    device = backend_device(backend)
    p = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(8)).to(device)
    with use_backend(backend):
        acc = torch.zeros(20, device=device)
        torch.library.opcheck(geglu_accumulate, (p, acc), {"row_start": 1, "token_norm": token_norm})
        torch.library.opcheck(geglu_accumulate, (p, acc, 2, 9, token_norm))


@pytest.mark.parametrize("backend", ALL)
def test_fake_tensor(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = backend_device(backend)
    with forced(backend), FakeTensorMode():
        p = torch.empty(2, 7, 2 * 48, dtype=torch.bfloat16, device=device)
        out = geglu_accumulate(p, torch.zeros(48, device=device), 3, 11)
        assert out.shape == (2, 7, 48) and out.dtype == torch.bfloat16 and out.device.type == device.type
        with pytest.raises(ValueError, match="geglu_accumulate: row range"):
            geglu_accumulate(p, torch.zeros(48, device=device), 3, 15)


# --- validation (before any backend: checked once) ------------------------------------------------


@pytest.mark.parametrize(
    "p,acc,kw,name",
    [
        (torch.zeros(7, 26, dtype=torch.int32), torch.zeros(13), {}, "proj_out must be float16"),
        (torch.zeros(7, 25), torch.zeros(12), {}, "proj_out must have a non-empty, even"),
        (torch.zeros(7, 0), torch.zeros(0), {}, "proj_out must have a non-empty, even"),
        (torch.zeros(()), torch.zeros(0), {}, "proj_out must have a non-empty, even"),
        (torch.zeros(7, 26), torch.zeros(13, dtype=torch.float64), {}, "acc must be a float32 vector"),
        (torch.zeros(7, 26), torch.zeros(13, dtype=torch.float16), {}, "acc must be a float32 vector"),
        (torch.zeros(7, 26), torch.zeros(26), {}, "acc must be a float32 vector"),
        (torch.zeros(7, 26), torch.zeros(1, 13), {}, "acc must be a float32 vector"),
        (torch.zeros(7, 26), torch.zeros(26)[::2], {}, "acc must be contiguous"),
        (torch.zeros(7, 26), torch.zeros(13, device="meta"), {}, "acc is on meta"),
        (torch.zeros(7, 26), torch.zeros(13), {"row_end": 8}, "row range"),
        (torch.zeros(7, 26), torch.zeros(13), {"row_start": 5, "row_end": 4}, "row range"),
        (torch.zeros(7, 26), torch.zeros(13), {"row_start": -1}, "row range"),
        (torch.zeros(7, 26), torch.zeros(13), {"row_start": 8}, "row range"),
    ],
    ids=[
        "p-int32",
        "p-odd",
        "p-empty-features",
        "p-scalar",
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
def test_validation_errors(p, acc, kw, name):
    before = acc.clone() if acc.device.type == "cpu" else None
    with pytest.raises(ValueError, match=f"geglu_accumulate: {name}"):
        geglu_accumulate(p, acc, **kw)
    if before is not None:
        assert torch.equal(acc, before)


# --- Triton: the chunked path and the several-program launch --------------------------------------


def triton_kernel(backend, **kwargs):
    """``run`` for geglu_accumulate_triton called directly (``max_block_cols`` lowered: chunked rows)."""
    from memcore._kernels.geglu_accumulate import geglu_accumulate_triton

    device = backend_device(backend)

    def run(p, start, row_start, row_end, token_norm):
        p2, acc = p.reshape(-1, p.shape[-1]).to(device), start.to(device, copy=True)
        x = geglu_accumulate_triton(p2, acc, row_start, row_end, token_norm, **kwargs)
        return x.cpu().reshape(*p.shape[:-1], -1), acc.cpu()

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@TOKEN_NORM
@pytest.mark.parametrize("backend", TRITON)
def test_triton_chunked_rows(backend, token_norm, dtype):
    """Rows wider than max_block_cols are walked in chunks (X stored, then the statistic from it)."""
    run = triton_kernel(backend, max_block_cols=16)
    p = proj_out((7,), 40, dtype, seed=8)
    p[2, 20:40] *= 1e4  # the row's scale changes between chunks
    start = acc0(40)
    for row_start, row_end in ((0, 7), (2, 5), (3, 3)):
        x, acc = run(p, start, row_start, row_end, token_norm)
        assert_geglu_close(x, p)
        assert_statistic_close(acc, x, start, row_start, row_end, token_norm)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter, on inf and NaN
@EVERY_DTYPE
@pytest.mark.parametrize("backend", TRITON)
def test_triton_chunked_special_rows(backend, dtype):
    """test_special_rows through the chunked path (rows of 9 in chunks of 4)."""
    check_special_rows(triton_kernel(backend, max_block_cols=4), 9, dtype)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_run_to_run_shape(backend):
    """The run-to-run test's shape gives several programs with uneven numbers of tiles, so that the
    order in which the workspace rows are added matters."""
    from memcore._kernels._launch import MAX_BLOCK_COLS, blocks, programs

    assert MAX_BLOCK_COLS == TRITON_BLOCK_COLS
    rows, inner, _, _ = run_to_run_shape(backend)
    chunked, block_r, _ = blocks(rows, inner, MAX_BLOCK_COLS)
    tiles = -(-rows // block_r)
    n = programs(backend_device(backend), rows, block_r)
    assert not chunked and n > 1 and tiles % n != 0, (tiles, n)


# --- the C++ kernel, called directly ----------------------------------------------------------------


def native(p: torch.Tensor, acc: torch.Tensor, row_start: int, row_end: int, token_norm: bool) -> torch.Tensor:
    """memcore._C.geglu_accumulate_cpu on a contiguous [rows, 2 inner] p; returns X, adds to acc."""
    rows, width = p.shape
    out = torch.empty(rows, width // 2, dtype=p.dtype)
    extension().geglu_accumulate_cpu(
        p.data_ptr(), NATIVE_DTYPES[p.dtype], rows, width // 2, row_start, row_end, acc.data_ptr(), out.data_ptr(),
        token_norm,
    )
    return out


def ulp32(x: torch.Tensor) -> torch.Tensor:
    """Spacing of float32 values at |x| (float64), subnormals included."""
    info = torch.finfo(torch.float32)
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(info.tiny))) - 23)


@pytest.mark.parametrize("backend", CPU)
def test_cpu_float32_gelu_is_as_accurate_as_torch(backend):
    """The vectorizable erf (a rational fit evaluated in double) against torch's float32 gelu.

    With h = 1, X = gelu(g) rounded once to float32. Over a dense grid of g covering both tails, the
    error against the float64 gelu stays within half an ulp of the result plus what one float32
    rounding of 1 + erf costs (eps32 |g| / 2), and both its largest and its mean error are below
    torch's float32 gelu's.
    """
    g = torch.cat([torch.linspace(-12, 12, 2_000_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 5.54, -5.54])])
    p = torch.cat([torch.ones_like(g), g]).reshape(1, -1)  # one row: h = 1, then g
    out = native(p, torch.zeros(g.numel()), 0, 0, True)[0].double()
    exact = torch.nn.functional.gelu(g.double())
    err = (out - exact).abs()
    bound = ulp32(exact) / 2 + EPS32 * g.double().abs() / 2
    bad = torch.nonzero(err > bound).flatten()
    assert bad.numel() == 0, f"{bad.numel()} beyond the bound, first g {g[bad[:5]].tolist()}, err {err[bad[:5]]}"
    torch_err = (torch.nn.functional.gelu(g).double() - exact).abs()
    assert err.max() < torch_err.max(), (err.max(), torch_err.max())
    assert err.mean() < torch_err.mean(), (err.mean(), torch_err.mean())


@pytest.mark.parametrize("backend", CPU)
def test_cpu_binding_checks_its_arguments(backend):
    ext = extension()
    p = proj_out((4,), 8, torch.float32)
    acc, out = torch.zeros(8), torch.empty(4, 8)

    def call(dtype, rows, inner, row_start, row_end):
        ptrs = p.data_ptr(), acc.data_ptr(), out.data_ptr()
        ext.geglu_accumulate_cpu(ptrs[0], dtype, rows, inner, row_start, row_end, ptrs[1], ptrs[2], True)

    call("float32", 0, 8, 0, 0)  # no rows: nothing to do
    for args, match in [
        (("float32", 4, 8, 3, 5), "row range"),
        (("float32", 4, 8, 3, 2), "row range"),
        (("float32", 4, 8, -1, 2), "row range"),
        (("float32", 4, 0, 0, 4), "shape"),
        (("int32", 4, 8, 0, 4), "dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            call(*args)
    assert not acc.any()


@pytest.mark.parametrize("backend", CPU)
def test_cpu_deterministic_across_thread_counts(backend):
    """The statistic rows are cut by the shape only: the same bytes with 1 thread or all."""
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, before):
            torch.set_num_threads(threads)
            results.append(run_geglu(backend, proj_out((256,), 64, torch.float16, seed=7), acc0(64), 10, 250))
    finally:
        torch.set_num_threads(before)
    assert same_bits(results[0][0], results[1][0]) and same_bits(results[0][1], results[1][1])


# --- the CUDA kernels: with their shared-memory plans and with the fallbacks forced ---------------


@pytest.mark.parametrize("inner", [1, 33, 1000, 4097], ids=lambda n: f"inner={n}")
@EVERY_DTYPE
@pytest.mark.parametrize("backend", CUDA)
def test_cuda_odd_widths_shared_and_fallback(backend, dtype, inner, smem_fallback):  # noqa: F811
    check_widths(backend, (41,), inner, dtype)
    p = proj_out((41,), inner, dtype, seed=inner)
    for token_norm in (True, False):
        for row_start, row_end in ((0, 41), (3, 39), (40, 41), (7, 7)):
            check(backend, p, row_start, row_end, token_norm)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("inner", [5, 300, 4097], ids=lambda n: f"inner={n}")
@EVERY_DTYPE
@pytest.mark.parametrize("backend", CUDA)
def test_cuda_special_rows_shared_and_fallback(backend, dtype, inner, smem_fallback):  # noqa: F811
    check_special_rows(lambda *args: run_geglu(backend, *args), inner, dtype)


@TOKEN_NORM
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("backend", CUDA)
def test_cuda_runs_are_bit_identical_shared_and_fallback(backend, dtype, token_norm, smem_fallback):  # noqa: F811
    """Many blocks per column: the order of the partial sums is what varied with float atomics."""
    check_run_to_run(backend, *RUN_TO_RUN_GPU, dtype, token_norm, runs=3)
