"""Read prompt lists (.txt, .jsonl, .csv files, or built-in sets by name) into a list of strings.

Prompts are stripped, kept in file order and kept verbatim otherwise (HTML, unicode, inner runs of
spaces, long text). Duplicates are kept, with one warning on the ``memcore`` logger. Every mistake in
the input is raised as a one-line :class:`~memcore.errors.MemcoreError` naming the file or name.
An existing path is always read as a file; any other argument is looked up among the built-in sets
of :mod:`memcore.datasets` (``memcore data`` lists them).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import os
from pathlib import Path

from memcore.errors import MemcoreError

__all__ = ["BuiltinPrompts", "load_prompts", "load_subsets", "parse_prompts"]

log = logging.getLogger("memcore")

_CSV_COLUMNS = ("Caption", "caption", "prompt")
_JSON_FIELDS = ("caption", "prompt")


def _read_text(path: Path, name: str) -> str:
    try:
        # newline=None: \r\n and \r become \n; utf-8-sig drops a leading BOM.
        with open(path, encoding="utf-8-sig", newline=None) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise MemcoreError(f"{name}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise MemcoreError(f"{name}: cannot read ({e.strerror or e})") from None


def _from_txt(text: str, name: str) -> list[str]:
    # split("\n") rather than splitlines(): keep \u2028, \x0c ... inside a prompt.
    return [s for line in text.split("\n") if (s := line.strip())]


def _from_jsonl(text: str, name: str) -> list[str]:
    prompts = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MemcoreError(f"{name}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise MemcoreError(f"{name}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        field = next((k for k in _JSON_FIELDS if k in obj), None)
        if field is None:
            raise MemcoreError(f"{name}:{lineno}: no 'caption' or 'prompt' field")
        value = obj[field]
        if not isinstance(value, str):
            raise MemcoreError(f"{name}:{lineno}: '{field}' is {type(value).__name__}, not a string")
        if value.strip():
            prompts.append(value.strip())
    return prompts


def _from_csv(text: str, name: str) -> list[str]:
    header_line = next((line for line in text.split("\n") if line.strip()), "")
    delimiter = ";" if header_line.count(";") > header_line.count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next((row for row in reader if any(c.strip() for c in row)), None)
        if header is None:
            return []
        found = [c.strip() for c in header]
        col = next((found.index(c) for c in _CSV_COLUMNS if c in found), None)
        if col is None:
            raise MemcoreError(
                f"{name}: no 'Caption', 'caption' or 'prompt' column (columns: {', '.join(map(repr, found))})"
            )
        prompts = []
        for row in reader:
            if not any(c.strip() for c in row):  # a blank line
                continue
            if len(row) <= col:
                raise MemcoreError(
                    f"{name}:{reader.line_num}: row has {len(row)} fields, "
                    f"column {found[col]!r} is field {col + 1}"
                )
            if s := row[col].strip():
                prompts.append(s)
    except csv.Error as e:
        raise MemcoreError(f"{name}:{reader.line_num}: bad CSV ({e})") from None
    return prompts


_READERS = {".txt": _from_txt, ".jsonl": _from_jsonl, ".csv": _from_csv}


class BuiltinPrompts(list):
    """The prompts of a built-in set: a plain list of strings that also knows the set's name.

    Statistics and masks computed from it record the name (``prompt_set``) beside the sha256 of the
    prompts, which is the same whether the list came from a name or from a file.
    """

    def __init__(self, prompts: list[str], set_name: str):
        super().__init__(prompts)
        self.set_name = set_name


def _reader(name: str):
    suffix = Path(name).suffix
    reader = _READERS.get(suffix.lower())
    if reader is None:
        raise MemcoreError(f"{name}: unknown prompt file extension {suffix!r} (supported: {', '.join(_READERS)})")
    return reader


def parse_prompts(text: str, name: str) -> list[str]:
    """The prompts of ``text``, read as the file ``name`` would be (by its extension)."""
    return _reader(name)(text, name)


def _not_found(name: str) -> MemcoreError:
    from memcore import datasets

    close = difflib.get_close_matches(name, datasets.names(), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return MemcoreError(f"{name}: no such file, and no built-in prompt set of that name ('memcore data' lists them){hint}")


def load_prompts(source: str | os.PathLike) -> list[str]:
    """Return the prompts of a ``.txt``, ``.jsonl`` or ``.csv`` file, or of a built-in set, stripped, in order.

    ``source`` is read as a file when that path exists, else as the name of a built-in set such as
    ``sdv1-500`` or ``memorize_0`` (returned as :class:`BuiltinPrompts`). Raises :class:`MemcoreError`
    for a missing, unreadable or malformed file, an unknown name, or a file with no prompts.
    """
    p = Path(source)
    name = str(source)
    if p.is_dir():
        raise MemcoreError(f"{name}: is a directory, not a prompt file")
    if p.exists():
        reader = _reader(name)
        prompts = reader(_read_text(p, name), name)
    else:
        from memcore import datasets

        found = datasets.get(name)
        if found is None:
            raise _not_found(name)
        prompts = BuiltinPrompts(found.prompts(), found.name)
    if not prompts:
        raise MemcoreError(f"{name}: no prompts found")
    duplicates = len(prompts) - len(set(prompts))
    if duplicates:
        log.warning("%s: %d duplicate prompt%s kept", name, duplicates, "" if duplicates == 1 else "s")
    return prompts


def load_subsets(sources: list[str | os.PathLike]) -> dict[str, list[str]]:
    """Prompt subsets by name, from prompt files, folders of them, built-in sets and ranges of these.

    A file is named after its stem, a built-in set after itself. A folder contributes every ``.txt``,
    ``.jsonl`` and ``.csv`` file directly inside it, in natural order (``memorize_2`` before
    ``memorize_10``). A range ``memorize_0..9`` stands for the built-in sets memorize_0 ... memorize_9
    (any numbered family: ``memorize_sd2_0..9``, ``mv_prompts_0..4``). Two subsets of one name are refused.
    """
    from memcore import datasets
    from memcore.io import files_in

    subsets: dict[str, list[str]] = {}
    origin: dict[str, str] = {}
    for source in sources:
        if Path(source).exists():
            items = [(f.stem, f) for f in files_in([source], tuple(_READERS), "prompt files")]
        else:
            items = [(n, n) for n in datasets.expand_range(str(source)) or [str(source)]]
        for name, item in items:
            if name in subsets:
                raise MemcoreError(f"{item}: subset name {name!r} is also the name of {origin[name]}; rename one")
            subsets[name] = load_prompts(item)
            origin[name] = str(item)
    return subsets
