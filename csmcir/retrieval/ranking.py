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

__all__ = ["Ranking", "build_index", "write_submission", "embed_gallery", "embed_queries", "rank_split", "score_rankings", "search"]


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
    return ids, embed_pairs(encoder, dataset, ids, texts, batch_size, desc=f"embedding {split} gallery", partial=partial, progress=progress)


def embed_queries(
    encoder, dataset, triplets: list, batch_size: int = 256, progress: bool = True, desc: str = "embedding queries"
) -> np.ndarray:
    """``[Q, D]`` float32 embeddings of (reference image, modification text) of ``triplets``."""
    return embed_pairs(
        encoder, dataset, [t.reference for t in triplets], [t.text for t in triplets], batch_size, desc=desc, progress=progress
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
    removed = bool(dataset.remove_reference)
    exclude = reference_positions([t.reference for t in triplets], gallery) if removed else None
    sets = _image_sets(dataset, split, triplets, gallery)
    depth = len(gallery) if k is None or sets is not None else k
    idx, scores = topk_rankings(torch.from_numpy(q), torch.from_numpy(g), depth, exclude=exclude)
    extra = None
    if sets is not None and k is not None and k < idx.shape[1]:
        # CIRR's Recall_subset ranks the image set within the full ranking: keep the members
        # below the top k, in ranked order, so the file scores exactly as a full ranking would
        extra = [[j for j in row[k:] if j in members] for row, members in zip(idx.tolist(), sets)]
        idx, scores = idx[:, :k], scores[:, :k]
    return Ranking(triplets, gallery, idx, scores, removed, extra)


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
    scores, ids = index.search(encoder.encode([image], [text]), k + len(exclude))
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
