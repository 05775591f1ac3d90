"""Checkpoints written before the network was injected (format 1) still load, or are refused with
the command that converts them; a newer format is refused naming the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from csmcir.cli import main

from .conftest import fit_args

REPO = Path(__file__).resolve().parents[1]


def _as_format_1(src: Path, dst: Path) -> None:
    """The csmcir 0.1 layout: the network's options flat among the module's hyper-parameters
    (model, model_overrides, init, freeze_vision, grad_checkpointing) and format 1."""
    ckpt = torch.load(src, weights_only=True)
    hp = ckpt["hyper_parameters"]
    net = hp.pop("net")
    hp.update(
        model=net["model"],
        model_overrides=net["overrides"],
        init=net["init"],
        freeze_vision=net["freeze_vision"],
        grad_checkpointing=net["grad_checkpointing"],
    )
    ckpt["csmcir"]["format"] = 1
    torch.save(ckpt, dst)


def _test_args(easy_bench, ckpt, out):
    return [
        "test",
        "--model.net.model",
        "tiny",
        "--data.root",
        str(easy_bench),
        "--data.synthetic",
        "false",
        "--data.test_splits",
        "[val]",
        "--ckpt_path",
        str(ckpt),
        "--trainer.default_root_dir",
        str(out),
        "--trainer.enable_progress_bar",
        "false",
    ]


def test_a_format_1_checkpoint_ranks_as_it_is_and_resumes_after_conversion(easy_bench, trained, tmp_path, capsys):
    old = tmp_path / "old.ckpt"
    _as_format_1(trained / "last.ckpt", old)
    # inference reads it unchanged: the same rankings as the current checkpoint
    for name, ckpt in (("new", trained / "last.ckpt"), ("old", old)):
        assert (
            main(
                [
                    "rank",
                    "--ckpt",
                    str(ckpt),
                    "--root",
                    str(easy_bench),
                    "--split",
                    "val",
                    "--device",
                    "cpu",
                    "--out",
                    str(tmp_path / f"{name}.json"),
                ]
            )
            == 0
        )
    assert json.loads((tmp_path / "old.json").read_text()) == json.loads((tmp_path / "new.json").read_text())
    # --ckpt_path (hyper-parameters read back) refuses it in one line naming the file and the fix
    capsys.readouterr()
    assert main(_test_args(easy_bench, old, tmp_path / "t1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(old) in err[0] and "tools/convert_checkpoint.py" in err[0]
    # the converter makes it resumable; the converted file tests like the original
    conv = tmp_path / "conv.ckpt"
    r = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), str(old), "--out", str(conv)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["from_format"] == 1
    assert main(_test_args(easy_bench, conv, tmp_path / "t2")) == 0
    assert main(_test_args(easy_bench, trained / "last.ckpt", tmp_path / "t3")) == 0
    runs = [sorted((tmp_path / d / "lightning_logs").glob("version_*/metrics.csv"))[-1].read_text() for d in ("t2", "t3")]
    assert runs[0] == runs[1]


def test_a_newer_format_is_refused_naming_the_file(trained, tmp_path, capsys):
    ckpt = torch.load(trained / "last.ckpt", weights_only=True)
    ckpt["csmcir"]["format"] = 99
    bad = tmp_path / "future.ckpt"
    torch.save(ckpt, bad)
    assert main(["rank", "--ckpt", str(bad), "--root", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "format 99" in err[0]


def test_converting_a_current_checkpoint_is_refused(trained, tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), str(trained / "last.ckpt"), "--out", str(tmp_path / "x.ckpt")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "already in checkpoint format 2" in r.stderr and not (tmp_path / "x.ckpt").exists()


def test_the_cli_links_text_length_and_image_size_to_the_model_config(easy_bench, tmp_path):
    """data.max_text_len and the images' side follow the model config (tiny: 32 tokens, 32 px)."""
    from csmcir.lightning.cli import CsmcirCLI

    args = fit_args(easy_bench, tmp_path)[1:]
    cli = CsmcirCLI(args=args, run=False)
    assert cli.datamodule.text_config.max_text_len == cli.model.model_config.qformer.max_text_len == 32
    assert cli.datamodule.text_config.image_size == cli.model.model_config.vision.image_size == 32
