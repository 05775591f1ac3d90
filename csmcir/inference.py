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

from .config import ModelConfig, TextConfig
from .devices import resolve_device
from .errors import CsmcirError
from .models import CIRDualTower

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_KEY",
    "Encoder",
    "check_checkpoint_format",
    "file_digest",
    "read_checkpoint",
    "restore_frozen_vision",
    "resolve_device",
]

CHECKPOINT_KEY = "csmcir"
# 1: csmcir 0.1 (the module's hyper-parameters model/model_overrides/init/freeze_vision/
#    grad_checkpointing, the distillation head under distill_head.*); 2: the network spec under
#    net.*, the head under distill.head.* (tools/convert_checkpoint.py turns 1 into 2)
CHECKPOINT_FORMAT = 2


def check_checkpoint_format(ckpt: dict, path, resumable: bool = False) -> int:
    """The checkpoint's format number. A newer one than this csmcir knows is refused; with
    ``resumable`` (``--ckpt_path``: hyper-parameters and every state are read back) so is an older
    one, with the command that converts it. Inference reads format 1 as it is (same weights)."""
    meta = ckpt.get(CHECKPOINT_KEY) or {}
    fmt = meta.get("format", 1) if isinstance(meta, dict) else 1
    if not isinstance(fmt, int) or fmt > CHECKPOINT_FORMAT:
        raise CsmcirError(f"{path} has checkpoint format {fmt!r}, newer than this csmcir reads ({CHECKPOINT_FORMAT}): upgrade csmcir")
    if resumable and fmt < CHECKPOINT_FORMAT:
        raise CsmcirError(
            f"{path} was written by an older csmcir (checkpoint format {fmt}); convert it first: "
            f"python tools/convert_checkpoint.py {path} --out CONVERTED.ckpt"
        )
    return fmt


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
    check_checkpoint_format(ckpt, p)
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
    text: TextConfig
    device: torch.device
    checkpoint: str = ""
    # the frozen tower's cached features (csmcir.data.feature_cache.CachedFeatures), read instead
    # of running the vision tower on images the fit already encoded
    features: object | None = None
    # the compute dtype: float32, or bfloat16/float16 under autocast (weights stay float32)
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", dtype: str = "float32", feature_cache: str | None = "auto") -> Encoder:
        """The trained tower of ``path`` on ``device``, computing in ``dtype`` (``bfloat16``,
        ``float16``: autocast mixed precision, weights kept float32; ``auto``: bfloat16 on a GPU,
        float32 on a CPU; outputs are float32 either way). ``feature_cache``: a folder of frozen-tower
        features to read by image id (``auto``: the fit's ``model.feature_cache`` when it exists
        and holds this tower's features; ``None``: always run the vision tower)."""
        from .devices import resolve_dtype

        ckpt = read_checkpoint(path)
        meta = ckpt[CHECKPOINT_KEY]
        cfg = ModelConfig.from_dict(meta["model_config"])
        model = CIRDualTower(cfg)
        if meta.get("frozen_vision"):  # rebuilt from its recorded sources, checked by digest
            from .models.weights import load_pretrained

            sources = meta["frozen_vision"]["init"]
            try:
                load_pretrained(model, [(e["source"], e["path"]) for e in sources], allow_partial=True)
            except CsmcirError as e:
                where = ", ".join(f"{x['source']} {x['path']}" for x in sources)
                raise CsmcirError(f"{path} does not store its frozen vision tower; rebuilding it from {where} failed: {e}") from None
            restore_frozen_vision(ckpt, model, path, prefixes=("model.",))
        state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CsmcirError(f"{path}: weights do not match its model config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        dev = resolve_device(device)
        text = TextConfig.from_dict(meta.get("text"), cfg)
        features = _cached_features(ckpt, model, feature_cache)
        return cls(model.to(dev).eval(), text, dev, f"{path}@{file_digest(path)}", features, resolve_dtype(dtype, dev))

    def _autocast(self):
        """Mixed precision for ``dtype`` other than float32 (weights stay float32, as Lightning's
        ``bf16-mixed``); nothing for float32."""
        import contextlib

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.text.tokenize(texts)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode_ids(self, image_ids: list[str], texts: list[str], load_image, side: str | None = None) -> np.ndarray:
        """Embed (image id, text) pairs: cached features where the feature cache has the id,
        ``load_image(id)`` and the vision tower for the rest; float32 ``[N, D]``, L2-normalised.
        ``side``: ``"query"`` or ``"target"`` (:meth:`encode`)."""
        cached = [i in self.features for i in image_ids] if self.features is not None else [False] * len(image_ids)
        if not any(cached):
            return self.encode([load_image(i) for i in image_ids], texts, side=side)
        shape = self._feature_shape()
        feats = torch.empty((len(image_ids), *shape), dtype=self.model.proj.weight.dtype, device=self.device)
        hit = [k for k, c in enumerate(cached) if c]
        feats[hit] = self.features.get([image_ids[k] for k in hit], shape).to(self.device, feats.dtype)
        miss = [k for k, c in enumerate(cached) if not c]
        if miss:
            with self._autocast():
                feats[miss] = self._image_features(self._pixels([load_image(image_ids[k]) for k in miss])).to(feats.dtype)
        ids, mask = self.tokenize(texts)
        with self._autocast():
            return self.model.encode(ids, mask, image_features=feats, side=side).float().cpu().numpy()

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vision tower's features of ``pixels``, through its inference copy (folded BatchNorm,
        channels-last for EfficientNet-Lite0) in chunks of the feature cache's fill batch: on the
        2-core CPU the Lite0 tower encodes 49 images/s in one batch of 256 and over 300 this way
        (docs/efficientnet.md); the same features up to float rounding."""
        from .data.feature_cache import encode_in_chunks

        if getattr(self, "_fast_vision", None) is None:
            self._fast_vision = self.model.vision.inference_copy().eval()
        return encode_in_chunks(self._fast_vision, pixels).to(self.model.proj.weight.dtype)

    def _feature_shape(self) -> tuple[int, int]:
        if getattr(self, "_shape", None) is None:
            side = self.model.cfg.vision.image_size
            probe = torch.zeros(1, 3, side, side, dtype=torch.uint8, device=self.device)
            self._shape = tuple(self.model.encode_image(probe).shape[1:])
        return self._shape

    def _pixels(self, images: list) -> torch.Tensor:
        """uint8 ``[N, 3, S, S]`` exactly as training saw them: resized at load time only if the
        text settings name an image size, otherwise at native size (resized by the tower)."""
        from PIL import Image

        size = self.text.image_size
        arrays = []
        for img in images:
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            arrays.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        if len({a.shape for a in arrays}) > 1:  # one batch needs one size: let the tower resize each
            side = self.model.cfg.vision.image_size
            arrays = [np.asarray(Image.fromarray(a).resize((side, side), Image.BICUBIC)) for a in arrays]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(self.device)

    @torch.no_grad()
    def prompt_choices(self, images: list, texts: list[str], side: str = "query") -> list[list[int]]:
        """The intent pool's soft prompts each (image, text) pair chooses (``model.intent``), best
        first; empty lists for a model without a pool."""
        pixels = self._pixels(images)
        ids, mask = self.tokenize(texts)
        with self._autocast():
            feats = self._image_features(pixels)
            _, sel = self.model.encode(ids, mask, image_features=feats, side=side, return_selection=True)
        return [[] for _ in texts] if sel is None else sel.index.cpu().tolist()

    @torch.no_grad()
    def encode(self, images: list, texts: list[str], side: str | None = None) -> np.ndarray:
        """Embed (PIL image, text) pairs; returns float32 ``[N, D]``, L2-normalised. ``side``:
        ``"query"`` (reference image + modification text) or ``"target"`` (gallery image +
        caption); a checkpoint with intent prompts (``model.intent``) needs it, others ignore it."""
        pixels = self._pixels(images)
        ids, mask = self.tokenize(texts)
        with self._autocast():
            feats = self._image_features(pixels)
            return self.model.encode(ids, mask, image_features=feats, side=side).float().cpu().numpy()


_NET_KEYS = {
    "model": "model",
    "model_overrides": "overrides",
    "init": "init",
    "freeze_vision": "freeze_vision",
    "grad_checkpointing": "grad_checkpointing",
}


def convert_checkpoint(src: str | Path, dst: str | Path) -> dict:
    """Rewrite a format-1 checkpoint (csmcir 0.1) as format 2, so ``--ckpt_path`` resumes and
    tests it: the network's hyper-parameters move under ``net`` (``model`` -> ``net.model``,
    ``model_overrides`` -> ``net.overrides``, ``init``, ``freeze_vision``, ``grad_checkpointing``)
    and the distillation head's weights from ``distill_head.*`` to ``distill.head.*``. Weights,
    optimizer and loop states are kept as they are. Returns what changed."""
    from .io import atomic_path

    ckpt = read_checkpoint(src)
    fmt = check_checkpoint_format(ckpt, src)
    if fmt == CHECKPOINT_FORMAT:
        raise CsmcirError(f"{src} is already in checkpoint format {CHECKPOINT_FORMAT}: nothing to convert")
    hp = dict(ckpt.get("hyper_parameters") or {})
    net = {new: hp.pop(old) for old, new in _NET_KEYS.items() if old in hp}
    hp["net"] = net
    ckpt["hyper_parameters"] = hp
    renamed = [k for k in ckpt["state_dict"] if k.startswith("distill_head.")]
    ckpt["state_dict"] = {
        ("distill.head." + k[len("distill_head.") :] if k.startswith("distill_head.") else k): v for k, v in ckpt["state_dict"].items()
    }
    ckpt[CHECKPOINT_KEY] = {**ckpt[CHECKPOINT_KEY], "format": CHECKPOINT_FORMAT}
    with atomic_path(dst) as tmp:
        torch.save(ckpt, tmp)
    return {"from_format": fmt, "to_format": CHECKPOINT_FORMAT, "net": sorted(net), "renamed_tensors": len(renamed)}


def _cached_features(ckpt: dict, model: CIRDualTower, feature_cache: str | None):
    """The :class:`~csmcir.data.feature_cache.CachedFeatures` of this checkpoint's frozen tower,
    or ``None`` (a trained tower, no cache folder, or nothing cached for this tower)."""
    # (a fit with model.feature_cache had a frozen tower; the folder is keyed by the tower's weights)
    if feature_cache is None:
        return None
    from dataclasses import asdict

    from .data.feature_cache import CachedFeatures, resolve_cache_folder, tower_key

    if feature_cache == "auto":  # the fit's own setting, which may itself be "auto"
        frozen = bool((ckpt.get(CHECKPOINT_KEY) or {}).get("frozen_vision"))  # recorded for a frozen pretrained tower
        folder = resolve_cache_folder((ckpt.get("hyper_parameters") or {}).get("feature_cache"), frozen)
    else:
        folder = feature_cache
    if not folder or not Path(folder).is_dir():
        return None

    key = ((ckpt.get(CHECKPOINT_KEY) or {}).get("frozen_vision") or {}).get("digest") or tower_key(model.vision, asdict(model.cfg.vision))
    if not (Path(folder) / key).is_dir():
        return None
    found = CachedFeatures(Path(folder) / key)
    return found if len(found) else None


def restore_frozen_vision(ckpt: dict, model: CIRDualTower, path, prefixes=("model.",)) -> None:
    """Put a frozen vision tower that ``ckpt`` does not store (its ``frozen_vision`` record) back
    into its state dict, under each of ``prefixes``, from ``model.vision``, which was rebuilt from
    the recorded sources; a tower of other weights (another file at the recorded path) is refused
    naming both digests."""
    rec = (ckpt.get(CHECKPOINT_KEY) or {}).get("frozen_vision")
    if not rec:
        return
    from dataclasses import asdict

    from .data.feature_cache import tower_key

    where = ", ".join(f"{e['source']} {e['path']}" for e in rec["init"])
    digest = tower_key(model.vision, asdict(model.cfg.vision))
    if digest != rec["digest"]:
        raise CsmcirError(
            f"{path}: its frozen vision tower is not stored in it but rebuilt from {where}, and those weights "
            f"differ from the ones it was trained with (digest {digest} != {rec['digest']}): point model.net.init "
            "at the same files"
        )
    vision = model.vision.state_dict()
    for prefix in prefixes:
        ckpt["state_dict"].update({f"{prefix}vision.{k}": v for k, v in vision.items()})
