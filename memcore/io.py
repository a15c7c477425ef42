"""Atomic outputs: a crash or an error never leaves a half-written file or folder behind."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from memcore.errors import MemcoreError


def natural_key(path: Path) -> list:
    """Sort key putting ``memorize_2`` before ``memorize_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def files_in(paths: list[str | os.PathLike], suffixes: tuple[str, ...], what: str) -> list[Path]:
    """``paths`` with every folder among them replaced by its files of ``suffixes``, in natural order."""
    files: list[Path] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            found = sorted((f for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes), key=natural_key)
            if not found:
                raise MemcoreError(f"{path}: no {what} ({', '.join(suffixes)}) in this folder")
            files.extend(found)
        else:
            files.append(p)
    return files


def check_output_file(path: str | os.PathLike, param: str) -> Path:
    """Fail early (before any long work) when ``path``, the value of ``param``, cannot be written as a file."""
    out = Path(path)
    if out.is_dir():
        raise MemcoreError("is a directory", param=param, value=out)
    if not out.parent.is_dir():
        raise MemcoreError("folder {folder} does not exist", param=param, value=out, folder=out.parent)
    return out


def check_output_dir(path: str | os.PathLike, param: str) -> Path:
    """Fail early when ``path``, the value of ``param``, cannot be created as a new folder."""
    out = Path(path)
    if out.exists():
        raise MemcoreError("already exists; choose a new folder", param=param, value=out)
    if not out.parent.is_dir():
        raise MemcoreError("folder {folder} does not exist", param=param, value=out, folder=out.parent)
    return out


def _default_mode(base: int) -> int:
    """``base`` less the process umask: the mode a plain open() or mkdir() would have given."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode(0o666))  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _default_mode(0o777))  # mkdtemp makes it private
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
