"""Tests for csmcir.retrieval.index: search correctness, save/load, and clean errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from csmcir.errors import CsmcirError
from csmcir.retrieval import index as index_mod
from csmcir.retrieval.index import GalleryIndex, faiss_gpu_available


def _normalised(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ids(n: int) -> list[str]:
    return [f"img-{i:05d}" for i in range(n)]


@pytest.fixture()
def small_index() -> GalleryIndex:
    return GalleryIndex.build(_normalised(200, 16, 0), _ids(200), info={"model": "tiny"})


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- search --------------------------------------------------------------------------------


def test_flat_search_equals_torch_topk():
    gallery, queries = _normalised(2000, 64, 1), _normalised(50, 64, 2)
    ids = _ids(2000)
    index = GalleryIndex.build(gallery, ids)
    assert (index.dim, index.ntotal, len(index)) == (64, 2000, 2000)
    scores, got_ids = index.search(queries, k=10)

    ref_scores, ref_idx = torch.topk(torch.from_numpy(queries) @ torch.from_numpy(gallery).T, 10)
    assert scores.shape == (50, 10) and scores.dtype == np.float32
    assert got_ids == [[ids[j] for j in row] for row in ref_idx.tolist()]
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-5)


def test_search_clips_k_and_accepts_float64():
    gallery = _normalised(7, 8, 3)
    index = GalleryIndex.build(gallery.astype(np.float64), _ids(7))
    scores, ids = index.search(gallery[:2].astype(np.float64), k=50)
    assert scores.shape == (2, 7) and all(len(row) == 7 for row in ids)
    assert [row[0] for row in ids] == ["img-00000", "img-00001"]  # each finds itself first


def test_search_dimension_mismatch_names_both(small_index):
    with pytest.raises(CsmcirError, match="query dimension 8 .*index dimension 16"):
        small_index.search(_normalised(3, 8, 4), k=5)


@pytest.mark.parametrize(
    "queries, pattern",
    [(np.zeros(16, dtype=np.float32), "2-D"), (np.full((2, 16), np.nan, dtype=np.float32), "NaN"), ([["a"] * 16], "numeric")],
)
def test_search_bad_queries(small_index, queries, pattern):
    with pytest.raises(CsmcirError, match=pattern):
        small_index.search(queries, k=5)
    with pytest.raises(CsmcirError, match="k must be"):
        small_index.search(_normalised(1, 16, 5), k=0)


def test_hnsw_close_to_flat_and_round_trips(tmp_path):
    gallery, queries = _normalised(1000, 32, 6), _normalised(40, 32, 7)
    flat = GalleryIndex.build(gallery, _ids(1000))
    hnsw = GalleryIndex.build(gallery, _ids(1000), kind="hnsw")
    assert hnsw.info["kind"] == "hnsw" and hnsw.info["hnsw"]["M"] == index_mod.HNSW_M
    _, exact = flat.search(queries, 10)
    scores, approx = hnsw.search(queries, 10)
    overlap = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert overlap > 0.9
    hnsw.save(tmp_path)
    loaded = GalleryIndex.load(tmp_path)
    scores2, approx2 = loaded.search(queries, 10)
    assert approx2 == approx and np.array_equal(scores2, scores)


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Embeddings with structure (near neighbours), as trained ones have; IVF recall needs it."""
    from csmcir.bench.retrieval import make_embeddings

    return make_embeddings(n, d, 0, "clustered", seed)[0]


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq", "hnsw"])
def test_every_kind_builds_saves_and_loads_with_identical_results(tmp_path, kind):
    gallery = _clustered(3000, 32, 0)
    queries = gallery[:25] + 0.01 * _normalised(25, 32, 1)
    index = GalleryIndex.build(gallery, _ids(3000), kind=kind)
    scores, hits = index.search(queries, 10)
    index.save(tmp_path)
    loaded = GalleryIndex.load(tmp_path)
    assert loaded.kind == kind and loaded.info == index.info and len(loaded) == 3000
    scores2, hits2 = loaded.search(queries, 10)
    assert hits2 == hits and np.array_equal(scores2, scores)
    # each query's own gallery row is its nearest neighbour (ivf_pq: within its top 10)
    found = [f"img-{i:05d}" in (h if kind == "ivf_pq" else h[:1]) for i, h in enumerate(hits)]
    assert np.mean(found) >= 0.9


def test_ivf_parameters_recorded_and_nprobe_trades_recall(tmp_path):
    gallery, queries = _clustered(20000, 32, 2), _clustered(200, 32, 2)[:100]
    exact = GalleryIndex.build(gallery, _ids(20000)).search(queries, 20)[1]
    ivf = GalleryIndex.build(gallery, _ids(20000), kind="ivf_flat")
    assert ivf.info["ivf"] == {"nlist": index_mod.ivf_nlist(20000), "nprobe": index_mod.IVF_NPROBE}

    def recall() -> float:
        got = ivf.search(queries, 20)[1]
        return float(np.mean([len(set(a) & set(e)) / 20 for a, e in zip(got, exact)]))

    ivf.set_search_params(nprobe=1)
    low = recall()
    ivf.set_search_params(nprobe=ivf.info["ivf"]["nlist"])
    assert recall() == 1.0 > low  # every cell searched = exact
    ivf.set_search_params(nprobe=4)
    ivf.save(tmp_path)
    assert GalleryIndex.load(tmp_path).info["ivf"]["nprobe"] == 4  # the setting is saved with the index
    with pytest.raises(CsmcirError, match="nprobe must be in 1..512"):
        ivf.set_search_params(nprobe=513)
    with pytest.raises(CsmcirError, match="ef_search applies to hnsw"):
        ivf.set_search_params(ef_search=10)
    with pytest.raises(CsmcirError, match="nprobe applies to ivf"):
        GalleryIndex.build(gallery[:10], _ids(10)).set_search_params(nprobe=2)


def test_ivf_nlist_and_auto_kind(monkeypatch):
    assert [index_mod.ivf_nlist(n) for n in (10, 1000, 10_000, 100_000, 1_000_000)] == [1, 16, 256, 1024, 4096]
    assert all(n >= 39 * index_mod.ivf_nlist(n) for n in (40, 500, 5000, 50_000))
    emb = _normalised(300, 8, 0)
    assert GalleryIndex.build(emb, _ids(300), kind="auto").kind == "flat"
    monkeypatch.setattr(index_mod, "AUTO_FLAT_MAX", 100)
    assert GalleryIndex.build(emb, _ids(300), kind="auto").kind == "ivf_flat"


def test_ivf_pq_too_small_gallery_is_a_clear_error():
    with pytest.raises(CsmcirError, match="ivf_pq needs at least 624 embeddings"):
        GalleryIndex.build(_normalised(100, 16, 0), _ids(100), kind="ivf_pq")


def test_cli_index_types_match_the_library():
    from csmcir.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    action = next(a for a in sub.choices["index"]._actions if a.dest == "index_type")
    assert tuple(action.choices) == index_mod.INDEX_KINDS


def test_hnsw_missing_results_are_left_out():
    # HNSW can return fewer than k items; missing places must not turn into a real id.
    hnsw = GalleryIndex.build(_normalised(300, 8, 8), _ids(300), kind="hnsw")
    scores, ids = hnsw.search(_normalised(5, 8, 9), k=300)
    for row_scores, row_ids in zip(scores, ids):
        found = np.isfinite(row_scores)
        assert len(row_ids) == int(found.sum()) == len(set(row_ids))
        assert np.all(row_scores[~found] == -np.inf)


# ---- build errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "embeddings, ids, pattern",
    [
        (_normalised(5, 4, 0), _ids(4), "4 ids for 5 embedding rows"),
        (_normalised(3, 4, 0), ["a", "b", "a"], "duplicate id 'a'"),
        (np.ones(4, dtype=np.float32), ["a"], "2-D"),
        (np.ones((2, 3, 4), dtype=np.float32), ["a", "b"], "2-D"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), ["a", "b"], "NaN or infinite values .*row 0"),
        (np.array([[1.0, 0.0], [np.nan, 1.0]]), ["a", "b"], "NaN or infinite values .*row 1"),
        (np.zeros((0, 4), dtype=np.float32), [], "no embeddings"),
        (_normalised(2, 4, 0), ["a", "b\nc"], "one-line"),
        (_normalised(2, 4, 0), ["a", ""], "one-line"),
    ],
)
def test_build_bad_input(embeddings, ids, pattern):
    with pytest.raises(CsmcirError, match=pattern):
        GalleryIndex.build(embeddings, ids)


def test_build_bad_kind_info_and_gpu():
    emb = _normalised(3, 4, 0)
    with pytest.raises(CsmcirError, match="unknown index kind 'ivf'"):
        GalleryIndex.build(emb, _ids(3), kind="ivf")
    with pytest.raises(CsmcirError, match="JSON"):
        GalleryIndex.build(emb, _ids(3), info={"bad": object()})
    with pytest.raises(CsmcirError, match="GPU"):
        GalleryIndex.build(emb, _ids(3), kind="hnsw", use_gpu=True)
    if not faiss_gpu_available():
        with pytest.raises(CsmcirError, match="GPU"):
            GalleryIndex.build(emb, _ids(3), use_gpu=True)


def test_info_has_standard_fields_which_win():
    index = GalleryIndex.build(_normalised(4, 6, 0), _ids(4), info={"model": "m", "dim": 999})
    assert index.info == {
        "model": "m",
        "dim": 6,
        "count": 4,
        "metric": "inner_product",
        "kind": "flat",
        "faiss_version": faiss.__version__,
        "format_version": 1,
    }


def test_faiss_gpu_available_is_a_bool():
    assert isinstance(faiss_gpu_available(), bool)
    if not hasattr(faiss, "StandardGpuResources"):
        assert faiss_gpu_available() is False


@pytest.mark.gpu
@pytest.mark.skipif(not faiss_gpu_available(), reason="needs faiss-gpu and a GPU")
def test_gpu_index_matches_cpu_and_saves_a_cpu_index(tmp_path):
    gallery, queries = _normalised(3000, 32, 10), _normalised(20, 32, 11)
    cpu = GalleryIndex.build(gallery, _ids(3000), use_gpu=False)
    gpu = GalleryIndex.build(gallery, _ids(3000), use_gpu=True)
    assert gpu.on_gpu and not cpu.on_gpu
    s_cpu, i_cpu = cpu.search(queries, 20)
    s_gpu, i_gpu = gpu.search(queries, 20)
    assert i_gpu == i_cpu
    np.testing.assert_allclose(s_gpu, s_cpu, atol=1e-5)
    _, big = gpu.search(queries[:1], 2500)  # beyond the GPU k limit
    assert len(big[0]) == 2500
    gpu.save(tmp_path)
    assert not index_mod._is_gpu_index(faiss.read_index(str(tmp_path / "index.faiss")))


# ---- save / load ---------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, small_index):
    out = tmp_path / "new" / "index"  # created, parents too
    small_index.save(out)
    assert _files(out) == ["ids.txt", "index.faiss", "index_info.json"]
    assert (out / "ids.txt").read_text(encoding="utf-8").splitlines() == _ids(200)
    on_disk = json.loads((out / "index_info.json").read_text(encoding="utf-8"))
    assert on_disk == small_index.info and on_disk["model"] == "tiny"

    loaded = GalleryIndex.load(out)
    assert loaded.info == small_index.info
    assert loaded.ids == small_index.ids
    assert (loaded.dim, loaded.ntotal, loaded.kind) == (16, 200, "flat")
    queries = _normalised(25, 16, 12)
    s1, i1 = small_index.search(queries, 15)
    s2, i2 = loaded.search(queries, 15)
    assert i1 == i2 and np.array_equal(s1, s2)


def test_save_overwrites_an_existing_index(tmp_path, small_index):
    small_index.save(tmp_path)
    other = GalleryIndex.build(_normalised(10, 4, 1), _ids(10), info={"model": "other"})
    other.save(tmp_path)
    loaded = GalleryIndex.load(tmp_path)
    assert (loaded.ntotal, loaded.dim, loaded.info["model"]) == (10, 4, "other")
    assert _files(tmp_path) == ["ids.txt", "index.faiss", "index_info.json"]


def test_ids_with_spaces_and_unicode_round_trip(tmp_path):
    ids = [" lead", "trail ", "a b", "café", "dress/B00X"]
    GalleryIndex.build(_normalised(5, 4, 2), ids).save(tmp_path)
    assert GalleryIndex.load(tmp_path).ids == ids


def test_save_into_a_file_path_fails_cleanly(tmp_path, small_index):
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    with pytest.raises(CsmcirError, match="taken"):
        small_index.save(a_file)
    with pytest.raises(CsmcirError, match="taken"):
        small_index.save(a_file / "sub")
    assert _files(tmp_path) == ["taken"]
    assert a_file.read_text() == "not a folder"


def test_failed_write_leaves_no_partial_files(tmp_path, small_index, monkeypatch):
    def broken_write_index(index, path):
        Path(path).write_bytes(b"half an index")
        raise RuntimeError("Error in f() at io.cpp:1: Error: 'f' failed: disk full")

    out = tmp_path / "index"
    monkeypatch.setattr(index_mod.faiss, "write_index", broken_write_index)
    with pytest.raises(CsmcirError, match=r"index\.faiss.*disk full"):
        small_index.save(out)
    assert _files(out) == []


def test_failed_write_keeps_the_previous_index(tmp_path, small_index, monkeypatch):
    small_index.save(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)}

    def broken_write_text(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(self))

    other = GalleryIndex.build(_normalised(10, 4, 1), _ids(10))
    monkeypatch.setattr(Path, "write_text", broken_write_text)
    with pytest.raises(CsmcirError, match=r"cannot write .*ids\.txt: No space left on device"):
        other.save(tmp_path)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)} == before
    assert GalleryIndex.load(tmp_path).ntotal == 200


def test_interrupted_overwrite_is_not_a_complete_index(tmp_path, small_index, monkeypatch):
    # If saving stops after index.faiss was replaced, the old index_info.json must be gone so that
    # the folder does not pass for a complete index of mismatched files.
    small_index.save(tmp_path)
    real_replace = os.replace

    def replace_failing_on_ids(src, dst):
        if Path(dst).name == "ids.txt":
            raise OSError(5, "Input/output error", str(dst))
        real_replace(src, dst)

    other = GalleryIndex.build(_normalised(10, 4, 1), _ids(10))
    monkeypatch.setattr(os, "replace", replace_failing_on_ids)
    with pytest.raises(CsmcirError, match="Input/output error"):
        other.save(tmp_path)
    monkeypatch.undo()
    assert _files(tmp_path) == ["ids.txt", "index.faiss"]  # no temporary files either
    with pytest.raises(CsmcirError, match=r"index_info\.json is missing"):
        GalleryIndex.load(tmp_path)


def test_load_missing_folder(tmp_path):
    with pytest.raises(CsmcirError, match="nowhere"):
        GalleryIndex.load(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["index_info.json", "index.faiss", "ids.txt"])
def test_load_missing_file(tmp_path, small_index, name):
    small_index.save(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(CsmcirError, match=name.replace(".", r"\.") + ".* missing"):
        GalleryIndex.load(tmp_path)


@pytest.mark.parametrize(
    "garbage", [b"", b"\x00" * 64, bytes(range(256)) * 4, b"IxFI" + b"\xff" * 60], ids=["empty", "zeros", "bytes", "flat-header-then-junk"]
)
def test_load_corrupt_index(tmp_path, small_index, garbage):
    small_index.save(tmp_path)
    (tmp_path / "index.faiss").write_bytes(garbage)
    with pytest.raises(CsmcirError, match=r"index\.faiss is not a readable faiss index") as e:
        GalleryIndex.load(tmp_path)
    assert "\n" not in str(e.value)


def test_load_truncated_index(tmp_path, small_index):
    small_index.save(tmp_path)
    data = (tmp_path / "index.faiss").read_bytes()
    (tmp_path / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(CsmcirError, match=r"index\.faiss"):
        GalleryIndex.load(tmp_path)


def test_load_id_count_mismatch(tmp_path, small_index):
    small_index.save(tmp_path)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("".join(f"{i}\n" for i in _ids(199)), encoding="utf-8")
    with pytest.raises(CsmcirError, match=r"ids\.txt has 199 ids but the index holds 200"):
        GalleryIndex.load(tmp_path)
    ids_file.write_text("".join(f"{i}\n" for i in _ids(199) + ["img-00000"]), encoding="utf-8")
    with pytest.raises(CsmcirError, match=r"ids\.txt: duplicate id 'img-00000'"):
        GalleryIndex.load(tmp_path)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (None, "format_version 2"),
        ("dim", "holds 200 vectors of dimension 16"),
        ("metric", "metric 'l2'"),
    ],
)
def test_load_bad_info(tmp_path, small_index, text, pattern):
    small_index.save(tmp_path)
    info_file = tmp_path / "index_info.json"
    info = json.loads(info_file.read_text(encoding="utf-8"))
    if text is None:
        info["format_version"] = 2
        text = json.dumps(info)
    elif text == "dim":
        info["dim"] = 17
        text = json.dumps(info)
    elif text == "metric":
        info["metric"] = "l2"
        text = json.dumps(info)
    info_file.write_text(text, encoding="utf-8")
    with pytest.raises(CsmcirError, match=pattern) as e:
        GalleryIndex.load(tmp_path)
    assert "index_info.json" in str(e.value) and "\n" not in str(e.value)


def test_load_rejects_an_l2_index(tmp_path, small_index):
    small_index.save(tmp_path)
    l2 = faiss.IndexFlatL2(16)
    l2.add(_normalised(200, 16, 0))
    faiss.write_index(l2, str(tmp_path / "index.faiss"))
    with pytest.raises(CsmcirError, match="inner-product"):
        GalleryIndex.load(tmp_path)


def test_few_queries_on_a_flat_index_go_through_torch_with_the_same_results():
    gallery, queries = _normalised(5000, 32, 11), _normalised(64, 32, 12)
    index = GalleryIndex.build(gallery, _ids(5000))
    big_s, big = index.search(queries, 7)  # 64 queries: faiss
    assert len(queries[:3]) < index_mod.FLAT_TORCH_MAX_QUERIES
    for i in range(0, 64, 3):  # 3 at a time: torch
        s, hits = index.search(queries[i : i + 3], 7)
        assert hits == big[i : i + 3]
        assert np.allclose(s, big_s[i : i + 3], atol=1e-5)
    rows_s, rows = index.search_rows(queries[:1], 7)
    assert rows.dtype == np.int64 and [f"img-{j:05d}" for j in rows[0]] == big[0]
