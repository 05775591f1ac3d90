"""The synthetic benchmark: determinism, ground truth, distractors, held-out pairs, captions, files.

The checks on queries re-derive the expected targets from ``scenes.jsonl`` and ``meta.mods`` with
an independent, deliberately simple interpreter, so they do not trust the generator's own logic.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from csmcir.data.custom import CustomCIR
from csmcir.data.synthetic import DIFFICULTIES, GENERATOR_VERSION, HELDOUT_PAIRS, caption_scene, ensure_benchmark, generate
from csmcir.data.synthetic.builder import _drawing, build_split, render_config
from csmcir.data.synthetic.render import render
from csmcir.data.synthetic.scene import BACKGROUND, COLOURS, PATTERNS, POSITIONS, SHAPES, SIZES, Obj, make_scene, sample_scene
from csmcir.errors import CsmcirError

EASY = DIFFICULTIES["easy"]
# Standard generation (compositions, relational references, 4 distractors) at a test-sized count.
SMALL_STANDARD = replace(DIFFICULTIES["standard"], name="standard-small", n_train=100, n_val=120, n_test=60, n_heldout=60)
# "easy" at about a tenth of the size, for the tests that generate several benchmarks.
REDUCED = replace(EASY, name="easy-reduced", n_train=250, n_val=50, n_test=50, n_heldout=30)
TINY = replace(EASY, name="easy-tiny", n_train=60, n_val=30, n_test=30, n_heldout=20)
RELATIONAL = re.compile(r"\bthe (shape|object) (left of|right of|above|below) the ")
MOD_TYPES = {"colour", "shape", "size", "pattern", "add", "remove", "move"}
WORD_ATTRIBUTE = {
    **{w: "shape" for w in SHAPES},
    **{w: "colour" for w in COLOURS},
    **{w: "size" for w in SIZES},
    **{w: "pattern" for w in PATTERNS},
}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def easy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("easy") / "bench"
    return generate(root, seed=0, difficulty="easy", workers=2, progress=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("std") / "bench"
    return generate(root, seed=3, difficulty=SMALL_STANDARD, progress=False)


def _scenes(root: Path) -> dict[str, dict[tuple[int, int], dict]]:
    """image id -> {(row, col): attributes}, straight from scenes.jsonl."""
    out = {}
    for line in (root / "scenes.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["image_id"]] = {tuple(o["cell"]): {k: o[k] for k in ("shape", "colour", "size", "pattern")} for o in record["objects"]}
    return out


def _key(scene: dict) -> frozenset:
    return frozenset((cell, tuple(sorted(a.items()))) for cell, a in scene.items())


def _edit_distance(a: frozenset, b: frozenset) -> int:
    """Objects in one scene and not the other, for two :func:`_key` sets: one object changed or
    moved counts 2, one added or removed counts 1."""
    return len(a ^ b)


def _satisfies(reference: dict, target: dict, mods: list[dict]) -> bool:
    """Does ``target`` follow from ``reference`` under ``mods``? (an independent interpreter)"""
    expected = {cell: dict(a) for cell, a in reference.items()}
    loose: dict[tuple[int, int], str] = {}  # cells whose object may differ in one free attribute
    for m in mods:
        cell = tuple(m["cell"])
        if m["type"] in ("colour", "shape", "size", "pattern"):
            if m["value"] is None:  # free colour change: any other colour
                if target.get(cell, {}).get("colour") == reference[cell]["colour"]:
                    return False
                loose[cell] = "colour"
            else:
                expected[cell][m["type"]] = m["value"]
        elif m["type"] == "remove":
            del expected[cell]
        elif m["type"] == "move":
            expected[divmod(POSITIONS.index(m["value"]), 3)] = expected.pop(cell)
        elif m["type"] == "add":
            said = {WORD_ATTRIBUTE[w]: w for w in m["value"].split()}
            if set(said) != {"shape", "colour", "size", "pattern"} - {m["free"]}:
                return False
            if cell in reference or cell not in target:
                return False
            expected[cell] = {**target[cell], **said}
        else:
            raise AssertionError(m)
    if set(expected) != set(target):
        return False
    for cell, attributes in expected.items():
        free = loose.get(cell)
        if {k: v for k, v in attributes.items() if k != free} != {k: v for k, v in target[cell].items() if k != free}:
            return False
    return True


# ----------------------------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def reduced_hashes(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("reduced") / "bench"
    return _hashes(generate(root, seed=0, difficulty=REDUCED, workers=1, progress=False))


def test_same_seed_is_byte_identical_whatever_the_workers(reduced_hashes, tmp_path):
    again = generate(tmp_path / "w2", seed=0, difficulty=REDUCED, workers=2, progress=False)
    assert _hashes(again) == reduced_hashes
    assert len(reduced_hashes) > 900


def test_different_seed_differs(reduced_hashes, tmp_path):
    a = reduced_hashes
    b = _hashes(generate(tmp_path / "b", seed=1, difficulty=REDUCED, progress=False))
    for name in ("triplets.train.jsonl", "triplets.val.jsonl", "captions.jsonl", "scenes.jsonl"):
        assert a[name] != b[name]
    images = [k for k in a.keys() & b.keys() if k.startswith("images/")]
    assert sum(a[k] != b[k] for k in images) > 0.9 * len(images)


# ----------------------------------------------------------------------------------- format, ids


def test_benchmark_json_and_ids_round_trip(easy):
    info = json.loads((easy / "benchmark.json").read_text())
    assert info["name"] == "csmcir-synthetic" and info["format_version"] == 1
    assert info["seed"] == 0 and info["difficulty"] == "easy"
    assert info["generator_version"] == GENERATOR_VERSION
    assert info["params"] == EASY.to_json()
    assert sorted(map(tuple, info["heldout_pairs"])) == sorted(HELDOUT_PAIRS)
    d = CustomCIR(easy)
    assert d.splits() == ["train", "val", "test", "heldout"]
    total = 0
    for split in d.splits():
        triplets = d.triplets(split)  # validates: every id has an image, targets in the gallery
        gallery = d.gallery(split)
        counts = info["splits"][split]
        assert counts == {"queries": len(triplets), "gallery": len(gallery)}
        assert counts["queries"] == getattr(EASY, f"n_{split}")
        assert all(t.id == f"{split}-{i:06d}" for i, t in enumerate(triplets))
        assert all(g.startswith(f"{split}-i") and len(g) == len(split) + 8 for g in gallery)
        referenced = {t.reference for t in triplets} | {x for t in triplets for x in t.targets}
        assert referenced <= set(gallery)
        total += len(gallery)
    assert info["images"] == total == len(list((easy / "images").iterdir()))
    img = d.load_image(d.gallery("test")[0])
    assert img.size == (64, 64) and img.mode == "RGB"


def test_train_gallery_is_references_targets_and_hard_negatives(easy):
    d = CustomCIR(easy)
    triplets = d.triplets("train")
    used = {t.reference for t in triplets} | {x for t in triplets for x in t.targets + t.negatives}
    assert used == set(d.gallery("train"))
    scenes = _scenes(easy)
    for t in triplets:
        assert len(t.negatives) == 1
        neg = scenes[t.negatives[0]]
        # a hard negative is a near miss: not a correct answer, not the reference itself
        assert all(neg != scenes[x] for x in t.targets) and neg != scenes[t.reference]


# ----------------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("bench", ["easy", "small"])
def test_every_target_follows_from_its_reference(bench, request):
    root = request.getfixturevalue(bench)
    scenes = _scenes(root)
    d = CustomCIR(root)
    for split in d.splits():
        by_key: dict[frozenset, list[str]] = {}
        for image_id in d.gallery(split):
            by_key.setdefault(_key(scenes[image_id]), []).append(image_id)
        for t in d.triplets(split):
            ref = scenes[t.reference]
            assert t.meta["n_objects"] == len(ref)
            for target in t.targets:
                assert _satisfies(ref, scenes[target], t.meta["mods"]), (t, target)
            # Every gallery image showing a target's scene is listed as a target (CIRCO-style).
            same = {i for x in t.targets for i in by_key[_key(scenes[x])]}
            assert same <= set(t.targets)


def test_meta_types_cover_every_modification_and_composition(small):
    d = CustomCIR(small)
    triplets = [t for s in ("train", "val", "test") for t in d.triplets(s)]
    # three-edit compositions are about 1 % of standard queries: add 2000 built (not rendered) ones
    triplets += build_split("train", 0, replace(DIFFICULTIES["standard"], n_train=2000)).triplets
    types = Counter(t.meta["type"] for t in triplets)
    assert set(types) == MOD_TYPES | {"compose2", "compose3"}
    for t in triplets:
        mods = t.meta["mods"]
        assert len(mods) == (int(t.meta["type"][-1]) if t.meta["type"].startswith("compose") else 1)
        assert len({tuple(m["cell"]) for m in mods}) == len(mods)  # distinct objects
    assert {m["type"] for t in triplets for m in t.meta["mods"]} == MOD_TYPES
    assert any(t.meta["relational"] for t in triplets)
    relational = [t.text for t in triplets if t.meta["relational"]]
    assert relational and all(RELATIONAL.search(text) for text in relational)
    assert not any(RELATIONAL.search(t.text) for t in triplets if not t.meta["relational"])
    # Several phrasings per type: single colour edits alone use at least 3 distinct verbs.
    colour_texts = {t.text.split()[0] for t in triplets if t.meta["type"] == "colour"}
    assert len(colour_texts) >= 3


def test_some_queries_have_several_targets(easy):
    scenes = _scenes(easy)
    d = CustomCIR(easy)
    several = [t for s in d.splits() for t in d.triplets(s) if t.meta["free"]]
    assert len(several) > 20
    for t in several:
        assert len(t.targets) >= 2
        assert len({_key(scenes[x]) for x in t.targets}) >= 2  # distinct values were rendered
    for t in d.triplets("val"):
        if not t.meta["free"]:
            assert len({_key(scenes[x]) for x in t.targets}) == 1


@pytest.mark.parametrize("bench, split", [("easy", "val"), ("small", "test"), ("small", "heldout")])
def test_hard_distractors(bench, split, request):
    root = request.getfixturevalue(bench)
    params = EASY if bench == "easy" else SMALL_STANDARD
    scenes = _scenes(root)
    keys = {i: _key(s) for i, s in scenes.items()}
    d = CustomCIR(root)
    gallery = d.gallery(split)
    for t in d.triplets(split):
        ref = keys[t.reference]
        target_keys = {keys[x] for x in t.targets}
        k = len(t.meta["mods"])
        near = [g for g in gallery if 0 < _edit_distance(ref, keys[g]) <= 2 * (k + 1) and g != t.reference and g not in t.targets]
        assert len(near) >= params.n_distractors, t
        # A non-target never shows a target's scene, and never satisfies the text.
        for g in near:
            assert keys[g] not in target_keys
            assert not _satisfies(scenes[t.reference], scenes[g], t.meta["mods"]), (t, g)


# --------------------------------------------------------------------------------- held-out pairs


def test_heldout_pairs(small, easy):
    for root in (small, easy):
        d = CustomCIR(root)
        for split in d.splits():
            for t in d.triplets(split):
                pairs = {(m["type"], m["value"]) for m in t.meta["mods"]}
                if split == "heldout":
                    assert pairs & HELDOUT_PAIRS and t.meta["heldout"], t
                else:
                    assert not pairs & HELDOUT_PAIRS and not t.meta["heldout"], t
        # Held-out values still appear in scenes of every split (only the edit is held out).
        objects = [o for line in (root / "scenes.jsonl").read_text().splitlines() for o in json.loads(line)["objects"]]
        assert any(o["colour"] == "purple" for o in objects)
        assert any(o["shape"] == "diamond" and o["pattern"] == "checkered" for o in objects)
    heldout_types = Counter(
        m["type"] for t in CustomCIR(small).triplets("heldout") for m in t.meta["mods"] if (m["type"], m["value"]) in HELDOUT_PAIRS
    )
    assert set(heldout_types) == {t for t, _ in HELDOUT_PAIRS}


# ---------------------------------------------------------------------------------------- captions


def test_every_gallery_image_has_a_caption(easy):
    d = CustomCIR(easy)
    captions = d.captions()
    gallery = [g for s in d.splits() for g in d.gallery(s)]
    assert set(captions) == set(gallery)
    for c in list(captions.values())[:200]:
        assert set(c.levels) == {"scene", "objects", "attributes", "relations"} and c.final


def _one_object_captions(n: int, **rates) -> list[tuple[Obj, str]]:
    params = replace(EASY, **rates)
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        scene = sample_scene(rng, 1)
        out.append((scene[0], caption_scene(scene, np.random.default_rng([7, i]), params).final))
    return out


def test_captioner_is_exact_or_empty_at_extreme_rates():
    exact = _one_object_captions(50, caption_omit_rate=0, caption_error_rate=0, caption_drop_object_rate=0)
    for obj, final in exact:
        where = "in the center" if obj.position == "center" else f"at the {obj.position}"
        article = "an" if obj.size[0] in "aeiou" else "a"
        assert final == f"{article} {obj.size} {obj.colour} {obj.pattern} {obj.shape} {where}"
    blind = _one_object_captions(20, caption_omit_rate=1, caption_error_rate=0, caption_drop_object_rate=0)
    assert {final for _, final in blind} == {"a shape"}
    dropped = _one_object_captions(20, caption_drop_object_rate=1)
    assert {final for _, final in dropped} == {"an empty light canvas"}
    wrong = _one_object_captions(50, caption_omit_rate=0, caption_error_rate=1, caption_drop_object_rate=0)
    for obj, final in wrong:
        words = final.split()
        assert obj.colour not in words and obj.shape not in words and obj.pattern not in words


def test_captioner_rates():
    params = DIFFICULTIES["standard"]
    samples = _one_object_captions(4000)
    dropped = sum(final == "an empty light canvas" for _, final in samples)
    kept = [(o, f.split()) for o, f in samples if f != "an empty light canvas"]
    colours = [[w for w in words if w in COLOURS] for _, words in kept]
    omitted = sum(not c for c in colours)
    wrong = sum(bool(c) and c[0] != o.colour for (o, _), c in zip(kept, colours))
    assert abs(dropped / len(samples) - params.caption_drop_object_rate) < 0.015
    assert abs(omitted / len(kept) - params.caption_omit_rate) < 0.025
    assert abs(wrong / len(kept) - params.caption_error_rate) < 0.015


def test_generated_captions_are_lossy_at_the_configured_rate(easy):
    scenes = _scenes(easy)
    captions = CustomCIR(easy).captions()
    single = [(s, captions[i].final.split()) for i, s in scenes.items() if len(s) == 1]
    assert len(single) > 1000
    shown = [w for s, words in single for w in words if w in COLOURS]
    truth = [next(iter(s.values()))["colour"] for s, _ in single]
    correct = sum(next(iter(s.values()))["colour"] in words for s, words in single)
    assert 0.7 < correct / len(truth) < 0.9  # 1 - omit - error - drop ~ 0.76
    assert len(shown) < len(truth)


# ---------------------------------------------------------------------------------------- rendering


def _nearest_colour(pixel) -> str:
    palette = {**COLOURS, "background": BACKGROUND}
    return min(palette, key=lambda n: sum((int(a) - b) ** 2 for a, b in zip(pixel, palette[n])))


def test_render_puts_the_colour_in_the_cell():
    cfg = render_config(EASY)
    scene = make_scene(
        [
            Obj(0, "circle", "red", "large", "solid"),
            Obj(4, "square", "blue", "small", "solid"),
            Obj(8, "triangle", "yellow", "large", "solid"),
            Obj(5, "diamond", "green", "large", "hollow"),
        ]
    )
    zero = replace(EASY, position_jitter=0, colour_jitter=0)
    image = render(cfg, _drawing(np.random.default_rng(0), scene, zero, cfg))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    for obj in scene:
        x, y = cfg.cell_centre(obj.cell)
        centre = _nearest_colour(image[y, x])
        assert centre == (obj.colour if obj.pattern == "solid" else "background")
    x, y = cfg.cell_centre(5)  # the hollow diamond's outline is green
    assert any(_nearest_colour(image[y, x + dx]) == "green" for dx in range(3, 9))
    for cell in (1, 2, 3, 6, 7):
        x, y = cfg.cell_centre(cell)
        assert tuple(image[y, x]) == BACKGROUND


def test_generated_images_show_their_scene(easy):
    cfg = render_config(EASY)
    scenes = _scenes(easy)
    d = CustomCIR(easy)
    checked = 0
    for image_id in d.gallery("val")[:300]:
        image = np.asarray(d.load_image(image_id))
        for (row, col), o in scenes[image_id].items():
            x, y = cfg.cell_centre(3 * row + col)
            if o["pattern"] == "solid" and o["size"] == "large":
                assert _nearest_colour(image[y, x]) == o["colour"]
                checked += 1
        for cell in set(range(9)) - {3 * r + c for r, c in scenes[image_id]}:
            x, y = cfg.cell_centre(cell)
            assert _nearest_colour(image[y, x]) == "background"
    assert checked > 30


# ------------------------------------------------------------------------------- folder handling


def test_second_generate_does_nothing(easy):
    before = {p: p.stat().st_mtime_ns for p in easy.iterdir()}
    start = time.perf_counter()
    assert generate(easy, seed=0, difficulty="easy", progress=False) == easy
    assert time.perf_counter() - start < 1.0
    assert {p: p.stat().st_mtime_ns for p in easy.iterdir()} == before


def test_other_benchmark_or_unrelated_folder_raises(easy, tmp_path):
    with pytest.raises(CsmcirError, match="seed=0.*asked seed=1"):
        generate(easy, seed=1, difficulty="easy", progress=False)
    with pytest.raises(CsmcirError, match="difficulty="):
        generate(easy, seed=0, difficulty="hard", progress=False)
    with pytest.raises(CsmcirError, match="other parameters"):
        generate(easy, seed=0, difficulty=replace(EASY, n_distractors=4), progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CsmcirError, match="not empty"):
        generate(other, seed=0, difficulty=TINY, progress=False)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    with pytest.raises(CsmcirError, match="unknown difficulty"):
        generate(tmp_path / "x", difficulty="extreme")


def test_failed_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import csmcir.data.synthetic.builder as builder

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(builder, "caption_split", boom)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "bench", seed=0, difficulty=TINY, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the benchmark nor its temporary folder


def test_ensure_benchmark(tmp_path):
    root = tmp_path / "bench"
    root.mkdir()  # an empty folder (a mount point, say) is filled in place
    assert ensure_benchmark(root, seed=0, difficulty=TINY, workers=1, progress=False) == root
    assert (root / "benchmark.json").is_file() and not list(tmp_path.glob(".*partial*"))
    mtime = (root / "benchmark.json").stat().st_mtime_ns
    ensure_benchmark(root, seed=0, difficulty=TINY, workers=1, progress=False)
    assert (root / "benchmark.json").stat().st_mtime_ns == mtime
    path = root / "triplets.val.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(CsmcirError, match="triplets.val.jsonl has 29 entries"):
        ensure_benchmark(root, seed=0, difficulty=TINY, workers=1, progress=False)
    with pytest.raises(CsmcirError, match="different synthetic benchmark"):
        ensure_benchmark(root, seed=2, difficulty=TINY, workers=1, progress=False)


def test_empty_mount_point_is_filled_in_place(tmp_path, monkeypatch):
    import csmcir.data.synthetic.builder as builder

    def no_rename(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    root = tmp_path / "mnt"
    root.mkdir()
    monkeypatch.setattr(builder.os, "rename", no_rename)
    generate(root, seed=0, difficulty=TINY, progress=False)
    monkeypatch.undo()
    assert CustomCIR(root).triplets("val") and (root / "benchmark.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]


def test_params_are_validated():
    with pytest.raises(CsmcirError, match="n_mods_probs"):
        replace(EASY, n_mods_probs=(0.5, 0.2, 0.2))
    with pytest.raises(CsmcirError, match="max_objects"):
        replace(EASY, max_objects=10)
    with pytest.raises(CsmcirError, match="mod_weights"):
        replace(EASY, mod_weights=(("teleport", 1.0),))
