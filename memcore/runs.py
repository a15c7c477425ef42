"""Runs that many processes share and that survive being stopped: ``torchrun`` and resumable folders.

**Processes.** Launched by ``torchrun`` (which sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``),
:func:`start_processes` joins the process group (NCCL for CUDA devices, gloo otherwise) and gives
each process ``cuda:LOCAL_RANK`` when the device asked for is ``cuda``. A command's work is a list
of *items* (a batch of prompts under one seed, always cut the same way); process ``rank`` of
``world`` takes items ``rank, rank + world, ...`` (:meth:`Ranks.mine`). An item is computed the
same way whichever process takes it, so 1 and N processes write the same images and numbers.
Process 0 alone checks and claims the outputs (:mod:`memcore.io`), prints, and writes what
gathers everyone's results. When one process fails, ``torchrun`` stops the others.

**Resumable folders.** A command writing the folder ``OUT`` works in ``OUT.partial`` beside it:
``run.json`` records the settings, and each finished item leaves a record in ``parts/``, written
after the item's files and atomically (temporary file, then rename). When every item is done,
process 0 writes the final files and renames ``OUT.partial`` to ``OUT``, so ``OUT`` appears only
whole. A run stopped by a signal or a crash leaves ``OUT.partial``; the same command run again
(with any number of processes) removes the temporaries a killed process left behind and skips the
items with a record. Different settings refuse to mix: the error names the first setting that
differs. Every process must see the same ``OUT.partial``: on several nodes, put ``OUT`` on a shared
file system.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from memcore.errors import MemcoreError

log = logging.getLogger(__name__)

T = TypeVar("T")
PARTIAL_SUFFIX = ".partial"
RUN_FILE = "run.json"
PARTS = "parts"
RUN_FORMAT = "memcore.run/1"


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of a run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is process 0, which checks outputs, prints and writes the gathered results."""
        return self.rank == 0

    def mine(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``world``-th one from position ``rank``."""
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for with one)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def __str__(self) -> str:
        return f"process {self.rank} of {self.world}"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise MemcoreError(f"the environment variable {name} is {value!r}, not an integer") from None


def launched_ranks() -> Ranks:
    """The ranks ``torchrun`` (or any ``env://`` launcher) gave this process, read from the
    environment without joining anything; ``Ranks()`` when not launched so."""
    world, rank, local = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
    if world is None or world <= 1:
        return Ranks()
    if rank is None or not 0 <= rank < world:
        raise MemcoreError(f"WORLD_SIZE is {world} but RANK is {os.environ.get('RANK')!r}; launch with torchrun")
    return Ranks(rank=rank, world=world, local_rank=local if local is not None else rank)


def is_follower() -> bool:
    """Whether this process is one of several and not process 0: it leaves outputs to process 0."""
    try:
        return not launched_ranks().main
    except MemcoreError:
        return False


def start_processes(device: str | None) -> tuple[Ranks, str | None]:
    """Join the process group ``torchrun`` set up, if any; returns this process's ranks and the
    device it must use (``cuda`` becomes ``cuda:LOCAL_RANK``; an explicit ``cuda:N`` is refused
    with several processes, which would all share it).
    """
    ranks = launched_ranks()
    if ranks.world == 1:
        return ranks, device
    import torch
    import torch.distributed as dist

    text = None if device is None else str(device)
    if text is None:
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if text != "cuda":
            raise MemcoreError(
                f"is {text}, one device for {ranks.world} processes; give --device cuda and each process takes "
                "cuda:LOCAL_RANK",
                param="device",
            )
        if not torch.cuda.is_available():
            raise MemcoreError("CUDA is not available on this machine", param="device", value=text)
        if ranks.local_rank >= torch.cuda.device_count():
            raise MemcoreError(
                f"LOCAL_RANK is {ranks.local_rank} but this node has {torch.cuda.device_count()} CUDA devices; "
                "give torchrun --nproc-per-node at most that many",
            )
        text = f"cuda:{ranks.local_rank}"
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if text.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return ranks, text


def stop_processes() -> None:
    """Leave the process group, if one was joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# resumable folders


def partial_path(out: str | os.PathLike) -> Path:
    """Where the run writing ``out`` keeps its work until it is complete."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def write_atomic(path: Path, write) -> None:
    """Call ``write(tmp)`` on a hidden temporary beside ``path``, then rename it over ``path``: a
    process killed meanwhile leaves the temporary (removed when the run resumes), never half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _first_difference(old, new, where: str = "") -> tuple[str, object, object] | None:
    """The first key (dotted) whose values differ between two JSON values, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    return None if old == new else (where or "settings", old, new)


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


class Run:
    """A resumable output folder (see the module docstring).

    Used as a context manager by every process of the run::

        with Run(out, kind="generate", settings=settings, ranks=ranks) as run:
            for item in ranks.mine(items):
                if not run.done(item.key):
                    ...                                   # write the item's files into run.folder
                    run.record(item.key, rows, arrays)    # then its record
            run.gather()                                  # every process waits for all items
            if ranks.main:
                parts = run.load_all(keys)                # process 0 writes the final files
                ...
        # OUT now exists (process 0 renamed it when the block ended without error)

    ``settings`` must be JSON: a run resumes only an ``OUT.partial`` whose settings are equal.
    """

    def __init__(self, out: str | os.PathLike, *, kind: str, settings: dict, ranks: Ranks | None = None):
        self.out = Path(out)
        self.folder = partial_path(out)
        self.kind = kind
        self.settings = json.loads(json.dumps(settings, allow_nan=False))  # as it reads back
        self.ranks = ranks or Ranks()
        self.created = False
        self.resumed = 0  # items found done when the run started
        self.recorded = 0  # items recorded by this process in this attempt

    # -- set up -------------------------------------------------------------------------------

    def __enter__(self) -> Run:
        if self.ranks.main:
            self._open()
        self.ranks.barrier()
        if not self.ranks.main:
            self._check_settings(self._read_run_file())
        (self.folder / PARTS).mkdir(exist_ok=True)
        self.resumed = len(self.finished())
        return self

    def _open(self) -> None:
        if os.path.lexists(self.out):
            raise MemcoreError("already exists; choose a new folder", param="out", value=str(self.out))
        if os.path.lexists(self.folder):
            if not self.folder.is_dir() or not (self.folder / RUN_FILE).is_file():
                raise MemcoreError(
                    f"{self.folder} exists and is not an unfinished memcore run; remove it or choose another --out"
                )
            self._check_settings(self._read_run_file())
            self._remove_temporaries()
            return
        self.folder.mkdir()
        self.created = True
        (self.folder / PARTS).mkdir()
        record = {"format": RUN_FORMAT, "kind": self.kind, "settings": self.settings}
        write_atomic(
            self.folder / RUN_FILE,
            lambda p: p.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"),
        )

    def _remove_temporaries(self) -> None:
        """Remove the temporaries (``.NAME.XXXXXXXX.tmp``) that a process killed mid-write (SIGKILL, a
        lost node) left in the folder, so that they do not end up in ``OUT``; the items they belonged
        to have no record and are redone."""
        for path in sorted(self.folder.rglob(".*.tmp"), reverse=True):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _read_run_file(self) -> dict:
        path = self.folder / RUN_FILE
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MemcoreError(f"{path}: cannot read it ({exc}); remove {self.folder} to start again") from None
        if not isinstance(record, dict) or record.get("format") != RUN_FORMAT or not isinstance(record.get("settings"), dict):
            raise MemcoreError(f"{path}: not a memcore run record; remove {self.folder} to start again")
        return record

    def _check_settings(self, record: dict) -> None:
        if record.get("kind") != self.kind:
            raise MemcoreError(
                f"{self.folder} holds an unfinished 'memcore {record.get('kind')}' run, not a '{self.kind}' one; "
                "remove it or choose another --out"
            )
        diff = _first_difference(record["settings"], self.settings)
        if diff is not None:
            key, old, new = diff
            raise MemcoreError(
                f"{self.folder} holds an unfinished run with other settings ({key} was {_shown(old)}, is now "
                f"{_shown(new)}); rerun with the same arguments to resume it, or remove it to start again"
            )

    # -- items --------------------------------------------------------------------------------

    def _part(self, key: str) -> Path:
        return self.folder / PARTS / f"{key}.json"

    def finished(self) -> set[str]:
        """Keys of the items with a record."""
        return {p.stem for p in (self.folder / PARTS).glob("*.json")}

    def done(self, key: str) -> bool:
        return self._part(key).is_file()

    def record(self, key: str, rows: list[dict], arrays: dict[str, np.ndarray] | None = None) -> None:
        """Mark item ``key`` done, keeping its result rows (JSON) and arrays; call it after the item's
        files are written."""
        if arrays:
            def write(path: Path) -> None:
                with open(path, "wb") as f:
                    np.savez(f, **arrays)

            write_atomic(self.folder / PARTS / f"{key}.npz", write)
        text = json.dumps({"rows": rows, "arrays": sorted(arrays or {})}, allow_nan=False, ensure_ascii=False)
        write_atomic(self._part(key), lambda p: p.write_text(text, encoding="utf-8"))
        self.recorded += 1

    def load(self, key: str) -> tuple[list[dict], dict[str, np.ndarray]]:
        """The rows and arrays recorded for item ``key``."""
        path = self._part(key)
        try:
            part = json.loads(path.read_text(encoding="utf-8"))
            arrays = {}
            if part["arrays"]:
                with np.load(self.folder / PARTS / f"{key}.npz") as data:
                    arrays = {name: data[name] for name in part["arrays"]}
        except (OSError, ValueError, KeyError) as exc:
            raise MemcoreError(f"{path}: cannot read this record ({exc}); remove it and rerun to redo the item") from None
        return part["rows"], arrays

    def load_all(self, keys: Sequence[str]) -> list[tuple[list[dict], dict[str, np.ndarray]]]:
        """Every item's record, in the order of ``keys`` (all must be done)."""
        missing = [key for key in keys if not self.done(key)]
        if missing:
            raise MemcoreError(f"{self.folder}: {len(missing)} items have no record (first: {missing[0]})")
        return [self.load(key) for key in keys]

    def gather(self) -> None:
        """Wait until every process has recorded its items."""
        self.ranks.barrier()

    # -- finish -------------------------------------------------------------------------------

    def __exit__(self, kind, exc, tb) -> bool:
        from memcore.io import deferred_signals

        if exc is None:
            self.ranks.barrier()
            if self.ranks.main:
                with deferred_signals():
                    if os.path.lexists(self.out):
                        raise MemcoreError(
                            f"{self.out}: was created by something else while memcore wrote it; the results are in "
                            f"{self.folder}"
                        )
                    os.rename(self.folder, self.out)
                    shutil.rmtree(self.out / PARTS, ignore_errors=True)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.out / RUN_FILE)
            return False
        if self.ranks.main and self.created and self.recorded == 0 and not self.finished():
            with deferred_signals():  # nothing was done: leave nothing behind
                shutil.rmtree(self.folder, ignore_errors=True)
        elif self.ranks.main and os.path.isdir(self.folder):
            log.warning(
                "%d items done are kept in %s; run the same command again to resume", len(self.finished()), self.folder
            )
        return False


@contextlib.contextmanager
def processes(device: str | None) -> Iterator[tuple[Ranks, str | None]]:
    """:func:`start_processes` for the block, then :func:`stop_processes`."""
    ranks, device = start_processes(device)
    try:
        yield ranks, device
    finally:
        if ranks.world > 1:
            stop_processes()
