"""Losses take embeddings (and masks), never batches."""

from .contrastive import InfoNCELoss, info_nce, same_target_mask
from .memory_bank import MemoryBank, bank_nce

__all__ = ["InfoNCELoss", "MemoryBank", "bank_nce", "info_nce", "same_target_mask"]
