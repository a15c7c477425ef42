"""The whole method in one call: statistics, then the mask."""

from __future__ import annotations

from memcore.config import LocalizeConfig
from memcore.mask import Mask, compute_mask
from memcore.stats import Statistics, collect_stats


def localize(pipe, prompts: list[str], config: LocalizeConfig | None = None) -> tuple[Mask, Statistics]:
    """Find the memorized neurons of ``pipe`` for ``prompts`` (SPEC sections 2 and 3).

    Returns the mask and the statistics it was computed from (save them to recompute masks for
    other sparsities or tau without running the model again).
    """
    config = config or LocalizeConfig()
    stats = collect_stats(pipe, prompts, config)
    mask = compute_mask(pipe, stats, sparsity=config.sparsity, timesteps=config.timesteps, per_step=config.per_step)
    return mask, stats
