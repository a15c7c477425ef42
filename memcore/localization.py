"""The whole method in one call: statistics, then the mask; for one prompt set or for several subsets."""

from __future__ import annotations

from memcore.config import LocalizeConfig
from memcore.mask import Mask, compute_mask
from memcore.stats import Statistics, collect_stats, collect_subset_stats


def localize(pipe, prompts: list[str], config: LocalizeConfig | None = None) -> tuple[Mask, Statistics]:
    """Find the memorized neurons of ``pipe`` for ``prompts`` (docs/method.md sections 2 and 3).

    Returns the mask and the statistics it was computed from (save them to recompute masks for
    other sparsities or tau without running the model again).
    """
    config = config or LocalizeConfig()
    stats = collect_stats(pipe, prompts, config)
    return _mask(pipe, stats, config), stats


def localize_subsets(
    pipe, subsets: dict[str, list[str]], config: LocalizeConfig | None = None
) -> dict[str, tuple[Mask, Statistics]]:
    """One mask per prompt subset, from one run that shares the empty prompt and batches across subsets.

    Returns ``{subset name: (mask, statistics)}`` in the order of ``subsets``; each mask's metadata
    names its subset.
    """
    config = config or LocalizeConfig()
    return {name: (_mask(pipe, stats, config), stats) for name, stats in collect_subset_stats(pipe, subsets, config).items()}


def _mask(pipe, stats: Statistics, config: LocalizeConfig) -> Mask:
    # The statistics were collected from this pipeline's weights in this call, and their hash was taken
    # then: force=True skips hashing every target weight again for each mask (0.2 s per subset at SD
    # 1.5 size on the CPU). Layer names and shapes are still checked.
    return compute_mask(
        pipe, stats, sparsity=config.sparsity, timesteps=config.timesteps, per_step=config.per_step, force=True
    )
