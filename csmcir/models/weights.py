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
  (../shared/ECOSYSTEM.md).
* ``hf_blip2``: a transformers ``Blip2ForImageTextRetrieval`` checkpoint folder (the layout of
  Salesforce/blip2-itm-vit-g): ``qformer.*``, ``embeddings.*`` -> ``text_embeddings.*``,
  ``query_tokens``, ``vision_projection`` -> ``proj``, and ``vision_model.*`` ->
  ``vision.model.*`` when the tower is ``blip2_vit`` (its sizes must match: EVA ViT-g is
  width 1408, 39 layers, 16 heads, patch 14, image 224, mlp ratio 4.3637).

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

__all__ = ["map_bert", "map_lavis", "map_hf_blip2", "load_pretrained", "read_state_dict"]

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


def map_lavis(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, unused = {}, []
    for k, v in sd.items():
        if k.startswith("Qformer.bert."):
            key = _bert_body(k[len("Qformer.bert."):])
        elif k == "query_tokens":
            key = "query_tokens"
        elif k.startswith("vision_proj."):
            key = "proj." + k.split(".", 1)[1]
        else:
            key = None
        if key is None:
            unused.append(k)
        else:
            out[key] = v
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
            out["vision.model." + k[len("vision_model."):]] = v
        else:
            unused.append(k)
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


# the tower keys a BERT source never provides (BLIP-2 initialises them randomly too)
_BERT_RANDOM = re.compile(r"^(query_tokens|proj\.|vision\.|qformer\.encoder\.layer\.\d+\.crossattention\.)")
_NOT_QFORMER = re.compile(r"^vision\.")  # the vision tower is loaded separately


def load_pretrained(model: torch.nn.Module, source: str, path: str, allow_partial: bool = False) -> dict[str, list[str]]:
    """Copy mapped weights into ``model`` (a :class:`CIRDualTower`); returns the report
    ``{"loaded", "missing", "unused"}``. See the module docstring for the rules."""
    mappers = {"bert": map_bert, "lavis": map_lavis, "hf_blip2": map_hf_blip2}
    if source not in mappers:
        raise CsmcirError(f"unknown weight source {source!r} (bert, lavis, hf_blip2)")
    mapped, unused = mappers[source](read_state_dict(source, path))
    own = model.state_dict()
    for k, v in mapped.items():
        if k not in own:
            unused.append(k)
        elif own[k].shape != v.shape:
            raise CsmcirError(f"{path}: {k} has shape {tuple(v.shape)} but the model's is {tuple(own[k].shape)} "
                              f"(set the Q-Former sizes to the checkpoint's)")
    loaded = sorted(k for k in mapped if k in own)
    expected_missing = _BERT_RANDOM if source == "bert" else _NOT_QFORMER
    missing = sorted(k for k in own if k not in mapped and not expected_missing.match(k))
    if missing and not allow_partial:
        raise CsmcirError(f"{path}: {len(missing)} Q-Former weights missing from the {source} checkpoint, first {missing[0]!r} "
                          f"(allow_partial loads the rest)")
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(mapped[k].to(own[k].dtype))
    return {"loaded": loaded, "missing": missing, "unused": sorted(set(unused))}
