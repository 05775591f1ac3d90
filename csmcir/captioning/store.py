"""The caption store: one JSON line per image, appended atomically, resumable, mergeable.

A record::

    {"image_id": "...", "levels": {"scene": "...", ...}, "final": "...", "status": "ok",
     "raw": "<the model's answer>", "model": "<model id>", "prompt": "natural@1",
     "generation": {"max_new_tokens": 256, "do_sample": false, ...}}

The file is also a valid ``captions.jsonl`` (readers ignore the extra keys), so training, indexing
and search read it directly (``--data.captions FILE``, ``--captions FILE``). A record with
``status: empty`` (the model said nothing) counts as an image without caption there.

Each record is one ``write`` of one whole line to a file opened with ``O_APPEND``, and every
batch is fsync'ed: a killed run leaves complete lines and at most one truncated last line, which
:meth:`CaptionStore.open` cuts off (and reports) before the run resumes and skips the ids already
done.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import CsmcirError, where
from ..io import atomic_write_text

__all__ = ["CaptionStore", "merge_stores", "read_store"]

REQUIRED = ("image_id", "levels", "final", "status")


def _check_record(rec: Any, path: Path, lineno: int, key: str = "image_id") -> dict:
    need = (key, *REQUIRED[1:])
    if not isinstance(rec, dict) or any(k not in rec for k in need):
        raise CsmcirError(f"{where(path, lineno)}: not a {_WHAT[key]} record (needs {', '.join(need)})")
    if not isinstance(rec[key], str) or not rec[key]:
        raise CsmcirError(f"{where(path, lineno)}: {key} must be a non-empty string")
    if not isinstance(rec["final"], str) or not isinstance(rec["levels"], dict):
        raise CsmcirError(f"{where(path, lineno, rec[key])}: final must be a string and levels an object")
    return rec


# the id field of a store's records: images for captions, queries for OSrCIR's target descriptions
_WHAT = {"image_id": "caption", "query_id": "description"}


def read_store(path: str | Path, repair: bool = False, key: str = "image_id") -> dict[str, dict]:
    """``{id: record}`` of a store (``key``: the records' id field, ``image_id`` for captions,
    ``query_id`` for :mod:`csmcir.osrcir`'s descriptions). A truncated last line (a killed writer)
    is an error, or, with ``repair``, is cut off with a warning. A duplicate id is an error naming
    both lines."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CsmcirError(f"{path}: {_WHAT[key]} store not found") from None
    except OSError as e:
        raise CsmcirError(f"cannot read {path}: {e.strerror}") from None
    end = len(data)
    if data and not data.endswith(b"\n"):
        end = data.rfind(b"\n") + 1  # 0 when the only line is truncated
        if not repair:
            raise CsmcirError(f"{path}: last line is truncated (a killed run?); `csmcir caption` repairs it on resume")
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        warnings.warn(f"{path}: cut off a truncated last line ({len(data) - end} bytes) left by a killed run", stacklevel=2)
    out: dict[str, dict] = {}
    first: dict[str, int] = {}
    for lineno, line in enumerate(data[:end].decode("utf-8", errors="strict").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = _check_record(json.loads(line), path, lineno, key)
        except json.JSONDecodeError as e:
            raise CsmcirError(f"{where(path, lineno)}: invalid JSON ({e.msg})") from None
        i = rec[key]
        if i in first:
            raise CsmcirError(f"{where(path, lineno, i)}: duplicate {key.replace('_', ' ')} (first on line {first[i]})")
        first[i] = lineno
        out[i] = rec
    return out


class CaptionStore:
    """Append-only caption store at ``path``; :meth:`open` repairs and reads what is there.
    ``key="query_id"``: the same store for per-query records (OSrCIR's target descriptions)."""

    def __init__(self, path: str | Path, key: str = "image_id"):
        self.path = Path(path)
        self.key = key
        self.records: dict[str, dict] = {}

    def open(self) -> CaptionStore:
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CsmcirError(f"cannot create folder {parent} for {self.path}: {e.strerror}") from None
        if self.path.exists():
            self.records = read_store(self.path, repair=True, key=self.key)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise CsmcirError(f"cannot write {_WHAT[self.key]} store {self.path}: {e.strerror}") from None
        return self

    def __enter__(self) -> CaptionStore:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None

    def done(self) -> set[str]:
        return set(self.records)

    def append(self, records: Iterable[dict]) -> None:
        """Append records, one ``write`` per line, then fsync. An id already stored is an error."""
        for rec in records:
            i = rec[self.key]
            if i in self.records:
                raise CsmcirError(f"{self.path}: {self.key.replace('_', ' ')} {i!r} is already in the store")
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
            if b"\n" in line[:-1]:
                raise CsmcirError(f"{self.key.replace('_', ' ')} {i!r} cannot be stored (contains a newline)")
            os.write(self._fd, line)
            self.records[i] = rec
        os.fsync(self._fd)


def _content(rec: dict) -> tuple:
    return (rec["levels"], rec["final"], rec["status"], rec.get("model"), rec.get("prompt"))


def merge_stores(out: str | Path, shards: list[str | Path]) -> dict[str, int]:
    """Join shard stores into ``out`` (written atomically). The same id in two shards must carry the
    same record (levels, final, status, model, prompt); a conflict is an error naming both files."""
    merged: dict[str, dict] = {}
    source: dict[str, Path] = {}
    duplicates = 0
    for shard in shards:
        shard = Path(shard)
        for i, rec in read_store(shard).items():
            if i in merged:
                if _content(merged[i]) != _content(rec):
                    raise CsmcirError(f"image {i!r} has different captions in {source[i]} and {shard}: refusing to merge")
                duplicates += 1
                continue
            merged[i], source[i] = rec, shard
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged.values()))
    return {"records": len(merged), "shards": len(shards), "duplicates": duplicates}
