"""The user's path: fit through LightningCLI, resume, validate, rank, index and search."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from csmcir.cli import main
from csmcir.data.custom import CustomCIR
from csmcir.retrieval.metrics import recall_at_k

from .conftest import fit_args

REPO = Path(__file__).resolve().parents[1]


def _metrics(run: Path) -> list[dict]:
    rows = []
    for f in sorted(run.glob("lightning_logs/version_*/metrics.csv")):
        with open(f) as fh:
            rows += list(csv.DictReader(fh))
    return rows


def test_fast_dev_run_fit_through_cli(easy_bench, tmp_path):
    assert main(fit_args(easy_bench, tmp_path, "--trainer.fast_dev_run", "true")) == 0


def test_fit_writes_checkpoints_metrics_and_stats(trained):
    ckpt = torch.load(trained / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    assert ckpt["csmcir"]["model_config"]["qformer"]["hidden_size"] == 32
    assert ckpt["csmcir"]["text"]["target_text"] == "caption"
    assert list(trained.glob("best-*.ckpt"))
    logged = {k for row in _metrics(trained) for k, v in row.items() if v}
    assert {"val/R@1", "val/R@5", "val/R@10", "val/R@50", "train/loss_nce"} <= logged
    assert {"val/R@1/colour", "val/R@1/remove", "val/R@1/move"} <= logged  # per modification type
    stats = json.loads((trained / "train_stats.json").read_text())
    assert stats["samples_per_s"] > 0 and stats["peak_rss_mib"] > 0


def test_resume_from_last_checkpoint(easy_bench, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(fit_args(easy_bench, run, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6", "--ckpt_path", "last")) == 0
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12 and ckpt["epoch"] == 1
    # the resumed run logged steps after 6 only: it continued, it did not start over
    new_version = sorted(run.glob("lightning_logs/version_*"))[-1]
    steps = [int(r["step"]) for r in csv.DictReader(open(new_version / "metrics.csv"))]
    assert steps and min(steps) >= 6


def test_rank_output_is_scored_like_validation(easy_bench, trained, tmp_path, capsys):
    out = tmp_path / "val_rankings.json"
    assert (
        main(["rank", "--ckpt", str(trained / "last.ckpt"), "--root", str(easy_bench), "--split", "val", "--out", str(out), "--k", "50"])
        == 0
    )
    rankings = json.loads(out.read_text())
    ds = CustomCIR(easy_bench)
    triplets = ds.triplets("val")
    gallery = set(ds.gallery("val"))
    assert list(rankings) == [t.id for t in triplets]
    for t in triplets:
        r = rankings[t.id]
        assert len(r) == 50 and len(set(r)) == 50 and set(r) <= gallery
        assert t.reference not in r  # reference excluded
    ours = recall_at_k([rankings[t.id] for t in triplets], [set(t.targets) for t in triplets])
    # the same checkpoint through Lightning validation reports the same numbers
    vrun = tmp_path / "validate"
    assert (
        main(
            [
                "validate",
                "--model.net.model",
                "tiny",
                "--data.root",
                str(easy_bench),
                "--data.synthetic",
                "false",
                "--trainer.default_root_dir",
                str(vrun),
                "--trainer.enable_progress_bar",
                "false",
                "--ckpt_path",
                str(trained / "last.ckpt"),
            ]
        )
        == 0
    )
    row = [r for r in _metrics(vrun) if r.get("val/R@1")][-1]
    for k in ("R@1", "R@5", "R@10", "R@50"):
        assert ours[k] == pytest.approx(float(row[f"val/{k}"]), abs=0.34), k  # at most one query of 300 may flip on float ties
    printed = capsys.readouterr().out
    assert f"R@10 {ours['R@10']:.2f}" in printed


def test_index_and_search_agree_with_rank(easy_bench, trained, tmp_path, capsys):
    ckpt = str(trained / "last.ckpt")
    index_dir = tmp_path / "index"
    assert main(["index", "--ckpt", ckpt, "--root", str(easy_bench), "--split", "val", "--out", str(index_dir)]) == 0
    info = json.loads((index_dir / "index_info.json").read_text())
    ds = CustomCIR(easy_bench)
    assert info["count"] == len(ds.gallery("val")) and info["kind"] == "flat"
    assert (index_dir / "ids.txt").read_text().split() == ds.gallery("val")
    rank_file = tmp_path / "r.json"
    assert main(["rank", "--ckpt", ckpt, "--root", str(easy_bench), "--split", "val", "--out", str(rank_file), "--k", "10"]) == 0
    rankings = json.loads(rank_file.read_text())
    capsys.readouterr()
    t = ds.triplets("val")[0]
    assert (
        main(
            [
                "search",
                "--index",
                str(index_dir),
                "--ckpt",
                ckpt,
                "--image",
                str(ds.image_path(t.reference)),
                "--text",
                t.text,
                "-k",
                "10",
                "--json",
            ]
        )
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    ids = [h["id"] for h in hits]  # the query image is a gallery image: left out, as rank leaves the reference out
    assert ids == rankings[t.id] and t.reference not in ids
    keep = [
        "search",
        "--index",
        str(index_dir),
        "--ckpt",
        ckpt,
        "--image",
        str(ds.image_path(t.reference)),
        "--text",
        t.text,
        "-k",
        "11",
        "--json",
        "--keep-query-image",
    ]
    assert main(keep) == 0
    kept = [h["id"] for h in json.loads(capsys.readouterr().out)]
    assert [i for i in kept if i != t.reference][:10] == rankings[t.id]
    assert all(h["caption"] for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_config_file_spells_out_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    defaults = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "synthetic.yaml"), "--print_config"])
    from_file = capsys.readouterr().out
    assert "max_epochs" in defaults and defaults == from_file


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("fit", "validate", "test", "synth", "index", "search", "rank"):
        assert cmd in out


def test_test_command_scores_test_and_heldout_splits(easy_bench, trained, tmp_path):
    # `trained` is an in-batch checkpoint and this command leaves the default's memory bank on: --ckpt_path
    # reads the checkpoint's own hyper-parameters back, so a fit from before the bank default still tests
    run = tmp_path / "test"
    assert (
        main(
            [
                "test",
                "--model.net.model",
                "tiny",
                "--data.root",
                str(easy_bench),
                "--data.synthetic",
                "false",
                "--trainer.default_root_dir",
                str(run),
                "--trainer.enable_progress_bar",
                "false",
                "--ckpt_path",
                str(trained / "last.ckpt"),
            ]
        )
        == 0
    )
    logged = {k for row in _metrics(run) for k, v in row.items() if v}
    assert {"test/R@1", "test/R@50", "test/heldout/R@1", "test/heldout/R@50", "test/R@1/colour"} <= logged


def test_optimizer_and_scheduler_are_configured_through_the_cli(easy_bench, tmp_path):
    """LightningCLI's own mechanism: --model.optimizer / --model.scheduler replace the default
    AdamW + warm-up/cosine; they get the module's two weight-decay parameter groups."""
    import torch

    out = tmp_path / "sgd"
    assert (
        main(
            fit_args(
                easy_bench,
                out,
                "--trainer.max_steps",
                "2",
                "--trainer.limit_val_batches",
                "1",
                "--model.optimizer",
                "SGD",
                "--model.optimizer.lr",
                "0.05",
                "--model.optimizer.momentum",
                "0.5",
                "--model.scheduler",
                "StepLR",
                "--model.scheduler.step_size",
                "1",
                "--model.scheduler.gamma",
                "0.5",
            )
        )
        == 0
    )
    ckpt = torch.load(out / "last.ckpt", weights_only=True)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert len(groups) == 2 and all(g["momentum"] == 0.5 for g in groups)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]  # the module's groups, decay on weights only
    assert groups[0]["lr"] == 0.05 * 0.5**2  # StepLR stepped every step


def test_a_fit_shorter_than_an_epoch_validates_at_its_end_and_keeps_a_best_checkpoint(easy_bench, tmp_path, recwarn):
    out = tmp_path / "short"
    assert main(fit_args(easy_bench, out, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1")) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows if r.get("val/R@1")] == ["2"]  # validated once, at the last step
    assert list(out.glob("best-*.ckpt")) and (out / "last.ckpt").is_file()
    best = torch.load(next(out.glob("best-*.ckpt")), weights_only=True)
    assert "optimizer_states" not in best and "optimizer_states" in torch.load(out / "last.ckpt", weights_only=True)
    assert not [w for w in recwarn if "could not find the monitored key" in str(w.message)]
