"""The paper's subset experiment: one mask per subset of memorized prompts, then how much they overlap.

For each model: localize every subset in one run (shared empty-prompt run, batches spanning subsets,
per-step masks), analyze the masks (density and pairwise IoU per call index and layer, with a chance
baseline), and draw a few prompts before and after pruning with the first subset's mask.

Control: subsets of the same size cut from a list of non-memorized prompts (by default the built-in
laion-nomem-500: LAION captions that SD 1 does not memorize) are localized in the same run. The Wanda score multiplies by |W|, which every mask of a model shares, so overlap beyond the
position-chance baseline is expected of any two masks; what supports the paper's claim is memorized
subsets overlapping more with each other than with the control subsets. The report gives the mean
IoU within the memorized subsets, within the control subsets and across the two (``groups.csv``).

    python examples/subset_experiment.py                       # tiny model, subsets memorize_0..9
    python examples/subset_experiment.py --model sd15          # also SD 1.5, if its weights are local
    python examples/subset_experiment.py --model /path/to/sd15-folder --subsets memorize_0..4 --control coco-10k

The tiny model always runs (random weights, built in memory). A real model runs only when its weights
are in the local Hugging Face cache or a local folder; otherwise it is reported as skipped. The tiny
model uses s = 0.05 because its narrowest layers have 64 inputs, where the paper's s = 0.01 selects
k = 0 weights per row; real models use the paper's s = 0.01.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import memcore
from memcore.analysis import analyze
from memcore.generate import generate

# built-in prompt sets ('memcore data' lists them); files and folders work too
DEFAULT_SUBSETS = ["memorize_0..9"]
DEFAULT_CONTROL = "laion-nomem-500"


def weights_present(model: str) -> bool:
    """Whether ``model`` can be loaded without the network: tiny, a local folder, or a cached hub id."""
    from huggingface_hub import try_to_load_from_cache

    from memcore.models import TINY_MODELS, resolve_model_id

    if model in TINY_MODELS or Path(model).expanduser().is_dir():
        return True
    return isinstance(try_to_load_from_cache(resolve_model_id(model), "model_index.json"), str)


def control_subsets(subsets: dict[str, list[str]], control: str) -> dict[str, list[str]]:
    """Consecutive slices of the control prompts, as many (up to one per subset) and as large as the subsets."""
    prompts = memcore.load_prompts(control)
    size = max(len(p) for p in subsets.values())
    count = min(len(subsets), len(prompts) // size)
    return {f"control_{i}": prompts[i * size : (i + 1) * size] for i in range(count)}


def run(
    model: str,
    subset_sources: list[str],
    control: str | None,
    out: Path,
    sparsity: float,
    timesteps: int,
    batch_size: int,
    steps: int | None = None,
) -> dict:
    """Localize, analyze and draw for one model; returns the timings and the headline numbers."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipe = memcore.load_pipeline(model)
    subsets = memcore.load_subsets(subset_sources)
    controls = control_subsets(subsets, control) if control is not None else {}
    config = memcore.LocalizeConfig(
        sparsity=sparsity, timesteps=timesteps, batch_size=batch_size, per_step=True, steps=steps, progress=False
    )
    loaded = time.perf_counter()
    results = memcore.localize_subsets(pipe, subsets | controls, config)
    localized = time.perf_counter()
    masks_dir = out / "masks"
    masks_dir.mkdir(exist_ok=True)
    for name, (mask, _) in results.items():
        mask.save(masks_dir / f"{name}.safetensors")
    memorized = [results[name][0] for name in subsets]
    analysis = analyze(memorized, out / "analysis", names=list(subsets), control=[results[n][0] for n in controls])
    analyzed = time.perf_counter()
    first = next(iter(subsets))
    pictures = out / "pictures"
    if not pictures.exists():
        generate(pipe, subsets[first][:3], [0, 1], out_dir=pictures, mask=results[first][0], steps=steps, progress=False)
    return {
        "model": model,
        "subsets": len(subsets),
        "control_subsets": len(controls),
        "prompts": sum(len(p) for p in (subsets | controls).values()),
        "distinct_prompts": len({p for prompts in (subsets | controls).values() for p in prompts}),
        "sparsity": sparsity,
        "timesteps": timesteps,
        "load_seconds": round(loaded - started, 1),
        "localize_seconds": round(localized - loaded, 1),
        "analyze_seconds": round(analyzed - localized, 1),
        "mean_density": float(analysis.density.overall),
        "mean_iou": float(analysis.pairwise.iou_overall),
        "mean_iou_chance": float(analysis.pairwise.chance_overall),
        "iou_by_group": None if analysis.groups is None else analysis.groups.as_dict(),
        "out": str(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="a real model to run as well (alias, hub id or folder)")
    parser.add_argument(
        "--subsets", nargs="+", default=DEFAULT_SUBSETS,
        help="memorized subsets: built-in sets, ranges of them, files or folders (default memorize_0..9)",
    )
    parser.add_argument(
        "--control", default=DEFAULT_CONTROL,
        help="non-memorized prompts, a built-in set or a file, cut into the control subsets (default laion-nomem-500)",
    )
    parser.add_argument("--no-control", action="store_true", help="skip the control subsets")
    parser.add_argument("--out", type=Path, default=Path("runs/subset_experiment"), help="output folder")
    parser.add_argument("--timesteps", type=int, default=10, help="tau (default 10)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation (default 8)")
    parser.add_argument("--steps", type=int, help="inference steps (default: the pipeline's)")
    args = parser.parse_args()

    control = None if args.no_control else args.control
    settings = dict(timesteps=args.timesteps, batch_size=args.batch_size, steps=args.steps)
    report = [run("tiny", args.subsets, control, args.out / "tiny", 0.05, **settings)]
    for model in args.model:
        if not weights_present(model):
            print(f"skipped {model}: its weights are not in the local cache or a local folder")
            continue
        report.append(run(model, args.subsets, control, args.out / Path(model).name, 0.01, **settings))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
