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


# ------------------------------------------------------------------ data check, with placeholders


def _placeholder(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _cirr_tree(tmp_path: Path, split: str, png_bytes: bytes) -> tuple[Path, dict]:
    """A copy of the CIRR annotations with a placeholder image for every name of ``split``."""
    root = tmp_path / "cirr"
    shutil.copytree(CIRR / "cirr", root / "cirr")
    names = json.loads((CIRR / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text())
    for rel in names.values():
        _placeholder(root / rel, png_bytes)
    return root, names


def _fiq_tree(tmp_path: Path) -> Path:
    """A copy of the FashionIQ annotations (no images)."""
    root = tmp_path / "fiq"
    shutil.copytree(FIQ / "captions", root / "captions")
    shutil.copytree(FIQ / "image_splits", root / "image_splits")
    return root


@pytest.fixture(scope="module")
def png_bytes():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _check(capsys, *args):
    code = main(["data", "check", "--no-progress", *args])
    out = capsys.readouterr()
    return code, json.loads(out.out.splitlines()[-1]), out.err


def test_data_check_reports_counts_and_names_bad_images(tmp_path, capsys, png_bytes):
    # CIRR val: images at the relative paths of the split file
    root, split = _cirr_tree(tmp_path, "val", png_bytes)
    code, report, _ = _check(capsys, "--dataset", "cirr", "--root", str(root), "--split", "val")
    assert code == 0
    assert (report["queries"], report["gallery"], report["missing"], report["unreadable"]) == (4181, 2297, 0, 0)

    # one image deleted, one truncated: non-zero exit naming both, nothing else changed
    names = list(split)
    (root / split[names[0]]).unlink()
    (root / split[names[1]]).write_bytes(png_bytes[:20])
    code, report, err = _check(capsys, "--dataset", "cirr", "--root", str(root), "--split", "val")
    assert code == 2
    assert report["missing_ids"] == [names[0]] and report["unreadable_ids"] == [names[1]]
    assert err.strip() == f"error: cirr val under {root}: 1 missing and 1 unreadable images, first: {names[0]!r}, {names[1]!r}"
    # --quick only looks for files: the truncated one passes
    code, report, _ = _check(capsys, "--dataset", "cirr", "--root", str(root), "--split", "val", "--quick")
    assert code == 2 and report["missing"] == 1 and report["unreadable"] == 0


@pytest.mark.parametrize("cat,queries,gallery", [("dress", 2017, 3817), ("shirt", 2038, 6346), ("toptee", 1961, 5373)])
def test_data_check_fashioniq(tmp_path, capsys, png_bytes, cat, queries, gallery):
    fiq = _fiq_tree(tmp_path)
    b = load_benchmark("fashioniq", fiq, "val", cat, images=False)
    for image_id in {*b.gallery, *(q.reference for q in b.queries), *(t for q in b.queries for t in q.targets)}:
        _placeholder(fiq / "images" / f"{image_id}.jpg", png_bytes)  # PIL reads by content, not suffix
    code, report, _ = _check(capsys, "--dataset", "fashioniq", "--root", str(fiq), "--split", "val", "--category", cat)
    assert code == 0 and (report["queries"], report["gallery"], report["missing"]) == (queries, gallery, 0)


def test_data_check_shoes(tmp_path, capsys, png_bytes):
    shoes = tmp_path / "shoes"
    shutil.copytree(SHOES, shoes)
    for n, name in enumerate((SHOES / "eval_im_names.txt").read_text().split()):
        _placeholder(shoes / f"folder{n % 3}" / "nested" / name, png_bytes)  # found by name, anywhere
    code, report, _ = _check(capsys, "--dataset", "shoes", "--root", str(shoes), "--split", "test")
    assert code == 0 and (report["queries"], report["gallery"], report["missing"]) == (1761, 4658, 0)


# ------------------------------------------------------------------------------------ submissions


def test_cirr_submission_files(tmp_path, capsys):
    b = load_benchmark("cirr", CIRR, "test1", images=False)
    gallery = b.gallery
    rankings = {q.id: [q.reference] + [g for g in gallery if g != q.reference] for q in b.queries}
    f = tmp_path / "r.json"
    f.write_text(json.dumps(rankings))
    out = tmp_path / "sub"
    assert main(["submit", "--dataset", "cirr", "--root", str(CIRR), "--split", "test1", "--rankings", str(f), "--out", str(out)]) == 0
    recall = json.loads((out / "recall_submission_csmcir.json").read_text())
    subset = json.loads((out / "recall_subset_submission_csmcir.json").read_text())
    assert (recall.pop("version"), recall.pop("metric"), subset.pop("metric")) == ("rc2", "recall", "recall_subset")
    assert set(recall) == {q.id for q in b.queries} and len(recall) == 4148
    for q in b.queries:
        assert len(recall[q.id]) == 50 and q.reference not in recall[q.id]
        want = [g for g in rankings[q.id] if g in set(q.members) - {q.reference}][:3]
        assert subset[q.id] == want
    assert (out / "recall_submission_csmcir.json").stat().st_size < 5 * 1024 * 1024

    # a ranking too shallow for the image set: an error, and no file written
    shallow = {q.id: [g for g in gallery if g not in q.members][:60] for q in b.queries}
    f.write_text(json.dumps(shallow))
    out2 = tmp_path / "sub2"
    assert main(["submit", "--dataset", "cirr", "--root", str(CIRR), "--split", "test1", "--rankings", str(f), "--out", str(out2)]) == 2
    assert "rank deeper" in capsys.readouterr().err
    assert not any(out2.glob("*.json"))


def test_circo_submission_file(tmp_path):
    b = load_benchmark("circo", CIRCO, "test", images=False)
    rankings = {q.id: [str(10**6 + i) for i in range(60)] for q in b.queries}
    f = tmp_path / "r.json"
    f.write_text(json.dumps(rankings))
    assert (
        main(["submit", "--dataset", "circo", "--root", str(CIRCO), "--split", "test", "--rankings", str(f), "--out", str(tmp_path)]) == 0
    )
    sub = json.loads((tmp_path / "submission_csmcir.json").read_text())
    assert sorted(sub, key=int) == [str(i) for i in range(800)]
    assert all(len(v) == 50 and len(set(v)) == 50 and all(isinstance(x, int) for x in v) for v in sub.values())


# ------------------------------------------------------------- training and ranking on a benchmark


def test_fit_on_shoes_logs_official_metrics_and_rank_agrees(tmp_path, capsys):
    """A fit with configs/shoes.yaml on the Shoes layout (placeholder images, no captions:
    target_text none) validates by Shoes' protocol, and `rank` with its checkpoint reports the
    same numbers."""
    import csv

    import numpy as np
    from PIL import Image

    root = tmp_path / "shoes"
    shutil.copytree(SHOES, root)
    names = set((SHOES / "train_im_names.txt").read_text().split()) | set((SHOES / "eval_im_names.txt").read_text().split())
    rng = np.random.default_rng(0)
    (root / "womens").mkdir()
    for name in sorted(names):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "womens" / name, format="PNG")
    run = tmp_path / "run"
    repo = Path(__file__).resolve().parents[1]
    args = [
        "fit",
        "--config",
        str(repo / "configs" / "shoes.yaml"),
        "--model.net.model",
        "tiny",
        "--data.root",
        str(root),
        "--data.target_text",
        "none",
        "--data.image_size",
        "16",
        "--data.batch_size",
        "16",
        "--data.eval_batch_size",
        "512",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.default_root_dir",
        str(run),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]
    assert main(args) == 0
    rows = list(csv.DictReader(open(next(run.glob("lightning_logs/version_*/metrics.csv")))))
    logged = {k: float(v) for r in rows for k, v in r.items() if v}
    assert {"val/shoes/R@1", "val/shoes/R@10", "val/shoes/R@50"} <= set(logged)

    out = tmp_path / "rank.json"
    capsys.readouterr()
    assert (
        main(
            [
                "rank",
                "--ckpt",
                str(run / "last.ckpt"),
                "--dataset",
                "shoes",
                "--root",
                str(root),
                "--split",
                "test",
                "--out",
                str(out),
                "--k",
                "51",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    rankings = json.loads(out.read_text())
    b = load_benchmark("shoes", root, "test", images=False)
    assert len(rankings) == 1761 and all(r[0] != q.reference for q, r in zip(b.queries, rankings.values()))
    code, m = _evaluate(capsys, "--dataset", "shoes", "--root", str(root), "--split", "test", "--rankings", str(out))
    assert code == 0
    # within 4 of the 1761 queries: a model trained 2 steps on noise images ranks the gallery with
    # near-ties; on one machine R@50 differed by 3 queries (1.1357 against 0.9654), R@1 and R@10 by at
    # most 1, the same with rank at validation's batch size, so the cause is not the batching (not found)
    for k in ("R@1", "R@10", "R@50"):
        assert m[k] == pytest.approx(logged[f"val/shoes/{k}"], abs=100 * 4 / 1761)
        assert f"{k} {m[k]:.2f}" in printed


@pytest.mark.parametrize("name", ["cirr", "fashioniq", "shoes"])
def test_benchmark_configs_parse(name, capsys):
    repo = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(repo / "configs" / f"{name}.yaml"), "--print_config"])
    assert e.value.code == 0
    assert f"dataset: {name}" in capsys.readouterr().out


def test_cirr_submission_from_a_checkpoint(trained, tmp_path, png_bytes):
    """`submit --ckpt` ranks test1 itself (whole gallery, reference excluded) and writes both files."""
    root, split = _cirr_tree(tmp_path, "test1", png_bytes)
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"image_id": n, "levels": {}, "final": "a photo"}) + "\n" for n in split))
    out = tmp_path / "sub"
    assert (
        main(
            [
                "submit",
                "--dataset",
                "cirr",
                "--root",
                str(root),
                "--split",
                "test1",
                "--ckpt",
                str(trained / "last.ckpt"),
                "--captions",
                str(caps),
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    b = load_benchmark("cirr", root, "test1", images=False)
    recall = json.loads((out / "recall_submission_csmcir.json").read_text())
    subset = json.loads((out / "recall_subset_submission_csmcir.json").read_text())
    for q in b.queries:
        assert len(recall[q.id]) == 50 and q.reference not in recall[q.id]
        assert len(subset[q.id]) == 3 and set(subset[q.id]) <= set(q.members) - {q.reference}


def test_fashioniq_all_three_ranks_each_query_within_its_category(tmp_path, capsys):
    b = load_benchmark("fashioniq", FIQ, "val", images=False)
    assert len(b.queries) == 2017 + 2038 + 1961 and set(b.sub_galleries) == {"dress", "shirt", "toptee"}
    other = {
        c: [g for c2, gal in b.sub_galleries.items() if c2 != c for g in gal if g not in set(b.sub_galleries[c])][:30]
        for c in b.sub_galleries
    }
    rankings = {}
    for q in b.queries:
        cat = q.id.split("/")[0]
        own = [g for g in b.sub_galleries[cat] if g not in q.targets][:60]
        # other categories' images first (dropped by the protocol), then 9 own, then the target:
        # rank 10 within the category
        rankings[q.id] = other[cat] + own[:9] + [q.targets[0]] + own[9:50]
    f = tmp_path / "r.json"
    f.write_text(json.dumps(rankings))
    code, m = _evaluate(capsys, "--dataset", "fashioniq", "--root", str(FIQ), "--split", "val", "--rankings", str(f))
    assert code == 0
    assert m["mean/R@10"] == 100.0 and m["dress/R@10"] == 100.0 and m["mean"] == 100.0


def test_data_check_circo(tmp_path, capsys, png_bytes):
    root = tmp_path / "circo"
    shutil.copytree(CIRCO / "annotations", root / "annotations")
    b = load_benchmark("circo", root, "val", images=False)
    ids = sorted({int(x) for q in b.queries for x in (q.reference, *q.targets)} | set(range(1, 200)))
    info = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]}))
    for i in ids:
        _placeholder(root / "COCO2017_unlabeled" / "unlabeled2017" / f"{i:012d}.jpg", png_bytes)
    code, report, _ = _check(capsys, "--dataset", "circo", "--root", str(root), "--split", "val")
    assert code == 0 and (report["queries"], report["gallery"], report["missing"]) == (220, len(ids), 0)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: d[5].__setitem__("captions", "not a list"), "entry 5: 'captions' must be list, got str"),
        (lambda d: d[2].pop("candidate"), "entry 2 has no 'candidate'"),
        (lambda d: d.__setitem__(7, ["a list"]), "entry 7 is list, expected an object"),
    ],
)
def test_malformed_fashioniq_entries(tmp_path, capsys, damage, message):
    root = _fiq_tree(tmp_path)
    cap = root / "captions" / "cap.dress.val.json"
    data = json.loads(cap.read_text())
    damage(data)
    cap.write_text(json.dumps(data))
    f = tmp_path / "r.json"
    f.write_text("{}")
    code, err = _evaluate(
        capsys, "--dataset", "fashioniq", "--root", str(root), "--split", "val", "--category", "dress", "--rankings", str(f)
    )
    assert code == 2 and err.strip() == f"error: {cap}: {message}"


def test_duplicate_and_truncated_annotations(tmp_path, capsys):
    root = tmp_path / "circo"
    shutil.copytree(CIRCO / "annotations", root / "annotations")
    ann = root / "annotations" / "val.json"
    data = json.loads(ann.read_text())
    data[9]["id"] = data[4]["id"]
    ann.write_text(json.dumps(data))
    f = tmp_path / "r.json"
    f.write_text("{}")
    code, err = _evaluate(capsys, "--dataset", "circo", "--root", str(root), "--split", "val", "--rankings", str(f))
    assert code == 2 and err.strip() == f"error: {ann}: query id '{data[4]['id']}' appears twice"
    ann.write_text(json.dumps(data)[:1000])
    code, err = _evaluate(capsys, "--dataset", "circo", "--root", str(root), "--split", "val", "--rankings", str(f))
    assert code == 2 and err.startswith(f"error: {ann}: not valid JSON")


def test_evaluate_rejects_unknown_query_ids(tmp_path, capsys):
    b = load_benchmark("shoes", SHOES, "test", images=False)
    rankings = {q.id: [q.targets[0]] + [f"x{i}" for i in range(50)] for q in b.queries}
    rankings["99999"] = ["a"] * 50
    f = tmp_path / "r.json"
    f.write_text(json.dumps(rankings))
    code, err = _evaluate(capsys, "--dataset", "shoes", "--root", str(SHOES), "--split", "test", "--rankings", str(f))
    assert code == 2
    assert err.strip() == f"error: {f}: query '99999' is not a query of shoes test (1 unknown ids; wrong split or dataset?)"


def test_submit_from_a_checkpoint_refuses_a_too_small_gallery_before_encoding(trained, tmp_path, png_bytes, capsys):
    """A test1 cut to 4 queries has a gallery of at most 24 images: refused at once, one line, nothing written."""
    root, names = _cirr_tree(tmp_path, "test1", png_bytes)
    caps = json.loads((root / "cirr" / "captions" / "cap.rc2.test1.json").read_text())[:4]
    keep = {m for q in caps for m in q["img_set"]["members"]} | {q["reference"] for q in caps}
    (root / "cirr" / "captions" / "cap.rc2.test1.json").write_text(json.dumps(caps))
    (root / "cirr" / "image_splits" / "split.rc2.test1.json").write_text(json.dumps({n: p for n, p in names.items() if n in keep}))
    out = tmp_path / "sub"
    args = ["submit", "--dataset", "cirr", "--root", str(root), "--split", "test1", "--ckpt", str(trained / "last.ckpt"), "--out", str(out)]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"has {len(keep)} gallery images" in err[0] and "at least 51" in err[0]
    assert not any(out.glob("*.json"))
    assert "embedding" not in err[0]


def test_rank_on_cirr_keeps_the_image_sets_so_evaluate_scores_its_file(trained, tmp_path, png_bytes, capsys):
    """`csmcir rank --dataset cirr --k 10` writes the top 10 plus each query's image-set members
    ranked below them: `evaluate` scores that file (Rsubset included) exactly as a full ranking."""
    root, names = _cirr_tree(tmp_path, "val", png_bytes)
    caps = json.loads((root / "cirr" / "captions" / "cap.rc2.val.json").read_text())[:40]
    keep = {m for q in caps for m in q["img_set"]["members"]} | {q["reference"] for q in caps} | {q["target_hard"] for q in caps}
    (root / "cirr" / "captions" / "cap.rc2.val.json").write_text(json.dumps(caps))
    (root / "cirr" / "image_splits" / "split.rc2.val.json").write_text(json.dumps({n: p for n, p in names.items() if n in keep}))
    (root / "captions.jsonl").write_text("".join(json.dumps({"image_id": n, "levels": {}, "final": "a photo"}) + "\n" for n in keep))
    base = ["rank", "--dataset", "cirr", "--root", str(root), "--split", "val", "--ckpt", str(trained / "last.ckpt"), "--device", "cpu"]
    assert main([*base, "--k", "10", "--out", str(tmp_path / "top10.json")]) == 0
    assert main([*base, "--k", str(len(keep)), "--out", str(tmp_path / "full.json")]) == 0
    top10 = json.loads((tmp_path / "top10.json").read_text())
    assert max(len(r) for r in top10.values()) > 10 and all(len(r) <= 10 + 6 for r in top10.values())
    scores = []
    for f in ("top10.json", "full.json"):
        capsys.readouterr()
        code, m = _evaluate(capsys, "--dataset", "cirr", "--root", str(root), "--split", "val", "--rankings", str(tmp_path / f))
        assert code == 0
        scores.append(m)
    for k in ("R@1", "R@5", "R@10", "Rsubset@1", "Rsubset@2", "Rsubset@3"):
        assert scores[0][k] == scores[1][k], k
