"""`csmcir bench retrieval` and `csmcir bench efficiency` on sizes this CPU runs in seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from csmcir.bench.efficiency import EfficiencySettings, cost_ratios, markdown_table, run_efficiency_bench
from csmcir.bench.retrieval import BenchSettings, make_embeddings, run_retrieval_bench, write_outputs
from csmcir.cli import main
from csmcir.errors import CsmcirError


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


def _row(model, family, side, mode, ms, gf):
    return {"model": model, "family": family, "side": side, "mode": mode, "p50_ms": ms, "gflops": gf, "device": "cpu"}


def test_systems_compose_measured_rows_and_carry_accuracy_with_its_source(tmp_path):
    from csmcir.bench.efficiency import read_accuracy, system_costs

    rows = [
        _row("student:small", "csmcir", "query", "encode", 8.0, 0.1),
        _row("student:small", "csmcir", "gallery", "encode", 9.0, 0.2),
        _row("mllm:3b", "mllm", "query", "fast", 100.0, 10.0),
        _row("mllm:3b", "mllm", "query", "full", 500.0, 20.0),
        _row("mllm:3b", "mllm", "gallery", "fast", 90.0, 8.0),
        _row("clip:l14", "clip", "query", "text", 5.0, 0.5),
        _row("clip:l14", "clip", "gallery", "image", 30.0, 3.0),
    ]
    f = tmp_path / "acc.json"
    f.write_text(json.dumps({"metric": "R@1", "entries": {"csmcir": {"value": 51.2, "source": "measured here"},
                                                          "osrcir": {"value": 40.0, "source": "stand-in", "note": "synthetic"}}}))  # fmt: skip
    systems = {s["system"]: s for s in system_costs(rows, read_accuracy(f))}
    assert set(systems) == {"csmcir student:small", "CIR-CoT fast (mllm:3b)", "CIR-CoT full (mllm:3b)", "OSrCIR (mllm:3b + clip:l14)"}
    osr = systems["OSrCIR (mllm:3b + clip:l14)"]
    # OSrCIR per query = one MLLM generation + the CLIP text tower; per gallery image = the CLIP image tower
    assert (osr["query_p50_ms"], osr["query_gflops"], osr["gallery_p50_ms"]) == (505.0, 20.5, 30.0)
    assert osr["accuracy"] == {"value": 40.0, "source": "stand-in", "note": "synthetic"}
    full = systems["CIR-CoT full (mllm:3b)"]
    assert (full["query_p50_ms"], full["gallery_p50_ms"], full["accuracy"]) == (500.0, 90.0, None)
    assert systems["csmcir student:small"]["accuracy"]["source"] == "measured here"
    table = markdown_table({"machine": {"processor": "x", "cpu_threads": 2, "load_average_1min": 0}, "settings": {"new_tokens": 64},
                            "rows": [], "ratios": [], "systems": list(systems.values()), "accuracy": read_accuracy(f)})  # fmt: skip
    assert "| OSrCIR (mllm:3b + clip:l14) | 505 | 20.5 | 30 | 3 | 40.0 | stand-in (synthetic) |" in table
    f.write_text(json.dumps({"metric": "R@1", "entries": {"osrcir": {"value": 40.0, "source": "guess"}}}))
    with pytest.raises(CsmcirError, match="entry 'osrcir' needs a numeric value and a source, one of measured here, stand-in, published"):
        read_accuracy(f)


@pytest.mark.slow
def test_the_clip_candidate_measures_text_and_image_towers():
    from csmcir.bench.efficiency import measure_clip

    rows = measure_clip("tiny", EfficiencySettings(repeats=2, batch=2, device="cpu", isolate=False))
    assert [(r["model"], r["side"], r["mode"]) for r in rows] == [("clip:tiny", "query", "text"), ("clip:tiny", "gallery", "image")]
    assert all(r["p50_ms"] > 0 and r["gflops"] > 0 and r["params_m"] > 0 for r in rows)
