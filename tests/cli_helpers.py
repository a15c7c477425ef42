"""Running the command line in-process, and what every answer to a user mistake must look like."""

from __future__ import annotations

import os
from pathlib import Path

from memcore.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``memcore ARGV`` run in this process."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def listing(folder: str | os.PathLike) -> set[str]:
    """Every entry under ``folder``, hidden ones included (temporary files are hidden)."""
    root = Path(folder)
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def user_error(capsys, watched: str | os.PathLike, *argv) -> str:
    """The one error line of ``memcore ARGV``, checked to be a user error: exit code 2, one line
    starting ``memcore COMMAND: error:`` as the last line of stderr, no traceback, and nothing
    created or removed under ``watched``."""
    before = listing(watched)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err, err
    # progress bars may come before it; the error is one line, the last
    errors = [line for line in err.strip().splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err
    assert errors[0].startswith(f"memcore {argv[0]}: error: "), errors[0]
    assert listing(watched) == before, f"left behind: {listing(watched) ^ before}"
    return errors[0].removeprefix(f"memcore {argv[0]}: error: ")
