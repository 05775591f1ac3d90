"""What one training step sees: hard negatives, reference negatives, and their embeddings."""

from __future__ import annotations

import pytest
import torch

from csmcir.data.datamodule import CIRDataModule
from csmcir.lightning.module import CIRModule
from csmcir.models import NetworkSpec


def _batch(root, **kw):
    dm = CIRDataModule(root=str(root), synthetic=False, batch_size=8, **kw)
    dm.setup("fit")
    torch.manual_seed(0)
    return dm, next(iter(dm.train_dataloader()))


def test_batch_carries_hard_and_reference_negatives(easy_bench):
    dm, b = _batch(easy_bench, hard_negatives=1, reference_negative=True)
    store = dm.stores["train"]
    ds = dm.train_dataloader().dataset
    width = b.caption_ids.shape[1]
    # every target-side text is cut to one width, with masks matching the stored lengths
    assert b.neg_caption_ids.shape[-1] == width and b.ref_caption_ids.shape[-1] == width
    for i, row in enumerate(b.ref_row.tolist()):
        assert torch.equal(b.ref[i], store.images[row])
        n = int(store.caption_lengths[row])
        assert int(b.ref_caption_mask[i].sum()) == n
        assert torch.equal(b.ref_caption_ids[i, :n], store.caption_ids[row, :n].long())
    # the reference negative is never one of the query's targets
    for i in range(len(b.ref_row)):
        assert int(b.ref_row[i]) not in b.all_targets[i].tolist()
    assert b.neg.shape[:2] == (8, 1)
    assert len(ds) == store.num_queries


def test_no_reference_negative_when_off(easy_bench):
    _, b = _batch(easy_bench, hard_negatives=0, reference_negative=False)
    assert b.ref_caption_ids is None and b.neg is None
    assert b.caption_mask.shape == b.caption_ids.shape


@pytest.mark.parametrize("hard_negatives", [0, 2])
def test_training_step_scores_reference_as_negative_with_reused_features(easy_bench, hard_negatives):
    """The candidates are targets, hard negatives, then references (image + caption); reusing the
    query side's image features for the references gives the same embeddings as encoding them."""
    _, b = _batch(easy_bench, hard_negatives=hard_negatives, reference_negative=True)
    m = CIRModule(net=NetworkSpec(model="tiny"), gather_negatives=False).eval()
    seen = {}

    class Recorder(torch.nn.Module):
        temperature = 0.01

        def forward(self, q, cand, mask, query_offset=0):
            seen.update(q=q, cand=cand, mask=mask)
            return cand.sum()

    m.loss = Recorder()
    m.log = lambda *a, **k: None
    with torch.no_grad():
        m.training_step(b, 0)
        bs = b.ref.shape[0]
        assert seen["cand"].shape[0] == bs * (2 + hard_negatives)
        refs = seen["cand"][bs * (1 + hard_negatives) :]
        direct = m.model.encode(b.ref_caption_ids, b.ref_caption_mask, pixels=b.ref)
        assert torch.allclose(refs, direct, atol=1e-5)
        targets = m.model.encode(b.caption_ids, b.caption_mask, pixels=b.target)
        assert torch.allclose(seen["cand"][:bs], targets, atol=1e-5)
        # a query's own reference is never masked out as a correct target: it stays a negative
        own = seen["mask"][:, bs * (1 + hard_negatives) :].diagonal()
        assert not own.any()


def test_training_draws_each_listed_phrasing_and_evaluation_keeps_the_text(bench_copy):
    import json

    from csmcir.data.datasets import EvalQueries, TrainTriplets
    from csmcir.tokenizer import load_tokenizer

    path = bench_copy / "triplets.train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    forms = ["make it blue and bigger", "bigger and make it blue", "make it blue", "bigger"]
    rows[0]["meta"]["train_texts"] = forms
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = CIRDataModule(root=str(bench_copy), synthetic=False, batch_size=8)
    dm.setup("fit")
    store = dm.stores["train"]
    tok = load_tokenizer("minilm")
    ds = TrainTriplets(store)
    torch.manual_seed(0)
    seen = set()
    for _ in range(60):
        item = ds[0]
        seen.add(tok.decode(item["query_ids"][: int(item["query_len"])], skip_special_tokens=True))
    assert seen == set(forms)
    # a query without phrasings keeps its own text in training; evaluation always uses the text
    other = ds[1]
    assert tok.decode(other["query_ids"][: int(other["query_len"])], skip_special_tokens=True) == rows[1]["text"]
    ev = EvalQueries(store)[0]
    assert tok.decode(ev["text_ids"][: int(ev["text_len"])], skip_special_tokens=True) == rows[0]["text"]
