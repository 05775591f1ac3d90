"""A split held in memory, ready for batching: images decoded once, texts tokenised once.

Small CIR benchmarks (and the synthetic default) fit in memory as uint8; decoding every image
once and keeping token ids as int tensors makes an epoch a matter of tensor indexing, so data
loading never becomes the bottleneck on a 2-core machine. Images stay uint8 until the model's
vision tower normalises them on the device.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import TextConfig
from ..errors import CsmcirError
from .custom import CustomCIR, Triplet


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[N, max_len]`` (int32, [CLS] first, zero padded) and lengths ``[N]``."""
    if not texts:
        return torch.zeros(0, max_len, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    ids = enc["input_ids"].to(torch.int32)
    lengths = enc["attention_mask"].sum(1).to(torch.int32)
    return ids, lengths


def caption_text(caption, levels: tuple[str, ...]) -> str:
    """The target-side text of an image: the final caption, or a join of named levels."""
    parts = []
    for level in levels:
        if level == "final":
            parts.append(caption.final)
        elif level in caption.levels:
            parts.append(caption.levels[level])
    return ". ".join(p for p in parts if p)


def load_images(dataset: CustomCIR, ids: list[str], image_size: int | None, desc: str, workers: int = 4) -> torch.Tensor:
    """Decode ``ids`` into one uint8 tensor ``[N, 3, S, S]`` (resized to ``image_size`` if set)."""
    from PIL import Image

    def one(image_id: str) -> np.ndarray:
        img = dataset.load_image(image_id)
        if image_size is not None and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BICUBIC)
        return np.asarray(img, dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(tqdm(pool.map(one, ids), total=len(ids), desc=desc, unit="img", leave=False, mininterval=1.0))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise CsmcirError(f"images under {dataset.root / 'images'} differ in size ({sorted(shapes)[:3]}...): set data.image_size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@dataclass
class SplitStore:
    """Everything one split needs for training or evaluation.

    Image rows cover the union of references, targets and gallery images. ``gallery_rows`` are
    the rows of the split's gallery in file order; ``target_rows[i]`` all correct targets of
    query ``i``.
    """

    split: str
    image_ids: list[str]
    images: torch.Tensor  # [N, 3, S, S] uint8
    caption_ids: torch.Tensor  # [N, L] int32
    caption_lengths: torch.Tensor  # [N]
    triplets: list[Triplet]
    query_ids: torch.Tensor  # [Q, L] int32
    query_lengths: torch.Tensor  # [Q]
    ref_rows: torch.Tensor  # [Q] long
    target_rows: list[list[int]]
    negative_rows: list[list[int]]  # hard negatives of each query (may be empty)
    gallery_rows: torch.Tensor  # [G] long
    groups: list[str]  # per query: meta["type"] or "all"
    # per query, the phrasings training draws from (meta["train_texts"], e.g. FashionIQ's four
    # forms); None when no query has any. Padded by repeating the query's own text.
    train_text_ids: torch.Tensor | None = None  # [Q, A, L] int32
    train_text_lengths: torch.Tensor | None = None  # [Q, A]
    # CIR-CoT teacher embeddings (csmcir teacher), when configured: per query, per image row
    teacher_query: torch.Tensor | None = None  # [Q, Dt] float32
    teacher_image: torch.Tensor | None = None  # [N, Dt] float32

    @property
    def num_queries(self) -> int:
        return len(self.triplets)

    def padded_targets(self) -> torch.Tensor:
        """``[Q, T]`` target rows padded with -1."""
        t = max(len(r) for r in self.target_rows)
        out = torch.full((len(self.target_rows), t), -1, dtype=torch.long)
        for i, rows in enumerate(self.target_rows):
            out[i, : len(rows)] = torch.tensor(rows)
        return out

    @classmethod
    def build(cls, dataset: CustomCIR, split: str, text: TextConfig | None = None, missing_caption: str = "error") -> SplitStore:
        """Decode and tokenise ``split`` of ``dataset`` as ``text`` says (default :class:`TextConfig`)."""
        from ..tokenizer import load_tokenizer

        text = TextConfig() if text is None else text
        tokenizer, max_text_len, target_text = load_tokenizer(text.tokenizer), text.max_text_len, text.target_text
        caption_levels, image_size = text.caption_levels, text.image_size
        dataset.validate(split)
        triplets = dataset.triplets(split)
        gallery = dataset.gallery(split)
        ids: list[str] = []
        row: dict[str, int] = {}

        def add(image_id: str) -> int:
            if image_id not in row:
                row[image_id] = len(ids)
                ids.append(image_id)
            return row[image_id]

        gallery_rows = [add(g) for g in gallery]
        ref_rows = [add(t.reference) for t in triplets]
        target_rows = [[add(x) for x in t.targets] for t in triplets]
        negative_rows = [[add(x) for x in t.negatives] for t in triplets]

        if target_text == "caption":
            captions = dataset.captions()
            texts, missing = [], []
            for image_id in ids:
                cap = captions.get(image_id)
                if cap is None:
                    missing.append(image_id)
                    texts.append("")
                else:
                    texts.append(caption_text(cap, caption_levels))
            if missing:
                if missing_caption == "error":
                    raise CsmcirError(
                        f"image {missing[0]!r} has no caption in {dataset.captions_file} "
                        f"({len(missing)} of split '{split}' missing; set data.missing_caption=empty to use empty captions)"
                    )
                import warnings

                warnings.warn(f"{len(missing)} images of split '{split}' have no caption: using empty captions", stacklevel=2)
        else:
            texts = [""] * len(ids)
        caption_ids, caption_lengths = tokenize(tokenizer, texts, max_text_len)
        query_ids, query_lengths = tokenize(tokenizer, [t.text for t in triplets], max_text_len)
        train_text_ids = train_text_lengths = None
        forms = [_train_texts(t) for t in triplets]
        if any(len(f) > 1 or f[0] != t.text for f, t in zip(forms, triplets)):
            width = max(len(f) for f in forms)
            flat = [x for f in forms for x in (f + [f[0]] * (width - len(f)))]
            ids_, lens_ = tokenize(tokenizer, flat, max_text_len)
            train_text_ids = ids_.view(len(triplets), width, -1)
            train_text_lengths = lens_.view(len(triplets), width)
        images = load_images(dataset, ids, image_size, desc=f"loading {split} images")
        return cls(
            split=split,
            image_ids=ids,
            images=images,
            caption_ids=caption_ids,
            caption_lengths=caption_lengths,
            triplets=triplets,
            query_ids=query_ids,
            query_lengths=query_lengths,
            ref_rows=torch.tensor(ref_rows, dtype=torch.long),
            target_rows=target_rows,
            negative_rows=negative_rows,
            gallery_rows=torch.tensor(gallery_rows, dtype=torch.long),
            groups=[str(t.meta.get("type", "all")) for t in triplets],
            train_text_ids=train_text_ids,
            train_text_lengths=train_text_lengths,
        )


def _train_texts(t: Triplet) -> list[str]:
    """The phrasings of ``t`` training draws from: ``meta["train_texts"]`` if given, else its text."""
    forms = t.meta.get("train_texts")
    if forms is None:
        return [t.text]
    if not isinstance(forms, list) or not forms or not all(isinstance(x, str) and x for x in forms):
        raise CsmcirError(f"query {t.id!r}: meta.train_texts must be a non-empty list of non-empty strings")
    return list(forms)
