"""Loading a diffusers pipeline by alias, hub id or local folder, offline first."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from memcore.errors import MemcoreError, Param
from memcore.tiny import FAMILIES

logger = logging.getLogger("memcore")

TINY = "tiny"
# The embedded random-weight pipelines (see ``memcore.tiny``), one per supported architecture.
TINY_MODELS = tuple(FAMILIES)

ALIASES = {
    "sd14": "CompVis/stable-diffusion-v1-4",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2-base": "stabilityai/stable-diffusion-2-base",
    "sd21-base": "stabilityai/stable-diffusion-2-1-base",
    "sd2": "stabilityai/stable-diffusion-2",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "pixart": "PixArt-alpha/PixArt-XL-2-512x512",
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}.get(name, name)
    if key not in DTYPES:
        raise MemcoreError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}", param="dtype")
    return DTYPES[key]


def resolve_device(device: str | torch.device | None, dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run on: CUDA in float16 when present, else CPU in float32."""
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise MemcoreError("{exc}", param="device", exc=exc) from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise MemcoreError("CUDA is not available on this machine", param="device", value=device)
    resolved = parse_dtype(dtype)
    if resolved is None:
        resolved = torch.float16 if dev.type == "cuda" else torch.float32
    return dev, resolved


def resolve_model_id(model: str) -> str:
    """The hub id for an alias, otherwise ``model`` itself."""
    return ALIASES.get(model, model)


def _load_kwargs(config: dict) -> dict:
    # The safety checker is never used (nothing is decoded to pixels when localizing) and is large.
    if "safety_checker" in config:
        return {"safety_checker": None, "requires_safety_checker": False}
    return {}


def _from_folder(path: Path, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise MemcoreError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    config = DiffusionPipeline.load_config(path)
    try:
        return DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, **_load_kwargs(config))
    except (OSError, ValueError) as exc:
        raise MemcoreError(f"{path}: cannot load the pipeline: {_first_line(exc)}") from None


def _from_hub(model: str, repo_id: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    try:
        config = DiffusionPipeline.load_config(repo_id, local_files_only=True)
        local_only = True
    except (OSError, ValueError):
        config, local_only = None, False
    if not local_only and constants.is_offline_mode():
        raise MemcoreError(
            "{repo_id} is not in the local cache ({cache}) and the hub is offline (HF_HUB_OFFLINE is set); "
            "download it first or pass {path} to a diffusers folder",
            param="model", value=model, repo_id=repo_id, cache=constants.HF_HUB_CACHE, path=Param("model", "PATH"),
        )
    try:
        if config is None:
            logger.info("memcore: %s not in the local cache; downloading from the hub", repo_id)
            config = DiffusionPipeline.load_config(repo_id)
        return DiffusionPipeline.from_pretrained(
            repo_id, dtype=dtype, local_files_only=local_only, **_load_kwargs(config)
        )
    except (OSError, ValueError, ConnectionError) as exc:
        raise MemcoreError(
            "cannot load {repo_id}: not in the local cache ({cache}) and the hub could not be reached ({reason}); "
            "pass {path} to a diffusers folder",
            param="model", value=model, repo_id=repo_id, cache=constants.HF_HUB_CACHE, reason=_first_line(exc),
            path=Param("model", "PATH"),
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_pipeline(model: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
    """Load a diffusers pipeline and move it to ``device`` in ``dtype``.

    ``model`` is one of ``TINY_MODELS`` (``tiny``, ``tiny-sd2``, ``tiny-sdxl``, ``tiny-pixart``, ``tiny-sd3``: the
    embedded random-weight models), an alias (``sd15``, ``sdxl``, ``pixart``, ...), a local
    diffusers folder, or a hub id. The local cache is tried first; the hub is used only when the
    model is not cached and ``HF_HUB_OFFLINE`` is unset.
    """
    dev, dt = resolve_device(device, dtype)
    if model in FAMILIES:
        pipe = FAMILIES[model](dtype=dt)
    else:
        path = Path(model).expanduser()
        repo_id = resolve_model_id(model)
        if path.exists():
            pipe = _from_folder(path, dt)
        elif model.startswith((".", "/", "~")) or repo_id.count("/") != 1:
            raise MemcoreError(
                f"no such folder, and not a known alias ({', '.join(ALIASES)}) or hub id", param="model", value=model
            )
        else:
            pipe = _from_hub(model, repo_id, dt)
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_id(pipe) -> str:
    """The name a pipeline was loaded from (hub id or folder), for provenance."""
    return str(getattr(pipe.config, "_name_or_path", "") or type(pipe).__name__)


def denoiser(pipe) -> torch.nn.Module:
    """The pipeline's denoising network (``unet`` or ``transformer``)."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise MemcoreError(f"{type(pipe).__name__} has no unet or transformer to localize in")
