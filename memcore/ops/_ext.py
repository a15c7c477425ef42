"""The compiled extension ``memcore._C``, loaded once, lazily.

A missing or broken extension is not an error: it is logged once and the pure-PyTorch reference
serves instead. ``memcore env`` reports what loaded.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch

logger = logging.getLogger("memcore")


@functools.cache
def extension() -> ModuleType | None:
    """Return ``memcore._C``, or ``None`` when it is not built for this interpreter."""
    try:
        from memcore import _C
    except ImportError as exc:
        logger.warning("memcore: native extension not available (%s); using the PyTorch reference ops", exc)
        return None
    return _C


@functools.cache
def extension_error() -> str | None:
    """Why the extension did not load, for ``memcore env``; ``None`` when it did."""
    try:
        from memcore import _C  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def has_cuda_kernels() -> bool:
    ext = extension()
    return ext is not None and bool(ext.compiled_with_cuda())


def native_backend(op: str, device: torch.device) -> str | None:
    """``cpu`` or ``cuda`` when ``memcore._C`` has kernels of ``op`` for ``device``, else ``None``."""
    ext = extension()
    if ext is None:
        return None
    if device.type == "cpu" and hasattr(ext, f"{op}_cpu"):
        return "cpu"
    if device.type == "cuda" and ext.compiled_with_cuda() and hasattr(ext, f"{op}_cuda"):
        return "cuda"
    return None


def launch(op: str, device: torch.device, *args) -> None:
    """Run ``memcore._C.<op>_cpu(*args)``, or ``<op>_cuda(*args, stream)`` on the current CUDA stream."""
    ext = extension()
    if device.type == "cuda":
        with torch.cuda.device(device):
            getattr(ext, f"{op}_cuda")(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        getattr(ext, f"{op}_cpu")(*args)
