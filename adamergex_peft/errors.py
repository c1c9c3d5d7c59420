"""Exceptions raised by adamergex-peft."""

from __future__ import annotations


class AdaMergeXError(ValueError):
    """Invalid input to a merge: names the adapter (and module) and what is wrong.

    A subclass of :class:`ValueError`, so code that already catches ``ValueError`` from PEFT keeps
    working. When it is raised, nothing has been changed: no new adapter, no modified source
    adapter or base weight, no output folder.

    Attributes:
        field: the :class:`~adamergex_peft.AdaMergeXConfig` field (or merge argument) at fault, if
            the error is about one (front ends map it to their own option name), else ``None``.
    """

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # keep ``field`` across pickling (multiprocessing, accelerate)
        return (_rebuild, (type(self), str(self), self.field))


def _rebuild(cls, message: str, field: str | None) -> AdaMergeXError:
    return cls(message, field=field)
