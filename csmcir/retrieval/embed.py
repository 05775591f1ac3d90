"""Streamed, resumable embedding of galleries and queries with a trained :class:`Encoder`.

Images are decoded batch by batch (memory stays bounded) and, for long runs, finished batches
are saved every ``save_every`` batches to ``<partial>``: a killed run restarts where it stopped,
provided the checkpoint and the id list are the same (both are recorded in the partial file).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.store import caption_text
from ..errors import CsmcirError


def gallery_texts(encoder, dataset, image_ids: list[str], missing_caption: str = "error") -> list[str]:
    """Target-side text of each gallery image, as the checkpoint was trained (caption or none)."""
    if encoder.text.target_text == "none":
        return [""] * len(image_ids)
    captions = dataset.captions()
    levels = encoder.text.caption_levels
    out = []
    for image_id in image_ids:
        cap = captions.get(image_id)
        if cap is None:
            if missing_caption == "error":
                raise CsmcirError(f"image {image_id!r} has no caption in {dataset.captions_file}")
            out.append("")
        else:
            out.append(caption_text(cap, levels))
    return out


def embed_pairs(
    encoder,
    dataset,
    image_ids: list[str],
    texts: list[str],
    batch_size: int = 256,
    desc: str = "embedding",
    partial: str | Path | None = None,
    save_every: int = 20,
    progress: bool = True,
    side: str | None = None,
) -> np.ndarray:
    """Embed (image, text) pairs; ``[N, D]`` float32. Resumes from ``partial`` if it matches.
    ``side``: ``"query"`` or ``"target"`` (:meth:`csmcir.inference.Encoder.encode`)."""
    n = len(image_ids)
    out = np.zeros((n, encoder.dim), dtype=np.float32)
    key = _run_key(encoder.checkpoint, image_ids, texts)
    done = 0
    if partial is not None and Path(partial).is_file():
        with np.load(partial, allow_pickle=False) as z:
            if str(z["key"]) == key and z["emb"].shape == out.shape:
                done = int(z["done"])
                out[:done] = z["emb"][:done]
    with (
        tqdm(total=n, initial=done, desc=desc, unit="img", disable=not progress, mininterval=1.0) as bar,
        ThreadPoolExecutor(max_workers=4) as pool,
    ):
        for b, start in enumerate(range(done, n, batch_size)):
            ids = image_ids[start : start + batch_size]
            if getattr(encoder, "features", None) is not None:  # the fit's cached features, by image id
                out[start : start + len(ids)] = encoder.encode_ids(ids, texts[start : start + len(ids)], dataset.load_image, side=side)
            else:
                images = list(pool.map(dataset.load_image, ids))
                out[start : start + len(ids)] = encoder.encode(images, texts[start : start + len(ids)], side=side)
            bar.update(len(ids))
            if partial is not None and (b + 1) % save_every == 0:
                _save_partial(partial, key, out, start + len(ids))
    return out


def _run_key(checkpoint: str, image_ids: list[str], texts: list[str]) -> str:
    """What a partial result must match to be reused (str hash() is salted per process)."""
    h = hashlib.sha256(checkpoint.encode())
    for image_id, text in zip(image_ids, texts):
        h.update(image_id.encode() + b"\0" + text.encode() + b"\1")
    return f"{len(image_ids)}:{h.hexdigest()}"


def _save_partial(path, key: str, emb: np.ndarray, done: int) -> None:
    tmp = Path(str(path) + ".tmp.npz")
    np.savez(tmp, key=np.array(key), emb=emb, done=np.array(done))
    os.replace(tmp, path)
