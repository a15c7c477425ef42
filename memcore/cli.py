"""``memcore``: the command line. It parses arguments into a config and calls the library.

Exit codes: 0 success, 2 a user error (one line on stderr, no traceback, no output file left), 128 + the
signal's number when SIGINT (130), SIGTERM (143) or SIGHUP (129) stopped it (one line on stderr; every
temporary file removed). Outputs are checked and claimed before any work (:mod:`memcore.io`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import sys
import time

from memcore._version import __version__
from memcore.errors import Call, MemcoreError, Mention, Param, Pass

MODEL_HELP = (
    "an embedded random-weight model (tiny: SD 1.5 architecture, tiny-sd2, tiny-sdxl, tiny-pixart, tiny-sd3), "
    "the tiny memorizer (tiny-memorizer, shipped: see 'memcore demo'), "
    "an alias (sd14, sd15, sd2-base, sd21-base, sd2, sd21, sdxl, pixart, sd3), a hub id, or a local diffusers folder; the "
    "local cache is used first, the hub only when HF_HUB_OFFLINE is unset"
)

DEMO_FAMILIES = ("ffn", "attn2.to_v", "attn2.to_k")  # memcore.demo_run.FAMILIES, without importing torch
DEMO_SPECS = ("tiny-memorizer", "tiny-memorizer-scene-captions")  # memcore.demo.SPECS


def _add_model_args(p: argparse.ArgumentParser, device_help: str, dtype_help: str) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--device", help=device_help)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help=dtype_help)
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")


def _add_mask_args(p: argparse.ArgumentParser, out_default: str | None) -> None:
    p.add_argument("--sparsity", type=float, default=0.01, help="s in (0, 1]: k = floor(s * in) per row (default 0.01)")
    p.add_argument("--per-step", action="store_true", help="also store the mask of every call index, for analysis")
    if out_default is None:
        p.add_argument(
            "--out", help="mask file to write (default mask.safetensors); with --subsets, a new folder (default masks)"
        )
    else:
        p.add_argument("--out", default=out_default, help=f"mask file to write (default {out_default})")


CLIP_DEFAULT = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"  # memcore.metrics.CLIP_MODEL_ID, kept here for a cheap --help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memcore", description="Find and prune the memorized neurons of text-to-image diffusion models."
    )
    parser.add_argument("--version", action="version", version=f"memcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "localize",
        help="collect statistics for memorized prompts and write the mask of memorized neurons",
        description="Run the first --timesteps denoiser calls for each prompt and for the empty prompt, "
        "score every weight of the target Linear layers (Wanda) and write the mask. With --subsets, "
        "write one mask per prompt subset from one run.",
    )
    _add_model_args(p, "torch device (default: cuda if available, else cpu)", "default: float16 on CUDA, float32 on CPU")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--prompts",
        help="memorized prompts: a .txt (one per line), .jsonl or .csv file, or a built-in set such as sdv1-500 or "
        "memorize_0 ('memcore data' lists them)",
    )
    source.add_argument(
        "--subsets", nargs="+", metavar="SET",
        help="prompt subsets, one mask each, named after the file or set, written into the --out folder: files, "
        "folders of .txt/.jsonl/.csv files, built-in sets, or ranges of them such as memorize_0..9",
    )
    _add_mask_args(p, None)
    p.add_argument(
        "--target", default="ffn",
        help="Linear layers to score: ffn (feed-forward output, default), attn2.to_k or attn2.to_v "
        "(cross-attention key/value), text-mlp (text encoders' MLP output), or a regular expression "
        "matched in full against the denoiser's module names",
    )
    p.add_argument("--stats-out", help="also write the statistics (for 'memcore mask'); a folder with --subsets")
    p.add_argument("--timesteps", type=int, default=10, help="tau: denoiser calls to collect and score (default 10)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per generation (default 4)")
    p.add_argument("--steps", type=int, help="inference steps (default: the pipeline's, 50 for SD)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's, 7.5 for SD)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial latent shared by all prompts (default 0)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    p.add_argument("--rows", choices=["both", "cond"], default="both", help="guidance-batch rows to count (default both)")
    p.add_argument("--no-token-norm", action="store_true", help="do not L2-normalize token rows before squaring")
    p.add_argument(
        "--compile", action="store_true",
        help="compile the denoiser with torch.compile, one graph with the capture inside (same mask as "
        "without; the first batch pays the compile time)",
    )

    p = sub.add_parser(
        "mask",
        help="recompute a mask from a statistics file (other sparsity or tau) without running the model",
        description="Score the model's weights against saved statistics and write a mask.",
    )
    _add_model_args(p, "torch device (default: cuda if available, else cpu)", "default: the dtype the statistics were collected in")
    p.add_argument("--stats", required=True, help="statistics file written by 'memcore localize --stats-out'")
    _add_mask_args(p, "mask.safetensors")
    p.add_argument("--timesteps", type=int, help="tau: use the first tau call indices (default: all in the file)")
    p.add_argument("--force", action="store_true", help="accept statistics collected from other weights of the same shapes")

    p = sub.add_parser(
        "prune",
        help="zero the masked weights and save the whole pipeline",
        description="Load the model, zero the weights in the mask, and save the pipeline (safetensors) to a new folder.",
    )
    _add_model_args(p, "torch device (default: cpu)", "default: the dtype the mask was computed in")
    p.add_argument("--mask", required=True, help="mask file written by 'memcore localize' or 'memcore mask'")
    p.add_argument("--out", required=True, help="new folder for the pruned pipeline")
    p.add_argument("--force", action="store_true", help="apply a mask computed from other weights of the same shapes")

    p = sub.add_parser(
        "analyze",
        help="density and cross-subset IoU of per-step masks: CSV tables and PNG figures",
        description="Density of the memorized neurons per (call index, layer) and the mean IoU over pairs of "
        "distinct masks, with a chance baseline (random masks of equal density per layer), averaged over each "
        "axis. The masks must come from the same model and settings, computed with --per-step. The IoU of two "
        "empty masks is defined as 1.0. Writes analysis.csv, density.csv, pairs.csv and PNG figures.",
    )
    p.add_argument(
        "masks", nargs="+", metavar="MASK", help="mask files, or folders of them (at least two, unless --density-only)"
    )
    p.add_argument("--out", required=True, help="folder for the tables and figures (created if missing)")
    p.add_argument("--names", help="comma-separated short names for the masks (default: the file names)")
    p.add_argument("--density-only", action="store_true", help="only the density tables and figures (one mask is enough)")
    p.add_argument(
        "--control", nargs="+", metavar="MASK",
        help="masks of non-memorized prompt subsets (files or folders), same model and settings: also write "
        "groups.csv, the mean IoU within the memorized masks, within these and across",
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")

    p = sub.add_parser(
        "iou",
        help="IoU of two masks per layer, against the chance IoU of random masks of equal density",
        description="Compare two masks of the same layers (any settings; no per-step data needed): the IoU of "
        "their weights per layer and pooled over layers, and the IoU two random masks with the same counts "
        "per layer would have. The IoU of two empty masks is defined as 1.0.",
    )
    p.add_argument("masks", nargs=2, metavar="MASK", help="two mask files")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")

    p = sub.add_parser(
        "generate",
        help="images for prompts and seeds, and with --mask the same images after pruning, on one grid",
        description="Generate one image per prompt and seed (the same x_T per seed for the original and the "
        "pruned model) and a grid: rows prompts, columns seeds, original and pruned side by side.",
    )
    _add_model_args(p, "torch device (default: cuda if available, else cpu)", "default: float16 on CUDA, float32 on CPU")
    p.add_argument(
        "--prompts", required=True,
        help="prompts: a .txt (one per line), .jsonl or .csv file, or a built-in set such as memorize_0 "
        "('memcore data' lists them)",
    )
    p.add_argument("--seeds", default="0,1,2,3", help="seeds: a comma list and ranges, e.g. 0,1,2,3 or 0-3 (default 0,1,2,3)")
    p.add_argument("--mask", help="a mask file: also generate after zeroing its weights")
    p.add_argument(
        "--out", required=True,
        help="new folder for the images, grid.png and manifest.json (a stopped run keeps OUT.partial: run the same "
        "command again to resume)",
    )
    p.add_argument("--steps", type=int, help="inference steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation (default 8)")
    p.add_argument("--force", action="store_true", help="apply a mask computed from other weights of the same shapes")
    p.add_argument(
        "--mitigation", choices=["none", "wen"], default="none",
        help="wen: generate from prompt embeddings optimized until the first step's text-conditional noise norm "
        "falls to --wen-target-loss (Wen et al., ICLR 2024; SD 1.x/2.x; not with --mask) (default none)",
    )
    p.add_argument("--wen-lr", type=float, help="with --mitigation wen: AdamW learning rate (default 0.05, Wen et al.'s)")
    p.add_argument(
        "--wen-target-loss", type=float, help="with --mitigation wen: stop at this loss (default 3, Wen et al.'s)"
    )
    p.add_argument(
        "--wen-max-steps", type=int, help="with --mitigation wen: at most this many optimizer steps (default 10, Wen et al.'s)"
    )

    p = sub.add_parser(
        "evaluate",
        help="measure memorization: generate under each method and score SSCD, CLIP, FID/KID and time",
        description="Generate every prompt x seed image as the model is loaded (method none), with Wen et al.'s "
        "mitigation (wen, --mitigation wen) and after pruning with --mask (pruned), all from the same x_T per seed, "
        "and score each image: SSCD similarity to its prompt's training images (--ground-truth with --sscd), CLIP "
        "score (--clip), FID and KID against --fid-reference (with --inception), and time per image (for pruned, "
        "localize and prune included). Writes images/, per_image.csv, summary.json and figure.png (CLIP score "
        "against SSCD, and time, per method) into a new --out folder; a stopped run resumes when rerun; runs under "
        "torchrun (docs/scale.md). 'memcore evaluate --compare DIR ... --out FIG' redraws the figure from finished "
        "runs. Definitions: docs/metrics.md.",
    )
    p.add_argument("--model", help=MODEL_HELP + " (not with --compare)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument(
        "--prompts",
        help="prompts: a .txt (one per line), .jsonl or .csv file, or a built-in set such as sdv1-500 (whose VM/TM "
        "labels split the SSCD scores)",
    )
    p.add_argument("--seeds", default="0,1,2,3", help="seeds: a comma list and ranges (default 0,1,2,3)")
    p.add_argument(
        "--out",
        help="new folder for the run (a stopped run keeps OUT.partial: run the same command again to resume); with "
        "--compare, the figure file to write (.png)",
    )
    p.add_argument("--mask", help="a mask file: adds the method pruned (the model after zeroing its weights)")
    p.add_argument("--force", action="store_true", help="apply a mask computed from other weights of the same shapes")
    p.add_argument(
        "--localize-seconds", type=float, metavar="S",
        help="with --mask: the seconds 'memcore localize' took to make it (its --json 'seconds'), counted into the "
        "time per image of pruned as the paper does (default: not counted; summary.json says so)",
    )
    p.add_argument(
        "--mitigation", choices=["none", "wen"], default="none",
        help="wen: adds the method wen, Wen et al.'s inference-time mitigation (SD 1.x/2.x) (default none)",
    )
    p.add_argument("--wen-lr", type=float, help="with --mitigation wen: AdamW learning rate (default 0.05, Wen et al.'s)")
    p.add_argument("--wen-target-loss", type=float, help="with --mitigation wen: stop at this loss (default 3, Wen et al.'s)")
    p.add_argument("--wen-max-steps", type=int, help="with --mitigation wen: at most this many optimizer steps (default 10)")
    p.add_argument(
        "--no-baseline", dest="baseline", action="store_false",
        help="skip the method none (evaluate only --mask and/or --mitigation wen)",
    )
    p.add_argument(
        "--ground-truth",
        help="folder of each prompt's training image(s), named by the prompt's index: 0007.jpg, or 0007_1.jpg for "
        "more ('memcore data fetch-images' writes them); needs --sscd",
    )
    p.add_argument("--sscd", help="the SSCD TorchScript file (sscd_disc_large.torchscript.pt as the paper's authors, or sscd_disc_mixup)")
    p.add_argument(
        "--sscd-preprocessing", choices=["wen", "sscd"], default="wen",
        help="wen: resize 256, centre crop 224, mean/std 0.5 (Wen et al.'s code); sscd: 320x320, ImageNet statistics "
        "(the SSCD authors') (default wen)",
    )
    p.add_argument(
        "--clip", nargs="?", const=CLIP_DEFAULT,
        help=f"CLIP model for the CLIP score: a local folder or a hub id in the local cache; --clip alone takes "
        f"{CLIP_DEFAULT}, the paper authors' (default: no CLIP score)",
    )
    p.add_argument("--inception", help="the FID Inception TorchScript file (inception-2015-12-05.pt), for --fid-reference")
    p.add_argument(
        "--fid-reference", help="FID and KID reference: a folder of images, or a .npz of mu and sigma (FID only); needs --inception"
    )
    p.add_argument("--steps", type=int, help="inference steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation (default 8)")
    p.add_argument(
        "--compare", nargs="+", metavar="DIR",
        help="finished evaluate folders: draw their methods on one figure into --out (FIG.png) and generate nothing",
    )

    p = sub.add_parser(
        "detect",
        help="score prompts for memorization (Wen et al., ICLR 2024) and pick the most likely memorized",
        description="Score every prompt by the magnitude of the text-conditional noise prediction, "
        "||eps(x_t, prompt) - eps(x_t, empty)||_2, averaged over the first --timesteps denoiser calls and over "
        "the --seeds generations (Wen et al., ICLR 2024; docs/detect.md). Writes scores.csv, summary.json and "
        "histogram.png into a new --out folder; with --control (non-memorized prompts) also the ROC curve "
        "roc.png, its AUC and the TPR at 1% FPR; with --top N --out-prompts FILE the N highest-scoring prompts.",
    )
    _add_model_args(p, "torch device (default: cuda if available, else cpu)", "default: float16 on CUDA, float32 on CPU")
    p.add_argument(
        "--prompts", required=True,
        help="prompts to score: a .txt (one per line), .jsonl or .csv file, or a built-in set such as sdv1-500 "
        "('memcore data' lists them)",
    )
    p.add_argument(
        "--control", help="non-memorized prompts (file or built-in set, e.g. laion-nomem-500): adds the ROC against --prompts"
    )
    p.add_argument(
        "--out", required=True,
        help="new folder for scores.csv, summary.json and the figures (a stopped run keeps OUT.partial: run the same "
        "command again to resume)",
    )
    p.add_argument("--top", type=int, help="with --out-prompts: how many of the highest-scoring --prompts to write")
    p.add_argument("--out-prompts", help="with --top: a .txt (one per line) or .jsonl file of the top prompts, for 'memcore localize'")
    p.add_argument("--timesteps", type=int, default=1, help="T: first denoiser calls averaged into the score (default 1)")
    p.add_argument("--seeds", default="0-3", help="seeds, one generation each, shared by all prompts (default 0-3)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation (default 8)")
    p.add_argument("--steps", type=int, help="inference steps (default: the pipeline's, 50 for SD)")
    p.add_argument("--guidance", type=float, help="guidance scale, above 1 (default: the pipeline's, 7.5 for SD)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's)")

    p = sub.add_parser(
        "attack",
        help="Carlini et al.'s extraction attack: many samples per prompt, flag the prompts whose samples coincide",
        description="Generate --samples images per prompt (seeds 0..N-1, each seed's x_T shared by the prompts of a "
        "batch; with --mask after pruning), or read them from --from-images, and flag a prompt when the largest "
        "clique of its samples, joined where their tiled l2 distance (max over a 4x4 grid of tiles of the RMS "
        "difference on the 0..255 pixel scale) is below --threshold, has at least --min-clique members (Carlini "
        "et al., USENIX Security 2023). With --ground-truth, a flagged clique whose median distance to the prompt's "
        "training image is below --threshold is a true copy. Writes attack.csv, summary.json, pictures/ (one per "
        "flagged prompt) and, when generating, images/ into a new --out folder; a stopped run resumes when rerun; "
        "runs under torchrun. 'memcore attack --compare BEFORE AFTER' prints the before/after table. docs/attack.md.",
    )
    p.add_argument("--model", help=MODEL_HELP + " (not with --from-images or --compare)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--prompts", help="prompts: a .txt (one per line), .jsonl or .csv file, or a built-in set such as sdv1-500")
    p.add_argument("--samples", type=int, default=50, help="samples per prompt, seeds 0..N-1, at least 2 (default 50)")
    p.add_argument(
        "--out", help="new folder for the run (a stopped run keeps OUT.partial: run the same command again to resume)"
    )
    p.add_argument("--mask", help="a mask file: prune the model with it before generating")
    p.add_argument("--force", action="store_true", help="apply a mask computed from other weights of the same shapes")
    p.add_argument(
        "--ground-truth",
        help="folder of each prompt's training image(s), named by the prompt's index: 0007.jpg, or 0007_1.jpg for "
        "more ('memcore data fetch-images' writes them): counts the true copies",
    )
    p.add_argument(
        "--threshold", type=float, default=50.0, help="join two samples when their tiled l2 distance is below this (default 50)"
    )
    p.add_argument(
        "--min-clique", type=int, default=3, help="flag a prompt whose largest clique has at least this many samples (default 3)"
    )
    p.add_argument(
        "--from-images", metavar="DIR",
        help="read the samples instead of generating: DIR/images/p{prompt:03d}_s{seed}.png (as 'memcore generate' "
        "writes) or DIR/p{prompt:03d}_s{seed}.png, seeds 0..N-1",
    )
    p.add_argument("--steps", type=int, help="inference steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation (default 8)")
    p.add_argument(
        "--compare", nargs=2, metavar=("BEFORE", "AFTER"),
        help="two finished attack folders: print flagged prompts, true copies and total for each, and run nothing",
    )

    p = sub.add_parser(
        "data",
        help="list the built-in prompt sets, print the prompts of one, or fetch its training images",
        description="The prompt lists that ship with memcore: a set's name works wherever a prompt file does "
        "(--prompts sdv1-500, --subsets memorize_0..9). Without NAME, list the sets with their rows, source, "
        "licence and what to cite; with NAME, print its prompts, one per line. 'fetch-images SET --out DIR' "
        "downloads the training image of every prompt of a set with image URLs (sdv1-500, its subsets such as "
        "memorize_0, laion-nomem-500) into DIR as NNNN.EXT, NNNN the prompt's index in SET (for a subset, in the "
        "subset), with DIR/report.csv; an existing DIR is resumed into. The images belong to their owners "
        "(see DATA.md).",
        usage="memcore data [-h] [--json] [NAME]\n"
        "       memcore data fetch-images SET --out DIR [--workers N] [--timeout S] [--retries N] [--json]",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="a built-in set, e.g. sdv1-500 or memorize_0: print its prompts")
    p.add_argument("fetch_set", nargs="?", metavar="SET", help="after fetch-images: the set whose images to fetch")
    p.add_argument("--json", action="store_true", help="print machine-readable output on stdout")
    fetch = p.add_argument_group("fetch-images SET")
    fetch.add_argument("--out", metavar="DIR", help="folder for the images and report.csv (created if missing, else resumed)")
    fetch.add_argument("--workers", type=int, metavar="N", help="downloads at a time (default 8)")
    fetch.add_argument(
        "--timeout", type=float, metavar="S", help="seconds to connect, and for each read (default 10)"
    )
    fetch.add_argument(
        "--retries", type=int, metavar="N",
        help="extra tries after a 5xx, 408, 429, timeout or dropped connection, with backoff (default 3)",
    )

    # -- finetune ---------------------------------------------------------------------------------
    p = sub.add_parser(
        "finetune",
        help="fine-tune an SD 1.x/2.x denoiser on an image folder, some images duplicated (to create memorization)",
        description="Train the denoiser (text encoder and VAE frozen) with the diffusion loss on a folder in the "
        "imagefolder convention (metadata.jsonl: file_name and text per line), with --duplicate N images repeated "
        "--times K times, through accelerate. Works in OUT.partial with a checkpoint every --save-every steps "
        "(rerun the same command to resume) and writes a diffusers folder OUT (with duplicated.jsonl and "
        "finetune.json) that every memcore command loads with --model OUT. See docs/finetune.md.",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP + " (SD 1.x and 2.x only)")
    p.add_argument("--data", required=True, help="image folder with metadata.jsonl (file_name, text per line)")
    p.add_argument("--out", required=True, help="new folder for the fine-tuned pipeline (work in OUT.partial)")
    p.add_argument("--duplicate", "--duplicates", type=int, default=0, dest="duplicate",
                   help="N: how many images to duplicate, chosen by --seed (default 0); spell it --duplicates under "
                        "torchrun, whose own --duplicate-* options make it ambiguous")
    p.add_argument("--times", type=int, default=1, help="K: how many times each duplicated image appears (with --duplicate)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000; the paper: 15000)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (default 4, the paper's)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5, diffusers' text-to-image example)")
    p.add_argument("--seed", type=int, default=0, help="seed of the duplication, data order, noise and timesteps (default 0)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every this many steps (default 500)")
    p.add_argument(
        "--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="autocast on CUDA only (default no)"
    )
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    # -- end finetune -----------------------------------------------------------------------------

    p = sub.add_parser(
        "demo",
        help="the tiny memorizer: a CPU-sized model that memorizes a few duplicated photos, and the experiment on it",
        description="The tiny memorizer ships with memcore (--model tiny-memorizer in every command): a text-to-image "
        "pipeline trained on procedural captioned scenes plus a few public-domain photos, each duplicated. "
        "demo run: the paper's experiment on it; demo measure: what it learned and copies; demo build: train it "
        "again from scratch on this machine (about 30 minutes on 2 CPU cores), cached in MEMCORE_CACHE (default "
        "~/.cache/memcore) and resumed where a stopped build left off; --built then uses that build instead of the "
        "shipped weights. See docs/demo.md.",
    )
    p.add_argument("action", choices=["build", "measure", "run"],
                   help="build: train the model, or finish a stopped build; measure: caption consistency on held-out "
                        "scenes and copies of the private photos, into --out; run: the experiment (detect, localize "
                        "on the private captions and on generic ones, prune each family at each sparsity against "
                        "random masks of equal size, measure again), into --out")
    p.add_argument("--model", default="tiny-memorizer", choices=DEMO_SPECS,
                   help="which memorizer (default tiny-memorizer, the shipped one; tiny-memorizer-scene-captions: "
                        "its photos captioned with unseen scene captions, to be built)")
    p.add_argument("--built", action="store_true",
                   help="measure, run: use this machine's build ('memcore demo build') instead of the shipped weights")
    p.add_argument("--out", help="measure, run: new folder for the report, its table and pictures")
    p.add_argument("--samples", type=int, default=8, help="measure, run: samples per private caption (default 8)")
    p.add_argument("--steps", type=int, default=20, help="measure, run: inference steps (default 20)")
    p.add_argument("--guidance", type=float, default=1.0, help="measure, run: guidance scale (default 1: none)")
    p.add_argument("--families", default=",".join(DEMO_FAMILIES),
                   help=f"run: target families to localize and prune, comma-separated (default {','.join(DEMO_FAMILIES)})")
    p.add_argument("--sparsities", default="0.01,0.1,0.4",
                   help="run: sparsities s of the masks, comma-separated (default 0.01,0.1,0.4)")
    p.add_argument("--consistency", type=int, default=100,
                   help="run: held-out captions generated for caption consistency (default 100)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")

    p = sub.add_parser("env", help="show versions, devices and which kernel backends loaded")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    return parser


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mask_summary(mask, seconds: float) -> dict:
    total = sum(math.prod(mask.shape(name)) for name in mask.layers)
    masked = sum(mask.count(name) for name in mask.layers)
    return {
        "model": mask.metadata["model_id"],
        "layers": len(mask.layers),
        "masked_weights": masked,
        "target_weights": total,
        "density": masked / total,
        "num_prompts": mask.metadata["num_prompts"],
        "timesteps": mask.metadata["timesteps"],
        "sparsity": mask.metadata["sparsity"],
        "seconds": round(seconds, 3),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
    }


def _emit(args, summary: dict, line: str) -> None:
    print(json.dumps(summary, indent=2) if args.json else line)


def _describe(summary: dict, path: str) -> str:
    return (
        f"wrote {path}: {summary['masked_weights']:,} of {summary['target_weights']:,} weights "
        f"({100 * summary['density']:.3f}%) in {summary['layers']} layers, from {summary['num_prompts']} prompts, "
        f"tau {summary['timesteps']}, s {summary['sparsity']}, in {summary['seconds']:.1f} s"
    )


# The library names parameters as its functions do; a flag is found from its argparse dest. These
# library names have another dest, and token_norm=False is the switch --no-token-norm.
LIBRARY_DESTS = {"out_dir": "out"}
NEGATED_DESTS = {"token_norm": "no_token_norm"}
# The command that runs a library function an error mentions.
FUNCTION_COMMANDS = {
    "localize": "localize",
    "localize_subsets": "localize",
    "LocalizeConfig": "localize",
    "compute_mask": "mask",
    "prune": "prune",
    "analyze": "analyze",
    "mask_iou": "iou",
    "generate": "generate",
    "detection_scores": "detect",
    "DetectConfig": "detect",
}


class FlagWords:
    """Spells the parameters a :class:`MemcoreError` mentions as the flags of ``command``.

    ``error.render(FlagWords(parser, "localize"))`` turns the library's words into the terminal's::

        sparsity: must be in (0, 1], got 2              --sparsity: must be in (0, 1], got 2
        out_dir x: already exists                       --out x: already exists
        ...; pass force=True to apply it anyway         ...; use --force to apply it anyway
        ... with per_step=True (compute_mask(...))      ... with --per-step (memcore mask --per-step)

    A parameter is looked up by its dest among the options of ``command`` first, then of the other
    commands; one that no command has as an option (a positional argument) keeps its library words.
    """

    def __init__(self, parser: argparse.ArgumentParser, command: str) -> None:
        # argparse has no public way to list a parser's actions; _actions has been there since it began
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        self.command = command
        self.options = {
            name: {a.dest: a for a in sub._actions if a.option_strings} for name, sub in commands.items()
        }

    def __call__(self, mention: Mention) -> str:
        if isinstance(mention, Call):
            command = FUNCTION_COMMANDS.get(mention.function)
            flags = [self.flag(p, command) for p in mention.params] if command else None
            if flags is None or None in flags:
                return mention.python()
            return " ".join(["memcore", command, *flags])
        flag = self.flag(mention, self.command)
        if flag is None:
            return mention.python()
        return f"use {flag}" if isinstance(mention, Pass) else flag

    def flag(self, param: Param, command: str) -> str | None:
        """``--force`` for force=True, ``--model PATH`` for model=PATH, ``--out`` for out_dir; None where
        no flag says it."""
        dest, value = LIBRARY_DESTS.get(param.name, param.name), param.value
        if param.name in NEGATED_DESTS:
            dest, value = NEGATED_DESTS[param.name], None if value is None else not value
        order = [command, *(name for name in self.options if name != command)]
        action = next((self.options[name][dest] for name in order if dest in self.options.get(name, {})), None)
        if action is None:
            return None
        option = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
        if value is None:
            return option
        if action.nargs == 0:  # a switch: it can only say True
            return option if value is True else None
        return f"{option} {value}"


def cmd_localize(args) -> None:
    from memcore.config import LocalizeConfig
    from memcore.io import atomic_file, check_distinct, check_output_file
    from memcore.prompts import load_prompts

    started = time.perf_counter()
    config = LocalizeConfig(
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        height=args.height,
        width=args.width,
        timesteps=args.timesteps,
        sparsity=args.sparsity,
        rows=args.rows,
        token_norm=not args.no_token_norm,
        batch_size=args.batch_size,
        per_step=args.per_step,
        target=args.target,
        compile=args.compile,
    )
    if args.subsets:
        _localize_subsets(args, config, started)
        return
    out = check_output_file(args.out or "mask.safetensors", "out")
    stats_out = check_output_file(args.stats_out, "stats_out") if args.stats_out else None
    check_distinct([("out", out), ("stats_out", stats_out)], [("prompts", args.prompts)])
    prompts = load_prompts(args.prompts)

    from memcore.localization import localize
    from memcore.models import load_pipeline

    pipe = load_pipeline(args.model, args.device, args.dtype)
    mask, stats = localize(pipe, prompts, config)
    with contextlib.ExitStack() as outputs:  # both files are renamed into place at the end, or neither
        if stats_out is not None:
            stats.save(outputs.enter_context(atomic_file(stats_out)))
        mask.save(outputs.enter_context(atomic_file(out)))
    summary = {"mask": str(out), "stats": str(stats_out) if stats_out else None, **_mask_summary(mask, time.perf_counter() - started)}
    _emit(args, summary, _describe(summary, str(out)))


def _localize_subsets(args, config, started: float) -> None:
    from memcore.io import atomic_dir, check_distinct, check_output_dir
    from memcore.localization import localize_subsets
    from memcore.models import load_pipeline
    from memcore.prompts import load_subsets

    out = check_output_dir(args.out or "masks", "out")
    stats_out = check_output_dir(args.stats_out, "stats_out") if args.stats_out else None
    check_distinct([("out", out), ("stats_out", stats_out)], [("subsets", args.subsets)], what="folder")
    subsets = load_subsets(args.subsets)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    results = localize_subsets(pipe, subsets, config)
    seconds = time.perf_counter() - started
    with contextlib.ExitStack() as outputs:  # both folders are renamed into place at the end, or neither
        if stats_out is not None:
            tmp = outputs.enter_context(atomic_dir(stats_out))
            for name, (_, stats) in results.items():
                stats.save(tmp / f"{name}.safetensors")
        tmp = outputs.enter_context(atomic_dir(out))
        for name, (mask, _) in results.items():
            mask.save(tmp / f"{name}.safetensors")
    masks = {name: {"mask": str(out / f"{name}.safetensors"), **_mask_summary(mask, seconds)} for name, (mask, _) in results.items()}
    summary = {"out": str(out), "stats": str(stats_out) if stats_out else None, "seconds": round(seconds, 3), "subsets": masks}
    lines = [f"wrote {len(results)} masks into {out} in {seconds:.1f} s:"]
    lines += [f"  {name}: {100 * m['density']:.3f}% of {m['target_weights']:,} weights, from {m['num_prompts']} prompts" for name, m in masks.items()]
    _emit(args, summary, "\n".join(lines))


def cmd_mask(args) -> None:
    from memcore.io import check_distinct, check_output_file
    from memcore.mask import check_mask_settings, compute_mask
    from memcore.models import load_pipeline
    from memcore.stats import Statistics

    started = time.perf_counter()
    out = check_output_file(args.out, "out")
    check_distinct([("out", out)], [("stats", args.stats)])
    stats = Statistics.load(args.stats)
    check_mask_settings(stats, args.sparsity, args.timesteps)  # before loading the model
    pipe = load_pipeline(args.model, args.device, args.dtype or stats.metadata["dtype"])
    mask = compute_mask(pipe, stats, args.sparsity, args.timesteps, args.per_step, force=args.force)
    mask.save(out)
    summary = {"mask": str(out), **_mask_summary(mask, time.perf_counter() - started)}
    _emit(args, summary, _describe(summary, str(out)))


def cmd_prune(args) -> None:
    from memcore.io import atomic_dir, check_distinct, check_output_dir
    from memcore.mask import Mask
    from memcore.models import load_pipeline
    from memcore.pruning import prune

    started = time.perf_counter()
    out = check_output_dir(args.out, "out")
    check_distinct([("out", out)], [("mask", args.mask)], what="folder")
    mask = Mask.load(args.mask)
    pipe = load_pipeline(args.model, args.device or "cpu", args.dtype or mask.metadata["dtype"])
    zeroed = prune(pipe, mask, force=args.force)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    summary = {
        "out": str(out),
        "model": mask.metadata["model_id"],
        "zeroed_weights": zeroed,
        "seconds": round(time.perf_counter() - started, 3),
    }
    _emit(args, summary, f"wrote {out}: {zeroed:,} weights zeroed in {len(mask.layers)} layers")


def cmd_analyze(args) -> None:
    from memcore.analysis import analyze
    from memcore.io import files_in

    started = time.perf_counter()
    masks = files_in(args.masks, (".safetensors",), "mask files")
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    control = files_in(args.control, (".safetensors",), "mask files") if args.control else ()
    result = analyze(masks, args.out, names=names, density_only=args.density_only, control=control)
    dens, pairs = result.density, result.pairwise
    summary = {
        "out": str(args.out),
        "masks": result.names,
        "density": float(dens.overall),
        "iou": None if pairs is None else float(pairs.iou_overall),
        "iou_chance": None if pairs is None else float(pairs.chance_overall),
        "groups": None if result.groups is None else result.groups.as_dict(),
        "files": [str(p) for p in result.paths],
        "seconds": round(time.perf_counter() - started, 3),
    }
    line = f"wrote {len(result.paths)} files into {args.out}: {len(result.names)} masks, mean density {100 * summary['density']:.3f}%"
    if pairs is not None:
        line += f", mean IoU {summary['iou']:.3f} (chance {summary['iou_chance']:.3f})"
    if result.groups is not None:
        line += "; " + ", ".join(f"{group} {values[1]:.3f}" for group, values in result.groups.rows.items())
    _emit(args, summary, line)


def cmd_iou(args) -> None:
    from memcore.analysis import mask_iou

    result = mask_iou(*args.masks)
    iou, chance = result.iou, result.chance
    summary = {
        "masks": list(args.masks),
        "iou": result.iou_all,
        "iou_chance": result.chance_all,
        "layers": {name: {"iou": iou[name], "iou_chance": chance[name]} for name in result.layers},
    }
    width = max(len(name) for name in result.layers)
    lines = [f"{'layer':{width}}  iou     chance"]
    lines += [f"{name:{width}}  {iou[name]:.4f}  {chance[name]:.4f}" for name in result.layers]
    lines.append(f"{'all (pooled)':{width}}  {result.iou_all:.4f}  {result.chance_all:.4f}")
    _emit(args, summary, "\n".join(lines))


def cmd_generate(args) -> None:
    from memcore.generate import check_generate_arguments, parse_seeds
    from memcore.prompts import load_prompts

    started = time.perf_counter()
    settings = {"steps": args.steps, "height": args.height, "width": args.width, "batch_size": args.batch_size}
    # before loading the model
    wen = _wen_settings(args)
    _, seeds = check_generate_arguments(
        parse_seeds(args.seeds), out_dir=args.out, mask=args.mask, guidance=args.guidance, mitigation=args.mitigation,
        **settings,
    )
    if wen is not None:
        from memcore.mitigation import check_model_name

        check_model_name(args.model)
    prompts = load_prompts(args.prompts)
    if args.mask:
        from memcore.mask import Mask

        Mask.load(args.mask)  # a bad mask file is refused before the model loads (generate reads it again)

    from memcore.generate import generate
    from memcore.models import load_pipeline
    from memcore.runs import processes

    with processes(args.device) as (ranks, device):
        pipe = load_pipeline(args.model, device, args.dtype)
        result = generate(
            pipe, prompts, seeds, out_dir=args.out, mask=args.mask, guidance=args.guidance, force=args.force,
            mitigation=args.mitigation, wen=wen, ranks=ranks, **settings,
        )
    if not ranks.main:
        return
    summary = {
        "out": str(result.out_dir),
        "grid": str(result.grid),
        "grid_size": list(result.grid_size),
        "images": len(result.images) + len(result.pruned_images),
        "zeroed_weights": result.zeroed,
        "mitigation": args.mitigation,
        "seconds": round(time.perf_counter() - started, 3),
    }
    width, height = result.grid_size
    pruned = f", pruned with {result.zeroed:,} weights zeroed" if result.zeroed is not None else ""
    if wen is not None:
        record = json.loads(result.manifest.read_text(encoding="utf-8"))["mitigation"]
        summary["mitigation_seconds_per_image"] = record["seconds_per_image"]
        pruned += (
            f", mitigated (wen): {record['reached_target']} of {record['images']} reached loss "
            f"{record['target_loss']:g}, {record['seconds_per_image']:.2f} s per image"
        )
    _emit(args, summary, f"wrote {summary['images']} images and {result.grid} ({width}x{height}){pruned}")


def _wen_settings(args):
    """The WenSettings of --mitigation wen (checked), None otherwise; --wen-* flags need it."""
    given = {name: getattr(args, f"wen_{name}") for name in ("lr", "target_loss", "max_steps")}
    given = {name: value for name, value in given.items() if value is not None}
    if args.mitigation != "wen":
        if given:
            flag = "--wen-" + next(iter(given)).replace("_", "-")
            raise MemcoreError(f"{flag} is only used with --mitigation wen")
        return None
    from memcore.mitigation import WenSettings

    return WenSettings(**given)


def cmd_evaluate(args) -> None:
    if args.compare:
        return _evaluate_compare(args)
    from memcore.generate import check_generate_arguments, parse_seeds
    from memcore.io import check_distinct
    from memcore.prompts import load_prompts

    started = time.perf_counter()
    for flag, value in (("--model", args.model), ("--prompts", args.prompts), ("--out", args.out)):
        if value is None:
            raise MemcoreError(f"{flag} is required (or give --compare DIR ... --out FIG.png)")
    if args.ground_truth is not None and args.sscd is None:
        raise MemcoreError("needs --sscd PATH, the network that compares images", param="ground_truth")
    if args.fid_reference is not None and args.inception is None:
        raise MemcoreError("needs --inception PATH, the network whose features FID compares", param="fid_reference")
    for param, path in (("ground_truth", args.ground_truth), ("fid_reference", args.fid_reference)):
        if path is not None and not os.path.exists(path):
            raise MemcoreError("no such file or folder", param=param, value=path)
    if args.localize_seconds is not None and (not args.mask or not args.localize_seconds >= 0):
        raise MemcoreError(
            f"must be a number >= 0 and goes with --mask, got {args.localize_seconds}", param="localize_seconds"
        )
    wen = _wen_settings(args)
    settings = {"steps": args.steps, "height": args.height, "width": args.width, "batch_size": args.batch_size}
    out, seeds = check_generate_arguments(
        parse_seeds(args.seeds), out_dir=args.out, mask=args.mask, guidance=args.guidance, mitigation="none", **settings
    )
    from memcore.evaluate import methods_of
    from memcore.generate import check_mitigation

    methods_of(args.mask, args.mitigation, args.baseline)
    check_mitigation(args.mitigation, None, args.guidance)
    if wen is not None:
        from memcore.mitigation import check_model_name

        check_model_name(args.model)
    check_distinct(
        [("out", out)],
        [("prompts", args.prompts), ("mask", args.mask), ("ground_truth", args.ground_truth),
         ("fid_reference", args.fid_reference), ("sscd", args.sscd), ("inception", args.inception)],
    )
    prompts = load_prompts(args.prompts)
    labels = None
    if not os.path.exists(args.prompts):
        from memcore import datasets

        labels = datasets.labels(args.prompts)
    if args.mask:
        from memcore.mask import Mask

        Mask.load(args.mask)  # a bad mask file is refused before the model loads

    from memcore import evaluation as ev
    from memcore.evaluate import _file_identity, evaluate
    from memcore.models import load_pipeline
    from memcore.runs import processes

    with processes(args.device) as (ranks, device):
        from memcore.models import resolve_device

        scorers = ev.load_scorers(
            sscd=args.sscd, sscd_preprocessing=args.sscd_preprocessing, clip=args.clip, inception=args.inception,
            device=resolve_device(device, None)[0],
        )
        ground_truth = None if args.ground_truth is None else ev.GroundTruth.load(args.ground_truth, len(prompts), scorers)
        pipe = load_pipeline(args.model, device, args.dtype)
        identity = {
            "sscd": _file_identity(args.sscd), "clip": args.clip, "inception": _file_identity(args.inception),
        }
        result = evaluate(
            pipe, prompts, seeds, out_dir=out, scorers=scorers, ground_truth=ground_truth,
            fid_reference=args.fid_reference, labels=labels, mask=args.mask, mitigation=args.mitigation, wen=wen,
            baseline=args.baseline, guidance=args.guidance, force=args.force, localize_seconds=args.localize_seconds,
            ranks=ranks, identity=identity,
            **settings,
        )
    if result is None:
        return
    summary = {"out": str(result.out_dir), **result.summary, "seconds": round(time.perf_counter() - started, 3)}
    images = sum(m["images"] for m in result.summary["methods"].values())
    parts = []
    for method, m in result.summary["methods"].items():
        scores = [f"{m['seconds']['per_image']:.3g} s/image"] if m.get("seconds") else []
        if m.get("sscd"):
            scores.append(f"SSCD {m['sscd']['score']:.3f} ({m['sscd']['above_0.5']:.0%} > 0.5)")
        if m.get("clip"):
            scores.append(f"CLIP {m['clip']['score']:.3f}")
        if m.get("fid") is not None:
            scores.append(f"FID {m['fid']:.2f}")
        parts.append(f"{method}: {', '.join(scores)}")
    _emit(args, summary, f"wrote {images} images and {result.figure} into {result.out_dir}; " + "; ".join(parts))


def _evaluate_compare(args) -> None:
    from memcore.io import check_distinct, check_output_file

    given = [name for name, value in (("--model", args.model), ("--prompts", args.prompts), ("--mask", args.mask)) if value]
    if given:
        raise MemcoreError(f"--compare redraws finished runs and generates nothing; drop {', '.join(given)}")
    if args.out is None:
        raise MemcoreError("--compare needs --out FIG.png, the figure to write")
    out = check_output_file(args.out, "out")
    if os.path.splitext(args.out)[1].lower() != ".png":
        raise MemcoreError("with --compare, must be a .png file", param="out", value=args.out)
    check_distinct([("out", out)], [("compare", d) for d in args.compare])
    from memcore.evaluation import compare

    path = compare(args.compare, out)
    _emit(args, {"out": str(path), "runs": list(args.compare)}, f"wrote {path} ({len(args.compare)} runs)")


OUT_PROMPTS_FORMATS = (".txt", ".jsonl")


def cmd_detect(args) -> None:
    from memcore.detection import DetectConfig
    from memcore.figures import require_matplotlib
    from memcore.generate import parse_seeds
    from memcore.io import check_distinct, check_output_dir, check_output_file
    from memcore.prompts import load_prompts

    started = time.perf_counter()
    if (args.top is None) != (args.out_prompts is None):
        raise MemcoreError("--top and --out-prompts go together: --top N --out-prompts FILE")
    if args.top is not None and args.top < 1:
        raise MemcoreError(f"must be at least 1, got {args.top}", param="top")
    if args.out_prompts is not None and os.path.splitext(args.out_prompts)[1].lower() not in OUT_PROMPTS_FORMATS:
        raise MemcoreError(
            f"must end in {' or '.join(OUT_PROMPTS_FORMATS)} (a prompt file 'memcore localize' reads)",
            param="out_prompts",
        )
    require_matplotlib()
    config = DetectConfig(
        steps=args.steps, guidance=args.guidance, seeds=tuple(parse_seeds(args.seeds)), height=args.height,
        width=args.width, timesteps=args.timesteps, batch_size=args.batch_size,
    )
    out = check_output_dir(args.out, "out")
    out_prompts = check_output_file(args.out_prompts, "out_prompts") if args.out_prompts else None
    check_distinct([("out", out), ("out_prompts", out_prompts)], [("prompts", args.prompts), ("control", args.control)])
    prompts = load_prompts(args.prompts)
    control = load_prompts(args.control) if args.control else []
    if args.top is not None:
        if args.top > len(prompts):
            raise MemcoreError(f"is {args.top}, more than the {len(prompts)} prompts of {args.prompts}", param="top")
        if out_prompts.suffix.lower() == ".txt":
            broken = next((i for i, p in enumerate(prompts) if "\n" in p or "\r" in p), None)
            if broken is not None:
                raise MemcoreError(
                    f"prompt {broken} of {args.prompts} holds a line break, which a .txt file cannot keep; "
                    "write a .jsonl file instead",
                    param="out_prompts",
                )

    import dataclasses

    import torch

    from memcore.detection import detection_scores
    from memcore.models import load_pipeline, model_id

    from memcore.runs import Run, processes
    from memcore.stats import prompts_sha256

    with processes(args.device) as (ranks, device):
        pipe = load_pipeline(args.model, device, args.dtype)
        settings = {
            "model": model_id(pipe), "dtype": str(pipe.dtype).removeprefix("torch."),
            "device": torch.device(pipe.device).type, "prompts_sha256": prompts_sha256([*prompts, *control]),
            "prompts": len(prompts), "control": len(control),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items() if k != "progress"},
        }
        with Run(out, kind="detect", settings=settings, ranks=ranks) as run:
            result = detection_scores(pipe, [*prompts, *control], config, run=run, ranks=ranks)
            if ranks.main:
                summary = _write_detection(args, run.folder, out, out_prompts, result, len(prompts), started)
    if not ranks.main:
        return
    line = (
        f"wrote {len(summary['files'])} files into {out}: {len(prompts)} prompts"
        + (f" and {len(control)} control prompts" if control else "")
        + f" scored over {config.timesteps} call{'s' if config.timesteps > 1 else ''} x {len(config.seeds)} seed"
        + ("s" if len(config.seeds) > 1 else "")
    )
    if summary["auc"] is not None:
        line += f"; AUC {summary['auc']:.4f}, TPR@1%FPR {summary['tpr_at_1pct_fpr']:.4f}"
    if out_prompts is not None:
        line += f"; top {args.top} prompts in {out_prompts}"
    _emit(args, summary, line)


def _write_detection(args, tmp, out, out_prompts, result, num_prompts: int, started: float) -> dict:
    """scores.csv, summary.json, histogram.png (and roc.png with a control) into ``tmp`` (the folder
    that becomes ``out``), and the top prompts."""
    import csv

    import numpy as np

    from memcore.detection import roc
    from memcore.io import atomic_file

    scores, per_call = result.scores, result.per_call
    sets = ["prompts"] * num_prompts + ["control"] * (len(result.prompts) - num_prompts)
    pos, neg = scores[:num_prompts], scores[num_prompts:]
    curve = roc(pos, neg) if neg.size else None
    # the highest scores first; equal scores keep the order of the file
    top = sorted(range(num_prompts), key=lambda i: (-scores[i], i))[: args.top] if args.top else []
    names = ["scores.csv", "summary.json", "histogram.png"] + (["roc.png"] if curve is not None else [])

    def stats(values) -> dict | None:
        if values.size == 0:
            return None
        return {"count": int(values.size), "mean": float(values.mean()), "median": float(np.median(values)),
                "min": float(values.min()), "max": float(values.max())}

    summary = {
        "out": str(out),
        "files": [str(out / name) for name in names],
        "prompts": args.prompts,
        "control": args.control,
        "score": "mean over seeds and the first T denoiser calls of ||eps(x_t, prompt) - eps(x_t, '')||_2",
        **result.metadata,
        "prompt_scores": stats(pos),
        "control_scores": stats(neg),
        "auc": None if curve is None else curve.auc,
        "tpr_at_1pct_fpr": None if curve is None else curve.tpr_at_fpr,
        "out_prompts": None if out_prompts is None else str(out_prompts),
        "top": [{"index": i, "prompt": result.prompts[i], "score": float(scores[i])} for i in top],
        "seconds": round(time.perf_counter() - started, 3),
    }
    with contextlib.ExitStack() as outputs:  # the prompt file is renamed into place just before the folder
        if out_prompts is not None:
            path = outputs.enter_context(atomic_file(out_prompts))
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                for i in top:
                    prompt = result.prompts[i]
                    f.write((json.dumps({"prompt": prompt}, ensure_ascii=False) if out_prompts.suffix.lower() == ".jsonl" else prompt) + "\n")
        with open(tmp / "scores.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "set", "prompt", "score", *(f"call_{t}" for t in range(per_call.shape[1]))])
            for i, prompt in enumerate(result.prompts):
                index = i if i < num_prompts else i - num_prompts
                writer.writerow([index, sets[i], prompt, repr(float(scores[i])), *(repr(float(v)) for v in per_call[i])])
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _detection_figures(tmp, pos, neg, curve)
    return summary


def _detection_figures(folder, pos, neg, curve) -> None:
    import numpy as np
    from matplotlib.figure import Figure  # a Figure made directly draws with Agg, whatever the backend

    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    values = [pos] + ([neg] if neg.size else [])
    low, high = min(v.min() for v in values), max(v.max() for v in values)
    bins = np.linspace(low, high if high > low else low + 1, 31)
    ax.hist(pos, bins=bins, alpha=0.6, label=f"prompts ({pos.size})")
    if neg.size:
        ax.hist(neg, bins=bins, alpha=0.6, label=f"control ({neg.size})")
    ax.set_xlabel("detection score")
    ax.set_ylabel("prompts")
    ax.legend()
    fig.savefig(folder / "histogram.png", format="png", dpi=120)
    if curve is None:
        return
    fig = Figure(figsize=(4, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(curve.fpr, curve.tpr, drawstyle="default", label=f"AUC {curve.auc:.4f}")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.axvline(curve.max_fpr, linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate (control)")
    ax.set_ylabel("true positive rate (prompts)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right")
    fig.savefig(folder / "roc.png", format="png", dpi=120)


def cmd_data(args) -> None:
    from memcore import datasets

    if args.name == FETCH_IMAGES:
        _fetch_images(args)
        return
    if args.fetch_set is not None:
        raise MemcoreError(f"{args.fetch_set}: one NAME only (to fetch a set's images: memcore data {FETCH_IMAGES} SET --out DIR)")
    given = [dest for dest in FETCH_OPTIONS if getattr(args, dest) is not None]
    if given:
        raise MemcoreError(f"only with memcore data {FETCH_IMAGES} SET", param=given[0])
    if args.name is None and args.json:
        text = json.dumps([s.as_dict() for s in datasets.builtin_sets()], indent=2)
    elif args.name is None:
        lines = [f"{'NAME':19} {'ROWS':>6}  DESCRIPTION, SOURCE AND LICENCE, CITATION"]
        for label, members in datasets.groups():
            first, sizes = members[0], sorted({s.rows for s in members})
            rows = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
            lines += [
                f"{label:19} {rows:>6}  {first.description}",
                f"{'':28}{first.source}, {first.licence}",
                f"{'':28}cite: {first.citation}",
            ]
        lines.append("A name works wherever a prompt file does; 'memcore data NAME' prints its prompts. See DATA.md.")
        text = "\n".join(lines)
    else:
        found = datasets.get(args.name)
        if found is None:
            raise MemcoreError(f"{args.name}: not a built-in prompt set ('memcore data' lists them)")
        prompts = found.prompts()
        text = json.dumps({**found.as_dict(), "prompts": prompts}, indent=2, ensure_ascii=False) if args.json else "\n".join(prompts)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # piped into head, say: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


FETCH_IMAGES = "fetch-images"
FETCH_OPTIONS = ("out", "workers", "timeout", "retries")  # the options of fetch-images, None when not given


def _fetch_images(args) -> None:
    from memcore.fetch import fetch_images

    if args.fetch_set is None:
        raise MemcoreError(f"{FETCH_IMAGES}: which set? (memcore data {FETCH_IMAGES} SET --out DIR)")
    if args.out is None:
        raise MemcoreError(f"is required with {FETCH_IMAGES}", param="out")
    settings = {dest: getattr(args, dest) for dest in ("workers", "timeout", "retries") if getattr(args, dest) is not None}
    result = fetch_images(args.fetch_set, args.out, **settings)
    summary = {
        "set": result.name,
        "out": str(result.out_dir),
        "report": str(result.report),
        "images": len(result.statuses),
        "present": result.present,
        "counts": result.counts,
        "seconds": round(result.seconds, 3),
    }
    _emit(args, summary, result.summary())


def cmd_env(args) -> None:
    import platform

    import torch

    from memcore.ops import BACKENDS, forced_backend
    from memcore.ops._ext import cuda_backend_status, extension, extension_error

    ext = extension()
    info = {
        "memcore": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "extension": "loaded" if ext is not None else f"missing ({extension_error()})",
        "backends": {
            "reference": "available",
            "cpu": f"available ({ext.openmp_threads()} OpenMP threads)" if ext is not None else "missing (no extension)",
            "cuda": cuda_backend_status(),
            "triton": _triton_status(),
        },
        "forced_backend": forced_backend(),
        "known_backends": list(BACKENDS),
        "ops_cpu": _ops_status("cpu"),
    }
    if torch.cuda.is_available():
        info["ops_cuda"] = _ops_status("cuda")
    for name in ("diffusers", "transformers", "safetensors"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            width = max(map(len, value), default=0)
            for name, status in value.items():
                print(f"  {name:{width}} {status}")
        else:
            print(f"{key:16} {value}")


def _ops_status(device: str) -> dict[str, str]:
    """Per op, the backend chosen on ``device`` and the others available (memcore.ops' table)."""
    from memcore.ops import backend_report

    return {op: (f"{row['chosen']} (available: {', '.join(row['available'])})" if row["chosen"]
                 else f"none: {row['error']}") for op, row in backend_report(device).items()}


def _triton_status() -> str:
    import torch

    from memcore.ops._backend import triton_usable

    try:
        import triton
    except ImportError:
        return "not installed"
    if triton_usable(torch.device("cuda")) and torch.cuda.is_available():
        return f"available (triton {triton.__version__})"
    if triton_usable(torch.device("cpu")):
        return f"interpreter only (triton {triton.__version__}, TRITON_INTERPRET=1, no GPU)"
    return f"installed (triton {triton.__version__}), no GPU to run on"


def cmd_attack(args) -> None:
    from memcore import attack as at

    if args.compare:
        given = [flag for flag, value in (("--model", args.model), ("--prompts", args.prompts), ("--out", args.out),
                                          ("--from-images", args.from_images), ("--mask", args.mask)) if value]
        if given:
            raise MemcoreError(f"--compare reads two finished runs and runs nothing; drop {', '.join(given)}")
        table = at.compare_table(*args.compare)
        runs = {name: at.read_summary(folder) for name, folder in zip(("before", "after"), args.compare)}
        _emit(args, runs, table)
        return
    from memcore.io import check_distinct, check_output_dir
    from memcore.prompts import load_prompts

    started = time.perf_counter()
    for flag, value in (("--prompts", args.prompts), ("--out", args.out)):
        if value is None:
            raise MemcoreError(f"{flag} is required (or give --compare BEFORE AFTER)")
    if (args.model is None) == (args.from_images is None):
        raise MemcoreError("give --model to generate the samples, or --from-images DIR to read them (one of the two)")
    if args.from_images is not None:
        given = [flag for flag, value in (("--mask", args.mask), ("--steps", args.steps), ("--guidance", args.guidance),
                                          ("--height", args.height), ("--width", args.width), ("--dtype", args.dtype))
                 if value is not None]
        if given:
            raise MemcoreError(f"--from-images reads images and generates nothing; drop {', '.join(given)}")
    at.check_threshold(args.threshold)
    at.check_min_size(args.min_clique)
    if args.samples < 2:
        raise MemcoreError(f"must be at least 2 (a clique needs two samples), got {args.samples}", param="samples")
    if args.min_clique > args.samples:
        raise MemcoreError(
            f"is {args.min_clique}, more than the {args.samples} samples: nothing could be flagged", param="min_clique"
        )
    if args.mask is not None and not os.path.isfile(args.mask):
        raise MemcoreError("no such file", param="mask", value=args.mask)
    if args.model is not None:
        from memcore.config import check_batch_size, check_guidance, check_image_settings

        check_batch_size(args.batch_size)
        check_image_settings(args.steps, args.height, args.width)
        check_guidance(args.guidance)
    check_output_dir(args.out, "out")
    check_distinct([("out", args.out)], [("prompts", args.prompts), ("mask", args.mask),
                                         ("ground_truth", args.ground_truth), ("from_images", args.from_images)])
    prompts = load_prompts(args.prompts)
    seeds = list(range(args.samples))
    if args.from_images is not None:
        at.check_sample_files(args.from_images, len(prompts), seeds)  # before anything is created
    training = None if args.ground_truth is None else at.load_training_images(args.ground_truth, len(prompts))
    if args.mask:
        from memcore.mask import Mask

        Mask.load(args.mask)  # a bad mask file is refused before the model loads

    from memcore.runs import processes

    with processes(args.device) as (ranks, device):
        pipe = None
        if args.model is not None:
            from memcore.models import load_pipeline

            pipe = load_pipeline(args.model, device, args.dtype)
        result = at.attack(
            prompts, out_dir=args.out, samples=args.samples, pipe=pipe, from_images=args.from_images, training=training,
            threshold=args.threshold, min_size=args.min_clique, mask=args.mask, force=args.force, steps=args.steps,
            guidance=args.guidance, height=args.height, width=args.width, batch_size=args.batch_size, ranks=ranks,
            device=device if pipe is None else None,
            identity={"ground_truth": None if args.ground_truth is None else os.path.abspath(args.ground_truth)},
        )
    if result is None:
        return
    s = result.summary
    summary = {"out": str(result.out_dir), **s, "seconds": round(time.perf_counter() - started, 3)}
    copies = "" if s["true_copies"] is None else f", {s['true_copies']} true copies"
    _emit(args, summary, f"{s['flagged']} of {s['prompts']} prompts flagged{copies}; wrote {result.csv}")


# -- finetune -------------------------------------------------------------------------------------
def cmd_finetune(args) -> None:
    from memcore.finetune import FinetuneConfig, prepare_finetune

    config = FinetuneConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, save_every=args.save_every,
        mixed_precision=args.mixed_precision, duplicate=args.duplicate, times=args.times,
    )
    from memcore.runs import processes

    with processes(args.device) as (ranks, device):
        prepared = prepare_finetune(args.model, args.data, args.out, config, device, ranks)  # before the model loads

        from memcore.finetune import finetune_denoiser
        from memcore.models import load_pipeline

        pipe = load_pipeline(args.model, device, "float32")  # trained in float32; mixed precision autocasts
        result = finetune_denoiser(pipe, prepared, ranks=ranks)
    if not ranks.main:
        return
    losses = result.losses
    summary = {
        "out": str(result.out_dir),
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "images": len(prepared.examples),
        "duplicated": len(prepared.duplicated),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "seconds": round(result.seconds, 3),
        "steps_per_second": round(result.steps_per_second, 4),
    }
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    _emit(args, summary, (
        f"wrote {result.out_dir}: {result.steps} steps{resumed} on {len(prepared.examples)} images "
        f"({len(prepared.duplicated)} duplicated x{config.times if prepared.duplicated else 1}), "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, {summary['steps_per_second']:.3f} steps/s"
    ))
# -- end finetune ---------------------------------------------------------------------------------


def cmd_demo(args) -> None:
    from memcore import demo

    if args.action == "measure":
        _demo_measure(args)
        return
    if args.action == "run":
        _demo_run(args)
        return
    for name in ("out", "built"):
        if getattr(args, name):
            raise MemcoreError("is for 'memcore demo measure' and 'memcore demo run'", param=name)
    started = time.perf_counter()
    folder = demo.build(args.model, device=args.device)
    record = json.loads((folder.parent / demo.BUILD_RECORD).read_text())
    _emit(args, {"model": args.model, "folder": str(folder), **record},
          f"{args.model} is built in {folder} ({time.perf_counter() - started:.0f} s this run); "
          f"use it with 'memcore demo run|measure --model {args.model} --built', or with --model {folder} "
          f"in any command")


def _demo_measure(args) -> None:
    import shutil

    from memcore import demo
    from memcore.demo_measure import draw_copies, measure
    from memcore.io import check_output_dir
    from memcore.models import load_pipeline
    from memcore.runs import partial_path

    if args.out is None:
        raise MemcoreError("is required: the folder for report.json and copies.png", param="out")
    if args.samples < 3:
        raise MemcoreError(f"must be at least 3 (the attack's smallest clique), got {args.samples}", param="samples")
    out = check_output_dir(args.out, "out")
    pipe = load_pipeline(str(demo.model_folder(args.model, args.built)), args.device, "float32")
    report = measure(pipe, demo.SPECS[args.model], samples=args.samples, steps=args.steps, guidance=args.guidance)
    partial = partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    draw_copies(report, partial / "copies.png")
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    (partial / "report.json").write_text(json.dumps({"model": args.model, **public}, indent=2) + "\n", encoding="utf-8")
    partial.rename(out)
    s = public["summary"]
    _emit(args, public, (
        f"wrote {out}: private captions flagged {s['private_flagged']}/{s['prompts_each']}, copied "
        f"{s['private_copied']}/{s['prompts_each']}; generic flagged {s['generic_flagged']}/{s['prompts_each']}; "
        f"held-out captions all labels right {public['consistency_held_out']['all']:.2f}"
    ))


def _demo_run(args) -> None:
    import shutil

    from memcore import demo
    from memcore.demo_run import ExperimentConfig, draw_figure, public, run_experiment, table
    from memcore.io import check_output_dir
    from memcore.models import load_pipeline
    from memcore.runs import partial_path, write_atomic

    if args.out is None:
        raise MemcoreError("is required: the folder for report.json, table.md and copies.png", param="out")
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    try:
        sparsities = tuple(float(s) for s in args.sparsities.split(",") if s.strip())
    except ValueError:
        raise MemcoreError(f"must be numbers separated by commas, got {args.sparsities!r}", param="sparsities") from None
    config = ExperimentConfig(families=families, sparsities=sparsities, samples=args.samples, steps=args.steps,
                              guidance=args.guidance, consistency=args.consistency)
    out = check_output_dir(args.out, "out")
    pipe = load_pipeline(str(demo.model_folder(args.model, args.built)), args.device, "float32")
    report = run_experiment(pipe, demo.SPECS[args.model], config)
    partial = partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "masks").mkdir(parents=True)
    draw_figure(report, partial / "copies.png")
    for (family, sparsity), mask in report["_masks"].items():
        mask.save(partial / "masks" / f"{family}-s{sparsity:g}.safetensors")
    (partial / "table.md").write_text(table(report), encoding="utf-8")
    summary = {"model": args.model, **public(report)}
    write_atomic(partial / "report.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8"))
    partial.rename(out)
    before = report["before"]
    n = len(report["private_captions"])
    lines = [f"wrote {out} in {report['seconds']:.0f} s: detection AUC {report['detect']['auc']:.2f}; before pruning "
             f"{before['private_flagged']}/{n} private captions flagged, {before['private_copied']}/{n} copied"]
    for row in report["after"]:
        if row["mask"] == "private" and "skipped" not in row:
            lines.append(f"  {row['family']} s={row['sparsity']:g} ({100 * row['density']:.2f}% pruned): "
                         f"{row['private_flagged']}/{n} flagged, {row['private_copied']}/{n} copied, consistency "
                         f"{row['consistency_mean']:.3f} (before {before['consistency_mean']:.3f})")
    _emit(args, summary, "\n".join(lines))


COMMANDS = {
    "attack": cmd_attack,
    "demo": cmd_demo,
    "localize": cmd_localize,
    "mask": cmd_mask,
    "prune": cmd_prune,
    "analyze": cmd_analyze,
    "iou": cmd_iou,
    "generate": cmd_generate,
    "evaluate": cmd_evaluate,
    "detect": cmd_detect,
    "data": cmd_data,
    "env": cmd_env,
    "finetune": cmd_finetune,
}


PARALLEL_COMMANDS = ("generate", "evaluate", "detect", "attack", "finetune")
"""Commands that share their work among the processes of a ``torchrun`` launch (memcore.runs)."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from memcore.runs import launched_ranks

    try:
        ranks = launched_ranks()
    except MemcoreError as exc:
        print(f"memcore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if ranks.world > 1 and args.command not in PARALLEL_COMMANDS:
        print(
            f"memcore {args.command}: error: runs in one process; launch it without torchrun "
            f"(under torchrun: {', '.join(PARALLEL_COMMANDS)})",
            file=sys.stderr,
        )
        return 2
    # No handler is configured: logging's last-resort handler prints warnings as bare lines on stderr.
    # transformers warns at import about optional image backends that memcore never uses
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from memcore.io import claimed_outputs, ignore_signals, signals_as_exceptions

    # SIGTERM and SIGHUP raise like SIGINT does, so that every temporary output is removed on the way out
    with signals_as_exceptions():
        try:
            try:
                with claimed_outputs():  # the outputs checked by the command stay claimed until it ends
                    COMMANDS[args.command](args)
                return 0
            except MemcoreError as exc:
                ignore_signals()
                print(f"memcore {args.command}: error: {exc.render(FlagWords(parser, args.command))}", file=sys.stderr)
                return 2
        except KeyboardInterrupt as exc:  # memcore.io.Interrupted for SIGTERM and SIGHUP
            ignore_signals()
            signum = getattr(exc, "signum", signal.SIGINT)
            print(f"memcore {args.command}: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
            return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
