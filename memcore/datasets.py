"""Built-in prompt sets: the prompt lists of the memorization literature that ship in ``memcore/data``.

Every set has a name, a row count, its source repository, its licence and what to cite (DATA.md at
the repository root has the full references). A name works wherever a prompt file does::

    memcore.load_prompts("sdv1-500")                 # the 500 memorized SD 1 prompts
    memcore.load_subsets(["memorize_0..9"])          # memorize_0 ... memorize_9

and gives the list :func:`memcore.load_prompts` reads from the published file: stripped, in file
order, duplicates kept. The paper's subsets (``memorize_N``, ``memorize_sd2_N``, ``mv_prompts_N``,
``tv_prompts_N``) come from a repository without a licence, so they ship only as row numbers into
``sdv1-500`` (``subsets.json``).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from dataclasses import asdict, dataclass
from importlib import resources

from memcore.errors import MemcoreError

__all__ = ["PromptSet", "builtin_sets", "expand_range", "get", "groups", "labels", "names"]

NEMO = "github.com/ml-research/localizing_memorization_in_diffusion_models"
MEMATTN = "github.com/renjie3/MemAttn"
CONCEPT_PRUNE = "github.com/ruchikachavhan/concept-prune"


@dataclass(frozen=True)
class PromptSet:
    """One built-in set: ``rows`` prompts of ``file`` in ``memcore/data``, or the rows ``indices`` of it."""

    name: str
    rows: int
    description: str
    source: str
    licence: str
    citation: str
    file: str
    indices: tuple[int, ...] | None = None

    @property
    def family(self) -> str | None:
        """``memorize`` for ``memorize_7``: the stem of a numbered subset, None for a whole list."""
        return None if self.indices is None else self.name.rsplit("_", 1)[0]

    def prompts(self) -> list[str]:
        prompts = _file_prompts(self.file)
        return list(prompts) if self.indices is None else [prompts[i] for i in self.indices]

    def as_dict(self) -> dict:
        info = {k: v for k, v in asdict(self).items() if k != "indices"}
        return {**info, "family": self.family}


_LISTS = (
    PromptSet(
        "sdv1-500", 500,
        "memorized SD 1 prompts from LAION (the file also has each training image's URL and a VM/TM label)",
        NEMO, "MIT; captions CC BY 4.0 (LAION)",
        "Webster 2023; Wen et al., ICLR 2024; Hintersdorf et al., NeurIPS 2024", "sdv1_500_labeled_vm_tm.csv",
    ),
    PromptSet(
        "sd1-mem345", 345, "SD 1 memorized prompts, all within sdv1-500",
        MEMATTN, "MIT", "Ren et al., ECCV 2024", "sd1_mem345.txt",
    ),
    PromptSet(
        "sd2-mem219", 219, "SD 2 memorized prompts",
        MEMATTN, "MIT", "Ren et al., ECCV 2024", "sd2_mem219.txt",
    ),
    PromptSet(
        "synthetic-nomem-500", 500, "synthetic prompts that are not memorized",
        MEMATTN, "MIT", "Ren et al., ECCV 2024", "synthetic_nomem_500.txt",
    ),
    PromptSet(
        "coco-10k", 10_000, "COCO 2014 validation captions (not memorized; 34 repeated)",
        NEMO, "MIT; captions CC BY 4.0 (COCO Consortium)",
        "Lin et al., ECCV 2014; Hintersdorf et al., NeurIPS 2024", "coco2014_val_10000.csv",
    ),
    PromptSet(
        "laion-nomem-500", 500, "LAION prompts that SD 1 does not memorize",
        NEMO, "MIT; captions CC BY 4.0 (LAION)",
        "Hintersdorf et al., NeurIPS 2024", "laion_unmemorized_500.csv",
    ),
)

# numbered subsets of sdv1-500 (subsets.json), described per family
_FAMILIES = {
    "memorize": "the paper's subsets of sdv1-500 (0-9: 10 prompts, 10-19: 20, 20-29: 30, 30-39: 40, "
    "40-49: 50, 50-59: 40; they overlap)",
    "memorize_sd2": "the paper's subsets for SD 2, of sdv1-500",
    "mv_prompts": "subsets of sdv1-500, mostly verbatim copies (VM)",
    "tv_prompts": "subsets of sdv1-500, mostly template copies (TM)",
}


def _data(file: str):
    return resources.files("memcore") / "data" / file


@functools.cache
def _file_prompts(file: str) -> tuple[str, ...]:
    from memcore.prompts import parse_prompts

    # read_text translates \r\n and \r like open(newline=None); utf-8-sig drops a BOM, as for files
    return tuple(parse_prompts(_data(file).read_text(encoding="utf-8-sig"), file))


@functools.cache
def _registry() -> dict[str, PromptSet]:
    sets = {s.name: s for s in _LISTS}
    spec = json.loads(_data("subsets.json").read_text(encoding="utf-8"))
    base = sets[spec["of"]]
    for name, rows in spec["sets"].items():
        sets[name] = PromptSet(
            name, len(rows), _FAMILIES[name.rsplit("_", 1)[0]],
            f"{CONCEPT_PRUNE} (which rows of {base.name}, in which order)",
            f"as {base.name}: {base.licence}", f"Chavhan et al., arXiv 2024; and {base.name}'s",
            base.file, tuple(rows),
        )
    return sets


def builtin_sets() -> list[PromptSet]:
    return list(_registry().values())


def names() -> list[str]:
    return list(_registry())


def get(name: str) -> PromptSet | None:
    return _registry().get(name)


LABEL_COLUMN = "type"
"""The column of a built-in CSV that labels each prompt: ``VM`` (verbatim memorization) or ``TM``
(template memorization) in ``sdv1_500_labeled_vm_tm.csv`` (Webster 2023)."""


@functools.cache
def _file_column(file: str, column: str) -> tuple[str, ...] | None:
    """Column ``column`` of built-in CSV ``file``, one stripped entry per prompt (rows as
    ``load_prompts`` reads them: blank lines and empty captions skipped); None without that column."""
    if not file.endswith(".csv"):
        return None
    text = _data(file).read_text(encoding="utf-8-sig")
    rows = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=";", strict=True) if any(c.strip() for c in row)]
    header = [c.strip() for c in rows[0]]
    if column not in header:
        return None
    caption, at = header.index("Caption"), header.index(column)
    return tuple(row[at].strip() for row in rows[1:] if row[caption].strip())


def labels(name: str) -> list[str] | None:
    """The VM/TM label of each prompt of built-in set ``name``, in the set's order (a numbered
    subset of ``sdv1-500`` takes the labels of its rows); None for a set without labels.

    Raises:
        MemcoreError: ``name`` is not a built-in set.
    """
    found = get(name)
    if found is None:
        raise MemcoreError(f"{name}: not a built-in prompt set ('memcore data' lists them)")
    column = _file_column(found.file, LABEL_COLUMN)
    if column is None:
        return None
    rows = range(len(column)) if found.indices is None else found.indices
    if len(rows) != found.rows or max(rows) >= len(column):  # the file and the registry disagree: a bug
        raise RuntimeError(f"{name}: {len(column)} labels in {found.file} for {found.rows} prompts")
    return [column[r] for r in rows]


def groups() -> list[tuple[str, list[PromptSet]]]:
    """The sets in order, each numbered family as one group labelled like ``memorize_0..59``."""
    runs: list[list[PromptSet]] = []
    for s in builtin_sets():
        if s.family is not None and runs and runs[-1][-1].family == s.family:
            runs[-1].append(s)
        else:
            runs.append([s])
    return [(_label(run), run) for run in runs]


def _label(run: list[PromptSet]) -> str:
    return run[0].name if len(run) == 1 else f"{run[0].name}..{run[-1].name.rsplit('_', 1)[1]}"


_RANGE = re.compile(r"(?P<stem>.+_)(?P<first>\d+)\.\.(?P<last>\d+)")


def expand_range(text: str) -> list[str] | None:
    """``memorize_0..9`` -> ``[memorize_0, ..., memorize_9]``; None when ``text`` is not of that form.

    Works for every numbered family. A range that is empty or leaves the family is a MemcoreError.
    """
    match = _RANGE.fullmatch(text)
    if match is None:
        return None
    stem, first, last = match["stem"], int(match["first"]), int(match["last"])
    numbers = sorted(int(n[len(stem):]) for n in _registry() if n.startswith(stem) and n[len(stem):].isdigit())
    if not numbers:
        raise MemcoreError(f"{text}: no built-in prompt sets named {stem}N ('memcore data' lists them)")
    if first > last:
        raise MemcoreError(f"{text}: empty range ({first} is after {last})")
    if first < numbers[0] or last > numbers[-1]:
        raise MemcoreError(f"{text}: the built-in sets {stem}N go from {stem}{numbers[0]} to {stem}{numbers[-1]}")
    return [f"{stem}{i}" for i in range(first, last + 1)]
