"""Retrieval metrics for composed image retrieval, as pure functions.

Two stages, kept apart so that each can be checked on its own:

* :func:`topk_rankings` turns query and gallery embeddings into ranked gallery indices (exact
  cosine / inner-product search in torch, chunked over queries, with the reference image of
  each query optionally excluded).
* :func:`recall_at_k` and :func:`recall_by_group` score rankings of gallery *ids* against the
  target ids of each query.

Recall here is the CIRR / FashionIQ definition, "hit rate at K": the percentage of queries that
have at least one correct target among their first K ranked ids. It is *not* the information
retrieval recall (the fraction of a query's relevant items retrieved), which differs as soon as a
query has more than one correct target.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

__all__ = [
    "topk_rankings",
    "recall_at_k",
    "recall_by_group",
    "recall_from_first_hits",
    "first_hit_ranks",
    "check_ks",
    "reference_positions",
]


def topk_rankings(
    query_emb: torch.Tensor, gallery_emb: torch.Tensor, k: int, exclude: Sequence[int | None] | None = None, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank the gallery for every query by inner product and keep the best ``k``.

    Definition: the score of gallery item ``j`` for query ``i`` is ``query_emb[i] @
    gallery_emb[j]``, which is the cosine similarity when both are L2-normalised (the caller's
    job). Items are ranked by descending score; equal scores are ranked by ascending gallery
    index, so the result is deterministic (``torch.topk`` alone does not promise this).

    Args:
        query_emb: ``[Q, D]`` floating-point query embeddings.
        gallery_emb: ``[G, D]`` floating-point gallery embeddings; moved to the queries' device.
        k: how many gallery items to keep per query (>= 1). It is clipped to the number of
            candidates: ``G``, or ``G - 1`` when any query has an excluded item (the result is
            rectangular, so the clip is the same for every query).
        exclude: optional, one entry per query: a gallery index to leave out of that query's
            ranking (typically its reference image), or ``None``.
        chunk: number of queries scored at once; peak extra memory is about ``chunk * G`` scores.
            Chunking never changes the result.

    Returns:
        ``(indices, scores)``: ``[Q, k']`` long gallery indices and their ``[Q, k']`` scores, best
        first, on the queries' device. Scores are computed in at least float32.

    Raises:
        ValueError: on non-2-D inputs, mismatched dimensions, a non-floating or non-finite input,
            an empty gallery, ``k < 1``, ``chunk < 1``, or a bad ``exclude``.
    """
    if query_emb.ndim != 2 or gallery_emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got query shape {tuple(query_emb.shape)} and gallery shape {tuple(gallery_emb.shape)}")
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"query dimension {query_emb.shape[1]} does not match gallery dimension {gallery_emb.shape[1]}")
    if not (query_emb.is_floating_point() and gallery_emb.is_floating_point()):
        raise ValueError("embeddings must be floating-point tensors")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n_query, n_gallery = query_emb.shape[0], gallery_emb.shape[0]
    if n_gallery == 0:
        raise ValueError("the gallery is empty")
    if not bool(torch.isfinite(query_emb).all()) or not bool(torch.isfinite(gallery_emb).all()):
        raise ValueError("embeddings contain NaN or infinite values")

    device = query_emb.device
    excluded = _exclusion_tensor(exclude, n_query, n_gallery, device)
    has_exclusion = bool((excluded >= 0).any())
    k_eff = min(k, n_gallery - 1 if has_exclusion else n_gallery)

    dtype = torch.promote_types(query_emb.dtype, gallery_emb.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    gallery_t = gallery_emb.to(device=device, dtype=dtype).T
    out_idx = torch.empty(n_query, k_eff, dtype=torch.long, device=device)
    out_scores = torch.empty(n_query, k_eff, dtype=dtype, device=device)
    if k_eff == 0:  # a one-item gallery whose only item is excluded
        return out_idx, out_scores

    for start in range(0, n_query, chunk):
        stop = min(start + chunk, n_query)
        scores = query_emb[start:stop].to(dtype) @ gallery_t
        ex = excluded[start:stop]
        rows = (ex >= 0).nonzero().squeeze(1)
        if rows.numel():
            scores[rows, ex[rows]] = float("-inf")
        out_idx[start:stop], out_scores[start:stop] = _stable_topk(scores, k_eff)
    return out_idx, out_scores


def _exclusion_tensor(exclude: Sequence[int | None] | None, n_query: int, n_gallery: int, device: torch.device) -> torch.Tensor:
    """Validate ``exclude`` and return it as a long tensor with ``-1`` for "nothing excluded"."""
    if exclude is None:
        return torch.full((n_query,), -1, dtype=torch.long, device=device)
    if len(exclude) != n_query:
        raise ValueError(f"exclude has {len(exclude)} entries for {n_query} queries")
    values = []
    for i, e in enumerate(exclude):
        if e is None:
            values.append(-1)
            continue
        e = int(e)
        if not 0 <= e < n_gallery:
            raise ValueError(f"exclude[{i}] = {e} is not a gallery index (gallery size {n_gallery})")
        values.append(e)
    return torch.tensor(values, dtype=torch.long, device=device)


def _stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` columns of each row, by descending score, ties by ascending column index.

    ``torch.topk`` finds the k-th largest value of each row but may pick any of several columns
    tied at it. Here every column strictly above that value is kept, and the columns equal to it
    fill the remaining places in ascending column order; then the ``k`` kept columns (listed in
    ascending column order by ``nonzero``) are sorted by a stable descending sort.
    """
    kth = torch.topk(scores, k, dim=1, sorted=True).values[:, -1:]
    above = scores > kth
    at = scores == kth
    missing = k - above.sum(dim=1, keepdim=True)  # >= 1: the k-th value itself is not "above"
    keep = above | (at & (torch.cumsum(at, dim=1, dtype=torch.int32) <= missing))
    cols = keep.nonzero()[:, 1].view(scores.shape[0], k)
    vals = scores.gather(1, cols)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return cols.gather(1, order), vals.gather(1, order)


def recall_at_k(
    rankings: Sequence[Sequence[str]],
    targets: Sequence[Collection[str]],
    ks: Sequence[int] = (1, 5, 10, 50),
    num_candidates: int | None = None,
) -> dict[str, float]:
    """Recall@K in percent, the CIRR / FashionIQ definition.

    ``R@K = 100 * (number of queries with at least one target id among their first K ranked ids)
    / (number of queries)``. A query with several correct targets counts once, as a hit if any of
    them is in its top K.

    Args:
        rankings: per query, gallery ids best first (at least ``max(ks)`` of them).
        targets: per query, the correct target ids (a non-empty collection; a bare string is
            taken as a single id).
        ks: the cut-offs to report, each >= 1.
        num_candidates: the number of gallery items a query is ranked against: the gallery size,
            or the gallery size minus one when each query's reference image is excluded (the
            ``k'`` that :func:`topk_rankings` returns). When the gallery is smaller than
            ``max(ks)`` a full ranking is shorter than ``max(ks)``; give this so that such a
            ranking is accepted: it then needs ``min(max(ks), num_candidates)`` ids, and R@K for
            ``K`` beyond it is computed on the whole ranking.

    Returns:
        ``{"R@1": ..., "R@5": ...}`` in the order of ``ks``, as floats in ``[0, 100]``.

    Raises:
        ValueError: if ``rankings`` and ``targets`` differ in length or are empty, ``ks`` is empty
            or holds a value < 1, a query has no target, or a ranking is too short (see
            ``num_candidates``).
    """
    ks = check_ks(ks)
    return recall_from_first_hits(_first_hit_ranks(rankings, targets, max(ks), num_candidates), ks)


def recall_by_group(
    rankings: Sequence[Sequence[str]],
    targets: Sequence[Collection[str]],
    groups: Sequence[str],
    k: int = 1,
    num_candidates: int | None = None,
) -> dict[str, float]:
    """Recall@k in percent (the :func:`recall_at_k` definition) for each group of queries.

    Args:
        rankings, targets, num_candidates: as for :func:`recall_at_k`.
        groups: one label per query, e.g. the FashionIQ category or a modification type.
        k: the cut-off, >= 1.

    Returns:
        ``{group: R@k}`` over the groups that occur, sorted by group name; each value is computed
        over that group's queries only.

    Raises:
        ValueError: as :func:`recall_at_k`, and if ``groups`` does not have one label per query.
    """
    (k,) = check_ks((k,))
    if len(groups) != len(rankings):
        raise ValueError(f"{len(groups)} group labels for {len(rankings)} rankings")
    first_hits = _first_hit_ranks(rankings, targets, k, num_candidates)
    hits: dict[str, int] = {}
    counts: dict[str, int] = {}
    for group, r in zip(groups, first_hits):
        counts[group] = counts.get(group, 0) + 1
        hits[group] = hits.get(group, 0) + (r is not None and r < k)
    return {g: 100.0 * hits[g] / counts[g] for g in sorted(counts)}


def check_ks(ks: Sequence[int]) -> list[int]:
    """``ks`` as ints; a ``ValueError`` if it is empty or holds a cut-off below 1."""
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks is empty")
    if min(ks) < 1:
        raise ValueError(f"every K must be >= 1, got {ks}")
    return ks


def first_hit_ranks(rankings: Sequence[Sequence[str]], targets: Sequence[Collection[str]], depth: int) -> list[int | None]:
    """For each query, the 0-based rank of its first correct target among its first ``depth``
    ranked ids, or ``None``. A bare string target is one id. No length checks (callers do them)."""
    out: list[int | None] = []
    for ranking, target in zip(rankings, targets):
        wanted = {target} if isinstance(target, str) else set(target)
        out.append(next((r for r, gid in enumerate(ranking[:depth]) if gid in wanted), None))
    return out


def recall_from_first_hits(first_hits: Sequence[int | None], ks: Sequence[int]) -> dict[str, float]:
    """``R@K = 100 * #{queries whose first hit rank < K} / #queries`` (the hit-rate definition of
    this module's docstring), for each K, in the order of ``ks``."""
    n = len(first_hits)
    return {f"R@{k}": 100.0 * sum(1 for r in first_hits if r is not None and r < k) / n for k in ks}


def reference_positions(references: Sequence, gallery: Sequence) -> list[int | None]:
    """The gallery position of each query's reference (``None`` where it is not in the gallery):
    the ``exclude`` argument of :func:`topk_rankings` for protocols that remove the reference.
    ``references`` and ``gallery`` hold the same kind of key (image ids or store rows)."""
    pos = {g: j for j, g in enumerate(gallery)}
    return [pos.get(r) for r in references]


def _first_hit_ranks(
    rankings: Sequence[Sequence[str]], targets: Sequence[Collection[str]], depth: int, num_candidates: int | None
) -> list[int | None]:
    """For each query, the 0-based rank of its first target within ``depth``, or ``None``."""
    if len(rankings) != len(targets):
        raise ValueError(f"{len(rankings)} rankings for {len(targets)} target lists")
    if not rankings:
        raise ValueError("no queries to evaluate")
    if num_candidates is not None and num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    needed = depth if num_candidates is None else min(depth, num_candidates)
    for i, (ranking, target) in enumerate(zip(rankings, targets)):
        if len(ranking) < needed:
            hint = "" if num_candidates is not None else "; pass num_candidates if the gallery is smaller"
            raise ValueError(f"ranking of query {i} has {len(ranking)} ids, R@{depth} needs {needed}{hint}")
        if not ({target} if isinstance(target, str) else set(target)):
            raise ValueError(f"query {i} has no target ids")
    return first_hit_ranks(rankings, targets, depth)
