"""memcore.ops.prune_mask (the front door for pruning code) against an oracle written from its
docstring with a stable sort, on every CPU backend of wanda_mask, and against Wanda's own formula."""

from __future__ import annotations

import pytest
import torch

from memcore.ops import prune_mask, use_backend
from memcore.ops._ext import extension
from memcore.ops import available_backends

needs_ext = pytest.mark.skipif(extension() is None, reason="memcore._C is not built; the cpu backend is absent")
needs_triton = pytest.mark.skipif(
    "triton" not in available_backends("wanda_mask", "cpu"), reason="Triton's interpreter is not usable here (TRITON_INTERPRET)"
)


@pytest.fixture(params=["reference", pytest.param("cpu", marks=needs_ext), pytest.param("triton", marks=needs_triton)])
def backend(request):
    with use_backend(request.param):
        yield request.param


def oracle(weight, norms, k=None, n=0, m=0, largest=False):
    """The mask from the docstring: float32 scores, a stable sort per row (or per group of m), so
    that ties go to the lower column; the union over the rows of norms."""
    norms = norms.reshape(-1, weight.shape[1]).float()
    out = torch.zeros(weight.shape, dtype=torch.bool)
    for row in norms:
        scores = weight.float().abs() * row
        groups = scores.reshape(-1, m) if n else scores
        keep = n if n else k
        order = torch.sort(-groups if largest else groups, dim=1, stable=True).indices[:, :keep]
        chosen = torch.zeros(groups.shape, dtype=torch.bool).scatter_(1, order, True)
        out |= chosen.reshape(weight.shape)
    return out


def ties(gen, out, cols):
    weight = torch.randint(-3, 4, (out, cols), generator=gen).float()
    norms = torch.randint(0, 3, (cols,), generator=gen).float()
    return weight, norms


@pytest.mark.parametrize("sparsity", (0.0, 0.1, 0.5, 0.29, 1.0))
@pytest.mark.parametrize("largest", (False, True))
def test_unstructured_matches_the_oracle(backend, sparsity, largest):
    gen = torch.Generator().manual_seed(0)
    weight, norms = torch.randn(37, 100, generator=gen), torch.rand(100, generator=gen)
    k = {0.0: 0, 0.1: 10, 0.5: 50, 0.29: 29, 1.0: 100}[sparsity]  # 0.29 * 100 read as written: 29
    got = prune_mask(weight, norms, sparsity, largest=largest)
    assert got.dtype == torch.bool and got.shape == weight.shape
    assert torch.equal(got, oracle(weight, norms, k=k, largest=largest))
    assert int(got.sum()) == 37 * k
    tw, tn = ties(gen, 37, 100)
    assert torch.equal(prune_mask(tw, tn, sparsity, largest=largest), oracle(tw, tn, k=k, largest=largest))


@pytest.mark.parametrize(("n", "m"), ((2, 4), (4, 8), (1, 4), (4, 4)))
@pytest.mark.parametrize("largest", (False, True))
def test_n_m_matches_the_oracle_with_ties(backend, n, m, largest):
    gen = torch.Generator().manual_seed(1)
    weight, norms = torch.randn(19, 64, generator=gen), torch.rand(64, generator=gen)
    got = prune_mask(weight, norms, n=n, m=m, largest=largest)
    assert torch.equal(got, oracle(weight, norms, n=n, m=m, largest=largest))
    assert (got.reshape(19, -1, m).sum(-1) == n).all()  # exactly n of every m
    tw, tn = ties(gen, 19, 64)
    assert torch.equal(prune_mask(tw, tn, n=n, m=m, largest=largest), oracle(tw, tn, n=n, m=m, largest=largest))


def test_several_rows_of_norms_give_the_union(backend):
    gen = torch.Generator().manual_seed(2)
    weight, norms = torch.randn(8, 32, generator=gen), torch.rand(3, 32, generator=gen)
    union = prune_mask(weight, norms[0], 0.25) | prune_mask(weight, norms[1], 0.25) | prune_mask(weight, norms[2], 0.25)
    assert torch.equal(prune_mask(weight, norms, 0.25), union)
    union = prune_mask(weight, norms[0], n=2, m=4) | prune_mask(weight, norms[1], n=2, m=4) | prune_mask(weight, norms[2], n=2, m=4)
    assert torch.equal(prune_mask(weight, norms, n=2, m=4), union)


def test_wandas_own_formula_on_distinct_scores(backend):
    """Wanda's prune_wanda: W_metric = |W| * sqrt(scaler_row); unstructured, sort each row and prune
    the first int(in * s) indices; n:m, topk(largest=False) of every m columns. scaler_row is the
    mean of squares over the calibration tokens, so squared=True takes it as it is."""
    gen = torch.Generator().manual_seed(3)
    weight, x = torch.randn(16, 64, generator=gen), torch.randn(200, 64, generator=gen)
    scaler_row = (x**2).mean(0)
    metric = weight.abs() * torch.sqrt(scaler_row.reshape(1, -1))
    expected = torch.zeros_like(metric, dtype=torch.bool)
    expected.scatter_(1, torch.sort(metric, dim=-1, stable=True)[1][:, : int(64 * 0.5)], True)
    assert torch.equal(prune_mask(weight, scaler_row, 0.5, squared=True), expected)
    assert torch.equal(prune_mask(weight, x.norm(dim=0), 0.5), expected)  # a sum ranks as the mean does
    expected = torch.zeros_like(expected)
    for i in range(0, 64, 4):
        expected.scatter_(1, i + torch.topk(metric[:, i : i + 4], 2, dim=1, largest=False)[1], True)
    assert torch.equal(prune_mask(weight, scaler_row, n=2, m=4, squared=True), expected)


def test_half_precision_weights_are_scored_in_float32(backend):
    gen = torch.Generator().manual_seed(4)
    weight, norms = torch.randn(8, 48, generator=gen).half(), torch.rand(48, generator=gen).half()
    want = oracle(weight.float(), norms.float(), k=12)
    assert torch.equal(prune_mask(weight, norms, 0.25), want)
    assert torch.equal(prune_mask(weight.bfloat16(), norms, n=2, m=4), oracle(weight.bfloat16().float(), norms.float(), n=2, m=4))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w, x: prune_mask(w[0], x, 0.5), r"weight must be a 2-D floating tensor, got torch.float32 of shape \(16,\)"),
        (lambda w, x: prune_mask(w.long(), x, 0.5), "weight must be a 2-D floating tensor"),
        (lambda w, x: prune_mask(w, x[:5], 0.5), r"norms must have 16 \(in_features\) columns, got shape \(5,\)"),
        (lambda w, x: prune_mask(w, x.long(), 0.5), "norms must be a floating tensor"),
        (lambda w, x: prune_mask(w, x[None, None], 0.5), r"norms must be a floating tensor of shape \[in\] or \[T, in\]"),
        (lambda w, x: prune_mask(w, x, 8), "sparsity must be a number in"),
        (lambda w, x: prune_mask(w, x, True), "sparsity must be a number in"),
        (lambda w, x: prune_mask(w, x), "give sparsity"),
        (lambda w, x: prune_mask(w, x, 0.5, n=2, m=4), "either sparsity or n and m"),
        (lambda w, x: prune_mask(w, x, n=2.0, m=4), "n must be an integer, got 2.0"),
        (lambda w, x: prune_mask(w, x, n=5, m=4), "0 < n <= m, got 5:4"),
        (lambda w, x: prune_mask(w, x, n=2, m=3), "m=3 must divide in_features=16"),
        (lambda w, x: prune_mask(w, -x, 0.5, squared=True), "squared norms must not be negative"),
    ],
)
def test_mistakes_name_the_argument(call, message):
    weight, norms = torch.randn(4, 16), torch.rand(16)
    with pytest.raises(ValueError, match=message):
        call(weight, norms)
