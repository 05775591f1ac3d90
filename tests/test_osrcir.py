"""The MLLM systems csmcir is compared with, runnable: CIR-CoT as a retriever (teacher stores),
OSrCIR end to end on a tiny random MLLM and a tiny random CLIP saved and loaded by path, and the
synthetic stand-in reasoner."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from csmcir.cli import main
from csmcir.data.custom import CustomCIR
from csmcir.errors import CsmcirError
from csmcir.osrcir import OSRCIR, describe_queries, make_retriever, query_prompt, rank_descriptions, read_descriptions
from csmcir.osrcir.standin import apply_mods, describe_objects, parse_final_caption
from csmcir.retrieval.ranking import rank_teacher, score_rankings
from csmcir.teacher import import_embeddings
from csmcir.testing.tiny_clip import make_tiny_clip
from csmcir.testing.tiny_mllm import make_tiny_qwen2vl


@pytest.fixture(scope="module")
def tiny_mllm(tmp_path_factory):
    return str(make_tiny_qwen2vl(tmp_path_factory.mktemp("qwen2_vl"), arch="qwen2_vl"))


@pytest.fixture(scope="module", params=["clip", "siglip"])
def tiny_clip(request, tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp(request.param), kind=request.param)


def _brute_force(ds, split, q, g, k):
    """Top-k gallery ids by cosine, the reference left out: the definition, by hand."""
    trip, gal = ds.triplets(split), ds.gallery(split)
    qn, gn = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    s = qn @ gn.T
    out = {}
    for i, t in enumerate(trip):
        order = [gal[j] for j in np.argsort(-s[i], kind="stable") if gal[j] != t.reference]
        out[t.id] = order[:k]
    return out


# -- CIR-CoT as a retriever --------------------------------------------------------------------


def _stores(ds, tmp_path, split="val", qdim=24, gdim=24, model="m", gmodel=None, drop_query=False):
    rng = np.random.default_rng(0)
    trip, gal = ds.triplets(split), ds.gallery(split)
    q = rng.standard_normal((len(trip), qdim)).astype(np.float32)
    g = rng.standard_normal((len(gal), gdim)).astype(np.float32)
    qids = [t.id for t in trip][: -1 if drop_query else None]
    np.save(tmp_path / "q.npy", q[: len(qids)])
    (tmp_path / "q.txt").write_text("\n".join(qids))
    np.save(tmp_path / "g.npy", g)
    (tmp_path / "g.txt").write_text("\n".join(gal))
    import_embeddings(tmp_path / "tq", tmp_path / "q.npy", tmp_path / "q.txt", model, kind="query")
    import_embeddings(tmp_path / "tg", tmp_path / "g.npy", tmp_path / "g.txt", gmodel or model, kind="gallery")
    return q, g


def test_ranking_from_teacher_stores_equals_a_brute_force_matmul(easy_bench, tmp_path, capsys):
    ds = CustomCIR(easy_bench)
    q, g = _stores(ds, tmp_path)
    ranking = rank_teacher(ds, "val", tmp_path / "tq", tmp_path / "tg", k=10)
    assert ranking.as_dict() == _brute_force(ds, "val", q, g, 10)
    # through the CLI, the same file the student's `csmcir rank` writes, scored by the same protocol
    out = tmp_path / "rank.json"
    code = main(["rank", "--root", str(easy_bench), "--split", "val", "--teacher", str(tmp_path / "tq")]
                + ["--teacher-gallery", str(tmp_path / "tg"), "--k", "10", "--out", str(out)])  # fmt: skip
    assert code == 0 and json.loads(out.read_text()) == ranking.as_dict()
    want = score_rankings(ds, "val", ranking)
    assert f"R@1 {want['R@1']:.2f}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kw,swap,message",
    [
        ({"gdim": 16}, False, "differ in dim: .* has 24, .* has 16"),
        ({"gmodel": "other"}, False, "differ in model: .* has 'm', .* has 'other'; embed both sides with one teacher"),
        ({"drop_query": True}, False, "has no embedding for 1 querys of split 'val', first 'val-"),
        ({}, True, "is a gallery store; pass the query store"),
    ],
)
def test_mismatched_teacher_stores_are_refused_in_one_line(easy_bench, tmp_path, capsys, kw, swap, message):
    ds = CustomCIR(easy_bench)
    _stores(ds, tmp_path, **kw)
    q, g = (tmp_path / "tg", tmp_path / "tq") if swap else (tmp_path / "tq", tmp_path / "tg")
    with pytest.raises(CsmcirError, match=message):
        rank_teacher(ds, "val", q, g)
    out = tmp_path / "r.json"
    assert (
        main(["rank", "--root", str(easy_bench), "--split", "val", "--teacher", str(q), "--teacher-gallery", str(g), "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and not out.exists()


def test_rank_needs_a_checkpoint_or_both_teacher_stores(easy_bench, tmp_path, capsys):
    assert main(["rank", "--root", str(easy_bench), "--teacher", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 2
    assert "rank needs --ckpt (a checkpoint), or --teacher and --teacher-gallery" in capsys.readouterr().err


# -- the stand-in reasoner --------------------------------------------------------------------


def test_the_stand_in_reads_every_caption_the_captioner_writes(easy_bench):
    caps = CustomCIR(easy_bench).captions()
    assert len(caps) > 100
    for c in caps.values():
        assert describe_objects(parse_final_caption(c.final)) == c.final


def test_the_stand_in_applies_each_kind_of_edit_to_the_caption():
    objs = parse_final_caption("a small red striped circle at the top left and a large square in the center")
    assert [o.shape for o in objs] == ["circle", "square"] and objs[1].colour is None and objs[0].cell == 0
    mods = [
        {"type": "colour", "value": "blue", "cell": [0, 0], "free": None},
        {"type": "move", "value": "bottom right", "cell": [1, 1], "free": None},
        {"type": "add", "value": "small green triangle", "cell": [0, 2], "free": None},
    ]
    new, notes = apply_mods(objs, mods)
    assert describe_objects(new) == (
        "a small blue striped circle at the top left, a large square at the bottom right and a small green triangle at the top right"
    )
    assert notes == []
    new, notes = apply_mods(objs, [{"type": "remove", "value": "small red striped circle", "cell": [0, 0], "free": None}])
    assert describe_objects(new) == "a large square in the center"
    # an object the caption does not place cannot be edited: kept, and said so in the reflection
    new, notes = apply_mods(objs, [{"type": "shape", "value": "cross", "cell": [2, 2], "free": None}])
    assert new == objs and notes == ["shape: the caption has no object at the bottom right"]


def test_stand_in_descriptions_retrieve_well_above_chance(easy_bench, tmp_path):
    ds = CustomCIR(easy_bench)
    out = tmp_path / "d.jsonl"
    counts = describe_queries(ds, "val", out, backend="standin", progress=False)
    assert counts["described"] == len(ds.triplets("val")) and counts["ok"] == counts["described"]
    rec = read_descriptions(out)[ds.triplets("val")[0].id]
    assert (
        rec["model"].startswith("osrcir-standin")
        and rec["prompt"] == "osrcir@1"
        and rec["levels"]["thoughts"] == ds.triplets("val")[0].text
    )
    ranking = rank_descriptions(ds, "val", out, make_retriever("captions"), k=10, progress=False)
    m = score_rankings(ds, "val", ranking)
    assert m["R@10"] > 10 * 10 / len(ds.gallery("val"))  # ten times chance at least


# -- OSrCIR with a real (tiny, random) MLLM and CLIP ---------------------------------------------


def test_the_prompt_carries_the_modification_and_the_four_parts():
    p = query_prompt('make the  "circle" red')
    assert "modification request: \"make the 'circle' red\"" in p
    for label in ("Caption:", "Thoughts:", "Reflection:", "Target:"):
        assert label in p
    parsed = OSRCIR.parse("Caption: a dog\nThoughts: make it a cat\nReflection: nothing unsupported\nTarget: a cat on grass")
    assert parsed.status == "ok" and parsed.final == "a cat on grass" and parsed.levels["thoughts"] == "make it a cat"
    # a model that ignores the format: its raw text is the description
    assert OSRCIR.parse("just a cat").final == "just a cat" and OSRCIR.parse("just a cat").status == "unparsed"


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "csmcir.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_osrcir_end_to_end_survives_a_kill_and_ranks_like_a_matmul(tiny_mllm, tiny_clip, easy_bench, tmp_path):
    ds = CustomCIR(easy_bench)
    out = tmp_path / "desc.jsonl"
    args = ["osrcir", "describe", "--root", str(easy_bench), "--split", "val", "--model", tiny_mllm, "--out", str(out)]
    args += ["--batch-size", "1", "--max-new-tokens", "12", "--device", "cpu", "--no-progress"]
    p = _cli(*args)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and (not out.exists() or out.read_bytes().count(b"\n") < 3):
        time.sleep(0.005)
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    from csmcir.captioning.store import read_store

    n_killed = len(read_store(out, repair=True, key="query_id"))
    n = len(ds.triplets("val"))
    assert 3 <= n_killed < n
    p = _cli(*args)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr
    stats = json.loads(stdout)
    assert stats["already_done"] == n_killed and stats["already_done"] + stats["described"] == n
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["query_id"] for r in lines) == sorted(t.id for t in ds.triplets("val"))  # each once
    # random weights do not follow the format: the raw text is kept and is the description
    assert all(r["status"] in ("unparsed", "empty", "partial", "ok") and r["final"] == OSRCIR.parse(r["raw"]).final for r in lines)
    assert lines[0]["model"] == tiny_mllm and lines[0]["prompt"] == "osrcir@1"

    # retrieval through the tiny CLIP by path: equals its text and image towers by hand
    retriever = make_retriever("clip", tiny_clip, device="cpu", dtype="float32")
    cache = tmp_path / "gcache"
    ranking = rank_descriptions(ds, "val", out, retriever, k=10, gallery_cache=cache, progress=False)
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_clip).eval()
    tok, proc = AutoTokenizer.from_pretrained(tiny_clip), AutoImageProcessor.from_pretrained(tiny_clip)
    recs = read_descriptions(out)
    pad = {"padding": "max_length", "max_length": 64} if "siglip" in model.config.model_type else {"padding": True}
    with torch.no_grad():
        tf = model.get_text_features(**tok([recs[t.id]["final"] for t in ds.triplets("val")], truncation=True, return_tensors="pt", **pad))
        px = proc(images=[ds.load_image(i) for i in ds.gallery("val")], return_tensors="pt")["pixel_values"]
        imf = model.get_image_features(pixel_values=px)
    tf, imf = (getattr(x, "pooler_output", x).numpy() for x in (tf, imf))
    assert ranking.as_dict() == _brute_force(ds, "val", tf, imf, 10)
    # the gallery cache holds every image once; a second ranking reads it and agrees
    from csmcir.teacher import read_teacher_store

    header, ids, _ = read_teacher_store(cache)
    assert sorted(ids) == sorted(ds.gallery("val")) and header["mode"] == "clip-image"
    again = rank_descriptions(ds, "val", out, retriever, k=10, gallery_cache=cache, progress=False)
    assert again.as_dict() == ranking.as_dict()
    # the CLI writes the same rankings
    r = tmp_path / "r.json"
    code = main(["osrcir", "rank", "--root", str(easy_bench), "--split", "val", "--descriptions", str(out), "--retriever", "clip"]
                + ["--retriever-model", tiny_clip, "--device", "cpu", "--dtype", "float32", "--k", "10", "--out", str(r), "--no-progress"])  # fmt: skip
    assert code == 0 and json.loads(r.read_text()) == ranking.as_dict()


def test_osrcir_errors_are_one_line(easy_bench, tmp_path, capsys):
    ds = CustomCIR(easy_bench)
    describe_queries(ds, "val", tmp_path / "d.jsonl", backend="standin", limit=3, progress=False)
    with pytest.raises(
        CsmcirError, match=r"has no description for \d+ of \d+ queries of split 'val', first .*run `csmcir osrcir describe`"
    ):
        rank_descriptions(ds, "val", tmp_path / "d.jsonl", make_retriever("captions"), progress=False)
    with pytest.raises(CsmcirError, match="--retriever clip needs --retriever-model"):
        make_retriever("clip")
    capsys.readouterr()
    code = main(["osrcir", "rank", "--root", str(easy_bench), "--split", "val", "--descriptions", str(tmp_path / "nope.jsonl")]
                + ["--retriever", "captions", "--out", str(tmp_path / "r.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "description store not found" in err and err.count("\n") == 1
