"""The code the GPU runs, checked without one: memcore's Triton kernels compiled for sm_90 here
(Triton ships ptxas) in a subprocess without the interpreter, their PTX and metadata read (no
approximate division, no float atomics in the statistics, shared memory within an H100's limit);
their sources (no float atomics); and every launch made under the guard of the tensors' device.
On a machine with two GPUs, the kernels run on the second while the first is current.

The ops' values are tested per op over every backend in tests/test_<op>.py.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from helpers import HAS_CUDA, activations, assert_mask_equal, assert_statistic_close, mask_inputs, mask_oracle  # noqa: E402
from memcore.ops import geglu_accumulate, sqnorm_accumulate, use_backend, wanda_mask  # noqa: E402

DEVICE = torch.device("cuda") if HAS_CUDA else torch.device("cpu")


# --- determinism and the device of a launch -----------------------------------------------------


def _kernel_modules():
    from memcore._kernels import geglu_accumulate as geglu_module
    from memcore._kernels import sqnorm_accumulate as sqnorm_module
    from memcore._kernels import wanda_mask as wanda_module

    return sqnorm_module, geglu_module, wanda_module


def test_statistics_kernels_use_no_float_atomics():
    """Column sums go through a per-program workspace added up in program order, never through
    atomics whose order depends on scheduling (the compiled PTX is checked below as well)."""
    for module in _kernel_modules()[:2]:
        assert re.search(r"\batomic_\w+\(", inspect.getsource(module)) is None, module.__name__


def test_device_guard_selects_the_tensors_device():
    from memcore._kernels._launch import device_guard

    guard = device_guard(torch.device("cuda", 1))  # not entered: no CUDA needed to build it
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)


class _LaunchSpy:
    """Stands in for a kernel: records the devices of the guards active at each launch."""

    def __init__(self, name, kernel, active, launches):
        self.name, self.kernel, self.active, self.launches = name, kernel, active, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, list(self.active)))
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_every_launch_runs_under_the_device_guard(monkeypatch):
    """Triton compiles for and launches on the current device: every kernel launch of the three ops
    happens inside device_guard(the tensors' device), on every path."""
    active, launches = [], []

    @contextlib.contextmanager
    def spy_guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    modules = _kernel_modules()
    kernels = set()
    for module in modules:
        monkeypatch.setattr(module, "device_guard", spy_guard)
        for name in dir(module):
            if name.endswith("_kernel"):
                kernels.add(name)
                monkeypatch.setattr(module, name, _LaunchSpy(name, getattr(module, name), active, launches))
    sqnorm_module, geglu_module, wanda_module = modules
    x = activations((5, 24), torch.float32, seed=1).to(DEVICE)
    for token_norm in (True, False):
        for max_cols in (32, 8):
            acc, acc_geglu = torch.zeros(24, device=DEVICE), torch.zeros(12, device=DEVICE)
            sqnorm_module.sqnorm_accumulate_triton(x, acc, 1, 4, token_norm, max_block_cols=max_cols)
            geglu_module.geglu_accumulate_triton(x, acc_geglu, 1, 4, token_norm, max_block_cols=max_cols // 2)
    weight, norms, null = (t.to(DEVICE) for t in mask_inputs(3, 24, 1, seed=1))
    wanda_module.wanda_mask_triton(weight, norms, null, 5)
    assert {name for name, _ in launches} == kernels
    assert all(guards == [x.device] for _, guards in launches), launches


# --- the code the GPU runs, compiled here for sm_90 ---------------------------------------------

# Runs in a subprocess without the interpreter: calls the launchers on CPU tensors with every kernel
# launch replaced by a record of its arguments (ints equal to 1 become constants, as Triton
# specializes them), compiles each distinct launch for sm_90 and prints, per case, the kernels with
# their shared memory and the PTX instructions that matter.
_COMPILE_SCRIPT = r"""
import json, re, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
         torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}
OPS = re.compile(r"\b((?:div|rcp|sqrt|atom|red)\.[a-z0-9_.]+)")
launches = []

def record(self, *args, grid, warmup, **kwargs):
    sig, consts = {}, {}
    for name, value in zip(self.arg_names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + TYPES[value.dtype]
        elif value == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
    for name, value in kwargs.items():
        if name in self.arg_names:
            sig[name], consts[name] = "constexpr", value
    launches.append((self, sig, consts, kwargs.get("num_warps", 4)))

JITFunction.run = record
from memcore._kernels.geglu_accumulate import geglu_accumulate_triton
from memcore._kernels.sqnorm_accumulate import sqnorm_accumulate_triton
from memcore._kernels.wanda_mask import wanda_mask_grouped_triton, wanda_mask_triton

results, compiled = [], {}
for case in json.load(sys.stdin):
    dtype, (rows, cols) = getattr(torch, case["dtype"]), case["shape"]
    launches.clear()
    if case["op"] == "sqnorm":
        sqnorm_accumulate_triton(torch.ones(rows, cols, dtype=dtype), torch.zeros(cols), 0, rows, case["token_norm"])
    elif case["op"] == "geglu":
        geglu_accumulate_triton(torch.ones(rows, 2 * cols, dtype=dtype), torch.zeros(cols), 0, rows, case["token_norm"])
    else:
        norms = torch.ones(case["t"], cols)
        weight = torch.ones(rows, cols, dtype=dtype)
        if case.get("layers", 1) == 1:
            wanda_mask_triton(weight, norms, norms if case["null"] else None, case["k"], True)
        else:  # one launch for layers of one width and dtype
            count = case["layers"]
            wanda_mask_grouped_triton([weight] * count, [norms] * count, [norms] * count if case["null"] else None,
                                      [case["k"]] * count, True)
    kernels = []
    for fn, sig, consts, warps in launches:
        key = repr((fn.__name__, sorted(sig.items()), sorted((k, str(v)) for k, v in consts.items()), warps))
        if key not in compiled:
            c = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps})
            ptx = c.asm["ptx"]
            compiled[key] = {"kernel": fn.__name__, "constants": {k: str(v) for k, v in consts.items()},
                             "shared": c.metadata.shared, "ops": sorted(set(OPS.findall(ptx))), "ftz": ".ftz" in ptx}
        kernels.append(compiled[key])
    results.append(kernels)
json.dump(results, sys.stdout)
"""

_COMPILE_CASES = {
    "sqnorm-fp16-1280": dict(op="sqnorm", dtype="float16", shape=[64, 1280], token_norm=True),
    "sqnorm-fp64-1000": dict(op="sqnorm", dtype="float64", shape=[64, 1000], token_norm=True),
    "sqnorm-bf16-1": dict(op="sqnorm", dtype="bfloat16", shape=[64, 1], token_norm=True),
    "sqnorm-fp32-12288": dict(op="sqnorm", dtype="float32", shape=[64, 12288], token_norm=True),
    "sqnorm-fp32-12288-raw": dict(op="sqnorm", dtype="float32", shape=[64, 12288], token_norm=False),
    "geglu-bf16-6137": dict(op="geglu", dtype="bfloat16", shape=[64, 6137], token_norm=True),
    "geglu-bf16-6144": dict(op="geglu", dtype="bfloat16", shape=[64, 6144], token_norm=True),
    "geglu-fp16-12273": dict(op="geglu", dtype="float16", shape=[64, 12273], token_norm=True),
    "geglu-fp16-12288": dict(op="geglu", dtype="float16", shape=[64, 12288], token_norm=True),
    "geglu-fp32-1-raw": dict(op="geglu", dtype="float32", shape=[1, 1], token_norm=False),
    "geglu-fp64-33": dict(op="geglu", dtype="float64", shape=[64, 33], token_norm=True),
    "wanda-fp16-11641": dict(op="wanda", dtype="float16", shape=[64, 11641], t=2, null=True, k=116),
    "wanda-fp16-11912": dict(op="wanda", dtype="float16", shape=[64, 11912], t=2, null=True, k=119),
    "wanda-fp32-4097": dict(op="wanda", dtype="float32", shape=[64, 4097], t=1, null=True, k=40),
    "wanda-bf16-1": dict(op="wanda", dtype="bfloat16", shape=[1, 1], t=1, null=False, k=1),
    "wanda-fp64-k0": dict(op="wanda", dtype="float64", shape=[64, 1280], t=2, null=False, k=0),
    "wanda-grouped-fp16-5120": dict(op="wanda", dtype="float16", shape=[64, 5120], t=2, null=True, k=51, layers=6),
}
# what one block of an H100 / H200 may use
SHARED_MEMORY_LIMIT = 232448


@pytest.fixture(scope="module")
def compiled():
    """Per case of _COMPILE_CASES: the kernels its launcher runs, as compiled for sm_90."""
    try:
        from triton.backends import backends
    except ImportError:
        backends = {}
    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT],
        input=json.dumps(list(_COMPILE_CASES.values())),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(zip(_COMPILE_CASES, json.loads(proc.stdout)))


STAT_KERNELS = ("_column_partials_kernel", "_sqnorm_row_norms_kernel", "_add_partials_kernel")


@pytest.mark.slow
def test_compiled_kernels_fit_shared_memory(compiled):
    for case, kernels in compiled.items():
        assert kernels, case
        for kernel in kernels:
            assert kernel["shared"] <= SHARED_MEMORY_LIMIT, (case, kernel)
    # the widths where block sizes change: one block of 8192 or 16384 columns, or chunks
    assert {k["constants"]["BLOCK"] for c in ("wanda-fp16-11641", "wanda-fp16-11912") for k in compiled[c]} == {"16384"}
    assert compiled["geglu-bf16-6137"][0]["constants"]["BLOCK_C"] == "8192"
    assert compiled["geglu-fp16-12288"][0]["kernel"] == "_geglu_rows_kernel"


@pytest.mark.slow
def test_compiled_division_is_ieee(compiled):
    """No approximate division or root anywhere; every kernel that works out row norms divides with
    div.rn (float32) or float64's div.rn."""
    normalizing = {"_sqnorm_row_norms_kernel", "_geglu_tiles_kernel", "_geglu_rows_kernel"}
    approximate = ("div.full", "div.approx", "rcp.approx", "sqrt.approx")
    checked = 0
    for case, kernels in compiled.items():
        for kernel in kernels:
            approx = [op for op in kernel["ops"] if op.startswith(approximate)]
            assert not approx, (case, kernel)
            own_norm = kernel["kernel"] in normalizing or (
                kernel["kernel"] == "_column_partials_kernel" and kernel["constants"].get("WHOLE_ROWS") == "True"
            )
            if own_norm and kernel["constants"].get("TOKEN_NORM", "True") == "True":
                wanted = "div.rn.f64" if "fp64" in case else "div.rn.f32"
                assert wanted in kernel["ops"], (case, kernel)
                checked += 1
    assert checked >= 8


@pytest.mark.slow
def test_compiled_atomics(compiled):
    """Statistics kernels: no atomics at all (run-to-run identical sums); wanda: only the integer OR
    of the flag word."""
    for case, kernels in compiled.items():
        for kernel in kernels:
            atomics = [op for op in kernel["ops"] if op.startswith(("atom.", "red."))]
            if kernel["kernel"] == "_wanda_mask_kernel":
                assert atomics and all(op.endswith(".or.b32") for op in atomics), (case, kernel)
            else:
                assert not atomics, (case, kernel)
            if kernel["kernel"] in STAT_KERNELS:
                assert not kernel["ftz"], (case, kernel)  # subnormal squares are kept, as in the reference


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run there (and give the right values)."""
    device = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    x = activations((64, 1280), torch.float16, seed=3)
    weight, norms, null = mask_inputs(8, 100, 2, seed=3)
    acc, acc_geglu = torch.zeros(1280, device=device), torch.zeros(640, device=device)
    with use_backend("triton"):
        sqnorm_accumulate(x.to(device), acc)
        out = geglu_accumulate(x.to(device), acc_geglu)
        mask = wanda_mask(weight.to(device), norms.to(device), null.to(device), 10)
    assert torch.cuda.current_device() == 0
    assert_statistic_close(acc.cpu(), x, torch.zeros(1280))
    assert_statistic_close(acc_geglu.cpu(), out.cpu(), torch.zeros(640))
    assert_mask_equal(mask.cpu(), mask_oracle(weight, norms, null, 10), 100)
