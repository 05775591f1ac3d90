"""Callbacks: training throughput and peak memory, recorded for docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TrainSpeed(L.Callback):
    """Logs training samples/s (training steps only, validation excluded) and peak memory.

    At the end of ``fit`` rank 0 writes ``<default_root_dir>/train_stats.json`` with the
    throughput over all steps after the first ``skip_steps`` (warm-up), the wall time of the whole
    fit, peak RSS, and peak CUDA memory when a GPU was used.

    Args:
        skip_steps: steps left out of the throughput (start-up, first allocations).
    """

    def __init__(self, skip_steps: int = 5):
        self.skip_steps = skip_steps

    def on_fit_start(self, trainer, pl_module):
        self._fit_t0 = time.perf_counter()
        self._train_time = 0.0
        self._samples = 0
        self._steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._steps += 1
        if self._steps <= self.skip_steps:
            return
        self._train_time += time.perf_counter() - self._t
        self._samples += len(batch) * trainer.world_size
        if self._train_time > 0 and self._steps % 50 == 0:
            pl_module.log("train/samples_per_s", self._samples / self._train_time, rank_zero_only=True)

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        stats = {
            "steps": self._steps,
            "samples_per_s": round(self._samples / self._train_time, 2) if self._train_time else None,
            "fit_wall_s": round(time.perf_counter() - self._fit_t0, 1),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            "world_size": trainer.world_size,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        }
        out = Path(trainer.default_root_dir) / "train_stats.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(stats, indent=2) + "\n")


OPTIMIZER_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def compact_optimizer_states(optimizer_states: list[dict], dtype: torch.dtype) -> list[dict]:
    """Copies of optimizer ``state_dict()``s whose floating-point per-parameter state (AdamW's
    two moments) is stored in ``dtype``; step counters and the parameter groups are unchanged.

    The live optimizer is untouched (``state_dict()`` hands out its own tensors, so each state is
    rebuilt, never edited). Loading needs nothing special: ``torch.optim.Optimizer.load_state_dict``
    casts floating-point state back to its parameter's dtype. The restored moments then carry
    ``dtype``'s rounding (bfloat16: relative error <= 2**-9); the weights stay exact.
    """
    out = []
    for sd in optimizer_states:
        state = {
            i: {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "step" else v for k, v in st.items()}
            for i, st in sd["state"].items()
        }
        out.append({**sd, "state": state})
    return out


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps AND at the end of every epoch.

    A plain ``ModelCheckpoint(save_last=True, every_n_train_steps=N)`` leaves ``last.ckpt`` at
    the last multiple of N (step 700 of a 750-step fit), and a copy taken on an epoch's final
    batch resumes into an epoch Lightning considers unfinished. Saving again once the epoch is
    complete makes ``last.ckpt`` the final model and a clean resume point.

    Args:
        optimizer_dtype: the precision AdamW's moments are stored in. ``float32`` (default): a
            resumed fit continues bit for bit. ``bfloat16``: the moments take half the space
            (a BLIP-2 Q-Former's 186 M trained parameters: last.ckpt 1.49 GB instead of 2.23),
            and a resumed fit restarts them rounded to bfloat16 (weights exact); configs/blip2.yaml
            sets it. Only the saved copy is rounded: training keeps float32 moments.
        **kwargs: ``ModelCheckpoint``'s.
    """

    def __init__(self, *args, optimizer_dtype: Literal["float32", "bfloat16"] = "float32", **kwargs):
        super().__init__(*args, **kwargs)
        if optimizer_dtype not in OPTIMIZER_DTYPES:
            raise ValueError(f"checkpoint_last.optimizer_dtype {optimizer_dtype!r}: choose one of {', '.join(OPTIMIZER_DTYPES)}")
        self.optimizer_dtype = optimizer_dtype

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        dtype = OPTIMIZER_DTYPES[self.optimizer_dtype]
        if dtype is not None and "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = compact_optimizer_states(checkpoint["optimizer_states"], dtype)

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ValidateShortFit(L.Callback):
    """Validate at the last step of a fit that would otherwise end without any validation.

    A fit shorter than an epoch (``--trainer.max_steps 3`` on a 117-step epoch) never reaches the
    end-of-epoch validation, so no best checkpoint is written and Lightning warns that
    ``val/R@1`` is missing. Asking the loop to stop at the last step makes Lightning run the
    validation loop there (its rule for stopping early); a fit that validated already is left alone.
    """

    def on_fit_start(self, trainer, pl_module):
        self._validated = False

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._validated or trainer.max_steps <= 0 or not trainer.enable_validation:
            return
        if trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True
