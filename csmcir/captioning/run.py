"""The captioning loop: which images, in which shard, skipping what a store already holds."""

from __future__ import annotations

import time
from collections.abc import Callable

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


def answer_record(key: str, item_id: str, raw: str, template: PromptTemplate, backend) -> dict:
    """One store record of a model's answer: parsed by ``template`` (raw text kept), with the
    model, prompt and generation settings. ``key``: ``image_id`` (captions) or ``query_id``
    (OSrCIR's descriptions)."""
    parsed = template.parse(raw)
    return {
        key: item_id,
        "levels": parsed.levels,
        "final": parsed.final,
        "status": parsed.status,
        "raw": raw,
        "model": backend.model_id,
        "prompt": template.id,
        "generation": backend.settings(),
    }


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
    counts: dict[str, int | float] = {
        "selected": len(ids),
        "already_done": len(ids) - len(todo),
        "captioned": 0,
        "ok": 0,
        "partial": 0,
        "unparsed": 0,
        "empty": 0,
    }
    bar = tqdm(total=len(todo), unit="img", desc="captioning", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = [load_image(i) for i in batch] if backend.needs_images else []
            answers = backend.generate(batch, images, prompt)
            if len(answers) != len(batch):
                raise CsmcirError(f"backend {backend.model_id} returned {len(answers)} answers for {len(batch)} images")
            records = [answer_record("image_id", i, raw, template, backend) for i, raw in zip(batch, answers)]
            for r in records:
                counts[r["status"]] += 1
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


def caption_dataset(
    dataset,
    splits: list[str],
    out,
    backend: str = "transformers",
    template=None,
    model: str | None = None,
    shard: str | tuple[int, int] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    **backend_kw,
) -> dict:
    """Caption every image ``splits`` of ``dataset`` read (gallery, references, targets, listed
    negatives; each image once) into the caption store ``out`` (a JSONL file, resumed if it
    exists). ``backend``: ``transformers`` (an MLLM, ``model`` = a local folder or hub id) or
    ``synthetic``; ``template``: a :class:`PromptTemplate`, a name or a YAML file (default: by
    dataset). Other keywords go to the backend (``device``, ``dtype``, ``max_new_tokens``,
    ``seed``, ``min_pixels``, ``max_pixels``, ``local_files_only``). Returns the run's counts."""
    from .backends import make_backend
    from .prompts import PromptTemplate, default_template_for, load_template

    if not isinstance(template, PromptTemplate):
        template = load_template(template or default_template_for(getattr(dataset, "name", "custom")))
    shard = parse_shard(shard) if not isinstance(shard, tuple) else shard
    if limit is not None and limit < 0:
        raise CsmcirError("--limit must be >= 0")
    ids: dict[str, None] = {}
    for split in splits:
        ids.update(dict.fromkeys(split_image_ids(dataset, split)))
    ids = select_ids(list(ids), shard, limit)
    with CaptionStore(out) as store:  # opens (and repairs) the store before the model loads
        for i, rec in store.records.items():
            if rec.get("prompt") not in (None, template.id):
                raise CsmcirError(
                    f"{out}: image {i!r} was captioned with prompt {rec.get('prompt')} but this run uses "
                    f"{template.id}; write to another file"
                )
        todo = [i for i in ids if i not in store.records]
        if backend == "transformers":  # before a large model loads: every image file is there
            missing = [(i, path) for i in todo if not (path := dataset.image_path(i)).is_file()]
            if missing:
                raise CsmcirError(
                    f"{len(missing)} of {len(todo)} images to caption are missing, first: image {missing[0][0]!r} "
                    f"at {missing[0][1]}: image file not found"
                )
        engine = make_backend(backend, model=model, root=str(dataset.root), template=template, **backend_kw)
        counts = caption_images(ids, dataset.load_image, engine, template, store, batch_size=batch_size, progress=progress)
    return {"out": str(out), "model": engine.model_id, "prompt": template.id, "shard": f"{shard[0]}/{shard[1]}", **counts}
