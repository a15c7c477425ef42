"""Benchmark of the extraction attack's analysis against the generation it filters.

Per prompt, ``memcore attack`` generates 50 samples and then, on the device, computes the 1,225
tiled l2 distances between them (:func:`memcore.attack.pairwise_tiled_l2`, one batched computation),
finds the largest clique of the threshold graph with networkx (:func:`memcore.attack.cliques`) and
the clique's distances to the training image (:func:`memcore.attack.tiled_l2_to`). The analysis must
cost nothing next to the generation. Timed here, at 512 px:

- ``distances``: the pairwise tiled l2 of 50 samples (float32, on the benchmark device);
- ``cliques``: the graph and its largest clique, from those distances (CPU, networkx);
- ``analysis``: the whole per-prompt analysis (:func:`memcore.attack.analyze_prompt`: distances,
  clique, match against one training image), what ``memcore attack`` runs per prompt;
- ``generation``: one sample of the ``tiny`` pipeline at 512 px (random weights, SD 1.5
  architecture with narrow layers; PNDM, guidance 7.5, float32; 50 steps on CUDA, 10 on the CPU,
  where one 50-step sample took 213 s). Fifty of them are a *lower bound* on the generation time
  per prompt of SD 1.5 at 50 steps, whose denoiser and VAE are far larger; the ratio
  ``analysis / (50 x generation)`` is therefore an upper bound on the analysis's share.

The samples are 40 random images plus 10 near-copies of one image (a clique of 10 under the
threshold), so the graph has the structure the attack looks for. On the CPU torch runs with one
thread (``MEMCORE_BENCH_THREADS``), as in the evaluate benchmark.

    pytest tests/bench/test_bench_attack.py --benchmark-only
"""

from __future__ import annotations


import pytest
import torch

from benchutil import DEVICE, ON_CUDA, SMOKE, THREADS, bench_threads, measure, record  # noqa: F401 (bench_threads: a fixture)

from memcore.attack import MIN_CLIQUE, THRESHOLD, analyze_prompt, cliques, pairwise_tiled_l2

SAMPLES = 50
PIXELS = 64 if SMOKE else 512
STEPS = 2 if SMOKE else 50 if ON_CUDA else 10  # on the CPU one 50-step sample at 512 px takes minutes
COPIES = 10
GROUP = f"attack per prompt: {SAMPLES} samples of {PIXELS} px, {DEVICE.type}, {THREADS or 'default'} thread(s)"
_medians: dict[str, float] = {}


pytestmark = pytest.mark.usefixtures("bench_threads")


@pytest.fixture(scope="module")
def samples() -> tuple[torch.Tensor, torch.Tensor]:
    """(50 samples in [0, 1], the training image): 40 random, 10 within a few gray levels of the training image."""
    g = torch.Generator().manual_seed(0)
    training = torch.rand(3, PIXELS, PIXELS, generator=g)
    random_ = torch.rand(SAMPLES - COPIES, 3, PIXELS, PIXELS, generator=g)
    copies = (training + 0.02 * torch.randn(COPIES, 3, PIXELS, PIXELS, generator=g)).clamp(0, 1)
    return torch.cat([random_, copies]).to(DEVICE), training.to(DEVICE)


def _finish(benchmark, name: str, median: float, **info) -> None:
    _medians[name] = median
    record(benchmark, op="attack", provider=name, samples=SAMPLES, pixels=PIXELS, **info)
    if "generation" in _medians and name != "generation":
        per_prompt = SAMPLES * _medians["generation"]
        benchmark.extra_info["share_of_50_tiny_generations"] = round(median / per_prompt, 5)


def test_generation(benchmark):
    from memcore.models import load_pipeline

    benchmark.group = GROUP
    pipe = load_pipeline("tiny", str(DEVICE), "float32")
    pipe.set_progress_bar_config(disable=True)

    def one() -> None:
        pipe("a photo", num_inference_steps=STEPS, guidance_scale=7.5, height=PIXELS, width=PIXELS,
             generator=torch.Generator("cpu").manual_seed(0), output_type="pt")

    median = measure(benchmark, one, budget_s=0.1, min_rounds=2 if SMOKE else 3)
    _finish(benchmark, "generation", median, steps=STEPS, note="one sample of tiny; x50 = a lower bound per prompt")


def test_distances(benchmark, samples):
    benchmark.group = GROUP
    images, _ = samples
    median = measure(benchmark, lambda: pairwise_tiled_l2(images))
    _finish(benchmark, "distances", median, pairs=SAMPLES * (SAMPLES - 1) // 2)


def test_cliques(benchmark, samples):
    benchmark.group = GROUP
    distances = pairwise_tiled_l2(samples[0]).cpu()
    found = cliques(distances)
    assert len(found.members) == COPIES, "the benchmark's samples must hold their clique of near-copies"
    median = measure(benchmark, lambda: cliques(distances))
    _finish(benchmark, "cliques", median)


def test_analysis(benchmark, samples):
    benchmark.group = GROUP
    images, training = samples
    row = analyze_prompt(images, list(range(SAMPLES)), THRESHOLD, MIN_CLIQUE, [training])
    assert row["flagged"] and row["matched"], row
    median = measure(benchmark, lambda: analyze_prompt(images, list(range(SAMPLES)), THRESHOLD, MIN_CLIQUE, [training]))
    _finish(benchmark, "analysis", median)
