"""Gallery embedding as a Lightning predict run: any number of processes, GPUs or nodes write
shards into one folder, and :func:`merge_shards` reads them back in gallery order.

Lightning does the scaling (``--devices``, ``--num-nodes``, ``--strategy``; ``torchrun`` and SLURM
are detected by Lightning itself): its distributed sampler splits the gallery over the ranks, and
each rank's :class:`ShardWriter` saves every finished batch as
``part-<hash of its ids>.safetensors`` (tensor ``embeddings`` [n, D], metadata ``ids``), written
to a temporary name and renamed. ``store.json`` records the checkpoint (path and digest), split
and dimension. Items are embedded with :meth:`csmcir.inference.Encoder.encode`, the code of the
single-process path, so the merged result equals single-process embedding.

A killed run resumes: items whose ids are already in a part are left out of the next run. The
sampler pads the last rank with repeated items; :func:`merge_shards` keeps one row per id (and
checks that the repeats agree).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from ..errors import CsmcirError

STORE_FILE = "store.json"


class _Pairs(Dataset):
    def __init__(self, dataset, ids: list[str], texts: list[str]):
        self.dataset, self.ids, self.texts = dataset, ids, texts

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"id": self.ids[i], "image": self.dataset.load_image(self.ids[i]), "text": self.texts[i]}


def _collate(items: list[dict]) -> dict:
    return {"ids": [x["id"] for x in items], "images": [x["image"] for x in items], "texts": [x["text"] for x in items]}


class EmbedModule(LightningModule):
    """Wraps an :class:`~csmcir.inference.Encoder` for ``Trainer.predict``."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.model = encoder.model  # registered, so Lightning moves it to the rank's device

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        self.encoder.device = self.device
        return {"ids": batch["ids"], "embeddings": self.encoder.encode(batch["images"], batch["texts"], side="target")}


class ShardWriter(BasePredictionWriter):
    """Saves each predicted batch as one safetensors part (module docstring)."""

    def __init__(self, out: str | Path):
        super().__init__(write_interval="batch")
        self.out = Path(out)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        from safetensors.numpy import save_file

        ids = prediction["ids"]
        name = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]
        path = self.out / f"part-{name}.safetensors"
        tmp = self.out / f".part-{name}.{os.getpid()}.tmp"
        save_file(
            {"embeddings": np.ascontiguousarray(prediction["embeddings"], dtype=np.float32)}, str(tmp), metadata={"ids": json.dumps(ids)}
        )
        os.replace(tmp, path)


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.safetensors"))


def done_ids(folder: str | Path) -> set[str]:
    """Ids already embedded in ``folder`` (read from the parts' metadata, not their tensors)."""
    from safetensors import safe_open

    out: set[str] = set()
    for p in _parts(Path(folder)):
        try:
            with safe_open(str(p), "numpy") as f:
                out.update(json.loads(f.metadata()["ids"]))
        except Exception as e:  # noqa: BLE001 - a damaged part is named, whatever safetensors raised
            raise CsmcirError(
                f"{p} is not a readable embedding part ({type(e).__name__}: {e}); delete it and rerun to redo its items"
            ) from None
    return out


def embed_sharded(
    encoder,
    dataset,
    ids: list[str],
    texts: list[str],
    out: str | Path,
    info: dict,
    batch_size: int = 256,
    accelerator: str = "auto",
    devices="auto",
    num_nodes: int = 1,
    strategy: str = "auto",
    num_workers: int = 2,
    progress: bool = True,
) -> dict:
    """Embed (image ``ids[i]``, ``texts[i]``) pairs into shard parts in ``out`` with ``Trainer.predict``.

    ``info`` (checkpoint, split, ...) is kept in ``store.json``; a folder made for other info is
    refused. Returns counts: ``{"items", "already_done", "embedded"}``.
    """
    from ..io import atomic_write_json, ensure_writable_dir

    folder = ensure_writable_dir(out)
    store = folder / STORE_FILE
    info = {"format": 1, "dim": int(encoder.dim), "count": len(ids), **info}
    if store.is_file():
        old = json.loads(store.read_text())
        if old != info:
            diff = sorted(k for k in set(old) | set(info) if old.get(k) != info.get(k))
            raise CsmcirError(f"{folder} holds embeddings of another run (differs in {', '.join(diff)}): use a new --out folder")
    elif int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == 0:
        atomic_write_json(store, info)
    done = done_ids(folder)
    todo = [i for i, x in enumerate(ids) if x not in done]
    counts = {"items": len(ids), "already_done": len(ids) - len(todo), "embedded": len(todo)}
    if not todo:
        return counts
    loader = DataLoader(
        _Pairs(dataset, [ids[i] for i in todo], [texts[i] for i in todo]),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    trainer = Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[ShardWriter(folder)],
        enable_progress_bar=progress,
    )
    trainer.predict(EmbedModule(encoder), dataloaders=loader, return_predictions=False)
    return counts


def merge_shards(folder: str | Path, ids: list[str], dim: int | None = None) -> np.ndarray:
    """The embeddings of ``ids``, in that order, from the parts in ``folder``; ``[len(ids), D]``.

    Raises :class:`CsmcirError` naming the file or id: a part that cannot be read, a part of another
    dimension, an id embedded twice with different values, or ids no part holds.
    """
    from safetensors import safe_open

    folder = Path(folder)
    store = folder / STORE_FILE
    if not store.is_file():
        raise CsmcirError(f"{store} is missing: not a folder written by `csmcir embed`")
    d = int(json.loads(store.read_text())["dim"]) if dim is None else dim
    pos = {x: j for j, x in enumerate(ids)}
    out = np.zeros((len(ids), d), dtype=np.float32)
    seen = np.zeros(len(ids), dtype=bool)
    for p in _parts(folder):
        try:
            with safe_open(str(p), "numpy") as f:
                part_ids = json.loads(f.metadata()["ids"])
                emb = f.get_tensor("embeddings")
        except Exception as e:  # noqa: BLE001
            raise CsmcirError(f"{p} is not a readable embedding part ({type(e).__name__}: {e})") from None
        if emb.ndim != 2 or emb.shape != (len(part_ids), d):
            raise CsmcirError(f"{p}: embeddings of shape {tuple(emb.shape)} for {len(part_ids)} ids of dimension {d}")
        for row, x in enumerate(part_ids):
            j = pos.get(x)
            if j is None:
                continue  # embedded but not asked for (e.g. another split's parts): ignored
            if seen[j] and not np.allclose(out[j], emb[row], atol=1e-5):
                raise CsmcirError(f"{p}: id {x!r} was embedded twice with different values")
            out[j], seen[j] = emb[row], True
    if not seen.all():
        missing = [ids[j] for j in np.flatnonzero(~seen)]
        raise CsmcirError(f"{folder}: {len(missing)} of {len(ids)} ids have no embedding (first: {missing[0]!r}); rerun `csmcir embed`")
    return out
