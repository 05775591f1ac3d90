"""Tests for csmcir.retrieval.metrics: rankings and Recall@K against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csmcir.retrieval.metrics import recall_at_k, recall_by_group, topk_rankings


def _normalised(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def _reference_order(scores: np.ndarray, exclude: list[int | None] | None) -> list[np.ndarray]:
    """Full ranking of every query: a stable argsort of the negated scores of the whole matrix."""
    orders = []
    for i, row in enumerate(scores):
        order = np.argsort(-row, kind="stable")
        if exclude is not None and exclude[i] is not None:
            order = order[order != exclude[i]]
        orders.append(order)
    return orders


# ---- Recall@K ------------------------------------------------------------------------------


def test_recall_hand_computed():
    rankings = [
        ["a", "b", "c", "d"],  # target a at rank 1
        ["c", "a", "b", "d"],  # target b at rank 3
        ["b", "d", "a", "c"],  # targets c and d: d at rank 2, c at rank 4
        ["a", "b", "c", "d"],  # target z is never retrieved
    ]
    targets = [{"a"}, ["b"], ("c", "d"), {"z"}]
    got = recall_at_k(rankings, targets, ks=(1, 2, 3, 4))
    assert got == {"R@1": 25.0, "R@2": 50.0, "R@3": 75.0, "R@4": 75.0}
    assert list(got) == ["R@1", "R@2", "R@3", "R@4"]


def test_recall_counts_a_query_with_several_targets_once():
    # Both targets in the top 2 still count as one hit of one query, not two.
    got = recall_at_k([["x", "y", "z"], ["z", "y", "x"]], [{"x", "y"}, {"x"}], ks=(2,))
    assert got == {"R@2": 50.0}


def test_recall_bare_string_target_is_one_id():
    # A bare string must not be taken as a collection of characters ("a", "b").
    assert recall_at_k([["a", "ab"]], ["ab"], ks=(1, 2)) == {"R@1": 0.0, "R@2": 100.0}


def test_recall_matches_brute_force_reference():
    rng = np.random.default_rng(0)
    n_q, n_g, d = 60, 400, 16
    queries, gallery = _normalised(n_q, d, 1), _normalised(n_g, d, 2)
    ids = [f"img{j:04d}" for j in range(n_g)]
    exclude = [int(e) if rng.random() < 0.7 else None for e in rng.integers(0, n_g, n_q)]
    # Several correct targets per query, never the excluded reference.
    target_idx = []
    for i in range(n_q):
        pool = [j for j in range(n_g) if j != exclude[i]]
        target_idx.append(rng.choice(pool, size=int(rng.integers(1, 4)), replace=False).tolist())
    # Make some queries easy: move a target right next to its query so that hits occur at
    # every cut-off.
    gallery = gallery.clone()
    for i in range(0, n_q, 3):
        t = target_idx[i][0]
        gallery[t] = queries[i] + 0.3 * gallery[t] * (i % 4) / 3
        gallery[t] /= gallery[t].norm()

    ks = (1, 5, 10, 50)
    # Reference: rank of each target from the full score matrix, counting the items that beat it
    # (higher score, or equal score and lower index), the excluded one left out.
    scores = (queries @ gallery.T).numpy()
    expected = {}
    for k in ks:
        hits = 0
        for i in range(n_q):
            best = n_g
            for t in target_idx[i]:
                beats = (scores[i] > scores[i, t]) | ((scores[i] == scores[i, t]) & (np.arange(n_g) < t))
                if exclude[i] is not None:
                    beats[exclude[i]] = False
                best = min(best, int(beats.sum()))
            hits += best < k
        expected[f"R@{k}"] = 100.0 * hits / n_q
    assert 0 < expected["R@1"] < expected["R@50"] < 100  # the data exercises hits and misses

    idx, _ = topk_rankings(queries, gallery, k=50, exclude=exclude, chunk=7)
    rankings = [[ids[j] for j in row] for row in idx.tolist()]
    targets = [{ids[t] for t in ts} for ts in target_idx]
    got = recall_at_k(rankings, targets, ks=ks)
    assert got == pytest.approx(expected, abs=1e-9)

    full = [[ids[j] for j in order] for order in _reference_order(scores, exclude)]
    assert recall_at_k(full, targets, ks=ks) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("several_targets", [False, True])
def test_recall_matches_torchmetrics(several_targets):
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalRecall

    n_q, n_g = 8, 30
    gen = torch.Generator().manual_seed(5)
    scores = torch.rand(n_q, n_g, generator=gen)  # continuous: no ties
    relevant = torch.zeros(n_q, n_g, dtype=torch.bool)
    for i in range(n_q):
        n_t = 1 + (i % 3 if several_targets else 0)
        relevant[i, torch.randperm(n_g, generator=gen)[:n_t]] = True
    # A couple of guaranteed top-1 hits so that R@1 is not trivially 0.
    relevant[0, scores[0].argmax()] = True
    relevant[1, scores[1].argmax()] = True
    if not several_targets:
        relevant[0] = relevant[0] & (torch.arange(n_g) == scores[0].argmax())
        relevant[1] = relevant[1] & (torch.arange(n_g) == scores[1].argmax())
        assert (relevant.sum(1) == 1).all()

    rankings = [[f"g{j}" for j in torch.argsort(row, descending=True).tolist()] for row in scores]
    targets = [{f"g{j}" for j in row.nonzero().flatten().tolist()} for row in relevant]
    indexes = torch.arange(n_q).unsqueeze(1).expand(n_q, n_g).flatten()
    for k in (1, 3, 10):
        # With one target per query IR recall and hit rate coincide with the CIR definition; with
        # several, only the hit rate does.
        metric_cls = RetrievalHitRate if several_targets else RetrievalRecall
        metric = metric_cls(top_k=k)
        expected = 100.0 * float(metric(scores.flatten(), relevant.flatten(), indexes=indexes))
        assert recall_at_k(rankings, targets, ks=(k,))[f"R@{k}"] == pytest.approx(expected)


def test_recall_errors():
    with pytest.raises(ValueError, match="rankings for"):
        recall_at_k([["a"]], [{"a"}, {"b"}], ks=(1,))
    with pytest.raises(ValueError, match="no queries"):
        recall_at_k([], [], ks=(1,))
    with pytest.raises(ValueError, match="needs 5"):
        recall_at_k([["a", "b", "c"]], [{"a"}], ks=(1, 5))
    with pytest.raises(ValueError, match="no target"):
        recall_at_k([["a"]], [set()], ks=(1,))
    with pytest.raises(ValueError, match=">= 1"):
        recall_at_k([["a"]], [{"a"}], ks=(0,))
    with pytest.raises(ValueError, match="empty"):
        recall_at_k([["a"]], [{"a"}], ks=())


def test_recall_short_gallery_with_num_candidates():
    # A 3-item gallery ranks at most 3 ids; R@5 is then computed on the whole ranking.
    rankings = [["a", "b", "c"], ["b", "c", "a"]]
    targets = [{"c"}, {"z"}]
    got = recall_at_k(rankings, targets, ks=(1, 5), num_candidates=3)
    assert got == {"R@1": 0.0, "R@5": 50.0}
    # The ranking must still cover all candidates.
    with pytest.raises(ValueError, match="needs 3"):
        recall_at_k([["a", "b"], ["b", "c", "a"]], targets, ks=(1, 5), num_candidates=3)


def test_recall_by_group_hand_computed():
    rankings = [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"], ["a", "b"]]
    targets = [{"a"}, {"a"}, {"b"}, {"b"}, {"a"}]
    groups = ["shirt", "dress", "shirt", "dress", "toptee"]
    # shirt: hit, miss -> 50; dress: miss, hit -> 50; toptee: hit -> 100
    got = recall_by_group(rankings, targets, groups, k=1)
    assert got == {"dress": 50.0, "shirt": 50.0, "toptee": 100.0}
    assert list(got) == ["dress", "shirt", "toptee"]  # sorted by name
    assert recall_by_group(rankings, targets, groups, k=2) == {"dress": 100.0, "shirt": 100.0, "toptee": 100.0}
    with pytest.raises(ValueError, match="group labels"):
        recall_by_group(rankings, targets, groups[:-1])


def test_recall_by_group_matches_per_group_recall():
    rng = np.random.default_rng(3)
    ids = [f"g{j}" for j in range(20)]
    rankings = [list(rng.permutation(ids)[:10]) for _ in range(50)]
    targets = [{ids[int(rng.integers(0, 20))]} for _ in range(50)]
    groups = [str(rng.choice(["cardinality", "addition", "negation"])) for _ in range(50)]
    got = recall_by_group(rankings, targets, groups, k=5)
    for g in set(groups):
        sel = [i for i in range(50) if groups[i] == g]
        manual = 100.0 * sum(any(t in rankings[i][:5] for t in targets[i]) for i in sel) / len(sel)
        assert got[g] == pytest.approx(manual)


# ---- topk_rankings -------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 64, 1024])
def test_topk_rankings_equals_full_argsort(chunk):
    n_q, n_g = 37, 150
    queries, gallery = _normalised(n_q, 24, 11), _normalised(n_g, 24, 12)
    exclude = [None if i % 4 == 0 else (i * 7) % n_g for i in range(n_q)]
    idx, sc = topk_rankings(queries, gallery, k=20, exclude=exclude, chunk=chunk)
    assert idx.shape == (n_q, 20) and idx.dtype == torch.long and sc.shape == (n_q, 20)
    scores = (queries @ gallery.T).numpy()
    for i, order in enumerate(_reference_order(scores, exclude)):
        assert idx[i].tolist() == order[:20].tolist()
        np.testing.assert_allclose(sc[i].numpy(), scores[i, order[:20]], atol=1e-6)
        if exclude[i] is not None:
            assert exclude[i] not in idx[i].tolist()


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_topk_rankings_breaks_ties_by_lower_index(chunk):
    # Small-integer embeddings give exactly representable scores with many ties.
    gen = torch.Generator().manual_seed(4)
    queries = torch.randint(-1, 2, (23, 4), generator=gen).float()
    gallery = torch.randint(-1, 2, (60, 4), generator=gen).float()
    exclude = [i % 60 if i % 2 else None for i in range(23)]
    idx, sc = topk_rankings(queries, gallery, k=25, exclude=exclude, chunk=chunk)
    scores = (queries @ gallery.T).numpy()
    for i, order in enumerate(_reference_order(scores, exclude)):
        assert idx[i].tolist() == order[:25].tolist()
        assert sc[i].tolist() == scores[i, order[:25]].tolist()


def test_topk_rankings_tie_example():
    gallery = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    idx, sc = topk_rankings(queries, gallery, k=3, exclude=[1, None])
    assert idx.tolist() == [[3, 4, 0], [0, 2, 4]]
    assert sc.flatten().tolist() == pytest.approx([1.0, 0.6, 0.0, 1.0, 1.0, 0.8])


def test_topk_rankings_clips_k():
    queries, gallery = _normalised(5, 8, 21), _normalised(6, 8, 22)
    idx, _ = topk_rankings(queries, gallery, k=100)
    assert idx.shape == (5, 6)
    assert all(sorted(row) == list(range(6)) for row in idx.tolist())
    idx, _ = topk_rankings(queries, gallery, k=100, exclude=[0, None, 2, None, 5])
    assert idx.shape == (5, 5)
    assert 0 not in idx[0].tolist() and 5 not in idx[4].tolist()


def test_topk_rankings_errors():
    q, g = _normalised(3, 8, 1), _normalised(4, 8, 2)
    with pytest.raises(ValueError, match="dimension"):
        topk_rankings(q, _normalised(4, 9, 2), k=1)
    with pytest.raises(ValueError, match="exclude"):
        topk_rankings(q, g, k=1, exclude=[0, 1])
    with pytest.raises(ValueError, match="not a gallery index"):
        topk_rankings(q, g, k=1, exclude=[0, 1, 4])
    with pytest.raises(ValueError, match="NaN"):
        topk_rankings(torch.full((3, 8), float("nan")), g, k=1)
    with pytest.raises(ValueError, match="empty"):
        topk_rankings(q, g[:0], k=1)
    with pytest.raises(ValueError, match="k must be"):
        topk_rankings(q, g, k=0)
