"""Pretrained Q-Former weights by key mapping: BERT (MiniLM), LAVIS BLIP-2 and transformers BLIP-2 layouts."""

import pytest
import torch

from csmcir.config import get_model_config
from csmcir.errors import CsmcirError
from csmcir.models import CIRDualTower, NetworkSpec
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
            out["Qformer.bert." + k[len("qformer.") :].replace("attention.attention.", "attention.self.")] = v
        elif k.startswith("text_embeddings."):
            out["Qformer.bert.embeddings." + k[len("text_embeddings.") :]] = v
        elif k == "query_tokens":
            out[k] = v
        elif k.startswith("proj."):
            out["vision_proj." + k[len("proj.") :]] = v
    # what a real blip2_pretrained.pth holds beside them
    out.update(
        {
            "ln_vision.weight": torch.ones(8),
            "visual_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3),
            "temp": torch.tensor(0.07),
            "itm_head.weight": torch.zeros(2, 32),
            "text_proj.weight": torch.zeros(32, 32),
            "Qformer.cls.predictions.bias": torch.zeros(30522),
        }
    )
    return out


def test_lavis_checkpoint_gives_the_same_encoder(tmp_path):
    torch.manual_seed(0)
    src, dst = _tower(), _tower()
    torch.save({"model": _lavis_names(src.state_dict())}, tmp_path / "blip2_pretrained.pth")
    report = load_pretrained(dst, "lavis", str(tmp_path / "blip2_pretrained.pth"))
    # the EVA ViT keys map onto a blip2_vit tower; this tiny conv tower has no such keys, so they are unused
    assert (
        report["missing"] == [] and "vision.model.encoder.layers.0.self_attn.qkv.weight" in report["unused"] and "temp" in report["unused"]
    )
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
        "qformer.encoder.layer.1.crossattention.attention.key.bias"
    ]
    with pytest.raises(CsmcirError, match="has shape .* but the model's is"):
        load_pretrained(
            _tower(hidden_size=64, num_heads=4, intermediate_size=128), "lavis", str(tmp_path / "partial.pth"), allow_partial=True
        )


def test_transformers_blip2_retrieval_layout(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = _tower()
    sd = {
        (
            "embeddings." + k[len("text_embeddings.") :]
            if k.startswith("text_embeddings.")
            else "vision_projection." + k[len("proj.") :]
            if k.startswith("proj.")
            else k
        ): v.contiguous()
        for k, v in src.state_dict().items()
        if not k.startswith("vision.")
    }
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
    tower = CIRDualTower(
        get_model_config("tiny", {"qformer": {"hidden_size": 384, "num_heads": 12, "intermediate_size": 1536, "num_layers": 6}})
    )
    cross_before = tower.state_dict()["qformer.encoder.layer.3.crossattention.attention.query.weight"].clone()
    report = load_pretrained(tower, "bert", "minilm")
    sd = tower.state_dict()
    torch.testing.assert_close(
        sd["qformer.encoder.layer.3.attention.attention.query.weight"], bert["encoder.layer.3.attention.self.query.weight"]
    )
    torch.testing.assert_close(sd["qformer.encoder.layer.5.output_query.dense.weight"], bert["encoder.layer.5.output.dense.weight"])
    torch.testing.assert_close(sd["qformer.layernorm.weight"], bert["embeddings.LayerNorm.weight"])
    torch.testing.assert_close(sd["text_embeddings.word_embeddings.weight"], bert["embeddings.word_embeddings.weight"])
    assert torch.equal(sd["qformer.encoder.layer.3.crossattention.attention.query.weight"], cross_before)  # BLIP-2: random
    assert report["missing"] == [] and "pooler.dense.weight" in report["unused"]
    # a Q-Former deeper than the BERT model: its extra layers are missing, refused unless allowed
    deep = CIRDualTower(
        get_model_config("tiny", {"qformer": {"hidden_size": 384, "num_heads": 12, "intermediate_size": 1536, "num_layers": 8}})
    )
    with pytest.raises(CsmcirError, match="missing from the bert checkpoint, first 'qformer.encoder.layer.6"):
        load_pretrained(deep, "bert", "minilm")


def test_fit_config_takes_the_init_option(easy_bench, tmp_path):
    from csmcir.lightning.module import CIRModule

    m = CIRModule(
        net=NetworkSpec(
            model="tiny",
            overrides={"qformer": {"hidden_size": 384, "num_heads": 12, "intermediate_size": 1536, "num_layers": 2}},
            init={"source": "bert", "path": "minilm", "allow_partial": False},
        )
    )
    assert m.model.state_dict()["qformer.encoder.layer.0.attention.attention.query.weight"].abs().sum() > 0
    with pytest.raises(CsmcirError, match="checkpoint not found"):
        CIRModule(net=NetworkSpec(model="tiny", init={"source": "lavis", "path": str(tmp_path / "nope.pth")}))


def test_blip2_vision_tower_weights_load_and_freeze(tmp_path):
    from safetensors.torch import save_file

    from csmcir.lightning.module import CIRModule

    over = {"vision": {"kind": "blip2_vit", "image_size": 28, "patch_size": 14, "width": 32, "layers": 1, "heads": 2}}
    torch.manual_seed(2)
    src = CIRDualTower(get_model_config("tiny", over))
    sd = {}
    for k, v in src.state_dict().items():
        if k.startswith("vision.model."):
            sd["vision_model." + k[len("vision.model.") :]] = v.contiguous()
        elif k.startswith("text_embeddings."):
            sd["embeddings." + k[len("text_embeddings.") :]] = v.contiguous()
        elif k.startswith("proj."):
            sd["vision_projection." + k[len("proj.") :]] = v.contiguous()
        else:
            sd[k] = v.contiguous()
    (tmp_path / "b").mkdir()
    save_file(sd, str(tmp_path / "b" / "model.safetensors"))
    m = CIRModule(net=NetworkSpec(model="tiny", overrides=over, init={"source": "hf_blip2", "path": str(tmp_path / "b")}))
    px = torch.rand(1, 3, 28, 28)
    torch.testing.assert_close(m.model.encode_image(px), src.encode_image(px))
    assert not any(p.requires_grad for p in m.model.vision.parameters())  # pretrained vision: frozen by default
    assert all(p.requires_grad for p in m.model.qformer.parameters())
    m2 = CIRModule(
        net=NetworkSpec(model="tiny", overrides=over, init={"source": "hf_blip2", "path": str(tmp_path / "b")}, freeze_vision=False)
    )
    assert all(p.requires_grad for p in m2.model.vision.parameters())
    assert all(p.requires_grad for p in CIRModule(net=NetworkSpec(model="tiny")).model.vision.parameters())  # from scratch: trained


def test_a_saved_transformers_blip2_retrieval_model_gives_the_same_qformer_outputs(tmp_path):
    """A real (tiny, random) Blip2ForImageTextRetrieval, saved with save_pretrained, loads into
    csmcir and reproduces its own Q-Former on the same image and text."""
    import torch.nn.functional as F
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    torch.manual_seed(3)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
        qformer_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            cross_attention_frequency=1,
            use_qformer_text_input=True,
        ),
        num_query_tokens=4,
        image_text_hidden_size=32,
    )
    hf = Blip2ForImageTextRetrieval(cfg).eval()
    hf.save_pretrained(tmp_path / "blip2-itm")
    over = {"vision": {"kind": "blip2_vit", "image_size": 28, "patch_size": 14, "width": 32, "layers": 2, "heads": 2, "mlp_ratio": 2.0}}
    ours = CIRDualTower(get_model_config("tiny", over)).eval()
    report = load_pretrained(ours, "hf_blip2", str(tmp_path / "blip2-itm"))
    assert report["missing"] == [] and {"itm_head.weight", "text_projection.weight"} <= set(report["unused"])
    assert any(k.startswith("vision.model.encoder.layers.1.") for k in report["loaded"])
    px = torch.rand(2, 3, 28, 28)
    ids = torch.tensor([[101, 2417, 2000, 102], [101, 2417, 102, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        image = hf.vision_model(pixel_values=(px - ours.vision.mean) / ours.vision.std).last_hidden_state
        x = hf.embeddings(input_ids=ids, query_embeds=hf.query_tokens.expand(2, -1, -1))
        hidden = hf.qformer(
            query_embeds=x,
            query_length=4,
            attention_mask=torch.cat([torch.ones(2, 4, dtype=torch.long), mask], 1),
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long),
        ).last_hidden_state
        expected = F.normalize(hf.vision_projection(hidden[:, :4].mean(1)), dim=-1)
        assert (ours.encode_image(px) - image).abs().max() < 1e-5
        assert (ours.encode(ids, mask, pixels=px) - expected).abs().max() < 1e-5


def _lavis_eva_forward(sd, px, heads, eps=1e-6):
    """LAVIS's EVA ViT (eva_vit.py semantics) + ln_vision, written out from its state dict alone."""
    import torch.nn.functional as F

    x = F.conv2d(px, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=sd["patch_embed.proj.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["pos_embed"]
    d = x.shape[-1]
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        p = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (d,), p("norm1.weight"), p("norm1.bias"), eps)
        qkv = F.linear(h, p("attn.qkv.weight"), torch.cat([p("attn.q_bias"), torch.zeros(d), p("attn.v_bias")]))
        q, k, v = qkv.reshape(x.shape[0], x.shape[1], 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(x.shape), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (d,), p("norm2.weight"), p("norm2.bias"), eps)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    return F.layer_norm(x, (d,), sd["ln_vision.weight"], sd["ln_vision.bias"], eps)


def test_lavis_eva_vit_and_blip2_pretrained_load_together_into_a_blip2_vit_tower(tmp_path):
    """LAVIS keeps the frozen EVA ViT in eva_vit_g.pth (bare keys, separate q/v biases) and
    ln_vision + Q-Former in blip2_pretrained.pth; both map onto a blip2_vit tower."""
    torch.manual_seed(4)
    d, layers, heads = 32, 2, 2
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    eva = {
        "cls_token": r(1, 1, d),
        "pos_embed": r(1, 5, d),
        "patch_embed.proj.weight": r(d, 3, 14, 14),
        "patch_embed.proj.bias": r(d),
        "norm.weight": r(d),
        "head.weight": r(10, d),
    }  # EVA's own head and final norm: not used by BLIP-2
    for i in range(layers):
        eva.update(
            {
                f"blocks.{i}.norm1.weight": 1 + r(d),
                f"blocks.{i}.norm1.bias": r(d),
                f"blocks.{i}.norm2.weight": 1 + r(d),
                f"blocks.{i}.norm2.bias": r(d),
                f"blocks.{i}.attn.qkv.weight": r(3 * d, d),
                f"blocks.{i}.attn.q_bias": r(d),
                f"blocks.{i}.attn.v_bias": r(d),
                f"blocks.{i}.attn.proj.weight": r(d, d),
                f"blocks.{i}.attn.proj.bias": r(d),
                f"blocks.{i}.mlp.fc1.weight": r(2 * d, d),
                f"blocks.{i}.mlp.fc1.bias": r(2 * d),
                f"blocks.{i}.mlp.fc2.weight": r(d, 2 * d),
                f"blocks.{i}.mlp.fc2.bias": r(d),
            }
        )
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    over = {
        "vision": {"kind": "blip2_vit", "image_size": 28, "patch_size": 14, "width": d, "layers": layers, "heads": heads, "mlp_ratio": 2.0}
    }
    src = CIRDualTower(get_model_config("tiny", over)).eval()
    pre = _lavis_names({k: v for k, v in src.state_dict().items() if not k.startswith("vision.")})
    pre.pop("visual_encoder.blocks.0.attn.qkv.weight")  # LAVIS does not save the frozen ViT in blip2_pretrained.pth
    pre["ln_vision.weight"], pre["ln_vision.bias"] = 1 + r(d), r(d)
    torch.save({"model": pre}, tmp_path / "blip2_pretrained.pth")

    ours = CIRDualTower(get_model_config("tiny", over)).eval()
    with pytest.raises(CsmcirError, match="vision weights missing .* first 'vision.model.embeddings"):
        load_pretrained(ours, "lavis", str(tmp_path / "blip2_pretrained.pth"))  # ln_vision alone is a partial tower
    report = load_pretrained(ours, [("lavis", str(tmp_path / "eva_vit_g.pth")), ("lavis", str(tmp_path / "blip2_pretrained.pth"))])
    assert report["missing"] == [] and {"norm.weight", "head.weight", "temp"} <= set(report["unused"])
    px = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        expected = _lavis_eva_forward({**eva, **pre}, (px - ours.vision.mean) / ours.vision.std, heads)
        assert (ours.encode_image(px) - expected).abs().max() < 1e-5
        ids, mask = torch.tensor([[101, 2417, 102]]), torch.ones(1, 3, dtype=torch.long)
        src.load_state_dict({k: v for k, v in ours.state_dict().items() if k.startswith("vision.")}, strict=False)
        assert (ours.encode(ids, mask, pixels=px[:1]) - src.encode(ids, mask, pixels=px[:1])).abs().max() < 1e-5


def test_clip_vision_tower_loads_a_saved_clip_model_and_combines_with_bert(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from csmcir.lightning.module import CIRModule

    torch.manual_seed(6)
    clip = CLIPModel(
        CLIPConfig(
            vision_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
            ),
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        )
    ).eval()
    clip.save_pretrained(tmp_path / "clip")
    over = {"vision": {"kind": "clip_vit", "image_size": 28, "patch_size": 14, "width": 32, "layers": 2, "heads": 2, "mlp_ratio": 2.0}}
    ours = CIRDualTower(get_model_config("tiny", over)).eval()
    report = load_pretrained(ours, "hf_clip", str(tmp_path / "clip"))
    assert report["missing"] == [] and "logit_scale" in report["unused"]
    px = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        vm = clip.vision_model
        expected = vm.post_layernorm(vm(pixel_values=(px - ours.vision.mean) / ours.vision.std).last_hidden_state)
        assert (ours.encode_image(px) - expected).abs().max() < 1e-5
    # BLIP-2's recipe on a CLIP tower: CLIP vision weights + a BERT-initialised Q-Former, frozen tower
    qf = {"hidden_size": 384, "num_heads": 12, "intermediate_size": 1536, "num_layers": 1}
    m = CIRModule(
        net=NetworkSpec(
            model="tiny",
            overrides={**over, "qformer": qf},
            init=[{"source": "hf_clip", "path": str(tmp_path / "clip")}, {"source": "bert", "path": "minilm"}],
        )
    )
    assert not any(p.requires_grad for p in m.model.vision.parameters())
    torch.testing.assert_close(
        m.model.vision.model.state_dict()["encoder.layers.1.mlp.fc2.weight"],
        clip.vision_model.state_dict()["encoder.layers.1.mlp.fc2.weight"],
    )
    assert m.model.state_dict()["qformer.encoder.layer.0.attention.attention.query.weight"].shape == (384, 384)
    # a CLIPVisionModel folder (bare keys) loads the same tower
    from transformers import CLIPVisionModel

    CLIPVisionModel.from_pretrained(tmp_path / "clip").save_pretrained(tmp_path / "clip-vision")
    ours2 = CIRDualTower(get_model_config("tiny", over)).eval()
    assert load_pretrained(ours2, "hf_clip", str(tmp_path / "clip-vision"))["missing"] == []
    with torch.no_grad():
        assert (ours2.encode_image(px) - expected).abs().max() < 1e-5


def test_eva_files_the_tower_cannot_represent_are_refused_by_file_and_key(tmp_path):
    torch.save({"cls_token": torch.zeros(1, 1, 32), "blocks.0.gamma_1": torch.ones(32)}, tmp_path / "eva_layerscale.pth")
    with pytest.raises(CsmcirError, match=r"eva_layerscale.pth: EVA key blocks.0.gamma_1: layer-scale"):
        load_pretrained(_tower(), "lavis", str(tmp_path / "eva_layerscale.pth"))
    torch.save({"blocks.0.attn.q_bias": torch.ones(32)}, tmp_path / "eva_half.pth")
    with pytest.raises(CsmcirError, match=r"eva_half.pth: .*layers.0.self_attn.q_bias has no v_bias"):
        load_pretrained(_tower(), "lavis", str(tmp_path / "eva_half.pth"))


def _save_itm_checkpoint(folder, vocab_size=30523):
    """A tiny random Blip2ForImageTextRetrieval with the ITM checkpoints' vocabulary (BERT's 30522
    plus the decoder token), saved as the hub folder is laid out."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    torch.manual_seed(5)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
        qformer_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            cross_attention_frequency=1,
            use_qformer_text_input=True,
        ),
        num_query_tokens=3,
        image_text_hidden_size=24,
    )
    Blip2ForImageTextRetrieval(cfg).eval().save_pretrained(folder)


def test_hf_blip2_sizes_come_from_the_checkpoints_config(tmp_path):
    """The README's fit command names only the folder: vocabulary 30523, widths, depths, query
    tokens, projection and the ViT's sizes are read from its config.json, not set by hand."""
    from csmcir.models import build_network

    _save_itm_checkpoint(tmp_path / "itm")
    messages = []
    net = build_network(
        NetworkSpec(model="tiny", overrides={"vision": {"kind": "blip2_vit"}}, init={"source": "hf_blip2", "path": str(tmp_path / "itm")}),
        info=messages.append,
    )
    cfg = net.cfg
    assert cfg.qformer.vocab_size == 30523 and (cfg.qformer.hidden_size, cfg.qformer.num_query_tokens, cfg.embed_dim) == (32, 3, 24)
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.image_size, round(cfg.vision.width * cfg.vision.mlp_ratio)) == (48, 2, 28, 96)
    assert net.text_embeddings.word_embeddings.weight.shape == (30523, 32)
    # the leftovers are named with the reason they are not used
    assert "itm_head* (2: BLIP-2's image-text matching head" in messages[0] and "text_projection*" in messages[0]
    # an override that contradicts the checkpoint is refused naming both values
    with pytest.raises(CsmcirError, match=r"qformer.vocab_size = 30522, but the init checkpoint's config fixes 30523"):
        build_network(
            NetworkSpec(
                model="tiny",
                overrides={"vision": {"kind": "blip2_vit"}, "qformer": {"vocab_size": 30522}},
                init={"source": "hf_blip2", "path": str(tmp_path / "itm")},
            )
        )


def test_the_readme_blip2_command_shape_fits_a_checkpoint_of_other_sizes(easy_bench, tmp_path):
    """`csmcir fit ... --model.net.init.path FOLDER` on a checkpoint whose sizes differ from the
    named config (and a vocabulary of 30523) trains; the data follow the checkpoint's image size."""
    from csmcir.cli import main

    from .conftest import fit_args

    _save_itm_checkpoint(tmp_path / "itm")
    init = '{"source": "hf_blip2", "path": "%s"}' % (tmp_path / "itm")
    rc = main(
        fit_args(
            easy_bench,
            tmp_path / "run",
            "--model.net.overrides",
            '{"vision": {"kind": "blip2_vit"}}',
            "--model.net.init",
            init,
            "--trainer.fast_dev_run",
            "true",
        )
    )
    assert rc == 0


def test_a_frozen_pretrained_tower_is_not_stored_in_checkpoints_but_rebuilt(easy_bench, tmp_path, capsys):
    """LAVIS saves only what trains: a fit on a frozen hf_blip2 ViT writes checkpoints without
    model.vision.*, recording source and digest; ranking and resuming rebuild the tower from the
    source; a missing or changed source is refused in one line."""
    import json
    import shutil

    from csmcir.cli import main
    from csmcir.inference import Encoder

    from .conftest import fit_args

    _save_itm_checkpoint(tmp_path / "itm")
    init = '{"source": "hf_blip2", "path": "%s"}' % (tmp_path / "itm")
    run = tmp_path / "run"
    args = [
        "--model.net.overrides",
        '{"vision": {"kind": "blip2_vit"}}',
        "--model.net.init",
        init,
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "1",
    ]
    assert main(fit_args(easy_bench, run, *args)) == 0
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert not any(k.startswith("model.vision.") for k in ckpt["state_dict"])
    assert ckpt["csmcir"]["frozen_vision"]["init"][0]["source"] == "hf_blip2"
    # inference rebuilds the tower: the same embeddings as the model that trained
    enc = Encoder.from_checkpoint(run / "last.ckpt", "cpu")
    ref = CIRDualTower(enc.model.cfg)
    load_pretrained(ref, "hf_blip2", str(tmp_path / "itm"), allow_partial=True)
    torch.testing.assert_close(enc.model.vision.state_dict(), ref.vision.state_dict())
    assert (
        main(
            [
                "rank",
                "--ckpt",
                str(run / "last.ckpt"),
                "--root",
                str(easy_bench),
                "--split",
                "val",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    # resuming rebuilds it too
    assert (
        main(fit_args(easy_bench, run, *args[:-4], "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--ckpt_path", "last"))
        == 0
    )
    # a missing source, and other weights at the recorded path, are refused naming the checkpoint
    shutil.move(tmp_path / "itm", tmp_path / "moved")
    capsys.readouterr()
    out = ["rank", "--ckpt", str(run / "last.ckpt"), "--root", str(easy_bench), "--split", "val", "--out", str(tmp_path / "r2.json")]
    assert main(out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not store its frozen vision tower" in err[0] and str(run / "last.ckpt") in err[0]
    _save_itm_checkpoint(tmp_path / "itm")  # the same file again, then one ViT tensor changed
    cfg_file = tmp_path / "itm" / "config.json"
    sd_path = next((tmp_path / "itm").glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    sd = load_file(sd_path)
    k = next(k for k in sd if k.startswith("vision_model.") and sd[k].is_floating_point())
    sd[k] = sd[k] + 1
    save_file(sd, sd_path, metadata={"format": "pt"})
    assert json.loads(cfg_file.read_text())
    capsys.readouterr()
    assert main(out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ from the ones it was trained with" in err[0]
