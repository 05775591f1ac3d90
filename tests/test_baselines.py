import pytest

from csmcir.config import TextConfig
from csmcir.data.custom import CustomCIR
from csmcir.data.store import SplitStore
from csmcir.inference import Encoder
from csmcir.retrieval.baselines import evaluate_baselines


@pytest.fixture(scope="module")
def results(easy_bench, trained):
    enc = Encoder.from_checkpoint(trained / "last.ckpt", "cpu")
    store = SplitStore.build(CustomCIR(easy_bench), "val", TextConfig(max_text_len=enc.text.max_text_len))
    return store, evaluate_baselines(enc.model, store)


def test_every_baseline_reports_recall_at_k(results):
    _, res = results
    assert set(res) == {"model", "image_only", "text_only", "pixel_nn"}
    for name, m in res.items():
        r = [m[f"R@{k}"] for k in (1, 5, 10, 50)]
        assert all(0 <= x <= 100 for x in r) and r == sorted(r), name
    assert any(k.startswith("R@1/") for k in res["model"])  # per modification type


def test_pixel_nn_finds_the_near_duplicate_group(results):
    """Hard distractors and targets are one edit from the reference: raw pixels find that group
    (R@50 far above chance) but cannot tell which member is right (R@1 well below R@50)."""
    store, res = results
    chance_at_50 = 100 * 50 / len(store.gallery_rows)
    assert res["pixel_nn"]["R@50"] > 3 * chance_at_50
    assert res["pixel_nn"]["R@1"] < res["pixel_nn"]["R@50"] / 2
