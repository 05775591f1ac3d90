"""tools/real_user_path.py on a tiny BLIP-2: every step of the README's BLIP-2 + CIRR path runs
as its own process and the report holds its numbers; a failing step is reported in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "real_user_path.py"
SHARED = Path(os.environ.get("CSMCIR_SHARED", REPO.parent / "shared")) / "benchmarks"
CIRR = SHARED / "cirr"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (CIRR / "captions").is_dir(), reason=f"no CIRR annotations at {CIRR}")]

CLI_STEPS = ["fit", "rank", "evaluate", "submit", "index", "search"]


def _tool():
    spec = importlib.util.spec_from_file_location("real_user_path", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_real_user_path_on_a_tiny_blip2(tmp_path):
    work = tmp_path / "work"
    args = ["--work", str(work), "--size", "tiny", "--annotations", str(CIRR), "--train", "8", "--val", "6", "--test1", "4"]
    proc = subprocess.run([sys.executable, str(TOOL), *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((work / "real_user_path.json").read_text())
    assert (work / "real_user_path.md").read_text().count("| ok |") == 8
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["blip2 model", "cirr root", *CLI_STEPS]
    assert report["failed"] == [] and all(s["ok"] for s in steps.values())

    # the cut root: 4 test1 queries need 12 images; the gallery is padded to submit's 51
    cirr = report["cirr"]
    assert {s: (cirr[s]["queries"], cirr[s]["gallery"]) for s in ("val", "test1")} == {"val": (6, 51), "test1": (4, 51)}
    assert cirr["read_back"]["train"]["queries"] == 8 and cirr["test1"]["images_the_queries_need"] == 12

    # every child step has its own time, peak memory and outputs
    for name in ["blip2 model", *CLI_STEPS]:
        s = steps[name]
        assert s["wall_s"] > 0 and s["peak_rss_mib"] > 50 and s["returncode"] == 0, name
    fit = steps["fit"]
    ckpt = fit["outputs"]["last.ckpt"]
    assert 0 < ckpt < 50 * 2**20 and fit["checkpoints"]["last.ckpt"] == ckpt and fit["outputs"]["cache"] > 0
    assert sum(fit["cached_images"].values()) == 29 + 51  # train and val images, encoded once
    assert fit["train_stats"]["steps"] == 3
    assert steps["rank"]["outputs"]["rankings"] > 0 and steps["rank"]["cache_bytes_written"] == 0  # it read the cache
    assert set(steps["evaluate"]["metrics"]) >= {"R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Avg"}
    assert steps["submit"]["written_files"] == 2 and steps["index"]["written_files"] == 4
    assert steps["search"]["hits"] == 5
    assert {"cpu_count", "torch_threads", "torch", "date"} <= set(report["machine"])

    # a step that fails is reported with its stderr's last line: submit on a gallery of 12 images
    tool = _tool()
    small = tmp_path / "small"
    info = tool.make_cirr_root(CIRR, small, {"train": 2, "val": 2, "test1": 4}, min_gallery=0)
    assert info["test1"]["gallery"] == 12
    cmd = [sys.executable, "-m", "csmcir.cli", "submit", "--dataset", "cirr", "--root", str(small), "--split", "test1"]
    cmd += ["--ckpt", str(work / "run" / "last.ckpt"), "--out", str(tmp_path / "sub"), "--device", "cpu"]
    failed = tool.run_step("submit", cmd, tmp_path)
    assert not failed["ok"] and failed["returncode"] == 2
    assert failed["error"].startswith("error: cirr test1 under") and "has 12 gallery images" in failed["error"]
    assert "FAILED: error: cirr test1" in tool.markdown_table([failed])
