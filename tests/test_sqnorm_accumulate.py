"""memcore::sqnorm_accumulate on every backend (reference, cpu, triton, cuda) against the one float64
oracle of tests/helpers.py, with its tolerance rule.

Covered here: shapes from one feature to SD 1.5's, every dtype, with and without token_norm; row
ranges, adding to an existing accumulator, two half-range calls against one call, non-contiguous
input; rows that must add nothing (zeros, inf, NaN) and rows that must count without overflow or
underflow (huge, tiny, subnormal); widths on both sides of the kernels' block limits; run-to-run bit
identity; opcheck and fake tensors. The argument checks run before dispatch, so they run once.
Then the facts of one backend, in tests named after it: the C++ kernel's thread-count determinism
and native binding, Triton's chunked rows, the CUDA kernels' bit identity with and without the
shared-memory fallbacks.

Triton runs on a GPU when there is one, else in its interpreter on the CPU, where the shapes stay
small and the SD 1.5 shapes and widest rows are skipped (they run on a GPU: tools/gpu_check.sh).
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import (  # noqa: F401 (smem_fallback: a fixture, used by name)
    DTYPES,
    INF,
    NAN,
    acc0,
    activations,
    assert_statistic_close,
    assert_sums_close,
    backend_device,
    backends,
    dtype_id,
    run_sqnorm,
    same_bits,
    skip_on_interpreter,
    smem_fallback,
    special_rows,
    statistic,
)
from torch._subclasses.fake_tensor import FakeTensorMode

from memcore.ops import sqnorm_accumulate, use_backend
from memcore.ops._ext import extension

OP = "sqnorm_accumulate"
BACKENDS = backends(OP)
TOKEN_NORM = pytest.mark.parametrize("token_norm", [True, False], ids=["token_norm", "raw"])
ALL_DTYPES = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def assert_sums_close_or_equal_nonfinite(got: torch.Tensor, want: torch.Tensor, terms: int) -> None:
    """:func:`helpers.assert_sums_close` where the oracle, rounded to float32, is finite; the same inf
    or NaN where it is not (the raw squares of rows holding inf, NaN or values past 1.8e19)."""
    want32 = want.to(torch.float32)
    finite = torch.isfinite(want32)
    torch.testing.assert_close(got[~finite], want32[~finite], rtol=0, atol=0, equal_nan=True)
    assert_sums_close(got[finite], want[finite], terms)


# --- ordinary activations ----------------------------------------------------------------------------

# one feature, odd widths, SD 1.x widths on a few rows; the last two are large for the interpreter
SHAPES = [(1, 1), (7, 13), (8, 64), (16, 100), (3, 5, 33), (6, 1280), (4096, 320), (2, 64, 1280)]
LARGE = {(4096, 320), (2, 64, 1280)}


@pytest.mark.parametrize("backend", BACKENDS)
@TOKEN_NORM
@ALL_DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_oracle(backend, shape, dtype, token_norm):
    """All rows into a zero accumulator (nothing there to hide a small statistic's error)."""
    if shape in LARGE:
        skip_on_interpreter(backend, f"{shape_id(shape)} activations")
    x = activations(shape, dtype, seed=len(shape) + shape[-1])
    zero = torch.zeros(shape[-1])
    assert_statistic_close(run_sqnorm(backend, x, zero, token_norm=token_norm), x, zero, token_norm=token_norm)


@pytest.mark.parametrize("backend", BACKENDS)
@TOKEN_NORM
@ALL_DTYPES
@pytest.mark.parametrize("row_start,row_end", [(3, 11), (2, 7), (0, 1), (14, 15), (5, None)], ids=str)
def test_row_ranges(backend, row_start, row_end, dtype, token_norm):
    x = activations((3, 5, 33), dtype, seed=5)  # 15 rows
    start = acc0(33)
    got = run_sqnorm(backend, x, start, row_start, row_end, token_norm)
    assert_statistic_close(got, x, start, row_start, row_end, token_norm)


@pytest.mark.parametrize("backend", BACKENDS)
@TOKEN_NORM
@ALL_DTYPES
@pytest.mark.parametrize("shape", [(2, 8, 160), (2, 64, 1280)], ids=shape_id)
def test_adds_to_acc_and_halves_add_up(backend, shape, dtype, token_norm):
    """The op adds to what acc holds; two calls over the halves of the rows give one call's result."""
    if shape == (2, 64, 1280):
        skip_on_interpreter(backend, f"{shape_id(shape)} activations")
    x = activations(shape, dtype, seed=3)
    start = acc0(shape[-1])
    whole = run_sqnorm(backend, x, start, token_norm=token_norm)
    assert torch.all(whole >= start)
    assert_statistic_close(whole, x, start, token_norm=token_norm)
    half = shape[1]
    halves = run_sqnorm(backend, x, run_sqnorm(backend, x, start, 0, half, token_norm), half, None, token_norm)
    assert_statistic_close(halves, x, start, token_norm=token_norm)


@pytest.mark.parametrize("backend", BACKENDS)
@TOKEN_NORM
def test_rows_add_up_to_their_count(backend, token_norm):
    """With token_norm every counted row adds exactly 1 over its features (20 of these 100 rows are
    zero and add nothing); without, the total is the sum of all squares. A property of the result
    alone, so it holds whatever the oracle says: within 1e-5 of the total, for every backend."""
    x = activations((100, 77), seed=2)
    got = run_sqnorm(backend, x, torch.zeros(77), token_norm=token_norm)
    assert_statistic_close(got, x, torch.zeros(77), token_norm=token_norm)
    expected = 80.0 if token_norm else float(x.double().square().sum())
    assert float(got.double().sum()) == pytest.approx(expected, rel=1e-5)


def run_sqnorm_on_view(backend, base, view, start, row_start=0, row_end=None, token_norm=True) -> torch.Tensor:
    """helpers.run_sqnorm on ``view(base)`` taken on the backend's device (a copy of a non-dense view
    to another device, or to itself, comes out contiguous)."""
    device = backend_device(backend)
    x, acc = view(base.to(device)), start.to(device, copy=True)
    assert not x.is_contiguous()
    with use_backend(backend):
        sqnorm_accumulate(x, acc, row_start, row_end, token_norm)
    return acc.cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@TOKEN_NORM
def test_non_contiguous_input(backend, token_norm):
    """A transposed view, the same bits as its contiguous copy; a view of every other column."""
    base = activations((48, 40), seed=11)
    zero = torch.zeros(48)
    got = run_sqnorm_on_view(backend, base, torch.t, zero, token_norm=token_norm)
    assert_statistic_close(got, base.t(), zero, token_norm=token_norm)
    assert same_bits(got, run_sqnorm(backend, base.t().contiguous(), zero, token_norm=token_norm))
    base = activations((10, 64), torch.bfloat16)
    got = run_sqnorm_on_view(backend, base, lambda b: b[:, ::2], torch.zeros(32), 2, 9, token_norm)
    assert_statistic_close(got, base[:, ::2], torch.zeros(32), 2, 9, token_norm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_magnitudes(backend):
    """Rows whose float32 sum of squares over- or underflows: row scaling keeps xhat^2 exact."""
    x = torch.tensor([[1e30, -2e30, 3e30, 0.0], [1e-30, 2e-30, -3e-30, 4e-30], [0.0, 0.0, 0.0, 0.0]])
    zero = torch.zeros(4)
    assert_sums_close(run_sqnorm(backend, x, zero), statistic(x, zero), terms=3)


# --- rows that must add nothing, rows that must count -----------------------------------------------


def _with(row, j, value):
    row[j] = value
    return row


# rows the statistic must survive: (name, builder(cols, generator) -> float64 row)
SPECIAL_ROWS = {
    "zeros": lambda n, g: torch.zeros(n, dtype=torch.float64),
    "one_inf": lambda n, g: _with(torch.randn(n, generator=g, dtype=torch.float64), 3, INF),
    "one_neg_inf": lambda n, g: _with(torch.randn(n, generator=g, dtype=torch.float64), 0, -INF),
    "inf_and_neg_inf": lambda n, g: _with(_with(torch.zeros(n, dtype=torch.float64), 1, INF), 2, -INF),
    "one_nan": lambda n, g: _with(torch.randn(n, generator=g, dtype=torch.float64), n - 1, NAN),
    "all_nan": lambda n, g: torch.full((n,), NAN, dtype=torch.float64),
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
# float64 rows whose float64 squares overflow or underflow: there the float64 oracle is not the exact
# statistic, and the backends disagree (test_float64_rows_whose_squares_leave_float64)
BEYOND_FLOAT64_SQUARES = ("huge_1e200", "float64_square_subnormal", "float64_subnormal")
NOT_COUNTED = ("zeros", "one_inf", "one_neg_inf", "inf_and_neg_inf", "one_nan", "all_nan")


def special_matrix(cols: int, dtype: torch.dtype, seed: int = 0, kinds=None, ordinary: bool = True) -> torch.Tensor:
    """The SPECIAL_ROWS rows named in ``kinds`` (default: all), each after an ordinary row and one
    ordinary row last (``ordinary``), converted to dtype as torch does."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for name, build in SPECIAL_ROWS.items():
        plain, row = torch.randn(cols, generator=g, dtype=torch.float64), build(cols, g)
        rows += ([plain] if ordinary else []) + ([row] if kinds is None or name in kinds else [])
    rows += [torch.randn(cols, generator=g, dtype=torch.float64)] if ordinary else []
    return torch.stack(rows).to(dtype)


def special_input(cols: int, dtype: torch.dtype, seed: int, ordinary: bool = True, beyond: bool = False) -> torch.Tensor:
    """Every special row: SPECIAL_ROWS (among ordinary rows), then helpers' counted rows (huge next to
    subnormal among them) and rows that do not count; for float64 without BEYOND_FLOAT64_SQUARES's
    rows unless ``beyond``."""
    kinds = [k for k in SPECIAL_ROWS if beyond or dtype != torch.float64 or k not in BEYOND_FLOAT64_SQUARES]
    counted, dropped = special_rows(cols, dtype, seed)
    return torch.cat([special_matrix(cols, dtype, seed, kinds, ordinary), counted, dropped])


def counted_row(row: torch.Tensor) -> bool:
    total = row.double().square().sum()
    return bool(total > 0 and torch.isfinite(total))


def check_special_rows(run, x: torch.Tensor, token_norm: bool) -> None:
    """``run(x, acc0, row_start, row_end, token_norm)`` on the special rows ``x``, over all rows and
    over a range that starts and ends inside them, against the oracle. Without token_norm, the rows
    holding inf or NaN or values whose squares pass float32's range fill every column of the first
    two with inf or NaN: then the other rows alone as well."""
    start = acc0(x.shape[1])
    cases = [(x, 0, len(x)), (x, 2, len(x) - 1)]
    if not token_norm:
        fits = x.isfinite().all(dim=1) & (x.double().abs().amax(dim=1) < 1.8e19)
        cases.append((x[fits], 0, int(fits.sum())))
    for rows, row_start, row_end in cases:
        got = run(rows, start, row_start, row_end, token_norm)
        want = statistic(rows, start, row_start, row_end, token_norm)
        if token_norm:  # the float32 yardstick breaks down on these rows: the sums rule
            assert_sums_close(got, want, row_end - row_start)
            counted = sum(counted_row(r) for r in rows[row_start:row_end])
            assert float((got - start).double().sum()) == pytest.approx(counted, rel=1e-5)
        else:
            assert_sums_close_or_equal_nonfinite(got, want, row_end - row_start)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in Triton's interpreter, on inf and NaN
@TOKEN_NORM
@ALL_DTYPES
@pytest.mark.parametrize("cols", [5, 37, 300, 4097])
def test_special_rows(backend, cols, dtype, token_norm):
    """Zero and non-finite rows add nothing, huge, tiny and subnormal rows their exact normalized
    squares (no overflow or underflow); without token_norm the squares as they are (every row)."""
    if cols > 1000:
        skip_on_interpreter(backend, f"{cols}-wide rows")
    x = special_input(cols, dtype, seed=cols, beyond=not token_norm)
    check_special_rows(functools.partial(run_sqnorm, backend), x, token_norm)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@ALL_DTYPES
def test_each_special_row_alone(backend, dtype):
    """Each special row alone adds 1 over its features if it counts, else exactly nothing."""
    x = special_input(37, dtype, seed=37, ordinary=False)
    zero = torch.zeros(37)
    for r in range(len(x)):
        got = run_sqnorm(backend, x, zero, r, r + 1)
        if counted_row(x[r]):
            assert_sums_close(got, statistic(x, zero, r, r + 1), terms=1)
            assert float(got.double().sum()) == pytest.approx(1.0, rel=1e-5), r
        else:
            assert same_bits(got, zero), r


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@ALL_DTYPES
def test_rows_that_do_not_count_add_nothing(backend, dtype):
    """Zero rows, rows holding inf, -inf or NaN: acc keeps its bits."""
    _, dropped = special_rows(9, dtype, seed=3)
    x = torch.cat([dropped, special_matrix(9, dtype, seed=3, kinds=NOT_COUNTED, ordinary=False)])
    start = acc0(9)
    assert same_bits(run_sqnorm(backend, x, start), start)
    assert same_bits(run_sqnorm(backend, torch.zeros(5, 40, dtype=dtype), torch.zeros(40)), torch.zeros(40))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", BEYOND_FLOAT64_SQUARES)
def test_float64_rows_whose_squares_leave_float64(backend, kind):
    """float64 rows near 1e200 (squares overflow), 1e-310 (squares underflow to 0) and 1e-160
    (subnormal squares): the op follows the float64 reference."""
    x = special_matrix(37, torch.float64, seed=37, kinds=(kind,))
    zero = torch.zeros(37)
    assert_sums_close(run_sqnorm(backend, x, zero), statistic(x, zero), terms=len(x))


# --- widths, dtypes, SD 1.5 shapes -------------------------------------------------------------------


def bad_rows(x: torch.Tensor) -> torch.Tensor:
    """x with an inf row and a NaN in another."""
    x = x.clone()
    x[3] = INF
    x[7, -1] = NAN
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@TOKEN_NORM
@ALL_DTYPES
@pytest.mark.parametrize("cols", [1, 33, 1000, 4097, 12289])  # 12289: wider than Triton's one block
def test_odd_widths(backend, cols, dtype, token_norm):
    """Widths on both sides of the kernels' block limits, all rows and ranges inside them; two runs give
    the same bits. 300 rows on a GPU (many programs, row groups); 37 on the CPU, where the C++ kernel cuts
    chunks of 512 rows and the interpreter runs at most 4 programs."""
    if cols > 1000:
        skip_on_interpreter(backend, f"{cols}-wide rows")
    rows = 300 if backend_device(backend).type == "cuda" else 37
    x = activations((rows, cols), dtype, seed=cols)
    if token_norm:
        x = bad_rows(x)
    start = acc0(cols)
    first = run_sqnorm(backend, x, start, token_norm=token_norm)
    assert_statistic_close(first, x, start, token_norm=token_norm)
    assert same_bits(first, run_sqnorm(backend, x, start, token_norm=token_norm)), "two runs differ"
    for row_start, row_end in ((2, rows - 3), (rows - 1, rows)):
        got = run_sqnorm(backend, x, start, row_start, row_end, token_norm)
        assert_statistic_close(got, x, start, row_start, row_end, token_norm)


SD15_STATISTICS = [(4096, 1280), (1024, 2560), (256, 5120), (64, 5120)]  # tokens per image, width


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("batch", [2, 16])
@pytest.mark.parametrize("tokens,cols", SD15_STATISTICS, ids=lambda v: str(v))
def test_sd15_shapes(backend, tokens, cols, batch, dtype):
    """Activations of the shapes of SD 1.5's GEGLU outputs; the second half of the batch (the
    conditional rows)."""
    skip_on_interpreter(backend, "SD 1.5 shape")
    if backend_device(backend).type == "cpu" and (batch, dtype) != (2, torch.float16):
        pytest.skip(
            "on the CPU the SD 1.5 shapes run in float16 on batch 2 (the C++ kernel's partition of the rows "
            "is the same in every dtype, each dtype's loads are tested above); the GPU backends run every case"
        )
    x = activations((batch, tokens, cols), dtype, seed=cols, scale=1.0)
    start = acc0(cols)
    half = batch * tokens // 2
    for token_norm in (True, False):
        got = run_sqnorm(backend, x, start, half, None, token_norm)
        assert_statistic_close(got, x, start, half, None, token_norm)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in Triton's interpreter, on inf and NaN
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_every_16_bit_pattern_squares_exactly(backend, dtype):
    """One row holding every 16-bit pattern (subnormals, inf, NaN): the raw acc[j] = x[j]^2 exactly, a
    check of each backend's conversion of float16 and bfloat16 (every square is a float32 or rounds
    to one, once)."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, -1)
    got = run_sqnorm(backend, x, torch.zeros(x.shape[1]), token_norm=False)
    want = x[0].double().square().float()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_from_run_to_run(backend):
    """Two runs, same bits. On Triton several programs walk uneven numbers of tiles (weak under the
    interpreter, which runs programs in order; the GPU repeats it there)."""
    from memcore._kernels._launch import blocks, programs

    x = activations((40, 2048), seed=5)
    if backend == "triton":
        _, block_r, _ = blocks(40, 2048, 8192)
        n_programs = programs(backend_device(backend), 40, block_r)
        assert n_programs > 1 and (40 // block_r) % n_programs != 0
    start = acc0(2048)
    first = run_sqnorm(backend, x, start, 1, 39)
    assert same_bits(first, run_sqnorm(backend, x, start, 1, 39))
    assert_statistic_close(first, x, start, 1, 39)


# --- torch.library: opcheck and fake tensors ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@TOKEN_NORM
def test_opcheck(backend, token_norm):
    device = backend_device(backend)
    x = activations((2, 6, 20)).to(device)
    with use_backend(backend):
        for args, kwargs in (((), {"row_start": 1, "token_norm": token_norm}), ((2, 9, token_norm), {})):
            torch.library.opcheck(sqnorm_accumulate, (x, torch.zeros(20, device=device), *args), kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_tensors(backend, monkeypatch):
    """Under FakeTensorMode the op runs its fake kernel: no backend is called, acc keeps its metadata."""
    from memcore.ops import _backend

    def no_dispatch(*args):
        raise AssertionError("a backend was dispatched on fake tensors")

    device = backend_device(backend)
    x, acc = activations((2, 6, 20)).to(device), acc0(20).to(device)
    monkeypatch.setattr(_backend, "dispatch", no_dispatch)
    with FakeTensorMode() as mode, use_backend(backend):
        fake_x, fake_acc = mode.from_tensor(x), mode.from_tensor(acc)
        assert sqnorm_accumulate(fake_x, fake_acc, 1, 9, True) is None
        assert (fake_acc.shape, fake_acc.dtype, fake_acc.device.type) == ((20,), torch.float32, device.type)
    assert same_bits(acc.cpu(), acc0(20))


# --- the argument checks and empty work: before dispatch, so once -------------------------------------


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
    x = activations((7, 13))
    with pytest.raises(ValueError, match="sqnorm_accumulate"):
        sqnorm_accumulate(x, acc, **kw)


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.zeros(3, 4, dtype=torch.int32), "x must be"),
        (torch.zeros(3, 4, dtype=torch.complex64), "x must be"),
        (torch.tensor(1.0), "non-empty last"),
        (torch.zeros(3, 0), "non-empty last"),
    ],
    ids=["int32", "complex64", "0-d", "no-features"],
)
def test_validation_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        sqnorm_accumulate(x, torch.zeros(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tools/gpu_check.sh runs these on one)")
def test_validation_acc_on_another_device():
    with pytest.raises(ValueError, match="acc is on"):
        sqnorm_accumulate(torch.ones(4, 3, device="cuda"), torch.zeros(3))


@pytest.mark.parametrize("row_start,row_end", [(0, 0), (7, 7), (15, 15)], ids=str)
def test_empty_row_range_adds_nothing(row_start, row_end):
    x = activations((3, 5, 33), seed=5)
    acc = acc0(33)
    sqnorm_accumulate(x, acc, row_start, row_end)
    assert same_bits(acc, acc0(33))


def test_empty_input_adds_nothing():
    acc = torch.ones(8)
    sqnorm_accumulate(torch.zeros(0, 8), acc)
    assert same_bits(acc, torch.ones(8))


# --- one backend's facts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends(OP, only=("cpu",)))
@ALL_DTYPES
def test_cpu_identical_across_thread_counts(backend, dtype):
    x = activations((3000, 700), dtype, seed=7)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3, before, before):
            torch.set_num_threads(threads)
            results.append(run_sqnorm(backend, x, acc0(700)))
    finally:
        torch.set_num_threads(before)
    assert all(same_bits(r, results[0]) for r in results[1:])


@pytest.mark.parametrize("backend", backends(OP, only=("cpu",)))
def test_cpu_binding_rejects_unknown_dtype_and_bad_range(backend):
    ext = extension()
    x, acc = torch.ones(4, 3), torch.zeros(3)
    with pytest.raises(ValueError, match="dtype"):
        ext.sqnorm_accumulate_cpu(x.data_ptr(), "int8", 4, 3, 0, 4, acc.data_ptr(), True)
    with pytest.raises(ValueError, match="row range"):
        ext.sqnorm_accumulate_cpu(x.data_ptr(), "float32", 4, 3, 0, 5, acc.data_ptr(), True)
    assert same_bits(acc, torch.zeros(3))


def triton_chunked(max_block_cols: int):
    """A runner like helpers.run_sqnorm of the Triton kernel with rows cut in max_block_cols chunks."""
    from memcore._kernels.sqnorm_accumulate import sqnorm_accumulate_triton

    def run(x, start, row_start, row_end, token_norm):
        device = backend_device("triton")
        acc = start.to(device, copy=True)
        x2d = x.reshape(-1, x.shape[-1]).to(device)
        sqnorm_accumulate_triton(x2d, acc, row_start, row_end, token_norm, max_block_cols=max_block_cols)
        return acc.cpu()

    return run


@pytest.mark.parametrize("backend", backends(OP, only=("triton",)))
@TOKEN_NORM
def test_triton_chunked_rows(backend, token_norm):
    """Rows wider than the one-block limit (lowered to 32 here) are walked in chunks; row 2's scale
    changes between chunks."""
    x = activations((9, 100), seed=4)
    x[2, 40:] *= 1e4
    run = triton_chunked(32)
    for row_start, row_end in ((0, 9), (2, 7)):
        start = acc0(100)
        assert_statistic_close(run(x, start, row_start, row_end, token_norm), x, start, row_start, row_end, token_norm)


@pytest.mark.parametrize("backend", backends(OP, only=("triton",)))
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@TOKEN_NORM
@ALL_DTYPES
def test_triton_chunked_special_rows(backend, dtype, token_norm):
    """The special rows through the chunked path (chunks of 4 columns)."""
    run = triton_chunked(4)
    if token_norm:
        _, dropped = special_rows(9, dtype, seed=3)
        start = acc0(9)
        assert same_bits(run(dropped, start, 0, len(dropped), True), start), "a zero or non-finite row added"
    check_special_rows(run, special_input(9, dtype, seed=3), token_norm)


@pytest.mark.parametrize("backend", backends(OP, only=("cuda",)))
@pytest.mark.usefixtures("smem_fallback")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=dtype_id)
@TOKEN_NORM
def test_cuda_identical_from_run_to_run(backend, dtype, token_norm):
    """Many row groups per column: the order of the partial sums is what varied with float atomics.
    With the shared-memory fallbacks forced and not (the sqnorm kernels have none of their own today;
    geglu_accumulate's fallback runs this kernel's path)."""
    x = activations((8192, 1280), dtype, seed=3, scale=1.0)
    runs = [run_sqnorm(backend, x, torch.zeros(1280), token_norm=token_norm) for _ in range(3)]
    assert all(same_bits(r, runs[0]) for r in runs[1:])
    assert_statistic_close(runs[0], x, torch.zeros(1280), token_norm=token_norm)
