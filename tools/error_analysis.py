#!/usr/bin/env python
"""Where a model's rankings fail: recall and rank of the first correct target per query type,
and the top hits of failed queries of one type.

    csmcir rank --ckpt checkpoints/synthetic/last.ckpt --dataset custom --root data/synthetic \
        --split test --out rank_test.json --k 200
    python tools/error_analysis.py --root data/synthetic --split test --rank rank_test.json \
        --type remove --examples 8

Types come from each triplet's ``meta.type`` ("all" without one). Examples show each image's
final caption, or its ground truth when the dataset has one (``scenes.jsonl`` of the synthetic
benchmark, ``boards.jsonl`` of the Fashion-MNIST boards), so a caption's omissions do not hide
what the image holds. A correct target ranked below the rankings' depth counts as rank = depth.
Where triplets list their hard distractors with kinds (``meta.distractors``, the boards), a
second table says what took the first place of each failed query: which distractor kind, the
reference, or another gallery image.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from csmcir.data.custom import CustomCIR
from csmcir.errors import CsmcirError
from csmcir.retrieval.protocols import read_rankings


def first_correct_ranks(rankings: dict[str, list[str]], triplets) -> dict[str, list[int]]:
    """Per type, the 0-based rank of each query's first correct target (depth if none ranked)."""
    out: dict[str, list[int]] = defaultdict(list)
    for t in triplets:
        ranked = rankings.get(t.id)
        if ranked is None:
            raise SystemExit(f"error: query {t.id} is not in the rankings file")
        targets = set(t.targets)
        rank = next((i for i, g in enumerate(ranked) if g in targets), len(ranked))
        out[str(t.meta.get("type", "all"))].append(rank)
    return out


def first_place_of_failures(rankings: dict[str, list[str]], triplets) -> dict[str, dict[str, int]]:
    """Per type, what the top hit of each failed query was: a listed distractor's kind
    (``meta.distractors``), ``reference``, or ``elsewhere`` (another gallery image)."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for t in triplets:
        ranked = rankings.get(t.id) or []
        if not ranked or ranked[0] in t.targets:
            continue
        kinds = {image_id: kind for image_id, kind in t.meta.get("distractors", [])}
        top = ranked[0]
        out[str(t.meta.get("type", "all"))][kinds.get(top, "reference" if top == t.reference else "elsewhere")] += 1
    return out


def _describer(root: Path, ds: CustomCIR):
    boards_file = root / "boards.jsonl"
    if boards_file.is_file():
        boards = {}
        for line in boards_file.open():
            d = json.loads(line)
            boards[d["image_id"]] = "; ".join(f"{a['tint']} {a['class']} #{a['photo']} @{a['cell']}" for a in d["articles"])
        return lambda i: boards.get(i, "?")
    scenes_file = root / "scenes.jsonl"
    if scenes_file.is_file():
        scenes = {}
        for line in scenes_file.open():
            d = json.loads(line)
            scenes[d["image_id"]] = (
                "; ".join(f"{o['size']} {o['colour']} {o['pattern']} {o['shape']} @{o['cell']}" for o in d["objects"]) or "(empty)"
            )
        return lambda i: scenes.get(i, "?")
    captions = ds.captions()
    return lambda i: captions[i].final if i in captions else "(no caption)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="dataset folder (custom format)")
    p.add_argument("--split", required=True)
    p.add_argument("--rank", required=True, help="the JSON written by `csmcir rank`")
    p.add_argument("--type", help="show failed queries of this type")
    p.add_argument("--examples", type=int, default=5, help="failed queries shown (with --type)")
    p.add_argument("--top", type=int, default=3, help="hits shown per failed query")
    a = p.parse_args(argv)

    root = Path(a.root)
    ds = CustomCIR(root)
    triplets = ds.triplets(a.split)
    rankings = read_rankings(a.rank)
    ranks = first_correct_ranks(rankings, triplets)
    depth = max(len(v) for v in rankings.values())
    print(f"{'type':10s} {'n':>5s} {'R@1':>6s} {'R@10':>6s} {'median rank':>12s}   (rankings depth {depth})")
    for typ in sorted(ranks):
        r = ranks[typ]
        r1 = 100 * sum(x < 1 for x in r) / len(r)
        r10 = 100 * sum(x < 10 for x in r) / len(r)
        print(f"{typ:10s} {len(r):5d} {r1:6.1f} {r10:6.1f} {statistics.median(r) + 1:12.0f}")
    if any(t.meta.get("distractors") for t in triplets):
        firsts = first_place_of_failures(rankings, triplets)
        kinds = sorted({k for v in firsts.values() for k in v})
        print("\nfirst place of the failed queries (R@1 misses), by what it was:")
        print(f"{'type':10s} " + " ".join(f"{k:>13s}" for k in kinds))
        for typ in sorted(firsts):
            print(f"{typ:10s} " + " ".join(f"{firsts[typ].get(k, 0):13d}" for k in kinds))
    if not a.type:
        return
    describe = _describer(root, ds)
    shown = 0
    for t in triplets:
        if shown >= a.examples:
            break
        ranked = rankings[t.id]
        if str(t.meta.get("type", "all")) != a.type or (ranked and ranked[0] in t.targets):
            continue
        shown += 1
        print(f"\n{t.id}: {t.text!r}")
        print(f"  reference: {describe(t.reference)}")
        print(f"  target:    {describe(t.targets[0])}")
        for g in ranked[: a.top]:
            print(f"  hit:       {describe(g)}")


if __name__ == "__main__":
    try:
        main()
    except CsmcirError as e:  # bad input: one line, no traceback
        raise SystemExit(f"error: {e}") from None
