import pytest
import torch

from csmcir.config import get_model_config, list_models
from csmcir.errors import CsmcirError
from csmcir.factory import create_model
from csmcir.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny").eval()


def _text(texts):
    enc = load_tokenizer()(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_encode_shape_and_unit_norm(tiny):
    ids, mask = _text(["make the red circle blue", "remove the square", "a small green star"])
    pixels = torch.randint(0, 256, (3, 3, 40, 48), dtype=torch.uint8)  # any size: resized to 32
    emb = tiny.encode(ids, mask, pixels=pixels)
    assert emb.shape == (3, tiny.cfg.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_encode_depends_on_image_and_text(tiny):
    ids, mask = _text(["make the red circle blue", "make the red circle blue"])
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    other = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    e = tiny.encode(ids, mask, pixels=torch.cat([img, other]))
    assert not torch.allclose(e[0], e[1])
    ids2, mask2 = _text(["make the red circle blue", "remove the triangle now"])
    e2 = tiny.encode(ids2, mask2, pixels=torch.cat([img, img]))
    assert not torch.allclose(e2[0], e2[1])


def test_padding_does_not_change_embedding(tiny):
    ids, mask = _text(["add a circle"])
    ids_long, mask_long = _text(["add a circle", "a much longer text that forces padding of the first one"])
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    a = tiny.encode(ids, mask, pixels=img)
    b = tiny.encode(ids_long[:1], mask_long[:1], pixels=img)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_precomputed_image_features_equal_pixels_path(tiny):
    ids, mask = _text(["turn the square into a star"])
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    feats = tiny.encode_image(img)
    torch.testing.assert_close(tiny.encode(ids, mask, pixels=img), tiny.encode(ids, mask, image_features=feats))


def test_query_and_target_towers_share_one_parameter_set():
    torch.manual_seed(0)
    m = create_model("tiny")
    ids, mask = _text(["make it blue", "a blue circle at the top left"])
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    # one Q-Former, one vision tower, one projection
    assert sum(1 for mod in m.modules() if type(mod).__name__ == "Blip2QFormerModel") == 1
    # the query-side loss and the target-side loss reach exactly the same parameters
    m.encode_query(img[:1], ids[:1], mask[:1]).sum().backward()
    q_grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    m.zero_grad(set_to_none=True)
    m.encode_target(img[1:], ids[1:], mask[1:]).sum().backward()
    t_grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert q_grads and q_grads == t_grads
    # and it is the same function: a query encoded as a "target" gives the same embedding
    m.eval()
    torch.testing.assert_close(m.encode_query(img, ids, mask), m.encode_target(img, ids, mask))


def test_named_configs_and_overrides():
    assert {"tiny", "small", "base"} <= set(list_models())
    base = get_model_config("base")
    assert (base.qformer.num_layers, base.qformer.hidden_size, base.qformer.num_query_tokens, base.embed_dim) == (12, 768, 32, 256)
    assert base.qformer_config().encoder_hidden_size == base.vision.width == 1408
    cfg = get_model_config("tiny", {"qformer": {"num_layers": 1}})
    assert cfg.qformer.num_layers == 1 and cfg.qformer.hidden_size == 32
    with pytest.raises(CsmcirError, match="unknown model config 'nope'"):
        get_model_config("nope")
    with pytest.raises(CsmcirError, match="unknown fields"):
        get_model_config("tiny", {"qformer": {"num_layerz": 1}})


def test_blip2_vit_tower_kind_builds_and_runs():
    m = create_model("tiny", {"vision": {"kind": "blip2_vit", "image_size": 28, "patch_size": 14, "width": 32, "layers": 1, "heads": 2}})
    ids, mask = _text(["a red circle"])
    emb = m.encode(ids, mask, pixels=torch.randint(0, 256, (1, 3, 28, 28), dtype=torch.uint8))
    assert emb.shape == (1, 32)


def test_concat_pooling_keeps_which_query_token_holds_what():
    torch.manual_seed(0)
    model = create_model("tiny", overrides={"pooling": "concat_query"}).eval()
    n, h = model.num_query_tokens, model.qformer.config.hidden_size
    assert model.proj.in_features == n * h
    ids, mask = _text(["remove the square"])
    pixels = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    emb = model.encode(ids, mask, pixels=pixels)
    assert emb.shape == (1, model.cfg.embed_dim)
    # swapping two query tokens' outputs changes a concatenation, never a mean
    out = torch.randn(1, n, h)
    swapped = out[:, [1, 0, *range(2, n)]]
    assert not torch.allclose(model.proj(out.flatten(1)), model.proj(swapped.flatten(1)))
    with pytest.raises(ValueError, match="pooling 'max'"):
        create_model("tiny", overrides={"pooling": "max"})
