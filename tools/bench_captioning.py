#!/usr/bin/env python
"""Throughput of the captioning loop (`csmcir caption`'s code path) with a random-weight MLLM.

    python tools/bench_captioning.py --size tiny --images 64 --batch-sizes 1 8 --max-new-tokens 64
    python tools/bench_captioning.py --size 3b --device cuda --dtype bfloat16 --images 32 \
        --batch-sizes 1 8 --max-new-tokens 256 --image-size 448          # a GPU machine

Builds a Qwen2.5-VL (``--arch``) of the given size with random weights (``tiny``: 2 layers, 64-d;
``3b`` / ``7b``: the public Qwen2.5-VL-3B/7B-Instruct configurations), saves it, loads it back
through :class:`~csmcir.captioning.backends.TransformersBackend` like a user's checkpoint, and
captions ``--images`` random RGB images of ``--image-size`` pixels square into a fresh store per
batch size. Random weights rarely emit the end token, so every answer runs to
``--max-new-tokens``: the figure is the cost of answers that long (the built-in templates' five
lines take about 100-250 tokens). Prints images/s and seconds per image, and with ``--galleries``
the hours to caption galleries of those sizes at the best batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from csmcir.captioning import CaptionStore, caption_images
from csmcir.captioning.backends import TransformersBackend, resolve_dtype
from csmcir.captioning.prompts import NATURAL
from csmcir.testing.tiny_mllm import QWEN25_VL_SIZES, make_tiny_qwen2vl


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="qwen2_5_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    p.add_argument("--size", default="tiny", choices=["tiny", *QWEN25_VL_SIZES])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64, help="side of the square test images (pixels)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--model-dir", help="where to save the random model (default: a temp folder)")
    p.add_argument("--galleries", nargs="*", default=[], metavar="NAME=N", help="e.g. cirr_test1=2315: hours to caption N images")
    p.add_argument("--out", help="JSON file for the numbers")
    a = p.parse_args()
    if a.size != "tiny" and a.arch != "qwen2_5_vl":
        p.error("--size 3b/7b are Qwen2.5-VL configurations: use --arch qwen2_5_vl")

    pixels = a.image_size * a.image_size
    rng = np.random.default_rng(0)
    images = {
        f"img{i:05d}": Image.fromarray(rng.integers(0, 255, (a.image_size, a.image_size, 3), dtype=np.uint8)) for i in range(a.images)
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model_dir or str(Path(tmp) / "model")
        sizes = {} if a.size == "tiny" else QWEN25_VL_SIZES[a.size]
        device = "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
        make_tiny_qwen2vl(
            model_dir,
            arch=a.arch,
            min_pixels=min(pixels, 28 * 28 * 4),
            max_pixels=max(pixels, 28 * 28 * 4),
            dtype=resolve_dtype(a.dtype, device) if a.size != "tiny" else None,
            **sizes,
        )
        backend = TransformersBackend(model_dir, device=a.device, dtype=a.dtype, max_new_tokens=a.max_new_tokens)
        n_params = sum(x.numel() for x in backend.model.parameters())
        rows = []
        backend.generate(["warm"], [next(iter(images.values()))], NATURAL.prompt())  # first-call allocations
        for bs in a.batch_sizes:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with CaptionStore(Path(tmp) / f"store_bs{bs}.jsonl") as store:
                counts = caption_images(list(images), images.__getitem__, backend, NATURAL, store, batch_size=bs, progress=True)
            row = {"batch_size": bs, "images_per_s": counts["images_per_s"], "s_per_image": counts["seconds"] / a.images}
            if device.startswith("cuda"):
                row["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rows.append(row)
    best = max(rows, key=lambda r: r["images_per_s"])
    print(
        f"{a.arch} {a.size} ({n_params / 1e6:.1f} M parameters), {backend.settings()['dtype']} on {device}, "
        f"{a.image_size}x{a.image_size} images, {a.max_new_tokens} new tokens per answer"
    )
    print("| batch | images/s | s/image |\n|---|---|---|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['images_per_s']:.3f} | {r['s_per_image']:.3f} |")
    expected = {}
    for g in a.galleries:
        name, n = g.split("=")
        expected[name] = {"images": int(n), "hours": int(n) / best["images_per_s"] / 3600}
        print(f"{name}: {int(n)} images -> {expected[name]['hours']:.2f} h at batch {best['batch_size']}")
    if a.out:
        meta = {
            "command": "python " + " ".join(sys.argv),
            "date": str(date.today()),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        }
        Path(a.out).write_text(
            json.dumps(
                {
                    "meta": meta,
                    "arch": a.arch,
                    "size": a.size,
                    "parameters": n_params,
                    "image_size": a.image_size,
                    "max_new_tokens": a.max_new_tokens,
                    "rows": rows,
                    "expected": expected,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
