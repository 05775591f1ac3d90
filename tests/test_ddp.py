"""Lightning DDP with 2 CPU processes on gloo: training runs, and evaluation is global."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from .conftest import fit_args

pytestmark = pytest.mark.slow


def _cli(args, cwd):
    r = subprocess.run([sys.executable, "-m", "csmcir.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _val_metrics(run):
    rows = []
    for f in sorted(run.glob("lightning_logs/version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(open(f)) if r.get("val/R@1")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


DDP = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]


def test_ddp_fit_on_two_cpu_processes(easy_bench, tmp_path):
    out = tmp_path / "ddp"
    _cli(fit_args(easy_bench, out, *DDP, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4"), tmp_path)
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    # validation over the whole val split ran on both ranks' shards and was gathered
    assert "val/R@1" in _val_metrics(out)


def test_ddp_validation_equals_single_process(easy_bench, trained, tmp_path):
    """300 val queries split over 2 ranks (DistributedSampler pads with repeats): after the
    gather and de-duplication every query and gallery image counts exactly once."""
    base = ["validate", "--model.model", "tiny", "--data.root", str(easy_bench), "--data.synthetic", "false",
            "--data.eval_batch_size", "64", "--trainer.enable_progress_bar", "false", "--ckpt_path", str(trained / "last.ckpt")]
    _cli([*base, "--trainer.default_root_dir", str(tmp_path / "one")], tmp_path)
    _cli([*base, *DDP, "--trainer.default_root_dir", str(tmp_path / "two")], tmp_path)
    one, two = _val_metrics(tmp_path / "one"), _val_metrics(tmp_path / "two")
    assert set(one) == set(two) and len(one) > 4
    for k in one:
        assert two[k] == pytest.approx(one[k], abs=0.34), k


@pytest.mark.parametrize("bank", ['{"capacity": 256, "max_age": 10}', '{"capacity": 256, "max_age": 10, "momentum": 0.9}'],
                         ids=["plain", "momentum"])
def test_ddp_ranks_end_with_identical_memory_banks(easy_bench, tmp_path, bank):
    out = tmp_path / "ddp_bank"
    _cli(fit_args(easy_bench, out, *DDP, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
                  "--trainer.limit_val_batches", "1", "--model.memory_bank", bank), tmp_path)
    rows = []
    for f in sorted(out.glob("lightning_logs/version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(open(f)) if r.get("train/bank_rank_mismatch")]
    assert rows and float(rows[-1]["train/bank_rank_mismatch"]) == 0.0
    bank_ids = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]["bank.ids"]
    # 4 steps x 2 ranks x 16 queries: 128 entries only if both ranks' positives were gathered
    assert int((bank_ids >= 0).sum()) == 128
