#!/usr/bin/env python
"""Images a second through the frozen EfficientNet-Lite0 tower, the way the feature cache encodes.

    python tools/bench_lite0_encode.py --model lite0_small --threads 2 --batches 16 32 64

Times the plain tower at batch 256 and 64 and its ``inference_copy()`` (BatchNorm folded into the
convs, channels-last) at batch 64, on random uint8 images, best of 3 after a warm-up; then the
real fill, ``FeatureCache.features`` into a temporary folder (memory-mapped writes and the
resumable done-file included), at each ``--batches`` size, best of ``--repeats``. Run it alone on
the machine. docs/efficientnet.md quotes it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict

import torch

from csmcir.data.feature_cache import FeatureCache, tower_key
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


def fill_rate(tower, fast, x: torch.Tensor, batch_size: int) -> float:
    """Images/s of one cache fill of ``x`` at ``batch_size``, from an empty folder."""
    cfg = asdict(tower.cfg)
    ids = [f"i{k}" for k in range(len(x))]
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        cache = FeatureCache(d, tower_key(tower, cfg), cfg)
        shape = tuple(fast(x[:1]).shape[1:])
        t = time.perf_counter()
        cache.features("bench", ids, shape, load=lambda rows: x[rows], encode=fast, batch_size=batch_size, progress=False)
        return len(x) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lite0_small", help="a model config with an efficientnet_lite0 tower")
    p.add_argument("--size", type=int, help="input side (default: the config's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64], help="cache-fill batch sizes to time")
    p.add_argument("--images", type=int, default=3072, help="images per timed fill")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    overrides = {"vision": {"image_size": a.size}} if a.size else None
    net = build_network(NetworkSpec(model=a.model, overrides=overrides, init=[{"source": "efficientnet", "path": "package"}]))
    tower = net.vision.requires_grad_(False).eval()
    fast = tower.inference_copy()
    size, stage = tower.cfg.image_size, tower.cfg.feature_stage
    x = torch.randint(0, 256, (256, 3, size, size), dtype=torch.uint8)
    print(f"| {a.model}: {size} px, {stage}, {a.threads} threads | images/s |\n|---|---:|")
    print(f"| plain tower, batch 256 | {rate(tower, x):.0f} |")
    print(f"| plain tower, batch 64 | {rate(tower, x[:64]):.0f} |")
    print(f"| inference_copy (folded BatchNorm, channels-last), batch 64 | {rate(fast, x[:64]):.0f} |")
    big = torch.randint(0, 256, (a.images, 3, size, size), dtype=torch.uint8)
    for bs in a.batches:
        best = max(fill_rate(tower, fast, big, bs) for _ in range(a.repeats))
        print(f"| cache fill ({a.images} images, FeatureCache.features), batch {bs} | {best:.0f} |", flush=True)


if __name__ == "__main__":
    main()
