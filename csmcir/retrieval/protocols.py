"""The official evaluation protocols of FashionIQ, CIRR, CIRCO and Shoes, as pure functions.

Every function scores *rankings*: a mapping from query id to that query's gallery ids, best
first. They need no model, so a rankings file from any system (``csmcir rank``, a test-server
submission) is scored exactly like csmcir's own. Results are percentages.

The definitions follow the reference evaluation code of each benchmark (and
``../shared/benchmarks/README.md`` in this project's workspace):

* **Recall@K** ("hit rate"): the percentage of queries with a correct target among their first K
  ranked ids. FashionIQ keeps the reference image in the ranking; CIRR and Shoes remove it
  first (``references=``), so the reference never takes a place in the top K.
* **CIRR Recall_subset@K**: the ranking (reference removed) restricted to the query's image set
  (``img_set.members`` minus the reference: 5 images), then Recall@K on it, K in {1, 2, 3}.
* **CIRR's headline** ``Avg = (R@5 + Rsubset@1) / 2``.
* **CIRCO mAP@K**: per query ``AP@K = sum_{r<=K} P(r) rel(r) / min(K, |gt|)`` with ``P(r)`` the
  precision at rank r and ``rel(r)`` 1 when the id at rank r is a ground truth; mAP@K is the
  mean over queries. The reference is not removed; a ranking that repeats an id is an error.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from ..errors import CsmcirError
from ..io import read_json
from .metrics import check_ks as _check_ks
from .metrics import first_hit_ranks, recall_from_first_hits

__all__ = [
    "ProtocolError",
    "recall_at_k",
    "recall_subset_at_k",
    "cirr_metrics",
    "circo_map_at_k",
    "fashioniq_metrics",
    "read_rankings",
    "score_split",
]


class ProtocolError(CsmcirError, ValueError):
    """Rankings that cannot be scored: a missing query, a too-short ranking, a repeated id."""


def _ranked(rankings: Mapping[str, Sequence[str]], qid: str, source: str) -> Sequence[str]:
    try:
        ranked = rankings[qid]
    except KeyError:
        raise ProtocolError(f"{source}: query {qid!r} is not ranked (every query must be)") from None
    if isinstance(ranked, str) or not isinstance(ranked, Sequence):
        raise ProtocolError(f"{source}: query {qid!r}: the ranking must be a list of ids, got {type(ranked).__name__}")
    return ranked


def recall_at_k(
    rankings: Mapping[str, Sequence[str]],
    targets: Mapping[str, Collection[str]],
    ks: Sequence[int] = (1, 5, 10, 50),
    references: Mapping[str, str] | None = None,
    source: str = "rankings",
) -> dict[str, float]:
    """Recall@K in percent over the queries of ``targets``.

    Args:
        rankings: query id -> gallery ids, best first. Ids of queries not in ``targets`` are
            ignored; every query of ``targets`` must be there.
        targets: query id -> its correct target ids (one or several).
        ks: the cut-offs.
        references: query id -> reference image id, removed from that query's ranking before
            scoring (CIRR, Shoes). ``None`` keeps the ranking as it is (FashionIQ).
        source: named in errors (the rankings file).

    Returns:
        ``{"R@K": percent}`` in the order of ``ks``.

    Raises:
        ProtocolError: a query is not ranked, or its ranking (reference removed) is shorter than
            ``max(ks)`` although it names no correct target.
    """
    ks = _check_ks(ks)
    if not targets:
        raise ProtocolError(f"{source}: no queries to score")
    ranked_lists, correct_sets = [], []
    for qid, correct in targets.items():
        ranked = _ranked(rankings, qid, source)
        if references is not None:
            ref = references[qid]
            ranked = [g for g in ranked if g != ref]
        ranked_lists.append(ranked)
        correct_sets.append({correct} if isinstance(correct, str) else set(correct))
    first = first_hit_ranks(ranked_lists, correct_sets, max(ks))  # the one definition (metrics.py)
    for qid, ranked, r in zip(targets, ranked_lists, first):
        if r is None and len(ranked) < max(ks):
            raise ProtocolError(
                f"{source}: query {qid!r}: {len(ranked)} ranked ids"
                f"{' after removing the reference' if references is not None else ''}, R@{max(ks)} needs {max(ks)}"
            )
    return recall_from_first_hits(first, ks)


def recall_subset_at_k(
    rankings: Mapping[str, Sequence[str]],
    targets: Mapping[str, Collection[str]],
    members: Mapping[str, Collection[str]],
    references: Mapping[str, str],
    ks: Sequence[int] = (1, 2, 3),
    source: str = "rankings",
) -> dict[str, float]:
    """CIRR's Recall_subset@K: Recall@K on the ranking restricted to the query's image set.

    The restricted ranking keeps the ranked ids that are in ``members[qid]`` and are not the
    reference, in ranked order. A submission's ``recall_subset`` lists (3 ids) are scored by the
    same function: they are already restricted.

    Raises:
        ProtocolError: a query is not ranked, or its restricted ranking is shorter than
            ``max(ks)`` and names no correct target.
    """
    ks = _check_ks(ks)
    restricted = {}
    for qid in targets:
        keep = set(members[qid]) - {references[qid]}
        restricted[qid] = [g for g in _ranked(rankings, qid, source) if g in keep]
    out = recall_at_k(restricted, targets, ks, source=source)
    return {k.replace("R@", "Rsubset@"): v for k, v in out.items()}


def cirr_metrics(
    rankings: Mapping[str, Sequence[str]],
    targets: Mapping[str, str],
    members: Mapping[str, Collection[str]],
    references: Mapping[str, str],
    source: str = "rankings",
) -> dict[str, float]:
    """CIRR: R@1,5,10,50 with the reference removed, Rsubset@1,2,3, and Avg = (R@5 + Rsubset@1) / 2."""
    out = recall_at_k(rankings, targets, (1, 5, 10, 50), references=references, source=source)
    out.update(recall_subset_at_k(rankings, targets, members, references, source=source))
    out["Avg"] = (out["R@5"] + out["Rsubset@1"]) / 2
    return out


def circo_map_at_k(
    rankings: Mapping[str, Sequence[str]],
    ground_truths: Mapping[str, Collection[str]],
    ks: Sequence[int] = (5, 10, 25, 50),
    source: str = "rankings",
) -> dict[str, float]:
    """CIRCO's mAP@K in percent (definition in the module docstring).

    Raises:
        ProtocolError: a query is not ranked, its ranking repeats an id, is shorter than
            ``max(ks)``, or a query has no ground truth.
    """
    ks = _check_ks(ks)
    if not ground_truths:
        raise ProtocolError(f"{source}: no queries to score")
    total = {k: 0.0 for k in ks}
    for qid, gts in ground_truths.items():
        ranked = list(_ranked(rankings, qid, source))
        gts = {gts} if isinstance(gts, str) else set(gts)
        if not gts:
            raise ProtocolError(f"{source}: query {qid!r} has no ground truth")
        if len(set(ranked)) != len(ranked):
            dup = next(g for i, g in enumerate(ranked) if g in ranked[:i])
            raise ProtocolError(f"{source}: query {qid!r}: id {dup!r} is ranked twice")
        if len(ranked) < max(ks):
            raise ProtocolError(f"{source}: query {qid!r}: {len(ranked)} ranked ids, mAP@{max(ks)} needs {max(ks)}")
        hits, precision_sum, ap_at = 0, 0.0, {}
        for r, g in enumerate(ranked[: max(ks)], start=1):
            if g in gts:
                hits += 1
                precision_sum += hits / r
            if r in total:
                ap_at[r] = precision_sum / min(r, len(gts))
        for k in ks:
            total[k] += ap_at[k]
    return {f"mAP@{k}": 100.0 * total[k] / len(ground_truths) for k in ks}


def fashioniq_metrics(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """FashionIQ's table: R@10 and R@50 of each category, their means over the categories, and
    the overall mean of those two means.

    Args:
        per_category: category -> ``recall_at_k(..., ks=(10, 50))`` of that category (reference
            not removed).
    """
    if not per_category:
        raise ValueError("no categories to average")
    out: dict[str, float] = {}
    for cat in sorted(per_category):
        for k in ("R@10", "R@50"):
            out[f"{cat}/{k}"] = per_category[cat][k]
    for k in ("R@10", "R@50"):
        out[f"mean/{k}"] = sum(per_category[c][k] for c in per_category) / len(per_category)
    out["mean"] = (out["mean/R@10"] + out["mean/R@50"]) / 2
    return out


# ---------------------------------------------------------------------- files and whole splits


def read_rankings(path: str | Path) -> dict[str, list[str]]:
    """A rankings JSON file: ``{query id: [image ids, best first]}``.

    Accepts ``csmcir rank`` output and the test-server formats: CIRR's ``version`` and
    ``metric`` keys are ignored, and integer ids (CIRCO) are read as strings.
    """
    p = Path(path)
    data = read_json(p, "rankings file")
    if not isinstance(data, dict):
        raise CsmcirError(f"{p}: expected a JSON object mapping query ids to ranked image ids")
    out = {}
    for qid, ranked in data.items():
        if qid in ("version", "metric"):
            continue
        if not isinstance(ranked, list) or not all(isinstance(g, (str, int)) and not isinstance(g, bool) for g in ranked):
            raise CsmcirError(f"{p}: query {qid!r}: expected a list of image ids, got {type(ranked).__name__}")
        out[str(qid)] = [str(g) for g in ranked]
    return out


def score_split(split, rankings: Mapping[str, Sequence[str]], source: str = "rankings") -> dict[str, float]:
    """Score rankings of one :class:`~csmcir.data.benchmarks.BenchmarkSplit` by its protocol.

    FashionIQ: R@10, R@50 (reference kept); CIRR: :func:`cirr_metrics`; CIRCO: mAP@5,10,25,50;
    Shoes: R@1, 10, 50 (reference removed).
    """
    if not split.has_targets:
        raise CsmcirError(
            f"{split.dataset} {split.split} has no ground truth here; its scores come from the test server (see `csmcir submit`)"
        )
    qs = split.queries
    known = {q.id for q in qs}
    unknown = [qid for qid in rankings if qid not in known]
    if unknown:
        raise ProtocolError(
            f"{source}: query {unknown[0]!r} is not a query of {split.dataset} {split.split}"
            f"{f' {split.category}' if split.category else ''} ({len(unknown)} unknown ids; wrong split or dataset?)"
        )
    refs = {q.id: q.reference for q in qs}
    if split.dataset == "fashioniq":
        if split.sub_galleries is None:
            return recall_at_k(rankings, {q.id: q.targets for q in qs}, (10, 50), source=source)
        # all three categories: each query ranked within its own category's gallery
        per_cat = {}
        for cat, gallery in split.sub_galleries.items():
            keep = set(gallery)
            cat_qs = [q for q in qs if q.id.startswith(cat + "/")]
            if not cat_qs:
                continue
            sub = {q.id: [g for g in _ranked(rankings, q.id, source) if g in keep] for q in cat_qs}
            per_cat[cat] = recall_at_k(sub, {q.id: q.targets for q in cat_qs}, (10, 50), source=source)
        return fashioniq_metrics(per_cat)
    if split.dataset == "cirr":
        return cirr_metrics(rankings, {q.id: q.targets[0] for q in qs}, {q.id: q.members for q in qs}, refs, source=source)
    if split.dataset == "circo":
        return circo_map_at_k(rankings, {q.id: q.targets for q in qs}, source=source)
    if split.dataset == "shoes":
        return recall_at_k(rankings, {q.id: q.targets for q in qs}, (1, 10, 50), references=refs, source=source)
    raise CsmcirError(f"no protocol for dataset {split.dataset!r}")


# ------------------------------------------------------------------------------- submissions

CIRR_SUBMISSION_LIMIT = 5 * 1024 * 1024  # bytes per file, the CIRR test server's limit


def cirr_submission(split, rankings: Mapping[str, Sequence[str]], source: str = "rankings") -> tuple[dict, dict]:
    """CIRR test-server files from rankings of ``split`` (a test1 BenchmarkSplit).

    ``recall``: each pairid's top 50, reference excluded; ``recall_subset``: its top 3 among its
    image set (reference excluded), in ranked order. The rankings must be deep enough to hold 3
    image-set members; ``csmcir rank --k`` with the gallery size always is.
    """
    recall = {"version": "rc2", "metric": "recall"}
    subset = {"version": "rc2", "metric": "recall_subset"}
    for q in split.queries:
        ranked = [g for g in _ranked(rankings, q.id, source) if g != q.reference]
        if len(ranked) < 50:
            raise ProtocolError(f"{source}: query {q.id!r}: {len(ranked)} ranked ids besides the reference, the recall file needs 50")
        if len(set(ranked)) != len(ranked):
            raise ProtocolError(f"{source}: query {q.id!r}: an id is ranked twice")
        members = set(q.members or []) - {q.reference}
        sub = [g for g in ranked if g in members][:3]
        if len(sub) < 3:
            raise ProtocolError(
                f"{source}: query {q.id!r}: only {len(sub)} of its image set ranked; rank deeper (csmcir rank --k {len(split.gallery)})"
            )
        recall[q.id] = list(ranked[:50])
        subset[q.id] = sub
    for name, d in (("recall", recall), ("recall_subset", subset)):
        size = len(json.dumps(d).encode())
        if size > CIRR_SUBMISSION_LIMIT:
            raise ProtocolError(f"CIRR {name} submission would be {size} bytes, over the server's 5 MB limit")
    return recall, subset


def circo_submission(split, rankings: Mapping[str, Sequence[str]], source: str = "rankings") -> dict:
    """CIRCO test-server file: every query id -> 50 unique image ids (integers, as COCO ids are)."""
    out = {}
    for q in split.queries:
        ranked = list(_ranked(rankings, q.id, source))[:50]
        if len(ranked) < 50:
            raise ProtocolError(f"{source}: query {q.id!r}: {len(ranked)} ranked ids, the submission needs 50")
        if len(set(ranked)) != 50:
            raise ProtocolError(f"{source}: query {q.id!r}: an id is ranked twice in its top 50")
        try:
            out[q.id] = [int(g) for g in ranked]
        except ValueError:
            raise ProtocolError(f"{source}: query {q.id!r}: CIRCO image ids are integers, got {ranked[0]!r}") from None
    return out
