"""Triton kernels, one module per op; installed as ``memcore._kernels``.

Imported only when a Triton backend is selected, so ``import memcore`` never imports triton.
"""
