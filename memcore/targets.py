"""Finding the layers to score: the last Linear of every transformer feed-forward block.

Layers are found by structure (diffusers ``FeedForward`` modules), never from a list of names, and
returned in forward-execution order: a UNet runs its down blocks, then its mid block, then its up
blocks, although ``named_modules()`` lists the mid block last.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from memcore.errors import MemcoreError

_EXECUTION_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


@dataclass(frozen=True)
class Target:
    """One Linear whose input statistics and weights are scored.

    ``geglu`` is the diffusers GEGLU whose output is this Linear's input (through inactive dropout
    only), when there is one: capture can then compute the statistics inside a fused GEGLU.
    """

    name: str
    linear: nn.Linear
    geglu: nn.Module | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.linear.out_features, self.linear.in_features)


def find_targets(denoiser: nn.Module) -> list[Target]:
    """The last Linear of each ``FeedForward`` in ``denoiser``, in forward-execution order."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import FeedForward

    found = []
    for name, module in denoiser.named_modules():
        if not isinstance(module, FeedForward):
            continue
        linears = [i for i, layer in enumerate(module.net) if isinstance(layer, nn.Linear)]
        if not linears:
            continue
        last = linears[-1]
        first = module.net[0]
        between = list(module.net)[1:last]
        feeds_directly = last > 0 and all(isinstance(m, nn.Dropout) and (m.p == 0 or not m.training) for m in between)
        geglu = first if type(first) is GEGLU and feeds_directly else None
        found.append(Target(f"{name}.net.{last}", module.net[last], geglu))
    if not found:
        raise MemcoreError(f"{type(denoiser).__name__}: no transformer feed-forward layers found")
    # sorted() is stable: blocks keep their registration order within down, mid and up.
    return sorted(found, key=lambda t: _EXECUTION_RANK.get(t.name.split(".", 1)[0], 1))


def weights_sha256(targets: list[Target]) -> str:
    """Identity of the scored weights: sha256 over names, shapes and float32 values.

    Hashing the float32 values (exact for float16 and bfloat16) makes the hash depend on what the
    scores see, not on the storage dtype.
    """
    digest = hashlib.sha256()
    for target in targets:
        weight = target.linear.weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{target.name}:{list(weight.shape)}\n".encode())
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()
