"""`memcore data fetch-images`: the training images of a built-in set, against a local HTTP server.

The set's URLs are replaced (monkeypatched) by URLs of a server this file starts on 127.0.0.1; nothing
here reaches the internet. The server serves small PNG/JPEG images (the image of row R is R + 1
pixels wide), 404s, a 500 that then succeeds, a 500 that never does, an answer slower than the
timeout, and a page that is not an image.
"""

from __future__ import annotations

import contextlib
import csv
import http.server
import io
import json
import os
import signal
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import listing, run_cli, user_error
from memcore import datasets, fetch
from memcore.errors import MemcoreError

SDV1 = datasets.get("sdv1-500")
SLOW = 1.0  # seconds the slow route waits; the tests' timeout is well under it
TIMEOUT = "0.25"


def _image(row: int, kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (row + 1, 3), (row % 256, 10, 20)).save(buffer, format="PNG" if kind == "png" else "JPEG")
    return buffer.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int]

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = urllib.parse.urlsplit(self.path).path  # an absolute URI when asked as a proxy
        with self.server.lock:
            self.server.hits[path] = self.server.hits.get(path, 0) + 1
            hits = self.server.hits[path]
        kind, _, arg = path.strip("/").partition("/")
        if kind in ("png", "jpg"):
            self._send(200, _image(int(arg), kind), f"image/{kind}")
        elif kind == "flaky" and hits > 1:
            self._send(200, _image(int(arg), "png"), "image/png")
        elif kind in ("flaky", "broken"):
            self._send(500, b"try again", "text/plain")
        elif kind == "slow":
            time.sleep(SLOW)
            self._send(200, _image(int(arg), "png"), "image/png")
        elif kind == "trickle":  # a byte at a time, each well within the timeout: only the total is too long
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for byte in _image(int(arg), "png")[:40]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)
        elif kind == "text":
            self._send(200, b"<html>not an image</html>", "text/html")
        else:
            self._send(404, b"not found", "text/plain")

    def _send(self, code: int, body: bytes, kind: str) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.hits, httpd.lock = {}, threading.Lock()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def urls(monkeypatch, server):
    """Point the rows of sdv1-500 at the local server: set ``urls[row]``; rows left None have no URL."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(fetch, "BACKOFF", 0.01)
    table: list[str | None] = [None] * SDV1.rows
    real = fetch._file_urls
    monkeypatch.setattr(fetch, "_file_urls", lambda file: tuple(table) if file == SDV1.file else real(file))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    return table, base


def _report(folder: Path) -> list[dict]:
    with open(folder / "report.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _width(path: Path) -> int:
    with Image.open(path) as image:
        return image.size[0]


MIXED = {0: "png/0", 1: "jpg/1", 2: "missing/2", 3: "flaky/3", 4: "slow/4", 5: "text/5", 6: "broken/6"}


def _mixed(table, base):
    for row, route in MIXED.items():
        table[row] = f"{base}/{route}"
    table[7] = "ftp://127.0.0.1/png/7"  # only http and https are fetched
    table[8] = "file:///etc/hostname"


def test_fetch_statuses_files_report_and_resume(urls, server, tmp_path):
    table, base = urls
    _mixed(table, base)
    out = tmp_path / "a" / "images"  # missing parents are created
    result = fetch.fetch_images("sdv1-500", out, workers=4, timeout=float(TIMEOUT), retries=1, progress=False)
    expected = {0: "ok", 1: "ok", 2: "http 404", 3: "ok", 4: "timeout", 5: "not an image", 6: "http 500"}
    assert {i: result.statuses[i] for i in expected} == expected
    assert result.statuses[7] == result.statuses[8] == "bad url (not http or https)"
    assert set(result.statuses[9:]) == {"no url"}
    assert result.present == 3 and result.counts["no url"] == SDV1.rows - 9
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.jpg", "0003.png", "report.csv"]
    assert [_width(out / n) for n in ("0000.png", "0001.jpg", "0003.png")] == [1, 2, 4]
    # retries: the flaky 500 is asked twice, the lasting 500 retries+1 times, a 404 once
    assert server.hits["/flaky/3"] == 2 and server.hits["/broken/6"] == 2 and server.hits["/missing/2"] == 1
    assert server.hits["/slow/4"] == 2

    rows = _report(out)
    assert len(rows) == SDV1.rows and list(rows[0]) == list(fetch.REPORT_COLUMNS)
    assert rows[0] == {"index": "0", "row": "0", "url": f"{base}/png/0", "status": "ok",
                       "bytes": str((out / "0000.png").stat().st_size), "file": "0000.png"}
    assert rows[2]["status"] == "http 404" and rows[2]["file"] == rows[2]["bytes"] == ""
    assert rows[20] == {"index": "20", "row": "20", "url": "", "status": "no url", "bytes": "", "file": ""}
    assert "3 of 500 images" in result.summary() and "1 http 404" in result.summary()

    # resume: valid images are skipped without a request, a damaged one is fetched again
    (out / "0001.jpg").write_bytes(b"\xff\xd8 truncated")
    before = dict(server.hits)
    again = fetch.fetch_images("sdv1-500", out, workers=4, timeout=float(TIMEOUT), retries=0, progress=False)
    assert again.statuses[:4] == ["skipped", "ok", "http 404", "skipped"]
    assert server.hits["/png/0"] == before["/png/0"] and server.hits["/flaky/3"] == before["/flaky/3"]
    assert server.hits["/jpg/1"] == before["/jpg/1"] + 1 and _width(out / "0001.jpg") == 2
    assert _report(out)[0]["status"] == "skipped" and _report(out)[0]["file"] == "0000.png"
    assert not [name for name in listing(tmp_path) if ".tmp" in name or name.endswith(".lock")]


def test_subset_names_files_by_index_within_the_subset(urls, tmp_path):
    table, base = urls
    rows = datasets.get("memorize_0").indices
    for row in rows:
        table[row] = f"{base}/png/{row}"
    result = fetch.fetch_images("memorize_0", tmp_path / "m0", workers=3, timeout=float(TIMEOUT), progress=False)
    assert result.statuses == ["ok"] * len(rows)
    found = fetch.find_images(tmp_path / "m0")
    assert list(found) == list(range(len(rows)))
    assert [_width(found[i][0]) for i in found] == [row + 1 for row in rows]  # the parent set's row's image
    assert [int(r["row"]) for r in _report(tmp_path / "m0")] == list(rows)


def test_proxy_from_the_environment_is_used(urls, server, monkeypatch, tmp_path):
    table, base = urls
    table[0] = "http://images.memcore-test.invalid/png/0"  # resolvable only through the proxy
    monkeypatch.setenv("HTTP_PROXY", base)
    monkeypatch.setenv("http_proxy", base)
    result = fetch.fetch_images("sdv1-500", tmp_path / "p", timeout=float(TIMEOUT), retries=0, progress=False)
    assert result.statuses[0] == "ok" and server.hits["/png/0"] == 1


def test_size_cap(urls, tmp_path):
    table, base = urls
    table[0], table[1] = f"{base}/png/300", f"{base}/png/0"
    big = len(_image(300, "png"))
    result = fetch.fetch_images("sdv1-500", tmp_path / "s", max_bytes=big - 1, timeout=float(TIMEOUT), progress=False)
    assert result.statuses[:2] == ["too large", "ok"]


def test_a_trickle_is_cut_off(urls, server, monkeypatch, tmp_path):
    table, base = urls
    table[0], table[1] = f"{base}/trickle/0", f"{base}/png/1"
    monkeypatch.setattr(fetch, "ATTEMPT_SECONDS", 0.4)
    started = time.monotonic()
    result = fetch.fetch_images("sdv1-500", tmp_path / "t", timeout=float(TIMEOUT), retries=1, progress=False)
    assert result.statuses[:2] == ["timeout", "ok"] and server.hits["/trickle/0"] == 2
    assert time.monotonic() - started < 1.9  # two tries of 0.4 s, not two of the 2 s the answer takes


def test_naming_convention():
    assert fetch.image_name(7, ".jpg") == "0007.jpg" and fetch.image_name(12345, "png", 2) == "12345_2.png"
    assert fetch.parse_image_name("0007.jpg") == (7, None)
    assert fetch.parse_image_name("7_3.webp") == (7, 3) and fetch.parse_image_name("00012.png") == (12, None)
    for other in ("report.csv.bak", ".0007.jpg.abc.tmp", "a7.jpg", "7", "7_.png"):
        assert fetch.parse_image_name(other) is None, other


def test_find_images_orders_main_then_extras(tmp_path):
    for name in ("0002_10.png", "0002_2.png", "2.jpg", "0000.png", "notes.txt", ".0001.png.x.tmp"):
        (tmp_path / name).write_bytes(b"x")
    found = fetch.find_images(tmp_path)
    assert {i: [p.name for p in v] for i, v in found.items()} == {0: ["0000.png"], 2: ["2.jpg", "0002_2.png", "0002_10.png"]}


def test_which_sets_have_urls():
    for name in ("sdv1-500", "laion-nomem-500", "memorize_0", "tv_prompts_4"):
        found = fetch.image_urls(name)
        assert len(found.urls) == datasets.get(name).rows and all(u and u.startswith("http") for u in found.urls)
    assert fetch.image_urls("memorize_0").urls[0] == fetch.image_urls("sdv1-500").urls[datasets.get("memorize_0").indices[0]]
    for name in ("coco-10k", "sd1-mem345"):
        with pytest.raises(MemcoreError, match="has no image URLs"):
            fetch.image_urls(name)


# ---------------------------------------------------------------- the command line


def test_cli_fetches_and_resumes(urls, capsys, tmp_path):
    table, base = urls
    _mixed(table, base)
    out = tmp_path / "gt"
    argv = ["data", "fetch-images", "sdv1-500", "--out", out, "--timeout", TIMEOUT, "--retries", "1", "--workers", "4"]
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0 and stdout.strip().startswith("sdv1-500: 3 of 500 images") and "report" in stdout
    code, stdout, _ = run_cli(capsys, *argv, "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["counts"]["skipped"] == 3 and summary["present"] == 3
    # the listing and a set's prompts still work
    assert run_cli(capsys, "data", "sdv1-500")[1].splitlines()[0] == "The No Limits Business Woman Podcast"
    assert run_cli(capsys, "data")[0] == 0


def test_cli_user_errors(urls, capsys, tmp_path):
    table, base = urls
    table[0] = f"{base}/png/0"
    (tmp_path / "file").write_text("x")
    out = str(tmp_path / "new")
    cases = {
        ("coco-10k", "--out", out): "coco-10k: this set has no image URLs",
        ("nope", "--out", out): "nope: not a built-in prompt set",
        ("sdv1-500",): "--out: is required with fetch-images",
        ("sdv1-500", "--out", out, "--workers", "0"): "--workers: must be an integer in [1, 64], got 0",
        ("sdv1-500", "--out", out, "--timeout", "nan"): "--timeout: must be a number",
        ("sdv1-500", "--out", out, "--timeout", "-1"): "--timeout: must be a number",
        ("sdv1-500", "--out", out, "--retries", "-1"): "--retries: must be an integer in [0, 20], got -1",
        ("sdv1-500", "--out", tmp_path / "file"): "exists and is not a folder",
        ("sdv1-500", "--out", tmp_path / "file" / "x"): "is not a folder",
    }
    for args, message in cases.items():
        assert message in user_error(capsys, tmp_path, "data", "fetch-images", *args), args
    assert user_error(capsys, tmp_path, "data", "fetch-images", "memorize_0", "--out", tmp_path / "file").startswith("--out ")
    assert "which set" in user_error(capsys, tmp_path, "data", "fetch-images")
    assert user_error(capsys, tmp_path, "data", "sdv1-500", "--out", out).startswith("--out: only with memcore data fetch-images")
    assert user_error(capsys, tmp_path, "data", "sdv1-500", "--workers", "2").startswith("--workers: only with")
    assert "one NAME only" in user_error(capsys, tmp_path, "data", "sdv1-500", "memorize_0")


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_sigterm_leaves_complete_images_and_no_temporary(urls, capsys, tmp_path):
    table, base = urls
    table[0] = f"{base}/png/0"
    for row in range(1, 9):
        table[row] = f"{base}/slow/{row}"
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        code, _, err = run_cli(capsys, "data", "fetch-images", "sdv1-500", "--out", tmp_path / "gt", "--workers", "2", "--timeout", "5")
    finally:
        timer.cancel()
    assert code == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "memcore data: interrupted by SIGTERM"
    names = listing(tmp_path)
    assert not [n for n in names if n.endswith((".tmp", ".lock")) or "/." in n or n.startswith(".")], names
    assert "gt/report.csv" not in names and "gt/0000.png" in names
