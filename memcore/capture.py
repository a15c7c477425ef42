"""Capture hooks: statistics of every target Linear's input, per denoiser call, on the device.

Diffusers ``ModelHook`` objects sharing one :class:`CaptureState`:

- a counter on the denoiser, which advances the call index before each denoiser call;
- on each target whose input is a GEGLU's output, a hook that replaces that GEGLU's forward with
  :func:`memcore.ops.geglu_accumulate`, which adds the statistic of its output X (docs/method.md section 2) to
  the accumulator of this layer and call while computing X: no extra pass over X;
- on any other target Linear, a hook that adds the statistic of its input with
  :func:`memcore.ops.sqnorm_accumulate`.

Nothing is copied to the host, and nothing assumes a feed-forward shape: a target is any Linear
whose input is batch-first, ``[batch, ..., in_features]``.

Routing. A generation's batch holds the prompts of several destinations (prompt subsets sharing one
run): each destination owns a range of prompts, ``[start, end)``. In a classifier-free-guidance
batch of the denoiser the prompts appear twice, ``[uncond..., cond...]``; a text encoder sees them
once per call (the pipeline encodes the prompts, then the negative prompts).

Text-encoder targets run before the first denoiser call (call index -1) and add to call index 0;
the caller copies that row to the other call indices (:meth:`CaptureState.finish`).
:func:`apply_capture` attaches the hooks and always removes them.

Under ``torch.compile``. The denoiser's hooks never read the call index: they add to one buffer per
(destination, layer), the same tensor on every call, and the counter hook, which runs outside the
compiled transformer blocks, copies the call's row of the accumulators into the buffers before the
call and back after it. The ops add to the buffer exactly as they would to the row, so the result is
the same bit for bit; and a compiled block sees the same tensors and Python values on every counted
call, so it compiles once per batch shape, with no graph break (tests/test_compile.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook

from memcore.errors import MemcoreError
from memcore.ops import geglu_accumulate, geglu_accumulate_backend, sqnorm_accumulate
from memcore.targets import TEXT, Target

HOOK_NAME = "memcore_capture"

Accumulators = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Destination:
    """Where the statistics of prompts ``start .. end - 1`` of the batch go (``end`` None: to the last)."""

    accumulators: Accumulators
    start: int = 0
    end: int | None = None


@dataclass
class CaptureState:
    """What the hooks read and write.

    Attributes:
        num_calls: statistics are kept for call indices 0 .. num_calls - 1; later calls are ignored.
        rows: ``both`` uses every row of the guidance batch, ``cond`` only its conditional half (for
            text encoders: only the first encoding of the generation, the prompts').
        guided: whether the denoiser batch is a classifier-free-guidance batch [uncond..., cond...].
        token_norm: L2-normalize each token row before squaring.
        destinations: where each prompt's statistics go, float32 [num_calls, in_features] per layer.
        call_index: index of the denoiser call in progress (-1 before the first).
        run: generations started so far.
    """

    num_calls: int
    rows: str = "both"
    guided: bool = True
    token_norm: bool = True
    destinations: list[Destination] = field(default_factory=list)
    call_index: int = -1
    run: int = 0
    collecting: bool = False
    buffers: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def start_run(self, destinations: Accumulators | list[Destination]) -> None:
        """Direct the statistics of the next generation: one set of accumulators, or one per prompt range."""
        self.destinations = [Destination(destinations)] if isinstance(destinations, dict) else list(destinations)
        self.call_index = -1
        self.collecting = False
        self.run += 1
        for slot, dest in enumerate(self.destinations):
            for layer, acc in dest.accumulators.items():
                buffer = self.buffers.get((slot, layer))
                if buffer is None or buffer.shape != acc.shape[1:] or buffer.device != acc.device:
                    self.buffers[slot, layer] = torch.empty_like(acc[0])

    def begin_call(self) -> None:
        """Before a denoiser call: advance the call index; if the call counts, load its rows into the buffers."""
        self.call_index += 1
        self.collecting = 0 <= self.call_index < self.num_calls
        if self.collecting:
            for (slot, layer), buffer in self._active_buffers():
                buffer.copy_(self.destinations[slot].accumulators[layer][self.call_index])

    def end_call(self) -> None:
        """After a denoiser call that counts: store the buffers back into the call's rows."""
        if self.collecting:
            for (slot, layer), buffer in self._active_buffers():
                self.destinations[slot].accumulators[layer][self.call_index].copy_(buffer)

    def _active_buffers(self) -> Iterator[tuple[tuple[int, str], torch.Tensor]]:
        for slot, dest in enumerate(self.destinations):
            for layer in dest.accumulators:
                yield (slot, layer), self.buffers[slot, layer]

    def denoiser_copies(self) -> tuple[int, int]:
        """(copies of the prompt batch in a denoiser input, first copy that counts): the guidance
        batch [uncond..., cond...] holds two, of which ``cond`` counts the second only."""
        copies = 2 if self.guided else 1
        return copies, copies - 1 if self.rows == "cond" else 0

    def row_ranges(self, shape: torch.Size, copies: int, first_copy: int) -> Iterator[tuple[int, int, int]]:
        """(destination index, first row, end row) of an input of ``shape`` viewed as [-1, features], per destination.

        The input holds ``copies`` consecutive copies of the prompt batch; copies before
        ``first_copy`` are skipped.
        """
        batch = shape[0]
        if batch % copies:
            raise MemcoreError(f"capture: a batch of {batch} is not {copies} copies of the prompts")
        prompts = batch // copies
        per_prompt = math.prod(shape[1:-1])
        for copy in range(first_copy, copies):
            base = copy * prompts
            for slot, dest in enumerate(self.destinations):
                end = prompts if dest.end is None else dest.end
                if end > prompts:
                    raise MemcoreError(f"capture: prompts {dest.start}..{end - 1} routed, the batch has {prompts}")
                yield slot, (base + dest.start) * per_prompt, (base + end) * per_prompt

    def finish(self, accumulators: Accumulators, targets: list[Target]) -> None:
        """Copy each text-encoder statistic (collected at call index 0) to every call index."""
        for target in targets:
            if target.stage == TEXT:
                acc = accumulators[target.name]
                acc[1:] = acc[0]


class CallCounterHook(ModelHook):
    """Around each call of the denoiser: :meth:`CaptureState.begin_call` and :meth:`CaptureState.end_call`."""

    def __init__(self, state: CaptureState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        self.state.begin_call()
        return args, kwargs

    def post_forward(self, module, output):
        self.state.end_call()
        return output


class InputStatisticsHook(ModelHook):
    """Adds the statistic of a Linear's input to the accumulators of this layer and call."""

    def __init__(self, layer: str, state: CaptureState, stage: str):
        super().__init__()
        self.layer = layer
        self.state = state
        self.stage = stage
        self._run, self._encodings = 0, 0

    def pre_forward(self, module, *args, **kwargs):
        state = self.state
        x = args[0] if args else kwargs["input"]
        if self.stage == TEXT:
            if self._run != state.run:
                self._run, self._encodings = state.run, 0
            self._encodings += 1
            if state.call_index == -1 and (state.rows == "both" or self._encodings == 1):
                for slot, start, end in state.row_ranges(x.shape, 1, 0):
                    acc = state.destinations[slot].accumulators[self.layer][0]
                    sqnorm_accumulate(x.detach(), acc, start, end, state.token_norm)
        elif state.collecting:
            for slot, start, end in state.row_ranges(x.shape, *state.denoiser_copies()):
                sqnorm_accumulate(x.detach(), state.buffers[slot, self.layer], start, end, state.token_norm)
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
        ranges = list(state.row_ranges(projected.shape, *state.denoiser_copies())) if state.collecting else []  # X's rows
        if not ranges:
            h, gate = projected.chunk(2, dim=-1)
            return h * module.gelu(gate)
        slot, start, end = ranges[0]
        out = geglu_accumulate(projected, state.buffers[slot, self.layer], start, end, state.token_norm)
        for slot, start, end in ranges[1:]:
            sqnorm_accumulate(out, state.buffers[slot, self.layer], start, end, state.token_norm)
        return out


@contextlib.contextmanager
def apply_capture(
    denoiser: torch.nn.Module, targets: list[Target], state: CaptureState, fused: bool | None = None
) -> Iterator[CaptureState]:
    """Attach the capture hooks for the duration of the block; they are removed even on error.

    With ``fused``, targets fed by a GEGLU collect inside the fused GEGLU op; otherwise every target
    collects from its input. The default fuses whenever a native backend runs the fused op (CUDA,
    Triton or the C++ CPU kernel, each measured faster than PyTorch's GEGLU followed by the statistic,
    docs/benchmarks.md); with only the reference there is nothing to gain.
    """
    if fused is None:
        fused = geglu_accumulate_backend(next(denoiser.parameters()).device) != "reference"
    hooked: list[torch.nn.Module] = []
    try:
        HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(CallCounterHook(state), HOOK_NAME)
        hooked.append(denoiser)
        for target in targets:
            if fused and target.geglu is not None:
                module, hook = target.geglu, FusedGegluHook(target.name, state)
            else:
                module, hook = target.linear, InputStatisticsHook(target.name, state, target.stage)
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
            hooked.append(module)
        yield state
    finally:
        for module in hooked:
            module._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
