"""The one place that decides which implementation of an op runs.

Backends, fastest first for each device type:

- ``cuda``: CUDA kernels from the compiled extension (CUDA tensors);
- ``triton``: Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``);
- ``cpu``: C++/OpenMP kernels from the compiled extension (CPU tensors);
- ``reference``: pure PyTorch, any device, the definition of correct.

Each op registers its implementations once (:func:`register`); :func:`dispatch` picks the first one
available for the tensors' device, unless a backend is forced with ``MEMCORE_BACKEND=<name>`` or
``with memcore.ops.use_backend("<name>"):`` (the context manager wins over the variable).
:func:`available_backends`, :func:`chosen_backend` and :func:`report` answer from the same table, for
``memcore env``, the capture, the tests and the benchmarks.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping

import torch

from memcore.errors import MemcoreError

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "MEMCORE_BACKEND"

_PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("memcore_backend", default=None)


def _check_name(name: str, origin: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{origin}: unknown memcore backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every memcore op inside the block to run on backend ``name`` (``None``: automatic)."""
    if name is not None:
        _check_name(name, "use_backend")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``MEMCORE_BACKEND``, if any."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in BACKENDS:
        raise MemcoreError(f"{ENV_VAR}={env}: unknown memcore backend; choose one of auto, {', '.join(BACKENDS)}")
    return env


Impl = Callable[..., object]


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> bool:
    """Whether Triton kernels can run on ``device``: CUDA, or the CPU under ``TRITON_INTERPRET=1``.

    Only looks for the package; triton itself is imported by the first kernel launch.
    """
    if not _triton_installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "") == "1"


def select(op: str, device: torch.device, available: Mapping[str, Impl]) -> tuple[str, Impl]:
    """Pick the implementation of ``op`` for tensors on ``device``.

    ``available`` maps backend names to callables, holding only the backends that loaded and can
    run on ``device``.
    """
    forced = forced_backend()
    if forced is not None:
        if forced not in available:
            raise MemcoreError(
                f"memcore backend {forced!r} was forced but cannot run {op} on {device.type} tensors "
                f"(available here: {', '.join(available) or 'none'})"
            )
        return forced, available[forced]
    for name in _PREFERENCE.get(device.type, ("reference",)):
        if name in available:
            return name, available[name]
    return "reference", available["reference"]


# --- the backend table ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
    reference: Impl
    triton: Impl | None
    native: Impl | None  # the compiled extension's kernels: ``cpu`` on CPU tensors, ``cuda`` on CUDA ones
    native_op: str  # whose kernels in the extension decide whether ``native`` can run


_TABLE: dict[str, _Entry] = {}


def register(
    op: str, *, reference: Impl, triton: Impl | None = None, native: Impl | None = None, native_op: str | None = None
) -> None:
    """Declare the implementations of ``op`` (once, where the op is defined). ``native`` runs where
    the extension has kernels of ``native_op`` (default ``op``) for the device."""
    _TABLE[op] = _Entry(reference, triton, native, native_op or op)


def _entry(op: str) -> _Entry:
    if op not in _TABLE:
        raise ValueError(f"unknown memcore op {op!r}; registered: {', '.join(sorted(_TABLE))}")
    return _TABLE[op]


def implementations(op: str, device: torch.device) -> dict[str, Impl]:
    """The implementations of ``op`` that loaded and can run on ``device``, by backend name."""
    from memcore.ops._ext import native_backend

    entry = _entry(op)
    impls: dict[str, Impl] = {"reference": entry.reference}
    if entry.triton is not None and triton_usable(device):
        impls["triton"] = entry.triton
    native = native_backend(entry.native_op, device) if entry.native is not None else None
    if native is not None:
        impls[native] = entry.native
    return impls


def dispatch(op: str, device: torch.device) -> tuple[str, Impl]:
    """The backend and implementation ``op`` runs for tensors on ``device`` (see :func:`select`)."""
    return select(op, device, implementations(op, device))


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """The backends that can run ``op`` on ``device`` here, in the order of :data:`BACKENDS`."""
    names = implementations(op, torch.device(device))
    return [name for name in BACKENDS if name in names]


def chosen_backend(op: str, device: torch.device | str) -> str:
    """The backend ``op`` runs on for tensors on ``device``, forcing included."""
    return dispatch(op, torch.device(device))[0]


def registered_ops() -> list[str]:
    return sorted(_TABLE)


def report(device: torch.device | str) -> dict[str, dict]:
    """For every registered op: the backends available on ``device`` and the one chosen (or the
    reason none can be, when a forced backend cannot run it)."""
    out = {}
    for op in registered_ops():
        row: dict = {"available": available_backends(op, device)}
        try:
            row["chosen"] = chosen_backend(op, device)
        except MemcoreError as exc:
            row["chosen"], row["error"] = None, str(exc)
        out[op] = row
    return out
