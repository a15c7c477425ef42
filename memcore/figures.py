"""PNG figures of the subspace analysis (:mod:`memcore.analysis`).

matplotlib is imported inside the functions, and only ``matplotlib.figure.Figure`` is used (never
pyplot): no backend is selected and nothing global changes, on import of memcore or after. Every
figure is written atomically.

Figures: ``density_by_timestep.png``, ``density_by_layer.png``, ``iou_by_timestep.png``,
``iou_by_layer.png``, ``iou_heatmap.png`` (layer x call index, colour scale 0 to 1).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from memcore.errors import MemcoreError
from memcore.io import atomic_file

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from memcore.analysis import Density, PairwiseIoU

DPI = 120
MAX_TICKS = 20  # call-index labels on an x axis before they are thinned
CHANCE_STYLE = {"color": "0.3", "linestyle": "--", "linewidth": 1.2}

_ABBREVIATIONS = {
    "down_blocks": "down",
    "up_blocks": "up",
    "mid_block": "mid",
    "attentions": "attn",
    "transformer_blocks": "tb",
    "single_transformer_blocks": "stb",
    "blocks": "b",
    "layers": "l",
}
# The FFN's own path inside a transformer block (docs/method.md section 1): the same in every layer, so dropped.
_FFN_SUFFIX = re.compile(r"\.ff\.net\.\d+$")


def short_layer_name(name: str) -> str:
    """A readable short name: ``down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2`` -> ``down0.attn0.tb0``.

    Known container names are abbreviated and joined to their index, and the FFN's path inside the
    block (``ff.net.2``) is dropped; other parts are kept as they are.
    """
    stem = _FFN_SUFFIX.sub("", name) or name
    parts, out = stem.split("."), []
    for part in parts:
        if part.isdigit() and out and not out[-1][-1:].isdigit():
            out[-1] += part
        else:
            out.append(_ABBREVIATIONS.get(part, part))
    return ".".join(out)


def layer_labels(layers: Sequence[str]) -> list[str]:
    """Short names of ``layers``, or the full names where shortening would make two alike."""
    short = [short_layer_name(name) for name in layers]
    return short if len(set(short)) == len(short) else list(layers)


def require_matplotlib() -> None:
    """Fail with one line, before any work, when matplotlib is missing."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as e:
        raise MemcoreError(f"the figures need matplotlib>=3.7 ({e}); pip install 'matplotlib>=3.7'") from None


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _call_axis(ax: Axes, timestep_values: Sequence[float] | None, tau: int) -> None:
    """x ticks at call indices, labelled with the scheduler timestep below when known."""
    step = max(1, math.ceil(tau / MAX_TICKS))
    ticks = list(range(0, tau, step))
    ax.set_xticks(ticks)
    if timestep_values is None:
        ax.set_xlabel("call index")
    else:
        ax.set_xticks(ticks, [f"{t}\n{timestep_values[t]:.4g}" for t in ticks])  # flow matching: fractional
        ax.set_xlabel("call index / scheduler timestep")
    ax.set_xlim(-0.5, tau - 0.5)


def _layer_axis(ax: Axes, layers: Sequence[str]) -> None:
    labels = layer_labels(layers)
    if max(map(len, labels)) > 4:
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("layer")


def _layer_width(layers: Sequence[str]) -> float:
    return max(6.0, 0.45 * len(layers) + 2.0)


def density_figures(density: Density, out_dir: str | os.PathLike) -> list[Path]:
    """``density_by_timestep.png`` and ``density_by_layer.png``; returns their paths."""
    out = Path(out_dir)
    tau = density.masked.shape[1]
    calls = np.arange(tau)

    fig, ax = _figure(7, 4)
    per_mask = density.per_step.mean(axis=2)  # [masks, calls]: mean over layers
    if len(density.names) > 1:
        for name, values in zip(density.names, per_mask, strict=True):
            ax.plot(calls, values, marker=".", linewidth=0.8, alpha=0.6, label=name)
    ax.plot(calls, density.by_timestep, marker="o", color="k", linewidth=2, label="mean over masks")
    _call_axis(ax, density.timestep_values, tau)
    ax.set_ylabel("density (mean over layers)")
    ax.set_ylim(bottom=0)
    ax.set_title("Memorized neurons per call index")
    if len(density.names) <= 10:
        ax.legend(fontsize="small")
    paths = [save_figure(fig, out / "density_by_timestep.png")]

    fig, ax = _figure(_layer_width(density.layers), 4.5)
    x = np.arange(len(density.layers))
    ax.bar(x - 0.2, density.by_layer, width=0.4, label="per call (mean over calls)")
    ax.bar(x + 0.2, density.union.mean(axis=0), width=0.4, label="union over calls")
    _layer_axis(ax, density.layers)
    ax.set_ylabel("density (mean over masks)")
    ax.set_title("Memorized neurons per layer")
    ax.legend(fontsize="small")
    paths.append(save_figure(fig, out / "density_by_layer.png"))
    return paths


def iou_figures(pairwise: PairwiseIoU, out_dir: str | os.PathLike) -> list[Path]:
    """``iou_by_timestep.png``, ``iou_by_layer.png`` and ``iou_heatmap.png``; returns their paths."""
    out = Path(out_dir)
    tau = pairwise.steps.intersection.shape[1]
    calls = np.arange(tau)
    pairs = f"{len(pairwise.pairs)} pair{'s' if len(pairwise.pairs) > 1 else ''} of masks"

    fig, ax = _figure(7, 4)
    ax.plot(calls, pairwise.iou_by_timestep, marker="o", color="C0", linewidth=2, label="IoU (mean over layers)")
    ax.plot(calls, pairwise.chance_by_timestep, label="chance", **CHANCE_STYLE)
    _call_axis(ax, pairwise.timestep_values, tau)
    ax.set_ylabel("mean pairwise IoU")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Overlap per call index ({pairs})")
    ax.legend(fontsize="small")
    paths = [save_figure(fig, out / "iou_by_timestep.png")]

    fig, ax = _figure(_layer_width(pairwise.layers), 4.5)
    x = np.arange(len(pairwise.layers))
    for offset, values, chance, label in (
        (-0.2, pairwise.iou_by_layer, pairwise.chance_by_layer, "per call (mean over calls)"),
        (0.2, pairwise.union_iou, pairwise.union_chance, "union over calls"),
    ):
        ax.bar(x + offset, values, width=0.4, label=label)
        ax.hlines(chance, x + offset - 0.2, x + offset + 0.2, **CHANCE_STYLE)
    ax.plot([], [], label="chance", **CHANCE_STYLE)  # one legend entry for all the dashes
    _layer_axis(ax, pairwise.layers)
    ax.set_ylabel("mean pairwise IoU")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Overlap per layer ({pairs})")
    ax.legend(fontsize="small")
    paths.append(save_figure(fig, out / "iou_by_layer.png"))

    labels = layer_labels(pairwise.layers)
    fig, ax = _figure(max(5.0, 0.45 * tau + 3.5), max(3.0, 0.3 * len(labels) + 1.5))
    image = ax.imshow(pairwise.iou.T, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    _call_axis(ax, pairwise.timestep_values, tau)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylabel("layer")
    ax.set_title(f"Mean pairwise IoU ({pairs})")
    fig.colorbar(image, ax=ax, label="IoU")
    paths.append(save_figure(fig, out / "iou_heatmap.png"))
    return paths
