"""Read prompt lists (.txt, .jsonl, .csv files, or built-in sets by name) into a list of strings.

Prompts are stripped, kept in file order and kept verbatim otherwise (HTML, unicode, inner runs of
spaces, long text). Duplicates are kept, with one warning on the ``memcore`` logger. Every mistake in
the input is raised as a one-line :class:`~memcore.errors.MemcoreError` naming the file or name, and
the line where there is one. An existing path is always read as a file; any other argument is looked
up among the built-in sets of :mod:`memcore.datasets` (``memcore data`` lists them).

A prompt file is read by :func:`read_prompt_file` alone: a regular file (symbolic links followed) of
at most :data:`MAX_PROMPT_FILE_BYTES`, in UTF-8 (a leading byte-order mark is dropped) or in UTF-16
or UTF-32 with a byte-order mark, without NUL characters.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import logging
import os
import re
import stat
from pathlib import Path

from memcore.errors import MemcoreError

__all__ = ["MAX_PROMPT_FILE_BYTES", "BuiltinPrompts", "load_prompts", "load_subsets", "parse_prompts", "read_prompt_file"]

log = logging.getLogger("memcore")

_CSV_COLUMNS = ("Caption", "caption", "prompt")
_JSON_FIELDS = ("caption", "prompt")

# 64 MiB: about half a million prompts of a hundred characters, each of which costs at least one
# run of the denoiser, so far more than a run can use; the file is read whole into memory.
MAX_PROMPT_FILE_BYTES = 64 * 2**20

# The byte-order marks that name an encoding, longest first: the UTF-32 LE mark starts with the UTF-16 LE one.
# A mark makes the encoding certain, so such files are decoded (Windows editors and PowerShell 5's
# ">" write UTF-16 with a mark); without one, UTF-16 cannot be told from other bytes and is refused.
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32-LE"),
    (codecs.BOM_UTF32_BE, "UTF-32-BE"),
    (codecs.BOM_UTF8, "UTF-8"),
    (codecs.BOM_UTF16_LE, "UTF-16-LE"),
    (codecs.BOM_UTF16_BE, "UTF-16-BE"),
)
_NEWLINES = re.compile(r"\r\n?")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SAVE_AS_UTF8 = "save it as UTF-8"


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), "not a file")


def _not_regular(path: Path, name: str, mode: int) -> MemcoreError:
    what = _kind(mode)
    if path.is_symlink():
        what = f"a link to {os.path.realpath(path)}, {what}"
    return MemcoreError(f"{name}: is not a regular file ({what})")


def _too_large(name: str, size: int) -> MemcoreError:
    return MemcoreError(
        f"{name}: is {size / 2**20:.1f} MiB, over the {MAX_PROMPT_FILE_BYTES // 2**20} MiB limit for a prompt file"
    )


def _open_nonblocking(path: str, flags: int) -> int:
    # A FIFO swapped in after the check must not block the open; O_NONBLOCK changes nothing for a regular file.
    return os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))


def read_prompt_file(path: str | os.PathLike, name: str | None = None) -> str:
    """The text of the prompt file ``path``, with ``\\r\\n`` and ``\\r`` turned into ``\\n``.

    Refuses, naming ``name`` (default: the path) and the line where there is one: anything but a
    regular file once symbolic links are followed (a FIFO, a device such as /dev/zero, a socket, a
    directory); a file over :data:`MAX_PROMPT_FILE_BYTES`; NUL characters (UTF-16 without a
    byte-order mark, or a binary file); text that is not UTF-8, or not the UTF-16 or UTF-32 its
    byte-order mark names. Nothing is read from a file that is not regular.
    """
    path = Path(path)
    name = str(path) if name is None else name
    try:
        info = os.stat(path)  # before opening: opening a FIFO blocks, and a device can be endless
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, name, info.st_mode)
        if info.st_size > MAX_PROMPT_FILE_BYTES:
            raise _too_large(name, info.st_size)
        with open(path, "rb", opener=_open_nonblocking) as f:
            info = os.fstat(f.fileno())  # the file opened, should the path have changed since
            if not stat.S_ISREG(info.st_mode):
                raise _not_regular(path, name, info.st_mode)
            data = f.read(MAX_PROMPT_FILE_BYTES + 1)
    except OSError as e:
        raise MemcoreError(f"{name}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:  # it grew while read
        raise _too_large(name, len(data))
    return _decode(data, name)


def _line_after(prefix: str) -> int:
    """The number (from 1) of the line that ``prefix`` ends in; \\r\\n, \\r and \\n end a line each."""
    return _NEWLINES.sub("\n", prefix).count("\n") + 1


def _nul_error(name: str, line: int) -> MemcoreError:
    return MemcoreError(
        f"{name}: line {line} contains NUL bytes: UTF-16 without a byte-order mark, or a binary file? {_SAVE_AS_UTF8}"
    )


def _decode(data: bytes, name: str) -> str:
    encoding, bom = next(((enc, bom) for bom, enc in _BOMS if data.startswith(bom)), ("UTF-8", b""))
    body = data[len(bom) :]
    if encoding == "UTF-8" and (nul := body.find(b"\0")) >= 0:
        # before decoding: UTF-16 without a mark is often valid UTF-8 full of NULs, or fails later on
        raise _nul_error(name, _line_after(body[:nul].decode("latin-1")))
    try:
        text = body.decode(encoding)
    except UnicodeDecodeError as e:
        line = _line_after(body[: e.start].decode(encoding, errors="replace"))
        named = "" if encoding == "UTF-8" else ", the encoding its byte-order mark names"
        raise MemcoreError(
            f"{name}: line {line} is not valid {encoding}{named} (byte {e.start + len(bom)}); {_SAVE_AS_UTF8}"
        ) from None
    if (nul := text.find("\0")) >= 0:
        raise _nul_error(name, _line_after(text[:nul]))
    return _NEWLINES.sub("\n", text)


def _check_prompt(value: str, name: str, line: int) -> str:
    """``value`` stripped, once it holds only characters a tokenizer can encode."""
    if (bad := _SURROGATE.search(value)) is not None:
        raise MemcoreError(
            f"{name}:{line}: lone surrogate \\u{ord(bad.group()):04x} in a prompt (half of a UTF-16 pair, "
            "from a JSON escape?); write the character itself"
        )
    if "\0" in value:
        raise MemcoreError(f"{name}:{line}: a prompt contains a NUL character (\\u0000)")
    return value.strip()


def _from_txt(text: str, name: str) -> list[str]:
    # split("\n") rather than splitlines(): keep \u2028, \x0c ... inside a prompt.
    lines = enumerate(text.split("\n"), start=1)
    return [s for lineno, line in lines if (s := _check_prompt(line, name, lineno))]


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
        if prompt := _check_prompt(value, name, lineno):
            prompts.append(prompt)
    return prompts


def _unclosed_quote(text: str, first_line: int, delimiter: str) -> int | None:
    """The line where a quoted field of the CSV row starting on ``first_line`` opens and never closes.

    The quoting of Python's csv module with its defaults (``"`` opens a field only at its start,
    ``""`` inside one is a quote); ``None`` when every quoted field of the row closes.
    """
    row = "\n".join(text.split("\n")[first_line - 1 :])
    line, i, field_start = first_line, 0, True
    while i < len(row):
        char = row[i]
        if field_start and char == '"':
            opened, i = line, i + 1
            while True:
                end = row.find('"', i)
                if end < 0:
                    return opened
                line += row.count("\n", i, end)
                i = end + 1
                if not row.startswith('"', i):
                    break
                i += 1  # a doubled quote inside the field
            field_start = False
            continue
        if char == "\n":
            return None  # the row ends here
        field_start = char == delimiter
        i += 1
    return None


def _csv_rows(text: str, name: str, delimiter: str):
    """(line where the row starts, row) for every row of strict CSV, errors naming file and line."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    while True:
        first_line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            opened = _unclosed_quote(text, first_line, delimiter)
            if opened is not None:
                raise MemcoreError(f"{name}:{opened}: a quoted field opened on line {opened} is never closed") from None
            raise MemcoreError(f"{name}:{reader.line_num}: bad CSV ({e})") from None
        yield first_line, row, reader.line_num


def _from_csv(text: str, name: str) -> list[str]:
    header_line = next((line for line in text.split("\n") if line.strip()), "")
    delimiter = ";" if header_line.count(";") > header_line.count(",") else ","
    rows = _csv_rows(text, name, delimiter)
    header = next((row for _, row, _ in rows if any(c.strip() for c in row)), None)
    if header is None:
        return []
    found = [c.strip() for c in header]
    col = next((found.index(c) for c in _CSV_COLUMNS if c in found), None)
    if col is None:
        raise MemcoreError(
            f"{name}: no 'Caption', 'caption' or 'prompt' column (columns: {', '.join(map(repr, found))})"
        )
    prompts = []
    for first_line, row, last_line in rows:
        if not any(c.strip() for c in row):  # a blank line
            continue
        if len(row) <= col:
            raise MemcoreError(
                f"{name}:{last_line}: row has {len(row)} fields, column {found[col]!r} is field {col + 1}"
            )
        if prompt := _check_prompt(row[col], name, first_line):
            prompts.append(prompt)
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
        prompts = reader(read_prompt_file(p, name), name)
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
