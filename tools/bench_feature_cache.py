#!/usr/bin/env python
"""Training step time with and without the frozen-feature cache (model.feature_cache).

    python tools/bench_feature_cache.py --model base --batch 4 --steps 3 --out docs/results/bench_feature_cache.json

Random weights (cost does not depend on them). The vision tower is frozen, as with pretrained
BLIP-2 weights. One step = what ``CIRModule.training_step`` computes for a batch: the reference
and target images through the vision tower (pixels) or read as float16 features (cache), the query
and target Q-Former passes (plus the reference-negative pass), bidirectional InfoNCE, backward and
an AdamW step. Also times the one-off cost of caching an image (a vision forward in eval mode).
Prints per-step seconds and the epoch time these imply for ``--epoch-queries`` queries.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from csmcir.factory import create_model
from csmcir.losses import InfoNCELoss


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base", help="model config (base = BLIP-2 ViT-g + BERT-base Q-Former)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    p.add_argument("--text-len", type=int, default=24)
    p.add_argument("--epoch-queries", type=int, default=28225, help="queries per epoch to extrapolate to (CIRR train: 28225)")
    p.add_argument("--epoch-images", type=int, default=16939, help="distinct images to cache (CIRR train: 16939)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="JSON file for the numbers")
    a = p.parse_args()

    torch.manual_seed(0)
    dev = torch.device(a.device)
    model = create_model(a.model).to(dev)
    model.vision.requires_grad_(False).eval()
    loss_fn = InfoNCELoss(0.07, True, bidirectional=True).to(dev)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad] + list(loss_fn.parameters()), lr=1e-5)
    side = model.cfg.vision.image_size
    b = a.batch
    ref = torch.randint(0, 255, (b, 3, side, side), dtype=torch.uint8, device=dev)
    tgt = torch.randint(0, 255, (b, 3, side, side), dtype=torch.uint8, device=dev)
    ids = torch.randint(1000, 2000, (b, a.text_len), device=dev)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref_f, tgt_f = model.encode_image(ref).half(), model.encode_image(tgt).half()  # what the cache holds

    def step(r, t) -> None:
        rf = model.encode_image(r)
        q = model.encode(ids, mask, image_features=rf)
        c = model.encode(torch.cat([ids, ids]), torch.cat([mask, mask]), image_features=torch.cat([model.encode_image(t), rf]))
        loss = loss_fn(q, c[:b], extra=c[b:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(fn, n) -> list[float]:
        fn()
        out = []
        for _ in range(n):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return out

    pixels = timed(lambda: step(ref, tgt), a.steps)
    cached = timed(lambda: step(ref_f, tgt_f), a.steps)
    with torch.no_grad():
        encode = timed(lambda: model.encode_image(ref), a.steps)
    feat = tuple(ref_f.shape[1:])
    res = {
        "model": a.model,
        "batch": b,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": str(date.today()),
        "params_total_m": sum(x.numel() for x in model.parameters()) / 1e6,
        "params_trained_m": sum(x.numel() for x in model.parameters() if x.requires_grad) / 1e6,
        "step_s_pixels": statistics.median(pixels),
        "step_s_cached": statistics.median(cached),
        "cache_s_per_image": statistics.median(encode) / b,
        "feature_shape": feat,
        "cache_bytes_per_image": feat[0] * feat[1] * 2,
    }
    steps = a.epoch_queries / b
    res["epoch_h_pixels"] = steps * res["step_s_pixels"] / 3600
    res["epoch_h_cached"] = steps * res["step_s_cached"] / 3600
    res["cache_build_h"] = a.epoch_images * res["cache_s_per_image"] / 3600
    res["speedup"] = res["step_s_pixels"] / res["step_s_cached"]
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
