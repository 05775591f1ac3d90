"""User-facing errors.

Anything a user can cause with bad input (a missing or corrupt image, a malformed annotation line,
an unknown id, a wrong checkpoint, an unwritable path) raises :class:`CsmcirError` with a one-line
message that names the file and, where there is one, the id. The CLI prints ``error: <message>``
and exits with status 2, without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class CsmcirError(Exception):
    """An error caused by the user's input; its message is one line and is shown as is."""


def where(path: str | Path, line: int | None = None, id: str | None = None) -> str:
    """Format a location for an error message: ``file:line (id 'x')``."""
    s = str(path)
    if line is not None:
        s += f":{line}"
    if id is not None:
        s += f" (id {id!r})"
    return s


class ConfigError(CsmcirError, ValueError):
    """An invalid option (``model.memory_bank``, ``model.distill``, ``model.net``, ...): a user
    error like any other (one line, exit 2 from the CLI), and a ``ValueError`` for code that
    validates options."""
