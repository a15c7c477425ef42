"""The compiled extension ``memcore._C``, loaded once, lazily.

A missing or broken extension is not an error: it is logged once and the pure-PyTorch reference
serves instead. ``memcore env`` reports what loaded.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

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
