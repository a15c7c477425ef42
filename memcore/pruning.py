"""Deleting the memorized neurons: W[mask] = 0 in place (docs/method.md section 4)."""

from __future__ import annotations

import torch

from memcore.mask import Mask, check_same_weights


def prune(model, mask: Mask, force: bool = False) -> int:
    """Zero the masked weights of ``model`` in place.

    ``model`` is a pipeline, or its denoiser for masks of denoiser layers (every family but
    ``text-mlp``).

    Biases and every other parameter are left untouched. A mask for other layers is refused; a
    mask made from other weights of the same shapes is refused unless ``force``.

    Returns:
        the number of weights set to zero.
    """
    from memcore.targets import find_recorded_targets

    targets = find_recorded_targets(model, mask.metadata, "the mask")
    check_same_weights(targets, mask.metadata, "the mask", force, model=model)
    zeroed = 0
    with torch.no_grad():
        for target in targets:
            selected = mask.unpack(target.name).to(target.linear.weight.device)
            target.linear.weight.masked_fill_(selected, 0)
            zeroed += int(selected.sum())
    return zeroed
