#!/usr/bin/env python
"""Score a checkpoint against the shortcut baselines (image-only, text-only, raw-pixel NN).

    python tools/baselines.py --ckpt checkpoints/synthetic/last.ckpt --root data/synthetic \
        --splits test heldout --out docs/results/baselines.json

Prints a markdown table per split and writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import sys

from csmcir.data.custom import CustomCIR
from csmcir.data.store import SplitStore
from csmcir.errors import CsmcirError
from csmcir.inference import Encoder
from csmcir.io import atomic_write_json
from csmcir.retrieval.baselines import evaluate_baselines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--splits", nargs="+", default=["test", "heldout"])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON file for all numbers")
    a = p.parse_args()
    try:
        enc = Encoder.from_checkpoint(a.ckpt, a.device)
        text = enc.text
        ds = CustomCIR(a.root)
        all_results = {}
        for split in a.splits:
            store = SplitStore.build(ds, split, text)
            res = evaluate_baselines(enc.model, store, enc.device)
            all_results[split] = res
            print(f"\n{split} ({store.num_queries} queries, gallery {len(store.gallery_rows)})\n")
            print("| query | R@1 | R@5 | R@10 | R@50 |\n|---|---|---|---|---|")
            for name, m in res.items():
                print(f"| {name} | " + " | ".join(f"{m[k]:.1f}" for k in ("R@1", "R@5", "R@10", "R@50")) + " |")
            types = {k.split("/", 1)[1]: v for k, v in res["model"].items() if k.startswith("R@1/")}
            if types:
                print("\nmodel R@1 per modification type: " + ", ".join(f"{k} {v:.1f}" for k, v in types.items()))
        if a.out:
            atomic_write_json(a.out, all_results)
    except CsmcirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
