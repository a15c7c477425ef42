"""Running the denoiser exactly as the pipeline's own ``__call__`` does, for the first calls only.

The pipeline itself runs each generation (its text encoding, added conditioning, scheduler stepping
and guidance), so the first tau calls see the inputs a full generation would, whatever the family
(SD 1.x and 2.x, SDXL, PixArt, ...). ``output_type="latent"`` skips the VAE. To stop after call
tau - 1, a step-end callback interrupts the pipeline (diffusers' documented way to stop early).
Pipelines without ``callback_on_step_end`` (PixArt) run to the end, but a hook answers every
denoiser call after tau - 1 with zeros instead of running the denoiser: what remains is a few cheap
scheduler steps.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
from collections.abc import Callable, Iterator

import torch
from diffusers.hooks import HookRegistry, ModelHook

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


SKIP_HOOK = "memcore_skip_after"
TRUNCATED = "The following part of your input was truncated"

logger = logging.getLogger("memcore")


class _TruncationCounter(logging.Filter):
    """Drops the pipeline's truncation warning (one per batch with a long prompt) and counts it."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(TRUNCATED):
            self.batches += 1
            return False
        return True


@contextlib.contextmanager
def truncation_reported_once(pipe) -> Iterator[None]:
    """Within the block, the pipeline's per-batch warning about prompts longer than its text
    encoder's limit (CLIP: 77 tokens) becomes one line at the end. Truncating is what the pipeline
    does and what the method expects (docs/method.md section 2); the warning only repeats it."""
    source = logging.getLogger(type(pipe).__module__)
    counter = _TruncationCounter()
    source.addFilter(counter)
    try:
        yield
    finally:
        source.removeFilter(counter)
        if counter.batches:
            logger.warning(
                "memcore: prompts longer than the text encoder's limit were truncated, as the pipeline does "
                "(%d batch%s)", counter.batches, "" if counter.batches == 1 else "es",
            )


class SkipAfterHook(ModelHook):
    """Runs the first ``num_calls`` calls of the denoiser; answers later ones with zeros."""

    def __init__(self, num_calls: int, on_call: Callable[[], None] | None):
        super().__init__()
        self.num_calls, self.on_call, self.calls = num_calls, on_call, 0

    def new_forward(self, module, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.num_calls:
            if self.on_call is not None:
                self.on_call()
            return self.fn_ref.original_forward(*args, **kwargs)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        sample = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        # the model's output channels (PixArt: twice the latent's, for its learned variance)
        channels = getattr(module, "out_channels", None) or module.config.get("out_channels") or sample.shape[1]
        zeros = sample.new_zeros(sample.shape[0], channels, *sample.shape[2:])
        return Transformer2DModelOutput(sample=zeros) if kwargs.get("return_dict", True) else (zeros,)


def call_arguments(pipe, prompts: list[str], latent: torch.Tensor, generation: Generation) -> dict:
    """Arguments of the pipeline's ``__call__`` generating ``prompts`` from the shared x_T ``latent``.

    Some pipelines (PixArt) need settings to run at exactly the requested size, quietly: no snapping
    of the size to aspect-ratio bins (the latent is drawn at the requested size), and no caption
    cleaning when its optional libraries are missing (the pipeline falls back to that anyway, with a
    warning per call).
    """
    params = inspect.signature(pipe.__call__).parameters
    arguments = dict(
        prompt=prompts,
        num_inference_steps=generation.steps,
        guidance_scale=generation.guidance,
        height=generation.height,
        width=generation.width,
        latents=latent.repeat(len(prompts), 1, 1, 1),
    )
    if "use_resolution_binning" in params:
        arguments["use_resolution_binning"] = False
    if "clean_caption" in params and not all(importlib.util.find_spec(m) for m in ("bs4", "ftfy")):
        arguments["clean_caption"] = False
    return arguments


def run_first_calls(
    pipe,
    prompts: list[str],
    latent: torch.Tensor,
    generation: Generation,
    num_calls: int,
    on_call: Callable[[], None] | None = None,
) -> None:
    """Generate for ``prompts`` from the shared latent, stopping after ``num_calls`` denoiser calls."""
    kwargs = call_arguments(pipe, prompts, latent, generation) | {"output_type": "latent"}
    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:

        def stop_after(pipeline, step, timestep, callback_kwargs):
            if on_call is not None:
                on_call()
            if step + 1 >= num_calls:
                pipeline._interrupt = True
            return callback_kwargs

        pipe(**kwargs, callback_on_step_end=stop_after)
        return
    registry = HookRegistry.check_if_exists_or_initialize(denoiser(pipe))
    registry.register_hook(SkipAfterHook(num_calls, on_call), SKIP_HOOK)
    try:
        pipe(**kwargs)
    finally:
        registry.remove_hook(SKIP_HOOK, recurse=False)
