"""Does memorization go away? Generate under each method and score every image (``memcore evaluate``).

The methods, in the order they run on one pipeline:

- ``none``: the model as loaded (skipped with ``baseline=False``);
- ``wen``: the same model, each image generated from a prompt embedding optimized first
  (:mod:`memcore.mitigation`, Wen et al., ICLR 2024);
- ``pruned``: the model after ``W[mask] = 0`` (:func:`memcore.prune`, **in place**: pass a pipeline
  you no longer need unpruned).

Every (prompt, seed) image of every method starts from the seed's x_T (:func:`memcore.driver.initial_latent`),
so the methods are compared on the same noise. Each image is scored as it comes out of the pipeline
(:func:`memcore.evaluation.score_images`: SSCD to its prompt's training images, CLIP score to its
prompt, Inception features for FID and KID) and saved as a PNG whose ``memcore`` text chunk records
prompt, seed, model, settings, method and mask hash.

**Time** is the wall clock of each method's pipeline calls, its per-image optimization included for
``wen``; for ``pruned`` it also counts the pruning and, when given (``localize_seconds``; a mask file
records no time, so that the same inputs give the same bytes), the localization that made the mask,
as the paper's footnote counts them.

The work is cut into items (one method, one seed's x_T, one batch of prompts) the same way for any
number of processes: under ``torchrun`` the processes share them (:mod:`memcore.runs`), and a stopped
run resumes from ``out_dir.partial``. Process 0 gathers the rows and writes::

    out_dir/images/<method>/p{prompt:03d}_s{seed}.png   every image
    out_dir/per_image.csv                               method, prompt, seed, label, image, sscd, clip, seconds
    out_dir/summary.json                                per method (format memcore.evaluation/1)
    out_dir/figure.png                                  CLIP score against SSCD per method, and time per image
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from memcore.errors import MemcoreError

FIGURE = "figure.png"


@dataclass(frozen=True)
class EvaluateResult:
    """What :func:`evaluate` wrote (paths inside the final ``out_dir``) and its summary."""

    out_dir: Path
    summary: dict
    per_image: Path
    figure: Path


def methods_of(mask, mitigation: str, baseline: bool) -> list[str]:
    """The methods a run evaluates, in the order they run (pruning last: it changes the model)."""
    methods = (["none"] if baseline else []) + (["wen"] if mitigation == "wen" else []) + (["pruned"] if mask is not None else [])
    if not methods:
        raise MemcoreError(
            "nothing to evaluate: without the baseline, give a mask (--mask) or a mitigation (--mitigation wen)",
            param="baseline",
        )
    return methods


def image_path(method: str, prompt: int, seed: int) -> str:
    return f"images/{method}/p{prompt:03d}_s{seed}.png"


def _file_identity(path) -> dict | None:
    if path is None:
        return None
    if not os.path.exists(path):
        return {"path": os.fspath(path)}
    st = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def evaluate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    out_dir: str | os.PathLike,
    scorers=None,
    ground_truth=None,
    fid_reference=None,
    labels: list[str] | None = None,
    mask=None,
    mitigation: str = "none",
    wen=None,
    baseline: bool = True,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    force: bool = False,
    localize_seconds: float | None = None,
    progress: bool = True,
    ranks=None,
    identity: dict | None = None,
) -> EvaluateResult | None:
    """Generate every (prompt, seed) image under each method and score it (see the module docstring).

    Args:
        pipe: a diffusers text-to-image pipeline. **With a mask it is pruned in place.**
        prompts, seeds: the prompts and the distinct seeds.
        out_dir: the folder to create; it must not exist (its ``.partial`` may: the run resumes).
        scorers: a :class:`memcore.evaluation.Scorers` (default: none, only time is measured).
        ground_truth: a :class:`memcore.evaluation.GroundTruth` of the prompts, for SSCD.
        fid_reference: a :class:`memcore.evaluation.FIDReference`, or a path to load on process 0
            once every image is scored (needs ``scorers.inception``).
        labels: a label per prompt (``VM``/``TM`` for ``sdv1-500``: :func:`memcore.datasets.labels`).
        mask: a :class:`memcore.mask.Mask` or the path of a mask file: adds the method ``pruned``.
        mitigation: ``"wen"`` adds the method ``wen`` (settings ``wen``, default the published ones).
        baseline: evaluate the model as loaded (method ``none``).
        steps, guidance, height, width: generation settings, ``None`` for the pipeline's defaults.
        batch_size: prompts per pipeline call.
        force: apply a mask made from other weights of the same shapes.
        localize_seconds: the time ``memcore localize`` took to make the mask, counted into the time
            per image of ``pruned``.
        progress: show a progress bar over images (process 0, on a terminal).
        ranks: this process's :class:`memcore.runs.Ranks` under ``torchrun`` (default: one process).
        identity: what else must match for a stopped run to resume (the command line passes the
            model and scorer files it loaded).

    Returns:
        on process 0 the :class:`EvaluateResult`; on the others ``None``.
    """
    from tqdm.auto import tqdm

    from memcore import evaluation as ev
    from memcore.config import LocalizeConfig, resolve_generation
    from memcore.driver import is_guided, truncation_reported_once
    from memcore.generate import (
        Latents,
        check_generate_arguments,
        check_prompts,
        generate_item,
        load_checked_mask,
        mask_sha256,
        run_identity,
        save_png,
        work_items,
    )
    from memcore.runs import Ranks, Run
    from memcore.stats import prompts_sha256

    out, seeds = check_generate_arguments(
        seeds, out_dir=out_dir, mask=None, steps=steps, guidance=guidance, height=height, width=width,
        batch_size=batch_size, mitigation=mitigation,
    )
    methods = methods_of(mask, mitigation, baseline)
    prompts = check_prompts(prompts)
    if labels is not None and len(labels) != len(prompts):
        raise MemcoreError(f"{len(labels)} labels for {len(prompts)} prompts", param="labels")
    scorers = scorers or ev.Scorers()
    if ground_truth is not None and ground_truth.num_prompts != len(prompts):
        raise MemcoreError(f"was loaded for {ground_truth.num_prompts} prompts, not {len(prompts)}", param="ground_truth")
    if fid_reference is not None and scorers.inception is None:
        raise MemcoreError("needs the Inception network: give --inception PATH", param="fid_reference")
    if "wen" in methods:
        from memcore.mitigation import WenSettings, check_supported

        wen = wen or WenSettings()
        check_supported(pipe)
    mask, mask_path = load_checked_mask(pipe, mask, force)
    if localize_seconds is not None and (mask is None or not localize_seconds >= 0):
        raise MemcoreError(f"must be a number >= 0, with a mask; got {localize_seconds!r}", param="localize_seconds")
    settings = resolve_generation(
        pipe, LocalizeConfig(steps=steps, guidance=guidance, height=height, width=width),
        images=min(batch_size, len(prompts)), decode=True,
    )
    if "wen" in methods and not is_guided(pipe, settings):
        raise MemcoreError(
            f"is {settings.guidance:g} or ignored by this model; the wen mitigation needs classifier-free guidance",
            param="guidance",
        )

    ranks = ranks or Ranks()
    pipe.set_progress_bar_config(disable=True)
    mask_hash = None if mask is None else mask_sha256(mask)
    info = run_identity(pipe, settings)
    run_settings = info | {
        "device": str(getattr(pipe.device, "type", pipe.device)),
        "prompts_sha256": prompts_sha256(prompts),
        "prompts": len(prompts),
        "seeds": seeds,
        "batch_size": batch_size,
        "methods": methods,
        "mask_sha256": mask_hash,
        "force": force,
        "wen": None if wen is None else wen.as_dict(),
        "sscd_preprocessing": scorers.sscd_preprocessing if scorers.sscd is not None else None,
        "scores": {"sscd": scorers.sscd is not None and ground_truth is not None, "clip": scorers.clip is not None,
                   "inception": scorers.inception is not None},
        "ground_truth": None if ground_truth is None else os.path.abspath(ground_truth.folder),
    } | (identity or {})
    items = {method: work_items(len(prompts), seeds, batch_size, method) for method in methods}
    prune_seconds = None
    with Run(out, kind="evaluate", settings=run_settings, ranks=ranks) as run, truncation_reported_once(pipe):
        for method in methods:
            (run.folder / "images" / method).mkdir(parents=True, exist_ok=True)
        mine = [item for method in methods for item in ranks.mine(items[method])]
        with tqdm(
            total=sum(len(i.prompts) for i in mine), initial=sum(len(i.prompts) for i in mine if run.done(i.key)),
            desc="evaluate" if ranks.world == 1 else f"evaluate ({ranks})", unit="image",
            disable=None if progress and ranks.main else True,
        ) as bar:
            latents = Latents(pipe, settings)
            if any(not run.done(item.key) for item in mine):
                _warm_up(pipe, prompts, settings, latents(seeds[0]))
            for method in methods:
                if method == "pruned":
                    from memcore.pruning import prune

                    run.gather()  # every process finishes the unpruned methods before pruning its model
                    started = time.perf_counter()
                    prune(pipe, mask, force=force)
                    prune_seconds = time.perf_counter() - started
                png = info | {"method": method, "mask_sha256": mask_hash if method == "pruned" else None}
                for item in ranks.mine(items[method]):
                    if run.done(item.key):
                        continue
                    started = time.perf_counter()
                    images, record = generate_item(pipe, prompts, item, settings, latents, wen if method == "wen" else None)
                    seconds = (time.perf_counter() - started) / len(images)
                    batch = [prompts[i] for i in item.prompts]
                    scored = ev.score_images(scorers, images, batch, list(item.prompts), ground_truth)
                    rows = []
                    for k, (index, image) in enumerate(zip(item.prompts, images)):
                        name = image_path(method, index, item.seed)
                        save_png(image, run.folder / name, png | {"prompt": prompts[index], "prompt_index": index, "seed": item.seed})
                        rows.append({
                            "method": method, "prompt": index, "seed": item.seed, "image": name,
                            "label": None if labels is None else labels[index],
                            "sscd": scored.sscd[k], "clip": scored.clip[k], "seconds": round(seconds, 6),
                        } | ({"mitigation": record[index]} if record else {}))
                    run.record(item.key, rows, None if scored.features is None else {"features": scored.features})
                    bar.update(len(images))
        run.gather()
        if not ranks.main:
            return None
        if fid_reference is not None and not isinstance(fid_reference, ev.FIDReference):
            fid_reference = ev.FIDReference.load(fid_reference, scorers)
        all_rows, summaries = [], {}
        for method in methods:
            rows, features = [], []
            for part_rows, arrays in run.load_all([item.key for item in items[method]]):
                rows.extend(part_rows)
                if "features" in arrays:
                    features.append(arrays["features"])
            summary = ev.summarize(
                rows, np.concatenate(features) if features else None, fid_reference, labels,
            )
            summaries[method] = summary | _method_extra(method, rows, mask, mask_path, prune_seconds, localize_seconds, wen, force)
            if method == "pruned" and localize_seconds is None:
                summaries[method]["notes"] = [*summary["notes"], "the time of localize is not counted (give it with --localize-seconds)"]
            all_rows.extend(rows)
        summary = {
            "format": ev.FORMAT,
            "model_id": info["model"],
            "dtype": info["dtype"],
            "settings": info["settings"],
            "prompts": len(prompts),
            "seeds": seeds,
            "batch_size": batch_size,
            "processes": ranks.world,
            "scorers": {
                "sscd_preprocessing": run_settings["sscd_preprocessing"],
                "ground_truth": run_settings["ground_truth"],
                "fid_reference": None if fid_reference is None else os.fspath(fid_reference.path),
                **{k: v for k, v in (identity or {}).items() if k in ("sscd", "clip", "inception")},
            },
            "methods": summaries,
        }
        from memcore.schema import dumps

        ev.write_per_image_csv(all_rows, run.folder / "per_image.csv")
        (run.folder / "summary.json").write_text(dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        ev.draw_comparison([(method, summaries[method]) for method in methods], run.folder / FIGURE)
    return EvaluateResult(out_dir=out, summary=summary, per_image=out / "per_image.csv", figure=out / FIGURE)


def _warm_up(pipe, prompts, settings, latent) -> None:
    """One untimed pipeline call (one prompt, two steps), so that the first method timed does not pay
    for what a process does once (kernel selection, allocator growth, lazy imports)."""
    import torch

    from memcore.driver import call_arguments

    arguments = call_arguments(pipe, prompts[:1], latent, replace(settings, steps=min(settings.steps, 2)))
    with torch.no_grad():
        pipe(**arguments, generator=torch.Generator(device=latent.device).manual_seed(0), output_type="pil")


def _method_extra(method: str, rows: list[dict], mask, mask_path, prune_seconds, localize, wen, force: bool) -> dict:
    """What a method's summary adds to :func:`memcore.evaluation.summarize`: for ``pruned`` the mask,
    and ``seconds`` counting the localization and pruning besides generation; for ``wen`` the
    optimization."""
    generation = sum(row["seconds"] for row in rows)
    if method == "pruned":
        meta = mask.metadata
        total = generation + (localize or 0.0) + (prune_seconds or 0.0)
        return {
            "mask": {"path": mask_path, "force": force}
            | {k: meta[k] for k in ("model_id", "target", "sparsity", "timesteps") if k in meta},
            "seconds": {
                "total": round(total, 6),
                "per_image": round(total / len(rows), 6),
                "generation": round(generation, 6),
                "localize": localize,
                "prune": None if prune_seconds is None else round(prune_seconds, 6),
            },
        }
    if method == "wen":
        records = [row["mitigation"] for row in rows]
        return {"mitigation": wen.as_dict() | {
            "reached_target": sum(bool(r["reached_target"]) for r in records),
            "mean_steps": round(sum(r["steps"] for r in records) / len(records), 3),
            "optimization_seconds": round(sum(r["seconds"] for r in records), 3),
        }}
    return {}
