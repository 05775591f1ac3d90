"""A fit killed mid-epoch and resumed from last.ckpt trains exactly the batches it had left, each once:
it ends with the same weights as a fit that was never interrupted."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from csmcir.data.datasets import EpochSampler

from .conftest import fit_args

REPO = Path(__file__).resolve().parents[1]


def test_the_epoch_order_is_seeded_split_across_ranks_and_skips_what_was_trained():
    s = EpochSampler(103, batch_size=4, seed=7)
    s.set_epoch(2)
    whole = [i for i, _ in s]
    assert sorted(whole) == list(range(103)) and len(s) == 103
    again = EpochSampler(103, 4, seed=7)
    again.set_epoch(2)
    assert [x for x in again] == [x for x in s]  # same seed and epoch: same order, same item seeds
    again.set_epoch(3)
    assert [i for i, _ in again] != whole
    # resumed after 5 batches of this epoch: the rest of the same order, the length still the epoch's
    resumed = EpochSampler(103, 4, seed=7, position=lambda: 5)
    resumed.set_epoch(2)
    assert [x for x in resumed] == [x for x in s][20:] and len(resumed) == 103
    # two ranks: disjoint halves of one permutation, equal in size
    ranks = [EpochSampler(103, 4, seed=7, num_replicas=2, rank=r) for r in (0, 1)]
    parts = [[i for i, _ in r] for r in ranks]
    assert len(parts[0]) == len(parts[1]) == 51 and not set(parts[0]) & set(parts[1])


def _fit(bench, out, *extra):
    args = fit_args(
        bench,
        out,
        "--trainer.max_epochs",
        "3",
        "--trainer.limit_train_batches",
        "6",
        "--checkpoint_last.every_n_train_steps",
        "4",
        "--seed_everything",
        "3",
        *extra,
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "csmcir.cli", *args], cwd=REPO, env=env, capture_output=True, text=True)


# the drift-gated memory bank (issue 22): its entries, EMA keys, odometer, drift rate and back-off
# state must come back from last.ckpt too, so the resumed fit continues with the same bank and gate
GATED_BANK = (
    '{"capacity": 64, "max_age": null, "half_life": null, "momentum": 0.9, "gate": true, "drift_every": 2, '
    '"same_id_positive": true, "temperature": 0.07}'
)


@pytest.mark.parametrize("extra", [[], ["--model.memory_bank", GATED_BANK]], ids=["in-batch", "gated-bank"])
def test_a_fit_killed_mid_epoch_resumes_to_the_same_weights(easy_bench, tmp_path, extra):
    whole = _fit(easy_bench, tmp_path / "whole", *extra)
    assert whole.returncode == 0, whole.stderr[-2000:]
    # killed after step 9, mid-epoch (an epoch is 6 batches here); last.ckpt is from step 8
    killed = _fit(easy_bench, tmp_path / "killed", *extra, "--trainer.callbacks+=tests.killer.KillAfterStep", "--trainer.callbacks.step=9")
    assert killed.returncode == -9
    assert torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)["global_step"] == 8
    resumed = _fit(easy_bench, tmp_path / "killed", *extra, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "not resumable" not in resumed.stderr
    a = torch.load(tmp_path / "whole" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 18
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    if extra:  # the gate had measured drift and the bank was on when the fits ended
        assert float(a["state_dict"]["bank.gate.rate"]) >= 0 and float(a["state_dict"]["bank.gate.odometer"]) > 0


def test_optimizer_moments_stored_in_bfloat16_leave_training_in_float32_and_load_back():
    from csmcir.lightning.callbacks import compact_optimizer_states

    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.AdamW([w], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    saved = compact_optimizer_states([opt.state_dict()], torch.bfloat16)[0]
    assert saved["state"][0]["exp_avg"].dtype == saved["state"][0]["exp_avg_sq"].dtype == torch.bfloat16
    assert opt.state[w]["exp_avg"].dtype == torch.float32  # the live state is not the saved copy
    assert torch.equal(saved["state"][0]["step"], opt.state[w]["step"])
    other = torch.optim.AdamW([torch.nn.Parameter(w.detach().clone())], lr=0.1)
    other.load_state_dict(saved)
    back = next(iter(other.state.values()))
    assert back["exp_avg"].dtype == torch.float32
    assert torch.allclose(back["exp_avg_sq"], opt.state[w]["exp_avg_sq"], rtol=2**-8)


def test_a_fit_resumed_from_bfloat16_moments_continues_to_nearly_the_same_weights(easy_bench, tmp_path):
    whole = _fit(easy_bench, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    bf16 = ["--checkpoint_last.optimizer_dtype", "bfloat16"]
    killed = _fit(easy_bench, tmp_path / "killed", *bf16, "--trainer.callbacks+=tests.killer.KillAfterStep", "--trainer.callbacks.step=9")
    assert killed.returncode == -9
    ckpt = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)
    moments = [v for st in ckpt["optimizer_states"][0]["state"].values() for k, v in st.items() if k.startswith("exp_avg")]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)
    resumed = _fit(easy_bench, tmp_path / "killed", *bf16, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "whole" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)["state_dict"]
    # the moments' rounding moves the next steps by a fraction of a percent of one update
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    assert 0 < worst < 1e-3, worst
