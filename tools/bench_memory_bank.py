#!/usr/bin/env python
"""Time per training step with and without the memory bank, on the synthetic default.

    python tools/bench_memory_bank.py --root data/synthetic --steps 70 --skip 40 --repeats 2 \
        --out docs/results/bench_memory_bank.json

Runs the default model and data (configs/synthetic.yaml values) for ``--steps`` optimizer steps
per variant in one process: in-batch negatives only, the plain FIFO queue and the entropy +
temporal bank, both at the default capacity. Times every step (data, forward, backward, optimizer
step, and the bank's own work: selection, enqueue, the drift probe) and reports the median and
mean over the steps after ``--skip`` (the bank fills after capacity / batch steps). Variants are
interleaved ``--repeats`` times so a slow spell of the machine hits all of them. Generates the
benchmark into ``--root`` first if it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date

import lightning as L
import torch

from csmcir.data.datamodule import CIRDataModule
from csmcir.lightning.module import CIRModule
from csmcir.models import NetworkSpec

VARIANTS = {
    "in_batch": None,
    "fifo_bank": {"capacity": 4096, "max_age": None, "half_life": None, "min_fraction": 1.0},
    "entropy_bank": {"capacity": 4096, "max_age": 200, "half_life": 100, "min_fraction": 0.25},
    "momentum_bank": {"capacity": 4096, "max_age": 200, "half_life": 100, "min_fraction": 0.25, "momentum": 0.99},
    # the same with keys from the EMA Q-Former on the step's own target features (no second vision pass)
    "momentum_qformer_bank": {
        "capacity": 4096,
        "max_age": 200,
        "half_life": 100,
        "min_fraction": 0.25,
        "momentum": 0.99,
        "momentum_keys": "qformer",
    },
}


class StepTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)


def time_variant(bank: dict | None, dm: CIRDataModule, steps: int, seed: int) -> list[float]:
    L.seed_everything(seed, verbose=False)
    # Q-Former keys need a frozen tower (CIRModule refuses a trained one): that step also skips the
    # tower's backward, so compare its whole-step time with care; the work timings below are like for like
    module = CIRModule(net=NetworkSpec(freeze_vision=bool(bank) and bank.get("momentum_keys") == "qformer"), memory_bank=bank)
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
    return timer.times


def bank_work(bank: dict, reps: int, batch: int = 128, dim: int = 128, seed: int = 0) -> dict[str, float]:
    """Median seconds of the loss (forward + backward) without and with the bank, the bank's own
    steps (evict, selection, enqueue) included, on a full bank; interleaved, so both see the same
    machine. Also the drift probe: re-encoding ``drift_sample`` targets with the default model."""
    import torch.nn.functional as F

    from csmcir.losses import MemoryBank, bank_nce, same_target_mask
    from csmcir.losses.contrastive import InfoNCELoss

    g = torch.Generator().manual_seed(seed)
    loss = InfoNCELoss(0.01, True, bidirectional=True)
    mb = MemoryBank(dim, **bank)
    momentum = mb.momentum is not None
    ids = torch.arange(100_000, 100_000 + mb.capacity)
    mb.enqueue(F.normalize(torch.randn(mb.capacity, dim, generator=g), dim=1), ids, step=0)
    rows = torch.arange(2 * batch)  # the targets, then the reference negatives
    all_targets = rows[:batch, None]
    mask = same_target_mask(rows, all_targets)
    t_base, t_bank = [], []
    for r in range(reps):
        q = F.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
        cand = F.normalize(torch.randn(2 * batch, dim, generator=g), dim=1).requires_grad_()
        t0 = time.perf_counter()
        loss(q, cand, mask).backward()
        t_base.append(time.perf_counter() - t0)
        step = 1 + r % 20  # ages within max_age: the bank stays full
        t0 = time.perf_counter()
        mb.evict(step)
        scale = loss.logit_scale.clamp(max=loss.max_log_scale).exp()
        with torch.no_grad():
            batch_logits = (scale * q @ cand.t()).masked_fill(mask & ~torch.eye(batch, 2 * batch, dtype=torch.bool), float("-inf"))
        bias = mb.bias(q, scale, all_targets, step, batch_logits)
        if momentum:  # in-batch loss plus the bank term against momentum keys (their encoding is timed apart)
            key = F.normalize(torch.randn(batch, dim, generator=g), dim=1)
            ls = loss.logit_scale.clamp(max=loss.max_log_scale)
            (loss(q, cand, mask) + mb.weight * bank_nce(q, key, mb.emb.clone(), bias, ls)).backward()
        else:
            loss(q, cand, mask, extra=mb.emb.clone(), extra_bias=bias).backward()
        mb.enqueue(cand[:batch].detach(), ids[:batch], step)
        t_bank.append(time.perf_counter() - t0)
    out = {"loss_s": statistics.median(t_base), "loss_with_bank_s": statistics.median(t_bank)}
    out["bank_added_s"] = out["loss_with_bank_s"] - out["loss_s"]
    return out


def ema_update_s(reps: int = 20, skip_vision: bool = False) -> float:
    """Median seconds of one EMA update of the default model's weights (momentum bank); with
    ``skip_vision`` only the Q-Former side, as ``momentum_keys: qformer`` does."""
    import copy

    module = CIRModule()
    ema = copy.deepcopy(module.model).requires_grad_(False)
    pairs = [
        (pe, p) for (n, pe), p in zip(ema.named_parameters(), module.model.parameters()) if not (skip_vision and n.startswith("vision."))
    ]
    ts = []
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            for pe, p in pairs:
                pe.lerp_(p, 0.01)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def drift_probe_s(sample: int, reps: int = 5, qformer_only: bool = False) -> float:
    """Median seconds to encode ``sample`` targets (image + 24-token caption) with the default
    model, without gradient: the drift probe, and the momentum encoder's keys of a batch
    (``qformer_only``: from image features already computed, as ``momentum_keys: qformer``)."""
    module = CIRModule()
    cfg = module.model_config
    size = cfg.vision.image_size if hasattr(cfg.vision, "image_size") else 64
    pixels = torch.rand(sample, 3, size, size)
    tok = torch.randint(1000, 2000, (sample, 24))
    m = torch.ones_like(tok)
    ts = []
    with torch.no_grad():
        feats = module.model.encode_image(pixels) if qformer_only else None
        for _ in range(reps):
            t0 = time.perf_counter()
            if qformer_only:
                module.model.encode(tok, m, image_features=feats)
            else:
                module.model.encode(tok, m, pixels=pixels)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def time_steps(a) -> dict[str, dict]:
    dm = CIRDataModule(root=a.root)
    dm.prepare_data()
    times: dict[str, list[float]] = {v: [] for v in a.variants}
    per_repeat: dict[str, list[float]] = {v: [] for v in a.variants}
    for r in range(a.repeats):
        for v in a.variants:
            t = time_variant(VARIANTS[v], dm, a.steps, seed=r)[a.skip :]
            times[v] += t
            per_repeat[v].append(statistics.median(t))
            print(f"repeat {r} {v}: median {statistics.median(t) * 1e3:.1f} ms/step", file=sys.stderr)
    base = statistics.median(times[a.variants[0]])
    return {
        v: {
            "median_s": statistics.median(t),
            "mean_s": statistics.mean(t),
            "n_steps": len(t),
            "repeat_medians_s": per_repeat[v],
            "overhead": statistics.median(t) / base - 1,
            "bank": VARIANTS[v],
        }
        for v, t in times.items()
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/synthetic")
    p.add_argument("--steps", type=int, default=70)
    p.add_argument("--skip", type=int, default=40, help="steps left out (warm-up; the bank fills after 32)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--reuse-steps", metavar="JSON", help="take the whole-step timings from an earlier --out file")
    p.add_argument("--work-reps", type=int, default=200, help="repetitions of the isolated bank-work timing")
    p.add_argument("--out")
    a = p.parse_args()
    if a.steps <= a.skip:
        p.error("--steps must exceed --skip")
    if a.reuse_steps:
        rows = json.loads(open(a.reuse_steps).read())["steps"]
        print(f"whole-step timings from {a.reuse_steps}")
    else:
        rows = time_steps(a)
    print(f"| variant | median ms/step | mean ms/step | overhead vs {a.variants[0]} (median) |\n|---|---|---|---|")
    for v, r in rows.items():
        print(f"| {v} | {r['median_s'] * 1e3:.1f} | {r['mean_s'] * 1e3:.1f} | {100 * r['overhead']:+.1f} % |")
    # the bank's own work, isolated: far less noisy than whole steps on a shared 2-core machine
    step_s = rows[a.variants[0]]["median_s"]
    work = {}
    print(
        "\n| bank | loss fwd+bwd ms | with bank (+ evict, select, enqueue) ms | added ms | drift probe ms / drift_every | overhead vs in-batch step |\n|---|---|---|---|---|---|"
    )
    for v in a.variants:
        cfg = VARIANTS[v]
        if cfg is None:
            continue
        w = bank_work(cfg, a.work_reps)
        every = cfg.get("drift_every", 50)
        w["drift_probe_s"] = drift_probe_s(cfg.get("drift_sample", 64))
        w["added_per_step_s"] = w["bank_added_s"] + w["drift_probe_s"] / every
        if cfg.get("momentum") is not None:  # the keys of every batch, and the EMA update
            qformer_keys = cfg.get("momentum_keys") == "qformer"
            w["key_encoder_s"] = drift_probe_s(128, qformer_only=qformer_keys)
            w["ema_update_s"] = ema_update_s(skip_vision=qformer_keys)
            w["added_per_step_s"] += w["key_encoder_s"] + w["ema_update_s"]
        w["overhead_of_step"] = w["added_per_step_s"] / step_s
        work[v] = w
        print(
            f"| {v} | {w['loss_s'] * 1e3:.2f} | {w['loss_with_bank_s'] * 1e3:.2f} | {w['bank_added_s'] * 1e3:.2f} | "
            f"{w['drift_probe_s'] * 1e3:.0f} / {every} | {100 * w['overhead_of_step']:.1f} % of {step_s * 1e3:.0f} ms |"
            + (f" (keys {w['key_encoder_s'] * 1e3:.0f} ms + EMA {w['ema_update_s'] * 1e3:.1f} ms included)" if "key_encoder_s" in w else "")
        )
    if a.out:
        meta = {
            "command": "python " + " ".join(sys.argv),
            "date": str(date.today()),
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "steps": rows, "bank_work": work}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
