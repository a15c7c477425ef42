"""Outputs: checked before any work, claimed against other writers, written atomically.

Every output goes through three steps, so that a run either writes all of it or leaves nothing:

1. **Check** (:func:`check_output_file`, :func:`check_output_dir`, :func:`check_output_folder`,
   then :func:`check_distinct`), before any long work: the folder exists, the name fits the file
   system (``os.pathconf`` ``PC_NAME_MAX``), the temporary sibling the write will use can really be
   created there (created and removed: ``os.access`` cannot tell, e.g. for root on a read-only file
   system), and no output is an input or another output of the same run. A symbolic link is
   followed, as ``open()`` would: a link to a file writes its target; a dangling link is followed
   when its target's folder exists and refused otherwise.
2. **Claim**: an exclusive ``fcntl.flock`` on ``.NAME.lock`` beside the output (inside the folder
   as ``.memcore.lock`` for :func:`atomic_folder` on an existing folder) holding the claimer's pid, so that a second run
   writing the same output fails at once with one line instead of after its work. A check made
   inside :func:`claimed_outputs` keeps the claim until that block ends; outside it, the check only
   tries the lock. :func:`atomic_file`, :func:`atomic_dir` and :func:`atomic_folder` reuse a claim
   this process holds, else claim the output for their own duration. The lock file is removed by
   whoever holds the lock, and a claimer checks after locking that the path still names the file it
   locked (else it tries again), so removing never races another claimer.
3. **Write** into a hidden temporary beside the output (``.NAME.XXXXXXXX.tmp``, ``NAME`` shortened
   when needed to fit the name limit), renamed over the output only when the block succeeds, removed
   otherwise. The rename and the removal run with SIGINT, SIGTERM and SIGHUP deferred
   (:func:`deferred_signals`): a signal then cannot cut the cleanup short.

:func:`signals_as_exceptions` turns SIGINT, SIGTERM and SIGHUP into :class:`Interrupted` (a
``KeyboardInterrupt``), so that every ``finally`` runs; the command line uses it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from memcore.errors import MemcoreError, Param

try:
    import fcntl
except ImportError:  # not POSIX: outputs are checked and written atomically, but not claimed
    fcntl = None

DEFAULT_NAME_MAX = 255
TEMP_SUFFIX, LOCK_SUFFIX, RANDOM_CHARS = ".tmp", ".lock", 8  # tempfile adds 8 random characters
STAGE = "memcore"  # an existing folder updated in place is claimed as .memcore.lock, staged in .memcore.*.tmp
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


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


# ---------------------------------------------------------------------------------------------
# signals


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived (under :func:`signals_as_exceptions`); ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self):
        return type(self), (self.signum,)


class _SignalState:
    installed = False  # signals_as_exceptions is active
    depth = 0  # deferred sections open
    pending: int | None = None  # a signal that arrived in a deferred section
    quiet = False  # an Interrupted was raised (cleanup runs), or the command is over: ignore signals


_signals = _SignalState()


def _on_signal(signum: int, frame) -> None:
    if _signals.quiet:
        return
    if _signals.depth:
        _signals.pending = _signals.pending or signum
        return
    _signals.quiet = True
    raise Interrupted(signum)


class deferred_signals:  # noqa: N801 (used like a function: ``with deferred_signals():``)
    """Hold SIGINT, SIGTERM and SIGHUP back during a block (cleanup, a rename).

    The signals are blocked for this thread (``signal.pthread_sigmask``), and under
    :func:`signals_as_exceptions` one that arrives anyway (delivered to another thread) is kept and
    raised as :class:`Interrupted` when the outermost deferred block ends.
    """

    def __enter__(self) -> None:
        blockable = SIGNALS and hasattr(signal, "pthread_sigmask")
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS) if blockable else None
        _signals.depth += 1

    def __exit__(self, *exc) -> bool:
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)  # a blocked signal arrives now: kept
        _signals.depth -= 1
        if not _signals.depth and _signals.pending is not None:
            signum, _signals.pending = _signals.pending, None
            if _signals.installed and not _signals.quiet:
                _signals.quiet = True
                raise Interrupted(signum)
        return False


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Raise :class:`Interrupted` in the main thread on SIGINT, SIGTERM or SIGHUP, so that every
    ``finally`` runs; once one is raised, later signals are ignored until the block ends (a second
    Ctrl-C does not cut the cleanup short). The previous handlers are restored at the end. Outside
    the main thread (where Python cannot set handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread() or _signals.installed:
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _signals.installed, _signals.quiet, _signals.pending = True, False, None
    try:
        for signum in SIGNALS:
            signal.signal(signum, _on_signal)
        yield
    finally:
        _signals.quiet = True
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        _signals.installed, _signals.quiet, _signals.pending = False, False, None


def ignore_signals() -> None:
    """Under :func:`signals_as_exceptions`, ignore further signals (the work is over; only reporting is left)."""
    _signals.quiet = True


# ---------------------------------------------------------------------------------------------
# names


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name (bytes) the file system of ``folder`` allows."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX


def _nbytes(name: str) -> int:
    return len(os.fsencode(name))


def _shortened(name: str, room: int) -> str:
    """``name`` cut to at most ``room`` bytes (whole characters)."""
    while _nbytes(name) > room:
        name = name[:-1]
    return name


def temp_affixes(path: Path) -> tuple[str, str]:
    """(prefix, suffix) of the temporary sibling of ``path``: ``.NAME.`` and ``.tmp`` around 8 random
    characters, ``NAME`` shortened so that the whole fits the file system's name limit."""
    room = name_max(path.parent) - 2 - RANDOM_CHARS - len(TEMP_SUFFIX)
    return f".{_shortened(path.name, room)}.", TEMP_SUFFIX


def lock_path(path: Path) -> Path:
    """``.NAME.lock`` beside ``path``; a name too long for that is cut and followed by a hash of it."""
    limit = name_max(path.parent)
    name = f".{path.name}{LOCK_SUFFIX}"
    if _nbytes(name) > limit:
        digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:8]
        name = f".{_shortened(path.name, limit - 2 - len(digest) - len(LOCK_SUFFIX))}.{digest}{LOCK_SUFFIX}"
    return path.parent / name


# ---------------------------------------------------------------------------------------------
# resolving an output


def _shown(path) -> object:
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else path


def _error(message: str, param: str | None, path, **fields) -> MemcoreError:
    """An error about output ``path``: ``param PATH: message`` (``PATH: message`` without a param)."""
    if param is None:
        return MemcoreError("{path}: " + message, path=_shown(path), **fields)
    return MemcoreError(message, param=param, value=_shown(path), **fields)


def _check_name(path: Path, param: str | None, shown) -> None:
    limit = name_max(path.parent)
    if _nbytes(path.name) > limit:
        raise _error(
            "the name {name}... is {size} bytes long; this file system allows {limit}",
            param, shown, name=path.name[:24], size=_nbytes(path.name), limit=limit,
        )


def resolve_output(path: str | os.PathLike, param: str | None = None) -> Path:
    """Where writing ``path`` really writes: the absolute path with every symbolic link followed.

    Refused with one line: a folder that does not exist or is not a folder, a name longer than the
    file system allows, a dangling link whose target's folder does not exist, a link loop.
    """
    given = Path(path)
    parent = given.parent
    if not os.path.isdir(parent):
        if os.path.exists(parent):
            raise _error("{folder} is not a folder", param, path, folder=parent)
        raise _error("folder {folder} does not exist", param, path, folder=parent)
    _check_name(given, param, path)
    real = Path(os.path.realpath(given))
    if os.path.islink(real):
        raise _error("symbolic link loop", param, path)
    if os.path.islink(given) and not os.path.exists(real):
        if not os.path.isdir(real.parent):
            raise _error(
                "is a dangling symbolic link to {target}, whose folder does not exist", param, path, target=real
            )
        _check_name(real, param, path)
    return real


# ---------------------------------------------------------------------------------------------
# claims


@dataclass
class _Claim:
    fd: int
    holders: int = 1


_claims: dict[Path, _Claim] = {}  # by lock path
_claims_lock = threading.RLock()
_scopes = threading.local()  # .stack: lists of lock paths claimed in each claimed_outputs block


def _follower() -> bool:
    """A process other than process 0 of a ``torchrun`` launch: process 0 claims for all of them."""
    from memcore.runs import is_follower

    return is_follower()


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return f" (pid {text})"
    return ""


def _lock(lock: Path, param: str | None, shown) -> int:
    """Open, lock (non-blocking) and stamp ``lock`` with this pid; refuse at once if it is held."""
    while True:
        try:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:
                fd = os.open(lock, os.O_RDONLY)  # another user's lock file: locking needs no write access
        except OSError as e:
            raise _error("cannot write in folder {folder} ({reason})", param, shown, folder=lock.parent, reason=e.strerror) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _error("cannot lock {lock} ({reason})", param, shown, lock=lock, reason=e.strerror) from None
            raise _error(
                "another memcore run{holder} is writing it; wait for it to end or choose another path",
                param, shown, holder=holder,
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            with contextlib.suppress(OSError):  # the pid is for the message of whoever comes second
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # its holder removed it between our open and our lock: take the new one


def _acquire(lock: Path, param: str | None, shown) -> None:
    if fcntl is None or _follower():
        return
    with deferred_signals(), _claims_lock:
        claim = _claims.get(lock)
        if claim is not None:
            claim.holders += 1
            return
        if not _claims and hasattr(os, "register_at_fork"):
            _watch_forks()
        _claims[lock] = _Claim(_lock(lock, param, shown))


def _release(lock: Path) -> None:
    if fcntl is None or _follower():
        return
    with deferred_signals(), _claims_lock:
        claim = _claims[lock]
        claim.holders -= 1
        if claim.holders == 0:
            del _claims[lock]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)  # while still locked: see _lock
            os.close(claim.fd)


@contextlib.contextmanager
def _claimed(lock: Path, param: str | None, shown) -> Iterator[None]:
    _acquire(lock, param, shown)
    try:
        yield
    finally:
        _release(lock)


def _claim(lock: Path, param: str | None, shown) -> None:
    """The claim a check makes: kept until the innermost :func:`claimed_outputs` ends, or only tried."""
    _acquire(lock, param, shown)
    stack = getattr(_scopes, "stack", None)
    if stack:
        stack[-1].append(lock)
    else:
        _release(lock)


@contextlib.contextmanager
def claimed_outputs() -> Iterator[None]:
    """Keep the outputs checked inside this block claimed until it ends (see the module docstring)."""
    if not hasattr(_scopes, "stack"):
        _scopes.stack = []
    scope: list[Path] = []
    _scopes.stack.append(scope)
    try:
        yield
    finally:
        _scopes.stack.remove(scope)
        with deferred_signals():
            for lock in reversed(scope):
                _release(lock)


def _forget_claims_in_child() -> None:
    # A forked child shares the parent's open lock files: closing its copies keeps the parent's locks;
    # unlocking or removing them would not.
    for claim in _claims.values():
        with contextlib.suppress(OSError):
            os.close(claim.fd)
    _claims.clear()
    _scopes.__dict__.clear()


@functools.cache
def _watch_forks() -> None:
    """Registered once, at the first claim (not on import)."""
    os.register_at_fork(after_in_child=_forget_claims_in_child)


# ---------------------------------------------------------------------------------------------
# checks


def _probe(target: Path, folder: bool, param: str | None, shown) -> None:
    """Create and remove the temporary sibling of ``target`` the write will use."""
    prefix, suffix = temp_affixes(target)
    with deferred_signals():
        try:
            if folder:
                os.rmdir(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent))
            else:
                fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
                os.close(fd)
                os.unlink(tmp)
        except OSError as e:
            raise _error(
                "cannot write in folder {folder} ({reason})", param, shown, folder=target.parent, reason=e.strerror
            ) from None


def check_output_file(path: str | os.PathLike, param: str) -> Path:
    """Fail early (before any long work) when ``path``, the value of ``param``, cannot be written as a
    file, and claim it (see the module docstring). Returns ``path`` as given."""
    target = resolve_output(path, param)
    if os.path.isdir(target):
        raise _error("is a directory", param, path)
    if os.path.exists(target):
        if not stat.S_ISREG(target.stat().st_mode):
            raise _error("exists and is not a regular file", param, path)
        folder, owner = target.parent.stat(), target.stat().st_uid
        if folder.st_mode & stat.S_ISVTX and os.geteuid() not in (0, owner, folder.st_uid):
            raise _error("belongs to another user in a sticky folder; it cannot be replaced", param, path)
    _probe(target, False, param, path)
    _claim(lock_path(target), param, path)
    return Path(path)


def check_output_dir(path: str | os.PathLike, param: str) -> Path:
    """Fail early when ``path``, the value of ``param``, cannot be created as a new folder, and claim
    it. Returns ``path`` as given."""
    target = resolve_output(path, param)
    if os.path.lexists(target):
        raise _error("already exists; choose a new folder", param, path)
    _probe(target, True, param, path)
    _claim(lock_path(target), param, path)
    return Path(path)


def _new_root(target: Path, param: str | None, shown) -> Path:
    """The outermost missing folder of ``target`` (a folder to create with its missing parents)."""
    root = target
    while not os.path.exists(root.parent):  # os.path: False, not an error, for a name too long
        _check_name(root, param, shown)
        root = root.parent
    if not os.path.isdir(root.parent):
        raise _error("{folder} is not a folder", param, shown, folder=root.parent)
    _check_name(root, param, shown)
    return root


def check_output_folder(path: str | os.PathLike, param: str, files: Iterable[str] = ()) -> Path:
    """Fail early when ``path`` cannot receive ``files``: an existing folder, whose files of those
    names are replaced, or a folder created (with its missing parents) if missing. Claims it.
    Returns ``path`` as given."""
    given = Path(path)
    target = resolve_output(given, param) if os.path.islink(given) else Path(os.path.realpath(given))
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise _error("exists and is not a folder", param, path)
        for name in files:
            if os.path.isdir(target / name):
                raise _error("{file} is a folder", param, path, file=target / name)
        _probe(target / STAGE, True, param, path)
        _claim(lock_path(target / STAGE), param, path)
    else:
        root = _new_root(target, param, path)
        _probe(root, True, param, path)
        _claim(lock_path(root), param, path)
    return given


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_distinct(
    outputs: Sequence[tuple[str, str | os.PathLike | None]],
    inputs: Sequence[tuple[str, object]] = (),
    what: str = "file",
) -> None:
    """Refuse an output that is another output of the same run, or an input (it would be replaced).

    ``outputs`` and ``inputs`` are (parameter, path) pairs; an input's value may be a list of paths,
    and a value that is not an existing path (a built-in name, None) is skipped. ``what`` is "file" or
    "folder", for the message.
    """
    outs = [(param, os.fspath(path)) for param, path in outputs if path is not None]
    for i, (param, path) in enumerate(outs):
        for other, earlier in outs[:i]:
            if _same(path, earlier):
                raise MemcoreError(f"must be another {what} than {{other}}", param=param, other=Param(other))
    for param, path in outs:
        if not os.path.exists(path):
            continue
        for other, values in inputs:
            items = values if isinstance(values, (list, tuple)) else [values]
            for item in items:
                if isinstance(item, (str, os.PathLike)) and os.path.exists(item) and _same(path, os.fspath(item)):
                    raise _error(
                        "is also the input {other} (writing would replace it); choose another path",
                        param, path, other=Param(other),
                    )


# ---------------------------------------------------------------------------------------------
# writing


def _default_mode(base: int) -> int:
    """``base`` less the process umask: the mode a plain open() or mkdir() would have given."""
    with deferred_signals():
        umask = os.umask(0)
        os.umask(umask)
    return base & ~umask


def _unwritable(target: Path, error: OSError) -> MemcoreError:
    return MemcoreError(
        "{path}: cannot write in folder {folder} ({reason})", path=target, folder=target.parent, reason=error.strerror
    )


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    ``path`` is resolved as :func:`resolve_output` does (a link to a file: its target is replaced)
    and claimed for the block unless this process holds its claim already.
    """
    target = resolve_output(path)
    prefix, suffix = temp_affixes(target)
    tmp = None
    with _claimed(lock_path(target), None, path):
        try:
            with deferred_signals():
                try:
                    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
                except OSError as e:
                    raise _unwritable(target, e) from None
                os.close(fd)
            yield Path(tmp)
            with deferred_signals():
                os.chmod(tmp, _default_mode(0o666))  # mkstemp makes it private
                os.replace(tmp, target)
                tmp = None
        finally:
            if tmp is not None:
                with deferred_signals(), contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)


@contextlib.contextmanager
def _temp_dir(target: Path) -> Iterator[Path]:
    """A new hidden temporary folder beside ``target``, removed at the end unless renamed away."""
    prefix, suffix = temp_affixes(target)
    tmp = None
    try:
        with deferred_signals():
            try:
                tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent))
            except OSError as e:
                raise _unwritable(target, e) from None
        yield tmp
    finally:
        if tmp is not None:
            with deferred_signals():
                shutil.rmtree(tmp, ignore_errors=True)


def _rename_new(tmp: Path, target: Path, shown) -> None:
    """Rename folder ``tmp`` to ``target``, which must not exist: one line if something else made it."""
    os.chmod(tmp, _default_mode(0o777))  # mkdtemp makes it private
    try:
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
        os.rename(tmp, target)
    except OSError as e:
        raise MemcoreError(
            "{path}: was created by something else while memcore wrote it ({reason}); nothing was written",
            path=_shown(shown), reason=e.strerror,
        ) from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    ``path`` is resolved and claimed as in :func:`atomic_file`; it must not exist.
    """
    target = resolve_output(path)
    with _claimed(lock_path(target), None, path), _temp_dir(target) as tmp:
        yield tmp
        with deferred_signals():
            _rename_new(tmp, target, path)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder whose files, if the block succeeds, join ``path`` (replacing files of
    the same names) all at once; ``path`` is created with its missing parents if needed.

    A new folder is renamed into place whole (:func:`atomic_dir` at its outermost missing parent);
    in an existing folder, the files are written into a hidden temporary folder inside it, then
    renamed one by one (each file atomic, the set within milliseconds).
    """
    given = Path(path)
    target = resolve_output(given) if os.path.islink(given) else Path(os.path.realpath(given))
    if not os.path.exists(target):
        root = _new_root(target, None, path)
        with atomic_dir(root) as tmp:
            inner = tmp / target.relative_to(root)
            inner.mkdir(parents=True, exist_ok=True)
            yield inner
        return
    if not os.path.isdir(target):
        raise _error("exists and is not a folder", None, path)
    with _claimed(lock_path(target / STAGE), None, path), _temp_dir(target / STAGE) as tmp:
        yield tmp
        with deferred_signals():
            names = sorted(p.name for p in tmp.iterdir())
            folders = [name for name in names if os.path.isdir(target / name)]
            if folders:
                raise MemcoreError("{file}: is a folder; nothing was written", file=target / folders[0])
            for name in names:
                os.replace(tmp / name, target / name)
