"""Compute CIR-CoT teacher embeddings of a split into a store (``csmcir teacher``), resumable."""

from __future__ import annotations

from pathlib import Path

from ..errors import CsmcirError

__all__ = ["embed_teacher"]


def embed_teacher(
    dataset,
    split: str,
    out: str | Path,
    backend: str = "mllm",
    model: str | None = None,
    mode: str = "fast",
    gallery: bool = False,
    layer: int = -1,
    shard: str | tuple[int, int] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    max_new_tokens: int = 128,
    local_files_only: bool = True,
    progress: bool = True,
) -> dict:
    """Embed ``split``'s queries (reference image + modification text), or its gallery images
    with ``gallery``, into the teacher store folder ``out``; a rerun embeds only what is missing.

    ``backend``: ``mllm`` (a transformers image-text-to-text MLLM at ``model``; ``mode`` ``fast``
    puts ``<emb>`` right after the prompt, ``full`` reasons first) or ``oracle`` (the synthetic
    benchmark's reasoning oracle + MiniLM, a labelled stand-in). Returns the run's counts."""
    from tqdm import tqdm

    from ..captioning import parse_shard, select_ids
    from .store import TeacherStore

    shard = parse_shard(shard) if not isinstance(shard, tuple) else shard
    if batch_size < 1:
        raise CsmcirError("--batch-size must be at least 1")
    if gallery:
        items = [(i, i, None) for i in dataset.gallery(split)]
        triplets = {}
    else:
        triplets = {t.id: t for t in dataset.triplets(split)}
        items = [(t.id, t.reference, t.text) for t in triplets.values()]
    items = [items[k] for k in select_ids(list(range(len(items))), shard, limit)]
    kind = "gallery" if gallery else "query"
    if backend == "oracle":
        from .oracle import ORACLE_MODEL_ID

        model_id, mode = ORACLE_MODEL_ID, "oracle"
    elif backend == "mllm":
        if not model:
            raise CsmcirError("--backend mllm needs --model (a local folder or a hub id)")
        model_id, mode = model, "fast" if gallery else mode
    else:
        raise CsmcirError(f"unknown teacher backend {backend!r} (mllm, oracle)")
    store = TeacherStore(out, model=model_id, mode=mode, layer=layer, kind=kind, shard=shard[0])
    todo = [x for x in items if x[0] not in store.done]
    if backend == "oracle":
        from .oracle import OracleTeacher

        enc = OracleTeacher(str(dataset.root))

        def embed(batch):
            if gallery:
                return enc.embed_images([x[0] for x in batch]), None
            return enc.embed_queries([triplets[x[0]] for x in batch])
    else:
        from .extract import TeacherEncoder

        missing = [(i, p) for _, i, _ in todo if not (p := dataset.image_path(i)).is_file()]
        if missing:
            raise CsmcirError(f"{len(missing)} images are missing, first: image {missing[0][0]!r} at {missing[0][1]}: image file not found")
        enc = TeacherEncoder(
            model, device=device, dtype=dtype, layer=layer, max_new_tokens=max_new_tokens, local_files_only=local_files_only
        )

        def embed(batch):
            emb, reasoning = enc.embed([dataset.load_image(i) for _, i, _ in batch], None if gallery else [t for _, _, t in batch], mode)
            return emb, reasoning if mode == "full" else None

    bar = tqdm(total=len(todo), unit="item", desc=f"teacher {kind} ({mode})", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        emb, reasoning = embed(batch)
        store.append([x[0] for x in batch], emb, reasoning)
        bar.update(len(batch))
    bar.close()
    return {
        "out": str(out),
        "kind": kind,
        "mode": mode,
        "model": model_id,
        "dim": enc.dim,
        "layer": layer,
        "selected": len(items),
        "already_done": len(items) - len(todo),
        "embedded": len(todo),
    }
