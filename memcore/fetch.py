"""The training images of a built-in prompt set, fetched from the URLs its file carries.

``sdv1-500`` and ``laion-nomem-500`` carry the URL of each prompt's LAION training image (their CSV's
``URL`` column); the numbered subsets of ``sdv1-500`` (``memorize_0``, ...) take the URLs of their rows
of it. The images are not part of memcore: they belong to their owners, many URLs no longer resolve,
and memcore only fetches them, for research use (see DATA.md).

Ground-truth folder layout (:func:`image_name` writes it, :func:`find_images` reads it):
``DIR/NNNN.EXT`` is the image of the prompt at 0-based index ``NNNN`` *within the set fetched* (for a
subset, its index in the subset, not its row of ``sdv1-500``), zero-padded to 4 digits, and
``DIR/NNNN_K.EXT`` an extra image of the same prompt. Readers accept any integer (``7.jpg``,
``00007_2.png``). ``EXT`` follows the image's format (``.jpg``, ``.png``, ``.webp``...); the bytes
are saved as served. ``DIR/report.csv`` says what happened to every index in the last run.

Downloads run a few at a time in threads, with a timeout for connecting and for every read (and a
limit on one try's whole time, :data:`ATTEMPT_SECONDS`), a few
retries with exponential backoff for transient failures (HTTP 5xx, 408, 429, timeouts, dropped
connections; never a 404 or a host name that does not resolve), a size cap, and a check that the
content is an image (Pillow ``verify``). Each image is written atomically (:func:`memcore.io.atomic_file`) by the main thread, so an
interrupted run leaves complete images only; a second run skips the images already there and valid.
Proxies come from ``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` as urllib reads them by default.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import functools
import http.client
import io
import math
import os
import random
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from memcore.errors import MemcoreError

__all__ = ["FetchResult", "fetch_images", "find_images", "image_name", "image_urls", "parse_image_name"]

WORKERS, TIMEOUT, RETRIES = 8, 10.0, 3
MAX_BYTES = 32 * 1024 * 1024  # a LAION image is well under this; a larger answer is not one
ATTEMPT_SECONDS = 120.0  # the most one try may take (or timeout, if longer): a server trickling bytes is cut off
BACKOFF = 1.0  # seconds before the first retry, doubled after each (with jitter)
MAX_RETRY_AFTER = 30.0  # a server's Retry-After is honoured up to this
CHUNK = 64 * 1024
REPORT = "report.csv"
REPORT_COLUMNS = ("index", "row", "url", "status", "bytes", "file")
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}

# ---------------------------------------------------------------------------------------------
# the folder layout


def image_name(index: int, ext: str, extra: int | None = None) -> str:
    """``0007.jpg`` for the image of the prompt at index 7, ``0007_1.jpg`` for its extra image 1."""
    ext = ext if ext.startswith(".") else f".{ext}"
    return f"{index:04d}{ext}" if extra is None else f"{index:04d}_{extra}{ext}"


_NAME = re.compile(r"(\d+)(?:_(\d+))?(\.[A-Za-z0-9]+)")


def parse_image_name(name: str) -> tuple[int, int | None] | None:
    """(index, extra) of a file named by :func:`image_name` (any number of digits), else None."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    return int(match[1]), None if match[2] is None else int(match[2])


def find_images(folder: str | os.PathLike) -> dict[int, list[Path]]:
    """The images of a ground-truth folder by prompt index: the main image first, then the extras
    in order of K. Hidden files (temporaries) and files of other names are ignored."""
    found: dict[int, list[tuple[int, Path]]] = {}
    for path in Path(folder).iterdir():
        parsed = parse_image_name(path.name)
        if parsed is None or not path.is_file():
            continue
        index, extra = parsed
        found.setdefault(index, []).append((-1 if extra is None else extra, path))
    return {index: [p for _, p in sorted(items)] for index, items in sorted(found.items())}


# ---------------------------------------------------------------------------------------------
# the URLs of a set


@dataclass(frozen=True)
class SetURLs:
    """The URL of each prompt of a set (None where the file has none), and each prompt's row in the file."""

    name: str
    urls: tuple[str | None, ...]
    rows: tuple[int, ...]


@functools.cache
def _file_urls(file: str) -> tuple[str | None, ...] | None:
    """The ``URL`` column of built-in CSV ``file``, one entry per prompt (as ``load_prompts`` reads the
    file: blank lines and empty captions skipped); None when the file has no such column."""
    if not file.endswith(".csv"):
        return None
    text = (resources.files("memcore") / "data" / file).read_text(encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=";", strict=True)
    rows = [row for row in reader if any(c.strip() for c in row)]
    header = [c.strip() for c in rows[0]]
    if "URL" not in header:
        return None
    caption, url = header.index("Caption"), header.index("URL")
    return tuple(row[url].strip() or None for row in rows[1:] if row[caption].strip())


def image_urls(name: str) -> SetURLs:
    """The image URLs of built-in set ``name``, indexed as its prompts are.

    A subset of ``sdv1-500`` takes the URLs of its rows of it, in the subset's order. Raises
    :class:`MemcoreError` for an unknown name or a set without URLs.
    """
    from memcore import datasets

    found = datasets.get(name)
    if found is None:
        raise MemcoreError(f"{name}: not a built-in prompt set ('memcore data' lists them)")
    urls = _file_urls(found.file)
    if urls is None or not any(urls):
        with_urls = ", ".join(s.name for s in datasets.builtin_sets() if s.indices is None and any(_file_urls(s.file) or ()))
        raise MemcoreError(f"{name}: this set has no image URLs (sets with URLs: {with_urls}, and the numbered subsets of sdv1-500)")
    rows = tuple(range(len(urls))) if found.indices is None else found.indices
    if len(rows) != found.rows or max(rows) >= len(urls):  # the file and the registry disagree: a bug
        raise RuntimeError(f"{name}: {len(urls)} URLs in {found.file} for {found.rows} prompts")
    return SetURLs(name, tuple(urls[r] for r in rows), tuple(rows))


# ---------------------------------------------------------------------------------------------
# one download


class _Failed(Exception):
    """A download that ended without an image; ``status`` is its report entry."""

    def __init__(self, status: str, transient: bool = False, wait: float | None = None) -> None:
        super().__init__(status)
        self.status, self.transient, self.wait = status, transient, wait


class _Stopped(Exception):
    """The run is being interrupted."""


def _opener() -> urllib.request.OpenerDirector:
    """http and https only (no file:, ftp: or data: URLs from a CSV), proxies from the environment."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),  # HTTP_PROXY, HTTPS_PROXY, NO_PROXY
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    with contextlib.suppress(TypeError, ValueError):
        seconds = float(value)
        if math.isfinite(seconds) and seconds >= 0:
            return min(seconds, MAX_RETRY_AFTER)
    return None


def _is_timeout(error: BaseException) -> bool:
    return isinstance(error, (TimeoutError, socket.timeout)) or (
        isinstance(error, urllib.error.URLError) and isinstance(error.reason, (TimeoutError, socket.timeout))
    )


def _get(opener, url: str, timeout: float, max_bytes: int, stop: threading.Event) -> bytes:
    """The body at ``url``, or :class:`_Failed` saying why not."""
    from memcore._version import __version__

    try:
        if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
            raise _Failed("bad url (not http or https)")
        request = urllib.request.Request(url, headers={"User-Agent": f"memcore/{__version__} (research; image fetch)"})
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise _Failed("too large")
            chunks, size = [], 0
            deadline = time.monotonic() + max(ATTEMPT_SECONDS, timeout)
            while chunk := response.read1(CHUNK):  # whatever has arrived, not a full CHUNK
                if stop.is_set():
                    raise _Stopped
                if time.monotonic() > deadline:
                    raise _Failed("timeout", True)
                size += len(chunk)
                if size > max_bytes:
                    raise _Failed("too large")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as e:
        e.close()
        transient = e.code >= 500 or e.code in (408, 429)
        raise _Failed(f"http {e.code}", transient, _retry_after(e.headers)) from None
    except (_Failed, _Stopped):
        raise
    except Exception as e:
        if _is_timeout(e):
            raise _Failed("timeout", True) from None
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        if isinstance(reason, (ValueError, http.client.InvalidURL, str)):  # urllib's words for a URL it cannot use
            raise _Failed(f"bad url ({reason})") from None
        if isinstance(reason, socket.gaierror):  # the host's name does not resolve: asking again will not help
            raise _Failed("unknown host") from None
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise _Failed("bad certificate") from None
        if isinstance(reason, OSError):
            raise _Failed(f"connection error ({reason.strerror or type(reason).__name__})", True) from None
        if isinstance(reason, http.client.HTTPException):  # a malformed or cut answer
            raise _Failed(f"connection error ({type(reason).__name__})", True) from None
        raise


def _image_format(data: bytes) -> str | None:
    """The Pillow format of ``data`` when it verifies as an image, else None."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the bytes are only checked
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
                return image.format
    except Exception:  # Pillow raises many kinds for bytes that are not an image
        return None


@dataclass
class _Download:
    index: int
    data: bytes | None = None
    format: str | None = None
    status: str = "ok"


def _download(
    index: int, url: str, timeout: float, retries: int, max_bytes: int, backoff: float, stop: threading.Event
) -> _Download:
    opener = _opener()
    for attempt in range(retries + 1):
        if stop.is_set():
            raise _Stopped
        try:
            data = _get(opener, url, timeout, max_bytes, stop)
        except _Failed as failed:
            if not failed.transient or attempt == retries:
                return _Download(index, status=failed.status)
            delay = failed.wait if failed.wait is not None else backoff * 2**attempt * (0.5 + random.random())
            if stop.wait(delay):
                raise _Stopped from None
            continue
        image_format = _image_format(data)
        if image_format is None:
            return _Download(index, status="not an image")
        return _Download(index, data, image_format)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# a whole set


@dataclass
class FetchResult:
    """What :func:`fetch_images` did: one status per index (``ok``, ``skipped``, ``http 404``,
    ``timeout``, ``not an image``, ``too large``, ``no url``, ``bad url``, ``connection error (...)``)."""

    name: str
    out_dir: Path
    statuses: list[str]
    files: list[Path | None]
    sizes: list[int | None]
    report: Path
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def present(self) -> int:
        return sum(s in ("ok", "skipped") for s in self.statuses)

    def summary(self) -> str:
        failed = {s: n for s, n in self.counts.items() if s not in ("ok", "skipped")}
        text = (
            f"{self.name}: {self.present} of {len(self.statuses)} images in {self.out_dir} "
            f"({self.counts.get('ok', 0)} downloaded, {self.counts.get('skipped', 0)} already there"
        )
        if failed:
            most_first = sorted(failed.items(), key=lambda item: (-item[1], item[0]))
            text += ", missing: " + ", ".join(f"{n} {status}" for status, n in most_first)
        return text + f") in {self.seconds:.1f} s; report {self.report}"


def _check_number(value, param: str, low, high, kind=int) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high
    if not ok:
        what = "an integer" if kind is int else "a number"
        raise MemcoreError(
            "must be {what} in [{low}, {high}], got {got}", param=param, what=what, low=low, high=high, got=value
        )


def _existing(folder: Path, index: int, files: dict[int, list[Path]]) -> Path | None:
    """The main image of ``index`` already in ``folder`` when it verifies, else None."""
    for path in files.get(index, []):
        if parse_image_name(path.name)[1] is None:
            with contextlib.suppress(OSError):
                if _image_format(path.read_bytes()) is not None:
                    return path
    return None


def fetch_images(
    name: str,
    out_dir: str | os.PathLike,
    workers: int = WORKERS,
    timeout: float = TIMEOUT,
    retries: int = RETRIES,
    max_bytes: int = MAX_BYTES,
    progress: bool = True,
    backoff: float | None = None,
) -> FetchResult:
    """Download the image of every prompt of built-in set ``name`` into folder ``out_dir``.

    ``out_dir`` is created if missing, resumed into if it exists (its valid images are kept and
    skipped). Images are named by :func:`image_name` with the prompt's index in ``name`` (for a
    subset of ``sdv1-500``: its index in the subset). A missing image is never an error: its status
    goes into ``report.csv`` and the result. ``timeout`` bounds connecting and every read, ``retries``
    the extra tries of a transient failure, ``max_bytes`` an image's size.
    """
    from memcore.io import atomic_file, check_output_folder

    started = time.perf_counter()
    urls = image_urls(name)
    _check_number(workers, "workers", 1, 64)
    _check_number(timeout, "timeout", 0.001, 3600.0, (int, float))
    _check_number(retries, "retries", 0, 20)
    _check_number(max_bytes, "max_bytes", 1, 2**40)
    backoff = BACKOFF if backoff is None else backoff
    check_output_folder(out_dir, "out_dir", files=[REPORT])
    target = Path(os.path.realpath(out_dir))
    created = []  # folders this run made, outermost last
    for folder in [target, *target.parents]:
        if os.path.isdir(folder):
            break
        created.append(folder)
    if created:
        target.mkdir(parents=True)
        check_output_folder(out_dir, "out_dir", files=[REPORT])  # claim the folder as later runs will

    count = len(urls.urls)
    statuses: list[str] = [""] * count
    files: list[Path | None] = [None] * count
    sizes: list[int | None] = [None] * count
    present = find_images(target)
    todo = []
    for index, url in enumerate(urls.urls):
        if url is None:
            statuses[index] = "no url"
        elif (path := _existing(target, index, present)) is not None:
            statuses[index], files[index], sizes[index] = "skipped", path, path.stat().st_size
        else:
            todo.append(index)

    from tqdm.auto import tqdm

    stop = threading.Event()
    written = False
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memcore-fetch")
    try:
        bar = tqdm(total=count, initial=count - len(todo), desc=f"fetch {name}", unit="image", disable=None if progress else True)
        with bar:
            args = (timeout, retries, max_bytes, backoff, stop)
            futures = [pool.submit(_download, i, urls.urls[i], *args) for i in todo]
            for future in concurrent.futures.as_completed(futures):
                done = future.result()
                statuses[done.index] = done.status
                if done.data is not None:
                    path = target / image_name(done.index, EXTENSIONS.get(done.format, f".{done.format.lower()}"))
                    with atomic_file(path) as tmp:
                        tmp.write_bytes(done.data)
                    written = True
                    for old in present.get(done.index, []):  # an invalid image of another format it replaces
                        if old != path and parse_image_name(old.name)[1] is None:
                            with contextlib.suppress(OSError):
                                old.unlink()
                    files[done.index], sizes[done.index] = path, len(done.data)
                bar.update()
        report = target / REPORT
        with atomic_file(report) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(REPORT_COLUMNS)
            for index in range(count):
                file = files[index].name if files[index] is not None else ""
                size = "" if sizes[index] is None else sizes[index]
                writer.writerow([index, urls.rows[index], urls.urls[index] or "", statuses[index], size, file])
        written = True
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)  # a worker stops within one read's timeout
        if not written:  # nothing came of this run: leave no empty folder behind
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    seconds = time.perf_counter() - started
    return FetchResult(name, Path(out_dir), statuses, files, sizes, Path(out_dir) / REPORT, seconds, counts)
