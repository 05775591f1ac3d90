"""Real benchmark annotation files (../shared/benchmarks): counts, query text, `csmcir evaluate`."""

import json
import os
import shutil
from pathlib import Path

import pytest

from csmcir.cli import main
from csmcir.data.benchmarks import fashioniq_eval_text, fashioniq_train_texts, load_benchmark

SHARED = Path(os.environ.get("CSMCIR_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "benchmarks"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no benchmark annotations at {SHARED}")

FIQ, CIRR, CIRCO, SHOES = SHARED / "fashioniq", SHARED, SHARED / "circo", SHARED / "shoes"


@pytest.mark.parametrize("cat,queries,gallery", [("dress", 2017, 3817), ("shirt", 2038, 6346), ("toptee", 1961, 5373)])
def test_fashioniq_val_counts(cat, queries, gallery):
    b = load_benchmark("fashioniq", FIQ, "val", cat, images=False)
    assert (len(b.queries), len(b.gallery)) == (queries, gallery)
    assert not b.remove_reference


def test_cirr_circo_shoes_counts():
    cirr = load_benchmark("cirr", CIRR, "val")
    assert (len(cirr.queries), len(cirr.gallery)) == (4181, 2297)
    assert all(len(q.members) == 6 and q.reference in q.members for q in cirr.queries)
    assert len(load_benchmark("circo", CIRCO, "val", images=False).queries) == 220
    shoes = load_benchmark("shoes", SHOES, "test", images=False)
    assert (len(shoes.queries), len(shoes.gallery)) == (1761, 4658)
    assert len(load_benchmark("shoes", SHOES, "train", images=False).queries) == 8990


def test_fashioniq_text_follows_the_common_protocol():
    # captions carry stray spaces and punctuation; the first is capitalised
    assert fashioniq_eval_text(" is shiny.", "fit and flare ") == "Is shiny and fit and flare"
    assert fashioniq_train_texts("is red", "longer") == ["Is red and longer", "Longer and is red", "Is red", "Longer"]
    q = load_benchmark("fashioniq", FIQ, "val", "dress", images=False).queries[0]
    raw = json.loads((FIQ / "captions" / "cap.dress.val.json").read_text())[0]
    assert (q.id, q.reference, q.targets) == ("0", raw["candidate"], [raw["target"]])
    assert q.text == fashioniq_eval_text(*raw["captions"])


def _evaluate(capsys, *args):
    code = main(["evaluate", *args])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err)


def test_evaluate_cirr_removes_the_reference_and_scores_the_subset(tmp_path, capsys):
    cirr = load_benchmark("cirr", CIRR, "val")
    others = [g for g in cirr.gallery][:60]
    # the reference first (it must be removed), then the target: R@1 = 100
    rankings = {q.id: [q.reference, q.targets[0]] + [g for g in others if g not in (q.reference, q.targets[0])][:49] for q in cirr.queries}
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"version": "rc2", "metric": "recall", **rankings}))
    code, m = _evaluate(capsys, "--dataset", "cirr", "--root", str(CIRR), "--split", "val", "--rankings", str(f))
    assert code == 0
    assert m["R@1"] == 100.0 and m["Rsubset@1"] == 100.0 and m["Avg"] == 100.0


def test_evaluate_fashioniq_keeps_the_reference(tmp_path, capsys):
    b = load_benchmark("fashioniq", FIQ, "val", "shirt", images=False)
    filler = [f"x{i}" for i in range(60)]
    # target at rank 11: a miss at 10, a hit at 50; the reference at rank 1 stays in the ranking
    rankings = {q.id: [q.reference] + filler[:9] + [q.targets[0]] + filler[9:48] for q in b.queries}
    f = tmp_path / "r.json"
    f.write_text(json.dumps(rankings))
    code, m = _evaluate(capsys, "--dataset", "fashioniq", "--root", str(FIQ), "--split", "val", "--category", "shirt", "--rankings", str(f))
    assert code == 0 and m == {"R@10": 0.0, "R@50": 100.0}


def test_evaluate_circo_with_integer_ids_and_ground_truths_first(tmp_path, capsys):
    b = load_benchmark("circo", CIRCO, "val", images=False)
    filler = list(range(10**9, 10**9 + 50))
    rankings = {int(q.id): [int(t) for t in q.targets] + filler[: 50 - len(q.targets)] for q in b.queries}
    f = tmp_path / "r.json"
    f.write_text(json.dumps(rankings))
    code, m = _evaluate(capsys, "--dataset", "circo", "--root", str(CIRCO), "--split", "val", "--rankings", str(f))
    assert code == 0 and m == {"mAP@5": 100.0, "mAP@10": 100.0, "mAP@25": 100.0, "mAP@50": 100.0}


def test_evaluate_errors_name_the_file_and_the_query(tmp_path, capsys):
    b = load_benchmark("shoes", SHOES, "test", images=False)
    rankings = {q.id: [q.targets[0]] * 50 for q in b.queries[1:]}
    f = tmp_path / "r.json"
    f.write_text(json.dumps(rankings))
    code, err = _evaluate(capsys, "--dataset", "shoes", "--root", str(SHOES), "--split", "test", "--rankings", str(f))
    assert code == 2 and err.strip() == f"error: {f}: query '0' is not ranked (every query must be)"
    assert "Traceback" not in err
    f.write_text('{"0": ["a", ')  # truncated JSON
    code, err = _evaluate(capsys, "--dataset", "shoes", "--root", str(SHOES), "--split", "test", "--rankings", str(f))
    assert code == 2 and str(f) in err and "not valid JSON" in err


def test_malformed_annotation_names_the_file_and_entry(tmp_path, capsys):
    root = tmp_path / "cirr_root"
    shutil.copytree(CIRR / "cirr", root / "cirr")
    cap = root / "cirr" / "captions" / "cap.rc2.val.json"
    data = json.loads(cap.read_text())
    del data[3]["target_hard"]
    cap.write_text(json.dumps(data))
    f = tmp_path / "r.json"
    f.write_text("{}")
    code, err = _evaluate(capsys, "--dataset", "cirr", "--root", str(root), "--split", "val", "--rankings", str(f))
    assert code == 2
    assert err.strip() == f"error: {cap}: entry 3 (id '{data[3]['pairid']}') has no 'target_hard'"
    # a test split has no answers: a clear error, not a score
    code, err = _evaluate(capsys, "--dataset", "circo", "--root", str(CIRCO), "--split", "test", "--rankings", str(f))
    assert code == 2 and "test server" in err
