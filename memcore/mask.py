"""The mask of memorized neurons (docs/method.md section 3) and its file.

File layout (safetensors): one uint8 tensor per target Linear, keyed by the Linear's full module
name, shaped [out, ceil(in / 8)], holding ``numpy.packbits(mask, axis=1, bitorder="little")``; with
per-step masks, also ``<name>.per_step`` shaped [tau, out, ceil(in / 8)]. The ``memcore`` metadata
entry is JSON: version, model, weights hash, layers and shapes, settings, density per layer.
:mod:`memcore.schema` holds what each format version requires; files are checked against it when
read and when written.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field
from decimal import Decimal

import torch

from memcore._version import __version__
from memcore.config import check_sparsity, check_timesteps
from memcore.errors import MemcoreError, Param, Pass
from memcore.io import atomic_file
from memcore.ops import unpack_mask, wanda_mask, wanda_mask_grouped
from memcore.schema import MASK as FORMAT
from memcore.schema import PER_STEP, check, dumps
from memcore.stats import Statistics, _read_safetensors

logger = logging.getLogger("memcore")


def top_k(sparsity: float, in_features: int) -> int:
    """k = floor(s * in), with s taken as the decimal number it was written as (0.29 * 100 = 29)."""
    return math.floor(Decimal(repr(float(sparsity))) * in_features)


@dataclass
class Mask:
    """Packed boolean masks per layer, with their provenance."""

    layers: dict[str, torch.Tensor]
    metadata: dict
    per_step: dict[str, torch.Tensor] = field(default_factory=dict)

    def shape(self, layer: str) -> tuple[int, int]:
        out, in_features = self.metadata["shapes"][layer]
        return out, in_features

    def unpack(self, layer: str) -> torch.Tensor:
        """The boolean mask [out, in] of ``layer``."""
        return unpack_mask(self.layers[layer], self.shape(layer)[1])

    def unpack_step(self, layer: str, call: int) -> torch.Tensor:
        """The boolean mask [out, in] of ``layer`` at call index ``call`` (needs ``per_step``)."""
        if layer not in self.per_step:
            raise MemcoreError("this mask was computed without {per_step}", per_step=Param("per_step", True))
        return unpack_mask(self.per_step[layer][call], self.shape(layer)[1])

    def count(self, layer: str) -> int:
        return int(self.unpack(layer).sum())

    def density(self) -> float:
        """The fraction of all target weights in the mask."""
        total = sum(math.prod(self.shape(name)) for name in self.layers)
        return sum(self.count(name) for name in self.layers) / total

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors = {name: t.contiguous().cpu() for name, t in self.layers.items()}
        tensors.update({name + PER_STEP: t.contiguous().cpu() for name, t in self.per_step.items()})
        check(f"{path} (not written)", self.metadata, FORMAT, tensors)  # never write what no reader takes
        with atomic_file(path) as tmp:
            save_file(tensors, tmp, metadata={"memcore": dumps(self.metadata)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Mask:
        """A mask from a file, once it passes the schema of its format (:mod:`memcore.schema`)."""
        metadata, tensors = _read_safetensors(path, FORMAT)
        layers = {name: tensors[name] for name in metadata["layers"]}
        per_step = {name: tensors[name + PER_STEP] for name in metadata["layers"]} if metadata["per_step"] else {}
        return cls(layers=layers, metadata=metadata, per_step=per_step)


def load_mask(path: str | os.PathLike) -> Mask:
    return Mask.load(path)


def save_mask(mask: Mask, path: str | os.PathLike) -> None:
    mask.save(path)


def check_same_weights(targets, metadata: dict, what: str, force: bool = False, model=None) -> None:
    """Refuse statistics or masks made for other layers, and (unless ``force``) other weights.

    With ``model``, the pipeline ``targets`` belong to, weights that hash the same under another model
    name (a local copy of a hub model, say) are accepted with one warning on the ``memcore`` logger
    naming both (a denoiser alone has no name to compare; with ``force`` nothing is hashed).
    """
    from memcore.targets import weights_sha256

    shapes = {t.name: list(t.shape) for t in targets}
    if shapes != {name: list(shape) for name, shape in metadata["shapes"].items()}:
        raise MemcoreError(
            f"{what} was made for model {metadata.get('model_id')!r} whose target layers differ from this model's "
            f"({len(metadata['shapes'])} layers there, {len(shapes)} here, or other names or shapes)"
        )
    if not force and weights_sha256(targets) != metadata["weights_sha256"]:
        raise MemcoreError(
            "{what} was made from other weights (model {model!r}, dtype {dtype}); {force} to apply it anyway",
            what=what, model=metadata.get("model_id"), dtype=metadata.get("dtype"), force=Pass("force"),
        )
    if not force and model is not None and not isinstance(model, torch.nn.Module):
        from memcore.models import model_id

        here, there = model_id(model), metadata.get("model_id")
        if here != there:
            logger.warning(
                "memcore: %s was made for model %r and is used with model %r; their target weights are the same",
                what, there, here,
            )


def check_mask_settings(stats: Statistics, sparsity: float, timesteps: int | None) -> int:
    """tau, once ``sparsity`` and ``timesteps`` are known good for ``stats`` (no model needed)."""
    check_sparsity(sparsity)
    tau = stats.num_calls if timesteps is None else check_timesteps(timesteps)
    if tau > stats.num_calls:
        raise MemcoreError(f"{tau} is more than the {stats.num_calls} calls the statistics hold", param="timesteps")
    return tau


def compute_mask(
    model,
    stats: Statistics,
    sparsity: float = 0.01,
    timesteps: int | None = None,
    per_step: bool = False,
    force: bool = False,
) -> Mask:
    """Score every target weight against ``stats`` and select the memorized neurons (docs/method.md section 3).

    Args:
        model: the pipeline whose weights are scored (the one the stats came from), or its denoiser
            for denoiser target families.
        stats: statistics from :func:`memcore.collect_stats`.
        sparsity: s in (0, 1]; k = floor(s * in_features) per row and call index.
        timesteps: tau, use call indices 0 .. tau - 1 (default: all the stats hold).
        per_step: also keep the mask of each call index.
        force: accept statistics collected with other weights of the same shapes.
    """
    from memcore.targets import find_recorded_targets

    tau = check_mask_settings(stats, sparsity, timesteps)
    targets = find_recorded_targets(model, stats.metadata, "the statistics file")
    check_same_weights(targets, stats.metadata, "the statistics file", force, model=model)

    layers, steps = {}, {}
    report = [(target, top_k(sparsity, target.linear.in_features)) for target in targets]
    with torch.no_grad():
        inputs = [(t.linear.weight, *(n.to(t.linear.weight.device) for n in stats.norms(t.name, tau))) for t in targets]
        if per_step:
            for (target, k), (weight, norms, null_norms) in zip(report, inputs):
                # the union is the OR of the per-step masks, bitwise on the packed bytes: tau passes over W
                step_masks = torch.stack(
                    [wanda_mask(weight, norms[t : t + 1], null_norms[t : t + 1], k) for t in range(tau)]
                )
                steps[target.name] = step_masks.cpu()
                layers[target.name] = functools.reduce(torch.bitwise_or, steps[target.name].unbind(0))
        elif len({w.device for w, _, _ in inputs}) == 1:
            # every layer in one call (one parallel region on the CPU)
            masks = wanda_mask_grouped([w for w, _, _ in inputs], [n for _, n, _ in inputs],
                                       [z for _, _, z in inputs], [k for _, k in report])
            layers = {target.name: mask.cpu() for (target, _), mask in zip(report, masks)}
        else:  # a model spread over devices
            for (target, k), (weight, norms, null_norms) in zip(report, inputs):
                layers[target.name] = wanda_mask(weight, norms, null_norms, k).cpu()

    metadata = {
        key: value
        for key, value in stats.metadata.items()
        if key not in ("format", "memcore_version", "timesteps", "collect_seconds")
    }
    metadata.update(
        format=FORMAT,
        memcore_version=__version__,
        sparsity=sparsity,
        timesteps=tau,
        timestep_values=stats.metadata["call_timesteps"][:tau],
        per_step=per_step,
    )
    mask = Mask(layers=layers, metadata=metadata, per_step=steps)
    metadata["k"] = {t.name: k for t, k in report}
    metadata["density"] = {t.name: mask.count(t.name) / math.prod(t.shape) for t, _ in report}
    return mask
