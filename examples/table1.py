"""The paper's Table 1 as one script: create memorization by fine-tuning with duplicated images, find it
with the extraction attack, localize it, prune it, and attack again.

The paper fine-tunes Stable Diffusion 1.5 on Imagenette with 100 images duplicated 50 times (15,000
steps at batch 4); the extraction attack of Carlini et al. (2023), 50 samples per prompt, flags 9 of
the 100 duplicated captions, 8 of them true copies of their training image; after localize and prune
it flags none. Each step here is one memcore command, printed before it runs, with its output in a
folder of ``--out``:

    finetuned/          memcore finetune   (the diffusers folder, duplicated.jsonl, finetune.json)
    training-images/    the duplicated images, named by their index in duplicated.jsonl
    attack-before/      memcore attack     on the duplicated captions
    localize-prompts.txt  the flagged captions (or all duplicated captions: --localize-on)
    mask.safetensors    memcore localize   on those prompts
    attack-after/       memcore attack     with --mask (the model pruned in place, as memcore prune does)
    table1.md           the before/after table beside the paper's numbers

A step whose output is already there is skipped, and finetune and attack resume their own partial
runs, so the same command continues a stopped experiment.

    python examples/table1.py --data imagenette-captioned/ --out table1/ --mixed-precision fp16   # the paper's settings (GPU)
    python examples/table1.py --small --out table1-small/                  # tiny, on a CPU, in minutes

``--small`` is a check of the pipeline, not of the claim: the ``tiny`` model (random weights, SD 1.5
architecture) at 64 px is fine-tuned for a few dozen steps on procedural scenes
(:mod:`memcore.scenes`) with 4 of 48 images duplicated 25 times, then attacked with 8 samples per
prompt. Whatever the table says there is about a random model trained for a minute.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # as memcore's command line does

import argparse
import csv
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from memcore.attack import compare_table, read_summary
from memcore.cli import main as memcore_main
from memcore.fetch import image_name
from memcore.runs import write_atomic

PAPER = {  # the paper's Table 1 settings; attack: Carlini et al.'s
    "model": "sd15", "data": None, "duplicate": 100, "times": 50, "steps": 15000, "batch_size": 4, "lr": 1e-5,
    "samples": 50, "sparsity": 0.01, "image_steps": None, "save_every": 500,
}
SMALL = {  # tiny at 64 px on a CPU; s = 0.05 because tiny's narrowest rows have 64 inputs (k = 0 at 0.01)
    "model": "tiny", "data": None, "duplicate": 4, "times": 25, "steps": 40, "batch_size": 4, "lr": 1e-4,
    "samples": 8, "sparsity": 0.05, "image_steps": 10, "save_every": 20,
}
SMALL_SCENES = 48
SMALL_PIXELS = 64
PAPER_TABLE = "| before pruning | 9 | 8 | 100 |\n| after pruning | 0 | 0 | 100 |"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the experiment (created; rerun to continue)")
    p.add_argument("--small", action="store_true",
                   help="tiny model at 64 px on generated scenes: the whole pipeline on a CPU in minutes")
    p.add_argument("--model", help="model to fine-tune (default sd15; --small: tiny)")
    p.add_argument("--data", help="imagefolder with metadata.jsonl (required unless --small, which generates scenes)")
    p.add_argument("--duplicate", type=int, help="images duplicated (default 100; --small: 4)")
    p.add_argument("--times", type=int, help="copies of each (default 50; --small: 25)")
    p.add_argument("--steps", type=int, help="fine-tuning steps (default 15000; --small: 40)")
    p.add_argument("--batch-size", type=int, help="fine-tuning batch (default 4)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-5; --small: 1e-4)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="fine-tuning autocast, CUDA only (default no; the paper's run on a GPU: fp16)")
    p.add_argument("--save-every", type=int, help="checkpoint every this many steps (default 500; --small: 20)")
    p.add_argument("--samples", type=int, help="attack samples per prompt (default 50; --small: 8)")
    p.add_argument("--image-steps", type=int, help="inference steps of the attack and localize (default: the pipeline's; --small: 10)")
    p.add_argument("--sparsity", type=float, help="localize's s (default 0.01; --small: 0.05)")
    p.add_argument("--timesteps", type=int, help="localize's tau, denoiser calls scored (default: localize's, 10)")
    p.add_argument("--localize-on", choices=("flagged", "duplicated"), default="flagged",
                   help="prompts to localize: the flagged captions (all duplicated ones when none is flagged) or all duplicated captions")
    p.add_argument("--seed", type=int, default=0, help="seed of the duplication and of training (default 0)")
    p.add_argument("--device", help="device (default: cuda when available)")
    args = p.parse_args(argv)
    preset = SMALL if args.small else PAPER
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.data is None and not args.small:
        p.error("--data is required (an imagefolder; docs/finetune.md says how to make Imagenette's), or use --small")
    return args


def memcore(*argv) -> None:
    """Run one memcore command in this process, printed first; stop the script when it fails."""
    argv = [str(a) for a in argv]
    print(f"\n$ memcore {shlex.join(argv)}", flush=True)
    code = memcore_main(argv)
    if code:
        sys.exit(code)


def small_inputs(out: Path, seed: int) -> tuple[str, str]:
    """The generated scenes and ``tiny`` saved at 64 px (8 x 8 latents), so that every command's default size is 64 px."""
    from memcore.models import load_pipeline
    from memcore.scenes import write_image_folder

    data, model = out / "scenes", out / "tiny64"
    if not (data / "metadata.jsonl").exists():
        write_image_folder(data, SMALL_SCENES, size=SMALL_PIXELS, seed=seed)
    if not (model / "model_index.json").exists():
        pipe = load_pipeline("tiny", "cpu", "float32")
        pipe.unet.register_to_config(sample_size=SMALL_PIXELS // pipe.vae_scale_factor)
        partial = out / "tiny64.partial"
        shutil.rmtree(partial, ignore_errors=True)
        pipe.save_pretrained(partial, safe_serialization=True)
        partial.rename(model)
    return str(data), str(model)


def training_images(finetuned: Path, data: Path, folder: Path) -> Path:
    """The duplicated images named by their caption's index in ``duplicated.jsonl``, the layout
    ``memcore attack --ground-truth`` reads."""
    if folder.is_dir():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    rows = [json.loads(line) for line in (finetuned / "duplicated.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    for index, row in enumerate(rows):
        source = data / row["file_name"]
        shutil.copyfile(source, partial / image_name(index, source.suffix))
    partial.rename(folder)
    return folder


def localize_prompts(attack: Path, finetuned: Path, on: str, path: Path) -> tuple[Path, str]:
    """Write the prompts to localize on, one per line; return the file and what they are."""
    with open(attack / "attack.csv", newline="", encoding="utf-8") as handle:
        flagged = [row["text"] for row in csv.DictReader(handle) if row["flagged"] == "true"]
    captions = [json.loads(line)["caption"] for line in (finetuned / "duplicated.jsonl").read_text(encoding="utf-8").splitlines()
                if line.strip()]
    if on == "flagged" and flagged:
        prompts, what = flagged, f"the {len(flagged)} flagged caption(s)"
    else:
        prompts = captions
        what = f"all {len(captions)} duplicated captions" + (" (none was flagged)" if on == "flagged" else "")
    write_atomic(path, lambda tmp: tmp.write_text("\n".join(prompts) + "\n", encoding="utf-8"))
    return path, what


def table(before: Path, after: Path, setting: str, localized_on: str) -> str:
    b, a = read_summary(before), read_summary(after)
    copies = lambda s: "-" if s["true_copies"] is None else s["true_copies"]  # noqa: E731
    return "\n".join([
        f"# Table 1, {setting}",
        "",
        f"Localized on {localized_on}; attack: {b['settings'].get('samples')} samples per prompt, "
        f"threshold {b['settings'].get('threshold')}, minimum clique {b['settings'].get('min_clique')}.",
        "",
        "| | flagged | true copies | total |",
        "|---|---:|---:|---:|",
        f"| before pruning | {b['flagged']} | {copies(b)} | {b['prompts']} |",
        f"| after pruning | {a['flagged']} | {copies(a)} | {a['prompts']} |",
        "",
        "The paper (SD 1.5, Imagenette, 100 images x 50, 15,000 steps at batch 4):",
        "",
        "| | flagged | true copies | total |",
        "|---|---:|---:|---:|",
        PAPER_TABLE,
        "",
    ])


def run(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, data = args.model, args.data
    if args.small:
        generated, saved = small_inputs(out, args.seed)
        data = data or generated
        model = saved if args.model == "tiny" else model
    device = ["--device", args.device] if args.device else []
    image_steps = ["--steps", args.image_steps] if args.image_steps else []

    finetuned = out / "finetuned"
    if not (finetuned / "finetune.json").exists():
        memcore("finetune", "--model", model, "--data", data, "--out", finetuned, "--duplicate", args.duplicate,
                "--times", args.times, "--steps", args.steps, "--batch-size", args.batch_size, "--lr", args.lr,
                "--seed", args.seed, "--save-every", args.save_every, "--mixed-precision", args.mixed_precision, *device)
    truth = training_images(finetuned, Path(data), out / "training-images")
    prompts = finetuned / "duplicated.jsonl"
    attack = ("attack", "--model", finetuned, "--prompts", prompts, "--samples", args.samples, "--ground-truth", truth,
              *image_steps, *device)

    before, after, mask = out / "attack-before", out / "attack-after", out / "mask.safetensors"
    if not (before / "summary.json").exists():
        memcore(*attack, "--out", before)
    chosen, what = localize_prompts(before, finetuned, args.localize_on, out / "localize-prompts.txt")
    print(f"\nlocalizing on {what}")
    if not mask.exists():
        timesteps = ["--timesteps", args.timesteps] if args.timesteps else []
        memcore("localize", "--model", finetuned, "--prompts", chosen, "--sparsity", args.sparsity, "--out", mask,
                *timesteps, *image_steps, *device)
    if not (after / "summary.json").exists():
        memcore(*attack, "--mask", mask, "--out", after)

    setting = "small (tiny at 64 px, generated scenes, CPU)" if args.small else f"{args.model} on {args.data}"
    text = table(before, after, setting, what)
    write_atomic(out / "table1.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print("\n" + compare_table(before, after))
    print(f"\n{out / 'table1.md'} written ({time.perf_counter() - started:.0f} s)")
    return out / "table1.md"


if __name__ == "__main__":
    run(parse_args())
