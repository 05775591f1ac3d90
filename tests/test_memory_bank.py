"""The memory bank: ring order, eviction, age decay, entropy selection, masking, checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

from csmcir.losses import MemoryBank, info_nce
from csmcir.losses.memory_bank import effective_rank
from csmcir.models import NetworkSpec

TINY = NetworkSpec(model="tiny")


def _bank(**kw):
    kw = {"capacity": 4, "max_age": 10, "half_life": 5.0, "min_fraction": 0.25, **kw}
    return MemoryBank(2, **kw)


def test_enqueue_overwrites_the_oldest_first():
    b = _bank()
    b.enqueue(torch.eye(2)[[0, 1, 0]], torch.tensor([1, 2, 3]), step=0)
    b.enqueue(torch.eye(2)[[1, 1]], torch.tensor([4, 5]), step=1)
    # slots 0..3 were filled 1,2,3 then 4 (slot 3) and 5 (slot 0, the oldest)
    assert b.ids.tolist() == [5, 2, 3, 4] and b.steps.tolist() == [1, 0, 0, 1] and len(b) == 4
    b.enqueue(torch.eye(2)[[0] * 6], torch.arange(10, 16), step=2)  # more than capacity: the last 4
    assert sorted(b.ids.tolist()) == [12, 13, 14, 15]


def test_entries_past_max_age_are_evicted_and_weights_decay():
    b = _bank()
    b.enqueue(torch.eye(2)[[0, 1]], torch.tensor([1, 2]), step=0)
    b.enqueue(torch.eye(2)[[0]], torch.tensor([3]), step=8)
    lw = b.log_age_weights(step=10)
    assert lw[0].item() == pytest.approx(-10 / 5 * math.log(2))  # age 10: weight 1/4
    assert lw[2].item() == pytest.approx(-2 / 5 * math.log(2))
    assert b.evict(step=10) == 0 and b.evict(step=11) == 2
    assert b.ids.tolist()[:3] == [-1, -1, 3]


def test_false_negatives_and_empty_slots_are_excluded():
    b = _bank(min_fraction=1.0)
    b.enqueue(F.normalize(torch.randn(3, 2), dim=1), torch.tensor([7, 8, 9]), step=0)
    bias = b.bias(F.normalize(torch.randn(2, 2), dim=1), 10.0, torch.tensor([[8, -1], [5, 6]]), step=0)
    assert torch.isinf(bias[0, 1]) and torch.isfinite(bias[0, [0, 2]]).all()  # query 0 accepts id 8
    assert torch.isfinite(bias[1, :3]).all()
    assert torch.isinf(bias[:, 3]).all()  # the empty slot


def test_entropy_decides_how_many_hardest_entries_a_query_keeps():
    b = MemoryBank(4, capacity=8, max_age=100, half_life=1e9, min_fraction=0.25)
    b.enqueue(torch.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]] * 1.0, torch.arange(8), step=0)
    confident = torch.tensor([[1.0, 0, 0, 0]])
    no_targets = torch.full((1, 1), -1)
    # a batch whose positive dominates: entropy ~0, so the 25 % hardest = the 2 entries equal to the query
    batch = torch.tensor([[50.0, -50.0]])
    bias = b.bias(confident, 20.0, no_targets, step=0, batch_logits=batch)
    kept = torch.isfinite(bias[0]).nonzero().flatten().tolist()
    assert kept == [0, 4]
    # a query equally similar to every entry and candidate: entropy 1, it keeps the whole bank
    flat = torch.zeros(1, 4)
    bias = b.bias(flat, 20.0, no_targets, step=0, batch_logits=torch.zeros(1, 2))
    assert torch.isfinite(bias[0]).all()


def test_a_large_bank_selects_from_a_sample_the_same_share_of_hardest_entries():
    # 4096 entries: the k-th largest logit comes from 512 evenly spaced slots; each query keeps
    # about the share the exact sort keeps, and still exactly its hardest entries
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(4096, 16, generator=g), dim=1)
    q = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    batch = torch.randn(32, 8, generator=g) * torch.linspace(0.1, 30, 32)[:, None]  # entropy from high to low
    no_targets = torch.full((32, 1), -1)
    kept = {}
    for sample in (None, 512):
        b = MemoryBank(16, capacity=4096, max_age=None, half_life=None, min_fraction=0.25, select_sample=sample)
        b.enqueue(emb, torch.arange(4096), step=0)
        bias = b.bias(q, 10.0, no_targets, step=0, batch_logits=batch)
        keep = torch.isfinite(bias)
        logits = 10.0 * q @ emb.t()
        for i in range(32):  # every kept entry is at least as similar as every dropped one
            assert logits[i][keep[i]].min() >= logits[i][~keep[i]].max()
        kept[sample] = keep.sum(1).float()
    assert kept[None].min() < 2000 < kept[None].max()  # the queries do keep different shares
    assert (kept[512] - kept[None]).abs().max() <= 0.06 * 4096
    assert (kept[512] - kept[None]).abs().mean() <= 0.03 * 4096


def test_plain_fifo_keeps_every_entry_unweighted_until_overwritten():
    b = MemoryBank(2, capacity=3, max_age=None, half_life=None, min_fraction=1.0)
    b.enqueue(torch.eye(2)[[0, 1, 0]], torch.tensor([1, 2, 3]), step=0)
    assert b.evict(step=10_000) == 0 and len(b) == 3
    bias = b.bias(torch.tensor([[1.0, 0.0]]), 20.0, torch.tensor([[2]]), step=10_000, batch_logits=torch.tensor([[50.0]]))
    # no age weight, no entropy selection; only the query's own target id (2) is masked
    assert bias[0, [0, 2]].tolist() == [0.0, 0.0] and torch.isinf(bias[0, 1])
    b.enqueue(torch.eye(2)[[1]], torch.tensor([4]), step=10_001)
    assert b.ids.tolist() == [4, 2, 3]  # first in, first out


def test_bank_negatives_enter_only_the_query_to_target_denominator():
    torch.manual_seed(0)
    q, t = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    extra = F.normalize(torch.randn(5, 4), dim=1)
    bias = torch.zeros(3, 5)
    bias[0, 2] = float("-inf")
    bias[1, 0] = math.log(0.5)
    scale = torch.tensor(math.log(4.0))
    s = 4.0 * q @ t.T
    e = 4.0 * q @ extra.T + bias
    full = torch.cat([s, e], 1)
    expected = -(s.diag() - full.logsumexp(1)).mean()
    torch.testing.assert_close(info_nce(q, t, scale, extra=extra, extra_bias=bias), expected)


def test_bank_round_trips_through_a_state_dict():
    from csmcir.lightning.module import CIRModule

    m = CIRModule(net=TINY, memory_bank={"capacity": 16, "max_age": 50})
    m.bank.enqueue(F.normalize(torch.randn(5, m.model_config.embed_dim), dim=1), torch.arange(5), step=3)
    m2 = CIRModule(net=TINY, memory_bank={"capacity": 16, "max_age": 50})
    m2.load_state_dict(m.state_dict())
    for name in ("emb", "ids", "steps", "ptr"):
        assert torch.equal(getattr(m.bank, name), getattr(m2.bank, name))
    assert CIRModule(net=TINY).bank is None  # off by default


def _fit_with_bank(bench, out, bank: str, log_every: int = 1) -> list[dict]:
    """A 6-step CLI fit with ``--model.memory_bank bank``, logging every ``log_every`` steps; its metrics rows."""
    import csv

    from csmcir.cli import main

    from .conftest import fit_args

    args = fit_args(
        bench,
        out,
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "6",
        "--trainer.log_every_n_steps",
        str(log_every),
        "--trainer.limit_val_batches",
        "1",
        "--model.memory_bank",
        bank,
    )
    assert main(args) == 0
    return list(csv.DictReader(open(next(out.glob("lightning_logs/version_*/metrics.csv")))))


def test_fit_with_the_bank_through_the_cli(easy_bench, tmp_path):
    rows = _fit_with_bank(easy_bench, tmp_path, '{"capacity": 64, "max_age": 4, "half_life": 2.0, "drift_every": 2}')
    kept = [float(r["train/bank_kept"]) for r in rows if r.get("train/bank_kept")]
    losses = [float(r["train/loss_nce"]) for r in rows if r.get("train/loss_nce")]
    assert kept[0] == 0 and max(kept) > 0 and all(math.isfinite(x) for x in losses)
    # staleness is measured: entries re-encoded by a model that has since trained have drifted
    drift = [float(r["train/bank_drift"]) for r in rows if r.get("train/bank_drift")]
    assert drift and all(-1e-6 <= d <= 2 for d in drift) and max(drift) > 1e-3
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert int((ckpt["state_dict"]["bank.ids"] >= 0).sum()) > 0


def test_drift_is_zero_for_unchanged_embeddings_and_grows_with_change():
    b = MemoryBank(3, capacity=4)
    e = F.normalize(torch.randn(3, 3), dim=1)
    b.enqueue(e, torch.arange(3), step=0)
    slots = torch.arange(3)
    assert b.drift(slots, e) == pytest.approx(0.0, abs=1e-6)
    assert b.drift(slots, -e) == pytest.approx(2.0, abs=1e-6)


def test_bank_nce_puts_the_momentum_key_first_against_the_bank():
    from csmcir.losses import bank_nce

    torch.manual_seed(1)
    q, k = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    bank = F.normalize(torch.randn(5, 4), dim=1)
    bias = torch.zeros(3, 5)
    bias[1, 2] = float("-inf")
    ls = torch.tensor(math.log(10.0))
    logits = torch.cat([10 * (q * k).sum(1, keepdim=True), 10 * q @ bank.T + bias], 1)
    torch.testing.assert_close(bank_nce(q, k, bank, bias, ls), -torch.log_softmax(logits, 1)[:, 0].mean())


def test_momentum_bank_keeps_an_ema_copy_that_follows_the_model_and_checkpoints(tmp_path):
    from csmcir.lightning.module import CIRModule

    m = CIRModule(net=TINY, memory_bank={"capacity": 16, "momentum": 0.9})
    assert m.ema_model is not None and not any(p.requires_grad for p in m.ema_model.parameters())
    assert all(not n.startswith("ema_model") for n, p in m.named_parameters() if p.requires_grad)
    p0 = next(m.model.parameters())
    e0 = next(m.ema_model.parameters())
    before = e0.detach().clone()
    with torch.no_grad():
        p0.add_(1.0)
    m.update_ema()
    torch.testing.assert_close(e0, before + 0.1)  # ema <- 0.9 ema + 0.1 model
    sd = m.state_dict()
    assert any(k.startswith("ema_model.") for k in sd)
    m2 = CIRModule(net=TINY, memory_bank={"capacity": 16, "momentum": 0.9})
    m2.load_state_dict(sd)
    torch.testing.assert_close(next(m2.ema_model.parameters()), e0)
    # the update keeps following the module's tensors after a checkpoint is loaded into it
    m2.update_ema()
    p2, e2 = next(m2.model.parameters()), next(m2.ema_model.parameters())
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        p2.add_(1.0)
    m2.update_ema()
    torch.testing.assert_close(e2, 0.9 * e0 + 0.1 * (p0 + 1.0))


def test_qformer_momentum_keys_reuse_the_steps_vision_features(easy_bench, tmp_path, monkeypatch):
    """momentum_keys: qformer (a frozen tower): keys come from the EMA Q-Former on the features the
    step already computed, so the EMA copy's vision tower is never run nor updated."""
    import csv

    from csmcir.cli import main
    from csmcir.lightning.module import CIRModule

    from .conftest import fit_args

    m = CIRModule(
        net=NetworkSpec(model="tiny", freeze_vision=True), memory_bank={"capacity": 16, "momentum": 0.9, "momentum_keys": "qformer"}
    )
    assert not list(m.ema_model.vision.parameters())  # the copy holds no vision tower to keep up to date
    ema_vision = [p.detach().clone() for p in m.ema_model.vision.parameters()]
    q_before = m.ema_model.proj.weight.detach().clone()
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(1.0)
    m.update_ema()
    assert all(torch.equal(a, b) for a, b in zip(ema_vision, m.ema_model.vision.parameters()))
    torch.testing.assert_close(m.ema_model.proj.weight, q_before + 0.1)

    original = CIRModule.on_fit_start

    def no_ema_vision(self):
        original(self)

        def fail(*a, **k):
            raise AssertionError("the EMA vision tower ran")

        self.ema_model.vision.forward = fail

    monkeypatch.setattr(CIRModule, "on_fit_start", no_ema_vision)
    args = fit_args(
        easy_bench,
        tmp_path,
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "4",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--model.net.freeze_vision",
        "true",
        "--model.memory_bank",
        '{"capacity": 64, "momentum": 0.9, "momentum_keys": "qformer", "drift_every": 2}',
    )
    assert main(args) == 0
    rows = list(csv.DictReader(open(next(tmp_path.glob("lightning_logs/version_*/metrics.csv")))))
    bank = [float(r["train/loss_bank"]) for r in rows if r.get("train/loss_bank")]
    assert len(bank) == 4 and all(math.isfinite(x) for x in bank)
    assert [r for r in rows if r.get("train/bank_drift")]  # the drift probe ran too, on the trained tower
    with pytest.raises(ValueError, match="momentum_keys"):
        MemoryBank(4, momentum=0.9, momentum_keys="vision")


def test_qformer_momentum_keys_need_a_frozen_tower(easy_bench, tmp_path, capsys):
    """With a trained tower, Q-Former keys carry the tower's drift (the synthetic fit learnt nothing):
    the module refuses the combination and names the fix; the CLI says so in one line, exit 2."""
    from csmcir.cli import main
    from csmcir.lightning.module import CIRModule

    from .conftest import fit_args

    with pytest.raises(ValueError, match="frozen vision tower.*momentum_keys: tower"):
        CIRModule(net=TINY, memory_bank={"capacity": 16, "momentum": 0.9, "momentum_keys": "qformer"})
    CIRModule(net=TINY, memory_bank={"capacity": 16, "momentum": 0.9, "momentum_keys": "tower"})
    CIRModule(net=TINY, memory_bank={"capacity": 16, "momentum": 0.9})  # auto: tower keys here
    capsys.readouterr()
    args = fit_args(easy_bench, tmp_path, "--model.memory_bank", '{"capacity": 16, "momentum": 0.9, "momentum_keys": "qformer"}')
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: invalid configuration: model.memory_bank.momentum_keys: qformer needs a frozen")
    assert "Traceback" not in "\n".join(err)
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_auto_momentum_keys_follow_the_tower():
    """momentum_keys auto (the default): EMA Q-Former keys over a frozen tower (no EMA vision copy
    to run), whole-tower keys when the tower trains, so one bank setting serves both regimes."""
    from csmcir.lightning.module import CIRModule

    bank = {"capacity": 16, "momentum": 0.9}
    frozen = CIRModule(net=NetworkSpec(model="tiny", freeze_vision=True), memory_bank=bank)
    assert frozen.bank.momentum_keys == "qformer" and not list(frozen.ema_model.vision.parameters())
    trained = CIRModule(net=TINY, memory_bank=bank)
    assert trained.bank.momentum_keys == "tower"
    assert [n for n, _ in trained.ema_model.vision.named_parameters()] == [n for n, _ in trained.model.vision.named_parameters()]


def test_the_drift_gated_preset_is_the_measured_arm():
    """MemoryBankConfig.drift_gated() is the bank the docs measure (tools/ablation.py's pt_gated_bank_bf16_k64,
    whose explicit qformer keys and bfloat16 are what auto picks over its frozen tower on an AVX-512 BF16
    CPU); changes apply on top."""
    import runpy
    from dataclasses import asdict
    from pathlib import Path

    from csmcir.losses import MemoryBankConfig

    measured = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "ablation.py"))["_GATED_BF16_K64"]
    auto = {**measured, "momentum_keys": "auto", "key_dtype": "auto"}
    assert asdict(MemoryBankConfig.drift_gated()) == asdict(MemoryBankConfig(**auto))
    tweaked = MemoryBankConfig.drift_gated(key_dtype="bfloat16", capacity=1024)
    assert (tweaked.key_dtype, tweaked.capacity, tweaked.gate) == ("bfloat16", 1024, True)


def test_qformer_keys_equal_tower_keys_on_a_frozen_tower(easy_bench, tmp_path):
    """On a frozen tower the EMA vision copy equals the trained one, so Q-Former keys must give the
    same training as whole-tower keys: the same bank loss, step for step."""
    import csv

    from csmcir.cli import main

    from .conftest import fit_args

    curves = {}
    for keys in ("tower", "qformer"):
        out = tmp_path / keys
        args = fit_args(
            easy_bench,
            out,
            "--trainer.max_steps",
            "6",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--seed_everything",
            "3",
            "--model.net.freeze_vision",
            "true",
            "--model.memory_bank",
            '{"capacity": 64, "momentum": 0.9, "momentum_keys": "%s", "drift_every": 0}' % keys,
        )
        assert main(args) == 0
        rows = list(csv.DictReader(open(next(out.glob("lightning_logs/version_*/metrics.csv")))))
        curves[keys] = [float(r["train/loss_bank"]) for r in rows if r.get("train/loss_bank")]
    assert len(curves["tower"]) == 6
    torch.testing.assert_close(torch.tensor(curves["qformer"]), torch.tensor(curves["tower"]), rtol=1e-4, atol=1e-5)


# -- the drift-gated bank (issue 22) -------------------------------------------------------------
def _gated(**kw):
    kw = {"capacity": 4, "max_age": None, "half_life": None, "min_fraction": 1.0, "momentum": 0.99, "gate": True, **kw}
    return MemoryBank(2, **kw)


def test_the_gate_weights_entries_by_the_drift_measured_since_they_were_written():
    b = _gated(drift_half=0.05, max_drift=0.2)
    b.enqueue(torch.eye(2)[[0, 1]], torch.tensor([1, 2]), step=0)
    # nothing measured yet: the bank is off and every entry excluded
    assert b.gate_weight(5) == 0.0 and torch.isinf(b.log_age_weights(5)).all()
    # hand-made drifts: entries 10 steps old drifted 0.01 -> 0.001 a step
    assert b.drift(torch.tensor([0, 1]), F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0]]), dim=1), step=10) > 0
    b.gate.observe_drift(torch.tensor([0.01, 0.01]), torch.tensor([10, 10]))
    assert float(b.gate.rate) == pytest.approx(0.001)
    b.gate.advance(10)  # the odometer runs from the last step it saw (0)
    b.gate.advance(50)  # 50 steps at 0.001: the entries written at D = 0 are 0.05 stale, half weight
    assert float(b.gate.staleness(b.written_at)[0]) == pytest.approx(0.05)
    assert b.log_age_weights(50)[:2].exp().tolist() == pytest.approx([0.5, 0.5])
    assert b.gate_weight(50) == pytest.approx((0.5 + 0.5) / 4)  # the consistent share of the capacity
    b.enqueue(torch.eye(2)[[0]], torch.tensor([3]), step=50)  # written now: full weight
    assert b.log_age_weights(50)[2].exp().item() == pytest.approx(1.0)
    # a faster-moving model: the same entries are stale sooner; past max_drift they are out
    b.gate.observe_drift(torch.tensor([0.2]), torch.tensor([20]))  # 0.01 a step
    b.gate.advance(69)  # +0.19: the first two entries are 0.24 stale, the third 0.19
    lw = b.log_age_weights(69)
    assert torch.isinf(lw[:2]).all() and lw[2].exp().item() == pytest.approx(2 ** (-0.19 / 0.05))
    bias = b.bias(torch.eye(2)[[0]], 10.0, torch.full((1, 1), -1), step=69)
    assert torch.isinf(bias[0, :2]).all() and torch.isfinite(bias[0, 2])


def test_entries_of_a_correct_target_are_positives_of_the_bank_term():
    from csmcir.losses import bank_nce

    torch.manual_seed(0)
    b = _gated(same_id_positive=True)
    b.gate.observe_drift(torch.tensor([0.0]), torch.tensor([1]))  # measured, no drift: full weights
    emb = F.normalize(torch.randn(3, 2), dim=1)
    b.enqueue(emb, torch.tensor([7, 8, 9]), step=0)
    q, k = F.normalize(torch.randn(2, 2), dim=1), F.normalize(torch.randn(2, 2), dim=1)
    targets = torch.tensor([[8, -1], [5, 6]])  # query 0's correct target 8 is in slot 1
    pos = b.positives(targets, step=1)
    assert pos.tolist() == [[False, True, False, False], [False, False, False, False]]
    bias = b.bias(q, 10.0, targets, step=1, key=k)
    assert torch.isfinite(bias[0, :3]).all() and torch.isinf(bias[:, 3]).all()  # kept, not dropped
    ls = torch.tensor(math.log(10.0))
    got = bank_nce(q, k, b.emb, bias, ls, positive=pos)
    logits = torch.cat([10 * (q * k).sum(1, keepdim=True), 10 * q @ b.emb.T + bias], 1)
    want0 = torch.logsumexp(logits[0], 0) - torch.logsumexp(logits[0, [0, 2]], 0)  # key + slot 1 on top
    want1 = torch.logsumexp(logits[1], 0) - logits[1, 0]
    torch.testing.assert_close(got, (want0 + want1) / 2)
    # without the option the same entry is dropped, as before
    plain = _gated(same_id_positive=False)
    plain.gate.observe_drift(torch.tensor([0.0]), torch.tensor([1]))
    plain.enqueue(emb, torch.tensor([7, 8, 9]), step=0)
    assert torch.isinf(plain.bias(q, 10.0, targets, step=1)[0, 1])


def test_an_unlisted_duplicate_of_the_target_is_no_negative():
    b = _gated(duplicate_cos=0.95)
    b.gate.observe_drift(torch.tensor([0.0]), torch.tensor([1]))
    b.enqueue(F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), dim=1), torch.tensor([1, 2, 3]), step=0)
    key = torch.tensor([[1.0, 0.0]])  # slots 0 and 1 (cos 0.995) look like the query's own target
    bias = b.bias(torch.tensor([[0.0, 1.0]]), 10.0, torch.full((1, 1), -1), step=1, key=key)
    assert torch.isinf(bias[0, :2]).all() and torch.isfinite(bias[0, 2])


def test_a_forced_collapse_empties_the_bank_and_backs_off():
    torch.manual_seed(0)
    b = MemoryBank(
        8, capacity=64, max_age=None, half_life=None, min_fraction=1.0, momentum=0.99, gate=True, rank_floor=0.5, backoff_steps=10
    )
    b.gate.observe_drift(torch.tensor([0.0]), torch.tensor([1]))
    healthy = F.normalize(torch.randn(32, 8), dim=1)
    b.enqueue(healthy, torch.arange(32), step=0)
    rank, backed = b.observe_rank(healthy, step=1)
    assert rank > 5 and not backed and b.gate_weight(1) == pytest.approx(0.5)
    collapsed = F.normalize(torch.ones(32, 8) + 1e-3 * torch.randn(32, 8), dim=1)  # every embedding on one line
    rank, backed = b.observe_rank(collapsed, step=2)
    assert rank < 1.5 and backed and len(b) == 0 and int(b.gate.backoffs) == 1
    b.enqueue(healthy, torch.arange(32), step=2)
    assert b.gate_weight(5) == 0.0 and b.gate_weight(11) == 0.0 and b.gate_weight(12) > 0  # off for 10 steps
    assert not b.observe_rank(collapsed, step=6)[1]  # no second back-off while backing off
    # the reference is measured afresh when the bank returns
    assert not b.observe_rank(collapsed, step=12)[1] and float(b.gate.rank_best) < 1.5


def test_a_rank_fall_before_the_bank_acts_is_no_back_off():
    """From random weights the targets' rank falls in the first steps whatever the bank does; while
    queries keep no entry (the duplicate guard drops them) that fall must not back the bank off,
    and the reference rank starts only once the bank acts."""
    torch.manual_seed(0)
    b = MemoryBank(
        8, capacity=64, max_age=None, half_life=None, min_fraction=1.0, momentum=0.99, gate=True, rank_floor=0.5, backoff_steps=10
    )
    b.gate.observe_drift(torch.tensor([0.0]), torch.tensor([1]))
    healthy = F.normalize(torch.randn(32, 8), dim=1)
    narrow = F.normalize(torch.ones(32, 8) + 0.15 * torch.randn(32, 8), dim=1)  # pulled together
    b.enqueue(healthy, torch.arange(32), step=0)
    assert b.gate_weight(1) > 0
    assert not b.observe_rank(healthy, step=1, kept=0.01)[1]
    rank, backed = b.observe_rank(narrow, step=2, kept=0.01)
    assert rank < 0.5 * effective_rank(healthy) and not backed and len(b) == 32 and float(b.gate.rank_best) == 0
    # acting from here: the narrow rank is the reference, and a later fall below half of it backs off
    assert not b.observe_rank(narrow, step=3, kept=5.0)[1] and float(b.gate.rank_best) == pytest.approx(rank)
    collapsed = F.normalize(torch.ones(32, 8) + 1e-4 * torch.randn(32, 8), dim=1)
    assert effective_rank(collapsed) < 0.5 * rank
    assert b.observe_rank(collapsed, step=4, kept=5.0)[1] and len(b) == 0
    # the same fall with the bank acting all along (kept=None: the gate alone) backs off at once
    b2 = MemoryBank(
        8, capacity=64, max_age=None, half_life=None, min_fraction=1.0, momentum=0.99, gate=True, rank_floor=0.5, backoff_steps=10
    )
    b2.gate.observe_drift(torch.tensor([0.0]), torch.tensor([1]))
    b2.enqueue(healthy, torch.arange(32), step=0)
    b2.observe_rank(healthy, step=1)
    assert b2.observe_rank(narrow, step=2)[1]


def test_the_gate_state_round_trips_and_config_errors_are_one_line():
    b = _gated(temperature=0.07)
    b.gate.observe_drift(torch.tensor([0.02]), torch.tensor([10]))
    b.gate.advance(30)
    b.enqueue(torch.eye(2)[[0]], torch.tensor([1]), step=30)
    b2 = _gated(temperature=0.07)
    b2.load_state_dict(b.state_dict())
    for name in ("rate", "odometer", "last_step", "rank_best", "backoff_until"):
        assert torch.equal(getattr(b.gate, name), getattr(b2.gate, name)), name
    assert torch.equal(b.written_at, b2.written_at) and torch.equal(b.logit_scale, b2.logit_scale)
    assert b.scale_param(torch.tensor(0.0)).exp().item() == pytest.approx(1 / 0.07)
    with pytest.raises(ValueError, match="need momentum"):
        MemoryBank(2, gate=True)
    with pytest.raises(ValueError, match="temperature"):
        _gated(temperature=0.001)


def test_fit_with_the_gated_bank_logs_its_gate_and_rank(easy_bench, tmp_path):
    rows = _fit_with_bank(
        easy_bench,
        tmp_path,
        '{"capacity": 64, "max_age": null, "half_life": null, "momentum": 0.9, "gate": true, "drift_every": 2, '
        '"same_id_positive": true, "temperature": 0.07, "duplicate_cos": 0.99}',
    )
    col = lambda name: [float(r[name]) for r in rows if r.get(name)]  # noqa: E731
    gate, rate, erank = col("train/bank_gate"), col("train/bank_drift_rate"), col("train/erank")
    assert len(gate) == 6 and gate[0] == 0.0 and max(gate) > 0  # off until drift was measured, then on
    assert rate and all(r >= 0 for r in rate) and erank and all(1 <= e <= 16 for e in erank)
    assert all(math.isfinite(x) for x in col("train/loss_bank")) and col("train/bank_temperature")
    sd = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert float(sd["bank.gate.rate"]) >= 0 and float(sd["bank.gate.odometer"]) > 0 and "bank.logit_scale" in sd


def test_per_step_scalars_are_logged_only_on_the_steps_the_logger_writes(easy_bench, tmp_path, monkeypatch):
    """Each self.log costs about 0.5 ms on a CPU, so the module skips per-step scalars on steps the
    logger does not write: logging every 2 steps gives the same values at steps 1, 3 and 5 as logging
    every step, the progress bar's loss is still logged every step, and the fit ends with the same weights."""
    from csmcir.lightning.module import CIRModule

    bank = (
        '{"capacity": 64, "max_age": null, "half_life": null, "momentum": 0.9, "gate": true, "drift_every": 2, '
        '"same_id_positive": true, "temperature": 0.07, "duplicate_cos": 0.99}'
    )
    every = _fit_with_bank(easy_bench, tmp_path / "every", bank)
    calls = []
    log = CIRModule.log

    def counted(self, name, *args, **kwargs):
        calls.append((int(self.global_step), name))
        return log(self, name, *args, **kwargs)

    monkeypatch.setattr(CIRModule, "log", counted)
    sparse = _fit_with_bank(easy_bench, tmp_path / "sparse", bank, log_every=2)
    train = [(step, name) for step, name in calls if name.startswith("train/")]
    assert {step for step, name in train if name == "train/loss_nce"} == set(range(6))  # the progress bar's, every step
    assert {step for step, name in train if name == "train/bank_gate"} == {1, 3, 5}
    names = ("train/loss_bank", "train/bank_gate", "train/bank_kept", "train/erank", "train/temperature", "train/loss_nce")

    def at(rows, name):
        return {int(r["step"]): float(r[name]) for r in rows if r.get(name)}

    for name in names:
        assert sorted(at(sparse, name)) == [1, 3, 5], name
        assert at(sparse, name) == pytest.approx({s: v for s, v in at(every, name).items() if s in (1, 3, 5)}), name
    sd_every = torch.load(tmp_path / "every" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    sd_sparse = torch.load(tmp_path / "sparse" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(sd_every[k], sd_sparse[k]) for k in sd_every)


def test_keys_per_step_gives_the_bank_term_to_a_subset_and_writes_only_its_keys(easy_bench, tmp_path):
    """keys_per_step: 4 of a 16-query batch take the bank term, so 6 steps write 24 keys (not 96),
    every one the EMA key of a query's own target; without momentum keys it is a one-line error."""
    rows = _fit_with_bank(
        easy_bench, tmp_path, '{"capacity": 256, "max_age": null, "half_life": null, "momentum": 0.9, "keys_per_step": 4}'
    )
    losses = [float(r["train/loss_bank"]) for r in rows if r.get("train/loss_bank")]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    sd = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert int((sd["bank.ids"] >= 0).sum()) == 24 and int(sd["bank.ptr"]) == 24
    with pytest.raises(ValueError, match="keys_per_step.*momentum"):
        MemoryBank(4, keys_per_step=2)


def test_anneal_from_lets_the_bank_term_fall_to_zero_at_the_last_step(easy_bench, tmp_path):
    """anneal_from: 0.5 of a 6-step fit keeps the bank term at full weight for steps 0-3 and then
    falls linearly, 2/3 and 1/3 at steps 4 and 5 (0 would be step 6); out-of-range values are a one-line error."""
    b = MemoryBank(4, momentum=0.9, anneal_from=0.5)
    assert [b.anneal(s, 100) for s in (0, 50, 75, 100)] == [1.0, 1.0, 0.5, 0.0]
    assert MemoryBank(4, momentum=0.9).anneal(99, 100) == 1.0
    rows = _fit_with_bank(easy_bench, tmp_path, '{"capacity": 64, "max_age": null, "half_life": null, "momentum": 0.9, "anneal_from": 0.5}')
    anneal = [float(r["train/bank_anneal"]) for r in rows if r.get("train/bank_anneal")]
    assert anneal == pytest.approx([1.0, 1.0, 1.0, 1.0, 2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="anneal_from"):
        MemoryBank(4, momentum=0.9, anneal_from=1.0)


def test_bfloat16_keys_match_float32_keys_and_train_through_the_cli(easy_bench, tmp_path):
    """key_dtype: bfloat16 runs the EMA key pass under autocast: the keys come back float32, unit
    length, within rounding of the float32 pass; a gated fit with its drift probe trains; and the
    setting is refused without momentum keys or with an unknown name."""
    from csmcir.lightning.module import CIRModule

    m = CIRModule(
        net=NetworkSpec(model="tiny", freeze_vision=True),
        memory_bank={"capacity": 16, "momentum": 0.9, "momentum_keys": "tower", "key_dtype": "bfloat16"},
    )
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    ids, att = torch.randint(5, 100, (8, 7)), torch.ones(8, 7, dtype=torch.long)
    enc = lambda: m.ema_model.encode(ids, att, pixels=pixels, side="target")  # noqa: E731
    bf16 = m.bank.encode_keys(enc, "cpu")
    m.bank.key_dtype = "float32"
    fp32 = m.bank.encode_keys(enc, "cpu")
    assert bf16.dtype == torch.float32 and not bf16.requires_grad
    torch.testing.assert_close(bf16.norm(dim=1), torch.ones(8))
    cos = (bf16 * fp32).sum(1)
    assert float((1 - cos).max()) < 1e-2 and not torch.equal(bf16, fp32)  # rounded, not recomputed in float32
    # auto: bfloat16 where the CPU has the units, float32 elsewhere
    from csmcir.losses.memory_bank import native_bfloat16

    m.bank.key_dtype = "auto"
    torch.testing.assert_close(m.bank.encode_keys(enc, "cpu"), bf16 if native_bfloat16("cpu") else fp32, rtol=0, atol=0)
    assert not native_bfloat16("mps") and MemoryBank(4, key_dtype="auto").key_dtype == "auto"  # no momentum: nothing to do
    rows = _fit_with_bank(
        easy_bench,
        tmp_path,
        '{"capacity": 64, "max_age": null, "half_life": null, "momentum": 0.9, "gate": true, "drift_every": 2, "key_dtype": "bfloat16"}',
    )
    assert len([r for r in rows if r.get("train/loss_bank")]) == 6 and [r for r in rows if r.get("train/bank_drift")]
    sd = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    kept = sd["bank.emb"][sd["bank.ids"] >= 0]
    assert sd["bank.emb"].dtype == torch.float32 and len(kept) == 64
    torch.testing.assert_close(kept.norm(dim=1), torch.ones(len(kept)))
    with pytest.raises(ValueError, match="key_dtype applies to momentum keys"):
        MemoryBank(4, key_dtype="bfloat16")
    with pytest.raises(ValueError, match="key_dtype must be one of"):
        MemoryBank(4, momentum=0.9, key_dtype="float16")


def test_the_paired_cost_benchmark_removes_the_bank_on_alternate_steps_and_measures_its_cost():
    """tools/bench_bank_paired.py (docs/memory_bank.md's cost figure): steps 4k+1 and 4k+2 run with the
    module's bank and EMA encoder removed and get them back afterwards, and the cost is the ratio of the
    mean step times over the steps after the warm-up."""
    import runpy
    from pathlib import Path
    from types import SimpleNamespace

    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "bench_bank_paired.py"))
    bank, ema = object(), object()
    module = SimpleNamespace(bank=bank, ema_model=ema)
    timer, trainer = bench["AlternateBank"](), SimpleNamespace(global_step=0)
    seen = []
    for step in range(8):
        trainer.global_step = step
        timer.on_train_batch_start(trainer, module, None, step)
        seen.append(module.bank is bank and module.ema_model is ema)
        trainer.global_step = step + 1
        timer.on_train_batch_end(trainer, module, None, None, step)
        assert module.bank is bank and module.ema_model is ema
    assert seen == [True, False, False, True] * 2
    assert [s for s, on, _ in timer.times] == list(range(8))
    # bank steps take 1.2 s, the others 1.0 s; steps before skip (slow, 5 s) are left out
    times = [(s, s % 4 in (0, 3), 5.0 if s < 8 else (1.2 if s % 4 in (0, 3) else 1.0)) for s in range(48)]
    summary = bench["summarise"](times, skip=8, block=20)
    assert summary["steps_with_bank"] == summary["steps_without"] == 20
    assert summary["cost_mean"] == pytest.approx(0.2) and summary["cost_median"] == pytest.approx(0.2)
    assert summary["cost_per_block"] == pytest.approx([0.2, 0.2])
    # --breakdown: the parts over the bank's steps, the stages over both kinds; Lightning runs forward
    # and backward inside optimizer_step, so its own share is what is left of it
    rows = [
        {"step": s, "bank": s % 4 in (0, 3), "key_pass": 0.03, "forward": 0.3, "backward": 0.5, "optimizer": 0.9}
        if s % 4 in (0, 3)
        else {"step": s, "bank": False, "forward": 0.2, "backward": 0.4, "optimizer": 0.65}
        for s in range(12)
    ]
    parts = bench["summarise_parts"](rows, skip=4)
    assert parts["parts_ms_per_bank_step"]["key_pass"] == pytest.approx(30.0)
    assert parts["parts_ms_per_bank_step"]["selection"] == 0.0
    assert parts["stages_ms_with_bank"] == pytest.approx({"forward": 300.0, "backward": 500.0, "optimizer": 100.0})
    assert parts["stages_ms_without"] == pytest.approx({"forward": 200.0, "backward": 400.0, "optimizer": 50.0})


def test_bench_key_pass_times_each_dtype_and_key_count_and_restores_the_bank():
    """tools/bench_key_pass.py (docs/memory_bank.md's key-pass table): at step ``at`` it calls the
    module's own key pass on the first N targets at each key dtype, puts the bank's dtype back and
    stops the fit; other steps are left alone."""
    import runpy
    from pathlib import Path
    from types import SimpleNamespace

    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "bench_key_pass.py"))
    calls = []
    bank = SimpleNamespace(key_dtype="auto")

    def ema_keys(ids, mask, pixels, features=None):
        calls.append((bank.key_dtype, ids.shape[0], mask.shape[0], pixels.shape[0], features.shape[0]))
        return features

    module = SimpleNamespace(bank=bank, ema_model=object(), model=SimpleNamespace(encode_image=lambda x: x), _ema_keys=ema_keys)
    batch = SimpleNamespace(target=torch.zeros(16, 3, 2), caption_ids=torch.zeros(16, 5), caption_mask=torch.ones(16, 5))
    timer = bench["TimeKeyPass"](at=3, keys=[16, 4, 64], dtypes=["float32", "bfloat16"], repeats=2)
    trainer = SimpleNamespace(global_step=2, should_stop=False)
    timer.on_train_batch_start(trainer, module, batch, 0)
    assert calls == [] and not trainer.should_stop
    trainer.global_step = 3
    timer.on_train_batch_start(trainer, module, batch, 0)
    assert trainer.should_stop and bank.key_dtype == "auto"
    # two untimed calls and two timed ones per (dtype, keys); more keys than the batch holds are capped at it
    expected = [(d, n, n, n, n) for d in ("float32", "bfloat16") for n in (16, 4, 16) for _ in range(4)]
    assert calls == expected
    assert [(r["key_dtype"], r["keys"]) for r in timer.results] == [(d, n) for d in ("float32", "bfloat16") for n in (16, 4, 16)]
    assert all(r["median_ms"] >= 0 for r in timer.results)
