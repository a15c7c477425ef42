"""Capture hooks: statistics of every target Linear's input, per denoiser call, on the device.

Diffusers ``ModelHook`` objects sharing one :class:`CaptureState`:

- a counter on the denoiser, which advances the call index before each denoiser call;
- on each target whose input is a GEGLU's output, a hook that replaces that GEGLU's forward with
  :func:`memcore.ops.geglu_accumulate`, which adds the statistic of its output X (SPEC section 2) to
  ``state.accumulators[layer][call_index]`` while computing X: no extra pass over X;
- on any other target Linear, a hook that adds the statistic of its input with
  :func:`memcore.ops.sqnorm_accumulate`.

Nothing is copied to the host. :func:`apply_capture` attaches the hooks and always removes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook

from memcore.ops import geglu_accumulate, sqnorm_accumulate
from memcore.targets import Target

HOOK_NAME = "memcore_capture"
ROWS = ("both", "cond")


@dataclass
class CaptureState:
    """What the hooks read and write.

    Attributes:
        num_calls: statistics are kept for call indices 0 .. num_calls - 1; later calls are ignored.
        rows: ``both`` uses every row of the guidance batch, ``cond`` only its conditional half.
        guided: whether the batch is a classifier-free-guidance batch [uncond..., cond...].
        token_norm: L2-normalize each token row before squaring.
        accumulators: layer name -> float32 [num_calls, in_features], the current destination.
        call_index: index of the denoiser call in progress (-1 before the first).
    """

    num_calls: int
    rows: str = "both"
    guided: bool = True
    token_norm: bool = True
    accumulators: dict[str, torch.Tensor] = field(default_factory=dict)
    call_index: int = -1

    def start_run(self, accumulators: dict[str, torch.Tensor]) -> None:
        """Direct the statistics of the next generation into ``accumulators``."""
        self.accumulators = accumulators
        self.call_index = -1

    def row_range(self, x: torch.Tensor) -> tuple[int, int]:
        """Rows of ``x`` (viewed as [-1, features]) that count: all, or the conditional half."""
        rows = x.numel() // x.shape[-1]
        if self.rows == "both" or not self.guided:
            return 0, rows
        per_sample = rows // x.shape[0]
        return (x.shape[0] // 2) * per_sample, rows


class CallCounterHook(ModelHook):
    """Advances ``state.call_index`` before each call of the denoiser."""

    def __init__(self, state: CaptureState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        self.state.call_index += 1
        return args, kwargs


class InputStatisticsHook(ModelHook):
    """Adds the statistic of a Linear's input to the state's accumulator for this layer and call."""

    def __init__(self, layer: str, state: CaptureState):
        super().__init__()
        self.layer = layer
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        state = self.state
        if 0 <= state.call_index < state.num_calls:
            x = args[0] if args else kwargs["input"]
            start, end = state.row_range(x)
            sqnorm_accumulate(x.detach(), state.accumulators[self.layer][state.call_index], start, end, state.token_norm)
        return args, kwargs


class FusedGegluHook(ModelHook):
    """Replaces a GEGLU's forward: proj, then GEGLU and the statistic of its output in one op."""

    def __init__(self, layer: str, state: CaptureState):
        super().__init__()
        self.layer = layer
        self.state = state

    def new_forward(self, module, hidden_states, *args, **kwargs):
        state = self.state
        projected = module.proj(hidden_states)
        if not 0 <= state.call_index < state.num_calls:
            h, gate = projected.chunk(2, dim=-1)
            return h * module.gelu(gate)
        start, end = state.row_range(projected)
        return geglu_accumulate(projected, state.accumulators[self.layer][state.call_index], start, end, state.token_norm)


@contextlib.contextmanager
def apply_capture(
    denoiser: torch.nn.Module, targets: list[Target], state: CaptureState, fused: bool | None = None
) -> Iterator[CaptureState]:
    """Attach the capture hooks for the duration of the block; they are removed even on error.

    With ``fused``, targets fed by a GEGLU collect inside the fused GEGLU op; otherwise every target
    collects from its input. The default fuses on CUDA only: on the CPU, PyTorch's vectorized GEGLU
    followed by the C++ statistic is faster than the fused C++ GEGLU (scalar erf; docs/benchmarks.md).
    """
    if fused is None:
        fused = next(denoiser.parameters()).device.type == "cuda"
    hooked: list[torch.nn.Module] = []
    try:
        HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(CallCounterHook(state), HOOK_NAME)
        hooked.append(denoiser)
        for target in targets:
            if fused and target.geglu is not None:
                module, hook = target.geglu, FusedGegluHook(target.name, state)
            else:
                module, hook = target.linear, InputStatisticsHook(target.name, state)
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
            hooked.append(module)
        yield state
    finally:
        for module in hooked:
            module._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
