"""Losses take embeddings (and masks), never batches."""

from .contrastive import InfoNCELoss, info_nce, same_target_mask
from .distill import DistillConfig, DistillHead, DistillLoss, feature_distill_loss, relational_distill_loss
from .memory_bank import MemoryBank, MemoryBankConfig, bank_nce

__all__ = [
    "DistillConfig",
    "DistillHead",
    "DistillLoss",
    "MemoryBankConfig",
    "feature_distill_loss",
    "relational_distill_loss",
    "InfoNCELoss",
    "MemoryBank",
    "bank_nce",
    "info_nce",
    "same_target_mask",
]
