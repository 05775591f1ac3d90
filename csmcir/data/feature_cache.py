"""A frozen vision tower's image features, computed once and memory-mapped: cheap training.

With the vision tower frozen (BLIP-2's recipe: a frozen EVA ViT-g, a trained Q-Former), every
epoch would re-encode the same images to the same features. The cache encodes each image once into
a float16 memory-mapped file and training reads features instead of pixels; the Q-Former and
everything after it are unchanged (``CIRDualTower.encode_image`` passes features through).

Layout, keyed by tower and image id::

    <folder>/<tower key>/tower.json                      vision config + weights digest
    <folder>/<tower key>/<split>-<digest>.f16        float16 [N, tokens, width], row i = image ids[i]
    <folder>/<tower key>/<split>-<digest>.ids.txt    the image ids, one a line
    <folder>/<tower key>/<split>-<digest>.done.npy   bool [N]: rows written

The tower key is a digest of the vision config and its weights, so another tower (or the same
tower with other weights) never reads these features. The file digest covers the image ids and,
when the caller passes one, a digest of the pixels (:func:`pixel_digest`): two data sets whose
splits happen to use the same ids (two seeds of a generated benchmark, say) never share rows. Rows are flushed and ``done`` rewritten
(atomically) after every batch: a killed run resumes with the rows it has not written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import CsmcirError
from ..io import ensure_writable_dir

__all__ = [
    "tower_key",
    "pixel_digest",
    "CachedFeatures",
    "FeatureCache",
    "CACHE_BATCH_SIZE",
    "encode_in_chunks",
    "AUTO_FOLDER",
    "resolve_cache_folder",
]

# images a batch when filling the cache: on the 2-core CPU the frozen EfficientNet-Lite0 (112 px,
# mbconv5, folded BatchNorm) fills 306-344 images/s in batches of 16, 236-355 in 32 and 177-253 in
# 64 over three timings (the working set outgrows the CPU caches; docs/efficientnet.md,
# tools/bench_lite0_encode.py): 16 is the fastest and the steadiest, so the fill does not use the
# evaluation batch size
CACHE_BATCH_SIZE = 16


def encode_in_chunks(
    encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, batch_size: int = CACHE_BATCH_SIZE
) -> torch.Tensor:
    """``encode`` (a frozen tower's ``inference_copy()``) over ``pixels`` in chunks of the cache's
    fill batch: the same features as one big batch, several times faster on a CPU (see above)."""
    return torch.cat([encode(pixels[s : s + batch_size]) for s in range(0, len(pixels), batch_size)])


# model.feature_cache "auto": this folder when the vision tower is frozen, no cache when it trains
AUTO_FOLDER = "cache/features"


def resolve_cache_folder(value: str | None, frozen: bool) -> str | None:
    """The cache folder ``model.feature_cache`` means: ``auto`` -> :data:`AUTO_FOLDER` for a frozen
    tower and ``None`` (pixels every step) for a trained one; ``null`` -> ``None``; else the folder."""
    if value == "auto":
        return AUTO_FOLDER if frozen else None
    return value or None


# VisionConfig fields that act after the frozen tower (on its cached features), not on what it outputs
_AFTER_THE_TOWER = ("grid_adapter",)


def tower_key(vision: torch.nn.Module, config: dict) -> str:
    """A digest of the vision tower's config and weights (16 hex digits). Fields that act on the
    features after the tower (``grid_adapter``) are left out: they do not change what is cached."""
    config = {k: v for k, v in config.items() if k not in _AFTER_THE_TOWER}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(vision.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureCache:
    """Float16 image features of one tower, one file per (split, image list)."""

    def __init__(self, folder: str | Path, key: str, config: dict):
        self.dir = ensure_writable_dir(Path(folder) / key)
        meta = self.dir / "tower.json"
        info = {"key": key, "vision": config}
        if not meta.is_file():
            tmp = meta.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(info, indent=1, default=str) + "\n")
            os.replace(tmp, meta)

    def _paths(self, split: str, ids: list[str], content: str | None = None) -> tuple[Path, Path, Path]:
        h = hashlib.sha256("\n".join(ids).encode())
        if content is not None:
            h.update(b"\0" + content.encode())
        digest = h.hexdigest()[:12]
        stem = self.dir / f"{split}-{digest}"
        return Path(f"{stem}.f16"), Path(f"{stem}.ids.txt"), Path(f"{stem}.done.npy")

    def features(
        self,
        split: str,
        ids: list[str],
        shape: tuple[int, int],
        load: Callable[[list[int]], torch.Tensor],
        encode: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int = CACHE_BATCH_SIZE,
        progress: bool = True,
        write: bool = True,
        content: str | None = None,
    ) -> torch.Tensor:
        """``[len(ids), tokens, width]`` float16 features, memory-mapped, computing missing rows.

        ``load(rows)`` gives the pixels of those rows; ``encode(pixels)`` the tower's features.
        ``write=False`` only opens a complete cache (other DDP ranks, after rank 0 wrote it).
        ``content`` (e.g. :func:`pixel_digest` of the pixels) keys the rows to the images, not
        only to their ids.
        """
        data, id_file, done_file = self._paths(split, ids, content)
        n, (tokens, width) = len(ids), shape
        if not id_file.is_file():
            tmp = id_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text("".join(f"{i}\n" for i in ids))
            os.replace(tmp, id_file)
        expected = n * tokens * width * 2
        if data.is_file() and data.stat().st_size != expected:
            raise CsmcirError(
                f"{data} holds {data.stat().st_size} bytes, expected {expected} for {n} images of "
                f"{tokens}x{width} features: delete it to rebuild the cache"
            )
        if not write:
            if not data.is_file() or not done_file.is_file() or not np.load(done_file).all():
                raise CsmcirError(f"feature cache {data} is incomplete")
            return _open(data, n, tokens, width)
        mm = np.memmap(data, dtype=np.float16, mode="r+" if data.is_file() else "w+", shape=(n, tokens, width))
        done = np.load(done_file) if done_file.is_file() else np.zeros(n, dtype=bool)
        if done.shape != (n,):
            raise CsmcirError(f"{done_file} does not match {id_file}: delete both to rebuild the cache")
        todo = np.flatnonzero(~done)
        with tqdm(
            total=n,
            initial=n - len(todo),
            desc=f"feature cache ({split})",
            unit="img",
            disable=not progress or not len(todo),
            mininterval=1.0,
        ) as bar:
            for s in range(0, len(todo), batch_size):
                rows = todo[s : s + batch_size].tolist()
                with torch.no_grad():
                    f = encode(load(rows))
                if tuple(f.shape[1:]) != (tokens, width):
                    raise CsmcirError(f"the vision tower gave features of shape {tuple(f.shape[1:])}, the cache expects {(tokens, width)}")
                mm[rows] = f.to("cpu", torch.float16).numpy()
                mm.flush()
                done[rows] = True
                tmp = done_file.with_name(f".{done_file.name}.{os.getpid()}.tmp.npy")
                np.save(tmp, done)
                os.replace(tmp, done_file)
                bar.update(len(rows))
        del mm
        return _open(data, n, tokens, width)


def pixel_digest(images: torch.Tensor) -> str:
    """SHA-256 (16 hex digits) of a uint8 pixel tensor's bytes: what the cached features are of.

    About a second per 2 GB of pixels (the synthetic default's splits); it keeps another data set
    with the same image ids from reading this one's features.
    """
    t = images.detach().to("cpu").contiguous()
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(memoryview(t.view(torch.uint8).numpy().reshape(-1)) if t.dtype == torch.uint8 else t.numpy().tobytes())
    return h.hexdigest()[:16]


def _open(data: Path, n: int, tokens: int, width: int) -> torch.Tensor:
    # copy-on-write: torch wants a writable array; nothing is ever written back to the file
    return torch.from_numpy(np.memmap(data, dtype=np.float16, mode="c", shape=(n, tokens, width)))


class CachedFeatures:
    """Read-only lookup of every image already in a tower's cache folder, by image id, for the
    inference commands (``rank``, ``index``, ``submit``, ``report``, ``search``): a split the
    fit cached is not re-encoded by the ViT. Only rows marked done are used.

    Args:
        folder: ``<feature_cache>/<tower key>`` (the folder :class:`FeatureCache` writes).
    """

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        self._where: dict[str, tuple[Path, int]] = {}
        self._shape: dict[Path, tuple[int, int, int]] = {}
        self._open: dict[Path, np.ndarray] = {}
        for id_file in sorted(self.dir.glob("*.ids.txt")):
            stem = str(id_file)[: -len(".ids.txt")]
            data, done_file = Path(stem + ".f16"), Path(stem + ".done.npy")
            if not data.is_file() or not done_file.is_file():
                continue
            ids = id_file.read_text().split("\n")[:-1]
            done = np.load(done_file)
            if done.shape != (len(ids),) or not len(ids):
                continue
            per_row = data.stat().st_size // 2 // len(ids)
            self._shape[data] = (len(ids), per_row)
            for row, (image_id, ok) in enumerate(zip(ids, done)):
                if ok and image_id not in self._where:
                    self._where[image_id] = (data, row)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._where

    def get(self, image_ids: list[str], shape: tuple[int, int]) -> torch.Tensor:
        """``[len(image_ids), tokens, width]`` float16 features of cached ids (all must be)."""
        tokens, width = shape
        out = np.empty((len(image_ids), tokens, width), dtype=np.float16)
        for k, image_id in enumerate(image_ids):
            data, row = self._where[image_id]
            n, per_row = self._shape[data]
            if per_row != tokens * width:
                raise CsmcirError(f"{data} holds features of {per_row} values per image, the tower makes {tokens}x{width}")
            if data not in self._open:
                self._open[data] = np.memmap(data, dtype=np.float16, mode="r", shape=(n, tokens, width))
            out[k] = self._open[data][row]
        return torch.from_numpy(out)
