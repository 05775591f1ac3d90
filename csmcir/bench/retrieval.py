"""``csmcir bench retrieval``: exact and approximate search over galleries of 10k to 1M embeddings.

For each gallery size it builds every index kind of :mod:`csmcir.retrieval.index` through
:meth:`GalleryIndex.build` (the code ``csmcir index`` runs) and measures:

* build time and index size (bytes of the serialised faiss index);
* queries/s at a batch of queries (``batch``) and at batch 1;
* recall@k of each approximate index against exact search (``|approx top-k & exact top-k| / k``),
  over a sweep of its speed knob (``nprobe`` for IVF, ``efSearch`` for HNSW);
* for exact search, the effective gallery bytes scanned per second (queries/s x gallery bytes),
  set beside this machine's measured memory read bandwidth. At batch 1 a search streams the whole
  gallery from memory, so this is bounded by the bandwidth; a batch of queries reuses each
  gallery block from cache (a matrix product), so its effective rate can exceed it;
* torch ``matmul + topk`` as the naive baseline, in chunks of queries.

Embeddings are synthetic, L2-normalised, of the model's dimension:

* ``clustered`` (default): a mixture of ``n / 100`` random directions with Gaussian spread, queries
  drawn from the same mixture, so every query has near neighbours, as trained CIR embeddings do;
* ``uniform``: uniform on the sphere, the worst case for partition-based indexes (no structure).

Recall figures depend on the data: rerun on your own gallery embeddings (``--embeddings E.npy``)
before trusting an approximate index with them.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import CsmcirError
from ..retrieval.index import GalleryIndex, faiss_gpu_available

__all__ = ["make_embeddings", "read_bandwidth_gbs", "run_retrieval_bench", "markdown_table"]

KNOBS = {
    "ivf_flat": ("nprobe", [1, 2, 4, 8, 16, 32, 64, 128, 256]),
    "ivf_pq": ("nprobe", [1, 2, 4, 8, 16, 32, 64, 128, 256]),
    "hnsw": ("ef_search", [16, 32, 64, 128, 256, 512]),
}


def make_embeddings(
    n: int, dim: int, n_queries: int, data: str = "clustered", seed: int = 0, spread: float = 0.6
) -> tuple[np.ndarray, np.ndarray]:
    """``(gallery [n, dim], queries [n_queries, dim])``, float32 and L2-normalised (module docstring)."""
    rng = np.random.default_rng(seed)

    def unit(x: np.ndarray) -> np.ndarray:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    if data == "uniform":
        draw = lambda m: unit(rng.standard_normal((m, dim), dtype=np.float32))  # noqa: E731
    elif data == "clustered":
        centres = unit(rng.standard_normal((max(n // 100, 1), dim), dtype=np.float32))

        def draw(m: int) -> np.ndarray:
            out = np.empty((m, dim), dtype=np.float32)
            for s in range(0, m, 65536):  # chunks keep the temporaries small at 1M
                c = centres[rng.integers(0, len(centres), min(65536, m - s))]
                out[s : s + len(c)] = unit(c + rng.standard_normal(c.shape, dtype=np.float32) * (spread / np.sqrt(dim)))
            return out
    else:
        raise CsmcirError(f"unknown embedding data {data!r}: clustered or uniform")
    return draw(n), draw(n_queries)


def read_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: the best of ``repeats`` full reductions of an ``nbytes``
    float32 array with every torch thread (a read-only stream, as exact search is)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def _timed_search(search, queries: np.ndarray, batch: int, min_seconds: float) -> tuple[float, np.ndarray]:
    """Queries/s of ``search(q_batch) -> ids`` over all queries (repeated to ``min_seconds``), and
    the ids of the first pass."""
    first = None
    done, t0 = 0, time.perf_counter()
    while True:
        parts = [search(queries[s : s + batch]) for s in range(0, len(queries), batch)]
        if first is None:
            first = np.concatenate(parts)
        done += len(queries)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return done / elapsed, first


def _recall(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(e.tolist())) / k for a, e in zip(approx, exact)]))


def _torch_search(gallery: torch.Tensor, k: int):
    def search(q: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.topk(torch.from_numpy(q) @ gallery.T, k, dim=1).indices.numpy()

    return search


def _index_search(index: GalleryIndex, k: int):
    def search(q: np.ndarray) -> np.ndarray:  # row numbers: mapping them to id strings is not search
        return index.search_rows(q, k)[1]

    return search


@dataclass
class BenchSettings:
    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    dim: int = 256
    queries: int = 1000
    k: int = 50
    batch: int = 1000
    kinds: tuple[str, ...] = ("torch", "flat", "ivf_flat", "ivf_pq", "hnsw")
    data: str = "clustered"
    seed: int = 0
    min_seconds: float = 2.0
    batch1_queries: int = 100
    target_recall: float = 0.95


def run_retrieval_bench(cfg: BenchSettings, embeddings: np.ndarray | None = None, progress: bool = True) -> dict:
    """Run the benchmark (module docstring); returns ``{"machine": ..., "rows": [...]}``.

    ``embeddings`` replaces the synthetic gallery (its first ``queries`` rows become the queries and
    are left out of the gallery).
    """
    bandwidth = read_bandwidth_gbs()
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "faiss_gpu": faiss_gpu_available(),
        "read_bandwidth_gbs": round(bandwidth, 2),
        "load_average_1min": round(__import__("os").getloadavg()[0], 2),
        "data": cfg.data if embeddings is None else "user embeddings",
    }
    rows = []
    steps = [(n, kind) for n in cfg.sizes for kind in cfg.kinds]
    bar = tqdm(steps, desc="bench retrieval", disable=not progress)
    cache: dict = {}
    for n, kind in bar:
        bar.set_postfix_str(f"{kind} @ {n}")
        if cache.get("n") != n:
            if embeddings is not None:
                if n + cfg.queries > len(embeddings):
                    raise CsmcirError(f"--embeddings has {len(embeddings)} rows: too few for a gallery of {n} plus {cfg.queries} queries")
                q, g = embeddings[: cfg.queries], embeddings[cfg.queries : cfg.queries + n]
            else:
                g, q = make_embeddings(n, cfg.dim, cfg.queries, cfg.data, cfg.seed)
            cache = {"n": n, "g": g, "q": q, "exact": None, "torch_ids": None}
        g, q = cache["g"], cache["q"]
        base = {"n": n, "dim": int(g.shape[1]), "kind": kind, "k": cfg.k}
        if kind == "torch":
            gt = torch.from_numpy(g)
            # chunk so the score matrix stays near 256 MB
            chunk = max(1, min(cfg.batch, (1 << 26) // n))
            qps, ids = _timed_search(_torch_search(gt, cfg.k), q, chunk, cfg.min_seconds)
            qps1, _ = _timed_search(_torch_search(gt, cfg.k), q[: cfg.batch1_queries], 1, cfg.min_seconds / 2)
            row = {**base, "build_s": 0.0, "bytes": int(g.nbytes), "qps": qps, "qps_batch1": qps1, "batch": chunk}
            if cache["exact"] is not None:
                row["recall"] = _recall(ids, cache["exact"])
            cache["torch_ids"] = ids  # a flat row measured later scores it
            rows.append(row)
        else:
            t = time.perf_counter()
            index = GalleryIndex.build(g, [str(i) for i in range(n)], kind=kind, use_gpu=False)
            build_s = time.perf_counter() - t
            size = int(faiss.serialize_index(index._index).nbytes)
            if kind == "flat":
                qps, ids = _timed_search(_index_search(index, cfg.k), q, cfg.batch, cfg.min_seconds)
                qps1, _ = _timed_search(_index_search(index, cfg.k), q[: cfg.batch1_queries], 1, cfg.min_seconds / 2)
                cache["exact"] = ids
                for r in rows:  # a torch row measured before flat gets its recall now
                    if r["n"] == n and r["kind"] == "torch" and "recall" not in r:
                        r["recall"] = _recall(cache["torch_ids"], ids)
                rows.append(
                    {
                        **base,
                        "build_s": build_s,
                        "bytes": size,
                        "qps": qps,
                        "qps_batch1": qps1,
                        "recall": 1.0,
                        "batch": cfg.batch,
                        "scan_gbs": qps * g.nbytes / 1e9,
                        "scan_gbs_batch1": qps1 * g.nbytes / 1e9,
                    }
                )
            else:
                if cache["exact"] is None:
                    cache["exact"] = _index_search(GalleryIndex.build(g, [str(i) for i in range(n)], kind="flat", use_gpu=False), cfg.k)(q)
                knob, values = KNOBS[kind]
                limit = int(index.info["ivf"]["nlist"]) if kind.startswith("ivf") else max(values)
                default = index.info["ivf"]["nprobe"] if kind.startswith("ivf") else index.info["hnsw"]["ef_search"]
                sweep = []
                for v in sorted({x for x in values if x <= limit} | {default}):
                    index.set_search_params(**{knob: v})
                    qps, ids = _timed_search(_index_search(index, cfg.k), q, cfg.batch, cfg.min_seconds / 2)
                    sweep.append({knob: v, "qps": qps, "recall": _recall(ids, cache["exact"])})
                ok = [s for s in sweep if s["recall"] >= cfg.target_recall]
                best = max(ok, key=lambda s: s["qps"]) if ok else max(sweep, key=lambda s: s["recall"])
                at_default = next(s for s in sweep if s[knob] == default)
                index.set_search_params(**{knob: default})
                qps1, _ = _timed_search(_index_search(index, cfg.k), q[: cfg.batch1_queries], 1, cfg.min_seconds / 2)
                rows.append(
                    {
                        **base,
                        "build_s": build_s,
                        "bytes": size,
                        "batch": cfg.batch,
                        "params": index.info.get("ivf") or index.info.get("hnsw"),
                        "qps": at_default["qps"],
                        "recall": at_default["recall"],
                        "qps_batch1": qps1,
                        "knob": knob,
                        "default": default,
                        "sweep": sweep,
                        "at_target": {**best, "target_recall": cfg.target_recall, "reached": bool(ok)},
                    }
                )
            del index
    for r in rows:  # speed against exact search at the same size
        flat = next((f for f in rows if f["n"] == r["n"] and f["kind"] == "flat"), None)
        if flat is not None:
            r["speedup_vs_flat"] = r["qps"] / flat["qps"]
            if "at_target" in r:
                r["at_target"]["speedup_vs_flat"] = r["at_target"]["qps"] / flat["qps"]
    return {"machine": machine, "settings": cfg.__dict__, "rows": rows}


def markdown_table(result: dict) -> str:
    """The benchmark as a markdown table (one line per size and kind)."""
    bw = result["machine"]["read_bandwidth_gbs"]
    lines = [
        f"Memory read bandwidth (measured): {bw:.1f} GB/s; load average at start "
        f"{result['machine'].get('load_average_1min', float('nan')):.2f}; data: {result['machine']['data']}; "
        f"k = {result['settings']['k']}; batch = {result['settings']['batch']} queries.",
        "",
        "| gallery | kind | params | build s | MB | queries/s | x flat | recall@k | queries/s batch 1 | effective GB/s scanned (batch / batch 1) | at recall >= target |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["rows"]:
        params = ", ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items())
        scan = f"{r['scan_gbs']:.1f} / {r['scan_gbs_batch1']:.1f}" if "scan_gbs" in r else ""
        tgt = ""
        if "at_target" in r:
            a = r["at_target"]
            tgt = (
                f"{r['knob']}={a[r['knob']]}: {a['qps']:.0f} q/s, {a['recall']:.3f}, {a.get('speedup_vs_flat', 0):.1f}x flat"
                if a["reached"]
                else f"not reached (best {a['recall']:.3f})"
            )
        lines.append(
            f"| {r['n']:,} | {r['kind']} | {params} | {r['build_s']:.2f} | {r['bytes'] / 1e6:.0f} | {r['qps']:.0f} | "
            f"{r.get('speedup_vs_flat', float('nan')):.2f} | {r.get('recall', float('nan')):.3f} | {r['qps_batch1']:.0f} | {scan} | {tgt} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: str | Path) -> list[Path]:
    """``bench_retrieval.json``, ``.md`` and ``.png`` (recall against queries/s) into ``out``."""
    from . import write_bench_outputs

    return write_bench_outputs(result, out, "bench_retrieval", markdown_table(result), _plot)


def _plot(plt, result: dict):
    sizes = sorted({r["n"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for r in (r for r in result["rows"] if r["n"] == n):
            if "sweep" in r:
                ax.plot([s["qps"] for s in r["sweep"]], [s["recall"] for s in r["sweep"]], "o-", label=r["kind"], ms=3)
            else:
                ax.plot([r["qps"]], [r.get("recall", 1.0)], "s", label=r["kind"], ms=7)
        ax.axhline(result["settings"]["target_recall"], color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("queries/s (log)")
        ax.set_ylabel(f"recall@{result['settings']['k']} vs exact")
        ax.set_title(f"{n:,} x {result['rows'][0]['dim']}")
        ax.legend(fontsize=8)
    return fig
