"""Training-free retrievers for OSrCIR's target descriptions: text against the gallery.

* :class:`TextImageRetriever`: a CLIP-style dual encoder (transformers ``CLIPModel`` or
  ``SiglipModel``, by local folder or hub id): its text tower embeds the descriptions, its image
  tower the gallery images (cached in a resumable store, so a second ranking reads them). This is
  OSrCIR's own retrieval.
* :class:`CaptionRetriever`: a sentence encoder (default: the packaged all-MiniLM-L6-v2) matching
  each description against the gallery images' final MCoT captions: csmcir's target side with the
  caption only, no image and no training.

Both give L2-normalised float32 rows; :func:`~csmcir.retrieval.ranking.rank_embeddings` ranks them
under the dataset's protocol.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CsmcirError

__all__ = ["SentenceEncoder", "TextImageRetriever", "CaptionRetriever", "make_retriever"]


def _pooled(out):
    """transformers 5 returns a ModelOutput whose ``pooler_output`` is the projected embedding; 4.x a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings of a BERT-family encoder (sentence-transformers'
    recipe for all-MiniLM-L6-v2). ``model``: ``minilm`` (the packaged one) or a folder."""

    def __init__(self, model: str = "minilm", device: str = "cpu", local_files_only: bool = True):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from ..tokenizer import minilm_path

        path = minilm_path() if model == "minilm" else model
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
            self.model = AutoModel.from_pretrained(path, local_files_only=local_files_only).to(device).eval()
        except OSError as e:
            raise CsmcirError(f"cannot load a sentence encoder from {path}: {str(e).splitlines()[0]}") from None
        self.model_id = "all-MiniLM-L6-v2 (packaged)" if model == "minilm" else str(model)
        self.device, self._torch = device, torch

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[s : s + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
                hidden = self.model(**enc.to(self.device)).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled, dim=1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


class CaptionRetriever:
    """Descriptions against the gallery's final MCoT captions, through :class:`SentenceEncoder`."""

    kind = "captions"

    def __init__(self, model: str = "minilm", device: str = "cpu", local_files_only: bool = True):
        self.encoder = SentenceEncoder(model, device, local_files_only)
        self.model_id = self.encoder.model_id

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts)

    def encode_gallery(self, dataset, ids: list[str], cache=None, progress: bool = True) -> np.ndarray:
        captions = dataset.captions()
        missing = [i for i in ids if i not in captions]
        if missing:
            raise CsmcirError(
                f"{len(missing)} gallery images have no caption, first {missing[0]!r}: the caption retriever needs "
                f"every gallery image's MCoT caption (`csmcir caption`, or --retriever clip)"
            )
        return self.encoder.encode([captions[i].final for i in ids])


class TextImageRetriever:
    """A CLIP-style dual encoder by path: ``get_text_features`` for descriptions, ``get_image_features``
    for gallery images. Loads ``AutoModel`` + ``AutoTokenizer`` + ``AutoImageProcessor`` from the
    folder (CLIP and SigLIP both work; SigLIP pads text to its ``max_length`` as it was trained)."""

    kind = "clip"

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", local_files_only: bool = True, batch_size: int = 32):
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        from ..devices import resolve_device, resolve_dtype

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=local_files_only)
            self.images = AutoImageProcessor.from_pretrained(model, local_files_only=local_files_only)
            self.model = AutoModel.from_pretrained(model, local_files_only=local_files_only, dtype=self.dtype).to(self.device).eval()
        except OSError as e:
            raise CsmcirError(f"cannot load a CLIP-style dual encoder from {model}: {str(e).splitlines()[0]}") from None
        if not (hasattr(self.model, "get_text_features") and hasattr(self.model, "get_image_features")):
            raise CsmcirError(f"{model} is a {type(self.model).__name__}, not a text-image dual encoder (CLIPModel, SiglipModel)")
        self.model_id, self.batch_size, self._torch = str(model), batch_size, torch
        self.siglip = "siglip" in self.model.config.model_type

    def _norm(self, x) -> np.ndarray:
        return self._torch.nn.functional.normalize(x.float(), dim=1).cpu().numpy()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        out = []
        pad = {"padding": "max_length", "max_length": 64} if self.siglip else {"padding": True}
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[s : s + self.batch_size], truncation=True, return_tensors="pt", **pad).to(self.device)
                out.append(self._norm(_pooled(self.model.get_text_features(**enc))))
        return np.concatenate(out)

    def encode_images(self, images: list) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            px = self.images(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
            return self._norm(_pooled(self.model.get_image_features(pixel_values=px)))

    def encode_gallery(self, dataset, ids: list[str], cache: str | Path | None = None, progress: bool = True) -> np.ndarray:
        """Gallery image embeddings; with ``cache`` (a folder) they are stored as they are made
        (a :class:`~csmcir.teacher.store.TeacherStore` of kind gallery) and a rerun reads them."""
        from tqdm.auto import tqdm

        from ..teacher.store import TeacherStore, read_teacher_store

        store = TeacherStore(cache, model=self.model_id, mode="clip-image", kind="gallery") if cache else None
        done = store.done if store else set()
        todo = [i for i in ids if i not in done]
        missing = [(i, p) for i in todo if not (p := dataset.image_path(i)).is_file()]
        if missing:
            raise CsmcirError(f"{len(missing)} gallery images are missing, first: image {missing[0][0]!r} at {missing[0][1]}")
        made: dict[str, np.ndarray] = {}
        for s in tqdm(range(0, len(todo), self.batch_size), desc="CLIP gallery images", disable=not progress or not todo, unit="batch"):
            batch = todo[s : s + self.batch_size]
            emb = self.encode_images([dataset.load_image(i) for i in batch])
            if store:
                store.append(batch, emb)
            made.update(zip(batch, emb))
        if store:
            _, sids, semb = read_teacher_store(cache)
            made.update(zip(sids, semb))
        return np.stack([made[i] for i in ids]).astype(np.float32)


def make_retriever(kind: str, model: str | None = None, device: str = "auto", dtype: str = "auto", local_files_only: bool = True):
    """``clip`` (``model``: a CLIPModel / SiglipModel folder or hub id) or ``captions`` (``model``:
    a sentence encoder folder, default the packaged MiniLM)."""
    if kind == "clip":
        if not model:
            raise CsmcirError("--retriever clip needs --retriever-model (a CLIPModel or SiglipModel folder or hub id)")
        return TextImageRetriever(model, device=device, dtype=dtype, local_files_only=local_files_only)
    if kind == "captions":
        from ..devices import resolve_device

        return CaptionRetriever(model or "minilm", device=resolve_device(device), local_files_only=local_files_only)
    raise CsmcirError(f"unknown retriever {kind!r} (clip, captions)")
