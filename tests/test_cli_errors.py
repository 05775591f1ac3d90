"""Bad input: one line naming the file and the id, a non-zero exit, no traceback, no partial output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from csmcir.cli import main


def _val_query(root):
    return json.loads((root / "triplets.val.jsonl").read_text().splitlines()[0])


def _rank(root, ckpt, out):
    return main(["rank", "--ckpt", str(ckpt), "--root", str(root), "--split", "val", "--out", str(out)])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()  # progress bars use \r
    err = [line for line in err if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_missing_image(bench_copy, trained, tmp_path, capsys):
    q = _val_query(bench_copy)
    (bench_copy / "images" / f"{q['reference']}.png").unlink()
    out = tmp_path / "r.json"
    assert _rank(bench_copy, trained / "last.ckpt", out) == 2
    msg = _one_line_error(capsys)
    assert q["reference"] in msg and "images" in msg and q["id"] in msg
    assert not out.exists()


def test_corrupt_image(bench_copy, trained, tmp_path, capsys):
    gid = (bench_copy / "gallery.val.txt").read_text().split()[3]
    (bench_copy / "images" / f"{gid}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "r.json"
    assert _rank(bench_copy, trained / "last.ckpt", out) == 2
    msg = _one_line_error(capsys)
    assert f"{gid}.png" in msg and gid in msg and "decode" in msg
    assert not out.exists()


def test_malformed_jsonl_line(bench_copy, trained, tmp_path, capsys):
    f = bench_copy / "triplets.val.jsonl"
    lines = f.read_text().splitlines()
    lines[4] = lines[4][:-5]  # cut the closing brackets
    f.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r.json"
    assert _rank(bench_copy, trained / "last.ckpt", out) == 2
    msg = _one_line_error(capsys)
    assert "triplets.val.jsonl:5" in msg and "malformed JSON" in msg
    assert not out.exists()


def test_unknown_target_id(bench_copy, trained, tmp_path, capsys):
    f = bench_copy / "triplets.val.jsonl"
    lines = f.read_text().splitlines()
    q = json.loads(lines[2])
    q["targets"] = ["no-such-image"]
    lines[2] = json.dumps(q)
    f.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r.json"
    assert _rank(bench_copy, trained / "last.ckpt", out) == 2
    msg = _one_line_error(capsys)
    assert "no-such-image" in msg and q["id"] in msg and "triplets.val.jsonl:3" in msg
    assert not out.exists()


def test_fit_on_bad_data_fails_cleanly(bench_copy, tmp_path, capsys):
    f = bench_copy / "triplets.train.jsonl"
    f.write_text("{not json\n" + f.read_text())
    from .conftest import fit_args

    assert main(fit_args(bench_copy, tmp_path / "run", "--trainer.fast_dev_run", "true")) == 2
    assert "triplets.train.jsonl:1" in _one_line_error(capsys)


@pytest.mark.parametrize("kind", ["missing", "text", "state_dict"])
def test_bad_checkpoint(easy_bench, tmp_path, capsys, kind):
    ckpt = tmp_path / "model.ckpt"
    if kind == "text":
        ckpt.write_text("not a checkpoint")
    elif kind == "state_dict":
        torch.save({"weight": torch.zeros(2)}, ckpt)
    out = tmp_path / "r.json"
    assert main(["rank", "--ckpt", str(ckpt), "--root", str(easy_bench), "--split", "val", "--out", str(out)]) == 2
    msg = _one_line_error(capsys)
    assert str(ckpt) in msg
    assert not out.exists()


def test_pickled_code_in_checkpoint_is_refused(easy_bench, tmp_path, capsys):
    """weights_only loading: a checkpoint that needs unpickling arbitrary objects is rejected."""
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"csmcir": {}, "state_dict": {}, "payload": subprocess.Popen}, ckpt)
    assert main(["rank", "--ckpt", str(ckpt), "--root", str(easy_bench), "--split", "val", "--out", str(tmp_path / "r.json")]) == 2
    assert "not a readable checkpoint" in _one_line_error(capsys)


def test_unwritable_output(easy_bench, trained, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert (
        main(["index", "--ckpt", str(trained / "last.ckpt"), "--root", str(easy_bench), "--split", "val", "--out", str(blocker / "idx")])
        == 2
    )
    assert str(blocker) in _one_line_error(capsys)


def test_search_with_bad_image(easy_bench, trained, tmp_path, capsys):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"nope")
    idx = tmp_path / "idx"
    assert main(["index", "--ckpt", str(trained / "last.ckpt"), "--root", str(easy_bench), "--split", "val", "--out", str(idx)]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(idx), "--ckpt", str(trained / "last.ckpt"), "--image", str(bad), "--text", "x"]) == 2
    assert "x.png" in _one_line_error(capsys)


def test_console_script_exit_code_and_no_traceback(tmp_path):
    """The installed entry point itself: exit status 2 and a single stderr line."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "csmcir.cli",
            "rank",
            "--ckpt",
            str(tmp_path / "nope.ckpt"),
            "--root",
            str(tmp_path),
            "--split",
            "val",
            "--out",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'nope.ckpt'} not found"]


def test_own_data_under_the_synthetic_default_names_the_switch(bench_copy, tmp_path, capsys):
    """`csmcir fit --config configs/synthetic.yaml --data.root MYDATA` on a custom-format folder is
    told about --data.synthetic false, and nothing in the folder is touched."""
    from pathlib import Path

    (bench_copy / "benchmark.json").unlink()  # now just a team's own custom-format folder
    before = sorted(p.relative_to(bench_copy) for p in bench_copy.rglob("*"))
    config = Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml"
    assert main(["fit", "--config", str(config), "--data.root", str(bench_copy), "--trainer.default_root_dir", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "--data.synthetic false" in err and str(bench_copy) in err and "delete" not in err
    assert sorted(p.relative_to(bench_copy) for p in bench_copy.rglob("*")) == before
