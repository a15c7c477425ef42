"""What every op test shares: the backends to run on, the one oracle of each op, the tolerance rule
and the inputs.

Backends: every test of an op takes a ``backend`` parameter from :func:`backends`, which lists all
four (``reference``, ``cpu``, ``triton``, ``cuda``) and skips, with the reason, those that cannot run
here. Tensors go to the backend's device (:func:`backend_device`): ``triton`` runs on CUDA when
there is a GPU, else on the CPU under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it before
triton is imported); ``cuda`` needs a GPU and the extension's CUDA kernels.

Oracles, written from docs/method.md, not from the code under test:

- statistic (sqnorm_accumulate, and geglu_accumulate's statistic of its output): float64 sums;
- GEGLU output: float64 ``h * gelu(g)``;
- mask: a stable sort per row and call index in numpy (ties to the lower column).

Tolerances, one rule for every backend, derived from PyTorch's own error on the same input:

- a statistic is within ``2 |plain float32 PyTorch - oracle| + 4 eps32 |oracle|`` per feature
  (:func:`assert_statistic_close`): no backend may be less accurate than eager PyTorch. Where the
  float32 yardstick itself breaks down (rows whose float32 squares overflow or underflow), sums of
  n terms in [0, 1] are within ``(4 + n) eps32`` relative (:func:`assert_sums_close`);
- a GEGLU output is within ``2 |eager PyTorch - exact| + eps |exact| + 4 eps32 |h g|``
  (:func:`assert_geglu_close`);
- masks are equal byte for byte (:func:`assert_mask_equal`).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memcore.ops import available_backends, use_backend
from memcore.ops.wanda_mask import unpack_mask

EPS32 = torch.finfo(torch.float32).eps
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INF, NAN = float("inf"), float("nan")
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (tools/gpu_check.sh runs these on one)")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- backends ----------------------------------------------------------------------------------------


def backend_device(backend: str) -> torch.device:
    """Where ``backend``'s tests put their tensors."""
    if backend == "cuda" or (backend == "triton" and HAS_CUDA):
        return torch.device("cuda")
    return torch.device("cpu")


def _why_absent(backend: str) -> str:
    if backend == "cpu":
        return "memcore._C is not built (pip install -e . builds it)"
    if backend == "triton":
        return "triton is not installed, or the CPU without TRITON_INTERPRET=1"
    return "needs a CUDA device and memcore._C built with CUDA kernels"


def backends(op: str, only: tuple[str, ...] | None = None) -> list:
    """pytest parameters for every backend of ``op`` (or those in ``only``), skipped where they cannot
    run here, with the reason."""
    params = []
    for name in only or ("reference", "cpu", "triton", "cuda"):
        device = backend_device(name)
        usable = (device.type != "cuda" or HAS_CUDA) and name in available_backends(op, device)
        marks = () if usable else pytest.mark.skip(reason=f"{name} backend absent: {_why_absent(name)}")
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs in Triton's interpreter here (Triton without a GPU: about 0.05 s a tile)."""
    return backend == "triton" and backend_device(backend).type == "cpu"


def skip_on_interpreter(backend: str, what: str) -> None:
    """Skip a case too large for Triton's interpreter; it runs where Triton runs on a GPU."""
    if interpreted(backend):
        pytest.skip(f"{what}: too slow for Triton's interpreter; runs on a GPU")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` hold the same bytes (NaN payloads and signed zeros included)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints[a.element_size()]), b.view(ints[b.element_size()]))


def to_device(device: torch.device, *tensors):
    """Copies of ``tensors`` on ``device`` (``None`` stays ``None``, lists are moved element-wise)."""
    moved = []
    for t in tensors:
        if isinstance(t, (list, tuple)):
            moved.append([x.to(device, copy=True) for x in t])
        else:
            moved.append(None if t is None else t.to(device, copy=True))
    return moved


@contextlib.contextmanager
def forced(backend: str):
    """Run the block with ``backend`` forced for every memcore op."""
    with use_backend(backend):
        yield


def run_sqnorm(backend, x, acc0, row_start=0, row_end=None, token_norm=True) -> torch.Tensor:
    """acc0 plus the statistic of x's rows [row_start, row_end), by ``backend``, on the CPU."""
    from memcore.ops import sqnorm_accumulate

    x_dev, acc = to_device(backend_device(backend), x, acc0)
    with forced(backend):
        sqnorm_accumulate(x_dev, acc, row_start, row_end, token_norm)
    return acc.cpu()


def run_geglu(backend, p, acc0, row_start=0, row_end=None, token_norm=True) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, acc0 plus the statistic of X's rows [row_start, row_end)) by ``backend``, on the CPU."""
    from memcore.ops import geglu_accumulate

    p_dev, acc = to_device(backend_device(backend), p, acc0)
    with forced(backend):
        out = geglu_accumulate(p_dev, acc, row_start, row_end, token_norm)
    return out.cpu(), acc.cpu()


def run_mask(backend, weight, norms, null_norms, k, largest=True) -> torch.Tensor:
    """The packed wanda_mask by ``backend``, on the CPU."""
    from memcore.ops import wanda_mask

    args = to_device(backend_device(backend), weight, norms, null_norms)
    with forced(backend):
        return wanda_mask(*args, k, largest).cpu()


# --- the statistic: oracle and tolerance -----------------------------------------------------------


def statistic(x, acc0, row_start=0, row_end=None, token_norm=True, dtype=torch.float64) -> torch.Tensor:
    """acc0 plus the statistic of docs/method.md section 2, computed plainly in ``dtype``: a row counts
    (token_norm) iff its sum of squares is positive and finite in that dtype. float64: the oracle;
    float32: what eager PyTorch computes, the yardstick of the tolerance."""
    rows = x.reshape(-1, x.shape[-1])[row_start:row_end].to(dtype)
    sq = rows.square()
    if token_norm:
        total = sq.sum(dim=1, keepdim=True)
        counted = (total > 0) & torch.isfinite(total)
        sq = torch.where(counted, sq / total, torch.zeros((), dtype=dtype))
    return acc0.to(dtype) + sq.sum(dim=0)


def assert_statistic_close(got, x, acc0, row_start=0, row_end=None, token_norm=True) -> None:
    """|got - oracle| <= 2 |plain float32 PyTorch - oracle| + 4 eps32 |oracle|, per feature."""
    want = statistic(x, acc0, row_start, row_end, token_norm)
    plain = statistic(x, acc0, row_start, row_end, token_norm, torch.float32).double()
    assert got.dtype == torch.float32 and got.shape == want.shape, (got.dtype, tuple(got.shape))
    err = (got.double() - want).abs()
    bound = 2 * (plain - want).abs() + 4 * EPS32 * want.abs() + 1e-30
    bad = torch.nonzero(~(err <= bound)).flatten()
    assert bad.numel() == 0, (
        f"{bad.numel()} of {got.numel()} features beyond the bound; first {bad[:5].tolist()}: "
        f"got {got[bad[:5]].tolist()}, want {want[bad[:5]].tolist()}, bound {bound[bad[:5]].tolist()}"
    )


def assert_sums_close(got: torch.Tensor, want: torch.Tensor, terms: int) -> None:
    """Sums of at most ``terms`` values in [0, 1] added to a positive start (no cancellation): each
    term costs a float32 rounding or two, so ``(4 + terms) eps32`` relative."""
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got, want.to(got.dtype), rtol=(4 + terms) * EPS32, atol=0)


# --- GEGLU: oracle and tolerance --------------------------------------------------------------------


def geglu_exact(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exact X, h, g) in float64 for a projection output P = [h | g]."""
    h, g = p.double().chunk(2, dim=-1)
    return h * F.gelu(g), h, g


def assert_geglu_close(got: torch.Tensor, p: torch.Tensor) -> None:
    """X within 2x eager PyTorch's error against float64 GEGLU, plus one rounding of X and the error any
    float32 ``1 + erf(g / sqrt 2)`` makes in gelu's tail (a few eps32 of |h g|); equal where eager X
    is not finite."""
    h_p, g_p = p.chunk(2, dim=-1)
    eager = h_p * F.gelu(g_p)
    assert got.dtype == p.dtype and got.shape == eager.shape, (got.dtype, tuple(got.shape), tuple(eager.shape))
    finite = eager.isfinite()
    got_bad, eager_bad = got[~finite].double(), eager[~finite].double()
    assert torch.equal(got_bad.isnan(), eager_bad.isnan()), "NaN where eager X is not NaN, or the reverse"
    assert torch.equal(got_bad.nan_to_num(0.0), eager_bad.nan_to_num(0.0)), "an infinite X differs from eager's"
    exact, h, g = geglu_exact(torch.where(torch.cat([finite, finite], dim=-1), p, 0))
    exact, h, g = exact[finite], h[finite], g[finite]
    eps = torch.finfo(p.dtype).eps
    err = (got[finite].double() - exact).abs()
    bound = 2 * (eager[finite].double() - exact).abs() + eps * exact.abs() + 4 * EPS32 * (h * g).abs() + 1e-30
    bad = torch.nonzero(~(err <= bound)).flatten()
    assert bad.numel() == 0, (
        f"{bad.numel()} of {got.numel()} outputs beyond the bound; first: got "
        f"{got[finite][bad[:5]].tolist()}, exact {exact[bad[:5]].tolist()}"
    )


# --- the mask: oracle and comparison ---------------------------------------------------------------


def mask_oracle(weight, norms, null_norms, k: int, largest: bool = True) -> torch.Tensor:
    """The bool mask ``[out, in]`` of docs/method.md section 3, by a stable sort of each row's float32
    scores per call index (numpy, independent of the op's code)."""
    w = np.abs(weight.to(torch.float32).numpy())
    mem = norms.to(torch.float32).numpy()
    null = None if null_norms is None else null_norms.to(torch.float32).numpy()
    mask = np.zeros(w.shape, dtype=bool)
    rows = np.arange(w.shape[0])[:, None]
    for t in range(mem.shape[0]):
        s_mem = w * mem[t]  # float32 products, as the op defines them
        key = -s_mem if largest else s_mem
        key = np.where(key == 0, np.float32(0), key)  # -0.0 ties with +0.0
        top = np.argsort(key, axis=1, kind="stable")[:, :k]  # ties: the lower column first
        chosen = np.zeros(w.shape, dtype=bool)
        chosen[rows, top] = True
        if null is not None:
            chosen &= s_mem > w * null[t]
        mask |= chosen
    return torch.from_numpy(mask)


def assert_mask_equal(got: torch.Tensor, want: torch.Tensor, in_features: int) -> None:
    """``got`` (packed uint8) equals ``want`` (a bool mask, or packed) bit for bit, padding included."""
    if want.dtype != torch.bool:
        want = unpack_mask(want, in_features)
    assert got.dtype == torch.uint8 and got.shape == (want.shape[0], (in_features + 7) // 8), (got.dtype, tuple(got.shape))
    diff = torch.nonzero(unpack_mask(got, in_features) != want)
    assert diff.numel() == 0, f"{len(diff)} of {want.numel()} mask bits differ, first (row, col): {diff[:10].tolist()}"
    padded = torch.zeros((want.shape[0], got.shape[1] * 8), dtype=torch.bool)
    padded[:, :in_features] = want
    assert torch.equal(unpack_mask(got, got.shape[1] * 8), padded), "padding bits are set"


# --- inputs -----------------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def activations(shape, dtype=torch.float32, seed=0, scale=3.0, zero_every=5) -> torch.Tensor:
    """Gaussian activations (built in float64, cast to dtype), every ``zero_every``-th row zero."""
    x = torch.randn(shape, generator=gen(seed), dtype=torch.float64) * scale
    if zero_every:
        x.reshape(-1, shape[-1])[1::zero_every] = 0.0
    return x.to(dtype)


def acc0(features: int, seed: int = 1) -> torch.Tensor:
    """A float32 accumulator that already holds something (the ops add to it)."""
    return torch.rand(features, generator=gen(seed)) * 10


def proj_out(leading, inner: int, dtype=torch.float32, seed=0) -> torch.Tensor:
    """A GEGLU projection output ``leading + [2 inner]``; every fourth row has h = 0 (a zero row of X)."""
    p = torch.randn((*leading, 2 * inner), generator=gen(seed), dtype=torch.float64) * 2.5
    p.reshape(-1, 2 * inner)[1::4, :inner] = 0.0
    return p.to(dtype)


def _smallest_subnormal(dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def special_rows(cols: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows that count, rows that do not), built in float64 and cast to dtype.

    Counted: ordinary, huge finite (1e25, 3e38: their float32 squares overflow), tiny (1e-30: squares
    underflow), subnormal, and a huge value next to a subnormal one. Not counted: zeros, a single inf,
    -inf or NaN among ordinary values, inf next to NaN. A 16-bit cast may turn a huge row into an inf
    row or a tiny one into zeros: the oracle sees the same values. float64 stays where the oracle's
    float64 squared norm is exact (|x| in [1e-150, 1e150]).
    """
    g = gen(seed)
    base = torch.randn(cols, generator=g, dtype=torch.float64)
    signs = torch.where(torch.rand(cols, generator=g) < 0.5, -1.0, 1.0).double()
    wide = dtype == torch.float64
    sub = 1e-150 if wide else _smallest_subnormal(dtype)
    huge = 1e150 if wide else 3e38
    counted = [base * 3, signs * 1e25, signs * huge, base * 1e-30, signs * sub]
    mixed = torch.zeros(cols, dtype=torch.float64)
    mixed[0], mixed[-1] = huge, sub
    counted.append(mixed)
    dropped = []
    for value in (0.0, INF, -INF, NAN):
        row = base.clone() if value != 0.0 else torch.zeros(cols, dtype=torch.float64)
        row[cols // 2] = value
        dropped.append(row)
    both = base.clone()
    both[0], both[-1] = INF, NAN
    dropped.append(both)
    return torch.stack(counted).to(dtype), torch.stack(dropped).to(dtype)


def mask_inputs(out: int, cols: int, t: int, seed: int = 0, *, ties=False, dtype=torch.float32, with_null=True):
    """(weight, norms, null_norms) for wanda_mask. ``ties``: small integers and coarse norms, so equal
    scores across columns and S_mem == S_null occur; else Gaussian weights with zeros and -0.0."""
    g = gen(seed)
    if ties:
        weight = torch.randint(-2, 3, (out, cols), generator=g).float()
        norms = torch.randint(0, 5, (t, cols), generator=g).float() * 0.5
        null = torch.randint(0, 5, (t, cols), generator=g).float() * 0.5
    else:
        weight = torch.randn(out, cols, generator=g)
        weight[torch.rand(out, cols, generator=g) < 0.1] = 0.0
        weight[torch.rand(out, cols, generator=g) < 0.05] = -0.0
        norms = torch.rand(t, cols, generator=g) * 3
        null = torch.rand(t, cols, generator=g) * 3
    return weight.to(dtype), norms, (null if with_null else None)


# --- backend-specific switches -------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["shared", "fallback"])
def smem_fallback(request):
    """The ``cuda`` backend's kernels with shared memory, then with their fallbacks forced (import this
    fixture into a test module that needs it; it only makes sense with the ``cuda`` backend)."""
    from memcore.ops._ext import extension

    ext = extension()
    before = ext.cuda_smem_fallback()
    ext.set_cuda_smem_fallback(request.param)
    try:
        yield request.param
    finally:
        ext.set_cuda_smem_fallback(before)
