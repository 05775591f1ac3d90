"""Pretrained Q-Former weights by key mapping: BERT (MiniLM), LAVIS BLIP-2 and transformers BLIP-2 layouts."""

import pytest
import torch

from csmcir.config import get_model_config
from csmcir.errors import CsmcirError
from csmcir.models import CIRDualTower
from csmcir.models.weights import load_pretrained


def _tower(**q):
    return CIRDualTower(get_model_config("tiny", {"qformer": q} if q else None))


def _lavis_names(sd):
    """Our tower's Q-Former keys in LAVIS BLIP-2's naming (written out independently of the loader)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("qformer.layernorm."):
            out["Qformer.bert.embeddings.LayerNorm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("qformer.encoder."):
            out["Qformer.bert." + k[len("qformer."):].replace("attention.attention.", "attention.self.")] = v
        elif k.startswith("text_embeddings."):
            out["Qformer.bert.embeddings." + k[len("text_embeddings."):]] = v
        elif k == "query_tokens":
            out[k] = v
        elif k.startswith("proj."):
            out["vision_proj." + k[len("proj."):]] = v
    # what a real blip2_pretrained.pth holds beside them
    out.update({"ln_vision.weight": torch.ones(8), "visual_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3), "temp": torch.tensor(0.07),
                "itm_head.weight": torch.zeros(2, 32), "text_proj.weight": torch.zeros(32, 32),
                "Qformer.cls.predictions.bias": torch.zeros(30522)})
    return out


def test_lavis_checkpoint_gives_the_same_encoder(tmp_path):
    torch.manual_seed(0)
    src, dst = _tower(), _tower()
    torch.save({"model": _lavis_names(src.state_dict())}, tmp_path / "blip2_pretrained.pth")
    report = load_pretrained(dst, "lavis", str(tmp_path / "blip2_pretrained.pth"))
    assert report["missing"] == [] and "visual_encoder.blocks.0.attn.qkv.weight" in report["unused"] and "temp" in report["unused"]
    ids, mask = torch.tensor([[101, 2417, 102]]), torch.ones(1, 3, dtype=torch.long)
    feats = torch.randn(1, 16, src.cfg.vision.width)
    dst.vision.load_state_dict(src.vision.state_dict())
    torch.testing.assert_close(dst.encode(ids, mask, image_features=feats), src.encode(ids, mask, image_features=feats))


def test_partial_and_mismatched_checkpoints_are_refused_by_name(tmp_path):
    torch.manual_seed(0)
    sd = _lavis_names(_tower().state_dict())
    del sd["Qformer.bert.encoder.layer.1.crossattention.self.key.bias"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(CsmcirError, match="1 Q-Former weights missing .* 'qformer.encoder.layer.1.crossattention.attention.key.bias'"):
        load_pretrained(_tower(), "lavis", str(tmp_path / "partial.pth"))
    assert load_pretrained(_tower(), "lavis", str(tmp_path / "partial.pth"), allow_partial=True)["missing"] == [
        "qformer.encoder.layer.1.crossattention.attention.key.bias"]
    with pytest.raises(CsmcirError, match="has shape .* but the model's is"):
        load_pretrained(_tower(hidden_size=64, num_heads=4, intermediate_size=128), "lavis", str(tmp_path / "partial.pth"), allow_partial=True)


def test_transformers_blip2_retrieval_layout(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = _tower()
    sd = {("embeddings." + k[len("text_embeddings."):] if k.startswith("text_embeddings.") else
           "vision_projection." + k[len("proj."):] if k.startswith("proj.") else k): v.contiguous()
          for k, v in src.state_dict().items() if not k.startswith("vision.")}
    sd["vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
    sd["text_projection.weight"] = torch.zeros(32, 32)
    (tmp_path / "blip2").mkdir()
    save_file(sd, str(tmp_path / "blip2" / "model.safetensors"))
    dst = _tower()
    report = load_pretrained(dst, "hf_blip2", str(tmp_path / "blip2"))
    assert report["missing"] == [] and "text_projection.weight" in report["unused"]
    for k, v in src.state_dict().items():
        if not k.startswith("vision."):
            torch.testing.assert_close(dst.state_dict()[k], v)


def test_packaged_minilm_initialises_self_attention_and_both_feed_forwards():
    from transformers import AutoModel

    from csmcir.tokenizer import minilm_path

    bert = AutoModel.from_pretrained(minilm_path(), local_files_only=True).state_dict()
    tower = CIRDualTower(get_model_config("tiny", {"qformer": {"hidden_size": 384, "num_heads": 12, "intermediate_size": 1536,
                                                                "num_layers": 6}}))
    cross_before = tower.state_dict()["qformer.encoder.layer.3.crossattention.attention.query.weight"].clone()
    report = load_pretrained(tower, "bert", "minilm")
    sd = tower.state_dict()
    torch.testing.assert_close(sd["qformer.encoder.layer.3.attention.attention.query.weight"], bert["encoder.layer.3.attention.self.query.weight"])
    torch.testing.assert_close(sd["qformer.encoder.layer.5.output_query.dense.weight"], bert["encoder.layer.5.output.dense.weight"])
    torch.testing.assert_close(sd["qformer.layernorm.weight"], bert["embeddings.LayerNorm.weight"])
    torch.testing.assert_close(sd["text_embeddings.word_embeddings.weight"], bert["embeddings.word_embeddings.weight"])
    assert torch.equal(sd["qformer.encoder.layer.3.crossattention.attention.query.weight"], cross_before)  # BLIP-2: random
    assert report["missing"] == [] and "pooler.dense.weight" in report["unused"]
    # a Q-Former deeper than the BERT model: its extra layers are missing, refused unless allowed
    deep = CIRDualTower(get_model_config("tiny", {"qformer": {"hidden_size": 384, "num_heads": 12, "intermediate_size": 1536, "num_layers": 8}}))
    with pytest.raises(CsmcirError, match="missing from the bert checkpoint, first 'qformer.encoder.layer.6"):
        load_pretrained(deep, "bert", "minilm")


def test_fit_config_takes_the_init_option(easy_bench, tmp_path):
    from csmcir.lightning.module import CIRModule

    m = CIRModule(model="tiny", model_overrides={"qformer": {"hidden_size": 384, "num_heads": 12, "intermediate_size": 1536, "num_layers": 2}},
                  init={"source": "bert", "path": "minilm", "allow_partial": False})
    assert m.model.state_dict()["qformer.encoder.layer.0.attention.attention.query.weight"].abs().sum() > 0
    with pytest.raises(CsmcirError, match="checkpoint not found"):
        CIRModule(model="tiny", init={"source": "lavis", "path": str(tmp_path / "nope.pth")})


def test_blip2_vision_tower_weights_load_and_freeze(tmp_path):
    from safetensors.torch import save_file

    from csmcir.lightning.module import CIRModule

    over = {"vision": {"kind": "blip2_vit", "image_size": 28, "patch_size": 14, "width": 32, "layers": 1, "heads": 2}}
    torch.manual_seed(2)
    src = CIRDualTower(get_model_config("tiny", over))
    sd = {}
    for k, v in src.state_dict().items():
        if k.startswith("vision.model."):
            sd["vision_model." + k[len("vision.model."):]] = v.contiguous()
        elif k.startswith("text_embeddings."):
            sd["embeddings." + k[len("text_embeddings."):]] = v.contiguous()
        elif k.startswith("proj."):
            sd["vision_projection." + k[len("proj."):]] = v.contiguous()
        else:
            sd[k] = v.contiguous()
    (tmp_path / "b").mkdir()
    save_file(sd, str(tmp_path / "b" / "model.safetensors"))
    m = CIRModule(model="tiny", model_overrides=over, init={"source": "hf_blip2", "path": str(tmp_path / "b")})
    px = torch.rand(1, 3, 28, 28)
    torch.testing.assert_close(m.model.encode_image(px), src.encode_image(px))
    assert not any(p.requires_grad for p in m.model.vision.parameters())  # pretrained vision: frozen by default
    assert all(p.requires_grad for p in m.model.qformer.parameters())
    m2 = CIRModule(model="tiny", model_overrides=over, init={"source": "hf_blip2", "path": str(tmp_path / "b")}, freeze_vision=False)
    assert all(p.requires_grad for p in m2.model.vision.parameters())
    assert all(p.requires_grad for p in CIRModule(model="tiny").model.vision.parameters())  # from scratch: trained
