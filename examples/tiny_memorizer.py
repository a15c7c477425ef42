"""The paper's experiment on the tiny memorizer, through the Python API (``memcore demo run`` does the
same from the command line).

The tiny memorizer ships with memcore: a text-to-image pipeline trained on a CPU on procedural
captioned scenes plus 12 public-domain photos duplicated 50 times each (docs/demo.md). This script
detects its memorized captions, localizes them in each target family, prunes at each sparsity
against a control mask (localized on generic captions) and a random mask of equal size, measures
again, and writes the table and the picture.

    python examples/tiny_memorizer.py --out memorizer-experiment/                # every family, about 15 minutes on 2 cores
    python examples/tiny_memorizer.py --out quick/ --families ffn --sparsities 0.1 --samples 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memcore import demo
from memcore.demo_run import FAMILIES, ExperimentConfig, draw_figure, public, run_experiment, table
from memcore.models import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="new folder for report.json, table.md, copies.png")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated target families")
    parser.add_argument("--sparsities", default="0.01,0.1,0.4", help="comma-separated sparsities")
    parser.add_argument("--samples", type=int, default=8, help="samples per private caption")
    parser.add_argument("--consistency", type=int, default=100, help="held-out captions for caption consistency")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"--out {args.out}: already exists; choose a new folder")

    config = ExperimentConfig(
        families=tuple(args.families.split(",")), sparsities=tuple(float(s) for s in args.sparsities.split(",")),
        samples=args.samples, consistency=args.consistency,
    )
    pipe = load_pipeline(str(demo.model_folder("tiny-memorizer")), "cpu", "float32")
    report = run_experiment(pipe, demo.SPECS["tiny-memorizer"], config)

    args.out.mkdir(parents=True)
    (args.out / "table.md").write_text(table(report))
    (args.out / "report.json").write_text(json.dumps(public(report), indent=2) + "\n")
    draw_figure(report, args.out / "copies.png")
    print(table(report))
    print(f"detection AUC (private against generic captions): {report['detect']['auc']:.3f}")
    print(f"wrote {args.out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
