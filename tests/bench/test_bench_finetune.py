"""Benchmark of ``memcore finetune``: training steps per second.

One round is one :func:`memcore.finetune.training_step` (the step ``finetune_denoiser`` repeats: load
and encode the batch with the frozen VAE and text encoder, draw noise and timesteps, the diffusion
loss, backward, gradient clipping, AdamW), on a batch of 4 procedural scenes (:mod:`memcore.scenes`)
at the model's resolution, float32. Checkpoints and the final save are not timed.

Models:

- ``tiny`` (random weights, SD 1.5 architecture with narrow layers) at 128 px, its own resolution;
- ``sd15-arch`` (CUDA only): SD 1.5's published denoiser architecture (tests/configs/sd15_unet.json)
  with random weights at 512 px, with tiny's VAE and text encoder, so the step is the denoiser's
  (what dominates SD 1.5's fine-tuning) and no weights are needed; mixed precision bf16 and gradient
  checkpointing as ``memcore finetune`` uses them on a GPU.

On the CPU torch runs with one thread unless ``MEMCORE_BENCH_THREADS`` says otherwise.

    pytest tests/bench/test_bench_finetune.py --benchmark-only
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchutil import DEVICE, ON_CUDA, SMOKE, THREADS, bench_threads, measure, record  # noqa: F401 (bench_threads: a fixture)

from memcore.finetune import FinetuneConfig, Trainer, read_image_folder, training_step  # noqa: E402
from memcore.scenes import write_image_folder  # noqa: E402

BATCH = 4
SD15_UNET = Path(__file__).resolve().parents[1] / "configs" / "sd15_unet.json"
MODELS = ["tiny"] + (["sd15-arch"] if ON_CUDA and not SMOKE else [])


pytestmark = pytest.mark.usefixtures("bench_threads")


def _pipeline(model: str):
    from diffusers import UNet2DConditionModel

    from memcore.models import load_pipeline

    pipe = load_pipeline("tiny", str(DEVICE), "float32")
    if SMOKE:
        pipe.unet.register_to_config(sample_size=8)  # 64 px
    if model == "sd15-arch":
        config = json.loads(SD15_UNET.read_text(encoding="utf-8"))
        config["cross_attention_dim"] = pipe.text_encoder.config.hidden_size
        pipe.unet = UNet2DConditionModel.from_config(config).to(DEVICE)
    return pipe


@pytest.mark.parametrize("model", MODELS)
def test_training_step(benchmark, tmp_path_factory, model):
    from accelerate import Accelerator

    from memcore.finetune import resolution

    pipe = _pipeline(model)
    size = resolution(pipe)
    data = write_image_folder(tmp_path_factory.mktemp("scenes") / "data", 8, size=size)
    examples = read_image_folder(data)
    precision = "bf16" if model == "sd15-arch" else "no"
    trainer = Trainer(pipe, data, examples, FinetuneConfig(batch_size=BATCH, mixed_precision=precision), DEVICE)
    unet = pipe.unet
    if ON_CUDA:
        unet.enable_gradient_checkpointing()
    unet.requires_grad_(True)
    unet.train()
    accelerator = Accelerator(mixed_precision=precision, cpu=not ON_CUDA, device_placement=False)
    unet_p, optimizer = accelerator.prepare(unet, torch.optim.AdamW(unet.parameters(), lr=1e-5))
    batch = examples[:BATCH]

    benchmark.group = f"finetune: one training step, batch {BATCH}, {DEVICE.type}, {THREADS or 'default'} thread(s)"
    median = measure(benchmark, lambda: training_step(trainer, unet_p, optimizer, accelerator, batch),
                     budget_s=0.2 if SMOKE else 5.0, min_rounds=2 if SMOKE else 3)
    record(benchmark, op="finetune", provider=model, pixels=size, batch=BATCH, mixed_precision=precision,
           denoiser_parameters=sum(p.numel() for p in unet.parameters()),
           steps_per_second=round(1 / median, 3) if median == median and median > 0 else None)
