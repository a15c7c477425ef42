"""Running the denoiser exactly as the pipeline's own ``__call__`` does, for the first calls only.

The pipeline itself runs each generation (its text encoding, scheduler stepping and guidance), so
the first tau calls see the inputs a full generation would. A step-end callback interrupts it after
call tau - 1 (diffusers' documented way to stop a pipeline early) and ``output_type="latent"``
skips the VAE.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memcore.config import Generation
from memcore.models import denoiser


def initial_latent(pipe, generation: Generation) -> torch.Tensor:
    """x_T for one image, drawn as a pipeline does after ``torch.manual_seed(seed)`` with no generator.

    The pipeline scales it by ``scheduler.init_noise_sigma`` itself. The caller's global RNG state is
    left as it was.
    """
    from diffusers.utils.torch_utils import randn_tensor

    net = denoiser(pipe)
    device = pipe._execution_device
    shape = (
        1,
        net.config.in_channels,
        generation.height // pipe.vae_scale_factor,
        generation.width // pipe.vae_scale_factor,
    )
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(generation.seed)
        return randn_tensor(shape, generator=None, device=device, dtype=net.dtype)


def is_guided(pipe, generation: Generation) -> bool:
    """Whether the pipeline will run a classifier-free-guidance batch [uncond..., cond...]."""
    return generation.guidance > 1 and getattr(denoiser(pipe).config, "time_cond_proj_dim", None) is None


def run_first_calls(
    pipe,
    prompts: list[str],
    latent: torch.Tensor,
    generation: Generation,
    num_calls: int,
    on_call: Callable[[], None] | None = None,
) -> None:
    """Generate for ``prompts`` from the shared latent, stopping after ``num_calls`` denoiser calls."""

    def stop_after(pipeline, step, timestep, callback_kwargs):
        if on_call is not None:
            on_call()
        if step + 1 >= num_calls:
            pipeline._interrupt = True
        return callback_kwargs

    pipe(
        prompt=prompts,
        num_inference_steps=generation.steps,
        guidance_scale=generation.guidance,
        height=generation.height,
        width=generation.width,
        latents=latent.repeat(len(prompts), 1, 1, 1),
        output_type="latent",
        callback_on_step_end=stop_after,
    )
