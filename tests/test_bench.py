"""`csmcir bench retrieval` and `csmcir bench efficiency` on sizes this CPU runs in seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from csmcir.bench.efficiency import EfficiencySettings, cost_ratios, run_efficiency_bench
from csmcir.bench.retrieval import BenchSettings, make_embeddings, run_retrieval_bench, write_outputs
from csmcir.cli import main


def test_make_embeddings_unit_norm_and_structure():
    g, q = make_embeddings(2000, 32, 50, "clustered", seed=0)
    assert g.shape == (2000, 32) and q.shape == (50, 32) and g.dtype == np.float32
    assert np.allclose(np.linalg.norm(g, axis=1), 1, atol=1e-5)
    near_c = (q @ g.T).max(1).mean()
    gu, qu = make_embeddings(2000, 32, 50, "uniform", seed=0)
    assert near_c > (qu @ gu.T).max(1).mean() + 0.2  # clustered queries have near neighbours, uniform ones do not
    again, _ = make_embeddings(2000, 32, 50, "clustered", seed=0)
    assert np.array_equal(g, again)


def test_retrieval_bench_rows_recall_and_outputs(tmp_path):
    cfg = BenchSettings(sizes=(3000,), dim=16, queries=60, k=10, batch=30, min_seconds=0.05, batch1_queries=5)
    result = run_retrieval_bench(cfg, progress=False)
    rows = {r["kind"]: r for r in result["rows"]}
    assert set(rows) == {"torch", "flat", "ivf_flat", "ivf_pq", "hnsw"}
    assert rows["flat"]["recall"] == 1.0 and rows["torch"]["recall"] > 0.99  # both exact (ties aside)
    ivf = rows["ivf_flat"]
    by_probe = {s["nprobe"]: s["recall"] for s in ivf["sweep"]}
    nlist = ivf["params"]["nlist"]
    assert by_probe[nlist] == 1.0 and by_probe[1] <= by_probe[nlist]  # all cells = exact
    assert ivf["at_target"]["reached"] and ivf["at_target"]["recall"] >= 0.95
    assert rows["ivf_pq"]["bytes"] < rows["flat"]["bytes"] / 2  # compressed
    for r in result["rows"]:
        assert r["qps"] > 0 and r["qps_batch1"] > 0 and r["speedup_vs_flat"] > 0
    assert result["machine"]["read_bandwidth_gbs"] > 0
    assert rows["flat"]["scan_gbs_batch1"] == pytest.approx(rows["flat"]["qps_batch1"] * 3000 * 16 * 4 / 1e9)
    paths = write_outputs(result, tmp_path)
    assert [p.name for p in paths] == ["bench_retrieval.json", "bench_retrieval.md", "bench_retrieval.png"]
    assert json.loads(paths[0].read_text())["rows"][0]["n"] == 3000
    assert "| 3,000 | ivf_flat |" in paths[1].read_text()
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_retrieval_cli_with_user_embeddings(tmp_path, capsys):
    emb = make_embeddings(1100, 8, 0)[0]
    np.save(tmp_path / "e.npy", emb * 3.0)  # not normalised: the command normalises
    out = tmp_path / "out"
    rc = main(
        [
            "bench",
            "retrieval",
            "--embeddings",
            str(tmp_path / "e.npy"),
            "--sizes",
            "1000",
            "--queries",
            "100",
            "--kinds",
            "torch",
            "flat",
            "ivf_flat",
            "--min-seconds",
            "0.05",
            "-k",
            "5",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads((out / "bench_retrieval.json").read_text())
    assert result["machine"]["data"] == "user embeddings" and [r["kind"] for r in result["rows"]] == ["torch", "flat", "ivf_flat"]
    assert result["rows"][0]["dim"] == 8
    # too few rows, and a file that is not an array: one-line errors, exit 2
    assert main(["bench", "retrieval", "--embeddings", str(tmp_path / "e.npy"), "--sizes", "5000", "--out", str(out)]) == 2
    assert "too few for a gallery of 5000" in capsys.readouterr().err
    (tmp_path / "bad.npy").write_text("not numpy")
    assert main(["bench", "retrieval", "--embeddings", str(tmp_path / "bad.npy"), "--out", str(out)]) == 2
    assert "cannot read --embeddings" in capsys.readouterr().err


@pytest.mark.slow
def test_efficiency_bench_student_against_mllm(tmp_path):
    cfg = EfficiencySettings(
        students=("tiny",),
        mllms=("tiny",),
        new_tokens=4,
        repeats=2,
        batch=2,
        mllm_image_size=56,
        accuracy={"student:tiny": 10.0},
        isolate=False,
        device="cpu",
    )
    result = run_efficiency_bench(cfg, progress=False)
    rows = {(r["model"], r["side"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {
        ("student:tiny", "query", "encode"),
        ("student:tiny", "gallery", "encode"),
        ("mllm:tiny", "query", "fast"),
        ("mllm:tiny", "query", "full"),
        ("mllm:tiny", "gallery", "fast"),
    }
    full, fast = rows[("mllm:tiny", "query", "full")], rows[("mllm:tiny", "query", "fast")]
    assert full["gflops"] > fast["gflops"] > 0 and full["new_tokens"] == 4  # reasoning tokens cost compute
    for r in result["rows"]:
        assert r["p95_ms"] >= r["p50_ms"] > 0 and r["throughput_per_s"] > 0 and r["params_m"] > 0 and r["peak_mem_gib"] > 0
    assert rows[("student:tiny", "query", "encode")]["accuracy"] == 10.0
    ratios = {(q["side"], q["mllm_mode"]): q for q in result["ratios"]}
    assert set(ratios) == {("query", "fast"), ("query", "full"), ("gallery", "fast")}
    q = ratios[("query", "full")]
    assert q["latency_ratio"] == pytest.approx(full["p50_ms"] / rows[("student:tiny", "query", "encode")]["p50_ms"])
    assert cost_ratios([r for r in result["rows"] if r["family"] == "mllm"]) == []  # nothing to compare with


@pytest.mark.slow
def test_bench_efficiency_cli_isolated_process(tmp_path):
    out = tmp_path / "eff"
    rc = main(
        [
            "bench",
            "efficiency",
            "--students",
            "tiny",
            "--mllms",
            "--repeats",
            "2",
            "--batch",
            "2",
            "--device",
            "cpu",
            "--accuracy",
            "student:tiny=12.5",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads((out / "bench_efficiency.json").read_text())
    assert [(r["model"], r["side"]) for r in result["rows"]] == [("student:tiny", "query"), ("student:tiny", "gallery")]
    assert result["rows"][0]["peak_mem_kind"] == "process peak RSS" and result["rows"][0]["accuracy"] == 12.5
    assert (out / "bench_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "efficiency", "--students", "--mllms", "13b", "--out", str(out)]) == 2
    assert main(["bench", "efficiency", "--students", "tiny", "--mllms", "--accuracy", "oops", "--out", str(out)]) == 2
