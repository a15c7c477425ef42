"""Host-side checks of the CUDA backend that need no GPU: the shared-memory plans of the launches,
against the static shared memory the built library's kernels really have (read with cuobjdump), the
probe that keeps the backend off devices it cannot run on, and the checked CUDA errors.

The kernels themselves run in tests/test_<op>.py, on every backend (the cuda one on a GPU).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memcore.ops import _ext
from memcore.ops._ext import extension

needs_cuda_build = pytest.mark.skipif(
    extension() is None or not extension().compiled_with_cuda(), reason="memcore._C was built without CUDA kernels"
)

# H100 and H200 (sm_90): cudaDevAttrMaxSharedMemoryPerBlockOptin = 227 KiB (228 KiB per SM less 1 KiB
# reserved); A100 (sm_80): 163 KiB
OPTIN = {"sm_90": 232448, "sm_80": 166912}
DEFAULT = 48 * 1024
# widths at which launches failed before the static shared memory counted (a review on an H100)
GEGLU_REPORTED = [*range(6137, 6145), *range(12273, 12289)]
WANDA_REPORTED = list(range(11641, 11913))
GEGLU_TYPES = {"f": "float32", "d": "float64", "6__half": "float16", "13__nv_bfloat16": "bfloat16"}


def find_cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "cuobjdump").exists():
            return str(Path(root) / "bin" / "cuobjdump")
    spec = importlib.util.find_spec("triton")  # Triton ships one with its NVIDIA backend
    if spec and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
        if path.exists():
            return str(path)
    return None


def kernel_static_smem() -> dict[str, dict[tuple, int]]:
    """{arch: {(op, dtype[, variant]): SHARED bytes}} from ``cuobjdump -res-usage`` on memcore._C."""
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's NVIDIA backend)")
    text = subprocess.run([tool, "-res-usage", extension().__file__], capture_output=True, text=True, check=True).stdout
    result: dict[str, dict[tuple, int]] = {}
    arch = None
    function = None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function and (m := re.search(r"SHARED:(\d+)", line)):
            shared = int(m.group(1))
            if g := re.search(r"geglu_fused_kernelI(f|d|6__half|13__nv_bfloat16)E", function):
                result.setdefault(arch, {})[("geglu", GEGLU_TYPES[g.group(1)])] = shared
            elif g := re.search(r"wanda_mask_kernelI(f|d|6__half|13__nv_bfloat16)Lb([01])E", function):
                variant = "row" if g.group(2) == "1" else "bits"
                result.setdefault(arch, {})[("wanda", GEGLU_TYPES[g.group(1)], variant)] = shared
            function = None
    if not result:
        pytest.fail(f"no memcore kernel in the cuobjdump output:\n{text[:2000]}")
    return result


def launches(static: int, dynamic: int, opt_in: bool, optin_limit: int) -> bool:
    """The CUDA rule: dynamic <= the kernel's dynamic limit (48 KiB - static unless raised, which the
    launcher does when opt_in), and static + dynamic <= the device's opt-in limit per block."""
    limit = optin_limit - static if opt_in else DEFAULT - static
    return dynamic <= limit and static + dynamic <= optin_limit


@needs_cuda_build
def test_cuobjdump_finds_every_planned_kernel():
    smem = kernel_static_smem()
    archs = set(extension().cuda_architectures().split(","))
    assert {a.removeprefix("sm_") for a in smem} == archs
    for table in smem.values():
        for dtype in GEGLU_TYPES.values():
            assert table[("geglu", dtype)] >= 2 * 8 * 8  # the block reduction's two [8] double buffers
            for variant in ("row", "bits"):
                assert table[("wanda", dtype, variant)] >= 4 * (256 + 8 + 16 + 3)  # histogram, scan, counts


@needs_cuda_build
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("token_norm", [True, False])
@pytest.mark.parametrize("dtype", list(GEGLU_TYPES.values()))
def test_geglu_plan_launches_at_every_width(arch, dtype, token_norm):
    ext = extension()
    table = kernel_static_smem().get(arch)
    if table is None:
        pytest.skip(f"not built for {arch}")
    value = 8 if dtype == "float64" else 4
    per_column = 8 + (value if token_norm else 0)
    optin = OPTIN[arch]
    for static in statics(table[("geglu", dtype)], arch):
        check_geglu_widths(ext, dtype, token_norm, static, per_column, optin)


def statics(shared: int, arch: str) -> list[int]:
    """The static shared memory to plan with: cuobjdump's, and for sm_90 also what ptxas declares
    (cuobjdump adds the 1 KiB the architecture reserves per block, e.g. 1088 for a kernel of 64)."""
    return [shared, shared - 1024] if arch == "sm_90" and shared >= 1024 else [shared]


def check_geglu_widths(ext, dtype, token_norm, static, per_column, optin):
    # the reported widths, and a few on each side of where static + dynamic crosses 48 KiB and the opt-in limit
    edges = [(DEFAULT - static) // per_column, (optin - static) // per_column]
    widths = sorted({*GEGLU_REPORTED, *(e + d for e in edges for d in range(-3, 4)), 1, 320, 1280, 5120, 10240})
    fused = 0
    for inner in widths:
        variant, dynamic, opt_in = ext.geglu_smem_plan(inner, dtype, token_norm, static, optin)
        fits = static + inner * per_column <= optin
        assert variant == (0 if fits else 1), inner  # the fused kernel whenever it fits, the fallback beyond
        if variant == 0:
            fused += 1
            assert dynamic == inner * per_column, inner
            assert opt_in == (static + dynamic > DEFAULT), inner
        else:
            assert (dynamic, opt_in) == (0, False)
        assert launches(static, dynamic, opt_in, optin), (inner, static, dynamic, opt_in)
        # the fallback, forced, launches too
        assert ext.geglu_smem_plan(inner, dtype, token_norm, static, optin, True) == (1, 0, False)
    assert fused > len(widths) // 2


@needs_cuda_build
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", list(GEGLU_TYPES.values()))
def test_wanda_plan_launches_at_every_width(arch, dtype):
    ext = extension()
    table = kernel_static_smem().get(arch)
    if table is None:
        pytest.skip(f"not built for {arch}")
    optin = OPTIN[arch]
    for static_row, static_bits in zip(
        statics(table[("wanda", dtype, "row")], arch), statics(table[("wanda", dtype, "bits")], arch)
    ):
        check_wanda_widths(ext, static_row, static_bits, optin)


def check_wanda_widths(ext, static_row, static_bits, optin):
    def row_bytes(n):
        return ((n + 31) // 32 + 3) // 4 * 16 + 4 * n

    edges = [w for w in range(1, 70000) if row_bytes(w) + static_row > DEFAULT][:1]
    edges += [w for w in range(1, 70000) if row_bytes(w) + static_row > optin][:1]
    widths = sorted({*WANDA_REPORTED, *(e + d for e in edges for d in range(-40, 40)), 1, 7, 1280, 5120, 10240})
    for n in widths:
        variant, dynamic, opt_in = ext.wanda_smem_plan(n, static_row, static_bits, optin)
        static = static_row if variant == 0 else static_bits
        assert variant == (0 if static_row + row_bytes(n) <= optin else 1), n
        assert dynamic == (row_bytes(n) if variant == 0 else ((n + 31) // 32 + 3) // 4 * 16), n
        assert opt_in == (static + dynamic > DEFAULT), n
        assert launches(static, dynamic, opt_in, optin), (n, static, dynamic, opt_in)
        forced = ext.wanda_smem_plan(n, static_row, static_bits, optin, True)
        assert forced[0] == 1 and launches(static_bits, forced[1], forced[2], optin), n
    # bits only for a row too wide for shared memory; nothing at all beyond 8 x the opt-in limit in columns
    assert ext.wanda_smem_plan(100_000, static_row, static_bits, optin)[0] == 1
    assert ext.wanda_smem_plan(8 * optin, static_row, static_bits, optin)[0] == -1


def test_plans_reject_bad_widths():
    ext = extension()
    if ext is None:
        pytest.skip("memcore._C is not built")
    with pytest.raises(ValueError, match="inner"):
        ext.geglu_smem_plan(0, "float16", True, 128, 232448)
    with pytest.raises(ValueError, match="dtype"):
        ext.geglu_smem_plan(8, "int8", True, 128, 232448)
    with pytest.raises(ValueError, match="in_features"):
        ext.wanda_smem_plan(-1, 1136, 1136, 232448)


# --- the probe ----------------------------------------------------------------------------------


class FakeExtension:
    """Stands in for memcore._C on a machine whose CUDA kernels cannot run."""

    def __init__(self, error: str):
        self.error = error
        self.probes: list[int] = []

    def compiled_with_cuda(self):
        return True

    def cuda_architectures(self):
        return "80,90"

    def cuda_probe(self, device):
        self.probes.append(device)
        return self.error

    def sqnorm_accumulate_cuda(self, *args):
        raise AssertionError("must not launch after a failed probe")

    geglu_accumulate_cuda = wanda_mask_cuda = sqnorm_accumulate_cuda


@pytest.fixture
def fake_extension(monkeypatch):
    def install(error):
        fake = FakeExtension(error)
        monkeypatch.setattr(_ext, "extension", lambda: fake)
        _ext.cuda_probe_error.cache_clear()
        return fake

    yield install
    _ext.cuda_probe_error.cache_clear()


def test_failed_probe_keeps_cuda_off_and_logs_once(fake_extension, caplog):
    from memcore.ops.geglu_accumulate import geglu_accumulate_backend

    fake = fake_extension("cudaGetDevice failed: CUDA driver version is insufficient for CUDA runtime version")
    device = torch.device("cuda", 1)
    with caplog.at_level(logging.WARNING, logger="memcore"):
        for op in ("sqnorm_accumulate", "geglu_accumulate", "wanda_mask", "sqnorm_accumulate"):
            assert _ext.native_backend(op, device) is None
        assert geglu_accumulate_backend(device) in ("triton", "reference")
    assert fake.probes == [1]  # once per device
    lines = [r.getMessage() for r in caplog.records if r.name == "memcore"]
    assert len(lines) == 1 and "cuda:1" in lines[0] and "driver version is insufficient" in lines[0], lines
    assert "\n" not in lines[0]
    assert _ext.native_backend("sqnorm_accumulate", torch.device("cuda", 0)) is None
    assert fake.probes == [1, 0]


def test_passed_probe_offers_cuda(fake_extension, caplog):
    fake = fake_extension("")
    with caplog.at_level(logging.WARNING, logger="memcore"):
        assert _ext.native_backend("wanda_mask", torch.device("cuda", 0)) == "cuda"
        assert _ext.native_backend("wanda_mask", torch.device("cuda", 0)) == "cuda"
    assert fake.probes == [0] and not caplog.records
    assert _ext.native_backend("wanda_mask", torch.device("cpu")) is None  # the fake has no CPU kernels


@needs_cuda_build
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a usable GPU")
def test_real_probe_explains_why_without_a_gpu():
    ext = extension()
    error = ext.cuda_probe(0)
    assert error and "\n" not in error
    assert "driver" in error or "device" in error, error
    assert _ext.cuda_backend_status().endswith("(no GPU here)")
    # device queries check their return codes and say what CUDA said
    for call in (
        lambda: ext.sqnorm_accumulate_cuda_workspace("float32", 8, 4, 0, 8, True, 0),
        lambda: ext.geglu_accumulate_cuda_workspace("float16", 8, 4, 0, 8, True, 0),
        lambda: ext.sqnorm_accumulate_cuda(1, "float32", 8, 4, 0, 8, 1, True, 1, 1 << 20, 0),
        lambda: ext.wanda_mask_cuda(1, "float32", 4, 8, 1, 0, 1, 2, True, 1, 1, 0),
        lambda: ext.cuda_kernel_static_smem(0),
    ):
        with pytest.raises(RuntimeError, match=r"cuda|CUDA|driver"):
            call()


@needs_cuda_build
def test_smem_fallback_switch():
    ext = extension()
    before = ext.cuda_smem_fallback()
    try:
        ext.set_cuda_smem_fallback(True)
        assert ext.cuda_smem_fallback()
        ext.set_cuda_smem_fallback(False)
        assert not ext.cuda_smem_fallback()
    finally:
        ext.set_cuda_smem_fallback(before)
    code = "from memcore import _C; print(_C.cuda_smem_fallback())"
    for value, want in (("1", "True"), ("0", "False"), ("", "False")):
        env = {**os.environ, "MEMCORE_CUDA_SMEM_FALLBACK": value}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert done.stdout.strip() == want, (value, done.stderr[-500:])


def test_env_reports_the_cuda_backend(capsys):
    import json

    from memcore.cli import main

    capsys.readouterr()
    assert main(["env", "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)["backends"]["cuda"]
    assert reported == _ext.cuda_backend_status()
    ext = extension()
    if ext is None or not ext.compiled_with_cuda():
        assert reported == "not compiled"
    elif torch.cuda.is_available():  # the probe's outcome for every device
        assert all(f"cuda:{i} " in reported for i in range(torch.cuda.device_count())), reported
    else:
        assert reported == f"compiled for architectures {ext.cuda_architectures()} (no GPU here)"
