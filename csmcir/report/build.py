"""Build the static HTML report of a split from a checkpoint (``csmcir report``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import CsmcirError
from ..retrieval.metrics import recall_at_k
from ..retrieval.ranking import rank_split
from .html import write_report

__all__ = ["build_report"]


def build_report(
    encoder,
    dataset,
    split: str,
    out: str | Path,
    k: int = 10,
    limit: int | None = None,
    teacher: str | Path | None = None,
    thumb_size: int = 96,
    progress: bool = True,
    dataset_name: str | None = None,
) -> Path:
    """Rank ``split`` with ``encoder`` and write ``out/index.html``: each query's top ``k`` with
    scores, the ground truth, the hits' MCoT captions, recall per modification type (or
    category) with links to the failures; with ``teacher`` (a ``csmcir teacher`` store) the
    teacher's reasoning for each query. Returns the page's path."""
    if k < 1 or (limit is not None and limit < 1):
        raise CsmcirError("-k and --limit must be at least 1")
    ranking = rank_split(encoder, dataset, split, k=k, limit=limit, missing_caption="empty", progress=progress)
    queries, groups = [], {}
    for i, t in enumerate(ranking.triplets):
        group = t.meta.get("type") or (t.id.split("/")[0] if "/" in t.id else None)
        queries.append(
            {
                "id": t.id,
                "reference": t.reference,
                "text": t.text,
                "group": group,
                "targets": list(t.targets),
                "hits": [list(h) for h in ranking.hits(i)],
            }
        )
    scored = [q for q in queries if q["targets"]]
    ks = [x for x in (1, 5, 10) if x <= k]

    def recall(qs):
        if not qs:
            return {}
        return recall_at_k([[h[0] for h in x["hits"]] for x in qs], [x["targets"] for x in qs], ks, num_candidates=ranking.depth)

    for q in scored:
        groups.setdefault(q["group"] or "all", []).append(q)
    group_metrics = {name: {**recall(qs), "queries": len(qs)} for name, qs in groups.items()} if len(groups) > 1 else {}
    captions = dataset.captions() if encoder.text.target_text != "none" else {}
    intent = getattr(encoder.model, "intent", None)
    if intent is not None and intent.cfg.pool_size:  # which soft prompts each query chose (model.intent)
        for s in range(0, len(queries), 64):
            part = queries[s : s + 64]
            chosen = encoder.prompt_choices([dataset.load_image(q["reference"]) for q in part], [q["text"] for q in part])
            for q, c in zip(part, chosen):
                q["prompts"] = c
    if teacher:
        from ..teacher import read_reasoning

        reasoning = read_reasoning(teacher)
        for q in queries:
            q["reasoning"] = reasoning.get(q["id"], "")
    ckpt_name = Path(encoder.checkpoint.rpartition("@")[0] or "model").name
    name = dataset_name or getattr(dataset, "name", "custom")
    title = f"csmcir report: {name} {split} ({len(queries)} queries, top {k}) - {ckpt_name}"
    return write_report(
        out, queries, dataset.load_image, captions, title, recall(scored), group_metrics, thumb_size=thumb_size, progress=progress
    )
