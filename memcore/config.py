"""Settings of a localization run, and their resolution against a pipeline's own defaults.

The numbers a caller gives enter here and are checked here, in two stages. Without a pipeline
(:class:`LocalizeConfig`, and :func:`memcore.generate.check_generate_arguments` before a model is
loaded): integers where integers are meant, a finite guidance scale, a seed in [0, 2**64), steps
in [1, :data:`MAX_STEPS`], sides that are multiples of 8 in [8, :data:`MAX_IMAGE_SIDE`]. With the
pipeline (:func:`resolve_generation`, before anything is allocated): the sizes the model accepts,
the steps its scheduler accepts, and the memory of the largest tensor against what the device has.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from dataclasses import asdict, dataclass

import torch

from memcore.errors import MemcoreError, Param

ROWS = ("both", "cond")
SEED_LIMIT = 2**64  # torch.manual_seed accepts 0 .. 2**64 - 1
# Longest image side in pixels accepted before a model is loaded: 16 times the 1024 px native size
# of the largest supported models (SDXL, SD3). A larger side is a typo, not a request, and is refused
# in a second rather than after a load of minutes; below it, resolve_generation checks the model's
# own limits and the memory the size needs.
MAX_IMAGE_SIDE = 16384
# Most inference steps: 10 times the 1000 training timesteps of every supported model's scheduler.
# DDPM-style schedulers accept at most 1000 (checked with the pipeline); flow-matching ones accept
# any count and build arrays of that length, so a typo such as 10**9 would exhaust memory.
MAX_STEPS = 10_000


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
        compile: run the denoiser as one ``torch.compile`` graph per batch shape (``fullgraph``, the
            capture hooks and the fused ops inside); the pipeline is left as it was.
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
    compile: bool = False

    def __post_init__(self) -> None:
        from memcore.targets import check_family

        check_family(self.target)
        check_sparsity(self.sparsity)
        check_timesteps(self.timesteps)
        if self.rows not in ROWS:
            raise MemcoreError(f"must be one of {', '.join(ROWS)}, got {self.rows!r}", param="rows")
        check_batch_size(self.batch_size)
        check_image_settings(self.steps, self.height, self.width)
        check_guidance(self.guidance)
        check_seed(self.seed)


def check_sparsity(sparsity: float) -> float:
    if not 0 < sparsity <= 1:
        raise MemcoreError(f"must be in (0, 1], got {sparsity}", param="sparsity")
    return sparsity


def check_timesteps(timesteps: int) -> int:
    _integer(timesteps, "timesteps")
    if timesteps < 1:
        raise MemcoreError(f"must be at least 1, got {timesteps}", param="timesteps")
    return timesteps


def check_batch_size(batch_size: int) -> int:
    _integer(batch_size, "batch_size")
    if batch_size < 1:
        raise MemcoreError(f"must be at least 1, got {batch_size}", param="batch_size")
    return batch_size


def _integer(value, param: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MemcoreError(f"must be an integer, got {value!r}", param=param)


def check_image_settings(steps: int | None, height: int | None, width: int | None) -> None:
    """Inference steps and image size, where given (``None`` is the pipeline's default), before a
    pipeline is known: what :func:`resolve_generation` then checks against the model needs these."""
    if steps is not None:
        _integer(steps, "steps")
        if steps < 1:
            raise MemcoreError(f"must be at least 1, got {steps}", param="steps")
        if steps > MAX_STEPS:
            raise MemcoreError(f"must be at most {MAX_STEPS}, got {steps}", param="steps")
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        _integer(value, name)
        if value < 8 or value % 8:
            raise MemcoreError(f"must be a positive multiple of 8, got {value}", param=name)
        if value > MAX_IMAGE_SIDE:
            raise MemcoreError(f"must be at most {MAX_IMAGE_SIDE} pixels, got {value}", param=name)


def check_guidance(guidance: float | None) -> float | None:
    """A finite guidance scale, or ``None`` for the pipeline's default (inf and nan give NaN latents)."""
    if guidance is None:
        return None
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
        raise MemcoreError(f"must be a number, got {guidance!r}", param="guidance")
    if not math.isfinite(guidance):
        raise MemcoreError(f"must be a finite number, got {guidance}", param="guidance")
    return guidance


def check_seed(seed: int, param: str = "seed") -> int:
    """A seed ``torch.manual_seed`` takes as it is: an int in [0, 2**64) (it would wrap a negative one)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MemcoreError(f"{seed!r} is not an integer", param=param)
    if not 0 <= seed < SEED_LIMIT:
        raise MemcoreError(f"{seed} is out of range (0 .. 2**64 - 1)", param=param)
    return seed


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


def check_calls(generation: Generation, timesteps: int) -> int:
    """``timesteps`` (tau) once it is known to fit within the denoiser calls of ``generation``."""
    total_calls = len(generation.call_timesteps)
    if timesteps > total_calls:
        raise MemcoreError(
            f"{timesteps} is more than the {total_calls} denoiser calls of {generation.steps} steps", param="timesteps"
        )
    return timesteps


def resolve_generation(pipe, config: LocalizeConfig, *, images: int = 1, decode: bool = False) -> Generation:
    """Fill the config's ``None`` settings from the pipeline's ``__call__`` defaults and configs.

    Checks, before anything of that size is allocated, that the model accepts the image size
    (:func:`check_image_size`), that its scheduler accepts the steps, and that the largest tensor
    of a generation of ``images`` images at a time (decoded to pixels with ``decode``) fits in the
    memory of the pipeline's device (:func:`check_memory`).
    """
    from memcore.models import denoiser

    defaults = inspect.signature(pipe.__call__).parameters

    def default(name: str, fallback):
        param = defaults.get(name)
        return fallback if param is None or param.default is inspect.Parameter.empty else param.default

    sample = denoiser(pipe).config.sample_size
    sample_h, sample_w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    height = config.height or sample_h * pipe.vae_scale_factor
    width = config.width or sample_w * pipe.vae_scale_factor
    check_image_size(pipe, height, width)
    steps = config.steps if config.steps is not None else default("num_inference_steps", 50)
    generation = Generation(
        steps=steps,
        guidance=float(config.guidance if config.guidance is not None else default("guidance_scale", 7.5)),
        seed=config.seed,
        height=height,
        width=width,
        scheduler=type(pipe.scheduler).__name__,
        call_timesteps=_call_timesteps(pipe, steps),
    )
    check_memory(pipe, generation, images=images, decode=decode)
    return generation


def _call_timesteps(pipe, steps: int) -> list[int | float]:
    """The timestep of every denoiser call of ``steps`` steps, once the scheduler accepts ``steps``.

    A DDPM-style scheduler (integer timesteps) has as many distinct noise levels as training
    timesteps: some refuse more steps (DDIM), others quietly repeat timestep 1 (PNDM, Euler with
    leading spacing); both are refused here. Flow-matching schedulers interpolate and take any count.
    """
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    name = type(scheduler).__name__
    trained = scheduler.config.get("num_train_timesteps")

    def too_many() -> MemcoreError:
        return MemcoreError(
            f"must be at most {trained} with {name}, the number of timesteps the model was trained on; got {steps}",
            param="steps",
        )

    try:
        scheduler.set_timesteps(steps, device="cpu")
    except ValueError as exc:
        if trained and steps > trained:
            raise too_many() from None
        lines = str(exc).strip().splitlines()
        raise MemcoreError(f"{name} refuses {steps}: {lines[0] if lines else type(exc).__name__}", param="steps") from None
    timesteps = [_number(t) for t in torch.as_tensor(scheduler.timesteps).tolist()]
    if trained and steps > trained and all(isinstance(t, int) for t in timesteps):
        raise too_many()
    return timesteps


def _patch_size(net) -> int:
    return int(getattr(net.config, "patch_size", None) or 1)


def check_image_size(pipe, height: int, width: int) -> None:
    """The image size the pipeline's model accepts: a multiple of the VAE's scale factor times the
    patch size of a DiT, and for a DiT with a cropped position embedding (SD3) at most that many
    patches a side."""
    from memcore.models import denoiser

    net = denoiser(pipe)
    patch = _patch_size(net)
    step = pipe.vae_scale_factor * patch
    why = f"VAE scale {pipe.vae_scale_factor} x patch size {patch}" if patch > 1 else f"VAE scale {pipe.vae_scale_factor}"
    most = getattr(net.config, "pos_embed_max_size", None)
    for name, value in (("height", height), ("width", width)):
        if value % step:
            raise MemcoreError(f"must be a multiple of {step} for this model ({why}), got {value}", param=name)
        if most and value > most * step:
            raise MemcoreError(
                f"must be at most {most * step} for this model (its position embedding covers {most} patches "
                f"of {step} pixels a side), got {value}",
                param=name,
            )


def largest_tensor(pipe, generation: Generation, images: int = 1, decode: bool = False) -> tuple[int, str]:
    """(bytes, what) of the largest tensor a generation certainly allocates: a lower bound of its memory.

    Counted: the denoiser's input latents and its first activation at full latent resolution (a
    UNet's ``conv_in`` output, ``block_out_channels[0]`` channels; a DiT's patch tokens, heads x head
    dimension wide), for ``images`` images, twice with classifier-free guidance; with ``decode``, the
    VAE decoder's last feature map at full image size (``block_out_channels[0]`` channels; one image
    at a time with VAE slicing, tiles instead with VAE tiling: then only the RGB image). Attention
    score matrices are not counted: PyTorch's fused attention does not materialize them.
    """
    from memcore.driver import is_guided
    from memcore.models import denoiser

    net = denoiser(pipe)
    config = net.config
    rows = images * (2 if is_guided(pipe, generation) else 1)
    latent_h, latent_w = generation.height // pipe.vae_scale_factor, generation.width // pipe.vae_scale_factor
    item = net.dtype.itemsize
    found = [(rows * config.in_channels * latent_h * latent_w * item, "the denoiser's input latents")]
    channels = getattr(config, "block_out_channels", None)
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "attention_head_dim", None)
    if channels:
        found.append((rows * channels[0] * latent_h * latent_w * item, "the denoiser's first feature map"))
    elif isinstance(heads, int) and isinstance(head_dim, int):
        patch = _patch_size(net)
        tokens = (latent_h // patch) * (latent_w // patch)
        found.append((rows * tokens * heads * head_dim * item, "the denoiser's patch tokens"))
    vae = getattr(pipe, "vae", None)
    if decode and vae is not None:
        decoded = 1 if getattr(vae, "use_slicing", False) else images
        vae_channels = 3 if getattr(vae, "use_tiling", False) else vae.config.block_out_channels[0]
        size = decoded * vae_channels * generation.height * generation.width * vae.dtype.itemsize
        found.append((size, "the VAE decoder's last feature map"))
    return max(found, key=lambda item: item[0])  # the first listed on a tie


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``, ``None`` where unknown.

    CUDA: free device memory plus what PyTorch's caching allocator holds unused. CPU: MemAvailable
    of /proc/meminfo (free memory and the caches the kernel can drop), else the free pages
    (``SC_AVPHYS_PAGES``). Container limits (cgroups) are not read.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _size(size: int) -> str:
    unit, scale = next(((u, 2**p) for u, p in (("GiB", 30), ("MiB", 20), ("KiB", 10)) if size >= 2**p), ("bytes", 1))
    return f"{size / scale:.1f} {unit}" if scale > 1 else f"{size} bytes"


def check_memory(pipe, generation: Generation, images: int = 1, decode: bool = False) -> None:
    """Refuses a size whose largest tensor (:func:`largest_tensor`) cannot fit in the memory the
    pipeline's device has available now. A lower bound: a size that passes may still not fit."""
    device = pipe._execution_device
    available = available_memory(device)
    if available is None:
        return
    size, what = largest_tensor(pipe, generation, images, decode)
    if size <= available:
        return
    fields = {"height": Param("height", generation.height), "width": Param("width", generation.width)}
    advice = "lower them"
    if images > 1:
        fields["batch_size"], advice = Param("batch_size"), "lower them or {batch_size}"
    raise MemcoreError(
        "{height} and {width} need at least {need} for one tensor ({what}, {images}), more than the "
        "{available} available on {device}; " + advice,
        **fields, need=_size(size), what=what, images=f"{images} image{'s' if images > 1 else ''}",
        available=_size(available), device=device,
    )


def _number(value: float) -> int | float:
    """A scheduler timestep as recorded: an int when integral (DDPM-style), else the float (flow matching)."""
    return int(value) if float(value).is_integer() else float(value)
