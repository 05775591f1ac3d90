"""Shortcut baselines that a composed retrieval model must beat by a wide margin.

- ``image_only``: the query is the trained model's embedding of the reference image with an empty
  text; a model that ignores the modification text scores like this.
- ``text_only``: the query is the trained model's embedding of the modification text with a blank
  (uniform mean-colour) image; a model that ignores the reference scores like this.
- ``pixel_nn``: nearest gallery image to the reference in raw pixel space (cosine of mean-centred
  pixels), no model at all.
- ``model``: the full query (reference image + modification text).

All rank the split's gallery against the model's target-side embeddings (image + caption), except
``pixel_nn`` which compares pixels with pixels; the reference is excluded in every case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.feature_cache import encode_in_chunks
from ..data.store import SplitStore
from .evaluate import evaluate_embeddings


@torch.no_grad()
def _encode(
    model, fast, pixels: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor, device, batch_size: int, desc: str, side: str = "query"
) -> torch.Tensor:
    """``fast``: the tower's inference copy, run in the feature cache's small chunks (about 6x the
    images/s of one 256 batch through the plain tower on a 2-core CPU; docs/efficientnet.md)."""
    out = []
    for s in tqdm(range(0, len(ids), batch_size), desc=desc, leave=False, mininterval=1.0):
        n = int(lengths[s : s + batch_size].max())
        tok = ids[s : s + batch_size, :n].long().to(device)
        mask = (torch.arange(n)[None, :] < lengths[s : s + batch_size, None]).long().to(device)
        px = pixels[s : s + batch_size].to(device)
        feats = encode_in_chunks(fast, px)
        out.append(model.encode(tok, mask, image_features=feats.to(model.proj.weight.dtype), side=side).float().cpu())
    return torch.cat(out)


def evaluate_baselines(model, store: SplitStore, device="cpu", batch_size: int = 256, ks=(1, 5, 10, 50)) -> dict[str, dict[str, float]]:
    """Recall@K of the model and of the three shortcut baselines on one split."""
    model.eval().to(device)
    fast = model.vision.inference_copy()
    g = store.gallery_rows
    gallery = _encode(
        model, fast, store.images[g], store.caption_ids[g], store.caption_lengths[g], device, batch_size, "gallery", side="target"
    )
    refs = store.images[store.ref_rows]
    q_ids, q_len = store.query_ids, store.query_lengths
    empty_ids = store.caption_ids.new_zeros(len(refs), q_ids.shape[1])
    empty_ids[:, 0], empty_ids[:, 1] = q_ids[0, 0], _sep_id(q_ids, q_len)  # [CLS] [SEP]
    empty_len = torch.full((len(refs),), 2, dtype=q_len.dtype)
    blank = store.images.float().mean(dim=(0, 2, 3)).round().to(torch.uint8)[None, :, None, None].expand_as(refs).contiguous()
    results = {
        "model": evaluate_embeddings(store, _encode(model, fast, refs, q_ids, q_len, device, batch_size, "queries"), gallery, ks),
        "image_only": evaluate_embeddings(
            store, _encode(model, fast, refs, empty_ids, empty_len, device, batch_size, "image-only"), gallery, ks, by_type=False
        ),
        "text_only": evaluate_embeddings(
            store, _encode(model, fast, blank, q_ids, q_len, device, batch_size, "text-only"), gallery, ks, by_type=False
        ),
    }
    flat = lambda x: F.normalize((x.float() - x.float().mean(dim=(1, 2, 3), keepdim=True)).flatten(1), dim=-1)  # noqa: E731
    results["pixel_nn"] = evaluate_embeddings(store, flat(refs), flat(store.images[g]), ks, by_type=False)
    return results


def _sep_id(ids: torch.Tensor, lengths: torch.Tensor) -> int:
    """The [SEP] id: the last real token of any tokenised text."""
    return int(ids[0, int(lengths[0]) - 1])
