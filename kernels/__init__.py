"""Triton kernels, one module per op; installed as ``memcore._kernels``.

Imported only when a Triton backend is selected, so ``import memcore`` never imports triton.

In a checkout whose root is on ``sys.path`` (``python -m pytest`` or ``python -m memcore`` run from
the root), this folder would also be found as the top-level package ``kernels`` and shadow the
Hugging Face ``kernels`` distribution, which transformers imports. Imported under that name, it
puts the distribution in its place (or says that none is installed).
"""

if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [entry for entry in _sys.path if _os.path.abspath(entry or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (memcore's kernels/ folder is not that package)", name="kernels")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
