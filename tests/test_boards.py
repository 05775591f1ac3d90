"""The Fashion-MNIST board benchmark: real photos, determinism, instance identity in targets, hard
distractors, held-out edits, the photo split, errors, and a fit through the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from csmcir.cli import main
from csmcir.data.boards import CLASSES, HELDOUT_PAIRS, BoardParams, available, generate, load_photos, read_boards
from csmcir.data.boards.board import POSITIONS
from csmcir.data.custom import CustomCIR, read_triplets
from csmcir.errors import CsmcirError

pytestmark = pytest.mark.skipif(
    not available(), reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)"
)

SMALL = BoardParams(name="test-small", n_train=300, n_val=60, n_test=120, n_heldout=60)


@pytest.fixture(scope="module")
def boards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("boards") / "small"
    return generate(root, seed=0, difficulty=SMALL, progress=False)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _key(article: dict) -> tuple:
    return (article["cell"], article["class"], article["photo"], article["tint"])


def test_same_seed_same_bytes_other_seed_other_boards(boards, tmp_path):
    again = generate(tmp_path / "again", seed=0, difficulty=SMALL, progress=False)
    assert _digest(again) == _digest(boards)
    other = generate(tmp_path / "other", seed=1, difficulty=SMALL, progress=False)
    assert (other / "triplets.test.jsonl").read_bytes() != (boards / "triplets.test.jsonl").read_bytes()
    # reuse is only for the very benchmark asked for
    assert generate(boards, seed=0, difficulty=SMALL, progress=False) == boards
    with pytest.raises(CsmcirError, match="different Fashion-MNIST board benchmark"):
        generate(boards, seed=3, difficulty=SMALL, progress=False)


def test_counts_and_the_custom_format(boards):
    info = json.loads((boards / "benchmark.json").read_text())
    ds = CustomCIR(boards)
    for split in ("train", "val", "test", "heldout"):
        assert len(ds.triplets(split)) == info["splits"][split]["queries"] == getattr(SMALL, f"n_{split}")
        assert len(ds.gallery(split)) == info["splits"][split]["gallery"]
    assert len(list((boards / "images").iterdir())) == info["images"] == len(read_boards(boards))
    assert info["classes"] == list(CLASSES)


def test_train_boards_use_training_photos_and_val_test_disjoint_test_photos(boards):
    records = read_boards(boards)
    photos = {split: set() for split in ("train", "val", "test", "heldout")}
    for image_id, r in records.items():
        split = image_id.split("-")[0]
        assert r["part"] == ("train" if split == "train" else "t10k")
        photos[split] |= {a["photo"] for a in r["articles"]}
    assert not photos["val"] & (photos["test"] | photos["heldout"])
    # the board shows the real photo, at its own resolution, where boards.jsonl says
    t10k = load_photos("t10k")
    image_id, r = next((i, r) for i, r in records.items() if i.startswith("test-") and r["articles"][0]["tint"] == "grey")
    a = r["articles"][0]
    pixels = np.asarray(Image.open(boards / "images" / f"{image_id}.png").convert("L"), dtype=np.int16)
    row, col = divmod(a["cell"], 2)
    window = pixels[row * 32 : row * 32 + 32, col * 32 : col * 32 + 32]
    photo = t10k.images[a["photo"]].astype(np.int16)
    best = min(np.abs(window[y : y + 28, x : x + 28] - photo).max() for y in range(5) for x in range(5))
    assert best <= 1
    assert CLASSES[int(t10k.labels[a["photo"]])] == a["class"]


def test_targets_do_what_the_text_says_and_keep_every_untouched_photo(boards):
    records = read_boards(boards)
    seen = set()
    for split in ("train", "test", "heldout"):
        for t in read_triplets(boards / f"triplets.{split}.jsonl"):
            m = t.meta
            ref = {a["cell"]: a for a in records[t.reference]["articles"]}
            for target in t.targets:
                tgt = {a["cell"]: a for a in records[target]["articles"]}
                cell = POSITIONS.index(m["cell"])
                if m["type"] == "remove":
                    assert tgt == {c: a for c, a in ref.items() if c != cell}
                elif m["type"] in ("replace", "add"):
                    assert tgt[cell]["class"] == m["value"] and (m["tint"] is None or tgt[cell]["tint"] == m["tint"])
                    assert {c: a for c, a in tgt.items() if c != cell} == {c: a for c, a in ref.items() if c != cell}
                    if m["type"] == "replace":
                        assert ref[cell]["class"] != m["value"]
                    else:
                        assert cell not in ref
                elif m["type"] == "move":
                    dest = POSITIONS.index(m["value"])
                    assert dest not in ref and _key({**ref[cell], "cell": dest}) == _key(tgt[dest])
                    assert {c: a for c, a in tgt.items() if c != dest} == {c: a for c, a in ref.items() if c != cell}
                else:  # swap: the same photos, two cells exchanged
                    assert sorted(a["photo"] for a in tgt.values()) == sorted(a["photo"] for a in ref.values())
                    assert sum(_key(tgt[c]) != _key(ref[c]) for c in ref) == 2
                seen.add(m["type"])
            if m["free"]:  # the new photo is free: several correct targets, each another photo
                assert len(t.targets) >= 2
                cell = POSITIONS.index(m["cell"])
                assert (
                    len({records[x]["articles"][[a["cell"] for a in records[x]["articles"]].index(cell)]["photo"] for x in t.targets}) >= 2
                )
    assert seen == {"replace", "remove", "add", "move", "swap"}


def test_every_evaluation_query_brings_hard_distractors_into_its_gallery(boards):
    records = read_boards(boards)
    kinds = set()
    for split in ("val", "test", "heldout"):
        gallery = set(CustomCIR(boards).gallery(split))
        for t in read_triplets(boards / f"triplets.{split}.jsonl"):
            distractors = t.meta["distractors"]
            assert len(distractors) == SMALL.n_distractors and not t.negatives  # evaluation lists none to train on
            for image_id, kind in distractors:
                assert image_id in gallery and image_id not in t.targets and image_id != t.reference
                kinds.add(kind)
                if kind == "other_photo":  # the right edit, one untouched article another photo of its class
                    tgt = {a["cell"]: a for a in records[t.targets[0]]["articles"]}
                    dis = {a["cell"]: a for a in records[image_id]["articles"]}
                    kept = [c for c in tgt if not (t.meta["free"] and c == POSITIONS.index(t.meta["cell"]))]
                    assert set(dis) == set(tgt)
                    assert all((dis[c]["class"], dis[c]["tint"]) == (tgt[c]["class"], tgt[c]["tint"]) for c in kept)
                    assert sum(dis[c]["photo"] != tgt[c]["photo"] for c in kept) == 1
    assert kinds == {"other_class", "other_article", "other_cell", "other_photo", "random"}
    # training queries list their distractors as hard negatives instead
    train = read_triplets(boards / "triplets.train.jsonl")
    assert all(len(t.negatives) == SMALL.n_train_negatives for t in train)


def test_held_out_edits_only_in_the_heldout_split(boards):
    def pair(m):
        return (m["type"], m["value"]) if m["type"] in ("replace", "add", "move") else None

    for split in ("train", "val", "test"):
        assert not any(pair(t.meta) in HELDOUT_PAIRS for t in read_triplets(boards / f"triplets.{split}.jsonl"))
    heldout = read_triplets(boards / "triplets.heldout.jsonl")
    assert all(pair(t.meta) in HELDOUT_PAIRS and t.meta["heldout"] for t in heldout)


def test_captions_are_written_from_the_labels_at_every_level(boards):
    records = read_boards(boards)
    captions = [json.loads(line) for line in (boards / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == len(records)
    named = 0
    for c in captions:
        assert set(c["levels"]) == {"scene", "objects", "attributes", "relations"}
        classes = {a["class"] for a in records[c["image_id"]]["articles"]}
        named += any(k in c["final"] for k in classes)
    assert named / len(captions) > 0.9  # lossy, but mostly right


def test_missing_photos_name_the_debian_package(tmp_path, capsys):
    with pytest.raises(CsmcirError, match="dataset-fashion-mnist"):
        generate(tmp_path / "out", photos=tmp_path / "nowhere", difficulty="easy", progress=False)
    assert not (tmp_path / "out").exists()
    rc = main(["synth", "--source", "fashion", "--photos", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "apt-get install dataset-fashion-mnist" in err and len(err.strip().splitlines()) == 1


def test_a_fit_through_the_cli_generates_and_trains_on_the_boards(tmp_path):
    root = tmp_path / "fashion"
    args = [
        "fit",
        "--model.net.model",
        "tiny",
        "--data.root",
        str(root),
        "--data.synth_source",
        "fashion",
        "--data.synth_difficulty",
        "easy",
        "--data.batch_size",
        "16",
        "--trainer.fast_dev_run",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.enable_progress_bar",
        "false",
    ]
    assert main(args) == 0
    assert json.loads((root / "benchmark.json").read_text())["name"] == "csmcir-fashion-boards"


def test_error_analysis_says_which_distractor_kind_took_first_place(boards, tmp_path):
    import subprocess
    import sys

    triplets = read_triplets(boards / "triplets.test.jsonl")
    # an oracle ranking, except that every swap query puts its first distractor first
    rankings = {}
    fooled = {}
    for t in triplets:
        if t.meta["type"] == "swap":
            image_id, kind = t.meta["distractors"][0]
            rankings[t.id] = [image_id, *t.targets]
            fooled[kind] = fooled.get(kind, 0) + 1
        else:
            rankings[t.id] = list(t.targets)
    (tmp_path / "rank.json").write_text(json.dumps(rankings))
    tool = Path(__file__).resolve().parents[1] / "tools" / "error_analysis.py"
    cmd = [sys.executable, str(tool), "--root", str(boards), "--split", "test", "--rank", str(tmp_path / "rank.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    table = out.split("first place of the failed queries")[1].splitlines()
    kinds = table[1].split()[1:]
    swap = dict(zip(kinds, map(int, next(line for line in table if line.startswith("swap")).split()[1:])))
    assert {k: v for k, v in swap.items() if v} == fooled
    assert "replace" not in "\n".join(table)  # queries ranked right are not failures
