#!/usr/bin/env python
"""Time the memory bank's entropy selection, exact sort against the sampled k-th largest.

    python tools/bench_bank_selection.py --threads 1

A full bank of ``--capacity`` random unit embeddings, ``--batch`` queries whose in-batch logits
range from flat (entropy 1) to peaked (entropy ~0), so each keeps a different share. For
``select_sample`` null (the exact sort) and ``--sample``: the median time of
``MemoryBank._select`` and of the whole ``MemoryBank.bias``, and how far the kept share of each
query moves against the exact one (points of the bank). Then ``MemoryBank.same_id`` (the slots
holding one of each query's ``--targets`` correct ids, as a lookup table) against the
``[B, T, capacity]`` broadcast comparison it replaced. Run it alone: it is a timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from csmcir.losses import MemoryBank


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capacity", type=int, default=4096)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--sample", type=int, default=512, help="select_sample of the sampled arm")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--targets", type=int, default=68, help="correct target ids per query (same_id; the synthetic train split pads to 68)")
    p.add_argument("--ids", type=int, default=20000, help="ids are drawn from [0, --ids)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(a.capacity, a.dim, generator=g), dim=1)
    q = F.normalize(torch.randn(a.batch, a.dim, generator=g), dim=1)
    batch = torch.randn(a.batch, 2 * a.batch, generator=g) * torch.linspace(0.1, 30, a.batch)[:, None]
    no_targets = torch.full((a.batch, 1), -1)
    kept = {}
    print("| select_sample | _select ms | bias ms | kept entries, mean |\n|---|---:|---:|---:|")
    for sample in (None, a.sample):
        bank = MemoryBank(a.dim, capacity=a.capacity, max_age=None, half_life=None, min_fraction=0.25, select_sample=sample)
        bank.enqueue(emb, torch.arange(a.capacity), step=0)
        sims, bias = 30.0 * q @ emb.t(), torch.zeros(a.batch, a.capacity)
        t_sel, t_bias = [], []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            bank._select(bias, sims, batch)
            t_sel.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = bank.bias(q, 30.0, no_targets, 0, batch)
            t_bias.append(time.perf_counter() - t0)
        kept[sample] = torch.isfinite(out).sum(1).float()
        print(f"| {sample} | {1e3 * statistics.median(t_sel):.1f} | {1e3 * statistics.median(t_bias):.1f} | {kept[sample].mean():.0f} |")
    d = (kept[a.sample] - kept[None]).abs() / a.capacity * 100
    print(f"kept share against the exact sort: {d.mean():.2f} points of the bank on average, {d.max():.2f} at most")
    bank = MemoryBank(a.dim, capacity=a.capacity, max_age=None, half_life=None)
    bank.enqueue(emb, torch.randint(0, a.ids, (a.capacity,), generator=g), step=0)
    targets = torch.randint(0, a.ids, (a.batch, a.targets), generator=g)
    targets[:, -1] = -1  # padding, as in a batch whose queries have fewer correct targets
    times = {}
    for name, fn in (
        ("lookup", lambda: bank.same_id(targets)),
        ("broadcast", lambda: (targets[:, :, None] == bank.ids[None, None, :]).any(1)),
    ):
        t = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            out = fn()
            t.append(time.perf_counter() - t0)
        times[name] = (1e3 * statistics.median(t), out)
    assert torch.equal(times["lookup"][1], times["broadcast"][1])
    print(
        f"same_id ({a.batch} queries x {a.capacity} slots, {a.targets} targets each): lookup {times['lookup'][0]:.2f} ms, "
        f"broadcast comparison {times['broadcast'][0]:.2f} ms, identical masks"
    )


if __name__ == "__main__":
    main()
