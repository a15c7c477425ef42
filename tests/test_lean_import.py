"""Importing memcore stays cheap: no diffusers, transformers, triton or matplotlib, no CUDA context.

Each check runs in a fresh interpreter, since the test session itself has imported everything.
"""

import subprocess
import sys

import pytest

HEAVY = ("diffusers", "transformers", "triton", "matplotlib")


@pytest.mark.parametrize(
    "modules",
    [("memcore",), ("memcore", "memcore.ops"), ("memcore.cli",), ("memcore.analysis", "memcore.generate", "memcore.io")],
    ids=lambda m: "+".join(m),
)
def test_import_is_lean(modules):
    code = (
        "import sys, torch\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        + "assert not loaded, loaded\n"
        + "assert not torch.cuda.is_initialized()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
