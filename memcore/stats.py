"""Statistics of the memorized prompts and of the empty prompt (docs/method.md section 2), and their file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from memcore._version import __version__
from memcore.config import LocalizeConfig, check_calls, resolve_generation
from memcore.errors import MemcoreError
from memcore.io import atomic_file
from memcore.prompts import BuiltinPrompts
from memcore.schema import STATS as FORMAT
from memcore.schema import check, dumps, parse


@dataclass
class Statistics:
    """Accumulated sums of squared activations, float32 [num_calls, in_features] per layer.

    ``mem[layer][t]`` sums over the memorized prompts; ``null[layer][t]`` is N times the empty
    prompt's sum, so both are on the same scale. Norms are their square roots.
    """

    mem: dict[str, torch.Tensor]
    null: dict[str, torch.Tensor]
    metadata: dict

    @property
    def layers(self) -> list[str]:
        return list(self.mem)

    @property
    def num_calls(self) -> int:
        return int(self.metadata["timesteps"])

    def norms(self, layer: str, num_calls: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm_mem, norm_null) of ``layer`` for the first ``num_calls`` calls."""
        n = self.num_calls if num_calls is None else num_calls
        return self.mem[layer][:n].sqrt(), self.null[layer][:n].sqrt()

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors = {f"mem/{name}": t.contiguous().cpu() for name, t in self.mem.items()}
        tensors.update({f"null/{name}": t.contiguous().cpu() for name, t in self.null.items()})
        check(f"{path} (not written)", self.metadata, FORMAT, tensors)  # never write what no reader takes
        with atomic_file(path) as tmp:
            save_file(tensors, tmp, metadata={"memcore": dumps(self.metadata)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Statistics:
        """Statistics from a file, once it passes the schema of its format (:mod:`memcore.schema`)."""
        metadata, tensors = _read_safetensors(path, FORMAT)
        mem = {name: tensors[f"mem/{name}"] for name in metadata["layers"]}
        null = {name: tensors[f"null/{name}"] for name in metadata["layers"]}
        return cls(mem=mem, null=null, metadata=metadata)


def _read_safetensors(path: str | os.PathLike, expected_format: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and tensors of a file written by memcore in ``expected_format`` (or another version
    of it this memcore reads), checked against its schema; else a one-line error naming the file."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise MemcoreError(f"{path}: no such file")
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("memcore")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise MemcoreError(f"{path}: not a safetensors file ({exc})") from None
    where = os.fspath(path)
    return check(where, parse(where, raw, expected_format), expected_format, tensors), tensors


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()


def collect_stats(pipe, prompts: list[str], config: LocalizeConfig | None = None) -> Statistics:
    """Run the first ``config.timesteps`` denoiser calls for ``prompts`` and for "" and collect statistics.

    Every prompt starts from the same initial latent; the empty prompt runs once and its statistics
    are multiplied by the number of prompts (docs/method.md section 2).
    """
    return collect_subset_stats(pipe, {"": prompts}, config)[""]


def _groups(subsets: dict[str, list[str]]) -> list[tuple[tuple[tuple[str, int], ...], list[str]]]:
    """Unique prompts grouped by the subsets they belong to (with their count in each subset).

    Every prompt is run once, whatever the number of subsets it is in; a group's statistics are
    added to each of its subsets. Groups keep the order in which their first prompt appears.
    """
    counts: dict[str, dict[str, int]] = {}
    for name, prompts in subsets.items():
        for prompt in prompts:
            membership = counts.setdefault(prompt, {})
            membership[name] = membership.get(name, 0) + 1
    groups: dict[tuple[tuple[str, int], ...], list[str]] = {}
    for prompt, membership in counts.items():
        groups.setdefault(tuple(membership.items()), []).append(prompt)
    return list(groups.items())


RECOMPILE_LIMIT = 64


@contextlib.contextmanager
def compiled(denoiser: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, the denoiser's forward is ``torch.compile(forward, fullgraph=True)``: one graph
    per batch shape, the capture hooks and the fused ops inside it (a graph break is an error, not a
    silent slowdown). Enter it before attaching the capture, whose call counter must stay outside
    the graph; the denoiser is left as it was."""
    if not enabled:
        yield
        return
    denoiser.forward = torch.compile(denoiser.forward, fullgraph=True)
    try:
        # a graph per batch shape and routing of prompts to accumulators (the last, smaller batch, the
        # empty prompt, batches spanning prompt subsets): more than dynamo's default limit of 8
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            yield
    finally:
        del denoiser.forward


def collect_subset_stats(
    pipe, subsets: dict[str, list[str]], config: LocalizeConfig | None = None
) -> dict[str, Statistics]:
    """Statistics of several prompt subsets in one run, sharing the empty prompt's run.

    Each distinct prompt is generated once, in batches that may span subsets, and its statistics are
    routed to the subsets it belongs to. The empty prompt runs once; each subset's null statistic is
    that run times the subset's number of prompts (docs/method.md section 2).
    """
    from memcore.capture import CaptureState, apply_capture
    from memcore.driver import initial_latent, is_guided, run_first_calls, truncation_reported_once
    from memcore.models import denoiser, model_id
    from memcore.targets import find_targets, weights_sha256

    config = config or LocalizeConfig()
    for name, prompts in subsets.items():
        if not prompts:
            if name:
                raise MemcoreError(f"subset {name} is empty; nothing to localize", param="subsets")
            raise MemcoreError("empty; nothing to localize", param="prompts")
    if not subsets:
        raise MemcoreError("empty; nothing to localize", param="subsets")
    distinct = len({prompt for prompts in subsets.values() for prompt in prompts})
    generation = resolve_generation(pipe, config, images=min(config.batch_size, distinct))
    tau = check_calls(generation, config.timesteps)

    net = denoiser(pipe)
    targets = find_targets(pipe, config.target)
    device = pipe._execution_device

    def zeros() -> dict[str, torch.Tensor]:
        return {t.name: torch.zeros(tau, t.linear.in_features, dtype=torch.float32, device=device) for t in targets}

    groups = [(membership, prompts, zeros()) for membership, prompts in _groups(subsets)]
    # one list of prompts, in group order, cut into batches that may span groups
    order = [(prompt, acc) for _, prompts, acc in groups for prompt in prompts]
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    null = zeros()
    latent = initial_latent(pipe, generation)
    state = CaptureState(num_calls=tau, rows=config.rows, guided=is_guided(pipe, generation), token_norm=config.token_norm)
    started = time.perf_counter()
    with (
        torch.no_grad(),
        compiled(net, config.compile),
        apply_capture(net, targets, state, fused=config.fuse_geglu),
        truncation_reported_once(pipe),
        tqdm(total=(len(batches) + 1) * tau, desc="denoiser calls", unit="call", disable=None if config.progress else True) as bar,
    ):
        for batch in batches:
            state.start_run(_destinations([acc for _, acc in batch]))
            run_first_calls(pipe, [prompt for prompt, _ in batch], latent, generation, tau, on_call=bar.update)
        state.start_run(null)
        run_first_calls(pipe, [""], latent, generation, tau, on_call=bar.update)
    seconds = round(time.perf_counter() - started, 3)
    for _, _, acc in groups:
        state.finish(acc, targets)
    state.finish(null, targets)

    common = {
        "format": FORMAT,
        "memcore_version": __version__,
        "model_id": model_id(pipe),
        "target": config.target,
        "weights_sha256": weights_sha256(targets),
        "dtype": str(net.dtype).removeprefix("torch."),
        "layers": [t.name for t in targets],
        "shapes": {t.name: list(t.shape) for t in targets},
        "timesteps": tau,
        "rows": config.rows,
        "token_norm": config.token_norm,
        "batch_size": config.batch_size,
        "collect_seconds": seconds,
        **generation.as_dict(),
    }
    result = {}
    for name, prompts in subsets.items():
        parts = [(dict(membership).get(name, 0), acc) for membership, _, acc in groups]
        parts = [(count, acc) for count, acc in parts if count]
        if len(parts) == 1 and parts[0][0] == 1:
            mem = parts[0][1]
        else:
            mem = {layer: sum(count * acc[layer] for count, acc in parts) for layer in null}
        metadata = {**common, "num_prompts": len(prompts), "prompts_sha256": prompts_sha256(prompts)}
        if name:
            metadata["subset"] = name
        if isinstance(prompts, BuiltinPrompts):
            metadata["prompt_set"] = prompts.set_name
        result[name] = Statistics(mem=mem, null={layer: acc * len(prompts) for layer, acc in null.items()}, metadata=metadata)
    return result


def _destinations(accumulators: list[dict[str, torch.Tensor]]):
    """One destination per run of consecutive prompts of a batch sharing their accumulators."""
    from memcore.capture import Destination

    runs, start = [], 0
    for i in range(1, len(accumulators) + 1):
        if i == len(accumulators) or accumulators[i] is not accumulators[start]:
            runs.append(Destination(accumulators[start], start, i))
            start = i
    return runs
