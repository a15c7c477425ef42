"""Density and IoU of per-step masks against hand-computed cases, the chance baseline, the tables and figures."""

import csv

import numpy as np
import pytest
import torch

from memcore.analysis import (
    Overlap,
    _popcount_table,
    analyze,
    chance_iou,
    check_comparable,
    density,
    group_iou,
    mask_iou,
    pairwise_iou,
    popcount,
)
from memcore.errors import MemcoreError
from memcore.figures import layer_labels, short_layer_name
from memcore.mask import Mask
from memcore.ops import pack_mask

L0 = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
L1 = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
SHAPES = {L0: (2, 8), L1: (3, 13)}  # 13: the last byte of each row has 3 padding bits


def bits(shape, ones):
    out = torch.zeros(shape, dtype=torch.bool)
    for r, c in ones:
        out[r, c] = True
    return out


def make_mask(steps, shapes=SHAPES, **metadata):
    """A Mask from per-step cells: ``steps[layer]`` is a list (one per call index) of (row, col) lists."""
    layers = list(shapes)
    tau = len(steps[layers[0]])
    dense = {name: [bits(shapes[name], ones) for ones in steps[name]] for name in layers}
    meta = {
        "format": "memcore.mask/1",
        "model_id": "tiny",
        "weights_sha256": "ab" * 32,
        "target": "ffn",
        "layers": layers,
        "shapes": {name: list(shape) for name, shape in shapes.items()},
        "sparsity": 0.25,
        "timesteps": tau,
        "timestep_values": [981, 961, 961, 941][:tau],
        "per_step": True,
        "rows": "both",
        "token_norm": True,
        "seed": 0,
        "steps": 50,
        "dtype": "float32",
    }
    meta.update(metadata)
    union = {name: pack_mask(torch.stack(dense[name]).any(dim=0)) for name in layers}
    per_step = {name: torch.stack([pack_mask(m) for m in dense[name]]) for name in layers}
    return Mask(layers=union, metadata=meta, per_step=per_step if meta["per_step"] else {})


# Two masks, tau = 2 (hand-counted below): L0 has 16 weights, L1 39.
A = {L0: [[(0, 0), (0, 1), (1, 2)], [(0, 0), (1, 7)]], L1: [[], [(2, 12)]]}
B = {L0: [[(0, 0), (1, 2), (1, 3), (1, 4)], [(0, 5)]], L1: [[], [(2, 12), (0, 0)]]}
EMPTY = {L0: [[], []], L1: [[], []]}


def test_popcount_matches_unpacked_and_ignores_padding():
    gen = np.random.default_rng(0)
    for dtype in (np.uint8, np.uint16, np.uint64):
        words = gen.integers(0, np.iinfo(dtype).max, (3, 7), dtype=dtype, endpoint=True)
        want = [sum(int(v).bit_count() for v in row) for row in words]
        assert popcount(words).tolist() == want
        assert _popcount_table(words).tolist() == want  # numpy 1.x
    # garbage in the padding bits of the file does not count (as unpack_mask ignores it)
    mask = make_mask(A)
    mask.per_step[L1][1, :, 1] |= 0b1110_0000
    mask.layers[L1][:, 1] |= 0b1110_0000
    assert density([mask]).masked[0, 1].tolist() == [2, 1]
    assert density([mask]).union_masked[0].tolist() == [4, 1]


def test_density_hand_computed():
    d = density([make_mask(A), make_mask(B)], names=["a", "b"])
    assert d.names == ["a", "b"] and d.layers == [L0, L1] and d.timestep_values == [981, 961]
    assert d.total.tolist() == [16, 39]
    assert d.masked.tolist() == [[[3, 0], [2, 1]], [[4, 0], [1, 2]]]
    assert d.union_masked.tolist() == [[4, 1], [5, 2]]
    np.testing.assert_allclose(d.per_step[0], [[3 / 16, 0], [2 / 16, 1 / 39]])
    np.testing.assert_allclose(d.by_timestep, [(3 / 16 + 4 / 16) / 4, (2 / 16 + 1 / 39 + 1 / 16 + 2 / 39) / 4])
    np.testing.assert_allclose(d.by_layer, [(3 + 2 + 4 + 1) / 16 / 4, (1 + 2) / 39 / 4])
    assert d.overall == pytest.approx(d.per_step.mean())
    np.testing.assert_allclose(d.union, [[4 / 16, 1 / 39], [5 / 16, 2 / 39]])
    np.testing.assert_allclose(d.pooled, [[3 / 55, 3 / 55], [4 / 55, 3 / 55]])


def test_pairwise_iou_hand_computed():
    pw = pairwise_iou([make_mask(A), make_mask(B)], names=["a", "b"])
    assert pw.pairs == [(0, 1)]
    assert pw.steps.intersection.tolist() == [[[2, 0], [0, 1]]]
    assert pw.steps.union.tolist() == [[[5, 0], [3, 2]]]
    # call 0, L1: both masks empty, IoU 1.0 by definition
    np.testing.assert_allclose(pw.iou, [[2 / 5, 1.0], [0.0, 1 / 2]])
    assert pw.steps.empty.tolist() == [[[False, True], [False, False]]]
    e00, e10, e11 = 3 * 4 / 16, 2 * 1 / 16, 1 * 2 / 39
    np.testing.assert_allclose(pw.chance, [[e00 / (7 - e00), 1.0], [e10 / (3 - e10), e11 / (3 - e11)]])
    np.testing.assert_allclose(pw.chance[1], [1 / 23, 2 / 115])
    np.testing.assert_allclose(pw.iou_by_timestep, [0.7, 0.25])
    np.testing.assert_allclose(pw.iou_by_layer, [0.2, 0.75])
    assert pw.iou_overall == pytest.approx(0.475)
    # union masks: L0 {00, 01, 12, 17} vs {00, 12, 13, 14, 05}; L1 {2.12} vs {2.12, 00}
    np.testing.assert_allclose(pw.union_iou, [2 / 7, 1 / 2])
    assert pw.union_masks.pooled(axis=1).iou.tolist() == pytest.approx([3 / 9])


def test_identical_disjoint_and_empty_masks():
    same = pairwise_iou([make_mask(A), make_mask(A)], names=["a", "a2"])
    np.testing.assert_array_equal(same.iou, 1.0)
    np.testing.assert_array_equal(same.union_iou, 1.0)
    disjoint = {L0: [[(0, 2)], [(1, 0)]], L1: [[(0, 1)], [(1, 1)]]}
    other = {L0: [[(0, 3)], [(1, 1)]], L1: [[(0, 2)], [(1, 2)]]}
    np.testing.assert_array_equal(pairwise_iou([make_mask(disjoint), make_mask(other)], ["x", "y"]).iou, 0.0)
    empty = pairwise_iou([make_mask(EMPTY), make_mask(EMPTY)], names=["e", "f"])
    np.testing.assert_array_equal(empty.iou, 1.0)
    np.testing.assert_array_equal(empty.chance, 1.0)
    assert empty.steps.empty.all() and empty.union_masks.empty.all()


def test_three_masks_mean_over_distinct_pairs():
    shapes = {L0: (1, 8)}
    a = make_mask({L0: [[(0, 0), (0, 1), (0, 2), (0, 3)]]}, shapes)
    b = make_mask({L0: [[(0, 2), (0, 3), (0, 4), (0, 5)]]}, shapes)
    c = make_mask({L0: [[(0, 0), (0, 1), (0, 2), (0, 3)]]}, shapes)
    pw = pairwise_iou([a, b, c], names=["a", "b", "c"])
    assert pw.pairs == [(0, 1), (0, 2), (1, 2)]
    # IoU(a, b) = 2/6, IoU(a, c) = 1, IoU(b, c) = 2/6: mean 5/9 (19/27 with the diagonal, which must not count)
    assert pw.iou[0, 0] == pytest.approx(5 / 9)
    # every pair has 4 and 4 ones of 8: E = 2, chance = 2 / (8 - 2)
    assert pw.chance[0, 0] == pytest.approx(1 / 3)


def test_chance_formula():
    assert chance_iou(0, 0, 10) == 1.0
    assert chance_iou(3, 4, 16) == pytest.approx(0.75 / 6.25)
    assert chance_iou(0, 5, 10) == 0.0
    assert chance_iou(10, 10, 10) == 1.0
    np.testing.assert_allclose(chance_iou([2, 0], [1, 0], [16, 39]), [1 / 23, 1.0])


def _monte_carlo_iou(a, b, n, samples, gen):
    """Mean IoU of a fixed a-subset and uniformly random b-subsets of n (exact counts)."""
    picks = torch.rand(samples, n, generator=gen).topk(b, dim=1).indices
    inter = (picks < a).sum(dim=1).double()
    return inter, a + b - inter


def test_chance_matches_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    samples = 4000
    for a, b, n in [(100, 200, 1000), (30, 50, 400)]:
        inter, union = _monte_carlo_iou(a, b, n, samples, gen)
        iou = inter / union
        # 5 standard errors of the estimate, plus the ratio-of-expectations bias (well under 1 %)
        tol = 5 * iou.std().item() / samples**0.5 + 0.005 * chance_iou(a, b, n)
        assert abs(iou.mean().item() - chance_iou(a, b, n)) < tol, (a, b, n)
    # pooled over two layers: the expected intersections add up
    i0, _ = _monte_carlo_iou(100, 200, 1000, samples, gen)
    i1, _ = _monte_carlo_iou(30, 50, 400, samples, gen)
    pooled = Overlap.of([100, 30], [200, 50], [1000, 400], [0, 0]).pooled()
    iou = (i0 + i1) / (380 - i0 - i1)
    assert abs(iou.mean().item() - float(pooled.chance)) < 5 * iou.std().item() / samples**0.5 + 0.001


def test_mask_iou_per_layer_and_pooled():
    result = mask_iou(make_mask(A), make_mask(B, sparsity=0.5))  # other settings are fine here
    assert result.iou == pytest.approx({L0: 2 / 7, L1: 1 / 2})
    assert result.iou_all == pytest.approx(3 / 9)
    assert result.chance[L0] == pytest.approx(chance_iou(4, 5, 16))
    e = 4 * 5 / 16 + 1 * 2 / 39
    assert result.chance_all == pytest.approx(e / (12 - e))
    empty = mask_iou(make_mask(EMPTY), make_mask(EMPTY, per_step=False))
    assert empty.iou == {L0: 1.0, L1: 1.0} and empty.iou_all == 1.0 and int(empty.overall.union) == 0


@pytest.mark.parametrize(
    ("key", "value"),
    [("weights_sha256", "cd" * 32), ("sparsity", 0.5), ("timestep_values", [981, 941]), ("rows", "cond")],
)
def test_check_comparable_refuses_other_settings(key, value):
    masks = [make_mask(A), make_mask(B, **{key: value})]
    with pytest.raises(MemcoreError, match=f"masks one.safetensors and two.safetensors differ in {key} "):
        check_comparable(masks, ["one.safetensors", "two.safetensors"])
    with pytest.raises(MemcoreError, match=key):
        pairwise_iou(masks)


def test_check_comparable_needs_per_step():
    masks = [make_mask(A), make_mask(B, per_step=False)]
    with pytest.raises(MemcoreError) as info:
        check_comparable(masks, ["one.safetensors", "two.safetensors"])
    assert str(info.value) == (
        "two.safetensors: mask has no per-step data; recompute it with per_step=True (compute_mask(per_step=True) "
        "or LocalizeConfig(per_step=True)), or compare two masks with mask_iou()"
    )
    check_comparable(masks, ["one", "two"], require_per_step=False)


def test_iou_needs_two_masks(tmp_path):
    with pytest.raises(MemcoreError, match=r"^IoU needs at least two masks, got 1: only$"):
        pairwise_iou([make_mask(A, subset="only")])
    make_mask(A).save(tmp_path / "m.safetensors")
    with pytest.raises(MemcoreError, match=r"got 1: .*m\.safetensors"):
        analyze([tmp_path / "m.safetensors"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024


def test_analyze_writes_tables_and_figures(tmp_path):
    import sys

    for name, cells in [("a", A), ("b", B), ("c", EMPTY)]:
        make_mask(cells).save(tmp_path / f"{name}.safetensors")
    out = tmp_path / "new" / "analysis"
    result = analyze([tmp_path / f"{n}.safetensors" for n in "abc"], out)
    assert result.names == ["a", "b", "c"]
    names = ["analysis.csv", "density.csv", "pairs.csv", "density_by_timestep.png", "density_by_layer.png"]
    names += ["iou_by_timestep.png", "iou_by_layer.png", "iou_heatmap.png"]
    assert [p.name for p in result.paths] == names
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary files left
    assert all(_is_png(out / n) for n in names if n.endswith(".png"))
    assert "matplotlib.pyplot" not in sys.modules  # figures leave matplotlib's global state alone

    pw = result.pairwise
    rows = {(r["call"], r["layer"]): r for r in _read(out / "analysis.csv")}
    assert len(rows) == 4 * 4  # (calls 0, 1, union, mean) x (2 layers, mean, all)
    cell = rows[("0", L0)]
    assert cell["timestep"] == "981" and cell["masks"] == "3" and cell["pairs"] == "3"
    # pairs (a, b), (a, c), (b, c) at call 0, L0: 2/5, 0/3, 0/4; a and b vs the empty c
    assert float(cell["iou"]) == pytest.approx((2 / 5 + 0 + 0) / 3) == pytest.approx(pw.iou[0, 0])
    assert float(cell["density"]) == pytest.approx((3 + 4 + 0) / 16 / 3)
    assert float(cell["iou_chance"]) == pytest.approx(pw.chance[0, 0])
    assert rows[("0", L1)]["empty_pairs"] == "3" and float(rows[("0", L1)]["iou"]) == 1.0
    assert float(rows[("1", "mean")]["iou"]) == pytest.approx(pw.iou_by_timestep[1])
    assert float(rows[("mean", L1)]["iou"]) == pytest.approx(pw.iou_by_layer[1])
    assert float(rows[("mean", "mean")]["iou"]) == pytest.approx(pw.iou_overall)
    assert float(rows[("mean", "mean")]["density"]) == pytest.approx(result.density.overall)
    assert float(rows[("mean", L0)]["density"]) == pytest.approx(result.density.by_layer[0])
    assert rows[("mean", "mean")]["empty_pairs"] == str(int(pw.steps.empty.sum()))
    assert rows[("union", "mean")]["timestep"] == ""
    assert float(rows[("union", L0)]["iou"]) == pytest.approx(pw.union_iou[0])
    union_all = pw.union_masks.pooled(axis=1)
    assert float(rows[("union", "all")]["iou"]) == pytest.approx(union_all.iou.mean())

    density_rows = _read(out / "density.csv")
    assert len(density_rows) == 3 * 3 * 3  # masks x (calls 0, 1, union) x (2 layers, all)
    row = next(r for r in density_rows if (r["mask"], r["call"], r["layer"]) == ("b", "1", L1))
    assert (row["timestep"], row["masked"], row["total"]) == ("961", "2", "39")
    assert float(row["density"]) == pytest.approx(2 / 39)
    row = next(r for r in density_rows if (r["mask"], r["call"], r["layer"]) == ("a", "union", "all"))
    assert (row["masked"], row["total"]) == ("5", "55")

    pair_rows = {(r["mask_a"], r["mask_b"], r["call"], r["layer"]): r for r in _read(out / "pairs.csv")}
    assert len(pair_rows) == 3 * 3 * 3  # pairs x (calls 0, 1, union) x (2 layers, all)
    row = pair_rows[("a", "b", "union", L0)]
    assert [row[k] for k in ("count_a", "count_b", "total", "intersection", "union")] == ["4", "5", "16", "2", "7"]
    assert float(row["iou"]) == pytest.approx(2 / 7) and float(row["iou_chance"]) == pytest.approx(chance_iou(4, 5, 16))
    row = pair_rows[("a", "b", "union", "all")]
    assert (row["intersection"], row["union"]) == ("3", "9") and float(row["iou"]) == pytest.approx(1 / 3)
    row = pair_rows[("a", "c", "0", L1)]  # two empty masks: a union of 0 says the 1.0 is the definition
    assert (row["union"], row["iou"], row["iou_chance"]) == ("0", "1.0", "1.0")


def test_analyze_density_only_with_one_mask(tmp_path):
    out = tmp_path / "out"
    result = analyze([make_mask(A, subset="fox")], out, density_only=True)
    assert result.names == ["fox"] and result.pairwise is None
    assert sorted(p.name for p in out.iterdir()) == [
        "analysis.csv",
        "density.csv",
        "density_by_layer.png",
        "density_by_timestep.png",
    ]
    rows = {(r["call"], r["layer"]): r for r in _read(out / "analysis.csv")}
    assert float(rows[("0", L0)]["density"]) == pytest.approx(3 / 16)
    assert rows[("0", L0)]["iou"] == "" and rows[("0", L0)]["pairs"] == ""
    assert float(rows[("union", "all")]["density"]) == pytest.approx(5 / 55)
    assert all(_is_png(p) for p in result.paths if p.suffix == ".png")


def test_analyze_output_and_names(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(MemcoreError, match="exists and is not a folder"):
        analyze([make_mask(A), make_mask(B)], tmp_path / "file")
    with pytest.raises(MemcoreError, match="'x' is given twice"):
        analyze([make_mask(A), make_mask(B)], tmp_path / "o", names=["x", "x"])
    for folder in ("p", "q"):
        (tmp_path / folder).mkdir()
        make_mask(A).save(tmp_path / folder / "mask.safetensors")
    paths = [tmp_path / "p" / "mask.safetensors", tmp_path / "q" / "mask.safetensors"]
    assert pairwise_iou(paths).names == ["p/mask", "q/mask"]
    with pytest.raises(MemcoreError, match="given twice"):
        pairwise_iou([paths[0], paths[0]])


def test_short_layer_names():
    assert short_layer_name(L0) == "down0.attn0.tb0"
    assert short_layer_name(L1) == "mid.attn0.tb0"
    assert short_layer_name("up_blocks.3.attentions.2.transformer_blocks.1.ff.net.2") == "up3.attn2.tb1"
    assert short_layer_name("transformer_blocks.11.ff.net.2") == "tb11"
    assert short_layer_name("blocks.3.mlp.fc2") == "b3.mlp.fc2"
    names = ["transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff.net.0"]  # would both be tb0
    assert layer_labels(names) == names


def test_group_iou_by_hand():
    """Memorized {A, A}, control {B}: within = IoU(A, A) = 1; across = IoU(A, B) twice; no control pair."""
    a, b = make_mask(A), make_mask(B)
    groups = group_iou([a, a], [b])
    assert set(groups.rows) == {"memorized", "memorized_vs_control"}
    pairs, iou, chance, union_iou, union_chance = groups.rows["memorized"]
    assert (pairs, iou, union_iou) == (1, 1.0, 1.0)
    # per step: L0 t0 |A|=3 |B|=4, 2 shared: 2/5; L0 t1: 0/3; L1 t0 empty (1.0 by definition); L1 t1 1/2
    pairs, iou, _, union_iou, _ = groups.rows["memorized_vs_control"]
    assert pairs == 2 and iou == pytest.approx((2 / 5 + 0 / 3 + 1.0 + 1 / 2) / 4)
    # union masks pooled: L0 A {00,01,12,17} B {00,12,13,14,05}: 2 shared of 7; L1 A {2,12} B {2,12; 0,0}: 1 of 2
    assert union_iou == pytest.approx((2 + 1) / (7 + 2))
    with pytest.raises(MemcoreError, match="group comparison needs"):
        group_iou([a], [])
    with pytest.raises(MemcoreError, match="differ in sparsity"):
        group_iou([a, a], [make_mask(B, sparsity=0.5)])


def test_analyze_writes_groups(tmp_path):
    result = analyze([make_mask(A), make_mask(B)], tmp_path, control=[make_mask(EMPTY), make_mask(B)])
    with open(tmp_path / "groups.csv") as f:
        rows = {row["group"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"memorized", "control", "memorized_vs_control"}
    assert int(rows["memorized_vs_control"]["pairs"]) == 4
    assert float(rows["memorized"]["iou"]) == pytest.approx(result.groups.iou("memorized"))
    assert float(rows["memorized"]["iou"]) == pytest.approx(pairwise_iou([make_mask(A), make_mask(B)]).iou_overall)
