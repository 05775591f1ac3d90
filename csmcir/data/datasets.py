"""Map-style datasets over a :class:`SplitStore` and the collate that trims text padding."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .store import SplitStore


class TrainTriplets(Dataset):
    """(reference image, modification text) -> one correct target (drawn at random each time)."""

    def __init__(self, store: SplitStore):
        self.s = store
        self.all_targets = store.padded_targets()

    def __len__(self):
        return self.s.num_queries

    def __getitem__(self, i):
        s = self.s
        rows = s.target_rows[i]
        t = rows[int(torch.randint(len(rows), ()))] if len(rows) > 1 else rows[0]
        r = int(s.ref_rows[i])
        return {
            "ref": s.images[r],
            "query_ids": s.query_ids[i],
            "query_len": s.query_lengths[i],
            "target": s.images[t],
            "caption_ids": s.caption_ids[t],
            "caption_len": s.caption_lengths[t],
            "target_row": t,
            "all_targets": self.all_targets[i],
        }


class GalleryImages(Dataset):
    """Target side of evaluation: each gallery image with its caption."""

    def __init__(self, store: SplitStore):
        self.s = store

    def __len__(self):
        return len(self.s.gallery_rows)

    def __getitem__(self, j):
        r = int(self.s.gallery_rows[j])
        return {"image": self.s.images[r], "caption_ids": self.s.caption_ids[r], "caption_len": self.s.caption_lengths[r], "index": j}


class EvalQueries(Dataset):
    """Query side of evaluation: reference image + modification text."""

    def __init__(self, store: SplitStore):
        self.s = store

    def __len__(self):
        return self.s.num_queries

    def __getitem__(self, i):
        r = int(self.s.ref_rows[i])
        return {"ref": self.s.images[r], "query_ids": self.s.query_ids[i], "query_len": self.s.query_lengths[i], "index": i}


def collate(items: list[dict]) -> dict:
    """Stack, then cut token tensors to the longest text in the batch and build attention masks."""
    batch = torch.utils.data.default_collate(items)
    for prefix in ("query", "caption"):
        if f"{prefix}_ids" in batch:
            lengths = batch.pop(f"{prefix}_len")
            n = int(lengths.max())
            batch[f"{prefix}_ids"] = batch[f"{prefix}_ids"][:, :n].long()
            batch[f"{prefix}_mask"] = (torch.arange(n)[None, :] < lengths[:, None]).long()
    return batch
