#!/usr/bin/env python
"""Draw example queries of a Fashion-MNIST board benchmark: reference, text, a correct target and
the query's hard distractors (with their kinds), one row per edit type.

    python tools/board_examples.py --root data/fashion_boards --split test --out docs/fashion_boards.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from csmcir.data.boards import EDIT_TYPES
from csmcir.data.custom import read_triplets
from csmcir.errors import CsmcirError

SCALE = 2
PAD = 6


def draw(root: Path, split: str, out: Path, per_type: int) -> None:
    triplets = read_triplets(root / f"triplets.{split}.jsonl")
    rows = []
    for etype in EDIT_TYPES:
        rows += [t for t in triplets if t.meta.get("type") == etype][:per_type]
    if not rows:
        raise CsmcirError(f"{root / f'triplets.{split}.jsonl'}: no board queries (is {root} a Fashion-MNIST board benchmark?)")
    side = 64 * SCALE
    columns = 2 + max(len(t.meta.get("distractors", [])) for t in rows)
    row_h = side + 34
    sheet = Image.new("RGB", (PAD + columns * (side + PAD), PAD + len(rows) * row_h), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)

    def tile(image_id: str, col: int, row: int, label: str, colour=(0, 0, 0)) -> None:
        im = Image.open(root / "images" / f"{image_id}.png").convert("RGB").resize((side, side), Image.NEAREST)
        x, y = PAD + col * (side + PAD), PAD + row * row_h
        sheet.paste(im, (x, y + 14))
        pen.text((x, y + 16 + side), label, fill=colour)

    for r, t in enumerate(rows):
        pen.text((PAD, PAD + r * row_h), f"{t.meta['type']}: {t.text}", fill=(0, 0, 160))
        tile(t.reference, 0, r, "reference")
        tile(t.targets[0], 1, r, f"target (1 of {len(t.targets)})", (0, 120, 0))
        for c, (image_id, kind) in enumerate(t.meta.get("distractors", [])):
            tile(image_id, 2 + c, r, kind, (170, 0, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="a board benchmark (csmcir synth --source fashion)")
    p.add_argument("--split", default="test")
    p.add_argument("--per-type", type=int, default=1, help="queries drawn per edit type (default 1)")
    p.add_argument("--out", required=True, help="PNG to write")
    a = p.parse_args()
    try:
        draw(Path(a.root), a.split, Path(a.out), a.per_type)
    except CsmcirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
