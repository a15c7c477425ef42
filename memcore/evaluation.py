"""The scores of ``memcore evaluate``: SSCD against ground-truth images, CLIP score, FID and KID,
per image and summarized per method, the comparison figure and the per-image table.

A run generates images for (prompt, seed) pairs under several methods (:data:`METHODS`) and scores
each image as it comes out of the pipeline, in memory. Images become tensors exactly as saving them
as PNG and reading them back would (8-bit RGB divided by 255), so scores of the saved files equal
the scores taken in memory. The models are those of :mod:`memcore.metrics`; the aggregation is in
``docs/metrics.md`` ("evaluate's scores").
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from memcore import metrics
from memcore.errors import MemcoreError, Pass
from memcore.io import atomic_file

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "FORMAT",
    "METHODS",
    "FIDReference",
    "GroundTruth",
    "ScoredBatch",
    "Scorers",
    "compare",
    "draw_comparison",
    "images_to_tensor",
    "load_scorers",
    "read_image",
    "score_images",
    "summarize",
    "write_per_image_csv",
]

FORMAT = "memcore.evaluation/1"
"""The ``format`` of a run folder's ``summary.json``."""
METHODS = ("none", "pruned", "wen")
"""The methods, in the order tables and figures show them: the plain model, the model pruned by a
memcore mask, Wen et al.'s inference-time mitigation."""
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
"""clean-fid's defaults: 100 subsets of ``min(1000, N_generated, N_reference)`` features each."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""The files of a FID reference folder that are read as images (case-insensitive); others are ignored."""
CSV_COLUMNS = ("method", "prompt", "seed", "label", "image", "sscd", "clip", "seconds")
FIGURE_SIZE = (11.0, 4.5)
"""Inches; at :data:`memcore.figures.DPI` the comparison figure is 1320 x 540 pixels."""


# --- models ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scorers:
    """The models that score images; a score whose model is None is not taken.

    Attributes:
        sscd: the SSCD TorchScript descriptor, on ``device``.
        sscd_preprocessing: its input convention (:data:`memcore.metrics.PREPROCESSING`).
        clip: a ``(CLIPModel, CLIPProcessor)`` pair, the model on ``device``.
        inception: the TorchScript FID Inception, on ``device``.
        device: where the models run.
    """

    sscd: torch.jit.ScriptModule | None = None
    sscd_preprocessing: str = "wen"
    clip: tuple | None = None
    inception: torch.jit.ScriptModule | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def load_scorers(
    *,
    sscd: str | os.PathLike | None = None,
    sscd_preprocessing: str = "wen",
    clip: str | os.PathLike | None = None,
    inception: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> Scorers:
    """Load the models given (a TorchScript SSCD file, a CLIP folder or hub id in the local cache, a
    TorchScript Inception file) onto ``device``; none is downloaded.

    Raises:
        MemcoreError: a model missing or unreadable (param ``sscd``, ``clip`` or ``inception``, one
            line naming where to get it), or an unknown ``sscd_preprocessing``.
    """
    if sscd_preprocessing not in metrics.PREPROCESSING:
        raise MemcoreError(
            "must be one of {choices}, got {got!r}", "sscd_preprocessing",
            choices=", ".join(metrics.PREPROCESSING), got=sscd_preprocessing,
        )
    device = torch.device(device)
    return Scorers(
        sscd=None if sscd is None else metrics.load_sscd(sscd).to(device),
        sscd_preprocessing=sscd_preprocessing,
        clip=None if clip is None else metrics.load_clip(clip, device),
        inception=None if inception is None else metrics.load_inception(inception).to(device),
        device=device,
    )


# --- images ---------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike, param: str) -> Image.Image:
    """The image at ``path``, decoded and in RGB.

    Raises:
        MemcoreError: the file cannot be read or decoded (param ``param``, one line naming the file).
    """
    from PIL import Image

    shown = os.fspath(path)
    try:
        with Image.open(shown) as image:
            return image.convert("RGB")  # convert loads (decodes) the whole image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise MemcoreError("{path}: not a readable image ({reason})", param, path=shown, reason=reason) from None


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> float32 ``[N, 3, H, W]`` in [0, 1]: the 8-bit RGB values divided by
    255, as saving them as PNG and reading them back would give."""
    if not images:
        raise ValueError("images: need at least one image")
    arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images: all images must have one size, got {sorted(s[1::-1] for s in shapes)} (width, height)")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


# --- ground truth ---------------------------------------------------------------------------------


def ground_truth_files(folder: str | os.PathLike, num_prompts: int) -> dict[int, list[Path]]:
    """Each prompt's training images in ``folder``, named by the prompt's index (``NNNN.EXT``,
    ``NNNN_K.EXT``: :func:`memcore.fetch.find_images`), or a one-line error (param
    ``ground_truth``): the folder is missing, holds no such image, or names a prompt the list does
    not have."""
    from memcore.fetch import find_images

    shown = os.fspath(folder)
    if not Path(shown).is_dir():
        what = "not a folder" if Path(shown).exists() else "no such folder"
        raise MemcoreError("{path}: {what}", "ground_truth", path=shown, what=what)
    found = find_images(shown)
    if not found:
        raise MemcoreError(
            "{path}: no image named by a prompt's index (NNNN.png, NNNN_K.png; 'memcore data fetch-images' writes them)",
            "ground_truth", path=shown,
        )
    for index, paths in found.items():
        if index >= num_prompts:
            raise MemcoreError(
                "{file}: names prompt {index} but the list has {count} prompt{s} (images are named by the prompt's index, from 0)",
                "ground_truth", file=os.fspath(paths[0]), index=index, count=num_prompts, s="" if num_prompts == 1 else "s",
            )
    return found


@dataclass(frozen=True)
class GroundTruth:
    """The training images of the prompts, as SSCD embeddings.

    Attributes:
        folder: where the images are, named by the prompt's index in the prompt list
            (``NNNN.EXT``, ``NNNN_K.EXT`` for more than one: :func:`memcore.fetch.find_images`).
        num_prompts: the length of the prompt list.
        files: the images of each prompt that has any, by prompt index.
        embeddings: the L2-normalized SSCD embeddings ``[k, D]`` of each of those prompts' images
            (float32, CPU), in the order of ``files``.
        missing: the prompt indices without an image (they get no SSCD score).
    """

    folder: Path
    num_prompts: int
    files: dict[int, list[Path]]
    embeddings: dict[int, torch.Tensor]
    missing: tuple[int, ...]

    @classmethod
    def load(cls, folder: str | os.PathLike, num_prompts: int, scorers: Scorers) -> GroundTruth:
        """Read every image of ``folder`` and embed it with ``scorers.sscd`` (eagerly, one image at a
        time: their sizes differ).

        Raises:
            MemcoreError (param ``ground_truth``, one line): the folder is missing or holds no image
                named by a prompt index; an image names a prompt the list does not have; an image
                cannot be read; no SSCD model was given.
        """
        shown = os.fspath(folder)
        if scorers.sscd is None:
            raise MemcoreError(
                "the ground-truth images serve the SSCD scores only; {sscd}", "ground_truth", sscd=Pass("sscd", "PATH")
            )
        found = ground_truth_files(folder, num_prompts)
        embeddings = {}
        for index, paths in found.items():
            rows = [_sscd_embed(scorers, images_to_tensor([read_image(p, "ground_truth")])) for p in paths]
            embeddings[index] = torch.cat(rows)
        missing = tuple(i for i in range(num_prompts) if i not in found)
        return cls(Path(shown), num_prompts, found, embeddings, missing)


def _sscd_embed(scorers: Scorers, images: torch.Tensor) -> torch.Tensor:
    return metrics.sscd_embed(scorers.sscd, images.to(scorers.device), scorers.sscd_preprocessing)


# --- per-image scores -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoredBatch:
    """The scores of a batch of generated images, one entry per image.

    Attributes:
        sscd: the largest SSCD similarity to the prompt's ground-truth images; None without an SSCD
            model or ground truth, or for a prompt without ground-truth images.
        clip: the CLIP score against the prompt (None without a CLIP model).
        features: Inception features ``[N, 2048]`` float64 (None without an Inception model).
    """

    sscd: list[float | None]
    clip: list[float | None]
    features: np.ndarray | None


def score_images(
    scorers: Scorers,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    prompt_indices: Sequence[int],
    ground_truth: GroundTruth | None = None,
) -> ScoredBatch:
    """Score generated images (all of one size, as the pipeline returns them).

    Args:
        images: the PIL images.
        prompts: the prompt of each image (its text, one per image).
        prompt_indices: the index of each image's prompt in the prompt list (the ground truth's names).
        ground_truth: the prompts' training images; without it no SSCD score is taken.
    """
    n = len(images)
    if len(prompts) != n or len(prompt_indices) != n:
        raise ValueError(f"prompts, prompt_indices: {len(prompts)} prompts and {len(prompt_indices)} indices for {n} images")
    pixels = images_to_tensor(images)
    sscd: list[float | None] = [None] * n
    if ground_truth is not None and scorers.sscd is not None:
        for i in prompt_indices:
            if not 0 <= i < ground_truth.num_prompts:
                raise ValueError(f"prompt_indices: {i} is not an index of the {ground_truth.num_prompts} prompts")
        embedded = _sscd_embed(scorers, pixels)
        for i, index in enumerate(prompt_indices):
            reference = ground_truth.embeddings.get(index)
            if reference is not None:
                sscd[i] = float(metrics.sscd_scores(embedded[i : i + 1], reference)[0])
    clip: list[float | None] = [None] * n
    if scorers.clip is not None:
        model, processor = scorers.clip
        clip = [float(v) for v in metrics.clip_score(model, processor, pixels, list(prompts))]
    features = None
    if scorers.inception is not None:
        features = metrics.inception_features(scorers.inception, pixels.to(scorers.device))
    return ScoredBatch(sscd, clip, features)


# --- FID reference --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FIDReference:
    """The reference of FID and KID.

    Attributes:
        path: the folder of images or the ``.npz`` file it came from.
        mu, sigma: the mean and covariance of its Inception features (float64).
        features: those features ``[N, 2048]``, from a folder only (a ``.npz`` of statistics has
            none, and KID needs them).
    """

    path: Path
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None

    @classmethod
    def load(cls, path: str | os.PathLike, scorers: Scorers) -> FIDReference:
        """A folder of images (their features computed with ``scorers.inception``; files named with
        :data:`IMAGE_SUFFIXES`, hidden files ignored) or a ``.npz`` written by
        :func:`memcore.metrics.save_fid_statistics` (``mu`` and ``sigma``).

        Raises:
            MemcoreError (param ``fid_reference``, one line): a missing path, a folder with fewer than
                2 images or an unreadable image in it, an unreadable or malformed ``.npz``, a folder
                without an Inception model.
        """
        shown = os.fspath(path)
        p = Path(shown)
        if p.is_file():
            if p.suffix.lower() != ".npz":
                raise MemcoreError(
                    "{path}: neither a folder of images nor a .npz file of FID statistics", "fid_reference", path=shown
                )
            mu, sigma = metrics.load_fid_statistics(p)
            return cls(p, mu, sigma, None)
        if not p.is_dir():
            raise MemcoreError("{path}: no such file or folder", "fid_reference", path=shown)
        if scorers.inception is None:
            raise MemcoreError(
                "{path}: a folder of images needs the Inception model to compute its features; {inception}",
                "fid_reference", path=shown, inception=Pass("inception", "PATH"),
            )
        files = sorted(f for f in p.iterdir() if not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if len(files) < 2:
            raise MemcoreError(
                "{path}: {count} image{s} here; FID needs at least 2 ({suffixes})", "fid_reference",
                path=shown, count=len(files), s="" if len(files) == 1 else "s", suffixes=", ".join(IMAGE_SUFFIXES),
            )
        features = np.concatenate(list(_reference_features(files, scorers)))
        mu, sigma = metrics.fid_statistics(features)
        return cls(p, mu, sigma, features)


def _reference_features(files: list[Path], scorers: Scorers, batch_size: int = 32) -> Iterable[np.ndarray]:
    """Inception features of ``files`` in order, in batches of consecutive images of one size."""
    batch: list[Image.Image] = []
    for file in files:
        image = read_image(file, "fid_reference")
        if batch and (image.size != batch[0].size or len(batch) == batch_size):
            yield metrics.inception_features(scorers.inception, images_to_tensor(batch).to(scorers.device))
            batch = []
        batch.append(image)
    if batch:
        yield metrics.inception_features(scorers.inception, images_to_tensor(batch).to(scorers.device))


# --- summaries ------------------------------------------------------------------------------------


def _number(row: dict, key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"rows: {key} is {value} for prompt {row.get('prompt')}, seed {row.get('seed')}")
    return value


def _threshold_key(threshold: float) -> str:
    return f"above_{threshold:g}"


def _sscd_summary(scored: list[tuple[int, float]], thresholds: Sequence[float]) -> dict:
    """``scored``: (prompt, score) of each scored image."""
    by_prompt: dict[int, list[float]] = {}
    for prompt, value in scored:
        by_prompt.setdefault(prompt, []).append(value)
    flat = metrics.summarize_sscd(torch.tensor([v for _, v in scored], dtype=torch.float64), tuple(thresholds))
    prompt_means = [math.fsum(values) / len(values) for values in by_prompt.values()]
    return {
        "score": math.fsum(prompt_means) / len(prompt_means),
        "mean": flat.mean,
        "max": max(v for _, v in scored),
        **{_threshold_key(t): flat.share_above[float(t)] for t in thresholds},
        "images": len(scored),
        "prompts": len(by_prompt),
    }


def summarize(
    rows: Sequence[dict],
    features: np.ndarray | None = None,
    reference: FIDReference | None = None,
    labels: Sequence[str] | None = None,
    thresholds: Sequence[float] = metrics.SSCD_THRESHOLDS,
) -> dict:
    """The summary of ONE method's images (a JSON-safe dict, no NaN).

    Args:
        rows: one dict per image with at least ``prompt`` (its index in the prompt list), ``seed``,
            ``sscd``, ``clip`` and ``seconds`` (each a number or None).
        features: the Inception features of the images ``[N, 2048]`` (any order), or None.
        reference: the FID reference, or None.
        labels: the label of each prompt of the list (:func:`memcore.datasets.labels`), or None.
        thresholds: the SSCD thresholds whose shares are reported (strictly above).

    Returns:
        ``images``, ``prompts`` (distinct prompts), ``sscd``, ``clip``, ``fid``, ``kid``, ``seconds``
        and ``notes`` (sentences on what could not be computed); a score whose model was not given is
        None. Definitions: ``docs/metrics.md``, "evaluate's scores".
    """
    notes: list[str] = []
    prompts = [int(row["prompt"]) for row in rows]
    sscd_values = [_number(row, "sscd") for row in rows]
    clip_values = [_number(row, "clip") for row in rows]
    seconds = [_number(row, "seconds") for row in rows]

    scored = [(p, v) for p, v in zip(prompts, sscd_values, strict=True) if v is not None]
    sscd = None
    if scored:
        sscd = _sscd_summary(scored, thresholds)
        unscored = len(set(prompts)) - sscd["prompts"]
        if unscored:
            notes.append(f"{unscored} prompt{'s have' if unscored > 1 else ' has'} no ground-truth image and no SSCD score")
        if labels is not None:
            for p in set(prompts):
                if not 0 <= p < len(labels):
                    raise ValueError(f"labels: {len(labels)} labels, but a row has prompt {p}")
            groups: dict[str, list[tuple[int, float]]] = {}
            for p, v in scored:
                groups.setdefault(labels[p], []).append((p, v))
            sscd["by_label"] = {label: _sscd_summary(groups[label], thresholds) for label in sorted(groups)}

    clip = None
    clipped = [(p, v) for p, v in zip(prompts, clip_values, strict=True) if v is not None]
    if clipped:
        by_prompt: dict[int, list[float]] = {}
        for p, v in clipped:
            by_prompt.setdefault(p, []).append(v)
        means = [math.fsum(vs) / len(vs) for vs in by_prompt.values()]
        clip = {
            "score": math.fsum(means) / len(means),
            "mean": math.fsum(v for _, v in clipped) / len(clipped),
            "images": len(clipped),
        }

    fid = kid = None
    if features is not None and reference is not None:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != reference.mu.shape[0]:
            raise MemcoreError(
                "{path}: statistics of {d} features, the Inception gives {shape}", "fid_reference",
                path=os.fspath(reference.path), d=reference.mu.shape[0], shape=f"{tuple(features.shape)}",
            )
        if features.shape[0] < 2:
            notes.append(f"FID and KID need at least 2 images, got {features.shape[0]}")
        else:
            mu, sigma = metrics.fid_statistics(features)
            fid = metrics.frechet_distance(mu, sigma, reference.mu, reference.sigma)
            if reference.features is None:
                notes.append("no KID: the FID reference is a .npz of statistics; KID needs a folder of reference images")
            else:
                size = min(KID_SUBSET_SIZE, features.shape[0], reference.features.shape[0])
                mean, std = metrics.kid(features, reference.features, subsets=KID_SUBSETS, subset_size=size)
                kid = {"mean": mean, "std": std, "subsets": KID_SUBSETS, "subset_size": size}

    timed = [s for s in seconds if s is not None]
    total = math.fsum(timed)
    return {
        "images": len(rows),
        "prompts": len(set(prompts)),
        "sscd": sscd,
        "clip": clip,
        "fid": fid,
        "kid": kid,
        "seconds": {"total": total, "per_image": total / len(timed)} if timed else None,
        "notes": notes,
    }


# --- tables and figures ---------------------------------------------------------------------------


def _method_order(method: str) -> tuple[int, str]:
    return (METHODS.index(method), "") if method in METHODS else (len(METHODS), method)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_per_image_csv(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write one line per image, columns :data:`CSV_COLUMNS` (an empty cell for None or a missing
    key), sorted by method (:data:`METHODS` first, in that order, then others by name), prompt and
    seed; atomically. Floats are written with ``repr`` (they read back exactly)."""
    ordered = sorted(rows, key=lambda r: (_method_order(r["method"]), int(r["prompt"]), int(r["seed"])))
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for row in ordered:
            writer.writerow([_cell(row.get(column)) for column in CSV_COLUMNS])
    return path


def _score(summary: dict, metric: str) -> float | None:
    part = summary.get(metric)
    return part.get("score") if isinstance(part, dict) else None


def draw_comparison(points: Sequence[tuple[str, dict]], path: str | os.PathLike) -> Path:
    """The figure comparing methods, as a PNG of :data:`FIGURE_SIZE` at ``figures.DPI``, written
    atomically: left, the CLIP score (y) against the SSCD similarity (x), one labelled point per
    method that has both; right, the seconds per image of each method that has them (bars).

    ``points`` are (label, summary) pairs, the summaries of :func:`summarize`.
    """
    from memcore.figures import DPI, require_matplotlib

    require_matplotlib()
    from matplotlib.figure import Figure  # a Figure made directly draws with Agg, whatever the backend

    fig = Figure(figsize=FIGURE_SIZE, layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    colours = [f"C{k % 10}" for k in range(len(points))]  # one colour per point, in both panels
    shown = [(k, label, _score(s, "sscd"), _score(s, "clip")) for k, (label, s) in enumerate(points)]
    shown = [(k, label, x, y) for k, label, x, y in shown if x is not None and y is not None]
    for k, label, x, y in shown:
        left.scatter([x], [y], s=60, color=colours[k], zorder=3)
        left.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize="small")
    if shown:
        left.margins(0.2)
    else:
        left.text(0.5, 0.5, "no method has both SSCD and CLIP scores", ha="center", va="center", transform=left.transAxes)
    left.set_xlabel("SSCD similarity to the training image (lower: less memorization)")
    left.set_ylabel("CLIP score (higher: follows the prompt)")
    left.set_title("Memorization against prompt fidelity")
    left.grid(alpha=0.3)

    timed = [(k, label, s["seconds"]["per_image"]) for k, (label, s) in enumerate(points) if isinstance(s.get("seconds"), dict)]
    if timed:
        right.bar(range(len(timed)), [t for _, _, t in timed], color=[colours[k] for k, _, _ in timed])
        right.set_xticks(range(len(timed)), [label for _, label, _ in timed], rotation=30, ha="right", rotation_mode="anchor")
    else:
        right.text(0.5, 0.5, "no timings", ha="center", va="center", transform=right.transAxes)
    right.set_ylabel("seconds per image")
    right.set_title("Generation time")
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _read_summary(folder: str | os.PathLike) -> dict:
    shown = os.fspath(folder)
    file = Path(shown) / "summary.json"
    if not Path(shown).is_dir():
        raise MemcoreError("{folder}: no such folder", folder=shown)
    if not file.is_file():
        raise MemcoreError("{folder}: no summary.json here (not a finished evaluate run)", folder=shown)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise MemcoreError("{file}: not a readable evaluate summary ({reason})", file=os.fspath(file), reason=reason) from None
    problem = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        problem = f"format is {got!r}, not {FORMAT!r}"
    elif not isinstance(data.get("methods"), dict) or not data["methods"]:
        problem = "no methods"
    elif not all(isinstance(s, dict) for s in data["methods"].values()):
        problem = "a method's summary is not an object"
    if problem is not None:
        raise MemcoreError("{file}: not an evaluate summary ({problem})", file=os.fspath(file), problem=problem)
    return data


def compare(dirs: Sequence[str | os.PathLike], out_path: str | os.PathLike) -> Path:
    """Draw :func:`draw_comparison` of every method of the finished runs ``dirs`` (each with a
    ``summary.json`` of :data:`FORMAT`) at ``out_path``. Points are labelled ``DIR/method`` (DIR the
    folder's name, or its path as given when two names are alike), or ``method`` for a single run.

    Raises:
        MemcoreError: a folder without a readable ``summary.json`` of this format (one line naming it).
    """
    if not dirs:
        raise ValueError("dirs: need at least one run folder")
    summaries = [_read_summary(d) for d in dirs]
    names = [Path(os.fspath(d)).resolve().name or os.fspath(d) for d in dirs]
    if len(set(names)) < len(names):
        names = [os.fspath(d) for d in dirs]
    points = []
    for name, data in zip(names, summaries, strict=True):
        for method in sorted(data["methods"], key=_method_order):
            points.append((method if len(dirs) == 1 else f"{name}/{method}", data["methods"][method]))
    return draw_comparison(points, out_path)
