"""CIR-LVLM's intent instruction (model.intent): prompt selection, gradients, state, the CLI."""

import json

import pytest
import torch

from csmcir.config import ModelConfig, get_model_config
from csmcir.factory import create_model
from csmcir.models.intent import select_prompts, usage_entropy
from csmcir.tokenizer import load_tokenizer

from .conftest import fit_args

POOL = {"pool_size": 4, "prompt_length": 2, "top_k": 2}


def _text(texts):
    enc = load_tokenizer()(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_selection_takes_the_nearest_keys_by_cosine():
    keys = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    feature = torch.tensor([[0.1, 5.0, 0.0], [3.0, 0.0, 0.2]])  # near key 1, then 3; near key 0, then 3
    sel = select_prompts(feature, keys, top_k=2)
    assert sel.index.tolist() == [[1, 3], [0, 3]]
    assert torch.allclose(sel.cosine[0, 0], torch.nn.functional.cosine_similarity(feature[:1], keys[1:2]))
    assert usage_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)
    assert usage_entropy(torch.tensor([20, 0, 0, 0])) == 0.0


def test_gradients_reach_the_chosen_prompts_and_keys_only():
    torch.manual_seed(0)
    model = create_model("tiny", overrides={"intent": POOL})
    ids, mask = _text(["remove the square", "make it red"])
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    emb, sel = model.encode(ids, mask, pixels=pixels, side="query", return_selection=True)
    (emb.sum() + sel.pull_loss()).backward()
    chosen = set(sel.index.flatten().tolist())
    for i in range(POOL["pool_size"]):
        assert (model.intent.prompts.grad[i].abs().sum() > 0) == (i in chosen), i
        assert (model.intent.keys.grad[i].abs().sum() > 0) == (i in chosen), i
    assert model.intent.task_offset["query"].grad.abs().sum() > 0
    assert model.intent.task_offset["target"].grad is None  # the other side's prompt was not used


def test_the_side_decides_the_task_prompt_and_must_be_given():
    torch.manual_seed(0)
    model = create_model("tiny", overrides={"intent": {"task_prompt": True}}).eval()
    ids, mask = _text(["a small red circle"])
    pixels = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    q = model.encode(ids, mask, pixels=pixels, side="query")
    t = model.encode(ids, mask, pixels=pixels, side="target")
    assert not torch.allclose(q, t)
    with pytest.raises(ValueError, match="side='query' or side='target'"):
        model.encode(ids, mask, pixels=pixels)
    with pytest.raises(ValueError, match="neither a task prompt nor a pool"):
        create_model("tiny", overrides={"intent": {"task_prompt": False}})


def test_state_round_trips_through_the_config_and_state_dict():
    torch.manual_seed(0)
    model = create_model("tiny", overrides={"intent": POOL}).eval()
    cfg = ModelConfig.from_dict(json.loads(json.dumps(model.cfg.to_dict())))  # as a checkpoint stores it
    again = create_model(cfg).eval()
    again.load_state_dict(model.state_dict())  # strict: the same tensors, prompts and keys included
    ids, mask = _text(["remove the square"])
    pixels = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    for side in ("query", "target"):
        torch.testing.assert_close(model.encode(ids, mask, pixels=pixels, side=side), again.encode(ids, mask, pixels=pixels, side=side))


def test_off_it_adds_no_parameter_and_no_token():
    plain = create_model("tiny")
    assert plain.intent is None
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in create_model(get_model_config("tiny")).parameters())
    lengths = []
    plain.qformer.register_forward_pre_hook(lambda m, args, kw: lengths.append(kw["query_embeds"].shape[1]), with_kwargs=True)
    ids, mask = _text(["remove the square"])
    plain.encode(ids, mask, pixels=torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert lengths == [plain.num_query_tokens + ids.shape[1]]


def test_a_cli_fit_with_intent_prompts_logs_pool_usage_and_serves(easy_bench, tmp_path):
    from csmcir.cli import main
    from csmcir.inference import Encoder

    out = tmp_path / "run"
    rc = main(
        fit_args(easy_bench, out, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--model.intent", json.dumps(POOL))
    )
    assert rc == 0
    metrics = (next(out.glob("lightning_logs/version_*/metrics.csv"))).read_text()
    assert "train/intent_pool_entropy" in metrics and "train/loss_intent_pull" in metrics
    enc = Encoder.from_checkpoint(out / "last.ckpt", "cpu")
    assert enc.model.intent is not None and enc.model.intent.cfg.pool_size == 4
    from PIL import Image

    img = Image.new("RGB", (32, 32), (200, 30, 30))
    q, t = enc.encode([img], ["remove the square"], side="query"), enc.encode([img], ["remove the square"], side="target")
    assert q.shape == (1, enc.dim) and not (q == t).all()


def test_the_report_shows_which_soft_prompts_a_query_chose(easy_bench, tmp_path):
    from csmcir.cli import main

    out = tmp_path / "run"
    assert (
        main(
            fit_args(easy_bench, out, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--model.intent", json.dumps(POOL))
        )
        == 0
    )
    rc = main(
        [
            "report",
            "--ckpt",
            str(out / "last.ckpt"),
            "--root",
            str(easy_bench),
            "--split",
            "test",
            "-k",
            "3",
            "--limit",
            "5",
            "--out",
            str(tmp_path / "rep"),
        ]
    )
    assert rc == 0
    assert "soft prompts chosen" in (tmp_path / "rep" / "report.js").read_text()
    data = json.loads((tmp_path / "rep" / "data.js").read_text().removeprefix("window.REPORT = ").rstrip(";\n"))
    chosen = [q["prompts"] for q in data["queries"]]
    assert len(chosen) == 5 and all(len(c) == POOL["top_k"] and set(c) <= set(range(POOL["pool_size"])) for c in chosen)
