"""Inference-time mitigation of memorization: Wen et al.'s optimized prompt embedding.

Wen, Liu, Chen and Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models",
ICLR 2024 (https://openreview.net/forum?id=84n3UwkH7b; code
https://github.com/YuxinWenRick/diffusion_memorization), section 4: the detection score of
:mod:`memcore.detection` at the first denoising step,

    L(e) = || eps(x_T, e) - eps(x_T, e_empty) ||_2,

is differentiable in the prompt embedding ``e`` (the text encoder's output). Before sampling, ``e``
is optimized by gradient descent until ``L(e)`` falls to a target loss or a step cap is reached; the
image is then generated from ``e`` instead of the prompt's own embedding. Their code
(``local_sd_pipeline.py``, ``LocalStableDiffusionPipeline.aug_prompt``; called from
``inference_mem.py``, ``main``) does, at denoising step 0 (``--optim_target_steps 0``):

- the loss is ``torch.norm(noise_pred_text - noise_pred_uncond, p=2)`` of the guided batch
  [empty, prompt] of the first denoiser call, the unconditional half fixed;
- ``torch.optim.AdamW`` over the conditional embedding (PyTorch's defaults: betas (0.9, 0.999),
  eps 1e-8, weight decay 0.01), learning rate ``--optim_lr`` **0.05** (inference_mem.py's default);
- at most ``--optim_iters`` **10** steps (its default), stopping before a step once the loss is
  at most ``--optim_target_loss``, **3** in the README's command for their method ("Ours");
- the gradient of the first token's embedding (the start token) is zeroed at every step.

memcore does the same, with these differences, all recorded in the manifest:

- one embedding per (prompt, seed), the loss on that image alone: memcore's images of a seed share
  its x_T (:mod:`memcore.generate`). Wen et al. optimize one embedding per prompt over its 4 images
  (``--num_images_per_prompt 4``), their loss the norm over all 4 at once, about twice one image's:
  the target 3 is thus looser per image here than there;
- the embedding being optimized is kept in float32 and cast to the model's dtype for each call
  (their run optimizes a bfloat16 tensor directly; in float16, Adam's eps underflows);
- the loss of the returned embedding is always computed and recorded (the ``loss`` field), which
  costs one more denoiser call when the cap is reached (they stop without evaluating it); the
  embedding returned is the one their loop returns.

The first call's inputs (latent scaled by the scheduler, timestep, text embeddings) are captured from
the pipeline's own ``__call__`` (a hook stops it at the first denoiser call), so the loss is the
score :func:`memcore.detection.detection_scores` gives at ``timesteps=1`` for the same prompt, seed
and settings. The denoiser's weights are not changed and get no gradient (``requires_grad`` is off
during the optimization and restored after).

Supported: pipelines conditioned by one sequence of text-token embeddings, passed to ``__call__`` as
``prompt_embeds`` / ``negative_prompt_embeds`` (SD 1.x and 2.x). SDXL and SD3 are refused (their
denoiser is also conditioned on a pooled text embedding that ``prompt_embeds`` does not carry), and
so is PixArt (its T5 embeddings come with an attention mask; Wen et al. define the method for SD only).
"""

from __future__ import annotations

import inspect
import math
import numbers
import time
from dataclasses import dataclass, field

import torch

from memcore.errors import MemcoreError

# The published settings (see the module docstring for the source of each).
WEN_LR = 0.05
WEN_TARGET_LOSS = 3.0
WEN_MAX_STEPS = 10
MAX_STEPS_LIMIT = 10_000
CAPTURE_HOOK = "memcore_wen_capture"
MITIGATIONS = ("none", "wen")

# Models known before loading whose conditioning does not fit (see the module docstring).
UNSUPPORTED_MODELS = {
    "tiny-sdxl": "SDXL", "sdxl": "SDXL", "tiny-sd3": "SD3", "sd3": "SD3", "tiny-pixart": "PixArt", "pixart": "PixArt",
}


@dataclass(frozen=True)
class WenSettings:
    """Settings of the optimization; the defaults are Wen et al.'s (module docstring).

    Attributes:
        lr: AdamW learning rate (> 0).
        target_loss: stop once the loss is at most this (>= 0).
        max_steps: at most this many optimizer steps (>= 1).
    """

    lr: float = WEN_LR
    target_loss: float = WEN_TARGET_LOSS
    max_steps: int = WEN_MAX_STEPS

    def __post_init__(self) -> None:
        for name, value, low_open in (("lr", self.lr, True), ("target_loss", self.target_loss, False)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise MemcoreError(f"must be a finite number, got {value!r}", param=f"wen_{name}")
            if value < 0 or (low_open and value == 0):
                raise MemcoreError(f"must be {'> 0' if low_open else '>= 0'}, got {value}", param=f"wen_{name}")
        steps = self.max_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS_LIMIT:
            raise MemcoreError(f"must be an integer in [1, {MAX_STEPS_LIMIT}], got {steps!r}", param="wen_max_steps")

    def as_dict(self) -> dict:
        return {
            "method": "wen",
            "lr": float(self.lr),
            "target_loss": float(self.target_loss),
            "max_steps": self.max_steps,
            "optimizer": "AdamW (betas 0.9, 0.999; eps 1e-8; weight decay 0.01)",
            "denoiser_call": 0,
            "frozen_tokens": [0],
        }


@dataclass
class WenEmbeds:
    """What :func:`wen_prompt_embeds` returns for N prompts.

    Attributes:
        prompt_embeds: [N, tokens, dim], the optimized embeddings, in the model's dtype.
        negative_prompt_embeds: [N, tokens, dim], the pipeline's own embeddings of the empty prompt.
        losses: per prompt, the loss before each optimizer step and of the returned embedding (last).
        seconds: per prompt, wall-clock seconds of its optimization.
        capture_seconds: the run of the pipeline up to its first denoiser call (text encoding).
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    losses: list[list[float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    capture_seconds: float = 0.0

    @property
    def steps(self) -> list[int]:
        return [len(loss) - 1 for loss in self.losses]


def check_model_name(model: str) -> None:
    """Refuse, before loading, a model known to be of a family the method does not fit."""
    if model in UNSUPPORTED_MODELS:
        raise MemcoreError(_unsupported(UNSUPPORTED_MODELS[model]), param="mitigation", value="wen")


def _unsupported(family: str) -> str:
    why = (
        "its T5 embeddings come with an attention mask"
        if family == "PixArt"
        else "its denoiser is also conditioned on a pooled text embedding"
    )
    return f"supports SD 1.x and 2.x only, not {family} ({why})"


def check_supported(pipe) -> None:
    """One line unless the pipeline takes one sequence of text embeddings as ``prompt_embeds``."""
    params = inspect.signature(pipe.__call__).parameters
    name = type(pipe).__name__
    if "pooled_prompt_embeds" in params:
        raise MemcoreError(_unsupported("SD3" if "3" in name else "SDXL") + f" ({name})", param="mitigation", value="wen")
    if "prompt_attention_mask" in params:
        raise MemcoreError(_unsupported("PixArt") + f" ({name})", param="mitigation", value="wen")
    if not {"prompt_embeds", "negative_prompt_embeds"} <= set(params) or not hasattr(pipe, "unet"):
        raise MemcoreError(f"supports SD 1.x and 2.x only, not {name}", param="mitigation", value="wen")


class _Captured(Exception):
    pass


def _first_call_inputs(pipe, prompts, latent, generation) -> tuple[tuple, dict]:
    from diffusers.hooks import HookRegistry, ModelHook

    from memcore.driver import call_arguments
    from memcore.models import denoiser

    class CaptureFirstCall(ModelHook):
        """Records the arguments of the denoiser's first call and stops the pipeline there."""

        def new_forward(self, module, *args, **kwargs):
            self.args, self.kwargs = args, kwargs
            raise _Captured

    hook = CaptureFirstCall()
    registry = HookRegistry.check_if_exists_or_initialize(denoiser(pipe))
    registry.register_hook(hook, CAPTURE_HOOK)
    try:
        pipe(**call_arguments(pipe, prompts, latent, generation), output_type="latent")
    except _Captured:
        pass
    finally:
        registry.remove_hook(CAPTURE_HOOK, recurse=False)
    if not hasattr(hook, "kwargs"):
        raise MemcoreError("mitigation wen: the pipeline made no denoiser call")
    return hook.args, hook.kwargs


def _rows(value, rows: list[int], batch: int):
    """``value`` restricted to ``rows`` where it is a tensor batched like the guided batch."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, dict):
        return {k: _rows(v, rows, batch) for k, v in value.items()}
    return value


def conditional_norm(output, noise_channels: int) -> torch.Tensor:
    """||cond - uncond||_2 per image of a guided denoiser output [uncond..., cond...] (float32), the
    formula of :class:`memcore.detection.TextConditionalNormHook`."""
    sample = output[0] if isinstance(output, tuple) else output.sample
    uncond, cond = sample[:, :noise_channels].float().chunk(2)
    return (cond - uncond).flatten(1).norm(p=2, dim=1)


def wen_prompt_embeds(
    pipe,
    prompts: list[str],
    latent: torch.Tensor,
    generation,
    lr: float = WEN_LR,
    target_loss: float = WEN_TARGET_LOSS,
    max_steps: int = WEN_MAX_STEPS,
) -> WenEmbeds:
    """Optimize the prompt embedding of each of ``prompts`` from x_T ``latent`` (one image, [1, C, h, w]).

    ``generation`` (:class:`memcore.config.Generation`) holds the steps, guidance and size the images
    will be generated with; the guidance must give a guided batch. Each prompt is optimized on its own
    (AdamW, start token frozen; see the module docstring). Pass the result to the pipeline as
    ``prompt_embeds=r.prompt_embeds, negative_prompt_embeds=r.negative_prompt_embeds`` with the same
    latent and settings.
    """
    from memcore.driver import is_guided
    from memcore.models import denoiser

    settings = WenSettings(lr=lr, target_loss=target_loss, max_steps=max_steps)
    check_supported(pipe)
    if not is_guided(pipe, generation):
        raise MemcoreError(
            f"is {generation.guidance:g}; the mitigation needs classifier-free guidance (an unconditional "
            "branch to compare with), e.g. 7.5",
            param="guidance",
        )
    prompts = list(prompts)
    net = denoiser(pipe)
    noise_channels = net.config.in_channels
    started = time.perf_counter()
    args, kwargs = _first_call_inputs(pipe, prompts, latent, generation)
    capture_seconds = time.perf_counter() - started
    n = len(prompts)
    text = kwargs["encoder_hidden_states"]
    if text.shape[0] != 2 * n:
        raise MemcoreError(f"mitigation wen: a denoiser batch of {text.shape[0]} for {n} prompts is not a guided batch")
    negative, positive = text.detach().chunk(2)
    result = WenEmbeds(prompt_embeds=positive.clone(), negative_prompt_embeds=negative.clone(), capture_seconds=capture_seconds)
    flags = [p.requires_grad for p in net.parameters()]
    try:
        for p in net.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            for i in range(n):
                t0 = time.perf_counter()
                rows = [i, n + i]
                call_args = tuple(_rows(a, rows, 2 * n) for a in args)
                call_kwargs = {k: _rows(v, rows, 2 * n) for k, v in kwargs.items() if k != "encoder_hidden_states"}
                embed, losses = _optimize(
                    net, call_args, call_kwargs, negative[i : i + 1], positive[i : i + 1], noise_channels, settings
                )
                result.prompt_embeds[i] = embed[0].to(positive.dtype)
                result.losses.append(losses)
                result.seconds.append(time.perf_counter() - t0)
    finally:
        for p, flag in zip(net.parameters(), flags):
            p.requires_grad_(flag)
    return result


def _optimize(net, args, kwargs, negative, positive, noise_channels: int, settings: WenSettings):
    """AdamW on a float32 copy of ``positive`` [1, tokens, dim]; returns (embedding, losses)."""
    embed = positive.float().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([embed], lr=settings.lr)
    losses: list[float] = []
    for step in range(settings.max_steps + 1):
        hidden = torch.cat([negative, embed.to(positive.dtype)])
        loss = conditional_norm(net(*args, encoder_hidden_states=hidden, **kwargs), noise_channels)[0]
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise MemcoreError(f"mitigation wen: the loss is {losses[-1]} at step {step}; try a smaller --wen-lr")
        if losses[-1] <= settings.target_loss or step == settings.max_steps:
            break
        (grad,) = torch.autograd.grad(loss, [embed])
        grad[:, 0] = 0  # the start token's embedding is not optimized
        embed.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return embed.detach(), losses
