"""Load a trained dual tower from a checkpoint and encode queries and gallery images.

Checkpoints are read with ``torch.load(weights_only=True)``: only tensors and plain containers
are accepted, never pickled code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .errors import CsmcirError
from .models import CIRDualTower

CHECKPOINT_KEY = "csmcir"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise CsmcirError(f"unknown device {device!r}") from None


def read_checkpoint(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CsmcirError(f"checkpoint {p} not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means "not a checkpoint"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CsmcirError(f"{p} is not a readable checkpoint: {reason[:200]}") from None
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt or "state_dict" not in ckpt:
        raise CsmcirError(f"{p} is not a csmcir checkpoint (no '{CHECKPOINT_KEY}' section; was it written by `csmcir fit`?)")
    return ckpt


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class Encoder:
    """A trained dual tower plus the text settings it was trained with."""

    model: CIRDualTower
    text: dict
    device: torch.device
    checkpoint: str = ""

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> "Encoder":
        ckpt = read_checkpoint(path)
        meta = ckpt[CHECKPOINT_KEY]
        cfg = ModelConfig.from_dict(meta["model_config"])
        model = CIRDualTower(cfg)
        state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CsmcirError(f"{path}: weights do not match its model config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        dev = resolve_device(device)
        text = meta.get("text") or {"tokenizer": cfg.tokenizer, "max_text_len": cfg.qformer.max_text_len, "target_text": "caption", "caption_levels": ["final"], "image_size": None}
        return cls(model.to(dev).eval(), text, dev, f"{path}@{file_digest(path)}")

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(self.text["tokenizer"])
        enc = tok(texts, padding="longest", truncation=True, max_length=self.text["max_text_len"], return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def encode(self, images: list, texts: list[str]) -> np.ndarray:
        """Embed (PIL image, text) pairs; returns float32 ``[N, D]``, L2-normalised."""
        # exactly as training saw pixels: resized at load time only if data.image_size was set,
        # otherwise at native size and resized by the vision tower itself
        from PIL import Image

        size = self.text.get("image_size")
        arrays = []
        for img in images:
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            arrays.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        if len({a.shape for a in arrays}) > 1:  # one batch needs one size: let the tower resize each
            side = self.model.cfg.vision.image_size
            arrays = [np.asarray(Image.fromarray(a).resize((side, side), Image.BICUBIC)) for a in arrays]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(self.device)
        ids, mask = self.tokenize(texts)
        return self.model.encode(ids, mask, pixels=pixels).float().cpu().numpy()
