"""The memory bank's EMA key pass alone: milliseconds per call by number of keys and key dtype.

    python tools/bench_key_pass.py --out docs/results/bench_key_pass.json

Runs `csmcir fit --config configs/synthetic.yaml` (extra CLI arguments after `--` are passed on) for
`--at` steps without validation, then, at the start of that step, times the module's own key pass
(`CIRModule._ema_keys`: the EMA Q-Former over the step's cached target features and captions, under
no grad at the given `key_dtype`) on the first N targets of the batch, for each N in `--keys` and
each dtype in `--dtypes`: `--repeats` timed calls after two untimed ones, median reported. Then the
fit stops. It tells whether the key pass is compute-bound (time proportional to the keys) and what
bfloat16 autocast buys or costs on this CPU (`key_dtype: auto` uses it only where the CPU has
bfloat16 units).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bank_paired import fit_with_callback, provenance  # noqa: E402


class TimeKeyPass(L.Callback):
    """At the start of step ``at``, times the key pass per (dtype, keys) and stops the fit."""

    def __init__(self, at: int, keys: list[int], dtypes: list[str], repeats: int):
        self.at, self.keys, self.dtypes, self.repeats = at, keys, dtypes, repeats
        self.results: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.at:
            return
        m, b = pl_module, batch
        if m.bank is None or m.ema_model is None:
            raise SystemExit("error: the fit has no momentum memory bank (model.memory_bank.momentum); nothing to time")
        features = m.model.encode_image(b.target).detach()
        saved = m.bank.key_dtype
        try:
            for dtype in self.dtypes:
                m.bank.key_dtype = dtype
                for n in self.keys:
                    n = min(n, features.shape[0])

                    def call(n=n):
                        return m._ema_keys(b.caption_ids[:n], b.caption_mask[:n], b.target[:n], features=features[:n])

                    call(), call()
                    times = []
                    for _ in range(self.repeats):
                        t0 = time.perf_counter()
                        call()
                        times.append(time.perf_counter() - t0)
                    ms = 1e3 * statistics.median(times)
                    self.results.append({"key_dtype": dtype, "keys": n, "median_ms": round(ms, 2)})
                    print(f"key pass, {dtype:8s}, {n:4d} keys: {ms:7.1f} ms", flush=True)
        finally:
            m.bank.key_dtype = saved
        trainer.should_stop = True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--at", type=int, default=40, help="the step at whose start the key pass is timed")
    p.add_argument("--keys", type=int, nargs="+", default=[128, 64, 32, 8], help="numbers of keys to time")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--config", default="configs/synthetic.yaml")
    p.add_argument("--out", help="JSON file for the timings")
    p.add_argument("extra", nargs="*", help="after --: more `csmcir fit` arguments")
    a = p.parse_args()
    timer = TimeKeyPass(a.at, a.keys, a.dtypes, a.repeats)

    with tempfile.TemporaryDirectory() as root:
        fit_with_callback(timer, a.at + 1, root, a.config, a.extra)
    if not timer.results:
        raise SystemExit(f"error: the fit ended before step {a.at}; give a smaller --at")
    if a.out:
        out = {**provenance("tools/bench_key_pass.py"), "results": timer.results}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
