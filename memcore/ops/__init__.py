"""memcore's fused ops, importable by any pruning code.

Each op has a pure-PyTorch reference (the definition of correct) and native backends, registered
once in :mod:`memcore.ops._backend`'s table: :func:`available_backends` and :func:`chosen_backend`
answer for one op and device, :func:`backend_report` for all; force one with ``MEMCORE_BACKEND`` or
:func:`use_backend`.
"""

from memcore.ops._backend import BACKENDS, available_backends, chosen_backend, forced_backend, use_backend
from memcore.ops._backend import report as backend_report
from memcore.ops.geglu_accumulate import geglu_accumulate, geglu_accumulate_backend, geglu_accumulate_reference
from memcore.ops.prune_mask import prune_mask
from memcore.ops.sqnorm_accumulate import sqnorm_accumulate, sqnorm_accumulate_reference
from memcore.ops.wanda_mask import pack_mask, unpack_mask, wanda_mask, wanda_mask_grouped, wanda_mask_reference

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_report",
    "chosen_backend",
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
    "wanda_mask_grouped",
    "wanda_mask_reference",
]
