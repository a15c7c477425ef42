"""memcore: find and prune the memorized neurons of text-to-image diffusion models.

    import memcore
    pipe = memcore.load_pipeline("sd15")
    mask, stats = memcore.localize(pipe, memcore.load_prompts("memorized.txt"))
    memcore.prune(pipe, mask)

Importing memcore is cheap: diffusers, transformers and triton load only when first needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from memcore._version import __version__
from memcore.errors import MemcoreError

_LAZY = {
    "LocalizeConfig": "memcore.config",
    "Generation": "memcore.config",
    "Statistics": "memcore.stats",
    "collect_stats": "memcore.stats",
    "collect_subset_stats": "memcore.stats",
    "Mask": "memcore.mask",
    "compute_mask": "memcore.mask",
    "load_mask": "memcore.mask",
    "save_mask": "memcore.mask",
    "prune": "memcore.pruning",
    "localize": "memcore.localization",
    "localize_subsets": "memcore.localization",
    "load_prompts": "memcore.prompts",
    "load_subsets": "memcore.prompts",
    "load_pipeline": "memcore.models",
    "analyze": "memcore.analysis",
    "find_targets": "memcore.targets",
    "DetectConfig": "memcore.detection",
    "detection_scores": "memcore.detection",
    "ops": "memcore.ops",
}

__all__ = ["MemcoreError", "__version__", *_LAZY]

if TYPE_CHECKING:
    from memcore import ops
    from memcore.analysis import analyze
    from memcore.config import Generation, LocalizeConfig
    from memcore.detection import DetectConfig, detection_scores
    from memcore.localization import localize, localize_subsets
    from memcore.mask import Mask, compute_mask, load_mask, save_mask
    from memcore.models import load_pipeline
    from memcore.prompts import load_prompts, load_subsets
    from memcore.pruning import prune
    from memcore.stats import Statistics, collect_stats, collect_subset_stats
    from memcore.targets import find_targets


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'memcore' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if name == "ops" else getattr(module, name)
    globals()[name] = value
    return value
