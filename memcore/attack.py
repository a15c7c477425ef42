"""The extraction attack of Carlini et al. (2023): generate many samples per prompt, flag the prompts
whose samples collapse onto one image (``memcore attack``; docs/attack.md).

Carlini, Hayes, Nasr, Jagielski, Sehwag, Tramèr, Balle, Ippolito and Wallace, "Extracting Training
Data from Diffusion Models", USENIX Security 2023 (arXiv:2301.13188), section 4 (the
generate-and-filter attack on Stable Diffusion). For each prompt they generate many samples from
independent noise, connect two samples when they are near-identical, and flag the prompt when the
largest clique of that graph is large: a model that memorized an image emits it again and again.

**Distance** (:func:`tiled_l2`). Carlini et al. measure closeness with the l2 distance normalized
by the dimension, ``sqrt(sum_i (a_i - b_i)^2 / d)`` (their Figure 1 reports 0.031 for a copy, on
pixels in [0, 1]), and for Stable Diffusion they split each 512 x 512 image into 16 non-overlapping
128 x 128 tiles and take the **maximum** over the 16 pairs of corresponding tiles, so that a shared
plain background cannot hide a different subject. memcore cuts every image into a 4 x 4 grid of
tiles (128 x 128 at 512 px; the side must be a multiple of 4), takes each pair of tiles' normalized
l2 distance on the 8-bit pixel scale (values 0..255, ``scale=255``), and the maximum over tiles::

    tiled_l2(a, b) = max over tiles t of sqrt( mean over the 3 * h * w values v of t of (255 * (a_v - b_v))^2 )

with ``a``, ``b`` in [0, 1]. The default threshold 50 is thus an RMS difference of 50 gray levels
(0.196 on [0, 1]) in the worst tile. The tiling, the maximum and the normalization are from the
paper's section 4 as read by memcore's authors (the searchable copies returned only its opening
pages); the pixel scale is memcore's choice: no source found gives the scale on which the threshold
50 was published, and 255 is the one on which 50 is a near-copy criterion (Figure 1's copy is at 0.031,
8 gray levels; two independent uniform noise images are about 104 apart) (on [0, 1] a normalized distance never exceeds 1; an unnormalized one depends
on the tile size). The normalization makes the distance independent of the image size, so the same
threshold serves 64 px test images and 512 px ones (docs/attack.md).

**Graph** (:func:`cliques`). Samples ``i != j`` are joined when ``distance[i, j] < threshold``
(strictly: a pair exactly at the threshold is not joined). The largest clique is found with
``networkx.find_cliques`` over every maximal clique; among cliques of the largest size the one whose
sorted member list is lexicographically smallest wins, so the answer does not depend on networkx's
enumeration order. A prompt is **flagged** when its largest clique has at least ``min_size`` members.

**True copies** (:func:`match`). A flagged clique is a true copy of the prompt's training image when
the **median** over the clique's members of their distance to that image is below the threshold
(strictly). Carlini et al. call a clique extracted when the image it agrees on is the training
image; the median asks that of the clique as a whole (at least half its members within the
threshold) without letting one stray member veto it. The training image is resized to the samples'
size first (:func:`tiled_l2_to`). A prompt with several training images (``NNNN_K``) is matched
when any of them is.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from memcore.errors import MemcoreError

GRID = 4  # tiles per side: 16 tiles, 128 x 128 at 512 px (Carlini et al.)
PIXEL_SCALE = 255.0  # distances on the 8-bit pixel scale
THRESHOLD = 50.0
MIN_CLIQUE = 3
FORMAT = "memcore.attack/1"
CSV_COLUMNS = ("prompt", "text", "clique_size", "flagged", "matched", "clique_distance", "clique_seeds")
PICTURES = "pictures"
THUMB = 128  # height of each image in a picture


# --- distances --------------------------------------------------------------------------------------


def _tiles(images: torch.Tensor, grid: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[grid * grid, N, C * H/grid * W/grid]``: each image's tiles, row-major."""
    if images.dim() != 4:
        raise ValueError(f"images: expected [N, C, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if h % grid or w % grid:
        raise ValueError(f"images: {w}x{h} pixels do not split into {grid} x {grid} tiles (each side must be a multiple of {grid})")
    x = images.reshape(n, c, grid, h // grid, grid, w // grid).permute(2, 4, 0, 1, 3, 5)
    return x.reshape(grid * grid, n, -1)


def _tiled(a: torch.Tensor, b: torch.Tensor, grid: int, scale: float) -> torch.Tensor:
    """``[Na, Nb]`` tiled distances between two batches of one size (float64)."""
    ta, tb = _tiles(a.double(), grid), _tiles(b.double(), grid)
    # one cdist per tile position, computed from the differences (not the Gram trick, which loses
    # digits near 0): [T, Na, Nb]
    d = torch.cdist(ta, tb, compute_mode="donot_use_mm_for_euclid_dist")
    return d.amax(dim=0) * (scale / math.sqrt(ta.shape[-1]))


def tiled_l2(a: torch.Tensor, b: torch.Tensor, grid: int = GRID, scale: float = PIXEL_SCALE) -> float:
    """The tiled l2 distance of two images ``[3, H, W]`` in [0, 1] (see the module docstring)."""
    if a.shape != b.shape:
        raise ValueError(f"images of shapes {tuple(a.shape)} and {tuple(b.shape)}: need one size")
    return float(_tiled(a[None], b[None], grid, scale)[0, 0])


def pairwise_tiled_l2(images: torch.Tensor, grid: int = GRID, scale: float = PIXEL_SCALE) -> torch.Tensor:
    """``[N, N]`` float64 tiled distances between every pair of ``images`` ``[N, 3, H, W]`` (on their
    device; the diagonal is 0, the matrix symmetric)."""
    d = _tiled(images, images, grid, scale)
    d = torch.minimum(d, d.T)  # exactly symmetric whatever the reduction order
    d.fill_diagonal_(0.0)
    return d


def resize_to(reference: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``reference`` ``[3, h, w]`` in [0, 1] at ``height`` x ``width``: bicubic with antialiasing
    (``torch.nn.functional.interpolate``, ``align_corners=False``), clamped to [0, 1]; unchanged
    when already that size."""
    if tuple(reference.shape[-2:]) == (height, width):
        return reference
    out = torch.nn.functional.interpolate(
        reference[None].double(), size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )[0]
    return out.clamp(0.0, 1.0)


def tiled_l2_to(images: torch.Tensor, reference: torch.Tensor, grid: int = GRID, scale: float = PIXEL_SCALE) -> torch.Tensor:
    """``[N]`` float64 tiled distance of each of ``images`` ``[N, 3, H, W]`` to one training image
    ``[3, h, w]``, resized to ``H x W`` first (:func:`resize_to`)."""
    h, w = images.shape[-2:]
    ref = resize_to(reference.to(images.device), h, w)
    return _tiled(images, ref[None], grid, scale)[:, 0]


# --- cliques ----------------------------------------------------------------------------------------


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold <= 0:
        raise MemcoreError(f"must be a finite number above 0, got {threshold!r}", param="threshold")
    return float(threshold)


def check_min_size(min_size) -> int:
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 2:
        raise MemcoreError(f"must be an integer of at least 2, got {min_size!r}", param="min_clique")
    return min_size


@dataclass(frozen=True)
class Clique:
    """The largest clique of one prompt's samples: positions in the sample list, ascending."""

    members: tuple[int, ...]
    flagged: bool

    @property
    def size(self) -> int:
        return len(self.members)


def graph(distances: torch.Tensor, threshold: float):
    """The networkx graph on ``range(N)`` with an edge ``i - j`` (i != j) where ``distances[i, j] <
    threshold`` and ``distances[j, i] < threshold``."""
    import networkx as nx

    d = torch.as_tensor(distances)
    if d.dim() != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distances: expected a square matrix, got shape {tuple(d.shape)}")
    near = (d < threshold) & (d.T < threshold)
    near.fill_diagonal_(False)
    g = nx.Graph()
    g.add_nodes_from(range(d.shape[0]))
    g.add_edges_from((i, j) for i, j in torch.nonzero(torch.triu(near, 1)).tolist())
    return g


def cliques(distances: torch.Tensor, threshold: float = THRESHOLD, min_size: int = MIN_CLIQUE) -> Clique:
    """The largest clique of the graph of :func:`graph` (ties: the lexicographically smallest sorted
    member list), flagged when it has at least ``min_size`` members."""
    import networkx as nx

    threshold, min_size = check_threshold(threshold), check_min_size(min_size)
    g = graph(distances, threshold)
    if g.number_of_nodes() == 0:
        return Clique((), False)
    best = min((tuple(sorted(c)) for c in nx.find_cliques(g)), key=lambda c: (-len(c), c))
    return Clique(best, len(best) >= min_size)


def match(to_reference: torch.Tensor, members: Sequence[int], threshold: float = THRESHOLD) -> tuple[bool, float]:
    """(matched, median distance): whether the median over ``members`` of ``to_reference`` (each
    sample's distance to the training image; for an even count the mean of the two middle values)
    is below ``threshold`` (strictly)."""
    if not members:
        raise ValueError("members: an empty clique matches nothing")
    values = sorted(float(v) for v in torch.as_tensor(to_reference, dtype=torch.float64)[list(members)])
    k = len(values) // 2
    median = values[k] if len(values) % 2 else (values[k - 1] + values[k]) / 2
    return median < threshold, median


# --- inputs -----------------------------------------------------------------------------------------


def sample_name(prompt: int, seed: int) -> str:
    """The file of a sample, as ``memcore generate`` names its images."""
    from memcore.generate import image_name

    return image_name(prompt, seed)


def images_folder(folder: str | os.PathLike) -> Path:
    """Where the samples of ``--from-images DIR`` are: ``DIR/images`` when it exists (the layout
    ``memcore generate`` writes), else ``DIR`` itself."""
    folder = Path(folder)
    return folder / "images" if (folder / "images").is_dir() else folder


def check_sample_files(folder: str | os.PathLike, num_prompts: int, seeds: Sequence[int]) -> Path:
    """The folder holding ``p{prompt:03d}_s{seed}.png`` for every prompt and seed, once each file
    is there and its header reads as an image of a size split by the tiles, one size per prompt;
    else a one-line error (param ``from_images``)."""
    from PIL import Image

    shown = os.fspath(folder)
    if not Path(shown).is_dir():
        what = "not a folder" if Path(shown).exists() else "no such folder"
        raise MemcoreError("{path}: {what}", "from_images", path=shown, what=what)
    where = images_folder(shown)
    for prompt in range(num_prompts):
        size = None
        for seed in seeds:
            path = where / sample_name(prompt, seed)
            if not path.is_file():
                raise MemcoreError(
                    "{path}: missing (every prompt needs seeds 0..{last}, named p{{prompt:03d}}_s{{seed}}.png)",
                    "from_images", path=os.fspath(path), last=seeds[-1],
                )
            try:
                with Image.open(path) as image:
                    this = image.size
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                raise MemcoreError("{path}: not a readable image ({reason})", "from_images", path=os.fspath(path), reason=reason) from None
            if size is not None and this != size:
                raise MemcoreError(
                    "{path}: {w}x{h} pixels, but the prompt's other samples are {w0}x{h0}", "from_images",
                    path=os.fspath(path), w=this[0], h=this[1], w0=size[0], h0=size[1],
                )
            size = this
            if this[0] % GRID or this[1] % GRID:
                raise MemcoreError(
                    "{path}: {w}x{h} pixels; each side must be a multiple of {grid} (the tiles)", "from_images",
                    path=os.fspath(path), w=this[0], h=this[1], grid=GRID,
                )
    return where


def load_training_images(folder: str | os.PathLike, num_prompts: int) -> dict[int, list[torch.Tensor]]:
    """Each prompt's training images ``[3, h, w]`` in [0, 1], from a folder named as for
    ``memcore evaluate --ground-truth`` (``NNNN.EXT``, ``NNNN_K.EXT``: :func:`memcore.fetch.find_images`);
    a one-line error (param ``ground_truth``) for a missing folder, one without such images, an
    image naming a prompt the list does not have, or an unreadable image."""
    from memcore.evaluation import ground_truth_files, images_to_tensor, read_image

    found = ground_truth_files(folder, num_prompts)
    return {i: [images_to_tensor([read_image(p, "ground_truth")])[0] for p in paths] for i, paths in found.items()}


def read_samples(folder: Path, prompt: int, seeds: Sequence[int], param: str = "from_images") -> torch.Tensor:
    """``[S, 3, H, W]`` float32 in [0, 1]: the prompt's samples, in the order of ``seeds``."""
    from memcore.evaluation import images_to_tensor, read_image

    images = [read_image(folder / sample_name(prompt, seed), param) for seed in seeds]
    try:
        return images_to_tensor(images)
    except ValueError as error:
        raise MemcoreError(f"prompt {prompt}: {error}", param=param) from None


# --- one prompt -------------------------------------------------------------------------------------


def analyze_prompt(
    samples: torch.Tensor, seeds: Sequence[int], threshold: float, min_size: int, training: list[torch.Tensor] | None,
) -> dict:
    """The row of one prompt: largest clique (as seeds), flagged, and with training images the
    clique's median distance to the best-matching one and whether it is a true copy."""
    distances = pairwise_tiled_l2(samples)
    clique = cliques(distances, threshold, min_size)
    row = {
        "clique_size": clique.size,
        "flagged": clique.flagged,
        "clique_seeds": [int(seeds[i]) for i in clique.members],
        "matched": None,
        "clique_distance": None,
        "reference": None,
    }
    if training:
        best = None
        for k, reference in enumerate(training):
            matched, median = match(tiled_l2_to(samples, reference), clique.members, threshold)
            if best is None or median < best[1]:
                best = (matched, median, k)
        row["clique_distance"] = round(best[1], 6)
        row["reference"] = best[2]
        row["matched"] = bool(best[0]) if clique.flagged else None
    return row


# --- outputs ----------------------------------------------------------------------------------------


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([_cell(row[c]) for c in CSV_COLUMNS])


def summarize(rows: list[dict], settings: dict, with_ground_truth: bool) -> dict:
    flagged = [r for r in rows if r["flagged"]]
    return {
        "format": FORMAT,
        "prompts": len(rows),
        "flagged": len(flagged),
        "true_copies": sum(bool(r["matched"]) for r in flagged) if with_ground_truth else None,
        "with_training_image": sum(r["clique_distance"] is not None for r in rows) if with_ground_truth else None,
        "flagged_prompts": [r["prompt"] for r in flagged],
        "distance": {
            "definition": "max over a 4x4 grid of tiles of the RMS pixel difference on the 0..255 scale "
            "(Carlini et al. 2023, tiled l2); docs/attack.md",
            "grid": GRID,
            "pixel_scale": PIXEL_SCALE,
            "edge": "distance < threshold",
            "true_copy": "median distance of the clique's members to the training image < threshold",
        },
        "settings": settings,
    }


def draw_picture(samples: torch.Tensor, seeds: Sequence[int], row: dict, training: list[torch.Tensor] | None, path: Path) -> None:
    """One flagged prompt: its clique's images in a row (height THUMB each), after the training
    image when given, with a caption."""
    from PIL import Image, ImageDraw, ImageFont

    def thumb(t: torch.Tensor) -> Image.Image:
        array = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        image = Image.fromarray(array)
        return image.resize((max(1, round(image.width * THUMB / image.height)), THUMB), Image.Resampling.BICUBIC)

    position = {int(s): i for i, s in enumerate(seeds)}
    tiles = []
    if training:
        tiles.append(("training image", thumb(training[row["reference"] or 0])))
    tiles += [(f"seed {s}", thumb(samples[position[s]])) for s in row["clique_seeds"]]
    gap, band, margin = 6, 16, 8
    font = ImageFont.load_default(size=12)
    caption = f"prompt {row['prompt']}: clique of {row['clique_size']}"
    if row["matched"] is not None:
        caption += f", {'a true copy' if row['matched'] else 'not the training image'} (median distance {row['clique_distance']:.1f})"
    width = 2 * margin + max(sum(t.width for _, t in tiles) + gap * (len(tiles) - 1), math.ceil(font.getlength(caption)))
    height = 2 * margin + band + THUMB + band
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((margin, margin), caption, fill="black", font=font)
    x = margin
    for label, image in tiles:
        picture.paste(image, (x, margin + band))
        draw.text((x + image.width / 2, margin + band + THUMB + band / 2), label, fill="dimgray", font=font, anchor="mm")
        x += image.width + gap
    picture.save(path)


def picture_name(prompt: int) -> str:
    return f"{PICTURES}/p{prompt:03d}.png"


# --- the run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackResult:
    out_dir: Path
    summary: dict
    csv: Path


def attack(
    prompts: list[str],
    *,
    out_dir: str | os.PathLike,
    samples: int = 50,
    pipe=None,
    from_images: str | os.PathLike | None = None,
    training: dict[int, list[torch.Tensor]] | None = None,
    threshold: float = THRESHOLD,
    min_size: int = MIN_CLIQUE,
    mask=None,
    force: bool = False,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    ranks=None,
    device=None,
    identity: dict | None = None,
) -> AttackResult | None:
    """Run the attack on ``prompts`` into the new folder ``out_dir`` (see the module docstring).

    The samples are seeds ``0 .. samples - 1``. With ``pipe`` they are generated (every prompt of a
    batch shares each seed's x_T, as ``memcore generate`` does; with ``mask``, after pruning the
    pipeline in place) into ``out_dir/images``; with ``from_images`` they are read from that folder
    (:func:`check_sample_files`). Work is cut into items (generation: one seed over a batch of
    prompts; analysis: one prompt) shared by the processes of a ``torchrun`` launch and resumable
    (:mod:`memcore.runs`): each process analyzes its share of the prompts once every image is
    written, and process 0 writes ``attack.csv``, ``summary.json`` and ``pictures/``.

    The distances are computed on ``device`` (default: the pipeline's device, or the CPU).

    Returns the :class:`AttackResult` on process 0, ``None`` on the others.
    """
    from tqdm.auto import tqdm

    from memcore.io import check_output_dir
    from memcore.runs import Ranks, Run
    from memcore.stats import prompts_sha256

    out = check_output_dir(out_dir, "out_dir")
    threshold, min_size = check_threshold(threshold), check_min_size(min_size)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise MemcoreError(f"must be an integer of at least 2 (a clique needs two samples), got {samples!r}", param="samples")
    if (pipe is None) == (from_images is None):
        raise MemcoreError("give a pipeline to generate with, or a folder of images (from_images), not both", param="from_images")
    from memcore.generate import check_prompts

    prompts = check_prompts(prompts)
    seeds = list(range(samples))
    ranks = ranks or Ranks()
    resolved = None
    run_settings = {
        "prompts_sha256": prompts_sha256(prompts), "prompts": len(prompts), "samples": samples,
        "threshold": threshold, "min_clique": min_size, "grid": GRID, "pixel_scale": PIXEL_SCALE,
        "prompts_with_training_image": None if training is None else sorted(training),
    } | (identity or {})
    source = None
    if from_images is not None:
        source = check_sample_files(from_images, len(prompts), seeds)
        run_settings["from_images"] = os.path.abspath(from_images)
    else:
        run_settings |= _generation_settings(pipe, prompts, mask, force, steps, guidance, height, width, batch_size)
        resolved = run_settings.pop("_resolved")
    with Run(out, kind="attack", settings=run_settings, ranks=ranks) as run:
        if pipe is not None:
            source = run.folder / "images"
            source.mkdir(exist_ok=True)
            _generate(pipe, prompts, seeds, run, ranks, resolved, force, batch_size, progress)
        run.gather()  # every image is written
        keys = [f"prompt-{i}" for i in range(len(prompts))]
        mine = [i for i in ranks.mine(range(len(prompts))) if not run.done(keys[i])]
        for index in tqdm(mine, desc="attack", unit="prompt", disable=None if progress and ranks.main else True):
            batch = read_samples(source, index, seeds)
            row = analyze_prompt(batch.to(_device(pipe, device)), seeds, threshold, min_size, None if training is None else training.get(index))
            run.record(keys[index], [{"prompt": index} | row])
        run.gather()
        if not ranks.main:
            return None
        rows = [part[0][0] | {"text": prompts[i]} for i, part in enumerate(run.load_all(keys))]
        (run.folder / PICTURES).mkdir(exist_ok=True)
        for row in rows:
            if row["flagged"]:
                ref = None if training is None else training.get(row["prompt"])
                draw_picture(read_samples(source, row["prompt"], seeds), seeds, row, ref, run.folder / picture_name(row["prompt"]))
        shown = run_settings | {"processes": ranks.world}
        summary = summarize(rows, shown, training is not None)
        write_csv(rows, run.folder / "attack.csv")
        (run.folder / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return AttackResult(out_dir=out, summary=summary, csv=out / "attack.csv")


def _device(pipe, device) -> torch.device:
    """Where the distances are computed: ``device`` when given, else the pipeline's, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device(getattr(pipe, "device", "cpu")) if pipe is not None else torch.device("cpu")


def _generation_settings(pipe, prompts, mask, force, steps, guidance, height, width, batch_size) -> dict:
    from memcore.config import LocalizeConfig, check_batch_size, check_guidance, check_image_settings, resolve_generation
    from memcore.generate import load_checked_mask, mask_sha256, run_identity

    check_batch_size(batch_size)
    check_image_settings(steps, height, width)
    check_guidance(guidance)
    mask, _ = load_checked_mask(pipe, mask, force)
    settings = resolve_generation(
        pipe, LocalizeConfig(steps=steps, guidance=guidance, height=height, width=width),
        images=min(batch_size, len(prompts)), decode=True,
    )
    return run_identity(pipe, settings) | {
        "device": torch.device(pipe.device).type, "batch_size": batch_size,
        "mask_sha256": None if mask is None else mask_sha256(mask), "force": force,
        "_resolved": (settings, mask),
    }


def _generate(pipe, prompts, seeds, run, ranks, resolved, force, batch_size, progress) -> None:
    """Generate this process's share of the images into ``run.folder/images`` (after pruning with a mask)."""
    from tqdm.auto import tqdm

    from memcore.driver import truncation_reported_once
    from memcore.generate import Latents, generate_item, image_name, save_png, work_items

    settings, mask = resolved
    phase = "original" if mask is None else "pruned"
    items = [item for item in ranks.mine(work_items(len(prompts), seeds, batch_size, phase)) if not run.done(item.key)]
    if not items:
        return
    pipe.set_progress_bar_config(disable=True)
    if mask is not None:
        from memcore.pruning import prune

        prune(pipe, mask, force=force)
    info = {"model": run.settings["model"], "dtype": run.settings["dtype"], "settings": run.settings["settings"],
            "mask_sha256": run.settings["mask_sha256"]}
    latents = Latents(pipe, settings)
    with truncation_reported_once(pipe), tqdm(
        total=sum(len(i.prompts) for i in items), desc="generate" if ranks.world == 1 else f"generate ({ranks})",
        unit="image", disable=None if progress and ranks.main else True,
    ) as bar:
        for item in items:
            images, _ = generate_item(pipe, prompts, item, settings, latents)
            for index, image in zip(item.prompts, images):
                save_png(image, run.folder / "images" / image_name(index, item.seed), info | {
                    "prompt": prompts[index], "prompt_index": index, "seed": item.seed})
            run.record(item.key, [{"prompt": i, "seed": item.seed} for i in item.prompts])
            bar.update(len(images))


# --- compare ----------------------------------------------------------------------------------------


def read_summary(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "summary.json"
    if not Path(folder).is_dir():
        raise MemcoreError("{path}: no such folder", "compare", path=os.fspath(folder))
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MemcoreError("{path}: cannot read it ({reason})", "compare", path=os.fspath(path), reason=str(exc).splitlines()[0]) from None
    if not isinstance(summary, dict) or summary.get("format") != FORMAT:
        raise MemcoreError("{path}: not written by memcore attack", "compare", path=os.fspath(path))
    return summary


def compare_table(before: str | os.PathLike, after: str | os.PathLike) -> str:
    """The before/after table (flagged prompts, true copies, total prompts) of two finished runs."""
    rows = [("", "flagged", "true copies", "total")]
    for label, folder in (("before", before), ("after", after)):
        s = read_summary(folder)
        copies = "-" if s["true_copies"] is None else str(s["true_copies"])
        rows.append((f"{label} ({os.fspath(folder)})", str(s["flagged"]), copies, str(s["prompts"])))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(widths[c]) if c == 0 else cell.rjust(widths[c]) for c, cell in enumerate(r)).rstrip() for r in rows
    )
