"""Write this machine's build of the tiny memorizer as memcore ships it (memcore/data/tiny-memorizer/).

    memcore demo build                  # about 30 minutes on 2 CPU cores
    python tools/ship_memorizer.py      # float16 weights, the build record with the spec's digest

The scene classifier that ``memcore demo measure`` and ``demo run`` score with is shipped beside it
(``--classifier``: this machine's cached one, trained on first use, rounded to float16).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from memcore import demo
from memcore.scenes import VERSION


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "memcore" / "data" / demo.SHIPPED)
    args = parser.parse_args()
    spec = demo.SPECS[demo.SHIPPED]
    demo.export_shipped(spec, args.out)
    from memcore.demo_measure import cached_classifier

    cached_classifier(spec.pixels)  # trains it once if this machine has none
    name = f"scene-classifier-{spec.pixels}px-v{VERSION}"
    source = demo.cache_root() / name
    weights = load_file(source.with_suffix(".safetensors"))
    save_file({k: v.half().contiguous() for k, v in weights.items()}, args.out / f"{name}.safetensors")
    shutil.copyfile(source.with_suffix(".json"), args.out / f"{name}.json")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
