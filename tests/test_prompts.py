"""Tests for memcore.prompts.load_prompts on small tmp files (the built-in sets: tests/test_data.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from memcore.errors import MemcoreError
from memcore.prompts import load_prompts


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# ---------------------------------------------------------------- txt


def test_txt_blank_lines_whitespace_no_trailing_newline(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "p.txt",
        "  first  prompt \n\n \t \r\nsecond\r\n<i>HTML</i> &amp; 5′ tall — café 東京\n   last one",
    )
    assert load_prompts(path) == [
        "first  prompt",
        "second",
        "<i>HTML</i> &amp; 5′ tall — café 東京",
        "last one",
    ]


def test_txt_long_prompt_and_bom_and_uppercase_extension(tmp_path: Path) -> None:
    long = " ".join(f"word{i}" for i in range(500))
    path = tmp_path / "P.TXT"
    path.write_bytes(b"\xef\xbb\xbf" + f"{long}\nshort".encode())
    assert load_prompts(str(path)) == [long, "short"]


# ---------------------------------------------------------------- jsonl


def test_jsonl_prompt_field_and_caption_preferred(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "p.jsonl",
        '{"prompt": " a cat "}\n\n{"caption": "cap", "prompt": "not me"}\n'
        '{"prompt": "   "}\n{"prompt": "<b>x</b> \\u2032"}',
    )
    assert load_prompts(path) == ["a cat", "cap", "<b>x</b> \u2032"]


def test_jsonl_malformed_line_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": "broken"\n')
    with pytest.raises(MemcoreError, match=r"bad\.jsonl:3: ") as e:
        load_prompts(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "line, what",
    [('{"text": "x"}', "caption"), ('["x"]', "object"), ('{"prompt": 3}', "string")],
)
def test_jsonl_bad_object_names_line(tmp_path: Path, line: str, what: str) -> None:
    path = _write(tmp_path / "bad.jsonl", f'{{"caption": "ok"}}\n{line}\n')
    with pytest.raises(MemcoreError, match=rf"bad\.jsonl:2: .*{what}"):
        load_prompts(path)


# ---------------------------------------------------------------- csv


def test_csv_comma_with_quoted_commas(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "p.csv",
        ',prompt,urls\n0,"a cat, a dog","[\'u1\', \'u2\']"\n1,  plain  ,[]\n2,"",[]\n3,"say ""hi""; ok",[]',
    )
    assert load_prompts(path) == ["a cat, a dog", "plain", 'say "hi"; ok']


def test_csv_semicolon_column_order(tmp_path: Path) -> None:
    # "Caption" wins over "prompt"; commas inside fields do not fool the delimiter detection.
    path = _write(
        tmp_path / "p.csv",
        ';prompt;Caption;URL\n0;no;Red, white, and blue;http://x?a=1,2\n1;no;"quoted; semi";\n',
    )
    assert load_prompts(path) == ["Red, white, and blue", "quoted; semi"]


def test_csv_without_prompt_column_lists_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "cols.csv", "id,text,url\n0,a,b\n")
    with pytest.raises(MemcoreError, match=r"cols\.csv: .*'id', 'text', 'url'"):
        load_prompts(path)


def test_csv_short_row_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "short.csv", "id,url,prompt\n0,u,a\n1\n")
    with pytest.raises(MemcoreError, match=r"short\.csv:3: "):
        load_prompts(path)


# ---------------------------------------------------------------- errors and duplicates


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MemcoreError, match=r"nope\.txt: "):
        load_prompts(tmp_path / "nope.txt")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(MemcoreError, match=r"dir\.txt: .*directory"):
        load_prompts(tmp_path / "dir.txt")


@pytest.mark.parametrize("ext", [".txt", ".jsonl", ".csv"])
@pytest.mark.parametrize("content", ["", "\n \n\t\n  "])
def test_empty_or_blank_file(tmp_path: Path, ext: str, content: str) -> None:
    path = _write(tmp_path / f"empty{ext}", content)
    with pytest.raises(MemcoreError, match=rf"empty{ext}: no prompts found"):
        load_prompts(path)


def test_csv_header_only(tmp_path: Path) -> None:
    path = _write(tmp_path / "head.csv", ";Caption;URL\n")
    with pytest.raises(MemcoreError, match=r"head\.csv: no prompts found"):
        load_prompts(path)


def test_unknown_extension(tmp_path: Path) -> None:
    path = _write(tmp_path / "prompts.tsv", "a\tb\n")
    with pytest.raises(MemcoreError, match=r"prompts\.tsv: .*\.txt.*\.jsonl.*\.csv"):
        load_prompts(path)


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(MemcoreError, match=r"latin1\.txt: .*UTF-8"):
        load_prompts(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root (or non-POSIX) reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "secret.txt", "a\n")
    path.chmod(0)
    try:
        with pytest.raises(MemcoreError, match=r"secret\.txt: "):
            load_prompts(path)
    finally:
        path.chmod(0o600)


def test_duplicates_kept_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path / "dup.txt", "a\nb\na\na\n b \nc")
    with caplog.at_level(logging.WARNING, logger="memcore"):
        assert load_prompts(path) == ["a", "b", "a", "a", "b", "c"]
    records = [r for r in caplog.records if r.name == "memcore"]
    assert len(records) == 1
    assert "dup.txt: 3 duplicate prompts kept" in records[0].getMessage()


def test_no_warning_without_duplicates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path / "uniq.txt", "a\nb\n")
    with caplog.at_level(logging.WARNING, logger="memcore"):
        load_prompts(path)
    assert not [r for r in caplog.records if r.name == "memcore"]


def test_read_error_is_memcore_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs as root too, where chmod cannot make a file unreadable.
    path = _write(tmp_path / "locked.txt", "a\n")

    def deny(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("memcore.prompts.open", deny, raising=False)
    with pytest.raises(MemcoreError, match=r"locked\.txt: cannot read \(Permission denied\)"):
        load_prompts(path)
