"""The captioning loop: which images, in which shard, skipping what a store already holds."""

from __future__ import annotations

import time
from typing import Callable

from ..errors import CsmcirError
from .prompts import PromptTemplate
from .store import CaptionStore

__all__ = ["split_image_ids", "parse_shard", "select_ids", "caption_images"]


def split_image_ids(dataset, split: str) -> list[str]:
    """Every image a split's training or evaluation reads a caption of: the gallery, then the
    queries' references, targets and listed negatives not in it (first-seen order)."""
    seen: dict[str, None] = dict.fromkeys(dataset.gallery(split))
    for t in dataset.triplets(split):
        for i in (t.reference, *t.targets, *t.negatives):
            seen.setdefault(i)
    return list(seen)


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` (0-based i < n) -> ``(i, n)``; ``None`` -> ``(0, 1)``."""
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise CsmcirError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise CsmcirError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def select_ids(ids: list[str], shard: tuple[int, int] = (0, 1), limit: int | None = None) -> list[str]:
    """Shard ``i`` of ``n`` takes every n-th id from position ``i``; ``limit`` keeps its first ones.
    The selection depends only on the list, so a rerun (or a resume) picks the same images."""
    i, n = shard
    out = ids[i::n]
    return out if limit is None else out[:limit]


def caption_images(
    ids: list[str],
    load_image: Callable[[str], object],
    backend,
    template: PromptTemplate,
    store: CaptionStore,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, int | float]:
    """Caption every id not yet in ``store`` in batches; each batch is appended (and fsync'ed)
    before the next starts. Returns counts: done before, captioned now, per status, images/s."""
    from tqdm import tqdm

    if batch_size < 1:
        raise CsmcirError("--batch-size must be at least 1")
    done = store.done()
    todo = [i for i in ids if i not in done]
    prompt = template.prompt()
    counts: dict[str, int | float] = {"selected": len(ids), "already_done": len(ids) - len(todo), "captioned": 0,
                                      "ok": 0, "partial": 0, "unparsed": 0, "empty": 0}
    bar = tqdm(total=len(todo), unit="img", desc="captioning", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = [load_image(i) for i in batch] if backend.needs_images else []
            answers = backend.generate(batch, images, prompt)
            if len(answers) != len(batch):
                raise CsmcirError(f"backend {backend.model_id} returned {len(answers)} answers for {len(batch)} images")
            records = []
            for i, raw in zip(batch, answers):
                parsed = template.parse(raw)
                counts[parsed.status] += 1
                records.append({"image_id": i, "levels": parsed.levels, "final": parsed.final, "status": parsed.status,
                                "raw": raw, "model": backend.model_id, "prompt": template.id, "generation": backend.settings()})
            store.append(records)
            counts["captioned"] += len(batch)
            bar.update(len(batch))
            if counts["unparsed"] or counts["empty"]:
                bar.set_postfix(unparsed=counts["unparsed"], empty=counts["empty"])
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    counts["seconds"] = round(elapsed, 2)
    counts["images_per_s"] = round(counts["captioned"] / elapsed, 3) if elapsed > 0 and counts["captioned"] else 0.0
    return counts
