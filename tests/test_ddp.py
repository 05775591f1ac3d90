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
    base = [
        "validate",
        "--model.net.model",
        "tiny",
        "--data.root",
        str(easy_bench),
        "--data.synthetic",
        "false",
        "--data.eval_batch_size",
        "64",
        "--trainer.enable_progress_bar",
        "false",
        "--ckpt_path",
        str(trained / "last.ckpt"),
    ]
    _cli([*base, "--trainer.default_root_dir", str(tmp_path / "one")], tmp_path)
    _cli([*base, *DDP, "--trainer.default_root_dir", str(tmp_path / "two")], tmp_path)
    one, two = _val_metrics(tmp_path / "one"), _val_metrics(tmp_path / "two")
    assert set(one) == set(two) and len(one) > 4
    for k in one:
        assert two[k] == pytest.approx(one[k], abs=0.34), k


@pytest.mark.parametrize(
    "bank",
    [
        '{"capacity": 256, "max_age": 10}',
        '{"capacity": 256, "max_age": 10, "momentum": 0.9}',
        '{"capacity": 256, "max_age": null, "half_life": null, "momentum": 0.9, "gate": true, "drift_every": 1, "same_id_positive": true}',
    ],
    ids=["plain", "momentum", "gated"],
)
def test_ddp_ranks_end_with_identical_memory_banks(easy_bench, tmp_path, bank):
    out = tmp_path / "ddp_bank"
    _cli(
        fit_args(
            easy_bench,
            out,
            *DDP,
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "4",
            "--trainer.limit_val_batches",
            "1",
            "--model.memory_bank",
            bank,
        ),
        tmp_path,
    )
    rows = []
    for f in sorted(out.glob("lightning_logs/version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(open(f)) if r.get("train/bank_rank_mismatch")]
    assert rows and float(rows[-1]["train/bank_rank_mismatch"]) == 0.0
    bank_ids = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]["bank.ids"]
    # 4 steps x 2 ranks x 16 queries: 128 entries only if both ranks' positives were gathered
    assert int((bank_ids >= 0).sum()) == 128


def test_sharded_embedding_on_two_processes_merges_to_the_single_process_index(easy_bench, trained, tmp_path):
    """`csmcir embed` under DDP (2 gloo processes, each writing its own shards), then `csmcir index
    --embeddings`, gives the index `csmcir index` builds in one process; a rerun embeds nothing."""
    import faiss

    ckpt = str(trained / "last.ckpt")
    data = ["--ckpt", ckpt, "--root", str(easy_bench), "--split", "val", "--device", "cpu", "--batch-size", "32"]
    _cli(["index", *data, "--out", str(tmp_path / "one")], tmp_path)
    shards = tmp_path / "shards"
    _cli(
        ["embed", *data, "--out", str(shards), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--num-workers", "0"],
        tmp_path,
    )
    parts = sorted(shards.glob("part-*.safetensors"))
    import json as _json

    from safetensors import safe_open

    part_ids = []
    for p in parts:
        with safe_open(str(p), "numpy") as f:
            part_ids.append(set(_json.loads(f.metadata()["ids"])))
    sizes = [len(x) for x in part_ids]
    n = len((easy_bench / "gallery.val.txt").read_text().split())
    assert sum(sizes) >= n and max(sizes) <= 32 and len(parts) >= 2 * (n // 64)  # both ranks wrote batches
    _cli(["index", *data, "--embeddings", str(shards), "--out", str(tmp_path / "two")], tmp_path)
    a = faiss.read_index(str(tmp_path / "one" / "index.faiss"))
    b = faiss.read_index(str(tmp_path / "two" / "index.faiss"))
    assert (tmp_path / "one" / "ids.txt").read_text() == (tmp_path / "two" / "ids.txt").read_text()
    assert torch.allclose(torch.from_numpy(a.reconstruct_n(0, a.ntotal)), torch.from_numpy(b.reconstruct_n(0, b.ntotal)), atol=1e-5)

    # resume: lose two parts, rerun in one process: only their items are embedded again
    for p in parts[:2]:
        p.unlink()
    r = _cli(["embed", *data, "--out", str(shards), "--accelerator", "cpu", "--devices", "1", "--num-workers", "0"], tmp_path)
    lost = (part_ids[0] | part_ids[1]) - set().union(*part_ids[2:])
    assert f"{n - len(lost)} already embedded, {len(lost)} embedded now" in r.stdout
    _cli(["index", *data, "--embeddings", str(shards), "--out", str(tmp_path / "three")], tmp_path)
    c = faiss.read_index(str(tmp_path / "three" / "index.faiss"))
    assert torch.allclose(torch.from_numpy(a.reconstruct_n(0, a.ntotal)), torch.from_numpy(c.reconstruct_n(0, c.ntotal)), atol=1e-5)
    r = _cli(["embed", *data, "--out", str(shards), "--accelerator", "cpu", "--devices", "1"], tmp_path)
    assert ", 0 embedded now" in r.stdout


def test_merge_shards_errors_name_the_file_and_id(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from csmcir.errors import CsmcirError
    from csmcir.lightning.predict import merge_shards

    with pytest.raises(CsmcirError, match="store.json is missing"):
        merge_shards(tmp_path, ["a"])
    (tmp_path / "store.json").write_text('{"dim": 4}')
    save_file({"embeddings": np.ones((2, 4), np.float32)}, str(tmp_path / "part-1.safetensors"), metadata={"ids": '["a", "b"]'})
    assert merge_shards(tmp_path, ["b", "a"]).shape == (2, 4)
    with pytest.raises(CsmcirError, match="1 of 3 ids have no embedding \\(first: 'c'\\)"):
        merge_shards(tmp_path, ["a", "b", "c"])
    save_file({"embeddings": np.zeros((1, 4), np.float32)}, str(tmp_path / "part-2.safetensors"), metadata={"ids": '["a"]'})
    with pytest.raises(CsmcirError, match="part-2.safetensors: id 'a' was embedded twice with different values"):
        merge_shards(tmp_path, ["a", "b"])
    (tmp_path / "part-2.safetensors").unlink()
    save_file({"embeddings": np.zeros((1, 3), np.float32)}, str(tmp_path / "part-3.safetensors"), metadata={"ids": '["a"]'})
    with pytest.raises(CsmcirError, match="part-3.safetensors: embeddings of shape \\(1, 3\\)"):
        merge_shards(tmp_path, ["a", "b"])
    (tmp_path / "part-3.safetensors").write_bytes(b"garbage")
    with pytest.raises(CsmcirError, match="part-3.safetensors is not a readable embedding part"):
        merge_shards(tmp_path, ["a", "b"])
