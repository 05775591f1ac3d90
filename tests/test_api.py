"""The public Python API: the README's example runs as written; the library never imports the CLI."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _readme_python_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds one example"
    return blocks[0]


def test_readme_python_example_runs_as_written(easy_bench, trained, tmp_path, monkeypatch, capsys):
    # the example's paths, as after the README's first command: data/synthetic and its checkpoint
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(easy_bench)
    (tmp_path / "checkpoints" / "synthetic").mkdir(parents=True)
    (tmp_path / "checkpoints" / "synthetic" / "last.ckpt").symlink_to(trained / "last.ckpt")
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_python_block(), "README.md:Python API", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    metrics = ast.literal_eval(out[0])
    assert set(metrics) == {"R@1", "R@5", "R@10", "R@50"} and all(0 <= v <= 100 for v in metrics.values())
    hits = out[1:]
    assert [int(h.split()[0]) for h in hits] == [1, 2, 3, 4, 5]
    assert (tmp_path / "indexes" / "synth-test" / "index.faiss").is_file()


def test_api_ranking_matches_the_rank_command(easy_bench, trained, tmp_path):
    """``rank_split`` is what ``csmcir rank`` writes: same ids, same order."""
    import json

    import csmcir
    from csmcir.cli import main

    out = tmp_path / "r.json"
    assert (
        main(
            [
                "rank",
                "--ckpt",
                str(trained / "last.ckpt"),
                "--root",
                str(easy_bench),
                "--split",
                "val",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--k",
                "10",
            ]
        )
        == 0
    )
    enc = csmcir.Encoder.from_checkpoint(trained / "last.ckpt", "cpu")
    ranking = csmcir.rank_split(enc, csmcir.open_dataset("custom", easy_bench), "val", k=10, progress=False)
    assert ranking.as_dict() == json.loads(out.read_text())


def test_every_public_name_resolves():
    import csmcir

    for name in csmcir.__all__:
        assert getattr(csmcir, name) is not None, name
    with pytest.raises(AttributeError):
        csmcir.no_such_thing  # noqa: B018


def test_no_library_module_imports_the_cli():
    """The CLI sits on top: nothing under csmcir/ imports csmcir.cli (it may import the library)."""
    offenders = []
    for path in (REPO / "csmcir").rglob("*.py"):
        if path.name == "cli.py" and path.parent.name == "csmcir":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                names = [mod] if node.level == 0 else [("." * node.level) + mod]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                rel = path.relative_to(REPO / "csmcir")
                if n in ("csmcir.cli",) or (n.lstrip(".") == "cli" and len(rel.parts) == n.count(".")):
                    offenders.append(f"{rel}: {n}")
    assert not offenders, offenders


def test_encoder_computes_in_bfloat16_under_autocast(easy_bench, trained):
    """`--dtype bfloat16` (rank, index, submit, report): the same embeddings to bf16 rounding."""
    import numpy as np

    import csmcir

    ds = csmcir.open_dataset("custom", easy_bench)
    ids = ds.gallery("val")[:32]
    images, texts = [ds.load_image(i) for i in ids], ["make the circle red"] * len(ids)
    full = csmcir.Encoder.from_checkpoint(trained / "last.ckpt", "cpu").encode(images, texts)
    half = csmcir.Encoder.from_checkpoint(trained / "last.ckpt", "cpu", dtype="bfloat16").encode(images, texts)
    assert half.dtype == np.float32 and (full * half).sum(1).min() > 0.98
