"""Train many synthetic-default configurations in parallel (see README.md here)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(os.environ.get("OUT", "/tmp/out"))
OUT.mkdir(parents=True, exist_ok=True)
TOK = os.environ.get("TOK", str(Path(__file__).parent / "tok"))


def job(spec):
    for _ in range(120):  # a benchmark still being generated in the background (variants.py)
        if Path(spec["root"], "benchmark.json").exists():
            break
        time.sleep(5)
    else:
        raise FileNotFoundError(f"{spec['root']}/benchmark.json: no benchmark there after 10 minutes")
    import lightning as L
    import torch

    torch.set_float32_matmul_precision("high")
    from csmcir.data.datamodule import CIRDataModule
    from csmcir.lightning.module import CIRModule
    from csmcir.models import NetworkSpec

    L.seed_everything(spec.get("seed", 0))
    bs = spec["bs"]
    budget = {"max_epochs": spec["epochs"]} if "epochs" in spec else {"max_steps": spec["samples"] // bs}
    dm = CIRDataModule(
        root=spec["root"],
        synthetic=False,
        tokenizer=TOK,
        batch_size=bs,
        target_text=spec.get("target_text", "caption"),
        test_splits=["test", "heldout"],
        hard_negatives=spec.get("hn", 1),
        reference_negative=spec.get("refneg", False),
    )
    m = CIRModule(
        net=NetworkSpec(model=spec.get("model", "small"), overrides=spec.get("ov")),
        lr=spec["lr"],
        warmup_steps=spec["wu"],
        bidirectional=spec.get("bidir", False),
        weight_decay=spec.get("wd", 0.05),
        temperature=spec.get("temp", 0.07),
    )
    if spec.get("types") or spec.get("type_weights"):  # diagnostics: train on some types / reweight them
        _reweight(dm, spec.get("types"), spec.get("type_weights", {}), bs)
    tr = L.Trainer(
        accelerator=os.environ.get("ACC", "gpu"),
        devices=1,
        **budget,
        check_val_every_n_epoch=1000,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    t = time.time()
    tr.fit(m, dm)
    ft = time.time() - t
    v = tr.validate(m, dm, verbose=False)[0]
    te = tr.test(m, dm, verbose=False)[0]
    return {
        "name": spec["name"],
        "steps": tr.global_step,
        "fit_s": round(ft, 1),
        **{k: round(x, 2) for k, x in {**v, **te}.items() if "/R@" in k and k.count("/") <= 2},
    }


def _reweight(dm, types, weights, bs):
    """Replace the train loader by one drawing queries of ``types`` only, or with type weights."""
    import torch
    from torch.utils.data import DataLoader, Subset, WeightedRandomSampler

    from csmcir.data.datasets import TrainTriplets, collate

    def loader():
        h = dm.hparams
        store = dm.stores[h.train_split]
        ds = TrainTriplets(store, h.hard_negatives, h.reference_negative)
        groups = store.groups
        if types:
            return DataLoader(
                Subset(ds, [i for i, g in enumerate(groups) if g in types]), batch_size=bs, shuffle=True, drop_last=True, collate_fn=collate
            )
        w = torch.tensor([float(weights.get(g, 1.0)) for g in groups])
        return DataLoader(ds, batch_size=bs, sampler=WeightedRandomSampler(w, len(ds)), drop_last=True, collate_fn=collate)

    dm.train_dataloader = loader


if __name__ == "__main__":
    if sys.argv[1] == "job":
        spec = json.loads(sys.argv[2])
        try:
            res = job(spec)
        except Exception:
            import traceback

            res = {"name": spec["name"], "error": traceback.format_exc()[-1500:]}
        with open(f"/tmp/sw/res_{spec['name']}.json", "w") as f:
            json.dump(res, f)
        sys.exit(0)
    Path("/tmp/sw").mkdir(exist_ok=True)
    jobs = json.load(open(sys.argv[1]))
    par = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    procs = []
    pending = list(jobs)
    while pending or procs:
        while pending and len(procs) < par:
            s = pending.pop(0)
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "job", json.dumps(s)],
                    stdout=open(f"/tmp/sw/log_{s['name']}.txt", "w"),
                    stderr=subprocess.STDOUT,
                )
            )
        n = len(procs)
        procs = [p for p in procs if p.poll() is None]
        if len(procs) != n:
            rows = [json.load(open(f)) for f in sorted(Path("/tmp/sw").glob("res_*.json"))]
            with open(OUT / "results.json", "w") as f:
                json.dump(rows, f, indent=1)
            for r in rows[-(n - len(procs)) :]:
                print(json.dumps(r)[:300], flush=True)
        time.sleep(2)
