"""Vision towers: pixels in, a sequence of image features out (``[B, N, width]``).

Every tower takes uint8 or float pixels ``[B, 3, H, W]`` and does its own normalisation, so data
can stay uint8 up to the device. The Q-Former cross-attends to the returned sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..errors import CsmcirError


class VisionTower(nn.Module):
    """Base class: normalises pixels, resizes to ``image_size``, returns ``[B, N, width]``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.width = cfg.width
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        x = pixels.float()
        if pixels.dtype == torch.uint8:
            x = x / 255.0
        size = self.cfg.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def inference_copy(self) -> VisionTower:
        """A tower giving the same features, for encoding many images without gradients (the
        feature cache). This base returns the tower itself; a tower with a faster frozen form
        (folded BatchNorm, another memory layout) returns that, leaving ``self`` untouched."""
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(self.preprocess(pixels))


class _ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.GroupNorm(8 if c % 8 == 0 else 1, c),
            nn.GELU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.GroupNorm(8 if c % 8 == 0 else 1, c),
        )

    def forward(self, x):
        return F.gelu(x + self.body(x))


class ConvTower(VisionTower):
    """A small residual CNN trained from scratch.

    Each stage halves the resolution (stride-2 conv) and adds ``blocks[i]`` residual blocks;
    the final grid (8x8 for 64-px input and three stages) is flattened into tokens with a
    learned 2-D position embedding, because scene positions ("left of", "top right") matter.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        layers: list[nn.Module] = []
        if len(cfg.blocks) != len(cfg.channels):
            raise CsmcirError(f"vision.blocks {cfg.blocks} needs one count per stage of vision.channels {cfg.channels}")
        c_in = 3
        for c, n_blocks in zip(cfg.channels, cfg.blocks):
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8 if c % 8 == 0 else 1, c), nn.GELU()]
            layers += [_ResBlock(c) for _ in range(n_blocks)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(c_in, cfg.width, 1)
        grid = cfg.image_size // 2 ** len(cfg.channels)
        if grid < 1:
            raise CsmcirError(f"vision.image_size {cfg.image_size} is too small for {len(cfg.channels)} stages")
        self.grid = grid
        self.pos = nn.Parameter(torch.randn(1, grid * grid, cfg.width) * 0.02)
        self.norm = nn.LayerNorm(cfg.width)

    def features(self, x):
        f = self.out(self.body(x))  # [B, W, g, g]
        f = f.flatten(2).transpose(1, 2)  # [B, g*g, W]
        return self.norm(f + self.pos)


def _vit_sizes(cfg: VisionConfig) -> dict:
    """The transformers ViT config arguments (Blip2VisionConfig, CLIPVisionConfig) for ``cfg``."""
    return dict(
        hidden_size=cfg.width,
        intermediate_size=int(round(cfg.width * cfg.mlp_ratio)),
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )


class Blip2ViTTower(VisionTower):
    """transformers' ``Blip2VisionModel`` (BLIP-2's EVA-ViT layout) built from the config sizes.

    Randomly initialised here; pretrained weights are loaded by the weight-source code.
    Returns the last hidden state (patch tokens and the class token), as BLIP-2 feeds its Q-Former.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        from transformers import Blip2VisionConfig, Blip2VisionModel

        self.model = Blip2VisionModel(Blip2VisionConfig(**_vit_sizes(cfg)))

    def features(self, x):
        return self.model(pixel_values=x).last_hidden_state


class ClipViTTower(VisionTower):
    """transformers' ``CLIPVisionModel`` (a CLIP ViT) built from the config sizes.

    Returns every token of the last layer (class token first) through CLIP's final LayerNorm
    (``post_layernorm``), the way BLIP-2 normalises its ViT's output (``ln_vision``) before the
    Q-Former. Pretrained weights come from an ``hf_clip`` folder (:mod:`csmcir.models.weights`).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.model = CLIPVisionModel(CLIPVisionConfig(**_vit_sizes(cfg)))

    def features(self, x):
        return self.model.post_layernorm(self.model(pixel_values=x).last_hidden_state)


class EfficientNetLite0Tower(VisionTower):
    """The ImageNet EfficientNet-Lite0 CNN (:mod:`csmcir.models.efficientnet`), cut at ``feature_stage``.

    Returns that stage's feature grid as tokens ``[B, H*W, C]`` (row-major; C = the stage's
    channels, which ``width`` must equal). Only the stages up to ``feature_stage`` are built.
    Randomly initialised here; the ``efficientnet`` init source loads the packaged ImageNet
    weights. While the tower is frozen (no parameter requires grad) its BatchNorm layers stay in
    eval mode, so training the Q-Former never updates or uses batch statistics.
    The network expects ``mean``/``std`` 127/255 and 128/255 (:data:`~csmcir.models.efficientnet.MEAN`).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        from .efficientnet import STAGES, EfficientNetLite0, parse_stages, stage_channels

        stage = cfg.feature_stage
        try:
            stages = parse_stages(stage)
        except CsmcirError:
            raise CsmcirError(
                f"unknown vision.feature_stage {stage!r} for efficientnet_lite0 (known: {', '.join(STAGES)}, or several "
                "joined by '+', e.g. mbconv5+mbconv7)"
            ) from None
        if cfg.width != stage_channels(stage):
            raise CsmcirError(
                f"vision.width {cfg.width} does not match efficientnet_lite0 stage {stage!r}: set vision.width {stage_channels(stage)}"
            )
        self.stage = stage
        self.net = EfficientNetLite0(last=max(stages, key=list(STAGES).index))

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.net.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.frozen:
            self.net.eval()
        return self

    @property
    def num_tokens(self) -> int:
        from .efficientnet import grid_side

        return grid_side(self.cfg.image_size, self.stage) ** 2

    def inference_copy(self) -> EfficientNetLite0Tower:
        """A copy with BatchNorm folded into the convs and channels-last layout (``EfficientNetLite0.fused``)."""
        import copy

        net, self.net = self.net, None  # do not deep-copy the weights twice
        try:
            tower = copy.deepcopy(self)
        finally:
            self.net = net
        tower.net = net.fused()
        return tower.eval()

    def features(self, x):
        if self.net.training and self.frozen:  # frozen after .train() was called
            self.net.eval()
        return self.net.forward_features(x, self.stage)


class GridAdapter(nn.Module):
    """Trained between a frozen CNN tower (or its cached features) and the Q-Former: a learned 2-D
    position embedding per grid cell, then LayerNorm.

    Cross-attention does not know where a key came from, so a CNN grid without positions leaves
    the Q-Former only padding artefacts to tell "left of" from "right of"; the trained conv tower
    adds its own position embedding for that reason, and BLIP-2 trains a LayerNorm (``ln_vision``)
    after its frozen ViT. Applied after the feature cache, so cached features stay the frozen
    tower's and the adapter trains with the Q-Former.

    Off by default (``vision.grid_adapter``): on the synthetic default (seed 0, 819 steps) it gave
    61.8 test R@1 and 38.5 held-out R@1 against the raw grid's 62.5 and 51.6. The frozen grid
    already carries position (TF "same" padding makes CNN features position-dependent); why the
    free per-cell embeddings hurt held-out combinations is not established (one seed;
    docs/benchmarks.md, section 15).
    """

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.pos.shape[1]:
            raise CsmcirError(f"image features have {x.shape[1]} tokens, the grid adapter was built for {self.pos.shape[1]}")
        return self.norm(x + self.pos.to(x.dtype))


_TOWERS = {"conv": ConvTower, "blip2_vit": Blip2ViTTower, "clip_vit": ClipViTTower, "efficientnet_lite0": EfficientNetLite0Tower}


def build_vision_tower(cfg: VisionConfig) -> VisionTower:
    try:
        return _TOWERS[cfg.kind](cfg)
    except KeyError:
        raise CsmcirError(f"unknown vision tower kind '{cfg.kind}' (known: {', '.join(_TOWERS)})") from None
