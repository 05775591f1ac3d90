"""A callback for the resume tests: SIGKILL the fit's own process after a given training step, as a
machine that dies would (no hook runs, nothing is flushed)."""

import os
import signal

import lightning as L


class KillAfterStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
