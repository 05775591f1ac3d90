"""Ranking with a trained checkpoint, as library functions: embed a gallery, rank a split, score
it, build an index, search it. The CLI's ``rank``, ``index``, ``search``, ``submit`` and
``report`` are thin adapters over these; a notebook calls them the same way.

    from csmcir import Encoder, open_dataset, rank_split, score_rankings
    enc = Encoder.from_checkpoint("checkpoints/synthetic/last.ckpt")
    ds = open_dataset("synthetic", "data/synthetic")
    ranking = rank_split(enc, ds, "test", k=50)
    print(score_rankings(ds, "test", ranking))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CsmcirError
from .embed import embed_pairs, gallery_texts
from .metrics import recall_at_k, reference_positions, topk_rankings

__all__ = [
    "Ranking",
    "build_index",
    "write_submission",
    "embed_gallery",
    "embed_queries",
    "rank_split",
    "rank_embeddings",
    "rank_teacher",
    "score_rankings",
    "search",
]


@dataclass
class Ranking:
    """The top-k gallery of every query of a split.

    Attributes:
        triplets: the queries (:class:`~csmcir.data.custom.Triplet`), in split order.
        gallery: the split's gallery ids; ``positions[i]`` index into it.
        positions: ``[Q, k']`` gallery positions, best first (the reference left out where the
            protocol removes it).
        scores: ``[Q, k']`` their cosine scores.
        reference_removed: whether each query's reference was left out.
        subset_tail: CIRR only: each query's image-set members ranked below the top k.
    """

    triplets: list
    gallery: list[str]
    positions: torch.Tensor
    scores: torch.Tensor
    reference_removed: bool
    # CIRR: per query, its image-set members ranked below the top k, in ranked order
    subset_tail: list[list[int]] | None = None

    def as_dict(self) -> dict[str, list[str]]:
        """``{query id: [gallery ids, best first]}``: the rankings-file format of ``csmcir rank``.
        On CIRR each list is the top k followed by the query's image-set members ranked below
        it, in ranked order: Recall@K (K <= k) and Recall_subset then score exactly as on the
        whole ranking."""
        tails = self.subset_tail or [[] for _ in self.triplets]
        return {t.id: [self.gallery[j] for j in row + tail] for t, row, tail in zip(self.triplets, self.positions.tolist(), tails)}

    def hits(self, i: int) -> list[tuple[str, float]]:
        """``(gallery id, score)`` of query ``i``'s ranked hits."""
        return [(self.gallery[j], s) for j, s in zip(self.positions[i].tolist(), self.scores[i].tolist())]

    @property
    def depth(self) -> int:
        return int(self.positions.shape[1])


def embed_gallery(
    encoder, dataset, split: str, batch_size: int = 256, progress: bool = True, partial=None, missing_caption: str = "error"
) -> tuple[list[str], np.ndarray]:
    """``(gallery ids, [G, D] float32 embeddings)`` of ``split``: each gallery image with its
    caption (or no text, as the checkpoint was trained). ``partial``: a file that makes a killed
    run resume (:func:`~csmcir.retrieval.embed.embed_pairs`)."""
    ids = dataset.gallery(split)
    texts = gallery_texts(encoder, dataset, ids, missing_caption=missing_caption)
    return ids, embed_pairs(
        encoder, dataset, ids, texts, batch_size, desc=f"embedding {split} gallery", partial=partial, progress=progress, side="target"
    )


def embed_queries(
    encoder, dataset, triplets: list, batch_size: int = 256, progress: bool = True, desc: str = "embedding queries"
) -> np.ndarray:
    """``[Q, D]`` float32 embeddings of (reference image, modification text) of ``triplets``."""
    return embed_pairs(
        encoder,
        dataset,
        [t.reference for t in triplets],
        [t.text for t in triplets],
        batch_size,
        desc=desc,
        progress=progress,
        side="query",
    )


def rank_split(
    encoder,
    dataset,
    split: str,
    k: int = 50,
    batch_size: int = 256,
    limit: int | None = None,
    missing_caption: str = "error",
    progress: bool = True,
) -> Ranking:
    """Embed ``split`` of ``dataset`` (gallery and queries) with ``encoder`` and keep each query's
    top ``k`` (``k=None``: the whole gallery), the reference excluded where the dataset's
    protocol removes it. ``limit``: only the first N queries."""
    if k is not None and k < 1:
        raise CsmcirError(f"k must be at least 1, got {k}")
    dataset.validate(split)
    triplets = dataset.triplets(split)[:limit]
    gallery, g = embed_gallery(encoder, dataset, split, batch_size, progress, missing_caption=missing_caption)
    q = embed_queries(encoder, dataset, triplets, batch_size, progress, desc=f"embedding {split} queries")
    return rank_embeddings(dataset, split, triplets, gallery, q, g, k)


def rank_embeddings(dataset, split: str, triplets: list, gallery: list[str], queries, gallery_emb, k: int | None = 50) -> Ranking:
    """The :class:`Ranking` of ``triplets`` by cosine of ``queries`` ``[Q, D]`` (row i = triplet i)
    against ``gallery_emb`` ``[G, D]`` (row j = ``gallery[j]``), under the dataset's protocol (the
    reference left out where it removes it; CIRR's image sets kept). Any retriever that embeds
    both sides into one space ranks through here: the student, a CIR-CoT teacher's ``<emb>``
    stores (:func:`rank_teacher`), OSrCIR's descriptions (:mod:`csmcir.osrcir`). Rows are
    L2-normalised here."""
    if k is not None and k < 1:
        raise CsmcirError(f"k must be at least 1, got {k}")
    q = torch.nn.functional.normalize(torch.as_tensor(np.asarray(queries, dtype=np.float32)), dim=1)
    g = torch.nn.functional.normalize(torch.as_tensor(np.asarray(gallery_emb, dtype=np.float32)), dim=1)
    if q.shape[0] != len(triplets) or g.shape[0] != len(gallery) or q.shape[1] != g.shape[1]:
        raise CsmcirError(
            f"{q.shape[0]} query embeddings for {len(triplets)} queries and {g.shape[0]} gallery embeddings for "
            f"{len(gallery)} images; both sides must have one dimension ({q.shape[1]} vs {g.shape[1]})"
        )
    removed = bool(dataset.remove_reference)
    exclude = reference_positions([t.reference for t in triplets], gallery) if removed else None
    sets = _image_sets(dataset, split, triplets, gallery)
    depth = len(gallery) if k is None or sets is not None else k
    idx, scores = topk_rankings(q, g, depth, exclude=exclude)
    extra = None
    if sets is not None and k is not None and k < idx.shape[1]:
        # CIRR's Recall_subset ranks the image set within the full ranking: keep the members
        # below the top k, in ranked order, so the file scores exactly as a full ranking would
        extra = [[j for j in row[k:] if j in members] for row, members in zip(idx.tolist(), sets)]
        idx, scores = idx[:, :k], scores[:, :k]
    return Ranking(triplets, gallery, idx, scores, removed, extra)


def rank_teacher(
    dataset, split: str, query_store: str | Path, gallery_store: str | Path, k: int | None = 50, limit: int | None = None
) -> Ranking:
    """CIR-CoT as a retriever: rank ``split`` by its teacher's ``<emb>`` embeddings, the query
    store (``csmcir teacher``) against the gallery store (``csmcir teacher --gallery``), through
    the same protocol as the student (:func:`rank_embeddings`).

    The two stores must come from one teacher: the same model, layer and dimension, a query store
    and a gallery store, the gallery's mode ``fast`` (or both ``oracle`` / both ``imported``); every
    query and gallery image of the split must be in them. Otherwise a one-line error names the
    store, the field and the fix."""
    from ..teacher.store import read_teacher_store

    dataset.validate(split)
    qh, qids, qemb = read_teacher_store(query_store)
    gh, gids, gemb = read_teacher_store(gallery_store)
    check_teacher_pair(qh, gh, query_store, gallery_store)
    triplets = dataset.triplets(split)[:limit]
    gallery = dataset.gallery(split)
    qrow = _rows(qids, [t.id for t in triplets], query_store, "query", split, "csmcir teacher")
    grow = _rows(gids, gallery, gallery_store, "gallery image", split, "csmcir teacher --gallery")
    return rank_embeddings(dataset, split, triplets, gallery, qemb[qrow], gemb[grow], k)


def check_teacher_pair(qh: dict, gh: dict, query_store, gallery_store) -> None:
    """Refuse a query store and a gallery store that are not one teacher's two sides."""
    if qh.get("kind") != "query":
        raise CsmcirError(
            f"{query_store} is a {qh.get('kind')} store; pass the query store (written by `csmcir teacher` without --gallery)"
        )
    if gh.get("kind") != "gallery":
        raise CsmcirError(f"{gallery_store} is a {gh.get('kind')} store; pass the gallery store (written by `csmcir teacher --gallery`)")
    for key in ("model", "layer", "dim"):
        if qh.get(key) != gh.get(key):
            raise CsmcirError(
                f"the teacher stores differ in {key}: {query_store} has {qh.get(key)!r}, {gallery_store} has "
                f"{gh.get(key)!r}; embed both sides with one teacher"
            )
    special = {"oracle", "imported"}
    if (qh.get("mode") in special or gh.get("mode") in special) and qh.get("mode") != gh.get("mode"):
        raise CsmcirError(f"the teacher stores differ in mode: {query_store} is {qh.get('mode')!r}, {gallery_store} is {gh.get('mode')!r}")
    if qh.get("mode") not in special and gh.get("mode") != "fast":
        raise CsmcirError(f"{gallery_store} has mode {gh.get('mode')!r}; a gallery is embedded in fast mode")


def _rows(ids: list[str], want: list[str], store, what: str, split: str, fix: str) -> np.ndarray:
    pos = {i: r for r, i in enumerate(ids)}
    missing = [i for i in want if i not in pos]
    if missing:
        raise CsmcirError(
            f"{store} has no embedding for {len(missing)} {what}s of split {split!r}, first {missing[0]!r}: run `{fix}` on that split (it resumes)"
        )
    return np.array([pos[i] for i in want], dtype=np.int64)


def _image_sets(dataset, split: str, triplets: list, gallery: list[str]) -> list[set[int]] | None:
    """Each query's image-set members as gallery positions (CIRR), else ``None``."""
    if not hasattr(dataset, "split"):
        return None
    queries = {q.id: q for q in dataset.split(split).queries}
    if not any(queries[t.id].members for t in triplets if t.id in queries):
        return None
    pos = {gid: j for j, gid in enumerate(gallery)}
    return [{pos[m] for m in (queries[t.id].members or []) if m in pos} for t in triplets]


def score_rankings(dataset, split: str, ranking: Ranking | dict, source: str = "rankings") -> dict[str, float]:
    """The split's metrics for ``ranking`` (a :class:`Ranking` or ``{query id: [ids]}``): a real
    benchmark's official protocol (:func:`~csmcir.retrieval.protocols.score_split`), otherwise
    Recall@1/5/10/50 (those within the ranking's depth) over the split's queries. ``{}`` when the
    split has no public answers."""
    rankings = ranking.as_dict() if isinstance(ranking, Ranking) else ranking
    if hasattr(dataset, "split"):  # a real benchmark
        from .protocols import score_split

        bsplit = dataset.split(split)
        return score_split(bsplit, rankings, source=source) if bsplit.has_targets else {}
    triplets = ranking.triplets if isinstance(ranking, Ranking) else [t for t in dataset.triplets(split) if t.id in rankings]
    if not triplets or not all(t.targets for t in triplets):
        return {}
    depth = min(len(rankings[t.id]) for t in triplets)
    ks = tuple(k for k in (1, 5, 10, 50) if k <= depth) or (1,)
    return recall_at_k([rankings[t.id] for t in triplets], [set(t.targets) for t in triplets], ks=ks, num_candidates=depth)


def build_index(
    encoder,
    dataset,
    split: str,
    out: str | Path,
    kind: str = "flat",
    batch_size: int = 256,
    nprobe: int | None = None,
    embeddings: str | Path | None = None,
    dataset_name: str | None = None,
    progress: bool = True,
):
    """Embed ``split``'s gallery (or merge the shards of ``csmcir embed`` in ``embeddings``) into a
    faiss index saved in ``out`` with its ids, info and the gallery captions; returns the
    :class:`~csmcir.retrieval.index.GalleryIndex`. A killed run resumes its embedding."""
    from ..data.custom import write_captions
    from ..io import ensure_writable_dir
    from .index import GalleryIndex

    out = ensure_writable_dir(out)
    ids = dataset.gallery(split)
    if embeddings:  # written by `csmcir embed` (any number of processes): merge its parts
        from ..lightning.predict import STORE_FILE, merge_shards

        store = Path(embeddings) / STORE_FILE
        made_by = json.loads(store.read_text()).get("checkpoint_digest") if store.is_file() else None
        ckpt, _, digest = encoder.checkpoint.rpartition("@")
        if made_by is not None and made_by != digest:
            raise CsmcirError(f"{embeddings} was embedded with another checkpoint than {ckpt}")
        emb = merge_shards(embeddings, ids, encoder.dim)
    else:
        _, emb = embed_gallery(encoder, dataset, split, batch_size, progress, partial=out / ".embeddings.partial.npz")
    info = {
        "checkpoint": encoder.checkpoint.rsplit("@", 1)[0],
        "dataset": dataset_name or _dataset_name(dataset),
        "root": str(Path(dataset.root).resolve()),
        "split": split,
        "category": getattr(dataset, "category", None),
        "target_text": encoder.text.target_text,
    }
    index = GalleryIndex.build(emb, ids, kind=kind, info=info)
    if nprobe is not None:
        index.set_search_params(nprobe=nprobe)
    captions = dataset.captions() if encoder.text.target_text != "none" else {}
    write_captions(out / "captions.jsonl", [captions[i] for i in ids if i in captions])
    index.save(out)
    (out / ".embeddings.partial.npz").unlink(missing_ok=True)
    return index


def search(encoder, index, image, text: str, k: int = 10, captions: dict | None = None, exclude_ids=()) -> list[dict]:
    """The top ``k`` of ``index`` (a :class:`~csmcir.retrieval.index.GalleryIndex`) for one
    query: a PIL ``image`` and a modification ``text``. Each hit: ``rank``, ``id``, ``score`` and
    its final ``caption`` (from ``captions``, e.g. the index's ``captions.jsonl``). Ids in
    ``exclude_ids`` (say, the reference image itself when it is in the gallery) are left out."""
    if index.dim != encoder.dim:
        raise CsmcirError(f"the index holds {index.dim}-d embeddings but the checkpoint makes {encoder.dim}-d ones")
    exclude = set(exclude_ids)
    scores, ids = index.search(encoder.encode([image], [text], side="query"), k + len(exclude))
    captions = captions or {}
    kept = [(i, s) for i, s in zip(ids[0], scores[0]) if i not in exclude][:k]
    return [
        {"rank": r + 1, "id": i, "score": round(float(s), 4), "caption": captions[i].final if i in captions else ""}
        for r, (i, s) in enumerate(kept)
    ]


def _dataset_name(dataset) -> str:
    return getattr(dataset, "name", "custom")


def write_submission(bsplit, rankings: dict, out: str | Path, name: str = "csmcir", source: str = "rankings") -> list[Path]:
    """Test-server files of a benchmark split (a :class:`~csmcir.data.benchmarks.BenchmarkSplit`)
    from ``{query id: [ids]}``: CIRR test1's ``recall_submission_<name>.json`` and
    ``recall_subset_submission_<name>.json``, or CIRCO's ``submission_<name>.json``. Every query
    is validated before the first file is written; returns the paths written."""
    from ..io import atomic_write_json, ensure_writable_dir
    from .protocols import circo_submission, cirr_submission

    out = ensure_writable_dir(out)
    if bsplit.dataset == "cirr":
        recall, subset = cirr_submission(bsplit, rankings, source=source)
        files = {f"recall_submission_{name}.json": recall, f"recall_subset_submission_{name}.json": subset}
    elif bsplit.dataset == "circo":
        files = {f"submission_{name}.json": circo_submission(bsplit, rankings, source=source)}
    else:
        raise CsmcirError(f"{bsplit.dataset} has no test server submission format (cirr, circo)")
    for fname, data in files.items():
        atomic_write_json(out / fname, data, indent=None)
    return [out / f for f in files]
