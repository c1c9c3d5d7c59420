"""Exceptions raised by adamergex-peft."""


class AdaMergeXError(ValueError):
    """Invalid input to a merge: names the adapter (and module) and what is wrong.

    A subclass of :class:`ValueError`, so code that already catches ``ValueError`` from PEFT keeps
    working. When it is raised, nothing has been changed: no new adapter, no modified source
    adapter or base weight, no output folder.
    """
