#!/usr/bin/env python
"""Training throughput of tools/ablation.py variants: short fits, alone, interleaved repeats.

    python tools/throughput.py --variants intent_task pt_gated_bank --steps 160 --repeats 2 \
        --runs checkpoints/throughput --out docs/results/throughput.json

Each fit is `csmcir fit --config configs/synthetic.yaml <IN_BATCH> <variant args> --trainer.max_steps STEPS
--trainer.limit_val_batches 0` (no validation), and its samples/s is the one
`train_stats.json` records. Repeats go variant by variant in turn, so a slow spell of the machine
hits every variant. The first variant is the reference: the table gives each variant's cost per
step relative to it, and the steps it gets in the reference's wall clock for `--budget-steps`
reference steps (an equal-wall-clock arm). Run it with nothing else on the machine: two jobs at
once halve each other's speed.
"""

from __future__ import annotations

import argparse
import json
import runpy
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

_ABLATION = runpy.run_path(str(Path(__file__).with_name("ablation.py")))
VARIANTS, IN_BATCH = _ABLATION["VARIANTS"], _ABLATION["IN_BATCH"]


def fit_samples_per_s(variant: str, steps: int, run: Path, config: str) -> float:
    """Samples/s of one STEPS-step fit of ``variant`` into ``run`` (reused when it finished)."""
    stats = run / "train_stats.json"
    if not stats.is_file():
        cmd = ["csmcir", "fit", "--config", config, *IN_BATCH, *VARIANTS[variant], "--trainer.max_steps", str(steps)]
        cmd += ["--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
        shutil.rmtree(run, ignore_errors=True)  # a killed fit is timed again from the start
        subprocess.run([*cmd, "--trainer.default_root_dir", str(run)], check=True)
    return json.loads(stats.read_text())["samples_per_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--variants",
        nargs="+",
        required=True,
        choices=sorted(VARIANTS),
        metavar="VARIANT",
        help="tools/ablation.py variants; the first is the reference",
    )
    p.add_argument("--steps", type=int, default=160, help="optimizer steps per fit")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--budget-steps", type=int, default=819, help="the reference's steps to convert into equal wall clock")
    p.add_argument("--config", default="configs/synthetic.yaml")
    p.add_argument("--runs", default="checkpoints/throughput", help="folder for the fits (finished ones are reused)")
    p.add_argument("--out", help="JSON file for the per-fit and aggregated numbers")
    a = p.parse_args()
    if a.steps <= 10 or a.repeats < 1:
        p.error("--steps must exceed 10 (TrainSpeed leaves the first 5 out) and --repeats must be at least 1")
    fits: dict[str, list[float]] = {v: [] for v in a.variants}
    for r in range(a.repeats):
        for v in a.variants:
            fits[v].append(fit_samples_per_s(v, a.steps, Path(a.runs) / f"{v}-n{a.steps}-r{r}", a.config))
    ref = statistics.mean(fits[a.variants[0]])
    print(f"| variant | samples/s per repeat | mean | cost per step vs {a.variants[0]} | steps in {a.budget_steps} reference steps' time |")
    print("|---|---|---:|---:|---:|")
    summary = {}
    for v, xs in fits.items():
        m = statistics.mean(xs)
        summary[v] = {"samples_per_s": xs, "mean": m, "relative_cost": ref / m, "equal_time_steps": round(a.budget_steps * m / ref)}
        s = summary[v]
        print(f"| {v} | {' / '.join(f'{x:.1f}' for x in xs)} | {m:.1f} | {s['relative_cost']:.3f} | {s['equal_time_steps']} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"steps": a.steps, "repeats": a.repeats, "variants": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
