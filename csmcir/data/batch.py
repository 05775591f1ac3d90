"""The batches the data layer yields: typed, so the LightningModule reads fields, not dict keys.

Lightning moves dataclass batches to the device field by field (``None`` fields stay ``None``).
Token tensors are cut to the longest text of their group and carry a matching attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["EvalBatch", "TrainBatch"]


@dataclass
class TrainBatch:
    """One training batch of B queries.

    Query side: ``ref`` pixels ``[B, 3, S, S]`` uint8 (or cached features ``[B, T, C]``),
    ``query_ids``/``query_mask`` ``[B, L]``. Target side: ``target`` pixels, ``caption_ids``/
    ``caption_mask`` ``[B, Lc]``, ``target_row`` ``[B]`` (rows of the split's image store) and
    ``all_targets`` ``[B, T]`` (every correct target row of each query, -1 padded).

    Optional groups (``None`` when off): listed hard negatives ``neg`` ``[B, N, ...]`` with
    their captions and rows; the reference negative's caption and row (its image is ``ref``);
    teacher embeddings of the query and of the drawn target.
    """

    ref: torch.Tensor
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    target: torch.Tensor
    caption_ids: torch.Tensor
    caption_mask: torch.Tensor
    target_row: torch.Tensor
    all_targets: torch.Tensor
    neg: torch.Tensor | None = None
    neg_caption_ids: torch.Tensor | None = None
    neg_caption_mask: torch.Tensor | None = None
    neg_rows: torch.Tensor | None = None
    ref_caption_ids: torch.Tensor | None = None
    ref_caption_mask: torch.Tensor | None = None
    ref_row: torch.Tensor | None = None
    teacher_query: torch.Tensor | None = None
    teacher_target: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ref.shape[0])


@dataclass
class EvalBatch:
    """One evaluation batch of one split: gallery items (``kind="gallery"``: image + caption)
    or queries (``kind="queries"``: reference image + modification text). ``index`` is each
    item's position in the split's gallery or query list."""

    split: str
    kind: str
    index: torch.Tensor
    pixels: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])
