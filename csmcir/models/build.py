"""Building the network from its spec: named config, overrides, pretrained weights, freezing.

:class:`NetworkSpec` is what ``model.net`` holds in a LightningCLI config; :func:`build_network`
turns it into a plain :class:`CIRDualTower` (no Lightning), which :class:`~csmcir.lightning.CIRModule`
receives. Python users may build the tower themselves and pass it instead.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from ..config import ModelConfig, get_model_config
from ..errors import CsmcirError
from .dual_tower import CIRDualTower

__all__ = ["InitSource", "NetworkSpec", "build_network", "init_sources"]

log = logging.getLogger(__name__)


@dataclass
class InitSource:
    """One pretrained checkpoint to copy into the tower (:mod:`csmcir.models.weights`).

    Args:
        source: ``bert``, ``lavis``, ``hf_blip2``, ``hf_clip`` or ``efficientnet``.
        path: the checkpoint file or folder (``minilm``: the packaged all-MiniLM-L6-v2).
        allow_partial: load what maps even if some of the model's tensors stay missing.
    """

    source: str
    path: str
    allow_partial: bool = False


@dataclass
class NetworkSpec:
    """The network, as a config (``model.net`` in YAML).

    Args:
        model: a named model config (``tiny``, ``small``, ``base``; ``csmcir/model_configs``) or
            a JSON file.
        overrides: nested overrides of that config, e.g. ``{qformer: {num_layers: 4}}``.
        init: pretrained weights: ``{source, path, allow_partial}``, or a list of them merged in
            order (LAVIS's ``eva_vit_g.pth`` then ``blip2_pretrained.pth``; a CLIP tower then
            ``bert``). ``null`` (default): the weights the model config names (its ``init``:
            ``lite0_small`` the packaged ImageNet EfficientNet-Lite0; random for the others);
            ``[]``: random weights whatever the config names.
        freeze_vision: keep the vision tower fixed (``null``: frozen exactly when ``init`` loaded
            pretrained vision weights, as BLIP-2 trains its Q-Former).
        grad_checkpointing: recompute the Q-Former's activations in the backward pass (less
            memory, about a third more compute).
    """

    model: str = "small"
    overrides: dict[str, Any] | None = None
    init: dict[str, Any] | list[dict[str, Any]] | None = None
    freeze_vision: bool | None = None
    grad_checkpointing: bool = False

    def model_config(self) -> ModelConfig:
        """The named config, with the sizes the ``init`` checkpoints fix (a ``hf_blip2`` folder's
        ``config.json``: its vocabulary, widths, depths, query tokens; the EVA ViT's sizes when the
        tower is ``blip2_vit``) and then ``overrides``. An override that contradicts a size the
        checkpoint fixes is an error naming both."""
        from .weights import checkpoint_sizes

        base = get_model_config(self.model)
        overrides = self.overrides or {}
        kind = (overrides.get("vision") or {}).get("kind", base.vision.kind)
        fixed: dict[str, Any] = {}
        for s in init_sources(self.init_entries()):
            sizes = checkpoint_sizes(s.source, s.path)
            if kind != "blip2_vit":
                sizes.pop("vision", None)  # the ViT's sizes only bind a tower that takes its weights
            fixed = _merge(fixed, sizes)
        ours, theirs = _flat(overrides), _flat(fixed)
        clash = next((k for k in ours if k in theirs and ours[k] != theirs[k]), None)
        if clash is not None:
            raise CsmcirError(
                f"model.net.overrides sets {clash} = {ours[clash]!r}, but the init checkpoint's config fixes "
                f"{theirs[clash]!r}: drop the override (the sizes come from the checkpoint)"
            )
        return get_model_config(self.model, _merge(fixed, overrides) or None)

    def init_entries(self) -> dict | list | None:
        """``init``, or the model config's own when ``init`` is ``null``."""
        return get_model_config(self.model).init if self.init is None else self.init

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _merge(a: dict, b: dict) -> dict:
    """``b`` over ``a``, one level deep (model-config sections are dicts of fields)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in a.items()}
    for k, v in b.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flat(d: dict) -> dict:
    """``{"qformer": {"vocab_size": 1}, "embed_dim": 2}`` -> ``{"qformer.vocab_size": 1, "embed_dim": 2}``."""
    return {f"{k}.{kk}": vv for k, v in d.items() if isinstance(v, dict) for kk, vv in v.items()} | {
        k: v for k, v in d.items() if not isinstance(v, dict)
    }


def init_sources(init: dict | list | InitSource | None) -> list[InitSource]:
    """``model.net.init`` as a checked list of :class:`InitSource` (a one-line error otherwise)."""
    if not init:
        return []
    entries = init if isinstance(init, list) else [init]
    out = []
    for e in entries:
        if isinstance(e, InitSource):
            out.append(e)
            continue
        if not isinstance(e, dict) or set(e) - {"source", "path", "allow_partial"} or "source" not in e or "path" not in e:
            raise CsmcirError(f"model.net.init takes source, path and allow_partial (or a list of them), got {e!r}")
        out.append(InitSource(str(e["source"]), str(e["path"]), bool(e.get("allow_partial", False))))
    return out


def build_network(spec: NetworkSpec | None = None, info=None, **kwargs) -> CIRDualTower:
    """The dual tower of ``spec`` (or of ``NetworkSpec(**kwargs)``), pretrained weights loaded,
    the vision tower frozen as the spec says, activation checkpointing on if asked. ``info``
    receives the one-line weight-loading report (default: this module's logger)."""
    spec = NetworkSpec(**kwargs) if spec is None else spec
    info = info or log.info
    net = CIRDualTower(spec.model_config())
    loaded: list[str] = []
    sources = init_sources(spec.init_entries())
    if sources:
        from .weights import explain_unused, load_pretrained

        report = load_pretrained(net, [(s.source, s.path) for s in sources], allow_partial=any(s.allow_partial for s in sources))
        loaded = report["loaded"]
        unused = f"{len(report['unused'])} unused" + (f": {explain_unused(report['unused'])}" if report["unused"] else "")
        info(
            f"model.net.init: {len(loaded)} tensors from {', '.join(f'{s.source} {s.path}' for s in sources)}; "
            f"{len(report['missing'])} missing, {unused}"
        )
    pretrained_vision = any(k.startswith("vision.") for k in loaded)
    if spec.freeze_vision or (spec.freeze_vision is None and pretrained_vision):
        net.vision.requires_grad_(False)
        if pretrained_vision:  # checkpoints then record where the frozen tower comes from instead of storing it
            net.vision_source = [asdict(s) for s in sources]
    if spec.grad_checkpointing:
        qf = net.qformer
        if hasattr(qf, "activation_checkpointing_enable"):  # transformers >= 5
            qf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            qf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return net
