"""Read prompt lists (.txt, .jsonl, .csv) into a list of strings.

Prompts are stripped, kept in file order and kept verbatim otherwise (HTML, unicode, inner runs of
spaces, long text). Duplicates are kept, with one warning on the ``memcore`` logger. Every mistake in
the input is raised as a one-line :class:`~memcore.errors.MemcoreError` naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

from memcore.errors import MemcoreError

__all__ = ["load_prompts", "load_subsets"]

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


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Return the prompts of a ``.txt``, ``.jsonl`` or ``.csv`` file, stripped, in file order.

    Raises :class:`MemcoreError` for a missing, unreadable or malformed file, or one with no prompts.
    """
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise MemcoreError(f"{name}: no such file")
    if p.is_dir():
        raise MemcoreError(f"{name}: is a directory, not a prompt file")
    reader = _READERS.get(p.suffix.lower())
    if reader is None:
        raise MemcoreError(
            f"{name}: unknown prompt file extension {p.suffix!r} (supported: {', '.join(_READERS)})"
        )
    prompts = reader(_read_text(p, name), name)
    if not prompts:
        raise MemcoreError(f"{name}: no prompts found")
    duplicates = len(prompts) - len(set(prompts))
    if duplicates:
        log.warning("%s: %d duplicate prompt%s kept", name, duplicates, "" if duplicates == 1 else "s")
    return prompts


def load_subsets(paths: list[str | os.PathLike]) -> dict[str, list[str]]:
    """Prompt subsets by name (the file stem), from prompt files or from one folder of them.

    A folder contributes every ``.txt``, ``.jsonl`` and ``.csv`` file directly inside it, in natural
    order (``memorize_2`` before ``memorize_10``). Two files with the same stem are refused.
    """
    from memcore.io import files_in

    files = files_in(paths, tuple(_READERS), "prompt files")
    subsets: dict[str, list[str]] = {}
    origin: dict[str, Path] = {}
    for file in files:
        if file.stem in subsets:
            raise MemcoreError(f"{file}: subset name {file.stem!r} is also the name of {origin[file.stem]}; rename one")
        subsets[file.stem] = load_prompts(file)
        origin[file.stem] = file
    return subsets
