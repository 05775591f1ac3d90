"""Map-style datasets over a :class:`SplitStore` and the collate that trims text padding."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .batch import EvalBatch, TrainBatch
from .store import SplitStore


class TrainTriplets(Dataset):
    """(reference image, modification text) -> one correct target (drawn at random each time).

    The text is drawn each time from the query's ``meta["train_texts"]`` when the split has them
    (FashionIQ's four forms); evaluation always uses ``text``.

    With ``hard_negatives`` = n > 0 each item also carries n of the query's listed negatives
    (drawn without replacement; a query with fewer is topped up with random gallery images).
    With ``reference_negative`` the query's own reference image (with its caption) is one more
    negative: the target differs from the reference, so "return the reference" is always wrong.
    """

    def __init__(self, store: SplitStore, hard_negatives: int = 0, reference_negative: bool = False):
        self.s = store
        self.n_neg = hard_negatives
        self.ref_neg = reference_negative
        self.all_targets = store.padded_targets()

    def __len__(self):
        return self.s.num_queries

    def __getitem__(self, key):
        # an (index, seed) pair from EpochSampler: this item's draws come from its own generator
        i, seed = key if isinstance(key, tuple) else (key, None)
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        s = self.s
        rows = s.target_rows[i]
        t = rows[int(torch.randint(len(rows), (), generator=g))] if len(rows) > 1 else rows[0]
        r = int(s.ref_rows[i])
        if s.train_text_ids is not None:  # one of the query's phrasings, drawn each time
            j = int(torch.randint(s.train_text_ids.shape[1], (), generator=g))
            q_ids, q_len = s.train_text_ids[i, j], s.train_text_lengths[i, j]
        else:
            q_ids, q_len = s.query_ids[i], s.query_lengths[i]
        item = {
            "ref": s.images[r],
            "query_ids": q_ids,
            "query_len": q_len,
            "target": s.images[t],
            "caption_ids": s.caption_ids[t],
            "caption_len": s.caption_lengths[t],
            "target_row": t,
            "all_targets": self.all_targets[i],
        }
        if s.teacher_query is not None:
            item["teacher_query"] = s.teacher_query[i]
        if s.teacher_image is not None:
            item["teacher_target"] = s.teacher_image[t]
        if self.ref_neg:
            # the image is the reference already in the item: the model reuses its features
            item.update(ref_caption_ids=s.caption_ids[r], ref_caption_len=s.caption_lengths[r], ref_row=r)
        if self.n_neg:
            listed = s.negative_rows[i]
            pick = [listed[j] for j in torch.randperm(len(listed), generator=g)[: self.n_neg].tolist()]
            while len(pick) < self.n_neg:
                row = int(s.gallery_rows[int(torch.randint(len(s.gallery_rows), (), generator=g))])
                if row not in s.target_rows[i] and row != r:
                    pick.append(row)
            rows = torch.tensor(pick)
            item.update(neg=s.images[rows], neg_caption_ids=s.caption_ids[rows], neg_caption_len=s.caption_lengths[rows], neg_rows=rows)
        return item


class EpochSampler(DistributedSampler):
    """The training order, resumable exactly: each epoch a permutation drawn from ``(seed, epoch)``,
    split across DDP ranks, and each item's random draws (which target, which phrasing, which
    negatives) from its own seed ``(seed, epoch, index)``, so a batch never depends on what ran
    before it in the process.

    A fit resumed mid-epoch (``--ckpt_path``) continues the interrupted epoch where it stopped:
    ``position()`` gives the batches this rank already trained in the current epoch (read when
    the epoch's first index is drawn, after Lightning restored its loops), and that many batches
    of the epoch's order are skipped. ``len()`` stays the whole epoch's, as Lightning counts it.
    Subclassing ``DistributedSampler`` keeps Lightning from replacing it under DDP; it calls
    :meth:`set_epoch` every epoch.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, position=None, num_replicas: int | None = None, rank: int | None = None):
        import torch.distributed as dist

        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        # not DistributedSampler.__init__: it insists on an initialised process group
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.per_rank = size // num_replicas  # equal on every rank (the rest is dropped, as drop_last does)
        self.position = position or (lambda: 0)

    def __len__(self) -> int:
        return self.per_rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """This rank's indices of ``epoch``, in order."""
        g = torch.Generator().manual_seed(_mix(self.seed, epoch))
        perm = torch.randperm(self.size, generator=g)
        return perm[self.rank : self.per_rank * self.num_replicas : self.num_replicas].tolist()

    def __iter__(self):
        epoch = self.epoch
        skip = self.position() * self.batch_size
        for i in self.order(epoch)[skip:]:
            yield (i, _mix(self.seed, epoch, i))


class ResumableLoader(DataLoader):
    """The training DataLoader over an :class:`EpochSampler`. Where a resumed epoch starts comes
    from Lightning's restored progress (the sampler reads it), so the state here only records the
    order's seed and epoch: Lightning sees a resumable loader, and a resume under another seed is
    refused instead of silently training another order."""

    def state_dict(self) -> dict:
        return {"sampler": "EpochSampler", "seed": self.sampler.seed, "epoch": self.sampler.epoch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sampler") == "EpochSampler" and state.get("seed") != self.sampler.seed:
            from ..errors import CsmcirError

            raise CsmcirError(
                f"this checkpoint's fit drew its batches with seed {state.get('seed')}, the resumed fit with "
                f"{self.sampler.seed}: resume with --seed_everything {state.get('seed')}"
            )


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


class GalleryImages(Dataset):
    """Target side of evaluation: each gallery image with its caption."""

    kind = "gallery"

    def __init__(self, store: SplitStore):
        self.s = store

    def __len__(self):
        return len(self.s.gallery_rows)

    def __getitem__(self, j):
        r = int(self.s.gallery_rows[j])
        return {"pixels": self.s.images[r], "text_ids": self.s.caption_ids[r], "text_len": self.s.caption_lengths[r], "index": j}


class EvalQueries(Dataset):
    """Query side of evaluation: reference image + modification text."""

    kind = "queries"

    def __init__(self, store: SplitStore):
        self.s = store

    def __len__(self):
        return self.s.num_queries

    def __getitem__(self, i):
        r = int(self.s.ref_rows[i])
        return {"pixels": self.s.images[r], "text_ids": self.s.query_ids[i], "text_len": self.s.query_lengths[i], "index": i}


def _cut_texts(batch: dict, prefixes: tuple[str, ...]) -> None:
    """Cut the token tensors of ``prefixes`` to one width (their longest text) and add masks."""
    prefixes = tuple(p for p in prefixes if f"{p}_len" in batch)
    if not prefixes:
        return
    n = int(max(batch[f"{p}_len"].max() for p in prefixes))
    for p in prefixes:
        lengths = batch.pop(f"{p}_len")
        batch[f"{p}_ids"] = batch[f"{p}_ids"][..., :n].long()
        batch[f"{p}_mask"] = (torch.arange(n) < lengths[..., None]).long()


def collate(items: list[dict]) -> TrainBatch:
    """Stack training items, cut token tensors to the longest text of their group (the query
    texts; the target-side texts, which share one Q-Former pass) and build attention masks."""
    batch = torch.utils.data.default_collate(items)
    _cut_texts(batch, ("query",))
    _cut_texts(batch, ("caption", "neg_caption", "ref_caption"))
    return TrainBatch(**batch)


class EvalCollate:
    """The collate of an evaluation loader of ``split`` (``kind``: gallery or queries); a class,
    not a closure, so that worker processes can pickle it."""

    def __init__(self, split: str, kind: str):
        self.split, self.kind = split, kind

    def __call__(self, items: list[dict]) -> EvalBatch:
        batch = torch.utils.data.default_collate(items)
        _cut_texts(batch, ("text",))
        return EvalBatch(split=self.split, kind=self.kind, **batch)
