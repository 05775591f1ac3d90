"""Shared fixtures: one small synthetic benchmark and one briefly trained tiny checkpoint per session."""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def easy_bench(tmp_path_factory):
    from csmcir.data.synthetic import generate

    root = tmp_path_factory.mktemp("bench") / "easy"
    generate(root, seed=0, difficulty="easy", workers=1, progress=False)
    return root


@pytest.fixture
def bench_copy(easy_bench, tmp_path):
    """A private copy of the benchmark that a test may damage."""
    dst = tmp_path / "bench"
    shutil.copytree(easy_bench, dst)
    return dst


def fit_args(root, out, *extra: str) -> list[str]:
    return [
        "fit",
        "--model.net.model",
        "tiny",
        "--data.root",
        str(root),
        "--data.synthetic",
        "false",
        "--data.batch_size",
        "16",
        "--data.eval_batch_size",
        "128",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.log_every_n_steps",
        "2",
        # "auto" would write cache/features into the working directory (the repo root) whenever a
        # test freezes the tower; a test of the cache names its own folder in `extra`
        "--model.feature_cache",
        "null",
        # in-batch negatives, as the tests were written (the default recipe's drift-gated bank has tests of
        # its own); a test's --model.memory_bank JSON then starts from MemoryBankConfig's class defaults
        "--model.memory_bank",
        "null",
        *extra,
    ]


@pytest.fixture(scope="session")
def trained(easy_bench, tmp_path_factory):
    """A tiny model fitted for one epoch of 6 steps through the CLI; returns its run folder."""
    from csmcir.cli import main

    out = tmp_path_factory.mktemp("run")
    rc = main(
        fit_args(
            easy_bench, out, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6", "--checkpoint_last.every_n_train_steps", "3"
        )
    )
    assert rc == 0
    assert (out / "last.ckpt").is_file()
    return out
