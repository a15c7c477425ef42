"""Settings of a localization run, and their resolution against a pipeline's own defaults."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import torch

from memcore.errors import MemcoreError

ROWS = ("both", "cond")


@dataclass(frozen=True)
class LocalizeConfig:
    """What ``memcore localize`` does. ``None`` means the pipeline's own default.

    Attributes:
        steps: inference steps (default: the pipeline's, 50 for Stable Diffusion).
        guidance: classifier-free guidance scale (default: the pipeline's, 7.5).
        seed: seed of the initial latent shared by every prompt.
        height, width: image size in pixels (default: denoiser sample size x VAE scale factor).
        timesteps: tau, the number of denoiser calls whose statistics are collected and scored.
        sparsity: s, the fraction of each weight row kept per call index (k = floor(s * in)).
        rows: ``both`` halves of the guidance batch or only ``cond``.
        token_norm: L2-normalize each token row before squaring.
        batch_size: prompts per generation.
        per_step: also keep the per-call masks.
        progress: show a progress bar over denoiser calls.
        target: the family of Linear layers to score (see :mod:`memcore.targets`).
        fuse_geglu: compute GEGLU and its statistic in one op (``None``: wherever a native backend
            runs that op; its float32 gelu rounds differently from PyTorch's in the last bit).
    """

    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    timesteps: int = 10
    sparsity: float = 0.01
    rows: str = "both"
    token_norm: bool = True
    batch_size: int = 4
    per_step: bool = False
    progress: bool = True
    target: str = "ffn"
    fuse_geglu: bool | None = None

    def __post_init__(self) -> None:
        from memcore.targets import check_family

        check_family(self.target)
        check_sparsity(self.sparsity)
        check_timesteps(self.timesteps)
        if self.rows not in ROWS:
            raise MemcoreError(f"must be one of {', '.join(ROWS)}, got {self.rows!r}", param="rows")
        check_batch_size(self.batch_size)
        check_image_settings(self.steps, self.height, self.width)


def check_sparsity(sparsity: float) -> float:
    if not 0 < sparsity <= 1:
        raise MemcoreError(f"must be in (0, 1], got {sparsity}", param="sparsity")
    return sparsity


def check_timesteps(timesteps: int) -> int:
    if timesteps < 1:
        raise MemcoreError(f"must be at least 1, got {timesteps}", param="timesteps")
    return timesteps


def check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise MemcoreError(f"must be at least 1, got {batch_size}", param="batch_size")
    return batch_size


def check_image_settings(steps: int | None, height: int | None, width: int | None) -> None:
    """Inference steps and image size, where given (``None`` is the pipeline's default)."""
    if steps is not None and steps < 1:
        raise MemcoreError(f"must be at least 1, got {steps}", param="steps")
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value < 8 or value % 8):
            raise MemcoreError(f"must be a positive multiple of 8, got {value}", param=name)


@dataclass(frozen=True)
class Generation:
    """The generation settings in force, resolved against the pipeline (recorded in every output)."""

    steps: int
    guidance: float
    seed: int
    height: int
    width: int
    scheduler: str
    call_timesteps: list[float]  # the scheduler timestep of every denoiser call (integral ones as int)

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_generation(pipe, config: LocalizeConfig) -> Generation:
    """Fill the config's ``None`` settings from the pipeline's ``__call__`` defaults and configs."""
    from memcore.models import denoiser

    defaults = inspect.signature(pipe.__call__).parameters

    def default(name: str, fallback):
        param = defaults.get(name)
        return fallback if param is None or param.default is inspect.Parameter.empty else param.default

    sample = denoiser(pipe).config.sample_size
    sample_h, sample_w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    steps = config.steps if config.steps is not None else default("num_inference_steps", 50)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device="cpu")
    return Generation(
        steps=steps,
        guidance=float(config.guidance if config.guidance is not None else default("guidance_scale", 7.5)),
        seed=config.seed,
        height=config.height or sample_h * pipe.vae_scale_factor,
        width=config.width or sample_w * pipe.vae_scale_factor,
        scheduler=type(pipe.scheduler).__name__,
        call_timesteps=[_number(t) for t in torch.as_tensor(scheduler.timesteps).tolist()],
    )


def _number(value: float) -> int | float:
    """A scheduler timestep as recorded: an int when integral (DDPM-style), else the float (flow matching)."""
    return int(value) if float(value).is_integer() else float(value)
