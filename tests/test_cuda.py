"""The GPU backends (CUDA kernels and compiled Triton) against the references on the SD 1.5 shapes.

These need a CUDA device and are skipped without one; the GPU check script
(tools/gpu_check.sh) runs them on the lent GPU machine. The CPU backends and the Triton kernels
under the interpreter are tested everywhere by the other test files.
"""

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (see tools/gpu_check.sh)", allow_module_level=True)

from memcore.ops import geglu_accumulate, sqnorm_accumulate, use_backend, wanda_mask  # noqa: E402
from memcore.ops._backend import triton_usable  # noqa: E402
from memcore.ops._ext import has_cuda_kernels  # noqa: E402
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
    from memcore.localize import localize
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
    from memcore.localize import localize, localize_subsets
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
