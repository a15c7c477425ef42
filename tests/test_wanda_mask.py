"""memcore::wanda_mask and memcore::wanda_mask_grouped on every backend (reference, cpu, triton, cuda)
against the one mask oracle of tests/helpers.py (a numpy stable sort), bit for bit.

Covered here: pack/unpack; odd widths at T = 1, 2, 10, both directions, with and without null norms,
k from 0 to in; tied scores (the lower column wins), zero and -0.0 weights (never selected with null
norms), the strict null condition on the products, the OR over t, constant rows; special values
(negative and signed-zero norms, subnormal and overflowing products); float64 weights rounded to
float32 first, float64 weights beyond float32's range, fp16/bf16 weights, non-contiguous inputs; wide
odd rows, every dtype up to 11641 columns and the 16 SD 1.5 layers at T = 1, 10 and 51; the op's
errors on NaN and inf, naming each input; the grouped op against each layer, bit for bit; opcheck and
fake tensors for both ops. The argument checks run before dispatch, so they run once.
Then the facts of one backend, in tests named after it: the flag word set by the C++, CUDA and Triton
kernels, the C++ binding's argument errors, the CUDA kernel's shared-memory fallback and the widths
where its shared memory runs out.

Triton runs on a GPU when there is one, else in its interpreter on the CPU (about 0.05 s a launch per
row of norms), where shapes stay small and T = 10, the wide rows and the SD 1.5 layers are skipped
(they run on a GPU: tools/gpu_check.sh).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import (  # noqa: F401 (smem_fallback: a fixture, used by name)
    DTYPES,
    INF,
    NAN,
    assert_mask_equal,
    backend_device,
    backends,
    dtype_id,
    interpreted,
    mask_inputs,
    mask_oracle,
    needs_cuda,
    run_mask,
    skip_on_interpreter,
    smem_fallback,
    to_device,
)
from torch._subclasses.fake_tensor import FakeTensorMode

from memcore.ops import use_backend
from memcore.ops._ext import extension
from memcore.ops.wanda_mask import (
    BAD_NORMS,
    BAD_NULL_NORMS,
    BAD_WEIGHT,
    nonfinite_flags,
    pack_mask,
    unpack_mask,
    wanda_mask,
    wanda_mask_grouped,
    wanda_mask_grouped_op,
    wanda_mask_reference,
)

OP, GROUPED = "wanda_mask", "wanda_mask_grouped"
BACKENDS = backends(OP)
GROUPED_BACKENDS = backends(GROUPED)
ODD_WIDTHS = (1, 7, 8, 9, 13, 33, 100, 130)
WITH_NULL = pytest.mark.parametrize("with_null", [True, False], ids=["null", "no-null"])
LARGEST = pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
BADS = pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
NON_FINITE_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on NaN, inf and overflow


def check(backend, weight, norms, null, k, largest=True) -> torch.Tensor:
    """The backend's packed mask equals the oracle's bit for bit; returns it unpacked."""
    got = run_mask(backend, weight, norms, null, k, largest)
    try:
        assert_mask_equal(got, mask_oracle(weight, norms, null, k, largest), weight.shape[1])
    except AssertionError as exc:
        raise AssertionError(f"k={k} largest={largest} null={null is not None}: {exc}") from None
    return unpack_mask(got, weight.shape[1])


def mixed_inputs(out: int, cols: int, t: int, seed: int, dtype=torch.float32, with_null=True):
    """(weight, norms, null_norms): Gaussian rows (with 0.0 and -0.0) above small-integer rows (tied
    scores); norms on a coarse grid (multiples of 0.5, zero included: equal scores across columns and
    S_mem == S_null) in even columns, continuous in odd ones."""
    weight, norms, null = mask_inputs(out, cols, t, seed, dtype=dtype)
    tied_weight, tied_norms, tied_null = mask_inputs(out, cols, t, seed + 1, ties=True, dtype=dtype)
    weight[out // 2 :] = tied_weight[out // 2 :]
    norms[:, ::2], null[:, ::2] = tied_norms[:, ::2], tied_null[:, ::2]
    return weight, norms, (null if with_null else None)


def sampled_rows(out: int, count: int) -> torch.Tensor:
    """``count`` rows spread over ``out``, the first and last included, at uneven steps."""
    return torch.linspace(0, out - 1, min(out, count)).round().long().unique()


def check_layer(backend, weight, norms, null, k, largest=True, sample=8) -> None:
    """A layer too large for the oracle on every row: the backend's mask of the whole layer, compared
    with the oracle on ``sample`` rows spread over it (a row's mask depends on that row of W alone).
    The reference, slow on the CPU, computes the sampled rows only."""
    rows = sampled_rows(weight.shape[0], sample)
    if backend == "reference":
        got = run_mask(backend, weight[rows], norms, null, k, largest)
    else:
        got = run_mask(backend, weight, norms, null, k, largest)[rows]
    try:
        assert_mask_equal(got, mask_oracle(weight[rows], norms, null, k, largest), weight.shape[1])
    except AssertionError as exc:
        raise AssertionError(f"rows {rows.tolist()}, k={k} largest={largest} null={null is not None}: {exc}") from None


# --- pack / unpack ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cols", (0, *ODD_WIDTHS, 16, 64))
def test_pack_matches_numpy_and_round_trips(cols):
    mask = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) < 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (5, (cols + 7) // 8)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), axis=1, bitorder="little"))
    assert torch.equal(unpack_mask(packed, cols), mask)


def test_pack_bit_order():
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 0] = mask[0, 3] = mask[0, 9] = True
    assert pack_mask(mask).tolist() == [[0b00001001, 0b00000010]]


def test_pack_unpack_validation():
    with pytest.raises(ValueError, match="mask"):
        pack_mask(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mask"):
        pack_mask(torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="in_features"):
        unpack_mask(torch.zeros(2, 2, dtype=torch.uint8), 17)
    with pytest.raises(ValueError, match="in_features"):
        unpack_mask(torch.zeros(2, 2, dtype=torch.uint8), 8)
    with pytest.raises(ValueError, match="packed"):
        unpack_mask(torch.zeros(2, 2, dtype=torch.int32), 16)


# --- the op against the oracle ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cols", ODD_WIDTHS)
@pytest.mark.parametrize("t", [1, 2, 10])
@WITH_NULL
def test_matches_oracle(backend, cols, t, with_null):
    """Odd widths (one column, byte and block boundaries), random and tied rows, k from 0 to in, both
    directions. Triton's interpreter (about 0.1 s a launch at T = 2) runs T = 2 with null norms (the
    same loop over t as T = 1 and 10; T = 1 and no null norms run in the single-case tests below) and
    five of the (k, direction) pairs."""
    if interpreted(backend) and (t != 2 or not with_null):
        pytest.skip(f"T = {t}, null norms {with_null}: Triton's interpreter runs T = 2 with null norms here "
                    "(T = 1 and no null norms in the single-case tests); the others run on a GPU")
    weight, norms, null = mixed_inputs(16, cols, t, seed=100 * cols + t, with_null=with_null)
    if interpreted(backend):
        pairs = [(0, True), (1, False), (cols // 3, True), (cols // 3, False), (cols, True)]
    else:
        ks = {0, 1, 2, cols // 4, cols // 3, cols // 2, cols - 1, cols}
        pairs = itertools.product(sorted(k for k in ks if k <= cols), (True, False))
    for k, largest in dict.fromkeys(pairs):
        check(backend, weight, norms, null, k, largest)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_column(backend):
    weight, norms = torch.ones(2, 9), torch.ones(1, 9)
    norms[0, 4] = 2.0
    assert check(backend, weight, norms, None, 3)[0].nonzero().flatten().tolist() == [0, 1, 4]
    assert check(backend, weight, norms, None, 3, largest=False)[0].nonzero().flatten().tolist() == [0, 1, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weights_never_selected_with_null_norms(backend):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 33, generator=g)
    weight[:, ::3] = 0.0
    weight[::2, 1::3] = -0.0
    norms = torch.rand(3, 33, generator=g) + 1.0
    null = torch.zeros(3, 33)  # S_mem > S_null holds for every nonzero weight
    for largest in (True, False):
        for k in (1, 11, 33):
            assert not check(backend, weight, norms, null, k, largest)[weight == 0].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weights_without_null_norms_only_by_rank(backend):
    # row 0 has two nonzero weights, so k = 3 takes one zero column: the lowest, column 0 (-0.0 ties +0.0)
    weight = torch.tensor([[0.0, 2.0, -0.0, 0.0, -3.0], [1.0, 0.0, 2.0, 3.0, 4.0]])
    norms = torch.ones(1, 5)
    got = check(backend, weight, norms, None, 3)
    assert got.tolist() == [[True, True, False, False, True], [False, False, True, True, True]]
    got = check(backend, weight, norms, None, 2, largest=False)
    assert got.tolist() == [[True, False, True, False, False], [True, True, False, False, False]]
    for k in range(6):
        for largest in (True, False):
            check(backend, weight, norms, None, k, largest)


@pytest.mark.parametrize("backend", BACKENDS)
def test_null_condition_is_strict_and_on_products(backend):
    weight = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    norms = torch.tensor([[2.0, 2.0, 2.0, 5.0]])
    null = torch.tensor([[2.0, 1.0, 3.0, 1.0]])  # equal, smaller, larger, smaller but a zero weight
    assert check(backend, weight, norms, null, 4).tolist() == [[False, True, False, False]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_or_over_t(backend):
    weight = torch.ones(1, 4)
    norms = torch.tensor([[3.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 3.0]])
    assert check(backend, weight, norms, None, 1).tolist() == [[True, False, False, True]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_zero_selects_nothing_and_k_in_everything(backend):
    weight, norms, null = mask_inputs(6, 13, 3, seed=5)
    assert not check(backend, weight, norms, null, 0).any()
    assert not check(backend, weight, norms, None, 0, largest=False).any()
    assert check(backend, weight, norms, None, 13).all()
    # k = in: every column, then the null condition alone
    want = (weight.abs().unsqueeze(0) * norms.unsqueeze(1) > weight.abs().unsqueeze(0) * null.unsqueeze(1)).any(0)
    assert torch.equal(check(backend, weight, norms, null, 13, largest=False), want)


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("backend", BACKENDS)
@LARGEST
def test_special_values(backend, largest):
    """Signed zeros, negative norms (negative scores), a subnormal and an overflowing product, every k,
    with and without null norms (Triton's interpreter alternates the two over k)."""
    weight = torch.tensor([[0.0, -0.0, 1.0, -1.0, 2.0, 0.0, -3.0, 0.5, 1e-45, 3e38, -2.0, 1.0]])
    norms = torch.tensor([[-1.0, 1.0, -2.0, 0.0, 1.0, -0.0, -1.0, 2.0, 1.0, 10.0, 1.0, 0.5]])
    null = torch.tensor([[1.0, -1.0, -2.0, 0.0, 0.5, 0.0, -2.0, 2.0, 0.0, 10.0, 0.0, 0.5]])
    for k in range(weight.shape[1] + 1):
        for z in ((None, null)[k % 2],) if interpreted(backend) else (None, null):
            check(backend, weight, norms, z, k, largest)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_and_signed_zero_norms(backend):
    """Validation asks only for finite norms: negative norms and -0.0 scores must order as floats do."""
    skip_on_interpreter(backend, "301 columns at T = 3 and 20 k (test_special_values covers these values)")
    g = torch.Generator().manual_seed(9)
    weight, _, _ = mask_inputs(12, 301, 1, seed=9)
    norms = torch.randn(3, 301, generator=g)
    norms[0, ::5] = -0.0
    norms[1, ::7] = 0.0
    null = torch.randn(3, 301, generator=g)
    for k in (1, 3, 18, 100, 301):
        for largest in (True, False):
            for z in (null, None):
                check(backend, weight, norms, z, k, largest)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cols", [20, 1000])
def test_constant_rows_are_all_ties(backend, cols):
    """Rows of one value (0.5, 1, +0.0, -0.0): every score of a row ties, the first k columns win."""
    if cols > 20:
        skip_on_interpreter(backend, f"{cols}-wide rows (20 columns run the same ties)")
    weight = torch.tensor([0.5, 0.0, 1.0, -0.0, 0.5]).unsqueeze(1).repeat(1, cols)
    norms = torch.ones(1, cols)
    for k in sorted({1, 10, cols - 1, cols}):
        for largest in (True, False):
            for null in (None, norms * 0.5):
                check(backend, weight, norms, null, k, largest)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_weights_are_rounded_to_float32_first(backend):
    # 1 + 2^-30 rounds to 1.0 in float32: the two columns tie and the lower index wins
    weight = torch.tensor([[1.0, 1.0 + 2.0**-30]], dtype=torch.float64)
    assert check(backend, weight, torch.ones(1, 2), None, 1).tolist() == [[True, False]]


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_weights_beyond_float32_are_finite(backend):
    """1e300 is a finite float64 weight (no error, as in the reference) though its float32 score is
    inf; 1e-300 rounds to a zero score."""
    weight, norms, null = mask_inputs(3, 20, 2, seed=6, dtype=torch.float64)
    weight[1, 3], weight[2, 7] = 1e300, -1e-300
    for z in (None, null):
        for largest in (True, False):
            check(backend, weight, norms, z, 4, largest)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=dtype_id)
def test_weight_dtypes(backend, dtype):
    """Scores are float32 whatever the weight dtype; a column-major weight of each dtype too."""
    weight, norms, null = mixed_inputs(13, 37, 2, seed=7, dtype=dtype)
    for z, k, largest in ((null, 1, True), (null, 9, False), (None, 9, True), (None, 37, False)):
        check(backend, weight, norms, z, k, largest)
    check(backend, weight.t().contiguous().t(), norms, null, 9, largest=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """A column-major weight and strided norms and null norms, kept as views on the backend's device
    (helpers.run_mask would copy the strided norms into contiguous ones)."""
    g = torch.Generator().manual_seed(4)
    device = backend_device(backend)
    base_w = torch.randn(200, 40, generator=g)
    base_n, base_z = torch.rand(2, 400, generator=g) * 2, torch.rand(2, 400, generator=g) * 2
    weight, norms, null = base_w.t(), base_n[:, ::2], base_z[:, 1::2]  # [40, 200]
    views = base_w.to(device).t(), base_n.to(device)[:, ::2], base_z.to(device)[:, 1::2]
    assert not any(v.is_contiguous() for v in views)
    for k in (2, 50):
        with use_backend(backend):
            got = wanda_mask(*views, k).cpu()
        assert_mask_equal(got, mask_oracle(weight, norms, null, k), 200)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "out,cols,t,k", [(320, 1280, 10, 12), (3, 1280, 2, 12), (2, 5120, 2, 51)], ids=["320x1280", "3x1280", "2x5120"]
)
def test_sd_widths(backend, out, cols, t, k):
    """SD 1.x widths with fp16 weights, every row against the oracle (k = 1%)."""
    if out > 3:
        skip_on_interpreter(backend, f"{out} x {cols} at T = {t} (3 x 1280 and 2 x 5120 are the same widths)")
    g = torch.Generator().manual_seed(cols + out)
    weight = torch.randn(out, cols, generator=g).half()
    norms, null = torch.rand(t, cols, generator=g) * 4, torch.rand(t, cols, generator=g) * 4
    check(backend, weight, norms, null, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cols", [255, 1001, 2047])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_wide_odd_rows(backend, cols, ties):
    """Wide enough for the C++ group-maximum bound of small k, not a multiple of 8 or 16."""
    skip_on_interpreter(backend, f"{cols}-wide rows, 20 launches")
    weight, norms, null = mask_inputs(16, cols, 3, seed=cols + ties, ties=ties)
    for k in sorted({1, cols // 100, cols // 16, cols // 3, cols - 1}):
        for largest in (True, False):
            for z in (null, None):
                check(backend, weight, norms, z, k, largest)


def check_odd_width(backend: str, cols: int, dtype: torch.dtype) -> None:
    """6 random and tied rows at T = 3: k in {0, 1, in/3, in}, both directions, with and without null
    norms (on the CPU, rows of 1000 columns or more take four combinations that take each value of each:
    the oracle costs). On a GPU every mask is computed twice: two runs give the same bits."""
    weight, norms, null = mixed_inputs(6, cols, 3, seed=cols, dtype=dtype)
    on_gpu = backend_device(backend).type == "cuda"
    runs = 2 if on_gpu else 1
    if cols < 1000 or on_gpu:
        combos = list(itertools.product(sorted({0, 1, cols // 3, cols}), (True, False), (True, False)))
    else:
        combos = [(0, False, True), (1, True, True), (cols // 3, False, False), (cols, True, False)]
    for k, largest, with_null in combos:
        z = null if with_null else None
        first = check(backend, weight, norms, z, k, largest)
        for _ in range(runs - 1):
            again = unpack_mask(run_mask(backend, weight, norms, z, k, largest), cols)
            assert torch.equal(again, first), f"two runs differ: k={k} largest={largest} null={with_null}"


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cols", [1, 33, 1000, 4097, 11641])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_odd_widths_every_dtype(backend, cols, dtype):
    """Every dtype up to 4097 columns (one row a Triton program, blocks of 8192) and 11641 (where the
    CUDA kernel's row of |W| no longer fits 48 KiB of shared memory); a NaN in the last row and column
    is found."""
    if backend == "reference":
        pytest.skip("the reference runs rows up to 5120 columns in test_sd_widths, every dtype in test_weight_dtypes")
    skip_on_interpreter(
        backend, f"{cols}-wide rows in every dtype (test_matches_oracle and test_weight_dtypes run the narrow ones)"
    )
    check_odd_width(backend, cols, dtype)
    weight, norms, null = mixed_inputs(6, cols, 3, seed=cols, dtype=dtype)
    weight[-1, -1] = NAN
    with pytest.raises(ValueError, match="wanda_mask: weight contains NaN or inf"):
        run_mask(backend, weight, norms, null, 1)


# docs/method.md section 1: the 16 ff.net.2 layers of SD 1.5, [out, in]
SD15_LAYERS = (
    [(f"down_blocks.0.attentions.{i}", 320, 1280) for i in range(2)]
    + [(f"down_blocks.1.attentions.{i}", 640, 2560) for i in range(2)]
    + [(f"down_blocks.2.attentions.{i}", 1280, 5120) for i in range(2)]
    + [("mid_block.attentions.0", 1280, 5120)]
    + [(f"up_blocks.1.attentions.{i}", 1280, 5120) for i in range(3)]
    + [(f"up_blocks.2.attentions.{i}", 640, 2560) for i in range(3)]
    + [(f"up_blocks.3.attentions.{i}", 320, 1280) for i in range(3)]
)
SD15_IDS = [name for name, _, _ in SD15_LAYERS]


def sd15_inputs(out: int, cols: int, t: int, seed: int, dtype=torch.float16):
    """A layer's weight with zero columns (every 97th) and norms with ties (every third column equals
    the first), null norms."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, cols, generator=g).to(dtype)
    weight[:, ::97] = 0.0
    norms, null = torch.rand(t, cols, generator=g) * 4, torch.rand(t, cols, generator=g) * 4
    norms[:, 1::3] = norms[:, :1]
    return weight, norms, null


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 10])
@pytest.mark.parametrize("index", range(len(SD15_LAYERS)), ids=SD15_IDS)
def test_sd15_layers(backend, index, t):
    """Each layer at k = 1%; its weight dtype (fp32, fp16, bf16), null norms and direction by its index;
    32 rows against the oracle at T = 1, 8 at T = 10."""
    if backend == "reference":
        pytest.skip("the reference runs the SD 1.5 shapes in test_sd_widths and test_sd15_all_51_calls")
    skip_on_interpreter(backend, "SD 1.5 layer")
    _, out, cols = SD15_LAYERS[index]
    weight, norms, null = sd15_inputs(out, cols, t, seed=100 * index + t, dtype=DTYPES[index % 3])
    z = null if index % 2 == 0 else None
    check_layer(backend, weight, norms, z, cols // 100, largest=index % 4 != 3, sample=32 if t == 1 else 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out,cols", [(320, 1280), (640, 2560), (1280, 5120)], ids=lambda v: str(v))
def test_sd15_all_51_calls(backend, out, cols):
    skip_on_interpreter(backend, "SD 1.5 layer at T = 51")
    weight, norms, null = sd15_inputs(out, cols, 51, seed=51 + cols)
    check_layer(backend, weight, norms, null, cols // 100, sample=20480 // cols)  # 16, 8, 4 rows


@pytest.mark.parametrize("backend", backends(OP, only=("triton", "cuda")))
@pytest.mark.parametrize("t", [1, 10, 51])
def test_sd15_layers_whole_mask_on_a_gpu(backend, t):
    """On a GPU, every row of every layer (T = 51: every fifth layer) for k in {0, 1, 1%, in}, both
    directions, with and without null norms, against the reference there (itself checked against the
    oracle above; on the CPU the reference takes seconds a layer)."""
    if backend_device(backend).type != "cuda":
        pytest.skip("the whole SD 1.5 layers against the reference: on a GPU only")
    device = backend_device(backend)
    layers = SD15_LAYERS[::5] if t == 51 else SD15_LAYERS
    for index, (name, out, cols) in enumerate(layers):
        weight, norms, null = to_device(device, *sd15_inputs(out, cols, t, seed=index))
        for k, largest, z in itertools.product((0, 1, cols // 100, cols), (True, False), (null, None)):
            with use_backend(backend):
                got = wanda_mask(weight, norms, z, k, largest)
            want = wanda_mask_reference(weight, norms, z, k, largest)
            if not torch.equal(got, want):
                diff = (unpack_mask(got, cols) != unpack_mask(want, cols)).nonzero()
                pytest.fail(f"{name} T={t} k={k} largest={largest} null={z is not None}: "
                            f"{len(diff)} bits differ, first (row, col) {diff[:5].tolist()}")


# --- NaN and inf: each backend sets the flag word its own way ---------------------------------------------


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("backend", BACKENDS)
@BADS
def test_non_finite_inputs_are_named(backend, bad):
    """Every non-empty subset of {weight, norms, null_norms} holding a NaN or inf, for k = 0 too."""
    weight, norms, null = mask_inputs(4, 9, 1, seed=8)
    names = ("weight", "norms", "null_norms")
    for which in range(1, 8):
        w, n, z = weight.clone(), norms.clone(), null.clone()
        if which & BAD_WEIGHT:
            w[3, 8] = bad
        if which & BAD_NORMS:
            n[0, 0] = bad
        if which & BAD_NULL_NORMS:
            z[0, 4] = bad
        named = [name for bit, name in zip((BAD_WEIGHT, BAD_NORMS, BAD_NULL_NORMS), names) if which & bit]
        message = f"wanda_mask: {' and '.join(named)} {'contains' if len(named) == 1 else 'contain'} NaN or inf"
        for k in (0, 2):
            with pytest.raises(ValueError, match=f"^{message}$"):
                run_mask(backend, w, n, z, k)


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_norms_are_named_without_rows(backend):
    """A weight with no rows selects nothing, but the norms are still checked (as the reference does)."""
    norms = torch.ones(1, 6)
    norms[0, 3] = NAN
    with pytest.raises(ValueError, match="wanda_mask: norms contains NaN or inf"):
        run_mask(backend, torch.zeros(0, 6), norms, None, 2)


# --- the grouped entry point ---------------------------------------------------------------------------


def grouped_inputs(with_null: bool = True, t: int = 2):
    """Six layers: odd shapes (one with no rows), every dtype, random and tied, k from 0 to in."""
    shapes = [(5, 13), (40, 64), (1, 1), (17, 100), (0, 9), (8, 130)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float32, torch.float32]
    ks = [0, 1, 1, 33, 2, 7]
    layers = [
        mask_inputs(out, cols, t, seed=i, ties=i % 2 == 1, dtype=dtype)
        for i, ((out, cols), dtype) in enumerate(zip(shapes, dtypes))
    ]
    weights, norms, nulls = (list(column) for column in zip(*layers))
    return weights, norms, (nulls if with_null else None), ks


def run_grouped(backend, weights, norms, nulls, ks, largest=True) -> list[torch.Tensor]:
    """The packed masks of wanda_mask_grouped by ``backend``, on the CPU."""
    device = backend_device(backend)
    moved = to_device(device, weights, norms, nulls)
    with use_backend(backend):
        return [mask.cpu() for mask in wanda_mask_grouped(*moved, ks, largest)]


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
@WITH_NULL
@LARGEST
def test_grouped_is_each_layer_bit_for_bit(backend, with_null, largest):
    weights, norms, nulls, ks = grouped_inputs(with_null)
    got = run_grouped(backend, weights, norms, nulls, ks, largest)
    assert len(got) == len(weights)
    for i, (w, n, k) in enumerate(zip(weights, norms, ks)):
        null = None if nulls is None else nulls[i]
        assert_mask_equal(got[i], mask_oracle(w, n, null, k, largest), w.shape[1])
        if not interpreted(backend):  # Triton's grouped op is its one-layer op in a loop
            assert torch.equal(got[i], run_mask(backend, w, n, null, k, largest)), f"layer {i} differs from wanda_mask"


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_grouped_non_finite_names_the_first_bad_layer(backend):
    weights, norms, nulls, ks = grouped_inputs(t=1)
    nulls[5][0, 0] = -INF
    with pytest.raises(ValueError, match="^wanda_mask_grouped: layer 5: null_norms contains NaN or inf$"):
        run_grouped(backend, weights, norms, nulls, ks)
    weights[3][2, 5] = NAN
    with pytest.raises(ValueError, match="^wanda_mask_grouped: layer 3: weight contains NaN or inf$"):
        run_grouped(backend, weights, norms, nulls, ks)
    norms[1][0, 63] = INF
    with pytest.raises(ValueError, match="^wanda_mask_grouped: layer 1: norms contains NaN or inf$"):
        run_grouped(backend, weights, norms, nulls, ks)
    # one layer is still named, as the grouped op's validation errors name it
    with pytest.raises(ValueError, match="^wanda_mask_grouped: layer 0: norms contains NaN or inf$"):
        run_grouped(backend, weights[1:2], norms[1:2], nulls[1:2], ks[1:2])


# --- torch.library: opcheck and fake tensors ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@WITH_NULL
def test_opcheck(backend, with_null):
    """With null norms a float32 weight, the k largest; without, a float16 weight, the k smallest."""
    weight, norms, null = to_device(backend_device(backend), *mask_inputs(5, 13, 1, seed=2, with_null=with_null))
    with use_backend(backend):
        if with_null:
            torch.library.opcheck(torch.ops.memcore.wanda_mask.default, (weight, norms, null, 3, True))
        else:
            torch.library.opcheck(torch.ops.memcore.wanda_mask.default, (weight.half(), norms, None, 4), {"largest": False})


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_grouped_opcheck(backend):
    weights, norms, nulls, ks = grouped_inputs(t=1)
    keep = [3, 5]  # opcheck's schema tests do not take empty tensors
    weights, norms, nulls = to_device(backend_device(backend), *([x[i] for i in keep] for x in (weights, norms, nulls)))
    ks = [ks[i] for i in keep]
    with use_backend(backend):
        torch.library.opcheck(wanda_mask_grouped_op, (weights, norms, [], ks, True))
        torch.library.opcheck(wanda_mask_grouped_op, (weights, norms, nulls, ks, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_tensors(backend):
    """Under FakeTensorMode the op runs its fake kernel (no backend is called), with the op's checks."""
    device = backend_device(backend)
    weight, norms, null = to_device(device, torch.randn(6, 13).bfloat16(), torch.rand(2, 13), torch.rand(2, 13))
    with FakeTensorMode() as mode, use_backend(backend):
        weight, norms, null = (mode.from_tensor(x) for x in (weight, norms, null))
        out = wanda_mask(weight, norms, null, 3)
        assert (out.shape, out.dtype, out.device.type) == ((6, 2), torch.uint8, device.type)
        with pytest.raises(ValueError, match="k must be in"):
            wanda_mask(weight, norms, None, 14)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_grouped_fake_tensors(backend):
    device = backend_device(backend)
    weights, norms, nulls, ks = grouped_inputs()
    weights, norms, nulls = to_device(device, weights, norms, nulls)
    with FakeTensorMode() as mode, use_backend(backend):
        weights, norms, nulls = ([mode.from_tensor(x) for x in xs] for xs in (weights, norms, nulls))
        out = wanda_mask_grouped(weights, norms, nulls, ks)
        assert [(m.shape, m.dtype, m.device.type) for m in out] == [
            ((w.shape[0], (w.shape[1] + 7) // 8), torch.uint8, device.type) for w in weights
        ]
        with pytest.raises(ValueError, match="layer 2: k must be in"):
            wanda_mask_grouped(weights, norms, nulls, [0, 1, 2, 3, 4, 5])


# --- the argument checks: before dispatch, so once ----------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda w, n, z, k: (w.to(torch.int32), n, z, k), "weight"),
        (lambda w, n, z, k: (w[0], n, z, k), "weight"),
        (lambda w, n, z, k: (w, n[:, :-1], z, k), "norms"),
        (lambda w, n, z, k: (w, n[0], z, k), "norms"),
        (lambda w, n, z, k: (w, n[:0], z[:0], k), "norms"),
        (lambda w, n, z, k: (w, n.double(), z, k), "norms"),
        (lambda w, n, z, k: (w, n, z[:1], k), "null_norms"),
        (lambda w, n, z, k: (w, n, z.half(), k), "null_norms"),
        (lambda w, n, z, k: (w, n, z, -1), "k"),
        (lambda w, n, z, k: (w, n, z, 10), "k"),
    ],
    ids=["int-weight", "1-d-weight", "norms-width", "1-d-norms", "no-t", "float64-norms", "null-shape",
         "float16-null", "k<0", "k>in"],
)
def test_validation_errors(change, match):
    weight, norms, null = mask_inputs(4, 9, 3)
    with pytest.raises(ValueError, match=f"wanda_mask: {match}"):
        wanda_mask(*change(weight, norms, null, 2))


@needs_cuda
def test_validation_inputs_on_another_device():
    weight, norms, null = mask_inputs(4, 9, 3)
    with pytest.raises(ValueError, match="norms is on cpu but weight is on cuda"):
        wanda_mask(weight.cuda(), norms, None, 2)
    with pytest.raises(ValueError, match="null_norms is on cpu but weight is on cuda"):
        wanda_mask(weight.cuda(), norms.cuda(), null, 2)


def test_grouped_validation_names_the_layer():
    weights, norms, nulls, ks = grouped_inputs()
    with pytest.raises(ValueError, match="norms has 5 entries for 6 weights"):
        wanda_mask_grouped(weights, norms[:5], nulls, ks)
    with pytest.raises(ValueError, match="null_norms has 1 entries for 6 weights"):
        wanda_mask_grouped(weights, norms, nulls[:1], ks)
    with pytest.raises(ValueError, match="ks has 7 entries for 6 weights"):
        wanda_mask_grouped(weights, norms, nulls, [*ks, 1])
    with pytest.raises(ValueError, match="weights is empty"):
        wanda_mask_grouped([], [], None, [])
    with pytest.raises(ValueError, match=r"wanda_mask_grouped: layer 3: k must be in \[0, 100\]"):
        wanda_mask_grouped(weights, norms, nulls, [*ks[:3], 1000, *ks[4:]])
    with pytest.raises(ValueError, match="wanda_mask_grouped: layer 4: null_norms must be float32"):
        wanda_mask_grouped(weights, norms, [*nulls[:4], nulls[4].double(), nulls[5]], ks)
    with pytest.raises(ValueError, match="layer 1 has T = 1 rows of norms, layer 0 2"):
        wanda_mask_grouped(weights, [norms[0], norms[1][:1], *norms[2:]], None, ks)


# --- one backend's facts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends(OP, only=("cpu",)))
def test_cpu_binding_argument_errors(backend):
    ext = extension()
    weight, norms = torch.randn(4, 9), torch.rand(2, 9)
    mask, flags = torch.empty(4, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.int32)
    args = [weight.data_ptr(), "float32", 4, 9, norms.data_ptr(), 0, 2, 3, True, mask.data_ptr(), flags.data_ptr()]
    ext.wanda_mask_cpu(*args)
    assert_mask_equal(mask, mask_oracle(weight, norms, None, 3), 9)
    assert flags.item() == 0
    with pytest.raises(ValueError, match="k=10"):
        ext.wanda_mask_cpu(*args[:7], 10, *args[8:])
    with pytest.raises(ValueError, match="dtype"):
        ext.wanda_mask_cpu(args[0], "int8", *args[2:])
    with pytest.raises(ValueError, match="null pointer"):
        ext.wanda_mask_cpu(*args[:10], 0)


def check_native_flag_word(device, dtype, bad, out, cols, ks) -> None:
    """The flag word of the C++ or CUDA kernel (through the op's launcher, memcore._C) equals the one
    torch computes, for every subset of {weight, norms, null_norms} and every k; clean masks are exact."""
    from memcore.ops.wanda_mask import _native

    weight, norms, null = mask_inputs(out, cols, 3, seed=cols, dtype=dtype)
    for which in range(8):
        w, n, z = weight.clone(), norms.clone(), null.clone()
        if which & BAD_WEIGHT:
            w[-1, -1] = bad
        if which & BAD_NORMS:
            n[2, 0] = bad
        if which & BAD_NULL_NORMS:
            z[1, cols // 3] = bad
        for nn in (z, None):
            want = which if nn is not None else which & ~BAD_NULL_NORMS
            for k in ks:
                mask, flags = _native(*to_device(device, w, n, nn), k, True)
                assert flags.dtype == torch.int32 and tuple(flags.shape) == (1,) and flags.device.type == device.type
                assert int(flags) == int(nonfinite_flags(w, n, nn)) == want, (which, k, nn is None)
                if not which:
                    assert_mask_equal(mask.cpu(), mask_oracle(w, n, nn, k), cols)


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("backend", backends(OP, only=("cpu",)))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@BADS
def test_cpu_kernel_sets_the_flag_word(backend, dtype, bad):
    check_native_flag_word(backend_device(backend), dtype, bad, 9, 37, ks=(0, 1, 5, 37))


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("backend", backends(OP, only=("cuda",)))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@BADS
@pytest.mark.usefixtures("smem_fallback")
def test_cuda_kernel_sets_the_flag_word(backend, dtype, bad):
    check_native_flag_word(backend_device(backend), dtype, bad, 6, 333, ks=(0, 3, 333))


def triton_kernel(weight, norms, null, k, largest=True) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, flag word) straight from memcore._kernels.wanda_mask.wanda_mask_triton, on the CPU."""
    from memcore._kernels.wanda_mask import wanda_mask_triton

    device = backend_device("triton")
    mask, flags = wanda_mask_triton(*to_device(device, weight, norms, null), k, largest)
    assert flags.dtype == torch.int32 and tuple(flags.shape) == (1,) and flags.device.type == device.type
    return mask.cpu(), flags.cpu()


def with_bad_weights(weight: torch.Tensor) -> list[torch.Tensor]:
    """Copies of weight with one NaN, inf or -inf: first row and column, last ones, the middle."""
    out = []
    for where, value in (((0, 0), NAN), ((-1, -1), INF), ((2, 9), -INF)):
        bad = weight.clone()
        bad[where] = value
        out.append(bad)
    return out


@pytest.mark.parametrize("backend", backends("wanda_mask_grouped", only=("triton",)))
def test_triton_grouped_launches_once_per_width(backend, monkeypatch):
    """Seven layers of three row widths and two dtypes: three launches, each over all its layers,
    every mask the oracle's."""
    from memcore._kernels import wanda_mask as module

    kernel, launches = module._wanda_mask_kernel, []

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(module, "_wanda_mask_kernel", Spy())
    shapes = [(6, 40), (3, 40), (5, 100), (4, 40), (2, 100), (0, 100), (3, 40)]
    dtypes = [torch.float32] * 6 + [torch.float16]
    ks = [4, 1, 9, 0, 3, 2, 5]
    layers = [mask_inputs(out, cols, 2, seed=i, dtype=dtype) for i, ((out, cols), dtype) in enumerate(zip(shapes, dtypes))]
    weights, norms, nulls = (list(column) for column in zip(*layers))
    masks = run_grouped(backend, weights, norms, nulls, ks)
    assert len(launches) == 3, launches  # (float32, 64 columns), (float32, 128), (float16, 64)
    for w, n, null, k, got in zip(weights, norms, nulls, ks, masks):
        assert_mask_equal(got, mask_oracle(w, n, null, k), w.shape[1])


@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
@pytest.mark.parametrize("backend", backends(OP, only=("triton",)))
def test_triton_candidate_filter(backend, largest):
    """The Triton kernel's candidate filter (a bound from group maxima, the search over the packed
    candidates) on both of its paths: rows whose candidates fit the scratch slots, and a block where
    a row of ties has more candidates than slots and the block searches whole rows."""
    from memcore._kernels._launch import mask_blocks, mask_filter

    out, cols = 4, 1000
    rows, block = mask_blocks(out, cols)
    for k in (1, 3, 17, 31):
        assert mask_filter(block, k) != (0, 0), k  # the cases below do run the filter
        weight, norms, null = mask_inputs(out, cols, 2, seed=k)
        check(backend, weight, norms, null, k, largest)
        weight[1] = 0.5  # one row of ties: every column a candidate, more than the slots
        weight[2, ::3] = 2.0  # a third of a row tied at the top
        check(backend, weight, norms, None, k, largest)


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("backend", backends(OP, only=("triton",)))
def test_triton_kernel_sets_the_flag_word(backend):
    """The flag word says which inputs hold NaN or inf, as nonfinite_flags computes it, wherever the
    bad value sits, with or without null norms, for k = 0 too."""
    weight, norms, null = mixed_inputs(5, 19, 2, seed=7)
    assert triton_kernel(weight, norms, null, 4)[1].item() == 0
    bad_weights = with_bad_weights(weight)
    bad_norms, bad_null = norms.clone(), null.clone()
    bad_norms[1, 18] = NAN
    bad_null[0, 0] = INF
    cases = [(w, norms, null) for w in bad_weights]
    cases += [(weight, bad_norms, null), (weight, norms, bad_null), (bad_weights[0], bad_norms, bad_null)]
    seen = set()
    for w, n, z in cases:
        for k, with_null in ((4, True), (0, True), (19, False)):
            nn = z if with_null else None
            want = nonfinite_flags(w, n, nn).item()
            assert triton_kernel(w, n, nn, k)[1].item() == want, (k, with_null, want)
            seen.add(want)
    assert seen == {0, 1, 2, 4, 1 | 2, 1 | 2 | 4}


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("backend", backends(OP, only=("triton",)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=dtype_id)
def test_triton_kernel_flags_every_weight_dtype(backend, dtype):
    weight, norms, null = mixed_inputs(5, 19, 1, seed=8, dtype=dtype)
    assert triton_kernel(weight, norms, null, 4)[1].item() == 0
    for bad in with_bad_weights(weight):
        assert triton_kernel(bad, norms, null, 4)[1].item() == BAD_WEIGHT


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("backend", backends(OP, only=("triton",)))
def test_triton_kernel_flags_edge_shapes(backend):
    """No rows: the norms are still checked; a float64 weight beyond float32's range is finite."""
    norms = torch.ones(1, 6)
    norms[0, 3] = NAN
    mask, flags = triton_kernel(torch.zeros(0, 6), norms, torch.full((1, 6), INF), 2)
    assert mask.shape == (0, 1) and flags.item() == BAD_NORMS | BAD_NULL_NORMS
    weight = torch.tensor([[1e300, -2.0, 1e-300, 3.0]], dtype=torch.float64)
    norms = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    mask, flags = triton_kernel(weight, norms, None, 2)
    assert flags.item() == 0
    assert_mask_equal(mask, mask_oracle(weight, norms, None, 2), 4)


@pytest.mark.parametrize("backend", backends(OP, only=("cuda",)))
@pytest.mark.parametrize("cols", [1, 33, 1000, 4097])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.usefixtures("smem_fallback")
def test_cuda_shared_memory_fallback(backend, cols, dtype):
    """The same exact masks with the row of |W| in shared memory and with the fallback forced."""
    check_odd_width(backend, cols, dtype)


@pytest.mark.parametrize("backend", backends(OP, only=("cuda",)))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_shared_memory_boundary_widths(backend, dtype):
    """Widths on both sides of where the kernel's row stops fitting in 48 KiB and in the opt-in limit."""
    props = torch.cuda.get_device_properties(backend_device(backend))
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is None:
        pytest.skip("torch does not report the opt-in shared memory limit")
    statics = dict(extension().cuda_kernel_static_smem(torch.cuda.current_device()))
    static = statics[f"wanda_mask<{dtype_id(dtype)},row>"]

    def row_bytes(n):
        return ((n + 31) // 32 + 3) // 4 * 16 + 4 * n

    first_over_default = next(n for n in range(1, 1 << 20) if static + row_bytes(n) > 48 * 1024)
    first_over_optin = next(n for n in range(1, 1 << 20) if static + row_bytes(n) > optin)
    edges = (first_over_default, first_over_optin)
    widths = sorted({11640, 11641, 11642, 11777, 11912, 11913, *(e + d for e in edges for d in (-1, 0, 1))})
    for cols in widths:
        g = torch.Generator().manual_seed(cols)
        weight = torch.randn(4, cols, generator=g).to(dtype)
        norms, null = torch.rand(2, cols, generator=g), torch.rand(2, cols, generator=g)
        for k in (0, 5, cols // 100):
            check(backend, weight, norms, null, k)
