"""Errors that are the user's to fix, in the words of whoever called.

A :class:`MemcoreError` names the parameter at fault by its library name, and its message keeps the
parameters it mentions as structured fields rather than as text. ``str(error)`` reads in Python
words::

    sparsity: must be in (0, 1], got 2
    the mask was made from other weights (...); pass force=True to apply it anyway

A front end with other names for the parameters spells them its own way with
:meth:`MemcoreError.render` (the CLI writes its flags: ``memcore.cli.FlagWords``). The CLI prints a
:class:`MemcoreError` as one line and exits with code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    """A parameter a message names, with the value it would take (``None``: the parameter itself).

    In Python words ``per_step=True``, ``model=PATH`` or ``out``; the CLI writes its flag.
    """

    name: str
    value: object = None

    def python(self) -> str:
        return self.name if self.value is None else f"{self.name}={self.value}"


@dataclass(frozen=True)
class Pass(Param):
    """Advice to set a parameter: ``pass force=True`` in Python words; the CLI advises its flag."""

    value: object = True

    def python(self) -> str:
        return f"pass {super().python()}"


@dataclass(frozen=True)
class Call:
    """A library function with some of its parameters: ``compute_mask(per_step=True)`` in Python
    words; the CLI names the command that runs it."""

    function: str
    params: tuple[Param, ...] = ()

    def python(self) -> str:
        return f"{self.function}({', '.join(p.python() for p in self.params)})"


Mention = Param | Call


def python_words(mention: Mention) -> str:
    """How a Python caller reads a mention (the default spelling of :meth:`MemcoreError.render`)."""
    return mention.python()


class MemcoreError(Exception):
    """A mistake in the input (a path, a file's content, an argument's value).

    Args:
        message: the text. With ``fields`` it is a :meth:`str.format` template whose ``{name}``
            fields take them (values that may hold braces, such as paths, go in a field too);
            without, it is used as it is.
        param: the parameter whose value is at fault: the message then starts with its name, and
            ``value`` when given (``out_dir /tmp/x: already exists``).
        value: the offending value as the message shows it after the parameter's name.
        fields: the template's fields; :class:`Param`, :class:`Pass` and :class:`Call` values are
            spelled by whoever renders the error, anything else with :func:`format`.

    Attributes:
        param: the parameter at fault, else the first parameter the message mentions (``force`` in
            "pass force=True to apply it anyway"), else ``None``.
        mentions: the :class:`Param`, :class:`Pass` and :class:`Call` fields, in the order given.
    """

    def __init__(self, message: str, param: str | None = None, *, value: object = None, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.value = value
        self.fields = fields
        self.mentions: list[Mention] = [v for v in fields.values() if isinstance(v, (Param, Call))]
        self._at_fault = param
        mentioned = (m.name for m in self.mentions if isinstance(m, Param))
        self.param = param if param is not None else next(mentioned, None)

    def detail(self, spell: Callable[[Mention], str] = python_words) -> str:
        """The message without the parameter at fault before it, spelled by ``spell``."""
        if not self.fields:
            return self.message
        return self.message.format(**{k: spell(v) if isinstance(v, (Param, Call)) else v for k, v in self.fields.items()})

    def render(self, spell: Callable[[Mention], str] = python_words) -> str:
        """The one-line message, with every parameter spelled by ``spell`` (Python words by default)."""
        text = self.detail(spell)
        if self._at_fault is None:
            return text
        subject = spell(Param(self._at_fault))
        return f"{subject}: {text}" if self.value is None else f"{subject} {self.value}: {text}"

    def __str__(self) -> str:
        return self.render()

    def __reduce__(self):  # keep the fields when pickled (Exception pickles its args only)
        return functools.partial(type(self), self.message, self._at_fault, value=self.value, **self.fields), ()
