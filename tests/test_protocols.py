"""The official protocols against hand-computed values and brute-force definitions."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csmcir.retrieval.protocols import ProtocolError, circo_map_at_k, cirr_metrics, fashioniq_metrics, recall_at_k, recall_subset_at_k

# ------------------------------------------------------------------------- hand-computed values


def test_recall_removes_the_reference_only_when_asked():
    rankings = {"q": ["ref", "t", "x"]}
    assert recall_at_k(rankings, {"q": ["t"]}, ks=(1, 2)) == {"R@1": 0.0, "R@2": 100.0}
    assert recall_at_k(rankings, {"q": ["t"]}, ks=(1, 2), references={"q": "ref"}) == {"R@1": 100.0, "R@2": 100.0}


def test_recall_counts_a_query_with_several_targets_once():
    rankings = {"a": ["t1", "t2"], "b": ["x", "y"]}
    assert recall_at_k(rankings, {"a": ["t1", "t2"], "b": ["z", "y"]}, ks=(1, 2)) == {"R@1": 50.0, "R@2": 100.0}


def test_cirr_subset_and_average():
    # gallery ranking: ref first, then two images outside the set, then set members
    rankings = {"0": ["ref", "o1", "o2", "m2", "tgt", "m3", "m4", "m5", "o3"]}
    members = {"0": ["ref", "tgt", "m2", "m3", "m4", "m5"]}
    out = cirr_metrics(rankings, {"0": "tgt"}, members, {"0": "ref"})
    # reference removed: o1 o2 m2 tgt -> target at rank 4
    assert (out["R@1"], out["R@5"], out["R@10"]) == (0.0, 100.0, 100.0)
    # subset: m2 tgt m3 ... -> target at rank 2
    assert (out["Rsubset@1"], out["Rsubset@2"], out["Rsubset@3"]) == (0.0, 100.0, 100.0)
    assert out["Avg"] == 50.0


def test_circo_map_hand_computed():
    # gts {a, b}; hits at ranks 1 and 3: AP@5 = (1/1 + 2/3) / min(5, 2)
    rankings = {"0": ["a", "x", "b", "y", "z"]}
    out = circo_map_at_k(rankings, {"0": ["a", "b"]}, ks=(1, 2, 5))
    assert out["mAP@1"] == pytest.approx(100.0)  # 1 / min(1, 2)
    assert out["mAP@2"] == pytest.approx(50.0)  # 1 / min(2, 2)
    assert out["mAP@5"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_circo_rejects_a_repeated_id_and_names_it():
    with pytest.raises(ProtocolError, match=r"query '7'.*'a' is ranked twice"):
        circo_map_at_k({"7": ["a", "b", "a"]}, {"7": ["a"]}, ks=(3,))


def test_every_query_must_be_ranked():
    with pytest.raises(ProtocolError, match=r"sub\.json: query 'q2' is not ranked"):
        recall_at_k({"q1": ["t"]}, {"q1": ["t"], "q2": ["t"]}, ks=(1,), source="sub.json")


def test_a_short_ranking_without_a_hit_is_an_error():
    with pytest.raises(ProtocolError, match="R@50 needs 50"):
        recall_at_k({"q": ["x"] * 10}, {"q": ["t"]}, ks=(1, 50))


def test_fashioniq_means():
    out = fashioniq_metrics({"dress": {"R@10": 30.0, "R@50": 60.0}, "shirt": {"R@10": 20.0, "R@50": 40.0}})
    assert out["mean/R@10"] == 25.0 and out["mean/R@50"] == 50.0 and out["mean"] == 37.5
    assert out["dress/R@50"] == 60.0


# ------------------------------------------------------------------ brute force, property tests

IDS = [f"i{n}" for n in range(12)]


@st.composite
def ranked_queries(draw):
    """Queries with a permutation of the gallery as ranking, a reference, targets, an image set."""
    n = draw(st.integers(1, 6))
    rankings, targets, refs, members = {}, {}, {}, {}
    for q in range(n):
        perm = draw(st.permutations(IDS))
        ref = draw(st.sampled_from(IDS))
        tg = draw(st.sets(st.sampled_from([i for i in IDS if i != ref]), min_size=1, max_size=4))
        mem = draw(st.sets(st.sampled_from(IDS), min_size=3, max_size=6)) | {ref} | {sorted(tg)[0]}
        qid = str(q)
        rankings[qid], targets[qid], refs[qid], members[qid] = perm, tg, ref, mem
    return rankings, targets, refs, members


def _brute_recall(rankings, targets, k, refs=None):
    hits = 0
    for q, tg in targets.items():
        r = [g for g in rankings[q] if refs is None or g != refs[q]]
        hits += any(t in r[:k] for t in tg)
    return 100.0 * hits / len(targets)


def _brute_ap(ranked, gts, k):
    total = 0.0
    for r in range(1, k + 1):
        if ranked[r - 1] in gts:
            total += len(set(ranked[:r]) & gts) / r
    return total / min(k, len(gts))


@settings(max_examples=200, deadline=None)
@given(ranked_queries(), st.booleans())
def test_recall_matches_brute_force(data, remove_reference):
    rankings, targets, refs, _ = data
    ks = (1, 2, 5, 11)
    got = recall_at_k(rankings, targets, ks, references=refs if remove_reference else None)
    for k in ks:
        assert got[f"R@{k}"] == pytest.approx(_brute_recall(rankings, targets, k, refs if remove_reference else None))


@settings(max_examples=200, deadline=None)
@given(ranked_queries())
def test_recall_subset_matches_brute_force(data):
    rankings, targets, refs, members = data
    got = recall_subset_at_k(rankings, targets, members, refs, ks=(1, 2, 3))
    for k in (1, 2, 3):
        hits = 0
        for q, tg in targets.items():
            sub = [g for g in rankings[q] if g in members[q] and g != refs[q]]
            hits += any(t in sub[:k] for t in tg)
        assert got[f"Rsubset@{k}"] == pytest.approx(100.0 * hits / len(targets))


@settings(max_examples=200, deadline=None)
@given(ranked_queries())
def test_circo_map_matches_brute_force(data):
    rankings, targets, _, _ = data
    ks = (1, 5, 10, 12)
    got = circo_map_at_k(rankings, targets, ks)
    for k in ks:
        expected = sum(_brute_ap(rankings[q], set(t), k) for q, t in targets.items()) / len(targets)
        assert got[f"mAP@{k}"] == pytest.approx(100.0 * expected)
