"""memcore's fused ops, importable by any pruning code.

Each op has a pure-PyTorch reference (the definition of correct) and native backends chosen by
:mod:`memcore.ops._backend`; force one with ``MEMCORE_BACKEND`` or :func:`use_backend`.
"""

from memcore.ops._backend import BACKENDS, forced_backend, use_backend
from memcore.ops.geglu_accumulate import geglu_accumulate, geglu_accumulate_backend, geglu_accumulate_reference
from memcore.ops.prune_mask import prune_mask
from memcore.ops.sqnorm_accumulate import sqnorm_accumulate, sqnorm_accumulate_reference
from memcore.ops.wanda_mask import pack_mask, unpack_mask, wanda_mask, wanda_mask_reference

__all__ = [
    "BACKENDS",
    "forced_backend",
    "geglu_accumulate",
    "geglu_accumulate_backend",
    "geglu_accumulate_reference",
    "pack_mask",
    "prune_mask",
    "sqnorm_accumulate",
    "sqnorm_accumulate_reference",
    "unpack_mask",
    "use_backend",
    "wanda_mask",
    "wanda_mask_reference",
]
