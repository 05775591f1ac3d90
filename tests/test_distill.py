"""Distillation: the losses by hand, the oracle teacher, and a fit that distils and logs agreement."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from csmcir.cli import main
from csmcir.losses import feature_distill_loss, relational_distill_loss
from csmcir.teacher import read_reasoning, read_teacher_store

from .conftest import fit_args


def test_feature_loss_cosine_and_mse_by_hand():
    s = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    c = 1 - 1 / math.sqrt(2)
    assert feature_distill_loss(s, t, "cosine").item() == pytest.approx(c / 2)
    assert feature_distill_loss(s, t, "mse").item() == pytest.approx((2 - 2 / math.sqrt(2)) / 2)


def test_relational_loss_is_the_kl_of_the_teachers_distribution_and_zero_when_they_agree():
    torch.manual_seed(0)
    sq, st = torch.randn(3, 4), torch.randn(5, 4)
    tq, tt = torch.randn(3, 6), torch.randn(5, 6)
    p = torch.softmax(F.normalize(tq, dim=1) @ F.normalize(tt, dim=1).T / 0.1, 1)
    log_q = torch.log_softmax(F.normalize(sq, dim=1) @ F.normalize(st, dim=1).T / 0.1, 1)
    expected = (p * (p.log() - log_q)).sum(1).mean()
    torch.testing.assert_close(relational_distill_loss(sq, st, tq, tt, 0.1), expected)
    assert relational_distill_loss(sq, st, sq, st, 0.1).item() == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def oracle_stores(easy_bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle")
    for split in ("train", "val"):
        assert (
            main(
                [
                    "teacher",
                    "--backend",
                    "oracle",
                    "--root",
                    str(easy_bench),
                    "--split",
                    split,
                    "--out",
                    str(out / "q"),
                    "--batch-size",
                    "256",
                    "--no-progress",
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "teacher",
                    "--backend",
                    "oracle",
                    "--gallery",
                    "--root",
                    str(easy_bench),
                    "--split",
                    split,
                    "--out",
                    str(out / "g"),
                    "--batch-size",
                    "256",
                    "--no-progress",
                ]
            )
            == 0
        )
    return out


def test_oracle_teacher_store_is_labelled_and_retrieves_the_targets(oracle_stores, easy_bench):
    from csmcir.data.custom import CustomCIR

    header, ids, emb = read_teacher_store(oracle_stores / "q")
    assert "stand-in" in header["model"] and header["mode"] == "oracle" and emb.shape[1] == 384
    assert json.loads(read_reasoning(oracle_stores / "q")[ids[0]])["conclusion"]
    # a perfect reasoner: its conclusion embedding finds the target's exact description
    ds = CustomCIR(easy_bench)
    trip = ds.triplets("val")
    _, g_ids, g = read_teacher_store(oracle_stores / "g")
    pos = {i: k for k, i in enumerate(ids)}
    gallery = ds.gallery("val")
    gpos = {i: k for k, i in enumerate(g_ids)}
    G = g[[gpos[i] for i in gallery]]
    hits = 0
    for t in trip:
        scores = G @ emb[pos[t.id]]
        top = gallery[int(np.argmax(scores))]
        hits += top in t.targets or scores[gallery.index(t.targets[0])] == scores.max()
    assert hits / len(trip) > 0.95


def test_fit_with_distillation_logs_losses_and_agreement_and_inference_ignores_the_head(oracle_stores, easy_bench, tmp_path):
    from csmcir.inference import Encoder

    out = tmp_path / "run"
    assert (
        main(
            fit_args(
                easy_bench,
                out,
                "--trainer.max_epochs",
                "1",
                "--trainer.limit_train_batches",
                "4",
                "--data.teacher",
                str(oracle_stores / "q"),
                "--data.teacher_gallery",
                str(oracle_stores / "g"),
                "--model.distill",
                '{"teacher_dim": 384, "feature": "cosine", "relational_weight": 1.0}',
            )
        )
        == 0
    )
    rows = []
    for f in sorted(out.glob("lightning_logs/version_*/metrics.csv")):
        rows += list(csv.DictReader(open(f)))
    keys = {k for r in rows for k, v in r.items() if v}
    assert {"train/loss_distill_feature", "train/loss_distill_relational", "val/teacher_cos", "val/teacher_top10_overlap"} <= keys
    sd = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("distill.head.") for k in sd)  # (format 1 named it distill_head.)
    enc = Encoder.from_checkpoint(out / "last.ckpt", "cpu")  # the head is not needed to encode
    from PIL import Image

    assert enc.encode([Image.new("RGB", (32, 32))], ["make it red"]).shape == (1, enc.dim)


def test_missing_teacher_embedding_and_wrong_dim_are_clear_errors(oracle_stores, easy_bench, tmp_path, capsys):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(oracle_stores / "q", partial)
    for f in sorted(partial.glob("part-*.safetensors"))[:1]:
        f.unlink()
    code = main(
        fit_args(
            easy_bench,
            tmp_path / "r1",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "1",
            "--data.teacher",
            str(partial),
            "--model.distill",
            '{"teacher_dim": 384}',
        )
    )
    assert code != 0 and "has no embedding for" in capsys.readouterr().err
    code = main(
        fit_args(
            easy_bench,
            tmp_path / "r2",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "1",
            "--data.teacher",
            str(oracle_stores / "q"),
            "--model.distill",
            '{"teacher_dim": 128}',
        )
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "holds 384-d embeddings but model.distill.teacher_dim is 128" in err
    code = main(fit_args(easy_bench, tmp_path / "r3", "--trainer.max_epochs", "1", "--model.distill", '{"teacher_dim": 384}'))
    assert code == 2 and "set data.teacher" in capsys.readouterr().err
