"""Losses take embeddings (and masks), never batches."""

from .contrastive import InfoNCELoss, info_nce, same_target_mask

__all__ = ["InfoNCELoss", "info_nce", "same_target_mask"]
