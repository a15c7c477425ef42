"""Finding the Linear layers to score, by structure, in forward-execution order.

A *target family* names which Linear layers are scored (their input statistics, their weights):

- ``ffn`` (the default, docs/method.md section 1): the last Linear of every diffusers ``FeedForward`` in the
  denoiser. Whatever the activation (GEGLU in Stable Diffusion, tanh-GELU in PixArt), the statistics
  are those of that Linear's input.
- ``attn2.to_k`` and ``attn2.to_v``: the key and value projections of every cross-attention of the
  denoiser. Their input is the text embedding, so their statistics come from the prompt alone.
- ``text-mlp``: the output Linear of every MLP of the pipeline's text encoders (CLIP ``mlp.fc2``,
  T5 ``DenseReluDense.wo``). The text encoders run once per generation, before the first denoiser
  call; their statistics are the same at every call index.
- anything else is a regular expression (Python's ``re`` syntax) matched in full against the
  denoiser's module names; every matching ``nn.Linear`` is a target. Patterns come from users and
  from files, so they run on the ``regex`` package's engine (its ``VERSION0`` mode behaves as ``re``
  does) under one time budget for the whole search (``PATTERN_BUDGET_S``), and a pattern whose
  counted repetitions would unroll into a huge program is refused before it is compiled.

Denoiser layers are named as in the denoiser (``down_blocks.0...``), text-encoder layers with their
pipeline component first (``text_encoder_2.text_model...``). A UNet runs its down blocks, then its
mid block, then its up blocks, although ``named_modules()`` lists the mid block last; text encoders
run before the denoiser.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import regex
import torch
from torch import nn

from memcore.errors import MemcoreError

FFN = "ffn"
FAMILIES = (FFN, "attn2.to_k", "attn2.to_v", "text-mlp")
DENOISER, TEXT = "denoiser", "text"

_EXECUTION_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
# Text-encoder MLPs by class name: CLIPMLP (fc1, fc2), T5DenseActDense and T5DenseGatedActDense (wo last).
_TEXT_MLP = re.compile(r".*(MLP|DenseActDense|DenseGatedActDense)")

# The time one search of a user's pattern over a model's module names may take, all names together.
# Ordinary patterns take milliseconds over the few thousand names of an SDXL UNet; a pattern that
# backtracks catastrophically (``(.|.)*\d\d``) would take years.
PATTERN_BUDGET_S = 2.0
# The regex engine unrolls counted repetitions when it compiles: ``(x{3000}){3000}`` takes seconds
# and gigabytes before any matching starts. Module names are a few hundred characters at most, so a
# pattern that unrolls into more elements than this can only be a mistake.
PATTERN_MAX_UNROLLED = 100_000

try:  # the parser behind re.compile: it checks the syntax users have always had, and sizes the pattern
    from re import _parser as _re_parser  # Python 3.11+
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _re_parser

_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}


@dataclass(frozen=True)
class Target:
    """One Linear whose input statistics and weights are scored.

    ``stage`` says when it runs: ``denoiser`` (once per denoiser call) or ``text`` (once per
    generation, in a text encoder, before the first denoiser call). ``geglu`` is the diffusers GEGLU
    whose output is this Linear's input (through inactive dropout only), when there is one: capture
    can then compute the statistics inside a fused GEGLU.
    """

    name: str
    linear: nn.Linear
    geglu: nn.Module | None = None
    stage: str = DENOISER

    @property
    def shape(self) -> tuple[int, int]:
        return (self.linear.out_features, self.linear.in_features)


def check_family(target: str) -> str:
    """``target`` if it is a family name or a valid regular expression, else a one-line error."""
    if target in FAMILIES:
        return target
    if not target:
        raise MemcoreError(f"empty; choose one of {', '.join(FAMILIES)} or a regular expression", param="target")
    compile_pattern(target)
    return target


def compile_pattern(target: str) -> regex.Pattern:
    """``target`` compiled for :func:`matching_names`, else a one-line error.

    The syntax is Python's ``re`` (checked by ``re``'s own parser), compiled by the ``regex`` engine
    that runs it, in its re-compatible ``VERSION0`` mode.
    """
    try:
        unrolled = _unrolled_size(_re_parser.parse(target))
        if unrolled <= PATTERN_MAX_UNROLLED:
            return regex.compile(target, regex.VERSION0)
    except (re.error, regex.error) as exc:
        raise _invalid(target, exc) from None
    except RecursionError:  # groups nested hundreds deep
        raise MemcoreError(
            "the regular expression nests its groups too deep to compile; simplify it", param="target", value=repr(target)
        ) from None
    raise MemcoreError(
        "the regular expression is too large once its repetitions are unrolled ({size:,} elements or more, at most "
        "{limit:,}); module names are short, so simplify it",
        param="target", value=repr(target), size=unrolled, limit=PATTERN_MAX_UNROLLED,
    )


def _invalid(target: str, exc: Exception) -> MemcoreError:
    return MemcoreError(
        "not a family ({families}) nor a valid regular expression ({exc})",
        param="target", value=repr(target), families=", ".join(FAMILIES), exc=exc,
    )


def _unrolled_size(parsed) -> int:
    """How many elements a parsed pattern has once every repetition is unrolled to its minimum count."""
    size = 0
    for op, arg in parsed:
        if getattr(op, "name", None) in _REPEATS:
            low, _, body = arg
            size += max(low, 1) * _unrolled_size(body)
        else:
            size += 1 + sum(_unrolled_size(part) for part in _subpatterns(arg))
        if size > PATTERN_MAX_UNROLLED:  # stop early: the count can grow as a product
            return size
    return size


def _subpatterns(arg):
    if isinstance(arg, _re_parser.SubPattern):
        yield arg
    elif isinstance(arg, (tuple, list)):
        for item in arg:
            yield from _subpatterns(item)


def matching_names(target: str, names: Iterable[str]) -> list[str]:
    """The ``names`` that the user's regular expression ``target`` matches in full, in order.

    Every match of a user's pattern goes through here. The whole search has one time budget,
    ``PATTERN_BUDGET_S``; a pattern that exceeds it (catastrophic backtracking) is a one-line error.
    """
    pattern = compile_pattern(target)
    names = list(names)
    deadline = time.monotonic() + PATTERN_BUDGET_S
    found = []
    for name in names:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _too_slow(target, len(names))
        try:
            matched = pattern.fullmatch(name, timeout=left)
        except TimeoutError:
            raise _too_slow(target, len(names)) from None
        if matched is not None:
            found.append(name)
    return found


def _too_slow(target: str, count: int) -> MemcoreError:
    return MemcoreError(
        "the regular expression did not finish within {budget:g} s over {count} module names "
        "(catastrophic backtracking?); simplify it",
        param="target", value=repr(target), budget=PATTERN_BUDGET_S, count=count,
    )


def find_targets(model, target: str = FFN) -> list[Target]:
    """The target Linear layers of ``model`` (a pipeline, or a denoiser for denoiser families)."""
    from memcore.models import denoiser

    check_family(target)
    is_module = isinstance(model, nn.Module)
    if target == "text-mlp":
        if is_module:
            raise MemcoreError("needs the whole pipeline, not only its denoiser", param="target", value=target)
        found = _text_mlp_targets(model)
    else:
        net = model if is_module else denoiser(model)
        if target == FFN:
            found = _ffn_targets(net)
        elif target in FAMILIES:
            found = _named_targets(net, lambda name: name.endswith("." + target))
        else:
            linears = {name: module for name, module in net.named_modules() if isinstance(module, nn.Linear)}
            found = [Target(name, linears[name]) for name in matching_names(target, linears)]
        # sorted() is stable: blocks keep their registration order within down, mid and up.
        found.sort(key=lambda t: _EXECUTION_RANK.get(t.name.split(".", 1)[0], 1))
    if not found:
        where = "the text encoders" if target == "text-mlp" else type(model if is_module else denoiser(model)).__name__
        raise MemcoreError("no matching Linear layers in {where}", param="target", value=target, where=where)
    return found


def find_recorded_targets(model, metadata: dict, what: str) -> list[Target]:
    """:func:`find_targets` for the family a file records (``metadata["target"]``, ``ffn`` when absent).

    A mistake in it is the file's, not a ``target`` argument's (``prune`` has none): the error says
    what recorded it, e.g. "the mask records target '(a|a)*b': the regular expression did not finish ...".
    """
    target = metadata.get("target", FFN)
    try:
        return find_targets(model, target)
    except MemcoreError as exc:
        if exc.param != "target":
            raise
        raise MemcoreError("{what} records target {target}: {detail}", what=what, target=repr(target), detail=exc.detail()) from None


def _ffn_targets(net: nn.Module) -> list[Target]:
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import FeedForward

    found = []
    for name, module in net.named_modules():
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
    return found


def _named_targets(net: nn.Module, selected) -> list[Target]:
    return [Target(name, module) for name, module in net.named_modules() if isinstance(module, nn.Linear) and selected(name)]


def text_encoders(pipe) -> dict[str, nn.Module]:
    """The pipeline's text encoders by component name (``text_encoder``, ``text_encoder_2``, ...)."""
    components = getattr(pipe, "components", {})
    return {
        name: module
        for name, module in sorted(components.items())
        if name.startswith("text_encoder") and isinstance(module, nn.Module)
    }


def _text_mlp_targets(pipe) -> list[Target]:
    found = []
    for component, encoder in text_encoders(pipe).items():
        for name, module in encoder.named_modules():
            if not _TEXT_MLP.fullmatch(type(module).__name__):
                continue
            linears = [(child, layer) for child, layer in module.named_children() if isinstance(layer, nn.Linear)]
            if linears:
                child, layer = linears[-1]
                found.append(Target(f"{component}.{name}.{child}", layer, stage=TEXT))
    return found


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
