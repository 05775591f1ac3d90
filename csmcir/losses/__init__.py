"""Losses take embeddings (and masks), never batches."""

from .contrastive import InfoNCELoss, info_nce, same_target_mask
from .memory_bank import MemoryBank

__all__ = ["InfoNCELoss", "MemoryBank", "info_nce", "same_target_mask"]
