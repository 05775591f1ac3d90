"""Score query and gallery embeddings of one in-memory split (used by validation and baselines)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .metrics import recall_at_k, recall_by_group, reference_positions, topk_rankings


def evaluate_embeddings(
    store,
    query_emb: torch.Tensor,
    gallery_emb: torch.Tensor,
    ks=(1, 5, 10, 50),
    query_index=None,
    gallery_index=None,
    by_type: bool = True,
    exclude_reference: bool = True,
) -> dict[str, float]:
    """Recall@K over the split's gallery (reference excluded unless ``exclude_reference=False``)
    and R@1 per modification type.

    ``query_index`` / ``gallery_index`` say which queries and gallery entries the embeddings
    belong to (all, in order, by default); with ``limit_val_batches`` or ``fast_dev_run`` only a
    part is embedded and the metrics cover that part.
    """
    q_index = list(range(store.num_queries)) if query_index is None else query_index
    g_index = list(range(len(store.gallery_rows))) if gallery_index is None else gallery_index
    grows = [int(store.gallery_rows[j]) for j in g_index]
    exclude = reference_positions([int(store.ref_rows[i]) for i in q_index], grows) if exclude_reference else None
    idx, _ = topk_rankings(query_emb, gallery_emb, max(ks), exclude=exclude)
    ids = store.image_ids
    rankings = [[ids[grows[j]] for j in row] for row in idx.tolist()]
    targets = [set(store.triplets[i].targets) for i in q_index]
    groups = [store.groups[i] for i in q_index]
    out = recall_at_k(rankings, targets, ks=tuple(ks), num_candidates=idx.shape[1])
    if by_type and len(set(groups)) > 1:
        for g, v in recall_by_group(rankings, targets, groups, k=1, num_candidates=idx.shape[1]).items():
            out[f"R@1/{g}"] = v
    return out


def protocol_metrics(bsplit, store, query_emb: torch.Tensor, gallery_emb: torch.Tensor, query_index, gallery_index) -> dict[str, float]:
    """The benchmark's official metrics (:func:`~csmcir.retrieval.protocols.score_split`) for
    embeddings of a :class:`~csmcir.data.benchmarks.BenchmarkSplit` held in ``store``.

    Returns ``{}`` when only part of the gallery was embedded (``limit_val_batches``,
    ``fast_dev_run``): a protocol is defined on the whole gallery. Rankings keep the reference;
    the protocol removes it where it should. CIRR ranks the whole gallery (Recall_subset needs
    every image-set member ranked).
    """
    import dataclasses

    from .protocols import score_split

    if len(gallery_index) < len(store.gallery_rows) or not bsplit.has_targets:
        return {}
    grows = [int(store.gallery_rows[j]) for j in gallery_index]
    # CIRR's subsets and FashionIQ's per-category rankings filter the ranking: rank everything
    depth = len(grows) if bsplit.dataset == "cirr" or bsplit.sub_galleries else min(len(grows), 51)
    idx, _ = topk_rankings(query_emb, gallery_emb, depth)
    ids = store.image_ids
    rankings = {store.triplets[i].id: [ids[grows[j]] for j in row] for i, row in zip(query_index, idx.tolist())}
    embedded = dataclasses.replace(bsplit, queries=[q for q in bsplit.queries if q.id in rankings])
    return score_split(embedded, rankings)


@dataclass
class SplitEvaluator:
    """Everything validation or testing needs to score one split, handed to the LightningModule
    by the DataModule (:meth:`~csmcir.data.datamodule.CIRDataModule.evaluators`).

    Args:
        store: the split in memory (targets, reference rows, modification types).
        log_name: the metric prefix (``val``, ``test``, ``test/heldout``).
        ks: the K of Recall@K.
        exclude_reference: rankings leave each query's reference out.
        benchmark_split: a real benchmark's split: its official metrics are added as
            ``<dataset>/<metric>``.
    """

    store: Any
    log_name: str
    ks: tuple[int, ...] = (1, 5, 10, 50)
    exclude_reference: bool = True
    benchmark_split: Any = None

    def score(self, q_idx: list[int], q: torch.Tensor, g_idx: list[int], g: torch.Tensor) -> dict[str, float]:
        """Metrics of queries ``q_idx`` (embeddings ``q``) against gallery entries ``g_idx`` (``g``)."""
        metrics = evaluate_embeddings(self.store, q, g, self.ks, q_idx, g_idx, exclude_reference=self.exclude_reference)
        if self.benchmark_split is not None:
            official = protocol_metrics(self.benchmark_split, self.store, q, g, q_idx, g_idx)
            metrics.update({f"{self.benchmark_split.dataset}/{k}": v for k, v in official.items()})
        return metrics
