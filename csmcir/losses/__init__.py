"""Losses take embeddings (and masks), never batches."""

from .contrastive import InfoNCELoss, info_nce, same_target_mask
from .distill import DistillHead, feature_distill_loss, relational_distill_loss
from .memory_bank import MemoryBank, bank_nce

__all__ = ["DistillHead", "feature_distill_loss", "relational_distill_loss", "InfoNCELoss", "MemoryBank", "bank_nce", "info_nce", "same_target_mask"]
