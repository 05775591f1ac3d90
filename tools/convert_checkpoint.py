"""Convert a checkpoint written by csmcir 0.1 (format 1) to the current format, so that
``csmcir fit|test --ckpt_path`` accepts it (inference commands read both formats as they are).

    python tools/convert_checkpoint.py checkpoints/synthetic/last.ckpt --out checkpoints/synthetic/last.v2.ckpt
"""

from __future__ import annotations

import argparse
import json
import sys

from csmcir.errors import CsmcirError
from csmcir.inference import convert_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .ckpt written by csmcir 0.1")
    p.add_argument("--out", required=True, help="the converted .ckpt to write (the input is left as it is)")
    a = p.parse_args(argv)
    try:
        print(json.dumps(convert_checkpoint(a.checkpoint, a.out)))
    except CsmcirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
