"""memcore attack: the tiled distance against a plain loop, cliques against brute force, and the
command on the tiny model and on image folders whose answer is known."""

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import run_cli, user_error
from memcore import attack as at

SMALL = ["--model", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "--batch-size", "2"]


def loop_tiled_l2(a, b, grid=4, scale=255.0):
    """Carlini et al.'s tiled distance written out in float64: max over tiles of the RMS difference."""
    a, b = a.double().numpy(), b.double().numpy()
    _, h, w = a.shape
    th, tw = h // grid, w // grid
    worst = 0.0
    for i in range(grid):
        for j in range(grid):
            ta = a[:, i * th:(i + 1) * th, j * tw:(j + 1) * tw]
            tb = b[:, i * th:(i + 1) * th, j * tw:(j + 1) * tw]
            total = 0.0
            for x, y in zip(ta.ravel(), tb.ravel()):
                total += (scale * (float(x) - float(y))) ** 2
            worst = max(worst, math.sqrt(total / ta.size))
    return worst


# --- distances --------------------------------------------------------------------------------------


def test_tiled_l2_against_a_loop():
    gen = torch.Generator().manual_seed(0)
    for h, w in ((16, 24), (32, 8)):
        a, b = torch.rand(3, h, w, generator=gen), torch.rand(3, h, w, generator=gen)
        assert at.tiled_l2(a, b) == pytest.approx(loop_tiled_l2(a, b), rel=1e-12)
        assert at.tiled_l2(a, a) == 0.0


def test_pairwise_equals_pair_by_pair():
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 16, 16, generator=gen)
    images[4] = images[1] + 0.001  # a near pair
    d = at.pairwise_tiled_l2(images)
    assert d.shape == (6, 6) and d.dtype == torch.float64
    for i, j in itertools.product(range(6), repeat=2):
        expected = 0.0 if i == j else loop_tiled_l2(images[i], images[j])
        assert d[i, j].item() == pytest.approx(expected, rel=1e-12, abs=1e-9), (i, j)
    assert torch.equal(d, d.T)


def test_the_worst_tile_decides():
    """One tile off by c (on [0, 1]) gives 255 c, where the whole image's RMS would be a quarter of it."""
    a = torch.full((3, 64, 64), 0.5, dtype=torch.float64)
    b = a.clone()
    b[:, 16:32, 48:64] += 0.2
    assert at.tiled_l2(a, b) == pytest.approx(51.0, rel=1e-12)
    whole = 255 * torch.sqrt(((a - b) ** 2).mean()).item()
    assert whole == pytest.approx(12.75, rel=1e-12)


def test_tiled_l2_to_resizes_the_training_image():
    gen = torch.Generator().manual_seed(2)
    samples = torch.rand(3, 3, 32, 32, generator=gen)
    reference = torch.rand(3, 48, 40, generator=gen)
    d = at.tiled_l2_to(samples, reference)
    resized = at.resize_to(reference, 32, 32)
    assert resized.shape == (3, 32, 32) and 0 <= resized.min() and resized.max() <= 1
    for i in range(3):
        assert d[i].item() == pytest.approx(loop_tiled_l2(samples[i], resized), rel=1e-12)
    # an image blown up 2x (each pixel repeated) comes back to itself up to the filter's rounding
    big = samples[0].repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert at.tiled_l2_to(samples[:1], big)[0].item() < 40 < d[0].item()


def test_sizes_that_do_not_tile_are_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        at.pairwise_tiled_l2(torch.rand(2, 3, 18, 16))


# --- cliques ----------------------------------------------------------------------------------------


def brute_force(d, threshold):
    """The largest clique by trying every subset, ties to the lexicographically smallest."""
    n = d.shape[0]
    for size in range(n, 0, -1):
        found = [c for c in itertools.combinations(range(n), size)
                 if all(d[i, j] < threshold for i, j in itertools.combinations(c, 2))]
        if found:
            return min(found)
    return ()


def test_cliques_equal_brute_force():
    rng = np.random.default_rng(3)
    for trial in range(40):
        n = int(rng.integers(1, 9))
        upper = rng.choice([10.0, 30.0, 50.0, 70.0], size=(n, n))
        d = torch.from_numpy(np.triu(upper, 1) + np.triu(upper, 1).T)
        got = at.cliques(d, threshold=50.0, min_size=3)
        want = brute_force(d.numpy(), 50.0)
        assert got.members == want, (trial, d)
        assert got.flagged == (len(want) >= 3)


def test_an_edge_needs_a_distance_strictly_below_the_threshold():
    d = torch.tensor([[0.0, 50.0, 49.999], [50.0, 0.0, 10.0], [49.999, 10.0, 0.0]], dtype=torch.float64)
    assert at.cliques(d, 50.0, 2).members == (0, 2)  # 0-1 at exactly 50 is not an edge; (0,2) < (1,2)
    assert at.cliques(d, 50.000001, 3).members == (0, 1, 2)
    assert not at.cliques(d, 49.999, 3).flagged and at.cliques(d, 49.999, 3).members == (1, 2)


def test_ties_go_to_the_smallest_members():
    # two triangles {1, 3, 5} and {0, 2, 4}, no edge between them
    d = torch.full((6, 6), 99.0, dtype=torch.float64)
    for c in ((1, 3, 5), (0, 2, 4)):
        for i, j in itertools.permutations(c, 2):
            d[i, j] = 1.0
    assert at.cliques(d, 50.0, 3).members == (0, 2, 4)


def test_match_takes_the_median():
    to_ref = torch.tensor([10.0, 60.0, 20.0, 80.0, 45.0, 55.0], dtype=torch.float64)
    assert at.match(to_ref, [0, 1, 2]) == (True, 20.0)  # 10, 20, 60
    assert at.match(to_ref, [1, 3, 4]) == (False, 60.0)
    assert at.match(to_ref, [4, 5]) == (False, 50.0)  # mean of the middle two, not below 50
    assert at.match(to_ref, [0, 4, 5, 2]) == (True, 32.5)


@pytest.mark.parametrize("threshold", [0, -1.0, float("nan"), float("inf")])
def test_threshold_must_be_positive(threshold):
    with pytest.raises(at.MemcoreError, match="threshold"):
        at.cliques(torch.zeros(2, 2), threshold, 2)


# --- the command on synthetic folders ---------------------------------------------------------------


def near(base, rng, spread=3):
    noise = rng.integers(-spread, spread + 1, base.shape)
    return np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8)


def noise_image(rng, size=64):
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Five prompts of five 64 px samples each, in the layout memcore generate writes, whose answer is known:

    0: five near-copies of one image, whose training image it is           -> flagged, a true copy
    1: three near-copies and two others; its training image is another one -> flagged, not a copy
    2: five unrelated images                                                -> not flagged
    3: two near-copies and three others                                     -> clique of 2, not flagged
    4: five copies, two with one 16 x 16 tile brightened (the whole-image RMS
       would still call them close); training image: the copy at 128 px    -> flagged {0,1,2}, a true copy
    """
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("synthetic")
    images, gt = root / "gen" / "images", root / "gt"
    images.mkdir(parents=True)
    gt.mkdir()
    bases = [noise_image(rng) for _ in range(5)]
    samples = {
        0: [near(bases[0], rng) for _ in range(5)],
        1: [near(bases[1], rng), noise_image(rng), near(bases[1], rng), noise_image(rng), near(bases[1], rng)],
        2: [noise_image(rng) for _ in range(5)],
        3: [noise_image(rng), near(bases[3], rng), noise_image(rng), near(bases[3], rng), noise_image(rng)],
        4: [bases[4].copy() for _ in range(5)],
    }
    for k in (3, 4):  # one tile 60 gray levels brighter (clipped): about 55 in that tile, 14 over the image
        tile = samples[4][k][16:32, 32:48].astype(int)
        samples[4][k][16:32, 32:48] = np.clip(tile + 60, 0, 255).astype(np.uint8)
    for prompt, arrays in samples.items():
        for seed, array in enumerate(arrays):
            Image.fromarray(array).save(images / f"p{prompt:03d}_s{seed}.png")
    Image.fromarray(bases[0]).save(gt / "0000.png")
    Image.fromarray(noise_image(rng)).save(gt / "0001.png")
    Image.fromarray(noise_image(rng)).save(gt / "0002.jpg")
    Image.fromarray(bases[4]).resize((128, 128), Image.Resampling.NEAREST).save(gt / "0004.png")
    (root / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(5)) + "\n")
    return root


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_from_images_flags_exactly_the_known_prompts(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "attack", "--from-images", synthetic / "gen", "--prompts", synthetic / "p.txt", "--samples", "5",
        "--ground-truth", synthetic / "gt", "--out", out,
    )
    assert code == 0, err
    assert "3 of 5 prompts flagged, 2 true copies" in stdout
    rows = read_csv(out / "attack.csv")
    got = [(r["prompt"], r["clique_size"], r["flagged"], r["matched"], r["clique_seeds"]) for r in rows]
    assert got == [
        ("0", "5", "true", "true", "0 1 2 3 4"),
        ("1", "3", "true", "false", "0 2 4"),
        ("2", "1", "false", "", "0"),
        ("3", "2", "false", "", "1 3"),
        ("4", "3", "true", "true", "0 1 2"),
    ]
    assert [r["text"] for r in rows] == [f"prompt {i}" for i in range(5)]
    assert rows[3]["clique_distance"] == ""  # no training image for prompt 3
    assert float(rows[0]["clique_distance"]) < 5 and float(rows[1]["clique_distance"]) > 50
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["flagged"], summary["true_copies"], summary["prompts"]) == (3, 2, 5)
    assert summary["flagged_prompts"] == [0, 1, 4] and summary["with_training_image"] == 4
    assert sorted(p.name for p in (out / "pictures").iterdir()) == ["p000.png", "p001.png", "p004.png"]
    with Image.open(out / "pictures" / "p000.png") as picture:  # training image + 5 samples, 128 px high
        assert picture.width > 6 * at.THUMB and picture.height > at.THUMB
    assert not (out / "images").exists()

    # the same inputs give the same bytes; without ground truth "matched" stays empty
    again = tmp_path / "again"
    assert run_cli(capsys, "attack", "--from-images", synthetic / "gen" / "images", "--prompts", synthetic / "p.txt",
                   "--samples", "5", "--ground-truth", synthetic / "gt", "--out", again)[0] == 0
    assert (again / "attack.csv").read_bytes() == (out / "attack.csv").read_bytes()
    bare = tmp_path / "bare"
    assert run_cli(capsys, "attack", "--from-images", synthetic / "gen", "--prompts", synthetic / "p.txt",
                   "--samples", "5", "--out", bare)[0] == 0
    assert {r["matched"] for r in read_csv(bare / "attack.csv")} == {""}
    assert json.loads((bare / "summary.json").read_text())["true_copies"] is None

    # a looser threshold joins the brightened samples too (but no unrelated images): with --min-clique 5
    # only prompts 0 and 4 are flagged
    loose = tmp_path / "loose"
    assert run_cli(capsys, "attack", "--from-images", synthetic / "gen", "--prompts", synthetic / "p.txt",
                   "--samples", "5", "--threshold", "80", "--min-clique", "5", "--out", loose)[0] == 0
    assert [r["flagged"] for r in read_csv(loose / "attack.csv")] == ["true", "false", "false", "false", "true"]

    code, stdout, _ = run_cli(capsys, "attack", "--compare", out, loose)
    assert code == 0
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["flagged", "true", "copies", "total"]
    assert lines[1].startswith("before") and lines[1].split()[-3:] == ["3", "2", "5"]
    assert lines[2].startswith("after") and lines[2].split()[-3:] == ["2", "-", "5"]


def test_bad_inputs_are_one_line(synthetic, tmp_path, capsys):
    base = ["attack", "--prompts", synthetic / "p.txt", "--out", tmp_path / "out"]
    gen = synthetic / "gen"
    assert "no such folder" in user_error(capsys, tmp_path, *base, "--from-images", tmp_path / "nope", "--samples", "5")
    assert "--samples" in user_error(capsys, tmp_path, *base, "--from-images", gen, "--samples", "1")
    for bad in ("0", "-3", "nan"):
        assert "--threshold" in user_error(capsys, tmp_path, *base, "--from-images", gen, "--samples", "5", "--threshold", bad)
    assert "missing" in user_error(capsys, tmp_path, *base, "--from-images", gen, "--samples", "6")
    assert "no such folder" in user_error(
        capsys, tmp_path, *base, "--from-images", gen, "--samples", "5", "--ground-truth", tmp_path / "nogt")
    assert "--model" in user_error(capsys, tmp_path, *base, "--samples", "5")
    assert "--min-clique" in user_error(capsys, tmp_path, *base, "--from-images", gen, "--samples", "2")
    broken = tmp_path / "broken" / "images"
    broken.mkdir(parents=True)
    for prompt in range(5):
        for seed in range(2):
            Image.fromarray(noise_image(np.random.default_rng(seed), 16)).save(broken / f"p{prompt:03d}_s{seed}.png")
    (broken / "p002_s1.png").write_bytes(b"not a png")
    message = user_error(capsys, tmp_path, *base, "--from-images", broken.parent, "--samples", "2", "--min-clique", "2")
    assert "p002_s1.png: not a readable image" in message
    code, _, err = run_cli(capsys, "attack", "--compare", tmp_path / "x", tmp_path / "y")
    assert code == 2 and "no such folder" in err


# --- the command on the tiny model ------------------------------------------------------------------


def test_generates_and_attacks_on_tiny(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red car\nthe cat\nthe cat\n")
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "attack", *SMALL, "--prompts", tmp_path / "p.txt", "--samples", "4",
                                "--min-clique", "2", "--out", out)
    assert code == 0, err
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"p{p:03d}_s{s}.png" for p in range(3) for s in range(4)]
    rows = read_csv(out / "attack.csv")
    assert [r["prompt"] for r in rows] == ["0", "1", "2"]
    # prompts 1 and 2 are the same text under the same x_T: the same samples, the same row
    assert {k: v for k, v in rows[1].items() if k != "prompt"} == {k: v for k, v in rows[2].items() if k != "prompt"}
    # the row is what the library computes from the written images
    samples = at.read_samples(out / "images", 0, range(4))
    d = at.pairwise_tiled_l2(samples)
    clique = at.cliques(d, 50.0, 2)
    assert rows[0]["clique_seeds"] == " ".join(map(str, clique.members))
    assert rows[0]["flagged"] == ("true" if clique.flagged else "false")
    flagged = [int(r["prompt"]) for r in rows if r["flagged"] == "true"]
    assert sorted(p.name for p in (out / "pictures").iterdir()) == [f"p{p:03d}.png" for p in flagged]
    # reading the written images back gives the same table
    again = tmp_path / "again"
    assert run_cli(capsys, "attack", "--from-images", out, "--prompts", tmp_path / "p.txt", "--samples", "4",
                   "--min-clique", "2", "--out", again)[0] == 0
    assert (again / "attack.csv").read_bytes() == (out / "attack.csv").read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_a_stopped_attack_resumes(synthetic, tmp_path, monkeypatch):
    """Stopped while analyzing prompt 2: the rerun keeps prompts 0 and 1 and writes what one run writes."""
    from memcore.prompts import load_prompts
    from memcore.runs import partial_path

    prompts = load_prompts(synthetic / "p.txt")
    training = at.load_training_images(synthetic / "gt", len(prompts))
    whole = at.attack(prompts, out_dir=tmp_path / "whole", samples=5, from_images=synthetic / "gen",
                      training=training, progress=False)
    real, seen = at.analyze_prompt, []

    def stopping(samples, *args):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(1)
        return real(samples, *args)

    monkeypatch.setattr(at, "analyze_prompt", stopping)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        at.attack(prompts, out_dir=out, samples=5, from_images=synthetic / "gen", training=training, progress=False)
    assert not out.exists() and len(list((partial_path(out) / "parts").glob("*.json"))) == 2
    monkeypatch.setattr(at, "analyze_prompt", real)
    with pytest.raises(at.MemcoreError, match="other settings"):
        at.attack(prompts, out_dir=out, samples=5, from_images=synthetic / "gen", training=training, threshold=40,
                  progress=False)
    result = at.attack(prompts, out_dir=out, samples=5, from_images=synthetic / "gen", training=training, progress=False)
    assert (result.csv).read_bytes() == whole.csv.read_bytes()
    assert result.summary == whole.summary


@pytest.mark.slow
def test_two_processes_write_what_one_writes(tmp_path):
    """Generation and analysis shared by 2 processes under torchrun (gloo, CPU): the same files as one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "p.txt").write_text("a red car\nthe cat\na bowl of fruit\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    env.pop("WORLD_SIZE", None)
    for n in (1, 2):
        launcher = [sys.executable, "-m", "memcore"] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "memcore"]
        args = ["attack", *SMALL, "--prompts", "p.txt", "--samples", "3", "--min-clique", "2", "--out", f"a{n}"]
        done = subprocess.run(launcher + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("prompts flagged") == 1  # process 0 alone reports
    one, two = tmp_path / "a1", tmp_path / "a2"
    names = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for name in names:
        if name.name != "summary.json":  # it records the number of processes
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["settings"].pop("processes") == 2 and s1["settings"].pop("processes") == 1
    assert s1 == s2
