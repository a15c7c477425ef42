"""The GPU backends (CUDA kernels and compiled Triton) against the references on the SD 1.5 shapes,
and the CUDA kernels alone on odd widths, every dtype, their shared-memory fallbacks, the widths
where shared memory runs out, non-finite rows, and run-to-run determinism.

These need a CUDA device and are skipped without one; the GPU check script
(tools/gpu_check.sh) runs them on the lent GPU machine. The CPU backends and the Triton kernels
under the interpreter are tested everywhere by the other test files, and the CUDA launch plans
without a GPU by tests/test_cuda_launch.py.
"""

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (see tools/gpu_check.sh)", allow_module_level=True)

from memcore.ops import geglu_accumulate, sqnorm_accumulate, use_backend, wanda_mask  # noqa: E402
from memcore.ops._backend import triton_usable  # noqa: E402
from memcore.ops._ext import cuda_backend_status, extension, has_cuda_kernels  # noqa: E402
from memcore.ops.geglu_accumulate import geglu_accumulate_reference  # noqa: E402
from memcore.ops.sqnorm_accumulate import sqnorm_accumulate_reference  # noqa: E402
from memcore.ops.wanda_mask import unpack_mask, wanda_mask_reference  # noqa: E402

DEVICE = torch.device("cuda")
SD15_LAYERS = [(320, 1280)] * 5 + [(640, 2560)] * 5 + [(1280, 5120)] * 6
STAT_SHAPES = [(4096, 1280), (1024, 2560), (256, 5120), (64, 5120)]  # tokens per image, inner


def gpu_backends():
    names = []
    if has_cuda_kernels():
        names.append("cuda")
    if triton_usable(DEVICE):
        names.append("triton")
    return names


BACKENDS = gpu_backends()


def gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 10, 51])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("with_null", [True, False])
def test_wanda_mask_sd15_layers(backend, T, largest, with_null):
    for i, (out, cols) in enumerate(SD15_LAYERS[::5] if T == 51 else SD15_LAYERS):
        g = gen(i)
        weight = torch.randn(out, cols, device=DEVICE, generator=g).half()
        weight[:, ::97] = 0  # zero weights
        norms = torch.rand(T, cols, device=DEVICE, generator=g)
        norms[:, 1::3] = norms[:, :1]  # many ties
        null = torch.rand(T, cols, device=DEVICE, generator=g) if with_null else None
        for k in (0, 1, math.floor(0.01 * cols), cols):
            want = wanda_mask_reference(weight, norms, null, k, largest)
            with use_backend(backend):
                got = wanda_mask(weight, norms, null, k, largest)
            if not torch.equal(got, want):
                diff = (unpack_mask(got, cols) != unpack_mask(want, cols)).nonzero()
                pytest.fail(f"{backend} {out}x{cols} T={T} k={k}: {len(diff)} entries differ, first {diff[0].tolist()}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [2, 16])
def test_statistics_ops_sd15_shapes(backend, dtype, batch):
    for tokens, inner in STAT_SHAPES:
        p = torch.randn(batch, tokens, 2 * inner, device=DEVICE, generator=gen(inner), dtype=torch.float32).to(dtype)
        half = batch * tokens // 2
        for token_norm in (True, False):
            want_acc = torch.zeros(inner, device=DEVICE)
            want_x = geglu_accumulate_reference(p, want_acc, half, None, token_norm)
            got_acc = torch.zeros(inner, device=DEVICE)
            with use_backend(backend):
                got_x = geglu_accumulate(p, got_acc, half, None, token_norm)
            atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
            torch.testing.assert_close(got_x.float(), want_x.float(), rtol=atol, atol=atol)
            # statistics of the backend's own output against the float64 reference of that output
            ref_acc = torch.zeros(inner, device=DEVICE)
            sqnorm_accumulate_reference(got_x, ref_acc, half, None, token_norm)
            torch.testing.assert_close(got_acc, ref_acc, rtol=1e-5, atol=0)
            acc = torch.zeros(inner, device=DEVICE)
            with use_backend(backend):
                sqnorm_accumulate(got_x, acc, half, None, token_norm)
            torch.testing.assert_close(acc, ref_acc, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_localize_on_gpu_matches_reference(backend):
    from memcore.config import LocalizeConfig
    from memcore.localization import localize
    from memcore.models import load_pipeline

    pipe = load_pipeline("tiny", device="cuda", dtype="float32")
    prompts = ["a painting of a fox", "the great wave, print", "portrait of a man in a hat"]
    config = LocalizeConfig(timesteps=3, sparsity=0.05, progress=False)
    with use_backend("reference"):
        want, want_stats = localize(pipe, prompts, config)
    with use_backend(backend):
        got, got_stats = localize(pipe, prompts, config)
    for name in want.layers:
        # the fused GEGLU may round activations differently, so statistics agree to float32 noise
        torch.testing.assert_close(got_stats.mem[name], want_stats.mem[name], rtol=1e-4, atol=1e-6)
    differing = sum(int((got.unpack(n) != want.unpack(n)).sum()) for n in want.layers)
    total = sum(int(want.unpack(n).sum()) for n in want.layers)
    assert differing <= max(1, total // 1000), f"{differing} of {total} mask entries differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_subsets_on_gpu_match_separate_runs(backend):
    """Batches spanning subsets route prompt ranges through the fused GEGLU and the statistic op."""
    from memcore.config import LocalizeConfig
    from memcore.localization import localize, localize_subsets
    from memcore.models import load_pipeline

    pipe = load_pipeline("tiny", device="cuda", dtype="float32")
    subsets = {"a": ["a fox", "the wave", "a man"], "b": ["the wave", "a cat", "a dog"]}
    config = LocalizeConfig(timesteps=2, sparsity=0.05, batch_size=4, progress=False)
    with use_backend(backend):
        together = localize_subsets(pipe, subsets, config)
        for name, prompts in subsets.items():
            _, stats = localize(pipe, prompts, config)
            for layer in stats.layers:
                torch.testing.assert_close(together[name][1].mem[layer], stats.mem[layer], rtol=1e-4, atol=1e-6)


# --- the CUDA kernels alone ----------------------------------------------------------------------

EPS32 = torch.finfo(torch.float32).eps
ODD_WIDTHS = [1, 33, 1000, 4097]
ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OUT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}

needs_cuda_kernels = pytest.mark.skipif(not has_cuda_kernels(), reason="memcore._C was built without CUDA kernels")


@pytest.fixture(params=[False, True], ids=["shared", "fallback"])
def smem_fallback(request):
    """Run with the shared-memory kernels, then with their fallbacks forced."""
    ext = extension()
    before = ext.cuda_smem_fallback()
    ext.set_cuda_smem_fallback(request.param)
    try:
        yield request.param
    finally:
        ext.set_cuda_smem_fallback(before)


def run_geglu(p, acc, row_start=0, row_end=None, token_norm=True):
    with use_backend("cuda"):
        return geglu_accumulate(p, acc, row_start, row_end, token_norm)


def check_geglu(p, row_start, row_end, token_norm, stat_rtol=4 * EPS32):
    inner = p.shape[-1] // 2
    acc0 = torch.rand(inner, device=DEVICE, generator=gen(inner))
    acc = acc0.clone()
    got = run_geglu(p, acc, row_start, row_end, token_norm)
    want = geglu_accumulate_reference(p, torch.zeros_like(acc), row_start, row_end, token_norm)
    finite = torch.isfinite(want)
    tol = OUT_TOL[p.dtype]
    torch.testing.assert_close(got[finite].double(), want[finite].double(), rtol=tol, atol=tol)
    assert torch.equal(torch.isfinite(got), finite)
    # the statistic of the kernel's own output, against the float64 reference of that output
    ref = acc0.clone()
    sqnorm_accumulate_reference(got, ref, row_start, row_end, token_norm)
    torch.testing.assert_close(acc, ref, rtol=stat_rtol, atol=0, equal_nan=not token_norm)
    return got, acc


def test_probe_passes_on_every_device():
    ext = extension()
    if not has_cuda_kernels():
        pytest.skip("memcore._C was built without CUDA kernels")
    for index in range(torch.cuda.device_count()):
        assert ext.cuda_probe(index) == "", index
    status = cuda_backend_status()
    assert "cuda:0 ok" in status, status


@needs_cuda_kernels
@pytest.mark.parametrize("token_norm", [True, False])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("cols", ODD_WIDTHS)
def test_sqnorm_odd_widths_and_dtypes(cols, dtype, token_norm):
    x = (torch.randn(37, cols, device=DEVICE, generator=gen(cols), dtype=torch.float64) * 3).to(dtype)
    for row_start, row_end in ((0, 37), (5, 36), (36, 37)):
        acc0 = torch.rand(cols, device=DEVICE, generator=gen(1))
        acc = acc0.clone()
        with use_backend("cuda"):
            sqnorm_accumulate(x, acc, row_start, row_end, token_norm)
        want = acc0.clone()
        sqnorm_accumulate_reference(x, want, row_start, row_end, token_norm)
        torch.testing.assert_close(acc, want, rtol=4 * EPS32, atol=0)


@needs_cuda_kernels
@pytest.mark.parametrize("token_norm", [True, False])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("inner", ODD_WIDTHS)
def test_geglu_odd_widths_and_dtypes(inner, dtype, token_norm, smem_fallback):
    p = (torch.randn(41, 2 * inner, device=DEVICE, generator=gen(inner), dtype=torch.float64) * 2.5).to(dtype)
    for row_start, row_end in ((0, 41), (3, 39), (40, 41), (7, 7)):
        check_geglu(p, row_start, row_end, token_norm)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("cols", ODD_WIDTHS)
def test_wanda_odd_widths_and_dtypes(cols, dtype, smem_fallback):
    g = gen(cols)
    weight = torch.randn(19, cols, device=DEVICE, generator=g).to(dtype)
    weight[:, ::7] = 0
    norms = torch.rand(3, cols, device=DEVICE, generator=g)
    norms[:, 1::4] = norms[:, :1]  # ties
    null = torch.rand(3, cols, device=DEVICE, generator=g)
    for k in sorted({0, 1, cols // 3, cols}):
        for largest in (True, False):
            for z in (null, None):
                want = wanda_mask_reference(weight, norms, z, k, largest)
                with use_backend("cuda"):
                    got = wanda_mask(weight, norms, z, k, largest)
                assert torch.equal(got, want), (cols, dtype, k, largest, z is None)


def shared_memory_edges():
    """Static shared memory of each kernel on this device and its opt-in limit per block."""
    props = torch.cuda.get_device_properties(DEVICE)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is None:
        pytest.skip("torch does not report the opt-in shared memory limit")
    return dict(extension().cuda_kernel_static_smem(DEVICE.index or 0)), int(optin)


@needs_cuda_kernels
@pytest.mark.parametrize("token_norm", [True, False])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_geglu_shared_memory_boundary_widths(dtype, token_norm):
    static, optin = shared_memory_edges()
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}
    s = static[f"geglu_accumulate<{name[dtype]}>"]
    per_column = 8 + ((8 if dtype == torch.float64 else 4) if token_norm else 0)
    edges = [(48 * 1024 - s) // per_column, (optin - s) // per_column]
    widths = sorted({6136, 6137, 6144, 6145, 12272, 12273, 12288, 12289, *(e + d for e in edges for d in (-1, 0, 1, 2))})
    for inner in widths:
        p = torch.randn(3, 2 * inner, device=DEVICE, generator=gen(inner), dtype=torch.float32).to(dtype)
        check_geglu(p, 0, 3, token_norm)
    torch.cuda.synchronize()


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_wanda_shared_memory_boundary_widths(dtype):
    static, optin = shared_memory_edges()
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}
    s = static[f"wanda_mask<{name[dtype]},row>"]

    def row_bytes(n):
        return ((n + 31) // 32 + 3) // 4 * 16 + 4 * n

    first_over_default = next(n for n in range(1, 1 << 20) if s + row_bytes(n) > 48 * 1024)
    first_over_optin = next(n for n in range(1, 1 << 20) if s + row_bytes(n) > optin)
    widths = sorted(
        {11640, 11641, 11642, 11777, 11912, 11913, *(e + d for e in (first_over_default, first_over_optin) for d in (-1, 0, 1))}
    )
    for cols in widths:
        g = gen(cols)
        weight = torch.randn(4, cols, device=DEVICE, generator=g).to(dtype)
        norms = torch.rand(2, cols, device=DEVICE, generator=g)
        null = torch.rand(2, cols, device=DEVICE, generator=g)
        for k in (0, 5, cols // 100):
            with use_backend("cuda"):
                got = wanda_mask(weight, norms, null, k)
            assert torch.equal(got, wanda_mask_reference(weight, norms, null, k)), (cols, k)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("token_norm", [True, False])
def test_statistics_identical_from_run_to_run(dtype, token_norm, smem_fallback):
    # many blocks per column: the sum order of the partials is what varied with float atomics
    p = torch.randn(8192, 2 * 1280, device=DEVICE, generator=gen(3), dtype=torch.float32).to(dtype)
    x = p[:, :1280].contiguous()
    geglu_runs, sqnorm_runs = [], []
    for _ in range(3):
        acc = torch.zeros(1280, device=DEVICE)
        out = run_geglu(p, acc, 100, 8000, token_norm)
        geglu_runs.append((out, acc))
        acc = torch.zeros(1280, device=DEVICE)
        with use_backend("cuda"):
            sqnorm_accumulate(x, acc, 0, None, token_norm)
        sqnorm_runs.append(acc)
    for out, acc in geglu_runs[1:]:
        assert torch.equal(out, geglu_runs[0][0]) and torch.equal(acc, geglu_runs[0][1])
        assert acc.view(torch.int32).equal(geglu_runs[0][1].view(torch.int32))  # byte for byte
    for acc in sqnorm_runs[1:]:
        assert acc.view(torch.int32).equal(sqnorm_runs[0].view(torch.int32))
    # and agree with the reference
    ref = torch.zeros(1280, device=DEVICE)
    sqnorm_accumulate_reference(x, ref, 0, None, token_norm)
    torch.testing.assert_close(sqnorm_runs[0], ref, rtol=4 * EPS32, atol=0)


@needs_cuda_kernels
@pytest.mark.parametrize("token_norm", [True, False])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("cols", [5, 300, 4097])
def test_non_finite_and_extreme_rows(cols, dtype, token_norm, smem_fallback):
    from test_sqnorm_accumulate import special_matrix

    x = special_matrix(cols, dtype, seed=cols).to(DEVICE)
    acc0 = torch.rand(cols, device=DEVICE, generator=gen(2))
    acc = acc0.clone()
    with use_backend("cuda"):
        sqnorm_accumulate(x, acc, 0, None, token_norm)
    want = acc0.clone()
    sqnorm_accumulate_reference(x, want, 0, None, token_norm)
    torch.testing.assert_close(acc, want, rtol=4 * EPS32, atol=0, equal_nan=not token_norm)
    if token_norm:
        assert torch.isfinite(acc).all()
    # the same rows as GEGLU outputs: h = the row, g = 2 (gelu(2) = 1.95)
    h = special_matrix(cols, torch.float64, seed=cols)
    p = torch.cat([h, torch.full_like(h, 2.0)], dim=1).to(dtype).to(DEVICE)
    check_geglu(p, 0, p.shape[0], token_norm)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_wanda_flag_word_from_the_kernel(dtype, bad, smem_fallback):
    from memcore.ops.wanda_mask import _native, nonfinite_flags

    g = gen(5)
    weight = torch.randn(6, 333, device=DEVICE, generator=g).to(dtype)
    norms = torch.rand(2, 333, device=DEVICE, generator=g)
    null = torch.rand(2, 333, device=DEVICE, generator=g)
    for which in range(8):
        w, n, z = weight.clone(), norms.clone(), null.clone()
        if which & 1:
            w[5, 332] = bad
        if which & 2:
            n[1, 0] = bad
        if which & 4:
            z[0, 100] = bad
        for k in (0, 3, 333):
            mask, flags = _native(w, n, z, k, True)
            assert flags.device == w.device and int(flags) == int(nonfinite_flags(w, n, z)) == which, (which, k)
    weight[0, 0] = bad
    with use_backend("cuda"), pytest.raises(ValueError, match="wanda_mask: weight contains NaN or inf"):
        wanda_mask(weight, norms, null, 3)


@needs_cuda_kernels
def test_static_shared_memory_matches_the_library():
    """cudaFuncGetAttributes on this device reports what cuobjdump reads for its architecture."""
    from test_cuda_launch import kernel_static_smem, statics

    major, minor = torch.cuda.get_device_capability(DEVICE)
    table = kernel_static_smem().get(f"sm_{major}{minor}")
    if table is None:
        pytest.skip(f"no sm_{major}{minor} code in the library (the device runs JIT-compiled PTX)")
    runtime = dict(extension().cuda_kernel_static_smem(DEVICE.index or 0))
    for name, bytes_ in runtime.items():
        op, args = name.split("<")
        parts = args.rstrip(">").split(",")
        key = ("geglu", parts[0]) if op == "geglu_accumulate" else ("wanda", parts[0], parts[1])
        # for sm_90 cuobjdump counts the block's 1 KiB of reserved shared memory, which the runtime may not
        assert bytes_ in statics(table[key], f"sm_{major}{minor}"), (name, table[key], bytes_)
        print(f"{name}: runtime {bytes_} bytes, cuobjdump {table[key]}")
