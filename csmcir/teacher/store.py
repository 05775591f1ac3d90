"""The teacher-embedding store: a folder of safetensors parts plus the reasoning text.

Layout of ``DIR``::

    store.json                        {"model", "mode", "dim", "layer", "kind", "format": 1}
    part-<shard>-<k>.safetensors ...  tensor "embeddings" [n, dim] (float32 or float16); metadata "ids" (JSON list)
    reasoning.<shard>.jsonl           {"id", "text"} per embedded item (full mode: the generated reasoning)

Shards of one run (``--shard i/n``) write into the same folder side by side (their part names
differ), so there is nothing to merge.

Each part is written to a temporary name and renamed, so a killed run leaves whole parts only;
the next run reads their ids and skips them. :func:`read_teacher_store` joins the parts and checks
them (one dimension and dtype, no duplicate ids). Embeddings computed elsewhere come in through
:func:`import_embeddings` (safetensors with an ``embeddings`` tensor and ``ids`` metadata, or an
``.npy`` array with an ids text file, one id a line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import CsmcirError
from ..io import atomic_write_json, ensure_writable_dir, read_json

__all__ = ["TeacherStore", "read_teacher_store", "read_reasoning", "import_embeddings"]

FORMAT = 1


class TeacherStore:
    """Append-only writer (and resumer) of a teacher store folder."""

    def __init__(
        self, path: str | Path, model: str, mode: str, dim: int | None = None, layer: int = -1, kind: str = "query", shard: int = 0
    ):
        self.path = ensure_writable_dir(path)
        self.shard = shard
        self.header = {"format": FORMAT, "model": model, "mode": mode, "dim": dim, "layer": layer, "kind": kind}
        info = self.path / "store.json"
        if info.is_file():
            old = read_json(info, "teacher store.json")
            for key in ("model", "mode", "layer", "kind"):
                if old.get(key) != self.header[key]:
                    raise CsmcirError(
                        f"{info}: this store holds {key}={old.get(key)!r}, the run asks for {self.header[key]!r}; write to another folder"
                    )
            self.header["dim"] = old.get("dim") if dim is None else dim
            if old.get("dim") not in (None, self.header["dim"]):
                raise CsmcirError(f"{info}: this store holds {old.get('dim')}-d embeddings, the run makes {dim}-d ones")
        atomic_write_json(info, self.header)
        self.done: set[str] = set()
        for p in sorted(self.path.glob("part-*.safetensors")):
            self.done.update(_part_ids(p))
        self.parts = sorted(self.path.glob(f"part-{shard:03d}-*.safetensors"))
        for tmp in self.path.glob(f".part-{shard:03d}-*.tmp"):
            tmp.unlink()  # a part a killed run did not finish

    def append(self, ids: list[str], emb: np.ndarray, texts: list[str] | None = None) -> None:
        from safetensors.numpy import save_file

        emb = np.ascontiguousarray(emb)
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise CsmcirError(f"teacher embeddings of shape {emb.shape} for {len(ids)} ids")
        if self.header["dim"] is None:
            self.header["dim"] = int(emb.shape[1])
            atomic_write_json(self.path / "store.json", self.header)
        if emb.shape[1] != self.header["dim"]:
            raise CsmcirError(f"{self.path}: {emb.shape[1]}-d embeddings for a {self.header['dim']}-d store")
        again = [i for i in ids if i in self.done]
        if again:
            raise CsmcirError(f"{self.path}: id {again[0]!r} is already embedded")
        if texts is not None:  # reasoning first: a part on disk always has its text
            with open(self.path / f"reasoning.{self.shard:03d}.jsonl", "a", encoding="utf-8") as f:
                f.write("".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in zip(ids, texts)))
                f.flush()
                os.fsync(f.fileno())
        n = len(self.parts)
        final = self.path / f"part-{self.shard:03d}-{n:05d}.safetensors"
        tmp = self.path / f".part-{self.shard:03d}-{n:05d}.tmp"
        save_file({"embeddings": emb}, str(tmp), metadata={"ids": json.dumps(list(ids))})
        os.replace(tmp, final)
        self.parts.append(final)
        self.done.update(ids)


def _part_ids(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CsmcirError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    try:
        ids = json.loads(meta["ids"])
        assert isinstance(ids, list) and all(isinstance(i, str) for i in ids)
    except (KeyError, ValueError, AssertionError):
        raise CsmcirError(f"{path}: no 'ids' metadata (a JSON list of strings)") from None
    return ids


def read_teacher_store(path: str | Path, expect_dim: int | None = None) -> tuple[dict, list[str], np.ndarray]:
    """``(header, ids, embeddings [N, dim])`` of a store folder; errors name the file and the id."""
    from safetensors.numpy import load_file

    path = Path(path)
    header = read_json(path / "store.json", "teacher store.json")
    ids: list[str] = []
    chunks = []
    where: dict[str, Path] = {}
    dtype = None
    for part in sorted(path.glob("part-*.safetensors")):
        pids = _part_ids(part)
        emb = load_file(str(part)).get("embeddings")
        if emb is None or emb.ndim != 2 or emb.shape[0] != len(pids):
            raise CsmcirError(f"{part}: tensor 'embeddings' missing or not [{len(pids)}, dim]")
        if emb.shape[1] != header.get("dim"):
            raise CsmcirError(f"{part}: {emb.shape[1]}-d embeddings in a store of dim {header.get('dim')}")
        if dtype is not None and emb.dtype != dtype:
            raise CsmcirError(f"{part}: dtype {emb.dtype} differs from the store's {dtype}")
        dtype = emb.dtype
        for i in pids:
            if i in where:
                raise CsmcirError(f"{part}: id {i!r} is also in {where[i]}")
            where[i] = part
        ids += pids
        chunks.append(emb)
    if expect_dim is not None and header.get("dim") != expect_dim:
        raise CsmcirError(f"{path}: teacher embeddings are {header.get('dim')}-d, expected {expect_dim}-d")
    emb = np.concatenate(chunks) if chunks else np.zeros((0, header.get("dim") or 0), np.float32)
    return header, ids, emb


def read_reasoning(path: str | Path) -> dict[str, str]:
    """``{id: reasoning text}`` from every ``reasoning.*.jsonl`` of a store (a truncated last line is skipped)."""
    out: dict[str, str] = {}
    for f in sorted(Path(path).glob("reasoning.*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                out[str(rec["id"])] = str(rec["text"])
            except (ValueError, KeyError, TypeError):
                continue
    return out


def import_embeddings(
    out: str | Path, embeddings: str | Path, ids_file: str | Path | None, model: str, mode: str = "imported", kind: str = "query"
) -> int:
    """Copy embeddings computed elsewhere into a store folder (one part); returns their number."""
    src = Path(embeddings)
    if not src.is_file():
        raise CsmcirError(f"{src}: embeddings file not found")
    if src.suffix == ".npy":
        if ids_file is None:
            raise CsmcirError("an .npy import needs --ids (a text file, one id a line)")
        emb = np.load(src, allow_pickle=False)
        ids = [x for x in Path(ids_file).read_text(encoding="utf-8").splitlines() if x.strip()]
    elif src.suffix == ".safetensors":
        from safetensors.numpy import load_file

        ids = _part_ids(src)
        emb = load_file(str(src)).get("embeddings")
        if emb is None:
            raise CsmcirError(f"{src}: no tensor named 'embeddings'")
    else:
        raise CsmcirError(f"{src}: expected a .safetensors or .npy file")
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise CsmcirError(f"{src}: {emb.shape[0] if emb.ndim else 0} embeddings for {len(ids)} ids (need a [N, dim] array)")
    if emb.dtype not in (np.float32, np.float16):
        raise CsmcirError(f"{src}: dtype {emb.dtype}; expected float32 or float16")
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise CsmcirError(f"{src}: duplicate id {i!r}")
        seen.add(i)
    store = TeacherStore(out, model=model, mode=mode, dim=int(emb.shape[1]), layer=-1, kind=kind)
    store.append(ids, emb)
    return len(ids)
