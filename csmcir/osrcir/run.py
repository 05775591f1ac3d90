"""OSrCIR end to end as library functions: describe every query's target, then rank by the descriptions.

    from csmcir import open_dataset
    from csmcir.osrcir import describe_queries, rank_descriptions, make_retriever
    ds = open_dataset("cirr", "data/cirr")
    describe_queries(ds, "val", "osrcir/cirr-val.jsonl", model="Qwen/Qwen2.5-VL-7B-Instruct")
    ranking = rank_descriptions(ds, "val", "osrcir/cirr-val.jsonl", make_retriever("clip", "openai/clip-vit-large-patch14"))

The description store is the caption store's format keyed by ``query_id`` (one JSON line per
query, the raw answer kept, appended and fsync'ed per batch): a killed run resumes with the
queries it has not described, each described once.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import CsmcirError
from .prompt import OSRCIR, query_prompt

__all__ = ["describe_queries", "read_descriptions", "rank_descriptions"]


def describe_queries(
    dataset,
    split: str,
    out: str | Path,
    backend: str = "mllm",
    model: str | None = None,
    shard: str | tuple[int, int] | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    template=OSRCIR,
    **backend_kw,
) -> dict:
    """Write OSrCIR's target description of every query of ``split`` into the store ``out``.

    ``backend``: ``mllm`` (any transformers image-text-to-text model at ``model``, a folder or hub
    id, as ``csmcir caption`` loads it; keywords ``device``, ``dtype``, ``max_new_tokens``,
    ``local_files_only``, ...) or ``standin`` (the synthetic benchmark's caption-reasoning
    stand-in, :mod:`csmcir.osrcir.standin`). Returns the run's counts."""
    from tqdm.auto import tqdm

    from ..captioning import CaptionStore, parse_shard, select_ids
    from ..captioning.run import answer_record

    if batch_size < 1:
        raise CsmcirError("--batch-size must be at least 1")
    shard = parse_shard(shard) if not isinstance(shard, tuple) else shard
    dataset.validate(split)
    triplets = dataset.triplets(split)
    triplets = [triplets[k] for k in select_ids(list(range(len(triplets))), shard, limit)]
    with CaptionStore(out, key="query_id") as store:  # opened (and repaired) before a model loads
        for i, rec in store.records.items():
            if rec.get("prompt") != template.id:
                raise CsmcirError(
                    f"{out}: query {i!r} was described with prompt {rec.get('prompt')}, this run uses {template.id}; write to another file"
                )
        todo = [t for t in triplets if t.id not in store.records]
        if backend == "standin":
            from .standin import StandinReasoner

            engine = StandinReasoner(dataset, template)
        elif backend == "mllm":
            from ..captioning.backends import TransformersBackend

            if not model:
                raise CsmcirError("--backend mllm needs --model (a local folder or a hub id)")
            missing = [(t.id, t.reference, p) for t in todo if not (p := dataset.image_path(t.reference)).is_file()]
            if missing:
                q, ref, p = missing[0]
                raise CsmcirError(f"{len(missing)} reference images are missing, first: image {ref!r} of query {q!r} at {p}")
            engine = TransformersBackend(model, **backend_kw)
        else:
            raise CsmcirError(f"unknown OSrCIR backend {backend!r} (mllm, standin)")
        counts = {"selected": len(triplets), "already_done": len(triplets) - len(todo), "described": 0}
        counts.update(ok=0, partial=0, unparsed=0, empty=0)
        t0 = time.perf_counter()
        with tqdm(total=len(todo), unit="query", desc=f"OSrCIR {split}", disable=not progress) as bar:
            for s in range(0, len(todo), batch_size):
                batch = todo[s : s + batch_size]
                if backend == "standin":
                    answers = [engine.answer(t) for t in batch]
                else:
                    answers = engine.generate(
                        [t.id for t in batch],
                        [dataset.load_image(t.reference) for t in batch],
                        [query_prompt(t.text, template) for t in batch],
                    )
                records = [answer_record("query_id", t.id, raw, template, engine) for t, raw in zip(batch, answers)]
                for r in records:
                    counts[r["status"]] += 1
                store.append(records)
                counts["described"] += len(batch)
                bar.update(len(batch))
        seconds = time.perf_counter() - t0
    counts["seconds"] = round(seconds, 2)
    counts["queries_per_s"] = round(counts["described"] / seconds, 3) if counts["described"] and seconds > 0 else 0.0
    return {"out": str(out), "model": engine.model_id, "prompt": template.id, "shard": f"{shard[0]}/{shard[1]}", **counts}


def read_descriptions(path: str | Path) -> dict[str, dict]:
    """``{query id: record}`` of a description store (a truncated last line is an error)."""
    from ..captioning.store import read_store

    return read_store(path, key="query_id")


def rank_descriptions(
    dataset, split: str, descriptions: str | Path, retriever, k: int | None = 50, gallery_cache=None, progress: bool = True
):
    """Rank ``split`` by each query's target description (``final`` of its record) against the
    gallery through ``retriever`` (:func:`~csmcir.osrcir.retrieve.make_retriever`), under the
    dataset's protocol. Every query must have a description; ``gallery_cache``: a folder keeping
    a CLIP retriever's image embeddings between runs."""
    from ..retrieval.ranking import rank_embeddings

    dataset.validate(split)
    records = read_descriptions(descriptions)
    triplets = dataset.triplets(split)
    missing = [t.id for t in triplets if t.id not in records]
    if missing:
        raise CsmcirError(
            f"{descriptions} has no description for {len(missing)} of {len(triplets)} queries of split {split!r}, first "
            f"{missing[0]!r}: run `csmcir osrcir describe` on that split (it resumes)"
        )
    gallery = dataset.gallery(split)
    q = retriever.encode_texts([records[t.id]["final"] for t in triplets])
    g = retriever.encode_gallery(dataset, gallery, cache=gallery_cache, progress=progress)
    return rank_embeddings(dataset, split, triplets, gallery, q, g, k)
