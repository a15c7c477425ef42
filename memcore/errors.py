"""Errors that are the user's to fix.

The CLI prints a :class:`MemcoreError` as one line and exits with code 2; anything else is a bug and
keeps its traceback.
"""


class MemcoreError(Exception):
    """A mistake in the input (a path, a file's content, an argument's value)."""
