"""``csmcir fit | validate | test`` through LightningCLI.

The class defaults of :class:`CIRModule` and :class:`CIRDataModule` are the synthetic default but for
its memory bank (``MemoryBankConfig.drift_gated()``, set here; the module's own default is in-batch
negatives only), and the trainer defaults below complete it, so ``csmcir fit`` alone runs it;
``configs/synthetic.yaml`` spells the same settings out (a test keeps the two equal).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from ..data.datamodule import CIRDataModule
from ..errors import CsmcirError
from ..losses import MemoryBankConfig
from ..models import NetworkSpec
from .callbacks import LastCheckpoint, TrainSpeed, ValidateShortFit
from .module import CIRModule

# 740 steps: the drift-gated memory bank's (64 keys a step) share of the in-batch recipe's 819-step (7-epoch)
# wall clock (docs/memory_bank.md); `--model.memory_bank null --trainer.max_steps -1` is that in-batch recipe
TRAINER_DEFAULTS = {
    "default_root_dir": "checkpoints/synthetic",
    "max_epochs": 7,
    "max_steps": 740,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 25,
}


class CsmcirCLI(LightningCLI):
    def __init__(self, args=None, run=True):
        super().__init__(
            CIRModule,
            CIRDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            parser_kwargs={"parser_mode": "omegaconf"},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser):
        # data fields that must agree with the model come from the model config, in one place
        net = ("model.net.model", "model.net.overrides", "model.net.init")
        parser.link_arguments(net, "data.max_text_len", compute_fn=_model_max_text_len)
        parser.link_arguments(net, "data.tower_image_size", compute_fn=_model_image_size)
        # Always-on callbacks, each configurable under its own key (e.g. --checkpoint_last.every_n_train_steps 50).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint_best")
        parser.set_defaults(
            {
                "checkpoint_best.monitor": "val/R@1",
                "checkpoint_best.mode": "max",
                "checkpoint_best.save_top_k": 1,
                "checkpoint_best.filename": "best-{epoch}-{step}",
                "checkpoint_best.auto_insert_metric_name": False,
                # the best model is for evaluation and serving: without optimizer states it is a third
                # of the size (a BLIP-2 fit: 0.7 GB instead of 2.1); last.ckpt keeps them for resuming
                "checkpoint_best.save_weights_only": True,
            }
        )
        # last.ckpt every N steps, so a killed fit resumes with --ckpt_path last
        parser.add_lightning_class_args(LastCheckpoint, "checkpoint_last")
        parser.set_defaults(
            {
                "checkpoint_last.save_top_k": 0,
                "checkpoint_last.save_last": True,
                "checkpoint_last.every_n_train_steps": 100,
                # a resumed run overwrites last.ckpt instead of writing last-v1.ckpt beside it
                "checkpoint_last.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(TrainSpeed, "train_speed")
        # the synthetic default trains with the drift-gated bank: over the frozen tower it beats in-batch negatives
        # at their wall clock (docs/memory_bank.md); CIRModule's own default stays in-batch. A --model.memory_bank
        # JSON changes this bank's options; `null` first starts from MemoryBankConfig's class defaults
        parser.set_defaults({"model.memory_bank": MemoryBankConfig.drift_gated()})

    def instantiate_classes(self):
        # the module's and datamodule's checks of their options (memory_bank, distill, init, ...) raise
        # ValueError with a one-line message naming the option: a user error, shown without a traceback
        try:
            super().instantiate_classes()
        except ValueError as e:
            raise CsmcirError(f"invalid configuration: {e}") from None

    def _parse_ckpt_path(self) -> None:
        # --ckpt_path reads the module's hyper-parameters back from the checkpoint: refuse one of
        # another format in one line before LightningCLI fails to parse them
        from pathlib import Path

        import torch

        from ..inference import check_checkpoint_format

        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if path and Path(path).is_file():
            try:
                ckpt = torch.load(path, weights_only=True, map_location="cpu", mmap=True)  # only its header is read
            except Exception as e:  # noqa: BLE001 - unreadable means not a checkpoint
                raise CsmcirError(f"{path} is not a readable checkpoint: {str(e).strip().splitlines()[0][:200]}") from None
            check_checkpoint_format(ckpt, path, resumable=True)
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(ValidateShortFit())  # a fit shorter than an epoch still validates (best checkpoint)
        # Checkpoints go straight into default_root_dir (not into the logger's version_N folder),
        # so `--ckpt_path last` finds <default_root_dir>/last.ckpt from a later run.
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = trainer.default_root_dir
        return trainer


def run_lightning_cli(args: list[str]) -> None:
    import sys
    import warnings

    # default_root_dir holds both the logs and the checkpoints: that folder is never "empty"
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    saved = sys.argv
    sys.argv = [saved[0], *args]  # LightningCLI reads sys.argv; passing args= as well warns
    try:
        CsmcirCLI()
    finally:
        sys.argv = saved


def _model_config(model: str, overrides, init):
    return NetworkSpec(model=model, overrides=overrides, init=init).model_config()


def _model_max_text_len(model: str, overrides, init) -> int:
    """``data.max_text_len`` = the model config's ``qformer.max_text_len``."""
    return _model_config(model, overrides, init).qformer.max_text_len


def _model_image_size(model: str, overrides, init) -> int:
    """``data.tower_image_size`` = the vision tower's input side."""
    return _model_config(model, overrides, init).vision.image_size
