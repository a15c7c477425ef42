"""memcore.ops.prune_mask, the front door for pruning code, on every backend of wanda_mask (reference,
cpu, triton, cuda).

Unstructured masks are compared with the mask oracle of tests/helpers.py (prune_mask's k lowest or
highest |W| * norm per row is wanda_mask without null norms), n:m masks with a stable sort per group
of m written here; both with ties, several rows of norms (the union), fp16/bf16 weights, and against
Wanda's own formula (Sun et al., ICLR 2024). The argument checks run before dispatch, so they run once.
"""

from __future__ import annotations

import pytest
import torch
from helpers import backend_device, backends, mask_oracle, needs_cuda

from memcore.ops import prune_mask, use_backend

BACKENDS = backends("wanda_mask")


def run_prune(backend, weight, norms, *args, **kwargs) -> torch.Tensor:
    """prune_mask by ``backend`` on its device, the mask back on the CPU."""
    device = backend_device(backend)
    with use_backend(backend):
        mask = prune_mask(weight.to(device), norms.to(device), *args, **kwargs)
    assert mask.dtype == torch.bool and mask.shape == weight.shape and mask.device.type == device.type
    return mask.cpu()


def unstructured_oracle(weight, norms, k, largest=False) -> torch.Tensor:
    return mask_oracle(weight, norms.reshape(-1, weight.shape[1]), None, k, largest)


def n_m_oracle(weight, norms, n, m, largest=False) -> torch.Tensor:
    """Per row and every m consecutive columns, the n lowest (or highest) float32 scores by a stable
    sort (ties to the lower column); the union over the rows of norms."""
    out = torch.zeros(weight.shape, dtype=torch.bool)
    for row in norms.reshape(-1, weight.shape[1]).float():
        groups = (weight.float().abs() * row).reshape(-1, m)
        order = torch.sort(-groups if largest else groups, dim=1, stable=True).indices[:, :n]
        out |= torch.zeros(groups.shape, dtype=torch.bool).scatter_(1, order, True).reshape(weight.shape)
    return out


def tied(seed: int, out: int, cols: int):
    """Small-integer weights and norms: many equal scores."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (out, cols), generator=g).float(), torch.randint(0, 3, (cols,), generator=g).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity", (0.0, 0.1, 0.5, 0.29, 1.0))
@pytest.mark.parametrize("largest", (False, True), ids=["lowest", "highest"])
def test_unstructured_matches_the_oracle(backend, sparsity, largest):
    g = torch.Generator().manual_seed(0)
    weight, norms = torch.randn(37, 100, generator=g), torch.rand(100, generator=g)
    k = {0.0: 0, 0.1: 10, 0.5: 50, 0.29: 29, 1.0: 100}[sparsity]  # 0.29 * 100 read as written: 29
    got = run_prune(backend, weight, norms, sparsity, largest=largest)
    assert torch.equal(got, unstructured_oracle(weight, norms, k, largest))
    assert int(got.sum()) == 37 * k
    tw, tn = tied(1, 37, 100)
    assert torch.equal(run_prune(backend, tw, tn, sparsity, largest=largest), unstructured_oracle(tw, tn, k, largest))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "m"), ((2, 4), (4, 8), (1, 4), (4, 4)), ids=["2:4", "4:8", "1:4", "4:4"])
@pytest.mark.parametrize("largest", (False, True), ids=["lowest", "highest"])
def test_n_m_matches_the_oracle_with_ties(backend, n, m, largest):
    g = torch.Generator().manual_seed(1)
    weight, norms = torch.randn(19, 64, generator=g), torch.rand(64, generator=g)
    got = run_prune(backend, weight, norms, n=n, m=m, largest=largest)
    assert torch.equal(got, n_m_oracle(weight, norms, n, m, largest))
    assert (got.reshape(19, -1, m).sum(-1) == n).all()  # exactly n of every m
    tw, tn = tied(2, 19, 64)
    assert torch.equal(run_prune(backend, tw, tn, n=n, m=m, largest=largest), n_m_oracle(tw, tn, n, m, largest))


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_rows_of_norms_give_the_union(backend):
    g = torch.Generator().manual_seed(2)
    weight, norms = torch.randn(8, 32, generator=g), torch.rand(3, 32, generator=g)
    got = run_prune(backend, weight, norms, 0.25)
    assert torch.equal(got, unstructured_oracle(weight, norms, 8))
    union = [unstructured_oracle(weight, row, 8) for row in norms]
    assert torch.equal(got, union[0] | union[1] | union[2])
    got = run_prune(backend, weight, norms, n=2, m=4)
    assert torch.equal(got, n_m_oracle(weight, norms, 2, 4))
    union = [n_m_oracle(weight, row, 2, 4) for row in norms]
    assert torch.equal(got, union[0] | union[1] | union[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_wandas_own_formula_on_distinct_scores(backend):
    """Wanda's prune_wanda: W_metric = |W| * sqrt(scaler_row); unstructured, sort each row and prune
    the first int(in * s) indices; n:m, topk(largest=False) of every m columns. scaler_row is the
    mean of squares over the calibration tokens, so squared=True takes it as it is."""
    g = torch.Generator().manual_seed(3)
    weight, x = torch.randn(16, 64, generator=g), torch.randn(200, 64, generator=g)
    scaler_row = (x**2).mean(0)
    metric = weight.abs() * torch.sqrt(scaler_row.reshape(1, -1))
    expected = torch.zeros_like(metric, dtype=torch.bool)
    expected.scatter_(1, torch.sort(metric, dim=-1, stable=True)[1][:, : int(64 * 0.5)], True)
    assert torch.equal(run_prune(backend, weight, scaler_row, 0.5, squared=True), expected)
    assert torch.equal(run_prune(backend, weight, x.norm(dim=0), 0.5), expected)  # a sum ranks as the mean does
    expected = torch.zeros_like(expected)
    for i in range(0, 64, 4):
        expected.scatter_(1, i + torch.topk(metric[:, i : i + 4], 2, dim=1, largest=False)[1], True)
    assert torch.equal(run_prune(backend, weight, scaler_row, n=2, m=4, squared=True), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_weights_are_scored_in_float32(backend):
    g = torch.Generator().manual_seed(4)
    weight, norms = torch.randn(8, 48, generator=g).half(), torch.rand(48, generator=g).half()
    assert torch.equal(run_prune(backend, weight, norms, 0.25), unstructured_oracle(weight, norms, 12))
    bf16 = weight.bfloat16()
    assert torch.equal(run_prune(backend, bf16, norms, n=2, m=4), n_m_oracle(bf16, norms, 2, 4))


# --- the argument checks: before dispatch, so once ---------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda w, x: prune_mask(w[0], x, 0.5),
            r"weight must be a 2-D floating tensor, got torch.float32 of shape \(16,\)",
        ),
        (lambda w, x: prune_mask(w.long(), x, 0.5), "weight must be a 2-D floating tensor"),
        (lambda w, x: prune_mask(w, x[:5], 0.5), r"norms must have 16 \(in_features\) columns, got shape \(5,\)"),
        (lambda w, x: prune_mask(w, x[None, :0], 0.5), r"norms must have 16 \(in_features\) columns, got shape \(1, 0\)"),
        (lambda w, x: prune_mask(w, x.long(), 0.5), "norms must be a floating tensor"),
        (lambda w, x: prune_mask(w, x[None, None], 0.5), r"norms must be a floating tensor of shape \[in\] or \[T, in\]"),
        (lambda w, x: prune_mask(w, x, 8), "sparsity must be a number in"),
        (lambda w, x: prune_mask(w, x, -0.1), "sparsity must be a number in"),
        (lambda w, x: prune_mask(w, x, True), "sparsity must be a number in"),
        (lambda w, x: prune_mask(w, x), "give sparsity"),
        (lambda w, x: prune_mask(w, x, 0.5, n=2, m=4), "give either sparsity or n and m, not both"),
        (lambda w, x: prune_mask(w, x, n=2.0, m=4), "n must be an integer, got 2.0"),
        (lambda w, x: prune_mask(w, x, n=5, m=4), "n:m must have 0 < n <= m, got 5:4"),
        (lambda w, x: prune_mask(w, x, n=2, m=3), "m=3 must divide in_features=16"),
        (lambda w, x: prune_mask(w, -x, 0.5, squared=True), "squared norms must not be negative"),
        (lambda w, x: prune_mask(w, -x, n=2, m=4), "norms must not be negative"),
    ],
    ids=["1-d-weight", "int-weight", "norms-width", "norms-no-columns", "int-norms", "3-d-norms", "sparsity>1",
         "sparsity<0", "sparsity-bool", "no-sparsity", "sparsity-and-n-m", "float-n", "n>m", "m-not-dividing",
         "negative-squared", "negative"],
)
def test_mistakes_name_the_argument(call, message):
    weight, norms = torch.randn(4, 16), torch.rand(16)
    with pytest.raises(ValueError, match=f"prune_mask: {message}"):
        call(weight, norms)


@needs_cuda
def test_norms_on_another_device():
    with pytest.raises(ValueError, match="prune_mask: norms is on cpu but weight is on cuda"):
        prune_mask(torch.randn(4, 16, device="cuda"), torch.rand(16), 0.5)
