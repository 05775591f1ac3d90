#!/usr/bin/env python
"""The memory bank's cost per training step, measured inside one fit, steps with and without it alternating.

    python tools/bench_bank_paired.py --steps 400 --skip 40 --out docs/results/bench_bank_paired.json

Runs `csmcir fit --config configs/synthetic.yaml` (the synthetic default and its bank; extra CLI
arguments after `--` are passed on) with no validation, and switches the bank off on half of the
steps: steps 4k+1 and 4k+2 run without it (no key pass, no bank term, no enqueue, no EMA update,
no rank or drift probe), steps 4k and 4k+3 with it. The fits' samples/s on a 2-core machine moves
by 10-30 % from one fit to the next (docs/memory_bank.md), more than the cost being measured;
here every step with the bank has a neighbour without it a fraction of a second away, so a slow
spell of the machine hits both. The pattern keeps the drift probe (every `drift_every` = 10 steps,
on steps that are multiples of 10) on 1 in 10 of the steps with the bank, as in a real fit.

Each step is timed as `TrainSpeed` times it (`on_train_batch_start` to `on_train_batch_end`: forward,
backward, optimizer and EMA step; data loading excluded). Steps before `--skip` are left out (the bank
fills after 32). Reported: the cost per step as the ratio of the mean step times (the mean, so the
occasional drift probe counts), the same from medians, and its spread over blocks of `--block` steps.
The numbers describe the bank's work on a model that trains with it half the time, a little off the
default fit's own (entries are written half as often, so they are older).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import lightning as L

from csmcir.lightning.cli import CsmcirCLI
from csmcir.losses.memory_bank import native_bfloat16

# the bank's own work, timed on its steps with --breakdown: name -> (class, method); nested ones are
# also inside their callers (encode_keys and bias inside _bank_terms, _bank_drift and observe_rank in _enqueue)
PARTS = {
    "bank_terms": ("module", "_bank_terms"),
    "key_pass": ("bank", "encode_keys"),
    "selection": ("bank", "bias"),
    "enqueue": ("module", "_enqueue"),
    "drift_probe": ("module", "_bank_drift"),
    "rank_probe": ("bank", "observe_rank"),
    "ema_update": ("module", "update_ema"),
}

# the step's stages, timed on every step with --breakdown (with and without the bank): Lightning runs
# training_step and backward inside optimizer_step's closure, so "optimizer" is reported less the two
STAGES = {"forward": ("module", "training_step"), "backward": ("module", "backward"), "optimizer": ("module", "optimizer_step")}


def time_parts(acc: dict[str, float]) -> None:
    """Wrap the PARTS and STAGES methods so that each adds its seconds to ``acc``."""
    from csmcir.lightning.module import CIRModule
    from csmcir.losses.memory_bank import MemoryBank

    classes = {"module": CIRModule, "bank": MemoryBank}
    for name, (owner, method) in {**PARTS, **STAGES}.items():
        f = getattr(classes[owner], method)

        def timed(*args, _f=f, _name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                acc[_name] = acc.get(_name, 0.0) + time.perf_counter() - t0

        setattr(classes[owner], method, timed)


class AlternateBank(L.Callback):
    """Times every step, and runs steps 4k+1 and 4k+2 with the module's bank and EMA encoder removed."""

    def __init__(self, parts: dict[str, float] | None = None):
        self.times: list[tuple[int, bool, float]] = []  # (step, bank on, seconds)
        self.parts = parts  # seconds of each part in the running step (time_parts), or None
        self.part_times: list[dict] = []  # per step: its number, whether the bank ran, seconds per part

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._on = trainer.global_step % 4 in (0, 3)
        if not self._on:
            self._saved = (pl_module.bank, pl_module.ema_model)
            pl_module.bank, pl_module.ema_model = None, None
        if self.parts is not None:
            self.parts.clear()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append((trainer.global_step - 1, self._on, time.perf_counter() - self._t))
        if self.parts is not None:
            self.part_times.append({"step": trainer.global_step - 1, "bank": self._on, **self.parts})
        if not self._on:
            pl_module.bank, pl_module.ema_model = self._saved


def summarise(times: list[tuple[int, bool, float]], skip: int, block: int) -> dict:
    """Cost per step of the bank: mean (and median) step time with it over the same without it, minus
    one, over the steps from ``skip`` on; and the mean-ratio cost of each ``block`` of steps."""
    kept = [t for t in times if t[0] >= skip]
    on = [s for _, b, s in kept if b]
    off = [s for _, b, s in kept if not b]
    if not on or not off:
        raise SystemExit(f"error: no steps after --skip {skip}; give more --steps")
    blocks = []
    for start in range(skip, max(t[0] for t in kept) + 1, block):
        b_on = [s for st, b, s in kept if b and start <= st < start + block]
        b_off = [s for st, b, s in kept if not b and start <= st < start + block]
        if b_on and b_off:
            blocks.append(statistics.mean(b_on) / statistics.mean(b_off) - 1)
    return {
        "steps_with_bank": len(on),
        "steps_without": len(off),
        "mean_step_s_with": statistics.mean(on),
        "mean_step_s_without": statistics.mean(off),
        "cost_mean": statistics.mean(on) / statistics.mean(off) - 1,
        "median_step_s_with": statistics.median(on),
        "median_step_s_without": statistics.median(off),
        "cost_median": statistics.median(on) / statistics.median(off) - 1,
        "block_steps": block,
        "cost_per_block": blocks,
        "cost_block_mean": statistics.mean(blocks),
        "cost_block_std": statistics.stdev(blocks) if len(blocks) > 1 else 0.0,
    }


def summarise_parts(part_times: list[dict], skip: int) -> dict:
    """Mean ms per step of each PARTS method over the steps with the bank, and of each stage
    (STAGES; "optimizer" less forward and backward) over the steps with and without it, from ``skip`` on."""

    def mean_ms(rows: list[dict], name: str) -> float:
        return 1e3 * sum(r.get(name, 0.0) for r in rows) / max(len(rows), 1)

    def stages(rows: list[dict]) -> dict[str, float]:
        ms = {name: mean_ms(rows, name) for name in STAGES}
        ms["optimizer"] -= ms["forward"] + ms["backward"]
        return ms

    on = [p for p in part_times if p["step"] >= skip and p["bank"]]
    off = [p for p in part_times if p["step"] >= skip and not p["bank"]]
    return {
        "parts_ms_per_bank_step": {name: mean_ms(on, name) for name in PARTS},
        "stages_ms_with_bank": stages(on),
        "stages_ms_without": stages(off),
    }


def run_fit(steps: int, root: str, config: str, extra: list[str], breakdown: bool = False) -> AlternateBank:
    parts: dict[str, float] | None = None
    if breakdown:
        parts = {}
        time_parts(parts)
    timer = AlternateBank(parts)
    fit_with_callback(timer, steps, root, config, extra)
    return timer


def fit_with_callback(callback: L.Callback, steps: int, root: str, config: str, extra: list[str]) -> None:
    """`csmcir fit --config CONFIG EXTRA` for ``steps`` steps into ``root``, without validation or a
    progress bar, with ``callback`` added to the trainer (also used by tools/bench_key_pass.py)."""

    class _CLI(CsmcirCLI):
        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            trainer.callbacks.append(callback)
            return trainer

    args = ["fit", "--config", config, *extra, "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", root]
    saved = sys.argv
    sys.argv = [saved[0], *args]
    try:
        _CLI()
    finally:
        sys.argv = saved


def provenance(tool: str) -> dict:
    """The command line, date and machine a benchmark JSON records (``tool``: the script's path)."""
    return {
        "command": shlex.join(["python", tool, *sys.argv[1:]]),
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        # key_dtype auto runs the key pass in bfloat16 only where the CPU has the units (else float32)
        "cpu_bfloat16_units": native_bfloat16("cpu"),
    }


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of the fit")
    p.add_argument("--skip", type=int, default=40, help="steps left out at the start (the bank fills after 32)")
    p.add_argument("--block", type=int, default=40, help="steps per block for the spread of the cost")
    p.add_argument("--config", default="configs/synthetic.yaml")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the bank's parts on its steps (PARTS) and the step's forward, backward and optimizer stages on every step (STAGES)",
    )
    p.add_argument("--out", help="JSON file for the step times and the summary")
    p.add_argument("extra", nargs="*", help="after --: more `csmcir fit` arguments (e.g. another bank)")
    a = p.parse_args()
    if a.steps <= a.skip + 4:
        p.error(f"--steps ({a.steps}) must exceed --skip ({a.skip}) by more than one 4-step cycle")
    with tempfile.TemporaryDirectory() as root:
        timer = run_fit(a.steps, root, a.config, a.extra, a.breakdown)
    times = timer.times
    s = summarise(times, a.skip, a.block)
    print(
        f"bank on {s['steps_with_bank']} steps, off {s['steps_without']}: mean {s['mean_step_s_with'] * 1e3:.1f} against "
        f"{s['mean_step_s_without'] * 1e3:.1f} ms a step, cost {s['cost_mean']:+.1%} (median {s['cost_median']:+.1%}; "
        f"over {len(s['cost_per_block'])} blocks of {a.block} steps {s['cost_block_mean']:+.1%} ± {s['cost_block_std']:.1%})"
    )
    if a.breakdown:
        s.update(summarise_parts(timer.part_times, a.skip))
        extra_ms = 1e3 * (s["mean_step_s_with"] - s["mean_step_s_without"])
        print(f"the bank's parts, ms per step with it (its whole extra: {extra_ms:.1f} ms):")
        for name, (_, method) in PARTS.items():
            print(f"  {name:12s} {method:14s} {s['parts_ms_per_bank_step'][name]:7.1f}")
        print("the step's stages, ms per step: with the bank / without / difference")
        for name in STAGES:
            on, off = s["stages_ms_with_bank"][name], s["stages_ms_without"][name]
            print(f"  {name:12s} {on:7.1f} {off:7.1f} {on - off:+7.1f}")
    if a.out:
        out = {
            **provenance("tools/bench_bank_paired.py"),
            "summary": s,
            "step_times": [{"step": st, "bank": b, "s": round(t, 5)} for st, b, t in times],
        }
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
