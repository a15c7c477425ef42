"""wanda_mask against a brute force written from docs/method.md section 3 with plain Python/numpy loops.

Masks compare exactly (packed bytes), over odd widths, ties, zero and negative weights, -0.0,
k in {0, 1, in}, both selection directions, with and without null norms, fp16/bf16 weights.
The exactness tests run on every CPU backend (``reference`` and the C++ ``cpu``); the ``cpu``
backend is also compared byte for byte with the reference on the 16 SD 1.5 layer shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memcore.ops import use_backend
from memcore.ops._ext import extension
from memcore.ops.wanda_mask import pack_mask, unpack_mask, wanda_mask, wanda_mask_reference

ODD_WIDTHS = (1, 7, 8, 9, 13, 33, 100, 130)

needs_ext = pytest.mark.skipif(
    extension() is None, reason="memcore._C is not built (pip install -e . builds it); the cpu backend is absent"
)


@pytest.fixture(params=["reference", pytest.param("cpu", marks=needs_ext)])
def backend(request):
    """Run the test body with the wanda_mask backend forced."""
    with use_backend(request.param):
        yield request.param


def brute_force_mask(weight: torch.Tensor, norms: torch.Tensor, null_norms, k: int, largest: bool) -> np.ndarray:
    """Unpacked bool mask [out, in], one row and one t at a time."""
    w = weight.to(torch.float32).numpy()
    mem = norms.numpy().astype(np.float32)
    null = None if null_norms is None else null_norms.numpy().astype(np.float32)
    out, cols = w.shape
    mask = np.zeros((out, cols), dtype=bool)
    for t in range(mem.shape[0]):
        for r in range(out):
            s_mem = [np.float32(abs(w[r, j])) * mem[t, j] for j in range(cols)]
            if largest:
                order = sorted(range(cols), key=lambda j: (-float(s_mem[j]), j))
            else:
                order = sorted(range(cols), key=lambda j: (float(s_mem[j]), j))
            for j in order[:k]:
                if null is not None:
                    s_null = np.float32(abs(w[r, j])) * null[t, j]
                    if not s_mem[j] > s_null:
                        continue
                mask[r, j] = True
    return mask


def brute_force_packed(weight, norms, null_norms, k, largest) -> np.ndarray:
    return np.packbits(brute_force_mask(weight, norms, null_norms, k, largest), axis=1, bitorder="little")


def assert_mask_equal(got: torch.Tensor, want: np.ndarray, in_features: int) -> None:
    assert got.dtype == torch.uint8 and tuple(got.shape) == want.shape, (got.dtype, tuple(got.shape), want.shape)
    got_bits = unpack_mask(got, in_features).numpy()
    want_bits = np.unpackbits(want, axis=1, count=in_features, bitorder="little").astype(bool)
    diff = np.argwhere(got_bits != want_bits)
    assert diff.size == 0, f"{len(diff)} mask bits differ, first (row, col): {diff[:10].tolist()}"
    assert np.array_equal(got.numpy(), want), "packed bytes differ (padding bits?)"


def make_inputs(gen, out, cols, t, *, ties=False, dtype=torch.float32, with_null=True):
    if ties:
        weight = torch.randint(-2, 3, (out, cols), generator=gen).to(dtype)
        norms = torch.randint(0, 4, (t, cols), generator=gen).to(torch.float32)
        null = torch.randint(0, 4, (t, cols), generator=gen).to(torch.float32)
    else:
        weight = torch.randn(out, cols, generator=gen).to(dtype)
        weight[torch.rand(out, cols, generator=gen) < 0.1] = 0.0
        norms = torch.rand(t, cols, generator=gen) * 3
        null = torch.rand(t, cols, generator=gen) * 3
    return weight, norms, (null if with_null else None)


def check(weight, norms, null, k, largest):
    got = wanda_mask(weight, norms, null, k, largest)
    want = brute_force_packed(weight, norms, null, k, largest)
    assert_mask_equal(got, want, weight.shape[1])
    assert torch.equal(got, wanda_mask_reference(weight, norms, null, k, largest))


# --- pack / unpack ---------------------------------------------------------------------------


@pytest.mark.parametrize("cols", (0,) + ODD_WIDTHS + (16, 64))
def test_pack_matches_numpy_and_round_trips(cols):
    gen = torch.Generator().manual_seed(cols)
    mask = torch.rand(5, cols, generator=gen) < 0.5
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


# --- the op against the brute force ----------------------------------------------------------


@pytest.mark.parametrize("cols", ODD_WIDTHS)
@pytest.mark.parametrize("t", (1, 3, 10))
@pytest.mark.parametrize("with_null", (True, False))
def test_random(backend, cols, t, with_null):
    gen = torch.Generator().manual_seed(1000 * cols + 10 * t + with_null)
    weight, norms, null = make_inputs(gen, 11, cols, t, with_null=with_null)
    for k in sorted({0, 1, max(cols // 100, 1), cols // 3, cols}):
        for largest in (True, False):
            check(weight, norms, null, k, largest)


@pytest.mark.parametrize("cols", (7, 9, 13, 33, 100))
@pytest.mark.parametrize("with_null", (True, False))
@pytest.mark.parametrize("largest", (True, False))
def test_ties(backend, cols, with_null, largest):
    gen = torch.Generator().manual_seed(cols + 7 * with_null + 3 * largest)
    weight, norms, null = make_inputs(gen, 16, cols, 3, ties=True, with_null=with_null)
    for k in sorted({1, 2, cols // 4, cols // 2, cols - 1, cols}):
        check(weight, norms, null, k, largest)


def test_ties_lower_column_wins(backend):
    weight = torch.ones(2, 9)
    norms = torch.ones(1, 9)
    norms[0, 4] = 2.0
    got = unpack_mask(wanda_mask(weight, norms, None, 3), 9)
    assert got[0].nonzero().flatten().tolist() == [0, 1, 4]
    got = unpack_mask(wanda_mask(weight, norms, None, 3, largest=False), 9)
    assert got[0].nonzero().flatten().tolist() == [0, 1, 2]


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("with_null", (True, False))
def test_weight_dtypes(backend, dtype, with_null):
    gen = torch.Generator().manual_seed(7)
    weight, norms, null = make_inputs(gen, 13, 37, 3, dtype=dtype, with_null=with_null)
    for k in (1, 5, 37):
        for largest in (True, False):
            check(weight, norms, null, k, largest)


def test_float64_weights_are_rounded_to_float32_first(backend):
    # 1 + 2^-30 rounds to 1.0 in float32: the two columns tie and the lower index wins.
    weight = torch.tensor([[1.0, 1.0 + 2.0**-30]], dtype=torch.float64)
    norms = torch.ones(1, 2)
    assert unpack_mask(wanda_mask(weight, norms, None, 1), 2).tolist() == [[True, False]]


def test_zero_weights_never_selected_with_null_norms(backend):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 33, generator=gen)
    weight[:, ::3] = 0.0
    weight[::2, 1::3] = -0.0
    norms = torch.rand(3, 33, generator=gen) + 1.0
    null = torch.zeros(3, 33)  # S_mem > S_null holds for every nonzero weight
    for largest in (True, False):
        for k in (1, 11, 33):
            mask = unpack_mask(wanda_mask(weight, norms, null, k, largest), 33)
            assert not mask[weight == 0].any()
            check(weight, norms, null, k, largest)


def test_zero_weights_without_null_norms_only_by_rank(backend):
    # Row 0: two nonzero weights, so k = 3 must pick one zero column (the lowest index, column 0).
    weight = torch.tensor([[0.0, 2.0, -0.0, 0.0, -3.0], [1.0, 0.0, 2.0, 3.0, 4.0]])
    norms = torch.ones(1, 5)
    got = unpack_mask(wanda_mask(weight, norms, None, 3), 5)
    assert got.tolist() == [[True, True, False, False, True], [False, False, True, True, True]]
    got = unpack_mask(wanda_mask(weight, norms, None, 2, largest=False), 5)
    assert got.tolist() == [[True, False, True, False, False], [True, True, False, False, False]]
    for k in range(6):
        for largest in (True, False):
            check(weight, norms, None, k, largest)


def test_null_condition_is_strict_and_on_products(backend):
    weight = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    norms = torch.tensor([[2.0, 2.0, 2.0, 5.0]])
    null = torch.tensor([[2.0, 1.0, 3.0, 1.0]])  # equal, smaller, larger, smaller-but-zero-weight
    got = unpack_mask(wanda_mask(weight, norms, null, 4), 4)
    assert got.tolist() == [[False, True, False, False]]
    check(weight, norms, null, 4, True)


def test_or_over_t(backend):
    weight = torch.ones(1, 4)
    norms = torch.tensor([[3.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 3.0]])
    assert unpack_mask(wanda_mask(weight, norms, None, 1), 4).tolist() == [[True, False, False, True]]


def test_k_zero_and_k_all(backend):
    gen = torch.Generator().manual_seed(5)
    weight, norms, null = make_inputs(gen, 6, 13, 3)
    assert not unpack_mask(wanda_mask(weight, norms, null, 0), 13).any()
    assert not unpack_mask(wanda_mask(weight, norms, None, 0), 13).any()
    assert unpack_mask(wanda_mask(weight, norms, None, 13), 13).all()
    want = (weight.abs().unsqueeze(0) * norms.unsqueeze(1) > weight.abs().unsqueeze(0) * null.unsqueeze(1)).any(0)
    assert torch.equal(unpack_mask(wanda_mask(weight, norms, null, 13), 13), want)


def test_sd_layer_shape_against_lexsort(backend):
    # A real SD 1.x layer size (320 x 1280, tau = 10, s = 0.01): a vectorized numpy check.
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(320, 1280, generator=gen).to(torch.float16)
    norms = torch.rand(10, 1280, generator=gen) * 4
    null = torch.rand(10, 1280, generator=gen) * 4
    k = 12
    w = np.abs(weight.float().numpy())
    cols = np.broadcast_to(np.arange(1280), w.shape)
    want = np.zeros(w.shape, dtype=bool)
    for t in range(10):
        s_mem = w * norms[t].numpy()
        top = np.lexsort((cols, -s_mem), axis=1)[:, :k]
        sel = np.zeros(w.shape, dtype=bool)
        np.put_along_axis(sel, top, True, axis=1)
        want |= sel & (s_mem > w * null[t].numpy())
    assert_mask_equal(wanda_mask(weight, norms, null, k), np.packbits(want, axis=1, bitorder="little"), 1280)


# --- the C++ backend against the reference, byte for byte ----------------------------------------

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


def assert_cpu_matches_reference(weight, norms, null, k, largest=True, row_step=1):
    """Byte equality; rows are independent, so the reference may be evaluated on every row_step-th row."""
    with use_backend("cpu"):
        got = wanda_mask(weight, norms, null, k, largest)[::row_step]
    want = wanda_mask_reference(weight[::row_step], norms, null, k, largest)
    if not torch.equal(got, want):
        cols = weight.shape[1]
        diff = (unpack_mask(got, cols) != unpack_mask(want, cols)).nonzero()
        raise AssertionError(
            f"k={k} largest={largest} null={null is not None}: {len(diff)} mask bits differ, "
            f"first (row, col): {diff[:10].tolist()}"
        )


@needs_ext
def test_cpu_backend_is_available_and_preferred(monkeypatch):
    from memcore.ops import available_backends, chosen_backend

    monkeypatch.delenv("MEMCORE_BACKEND", raising=False)
    assert "cpu" in available_backends("wanda_mask", "cpu")
    with use_backend(None):
        assert chosen_backend("wanda_mask", "cpu") == "cpu"


@needs_ext
@pytest.mark.parametrize("t", (1, 10))
@pytest.mark.parametrize("index", range(len(SD15_LAYERS)), ids=[name for name, _, _ in SD15_LAYERS])
def test_cpu_sd15_layers(index, t):
    _, out, cols = SD15_LAYERS[index]
    gen = torch.Generator().manual_seed(100 * index + t)
    dtype = (torch.float16, torch.float32, torch.bfloat16)[index % 3]
    weight = torch.randn(out, cols, generator=gen).to(dtype)
    norms = torch.rand(t, cols, generator=gen) * 4
    null = torch.rand(t, cols, generator=gen) * 4 if index % 2 == 0 else None
    # the whole layer on the cpu backend; the (slow) reference on a quarter of its rows when t = 10
    assert_cpu_matches_reference(weight, norms, null, cols // 100, largest=index % 4 != 3, row_step=1 if t == 1 else 4)


@needs_ext
def test_cpu_sd15_all_51_calls():
    gen = torch.Generator().manual_seed(51)
    weight = torch.randn(320, 1280, generator=gen).to(torch.float16)
    norms = torch.rand(51, 1280, generator=gen) * 4
    null = torch.rand(51, 1280, generator=gen) * 4
    assert_cpu_matches_reference(weight, norms, null, 12)


@needs_ext
@pytest.mark.parametrize("cols", (255, 1001, 2047))
@pytest.mark.parametrize("ties", (False, True))
def test_cpu_wide_odd_rows(cols, ties):
    # wide enough for the group-maximum bound of the small-k path, not a multiple of 8 or 16
    gen = torch.Generator().manual_seed(cols + ties)
    weight, norms, null = make_inputs(gen, 16, cols, 3, ties=ties)
    for k in sorted({1, cols // 100, cols // 16, cols // 3, cols - 1}):
        for largest in (True, False):
            for z in (null, None):
                assert_cpu_matches_reference(weight, norms, z, k, largest)


@needs_ext
def test_cpu_constant_rows_are_all_ties():
    weight = torch.full((5, 1000), 0.5)
    weight[1] = 0.0
    norms = torch.ones(2, 1000)
    for k in (1, 10, 999):
        for largest in (True, False):
            assert_cpu_matches_reference(weight, norms, None, k, largest)
            assert_cpu_matches_reference(weight, norms, norms * 0.5, k, largest)


@needs_ext
def test_cpu_negative_and_signed_zero_norms():
    # validation only asks for finite norms: negative norms and -0.0 scores must order as floats do
    gen = torch.Generator().manual_seed(9)
    weight, _, _ = make_inputs(gen, 12, 301, 1)
    norms = torch.randn(3, 301, generator=gen)
    norms[0, ::5] = -0.0
    norms[1, ::7] = 0.0
    null = torch.randn(3, 301, generator=gen)
    for k in (1, 3, 18, 100, 301):
        for largest in (True, False):
            for z in (null, None):
                assert_cpu_matches_reference(weight, norms, z, k, largest)


@needs_ext
def test_cpu_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(200, 40, generator=gen).t()  # [40, 200], column-major
    norms = (torch.rand(3, 400, generator=gen) * 2)[:, ::2]
    null = (torch.rand(3, 400, generator=gen) * 2)[:, 1::2]
    assert not (weight.is_contiguous() or norms.is_contiguous() or null.is_contiguous())
    for k in (2, 50):
        assert_cpu_matches_reference(weight, norms, null, k)


@needs_ext
def test_cpu_native_argument_errors():
    ext = extension()
    weight, norms = torch.randn(4, 9), torch.rand(2, 9)
    mask = torch.empty(4, 2, dtype=torch.uint8)
    flags = torch.zeros(1, dtype=torch.int32)
    args = [weight.data_ptr(), "float32", 4, 9, norms.data_ptr(), 0, 2, 3, True, mask.data_ptr(), flags.data_ptr()]
    ext.wanda_mask_cpu(*args)
    assert torch.equal(mask, wanda_mask_reference(weight, norms, None, 3))
    assert flags.item() == 0
    with pytest.raises(ValueError, match="k=10"):
        ext.wanda_mask_cpu(*args[:7], 10, *args[8:])
    with pytest.raises(ValueError, match="dtype"):
        ext.wanda_mask_cpu(args[0], "int8", *args[2:])
    with pytest.raises(ValueError, match="null pointer"):
        ext.wanda_mask_cpu(*args[:10], 0)


@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("k", (0, 1, 5, 37))
@pytest.mark.parametrize("bad", (float("nan"), float("inf"), float("-inf")))
def test_cpu_kernel_sets_the_flag_word(dtype, k, bad):
    """The C++ kernel's flag word equals the one torch computes, for every k (0 and in included)."""
    from memcore.ops.wanda_mask import BAD_NORMS, BAD_NULL_NORMS, BAD_WEIGHT, _native, nonfinite_flags

    gen = torch.Generator().manual_seed(k)
    weight, norms, null = make_inputs(gen, 9, 37, 3, dtype=dtype)
    for which in range(8):  # every subset of {weight, norms, null_norms}
        w, n, z = weight.clone(), norms.clone(), null.clone()
        if which & BAD_WEIGHT:
            w[4, 36] = bad
        if which & BAD_NORMS:
            n[2, 0] = bad
        if which & BAD_NULL_NORMS:
            z[1, 17] = bad
        for nn in (z, None):
            mask, flags = _native(w, n, nn, k, True)
            want = nonfinite_flags(w, n, nn)
            assert flags.dtype == torch.int32 and tuple(flags.shape) == (1,)
            assert int(flags) == int(want) == (which if nn is not None else which & ~BAD_NULL_NORMS), (which, nn is None)
            if not which:
                assert torch.equal(mask, wanda_mask_reference(w, n, nn, k))


@needs_ext
def test_cpu_flags_check_float64_weights_before_rounding():
    # 1e300 is a finite float64 weight (no flag, as in the reference) though its float32 score is inf
    weight = torch.randn(3, 20, dtype=torch.float64)
    weight[1, 3] = 1e300
    norms = torch.rand(2, 20)
    with use_backend("cpu"):
        got = wanda_mask(weight, norms, None, 4)
    assert torch.equal(got, wanda_mask_reference(weight, norms, None, 4))


@needs_ext
def test_cpu_flags_name_every_bad_input():
    weight, norms, null = torch.randn(4, 9), torch.rand(3, 9), torch.rand(3, 9)
    weight[0, 0] = float("nan")
    norms[2, 8] = float("inf")
    with use_backend("cpu"), pytest.raises(ValueError, match="wanda_mask: weight and norms contain NaN or inf"):
        wanda_mask(weight, norms, null, 0)


# --- validation --------------------------------------------------------------------------------


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
)
def test_validation_errors(change, match):
    weight, norms, null = torch.randn(4, 9), torch.rand(3, 9), torch.rand(3, 9)
    with pytest.raises(ValueError, match=match):
        wanda_mask(*change(weight, norms, null, 2))


@pytest.mark.parametrize("bad", (float("nan"), float("inf"), float("-inf")))
@pytest.mark.parametrize("which", ("weight", "norms", "null_norms"))
def test_non_finite_inputs(bad, which):
    args = {"weight": torch.randn(4, 9), "norms": torch.rand(3, 9), "null_norms": torch.rand(3, 9)}
    args[which][1, 2] = bad
    with pytest.raises(ValueError, match=f"wanda_mask: {which} contains? NaN or inf"):
        wanda_mask(args["weight"], args["norms"], args["null_norms"], 2)


# --- torch.library ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_null", (True, False))
def test_opcheck(backend, with_null):
    gen = torch.Generator().manual_seed(2)
    weight, norms, null = make_inputs(gen, 5, 13, 3, with_null=with_null)
    torch.library.opcheck(torch.ops.memcore.wanda_mask.default, (weight, norms, null, 3, True))
    torch.library.opcheck(torch.ops.memcore.wanda_mask.default, (weight.half(), norms, null, 4), {"largest": False})


def test_fake_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = wanda_mask(torch.empty(6, 13, dtype=torch.bfloat16), torch.empty(2, 13), None, 3)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (6, 2)


# --- the grouped entry point ------------------------------------------------------------------------


def grouped_inputs(gen, with_null: bool):
    shapes = [(5, 13), (40, 64), (1, 1), (17, 100), (0, 9), (8, 130)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float32, torch.float32]
    weights, norms, nulls, ks = [], [], [], []
    for i, ((out, cols), dtype) in enumerate(zip(shapes, dtypes)):
        weight, n, null = make_inputs(gen, out, cols, 3, ties=i % 2 == 1, dtype=dtype, with_null=True)
        weights.append(weight)
        norms.append(n)
        nulls.append(null)
        ks.append([0, 1, cols, cols // 3, 2, 7][i])
    return weights, norms, nulls if with_null else None, ks


@pytest.mark.parametrize("with_null", (True, False))
@pytest.mark.parametrize("largest", (True, False))
def test_grouped_is_each_layer_bit_for_bit(backend, with_null, largest):
    from memcore.ops.wanda_mask import wanda_mask_grouped

    gen = torch.Generator().manual_seed(11)
    weights, norms, nulls, ks = grouped_inputs(gen, with_null)
    got = wanda_mask_grouped(weights, norms, nulls, ks, largest)
    assert len(got) == len(weights)
    for i, (w, n, k) in enumerate(zip(weights, norms, ks)):
        null = None if nulls is None else nulls[i]
        assert torch.equal(got[i], wanda_mask_reference(w, n, null, k, largest)), i
        assert_mask_equal(got[i], brute_force_packed(w, n, null, k, largest), w.shape[1])


def test_grouped_mistakes_name_the_layer(backend):
    from memcore.ops.wanda_mask import wanda_mask_grouped

    gen = torch.Generator().manual_seed(12)
    weights, norms, nulls, ks = grouped_inputs(gen, True)
    with pytest.raises(ValueError, match="norms has 5 entries for 6 weights"):
        wanda_mask_grouped(weights, norms[:5], nulls, ks)
    with pytest.raises(ValueError, match="weights is empty"):
        wanda_mask_grouped([], [], None, [])
    bad_k = [*ks[:3], 1000, *ks[4:]]
    with pytest.raises(ValueError, match=r"layer 3: k must be in \[0, 100\]"):
        wanda_mask_grouped(weights, norms, nulls, bad_k)
    with pytest.raises(ValueError, match="layer 1 has T = 2 rows of norms, layer 0 3"):
        wanda_mask_grouped(weights, [norms[0], norms[1][:2], *norms[2:]], None, ks)
    poisoned = [w.clone() for w in weights]
    poisoned[3][2, 5] = float("nan")
    with pytest.raises(ValueError, match="wanda_mask_grouped: layer 3: weight contains NaN or inf"):
        wanda_mask_grouped(poisoned, norms, nulls, ks)


def test_grouped_op_passes_opcheck(backend):
    from memcore.ops.wanda_mask import wanda_mask_grouped_op

    gen = torch.Generator().manual_seed(13)
    weights, norms, nulls, ks = grouped_inputs(gen, True)
    keep = [1, 3, 5]  # opcheck's schema tests do not take empty tensors
    torch.library.opcheck(wanda_mask_grouped_op, ([weights[i] for i in keep], [norms[i] for i in keep], [], [ks[i] for i in keep], True))
    torch.library.opcheck(wanda_mask_grouped_op, ([weights[i] for i in keep], [norms[i] for i in keep],
                                               [nulls[i] for i in keep], [ks[i] for i in keep], True))
