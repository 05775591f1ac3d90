"""Atomic file writes (a reader, or a killed writer, never sees a half-written output file) and
JSON reads that fail with one line naming the file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import CsmcirError


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) or raise a one-line :class:`CsmcirError`."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CsmcirError(f"cannot create output folder {p}: {e.strerror}") from None
    if not os.access(p, os.W_OK):
        raise CsmcirError(f"output folder {p} is not writable")
    return p


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    dest = Path(path)
    parent = ensure_writable_dir(dest.parent if str(dest.parent) else ".")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file; a missing, non-UTF-8 or invalid file raises a one-line error naming it."""
    p = Path(path)
    if not p.is_file():
        raise CsmcirError(f"{p}: {what} not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CsmcirError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise CsmcirError(f"{p}: not UTF-8 text ({e.reason})") from None
