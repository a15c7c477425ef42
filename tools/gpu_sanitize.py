"""Run every memcore CUDA op once or twice at small and odd shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck python3 tools/gpu_sanitize.py     (also racecheck, synccheck)

tools/gpu_check.sh runs it under each tool. Shapes are small so that an instrumented run takes
seconds: feature widths 1, 33, 1000 and 4097 (odd, one past a power of two), few and odd row counts,
row ranges that start and end inside the tensor, a strided input, and wanda_mask's edge k values (0,
1, 1% of the width, the whole width) with and without null norms, largest and smallest. Inputs are
drawn on the CPU and copied to the device, and results are compared with the references on the CPU,
so the only device kernels are memcore's and a few of PyTorch's (allocation fills, the flag word).

A result that differs from the reference is printed and counted (the correctness tests judge it);
the last line is ``gpu_sanitize: done, N op calls, M mismatches`` when every call ran, which is what
tells a clean sanitizer report from one cut short. Exit status 0, or 1 on mismatches.
``--device cpu --backend cpu`` runs the same calls on the CPU kernels (to try the driver anywhere).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's memcore

WIDTHS = (1, 33, 1000, 4097)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Driver:
    def __init__(self, device: torch.device, backend: str):
        from memcore.ops import use_backend

        self.device = device
        self.backend = backend
        self.use_backend = use_backend
        self.calls = 0
        self.mismatches = 0
        self.generator = torch.Generator().manual_seed(0)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator).to(dtype)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator) + 0.01

    def check(self, what: str, ok: bool) -> None:
        if not ok:
            self.mismatches += 1
            print(f"gpu_sanitize: MISMATCH {what}", flush=True)

    def sqnorm(self, x_cpu: torch.Tensor, row_start: int, row_end: int | None, token_norm: bool) -> None:
        from memcore.ops import sqnorm_accumulate
        from memcore.ops.sqnorm_accumulate import sqnorm_accumulate_reference

        features = x_cpu.shape[-1]
        acc = torch.full((features,), 0.5, device=self.device)
        with self.use_backend(self.backend):
            sqnorm_accumulate(x_cpu.to(self.device), acc, row_start, row_end, token_norm)
        self.calls += 1
        want = torch.full((features,), 0.5)
        sqnorm_accumulate_reference(x_cpu, want, row_start, row_end, token_norm)
        what = f"sqnorm_accumulate {x_cpu.dtype} {tuple(x_cpu.shape)} rows [{row_start}, {row_end}) token_norm={token_norm}"
        self.check(what, torch.allclose(acc.cpu(), want, rtol=1e-3, atol=1e-5))

    def geglu(self, p_cpu: torch.Tensor, row_start: int, row_end: int | None, token_norm: bool) -> None:
        from memcore.ops import geglu_accumulate
        from memcore.ops.geglu_accumulate import geglu_accumulate_reference

        inner = p_cpu.shape[-1] // 2
        acc = torch.zeros(inner, device=self.device)
        with self.use_backend(self.backend):
            x = geglu_accumulate(p_cpu.to(self.device), acc, row_start, row_end, token_norm)
        self.calls += 1
        want_acc = torch.zeros(inner)
        want_x = geglu_accumulate_reference(p_cpu.float(), want_acc, row_start, row_end, token_norm)
        tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[p_cpu.dtype]
        what = f"geglu_accumulate {p_cpu.dtype} {tuple(p_cpu.shape)} rows [{row_start}, {row_end}) token_norm={token_norm}"
        self.check(what, torch.allclose(x.cpu().float(), want_x, rtol=tol, atol=tol))
        self.check(what + " (statistic)", torch.allclose(acc.cpu(), want_acc, rtol=tol, atol=1e-5))

    def wanda(self, w_cpu: torch.Tensor, norms: torch.Tensor, null: torch.Tensor | None, k: int, largest: bool) -> None:
        from memcore.ops import wanda_mask
        from memcore.ops.wanda_mask import wanda_mask_reference

        dev_null = None if null is None else null.to(self.device)
        with self.use_backend(self.backend):
            got = wanda_mask(w_cpu.to(self.device), norms.to(self.device), dev_null, k, largest)
        self.calls += 1
        want = wanda_mask_reference(w_cpu, norms, null, k, largest)
        what = f"wanda_mask {w_cpu.dtype} {tuple(w_cpu.shape)} T={norms.shape[0]} k={k} null={null is not None} largest={largest}"
        self.check(what, torch.equal(got.cpu(), want))

    def run(self, widths: tuple[int, ...]) -> None:
        for width in widths:
            for dtype in DTYPES:
                x = self.randn(2, 3, width, dtype=dtype)  # 6 rows
                for token_norm in (True, False):
                    self.sqnorm(x, 0, None, token_norm)
                    self.sqnorm(x, 1, 5, token_norm)
                self.sqnorm(self.randn(6, 2 * width, dtype=dtype)[:, ::2], 0, None, True)  # strided rows
                p = self.randn(5, 2 * width, dtype=dtype)
                for token_norm in (True, False):
                    self.geglu(p, 0, None, token_norm)
                self.geglu(self.randn(2, 3, 2 * width, dtype=dtype), 2, 5, True)
                w = self.randn(7, width, dtype=dtype)
                w[:, ::5] = 0  # zero weights tie
                for t in (1, 3):
                    norms, null = self.rand(t, width), self.rand(t, width)
                    for k in sorted({0, 1, max(1, width // 100), width}):
                        for largest in (True, False):
                            self.wanda(w, norms, null, k, largest)
                        self.wanda(w, norms, None, k, True)
        # many rows at an odd width: several blocks of rows per launch
        self.sqnorm(self.randn(4099, 33, dtype=torch.float16), 3, 4097, True)
        self.geglu(self.randn(2049, 66, dtype=torch.bfloat16), 1, 2048, True)
        self.wanda(self.randn(1025, 33, dtype=torch.float16), self.rand(2, 33), self.rand(2, 33), 1, True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="device of the op inputs (default cuda)")
    parser.add_argument("--backend", default="cuda", help="memcore backend to force (default cuda)")
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="feature widths, comma-separated")
    args = parser.parse_args(argv)
    driver = Driver(torch.device(args.device), args.backend)
    driver.run(tuple(int(w) for w in args.widths.split(",")))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"gpu_sanitize: done, {driver.calls} op calls, {driver.mismatches} mismatches", flush=True)
    return 1 if driver.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
