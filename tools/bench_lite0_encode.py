#!/usr/bin/env python
"""Images a second through the frozen EfficientNet-Lite0 tower, the way the feature cache encodes.

    python tools/bench_lite0_encode.py --size 112 --threads 2

Times the plain tower at batch 256 and 64, and its ``inference_copy()`` (BatchNorm folded into
the convs, channels-last) at batch 64, on random uint8 images; best of 3 after a warm-up. Run it
alone on the machine. docs/efficientnet.md quotes it.
"""

from __future__ import annotations

import argparse
import time

import torch

from csmcir.models.build import NetworkSpec, build_network


def rate(fn, x, repeats: int = 3) -> float:
    with torch.no_grad():
        fn(x[:8])
        best = min(_time(fn, x) for _ in range(repeats))
    return x.shape[0] / best


def _time(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    net = build_network(
        NetworkSpec(
            model="lite0_minilm", overrides={"vision": {"image_size": a.size}}, init=[{"source": "efficientnet", "path": "package"}]
        )
    )
    tower = net.vision.requires_grad_(False).eval()
    fast = tower.inference_copy()
    x = torch.randint(0, 256, (256, 3, a.size, a.size), dtype=torch.uint8)
    print(f"| {a.size} px, {a.threads} threads | images/s |\n|---|---:|")
    print(f"| plain tower, batch 256 | {rate(tower, x):.0f} |")
    print(f"| plain tower, batch 64 | {rate(tower, x[:64]):.0f} |")
    print(f"| inference_copy (folded BatchNorm, channels-last), batch 64 | {rate(fast, x[:64]):.0f} |")


if __name__ == "__main__":
    main()
