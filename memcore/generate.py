"""Pictures of what pruning does: the same prompts and seeds before and after ``W[mask] = 0``.

For every prompt and seed the pipeline's own ``__call__`` generates an image from the x_T that
``torch.manual_seed(seed)`` gives (:func:`memcore.driver.initial_latent`), so an original image and
its pruned counterpart start from the same noise. With a mask, every original is generated first,
then the pipeline is pruned **in place** (no copy of the model is made) and the pruned images are
generated: pass a pipeline you no longer need unpruned.

With ``mitigation="wen"`` (not with a mask) every image is generated from a prompt embedding optimized
first (:mod:`memcore.mitigation`, Wen et al., ICLR 2024), from the same x_T; the manifest records the
settings and each image's optimization (steps, initial and final loss, seconds).

Under ``torchrun`` the processes share the pipeline calls (:mod:`memcore.runs`); each call is one
seed's x_T over a batch of prompts, cut the same way for any number of processes, so the images are
the same bytes. The folder is written in ``out_dir.partial`` and renamed to ``out_dir`` when whole; a
stopped run keeps its finished calls there, and the same command run again resumes it. Each PNG
carries a ``memcore`` text chunk (JSON: prompt, prompt index, seed, model, dtype, settings, mask
sha256, mitigation). The output folder::

    out_dir/images/p{prompt:03d}_s{seed}.png          original images
    out_dir/images/p{prompt:03d}_s{seed}_pruned.png   pruned images (with a mask)
    out_dir/grid.png                                  all of them on one sheet
    out_dir/manifest.json                             prompts, seeds, model, settings, mask summary
                                                      (format memcore.images/1; see load_manifest)

Grid geometry (pixels; W x H is the image size, R prompts, C seeds, B blocks = 2 with a mask else 1)::

    block width  = C * W + (C - 1) * GAP
    grid width   = 2 * MARGIN + B * block width + (B - 1) * BLOCK_GAP
    grid height  = 2 * MARGIN + (HEADER if B == 2 else 0) + SEED_BAND + R * (H + CAPTION)

From the top: the margin; with a mask, a header band naming each block ("original", then
"pruned" to its right); a band of seed labels above each column; then one row per prompt, each image
tile followed below by a caption band holding the prompt (index and text, wrapped to the grid's
inner width over at most two lines, then truncated with "...").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from memcore.config import (
    LocalizeConfig,
    check_batch_size,
    check_guidance,
    check_image_settings,
    check_seed,
    resolve_generation,
)
from memcore.errors import MemcoreError
from memcore.io import check_output_dir
from memcore.schema import IMAGES as MANIFEST_FORMAT
from memcore.schema import check, dumps, parse

MARGIN, GAP, BLOCK_GAP = 8, 4, 24
HEADER, SEED_BAND, CAPTION = 20, 16, 32
CAPTION_LINES, LINE_HEIGHT, FONT_SIZE = 2, 14, 12
MAX_SEEDS = 10_000


@dataclass(frozen=True)
class GenerateResult:
    """What :func:`generate` wrote (paths inside the final ``out_dir``)."""

    out_dir: Path
    grid: Path
    grid_size: tuple[int, int]  # (width, height)
    images: list[Path]  # originals, prompt-major: p000_s<seeds[0]>, p000_s<seeds[1]>, ...
    pruned_images: list[Path]  # same order; empty without a mask
    manifest: Path
    zeroed: int | None  # weights set to zero by the mask; None without a mask


def parse_seeds(text: str) -> list[int]:
    """``"0,1,5-7"`` -> ``[0, 1, 5, 6, 7]``: comma-separated non-negative integers and ranges a-b."""
    seeds: list[int] = []
    for item in str(text).split(","):
        item = item.strip()
        low, sep, high = item.partition("-")
        if not low.strip().isdigit() or (sep and not high.strip().isdigit()):
            raise MemcoreError(
                f"bad item {item!r} in {text!r} (use non-negative integers and ranges like 0-3)", param="seeds"
            )
        start, stop = int(low), int(high) if sep else int(low)
        if stop < start:
            raise MemcoreError(f"range {item!r} runs backwards", param="seeds")
        if len(seeds) + stop - start + 1 > MAX_SEEDS:
            raise MemcoreError(f"more than {MAX_SEEDS} seeds in {text!r}", param="seeds")
        seeds.extend(range(start, stop + 1))
    return check_seeds(seeds)


def check_seeds(seeds) -> list[int]:
    """The seeds as a list, or a one-line error: empty, not an integer, negative, too large, repeated."""
    seeds = list(seeds)
    if not seeds:
        raise MemcoreError("no seeds given", param="seeds")
    seen = set()
    for seed in seeds:
        check_seed(seed, "seeds")
        if seed in seen:
            raise MemcoreError(f"seed {seed} is given twice", param="seeds")
        seen.add(seed)
    return seeds


def grid_size(num_prompts: int, num_seeds: int, width: int, height: int, pruned: bool) -> tuple[int, int]:
    """(width, height) of the grid for images of ``width`` x ``height`` (see the module docstring)."""
    blocks = 2 if pruned else 1
    block_w = num_seeds * width + (num_seeds - 1) * GAP
    grid_w = 2 * MARGIN + blocks * block_w + (blocks - 1) * BLOCK_GAP
    grid_h = 2 * MARGIN + (HEADER if pruned else 0) + SEED_BAND + num_prompts * (height + CAPTION)
    return grid_w, grid_h


def image_name(prompt_index: int, seed: int, pruned: bool = False) -> str:
    return f"p{prompt_index:03d}_s{seed}{'_pruned' if pruned else ''}.png"


def check_generate_arguments(
    seeds,
    *,
    out_dir: str | os.PathLike,
    mask=None,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    mitigation: str = "none",
) -> tuple[Path, list[int]]:
    """(out_dir, seeds) once the arguments of :func:`generate` that need no pipeline are known good.

    :func:`generate` calls it first; a caller that loads the pipeline itself (the CLI) can call it
    before loading, to fail in a second rather than after the load.
    """
    out = check_output_dir(out_dir, "out_dir")
    seeds = check_seeds(seeds)
    check_batch_size(batch_size)
    check_image_settings(steps, height, width)
    check_guidance(guidance)
    if isinstance(mask, (str, os.PathLike)) and not os.path.isfile(mask):
        raise MemcoreError("no such file", param="mask", value=mask)
    check_mitigation(mitigation, mask, guidance)
    return out, seeds


def check_mitigation(mitigation: str, mask, guidance: float | None) -> None:
    """One line unless ``mitigation`` is known and fits the other arguments (no mask with ``wen``: the
    mitigated images and the pruned ones are two experiments; guidance above 1 when given)."""
    from memcore.errors import Param
    from memcore.mitigation import MITIGATIONS

    if mitigation not in MITIGATIONS:
        raise MemcoreError(f"must be one of {', '.join(MITIGATIONS)}, got {mitigation!r}", param="mitigation")
    if mitigation == "none":
        return
    if mask is not None:
        raise MemcoreError(
            "cannot be combined with {mask}: generate the mitigated images and the pruned ones in two runs",
            param="mitigation", value=mitigation, mask=Param("mask"),
        )
    if guidance is not None and guidance <= 1:
        raise MemcoreError(
            f"is {guidance:g}; the {mitigation} mitigation needs classifier-free guidance (an unconditional "
            "branch to compare with), above 1",
            param="guidance",
        )


def generate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    out_dir: str | os.PathLike,
    mask=None,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    force: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    mitigation: str = "none",
    wen=None,
    ranks=None,
) -> GenerateResult:
    """Generate every (prompt, seed) image, and with ``mask`` the same images after pruning.

    Args:
        pipe: a diffusers text-to-image pipeline. **With a mask it is pruned in place.**
        prompts: the prompts (rows of the grid).
        seeds: distinct non-negative seeds (columns); see :func:`parse_seeds`.
        mask: a :class:`memcore.mask.Mask`, the path of a mask file, or ``None`` for originals only.
        out_dir: the folder to create; it must not exist.
        steps, guidance, height, width: generation settings, ``None`` for the pipeline's defaults.
        force: apply a mask made from other weights of the same shapes.
        ranks: this process's place among the processes of a ``torchrun`` launch
            (:func:`memcore.runs.start_processes`); each takes its share of the pipeline calls and
            process 0 writes the grid and the manifest. Default: one process.
        batch_size: prompts per pipeline call (all share the seed's x_T).
        progress: show a progress bar over images (on a terminal).
        mitigation: ``"none"``, or ``"wen"``: generate every image from a prompt embedding optimized
            first (Wen et al., ICLR 2024; :mod:`memcore.mitigation`); not with a mask.
        wen: the :class:`memcore.mitigation.WenSettings` of ``"wen"`` (default: the published ones).
    """
    out, seeds = check_generate_arguments(
        seeds, out_dir=out_dir, mask=mask, steps=steps, guidance=guidance, height=height, width=width,
        batch_size=batch_size, mitigation=mitigation,
    )
    if mitigation == "wen":
        from memcore.mitigation import WenSettings, check_supported

        if wen is None:
            wen = WenSettings()
        elif not isinstance(wen, WenSettings):
            raise MemcoreError(f"must be a WenSettings, got a {type(wen).__name__}", param="wen")
        check_supported(pipe)
    elif wen is not None:
        raise MemcoreError('is only used with mitigation="wen"', param="wen")
    prompts = check_prompts(prompts)
    config = LocalizeConfig(steps=steps, guidance=guidance, height=height, width=width)
    settings = resolve_generation(pipe, config, images=min(batch_size, len(prompts)), decode=True)
    mask, mask_path = load_checked_mask(pipe, mask, force)
    if mitigation == "wen":
        from memcore.driver import is_guided

        if not is_guided(pipe, settings):
            raise MemcoreError(
                f"is {settings.guidance:g} or ignored by this model; the wen mitigation needs classifier-free "
                "guidance (an unconditional branch to compare with)",
                param="guidance",
            )

    from tqdm.auto import tqdm

    from memcore.driver import truncation_reported_once
    from memcore.runs import Ranks, Run
    from memcore.stats import prompts_sha256

    ranks = ranks or Ranks()
    pipe.set_progress_bar_config(disable=True)
    phases = [False, True] if mask is not None else [False]
    items = {pruned: work_items(len(prompts), seeds, batch_size, "pruned" if pruned else "original") for pruned in phases}
    mask_hash = None if mask is None else mask_sha256(mask)
    png = run_identity(pipe, settings)
    run_settings = png | {
        "device": torch.device(pipe.device).type,
        "prompts_sha256": prompts_sha256(prompts),
        "prompts": len(prompts),
        "seeds": seeds,
        "batch_size": batch_size,
        "mask_sha256": mask_hash,
        "force": force,
        "mitigation": None if wen is None else wen.as_dict(),
    }
    zeroed = None
    with Run(out, kind="generate", settings=run_settings, ranks=ranks) as run, truncation_reported_once(pipe):
        folder = run.folder
        (folder / "images").mkdir(exist_ok=True)
        mine = [item for pruned in phases for item in ranks.mine(items[pruned])]
        with tqdm(
            total=sum(len(item.prompts) for item in mine), initial=sum(len(i.prompts) for i in mine if run.done(i.key)),
            desc="generate" if ranks.world == 1 else f"generate ({ranks})", unit="image",
            disable=None if progress and ranks.main else True,
        ) as bar:
            for pruned in phases:
                if pruned:
                    from memcore.pruning import prune

                    run.gather()  # every original is written before any process prunes
                    zeroed = prune(pipe, mask, force=force)
                todo = [item for item in ranks.mine(items[pruned]) if not run.done(item.key)]
                info = png | {"mask_sha256": mask_hash if pruned else None, "mitigation": "wen" if wen is not None and not pruned else None}
                _render(pipe, prompts, todo, settings, folder, pruned, bar, run, info, wen=None if pruned else wen)
        run.gather()
        if ranks.main:
            record = None
            if wen is not None:
                record = {(row["prompt"], row["seed"]): row["mitigation"]
                          for rows, _ in run.load_all([i.key for i in items[False]]) for row in rows}
            size = _draw_grid(folder, prompts, seeds, settings.width, settings.height, mask is not None)
            manifest = {
                "format": MANIFEST_FORMAT,
                "model_id": png["model"],
                "dtype": png["dtype"],
                "prompts": prompts,
                "seeds": seeds,
                "settings": png["settings"],
                "batch_size": batch_size,
                "mask": None if mask is None else _mask_summary(mask, mask_path, zeroed, force),
                "mitigation": None if record is None else _mitigation_summary(wen, record),
                "grid": {"path": "grid.png", "size": list(size), "rows": "prompts", "columns": "seeds"},
                "images": [
                    {"prompt": i, "seed": s, "original": f"images/{image_name(i, s)}"}
                    | ({"pruned": f"images/{image_name(i, s, True)}"} if mask is not None else {})
                    | ({"mitigation": record[i, s]} if record is not None else {})
                    for i in range(len(prompts))
                    for s in seeds
                ],
            }
            check(str(out / "manifest.json") + " (not written)", manifest, MANIFEST_FORMAT, folder=folder)
            (folder / "manifest.json").write_text(dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            size = grid_size(len(prompts), len(seeds), settings.width, settings.height, mask is not None)
    names = [(i, s) for i in range(len(prompts)) for s in seeds]
    return GenerateResult(
        out_dir=out,
        grid=out / "grid.png",
        grid_size=size,
        images=[out / "images" / image_name(i, s) for i, s in names],
        pruned_images=[out / "images" / image_name(i, s, True) for i, s in names] if mask is not None else [],
        manifest=out / "manifest.json",
        zeroed=zeroed,
    )


def check_prompts(prompts) -> list[str]:
    """``prompts`` as a list, or a one-line error unless it is a non-empty list of strings."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise MemcoreError("expected a non-empty list of prompt strings", param="prompts")
    return list(prompts)


def load_checked_mask(pipe, mask, force: bool):
    """``(mask, path)``: a :class:`memcore.mask.Mask`, or the one read from the file ``mask`` (then its
    path), checked against ``pipe``'s weights before anything is generated; ``(None, None)`` without."""
    path = None
    if isinstance(mask, (str, os.PathLike)):
        from memcore.mask import Mask

        path, mask = os.fspath(mask), Mask.load(mask)
    if mask is not None:
        _check_mask(pipe, mask, force)  # before generating anything, not only when pruning
    return mask, path


def run_identity(pipe, settings) -> dict:
    """How generated images were made, as their PNG chunks and their runs record it: the model id,
    its dtype and the generation settings (without the seed and the call timesteps)."""
    from memcore.models import model_id

    return {
        "model": model_id(pipe),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "settings": {k: v for k, v in settings.as_dict().items() if k not in ("seed", "call_timesteps")},
    }


@dataclass(frozen=True)
class WorkItem:
    """One pipeline call: the prompts ``start .. start + len(prompts) - 1`` under one seed's x_T."""

    phase: str
    seed: int
    start: int
    prompts: range

    @property
    def key(self) -> str:
        return f"{self.phase}-s{self.seed}-p{self.start}"


def work_items(num_prompts: int, seeds: list[int], batch_size: int, phase: str) -> list[WorkItem]:
    """The calls that make every image of a phase, seed-major, each batch cut as one process would
    cut it: whichever process takes an item computes exactly the same images."""
    return [
        WorkItem(phase, seed, start, range(start, min(start + batch_size, num_prompts)))
        for seed in seeds
        for start in range(0, num_prompts, batch_size)
    ]


def mask_sha256(mask) -> str:
    """sha256 of a mask's metadata (JSON, sorted keys) and its packed tensors (sorted by layer)."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(mask.metadata, sort_keys=True, default=str).encode())
    for name in sorted(mask.layers):
        digest.update(name.encode())
        digest.update(mask.layers[name].contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_png(image, path: Path, info: dict) -> None:
    """Save ``image`` as a PNG whose ``memcore`` text chunk holds ``info`` (JSON), atomically
    (a temporary beside it, then a rename): a stopped run never leaves half an image."""
    import json

    from PIL.PngImagePlugin import PngInfo

    from memcore.runs import write_atomic

    chunk = PngInfo()
    chunk.add_text("memcore", json.dumps(info, ensure_ascii=False, sort_keys=True), zip=False)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=chunk))


def load_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a folder written by :func:`generate`, once it passes the schema of its format
    (:mod:`memcore.schema`) and every file it names is in the folder; else a one-line error."""
    path = Path(folder) / "manifest.json"
    if not Path(folder).is_dir():
        raise MemcoreError(f"{folder}: no such folder")
    if not path.is_file():
        raise MemcoreError(f"{folder}: no manifest.json; not a folder written by memcore generate")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MemcoreError(f"{path}: cannot read it ({exc})") from None
    return check(str(path), parse(str(path), text, MANIFEST_FORMAT), MANIFEST_FORMAT, folder=folder)


def _check_mask(pipe, mask, force: bool) -> None:
    """The check :func:`memcore.prune` makes, done before any image is generated."""
    from memcore.mask import check_same_weights
    from memcore.targets import find_recorded_targets

    check_same_weights(find_recorded_targets(pipe, mask.metadata, "the mask"), mask.metadata, "the mask", force)


def _mask_summary(mask, path: str | None, zeroed: int | None, force: bool) -> dict:
    meta = mask.metadata
    keys = ("model_id", "target", "sparsity", "timesteps", "weights_sha256")
    return {"path": path} | {k: meta[k] for k in keys if k in meta} | {
        "layers": len(mask.layers),
        "zeroed": zeroed,
        "force": force,
    }


def _mitigation_summary(wen, record: dict) -> dict:
    seconds = sum(r["seconds"] for r in record.values())
    return wen.as_dict() | {
        "seconds": round(seconds, 3),
        "seconds_per_image": round(seconds / len(record), 4),
        "reached_target": sum(r["loss"] <= wen.target_loss for r in record.values()),
        "images": len(record),
    }


def _render(pipe, prompts, items, settings, folder: Path, pruned: bool, bar, run, info: dict, wen=None) -> None:
    """Generate and save the images of ``items``, then record each item in ``run``; with ``wen``
    (:class:`memcore.mitigation.WenSettings`), each image's optimization goes into the item's rows."""
    latents = Latents(pipe, settings)
    for item in items:
        images, record = generate_item(pipe, prompts, item, settings, latents, wen)
        rows = []
        for index, image in zip(item.prompts, images):
            save_png(image, folder / "images" / image_name(index, item.seed, pruned), info | {
                "prompt": prompts[index], "prompt_index": index, "seed": item.seed})
            rows.append({"prompt": index, "seed": item.seed} | ({"mitigation": record[index]} if record else {}))
        run.record(item.key, rows)
        bar.update(len(images))


class Latents:
    """x_T of each seed, computed once while the items of that seed follow each other."""

    def __init__(self, pipe, settings) -> None:
        self.pipe, self.settings, self.seed, self.latent = pipe, settings, None, None

    def __call__(self, seed: int) -> torch.Tensor:
        from memcore.driver import initial_latent

        if seed != self.seed:
            self.seed, self.latent = seed, initial_latent(self.pipe, replace(self.settings, seed=seed))
        return self.latent


def generate_item(pipe, prompts, item: WorkItem, settings, latents: Latents, wen=None) -> tuple[list, dict]:
    """The PIL images of one work item (one pipeline call: the seed's x_T repeated over the batch of
    prompts) and, with ``wen``, each prompt index's optimization record (steps, losses, seconds)."""
    from memcore.driver import call_arguments

    latent = latents(item.seed)
    batch = [prompts[i] for i in item.prompts]
    # The generator only matters to schedulers that add noise while stepping (ancestral ones):
    # seeded the same way, it makes that noise the same for the original and the pruned model.
    generator = torch.Generator(device=latent.device).manual_seed(item.seed)
    arguments = call_arguments(pipe, batch, latent, settings)
    record: dict = {}
    if wen is not None:
        arguments = _wen_arguments(pipe, arguments, batch, item.start, latent, settings, wen, record)
    return pipe(**arguments, generator=generator, output_type="pil").images, record


def _wen_arguments(pipe, arguments: dict, batch, start: int, latent, settings, wen, record: dict) -> dict:
    """The pipeline's arguments with the prompts replaced by their optimized embeddings."""
    from memcore.mitigation import wen_prompt_embeds

    started = time.perf_counter()
    result = wen_prompt_embeds(pipe, batch, latent, settings, wen.lr, wen.target_loss, wen.max_steps)
    share = (time.perf_counter() - started - sum(result.seconds)) / len(batch)  # text encoding, shared
    for offset, losses in enumerate(result.losses):
        record[start + offset] = {
            "steps": len(losses) - 1,
            "initial_loss": losses[0],
            "loss": losses[-1],
            "reached_target": losses[-1] <= wen.target_loss,
            "seconds": round(result.seconds[offset] + share, 4),
        }
    arguments = {k: v for k, v in arguments.items() if k != "prompt"}
    return arguments | {"prompt_embeds": result.prompt_embeds, "negative_prompt_embeds": result.negative_prompt_embeds}


def _draw_grid(folder: Path, prompts, seeds, width: int, height: int, pruned: bool) -> tuple[int, int]:
    """Compose ``folder/grid.png`` from the saved images; returns its (width, height)."""
    from PIL import Image, ImageDraw, ImageFont

    size = grid_size(len(prompts), len(seeds), width, height, pruned)
    grid = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=FONT_SIZE)
    block_w = len(seeds) * width + (len(seeds) - 1) * GAP
    top = MARGIN + (HEADER if pruned else 0)
    for block, title in enumerate(("original", "pruned") if pruned else ("original",)):
        left = MARGIN + block * (block_w + BLOCK_GAP)
        if pruned:
            draw.text((left + block_w / 2, MARGIN + HEADER / 2), title, fill="black", font=font, anchor="mm")
        for col, seed in enumerate(seeds):
            x = left + col * (width + GAP)
            label = _fit(draw, f"seed {seed}", width, font)
            draw.text((x + width / 2, top + SEED_BAND / 2), label, fill="dimgray", font=font, anchor="mm")
            for row in range(len(prompts)):
                with Image.open(folder / "images" / image_name(row, seed, block == 1)) as image:
                    grid.paste(image.convert("RGB"), (x, top + SEED_BAND + row * (height + CAPTION)))
    for row, prompt in enumerate(prompts):
        y = top + SEED_BAND + row * (height + CAPTION) + height + 1
        for line_no, line in enumerate(_wrap(draw, f"{row}: {prompt}", size[0] - 2 * MARGIN, font)):
            draw.text((MARGIN, y + line_no * LINE_HEIGHT), line, fill="black", font=font)
    grid.save(folder / "grid.png")
    return size


def _fit(draw, text: str, width: float, font) -> str:
    """``text`` cut to ``width`` pixels, ending in "..." when cut."""
    if draw.textlength(text, font=font) <= width:
        return text
    low, high = 0, len(text)  # binary search for the longest prefix that fits with "..."
    while low < high:
        mid = (low + high + 1) // 2
        if draw.textlength(text[:mid] + "...", font=font) <= width:
            low = mid
        else:
            high = mid - 1
    return text[:low].rstrip() + "..."


def _wrap(draw, text: str, width: float, font) -> list[str]:
    """``text`` on at most CAPTION_LINES lines of ``width`` pixels, broken at spaces where possible."""
    text = " ".join(text.split())  # newlines, tabs and runs of spaces become single spaces
    lines: list[str] = []
    while text and len(lines) < CAPTION_LINES - 1:
        if draw.textlength(text, font=font) <= width:
            break
        cut = len(_fit(draw, text, width, font)) - 3  # characters that fit with room for "..."
        space = text.rfind(" ", 0, cut + 1)
        cut = space if space > 0 else max(cut, 1)
        lines.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return lines + ([_fit(draw, text, width, font)] if text else [])
