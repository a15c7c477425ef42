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


def test_top_level_functions_survive_their_modules_import():
    """No submodule of memcore shares a name with a lazy top-level attribute: importing one (as the CLI
    and generate do) would replace the function by the module on the package."""
    code = (
        "import importlib, pkgutil, memcore\n"
        "modules = {m.name for m in pkgutil.iter_modules(memcore.__path__)}\n"
        "clash = sorted(modules & (set(memcore._LAZY) - {'ops'}))\n"
        "assert not clash, clash\n"
        "for name in sorted(modules - {'__main__'}):\n"
        "    importlib.import_module('memcore.' + name)\n"
        "assert callable(memcore.prune) and callable(memcore.localize), (memcore.prune, memcore.localize)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
