"""The compiled extension ``memcore._C``, loaded once, lazily.

A missing or broken extension is not an error: it is logged once and the pure-PyTorch reference
serves instead. ``memcore env`` reports what loaded.

The CUDA kernels are offered for a device only once they are known to run there: the first time the
``cuda`` backend could serve a device, :func:`cuda_probe_error` launches a trivial kernel on it (once
per device). When that fails (a driver too old for the CUDA the kernels were built with, a GPU
architecture they were not compiled for, ...) one line says why and the ops fall back to Triton, else
to the reference.
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


def _device_index(device: torch.device) -> int | None:
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else None


@functools.cache
def cuda_probe_error(index: int) -> str | None:
    """Why memcore's CUDA kernels cannot run on ``cuda:<index>``, or ``None`` when they can.

    Probed once per device (a trivial kernel, launched and waited for); a failure is logged once.
    """
    ext = extension()
    if ext is None or not ext.compiled_with_cuda():
        return "memcore._C was built without CUDA kernels"
    error = ext.cuda_probe(index) or None
    if error is not None:
        from memcore.ops._backend import triton_usable

        instead = "Triton" if triton_usable(torch.device("cuda", index)) else "the PyTorch reference"
        logger.warning("memcore: CUDA kernels cannot run on cuda:%d, using %s: %s", index, instead, error)
    return error


def cuda_backend_status() -> str:
    """The ``cuda`` backend's state on this machine, in words, for ``memcore env``."""
    ext = extension()
    if ext is None or not ext.compiled_with_cuda():
        return "not compiled"
    built = f"compiled for architectures {ext.cuda_architectures()}"
    if not torch.cuda.is_available():
        return f"{built} (no GPU here)"
    states = []
    for index in range(torch.cuda.device_count()):
        error = cuda_probe_error(index)
        states.append(f"cuda:{index} {'ok' if error is None else 'unusable: ' + error}")
    return f"{built}; probe: {'; '.join(states)}"


def native_backend(op: str, device: torch.device) -> str | None:
    """``cpu`` or ``cuda`` when ``memcore._C`` has kernels of ``op`` for ``device``, else ``None``.

    ``cuda`` also requires the probe of the device to have passed (:func:`cuda_probe_error`).
    """
    ext = extension()
    if ext is None:
        return None
    if device.type == "cpu" and hasattr(ext, f"{op}_cpu"):
        return "cpu"
    if device.type == "cuda" and ext.compiled_with_cuda() and hasattr(ext, f"{op}_cuda"):
        index = _device_index(device)
        if index is not None and cuda_probe_error(index) is None:
            return "cuda"
    return None


def launch(op: str, device: torch.device, *args, workspace: tuple | None = None) -> None:
    """Run ``memcore._C.<op>_cpu(*args)``, or ``<op>_cuda(*args, stream)`` on the current CUDA stream.

    On CUDA, ``workspace`` (the arguments of ``<op>_cuda_workspace`` but the device) asks for a
    scratch buffer: it is allocated with torch's caching allocator on the current stream and its
    pointer and size are passed before the stream. The CPU kernels need none and ignore it.
    """
    ext = extension()
    if device.type == "cuda":
        with torch.cuda.device(device):
            extra: tuple = ()
            scratch = None
            if workspace is not None:
                index = _device_index(device)
                nbytes = getattr(ext, f"{op}_cuda_workspace")(*workspace, index)
                scratch = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
                extra = (scratch.data_ptr(), nbytes)
            getattr(ext, f"{op}_cuda")(*args, *extra, torch.cuda.current_stream(device).cuda_stream)
            # `scratch` is released here; the caching allocator reuses it only for later work on this stream
    else:
        getattr(ext, f"{op}_cpu")(*args)
