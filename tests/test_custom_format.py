"""The custom CIR folder format: round trips, and one clear error per kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from csmcir.data.custom import (
    Caption,
    CustomCIR,
    Triplet,
    read_captions,
    read_gallery,
    read_triplets,
    write_captions,
    write_gallery,
    write_triplets,
)
from csmcir.errors import CsmcirError

COLOURS = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255), "d": (255, 255, 0)}


def _make_dataset(root: Path) -> Path:
    """A valid two-split dataset with four images, in several formats."""
    (root / "images").mkdir(parents=True)
    for i, (name, rgb) in enumerate(COLOURS.items()):
        ext = ("png", "jpg", "webp", "PNG")[i]
        Image.new("RGB", (8, 8), rgb).save(root / "images" / f"{name}.{ext}")
    (root / "gallery.val.txt").write_text("a\nb\n\nc\n")
    (root / "gallery.train.txt").write_text("a\nb\nc\nd\n")
    lines = [
        {"id": "q1", "reference": "a", "text": "make it green", "targets": ["b"]},
        {"id": "q2", "reference": "b", "text": "make it blue", "targets": ["c", "b"], "meta": {"k": 1}},
    ]
    (root / "triplets.val.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")
    (root / "triplets.train.jsonl").write_text(json.dumps(lines[0]) + "\n")
    caps = [
        {"image_id": "a", "levels": {"scene": "red", "objects": "x"}, "final": "a red square"},
        {"image_id": "b", "final": "a green square"},
    ]
    (root / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in caps))
    return root


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    return _make_dataset(tmp_path / "DIR")


def _error(fn, *args) -> str:
    with pytest.raises(CsmcirError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, "user errors must be one line"
    return message


def _set_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------ good input


def test_valid_dataset_reads(ds: Path):
    d = CustomCIR(ds)
    assert d.splits() == ["train", "val"]
    val = d.triplets("val")
    assert [t.id for t in val] == ["q1", "q2"]
    assert val[1].targets == ("c", "b") and val[1].meta == {"k": 1} and val[0].meta == {}
    assert d.gallery("val") == ["a", "b", "c"]
    caps = d.captions()
    assert caps["a"].levels == {"scene": "red", "objects": "x"} and caps["b"].levels == {}
    assert d.image_path("d").name == "d.PNG"  # extensions match case-insensitively
    img = d.load_image("c")
    assert img.mode == "RGB" and img.size == (8, 8)
    assert img.getpixel((4, 4))[2] > 200  # the blue webp, decoded
    assert d.triplets("val") is not val  # a fresh list each time, from the cache
    d.validate("train")


def test_round_trip(tmp_path: Path):
    triplets = [Triplet("q1", "a", "make it red", ("b", "c"), {"type": "colour"}), Triplet("q2", "b", "ünïcode text", ("a",))]
    write_triplets(tmp_path / "t.jsonl", triplets)
    back = read_triplets(tmp_path / "t.jsonl")
    assert back == triplets and back[0].meta == {"type": "colour"}
    write_gallery(tmp_path / "g.txt", ["a", "b", "c"])
    assert read_gallery(tmp_path / "g.txt") == ["a", "b", "c"]
    caps = [Caption("a", {"scene": "s", "objects": "o"}, "final a"), Caption("b", {}, "final b")]
    write_captions(tmp_path / "c.jsonl", caps)
    assert read_captions(tmp_path / "c.jsonl") == {c.image_id: c for c in caps}
    write_captions(tmp_path / "c2.jsonl", read_captions(tmp_path / "c.jsonl"))
    assert (tmp_path / "c2.jsonl").read_bytes() == (tmp_path / "c.jsonl").read_bytes()


def test_writers_refuse_what_readers_refuse(tmp_path: Path):
    assert "non-empty one-line" in _error(write_gallery, tmp_path / "g.txt", ["a", "b\nc"])
    assert "no targets" in _error(write_triplets, tmp_path / "t.jsonl", [Triplet("q", "a", "t", ())])
    assert not (tmp_path / "t.jsonl").exists()  # nothing half-written is left behind


# ------------------------------------------------------------------------------------- bad input


def test_missing_root_or_images(tmp_path: Path):
    assert "nope" in _error(CustomCIR, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "images" in _error(CustomCIR, tmp_path / "empty")


def test_malformed_json(ds: Path):
    path = ds / "triplets.val.jsonl"
    _set_line(path, 2, '{"id": "q2" "reference": "b"}')
    msg = _error(CustomCIR(ds).triplets, "val")
    assert msg == f"{path}:2: malformed JSON (Expecting ',' delimiter)"


def test_line_that_is_not_an_object(ds: Path):
    path = ds / "triplets.val.jsonl"
    _set_line(path, 1, '["q1", "a"]')
    assert _error(read_triplets, path) == f"{path}:1: expected a JSON object, got list"


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("targets", [], "field 'targets' must be a non-empty list of strings"),
        ("targets", "b", "field 'targets' must be a non-empty list of strings"),
        ("targets", ["b", 3], "field 'targets' must be a non-empty list of strings"),
        ("targets", None, "field 'targets' must be a non-empty list of strings"),
        ("reference", 7, "field 'reference' must be a non-empty string"),
        ("reference", None, "field 'reference' must be a non-empty string"),
        ("text", ["x"], "field 'text' must be a string"),
        ("meta", "x", "field 'meta' must be a JSON object"),
    ],
)
def test_ill_typed_triplet_field(ds: Path, field, value, expected):
    path = ds / "triplets.val.jsonl"
    record = {"id": "q12", "reference": "a", "text": "t", "targets": ["b"]}
    if value is None:
        del record[field]
    else:
        record[field] = value
    _set_line(path, 2, json.dumps(record))
    assert _error(CustomCIR(ds).triplets, "val") == f"{path}:2 (id 'q12'): {expected}"


def test_non_string_id_is_rejected_not_coerced(ds: Path):
    path = ds / "triplets.val.jsonl"
    _set_line(path, 1, json.dumps({"id": 12, "reference": "a", "text": "t", "targets": ["b"]}))
    assert _error(read_triplets, path) == f"{path}:1: field 'id' must be a non-empty string"


def test_duplicate_query_id(ds: Path):
    path = ds / "triplets.val.jsonl"
    _set_line(path, 2, json.dumps({"id": "q1", "reference": "b", "text": "t", "targets": ["c"]}))
    msg = _error(read_triplets, path)
    assert msg == f"{path}:2 (id 'q1'): duplicate query id (first on line 1)"


def test_target_listed_twice(ds: Path):
    path = ds / "triplets.val.jsonl"
    _set_line(path, 1, json.dumps({"id": "q1", "reference": "a", "text": "t", "targets": ["b", "b"]}))
    assert _error(read_triplets, path) == f"{path}:1 (id 'q1'): target 'b' is listed twice"


def test_duplicate_caption_image_id(ds: Path):
    path = ds / "captions.jsonl"
    with path.open("a") as f:
        f.write(json.dumps({"image_id": "a", "final": "again"}) + "\n")
    msg = _error(CustomCIR(ds).captions)
    assert msg == f"{path}:3 (id 'a'): duplicate caption image_id (first on line 1)"


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"image_id": "c"}, "(id 'c'): field 'final' must be a non-empty string"),
        ({"image_id": "c", "final": ""}, "(id 'c'): field 'final' must be a non-empty string"),
        ({"image_id": "c", "final": "x", "levels": {"a": 1}}, "(id 'c'): field 'levels' must be"),
        ({"image_id": 5, "final": "x"}, ": field 'image_id' must be a non-empty string"),
    ],
)
def test_bad_caption_line(ds: Path, record, expected):
    path = ds / "captions.jsonl"
    _set_line(path, 2, json.dumps(record))
    msg = _error(read_captions, path)
    assert msg.startswith(f"{path}:2") and expected in msg


def test_duplicate_gallery_id(ds: Path):
    path = ds / "gallery.val.txt"
    path.write_text("a\nb\n\n a \n")
    assert _error(read_gallery, path) == f"{path}:4 (id 'a'): duplicate image id (first on line 1)"


def test_unknown_target(ds: Path):
    path = ds / "triplets.val.jsonl"
    _set_line(path, 2, json.dumps({"id": "q12", "reference": "a", "text": "t", "targets": ["d"]}))
    msg = _error(CustomCIR(ds).triplets, "val")
    assert msg == f"{path}:2 (id 'q12'): target 'd' is not in {ds / 'gallery.val.txt'}"


def test_missing_image(ds: Path):
    path = ds / "triplets.val.jsonl"
    _set_line(path, 2, json.dumps({"id": "q12", "reference": "img9", "text": "t", "targets": ["b"]}))
    msg = _error(CustomCIR(ds).validate, "val")
    assert msg == f"image 'img9' not found in {ds / 'images'} (query 'q12', {path}:2)"
    assert _error(CustomCIR(ds).image_path, "img9") == f"image 'img9' not found in {ds / 'images'}"


def test_gallery_image_without_file(ds: Path):
    (ds / "gallery.val.txt").write_text("a\nb\nc\nghost\n")
    msg = _error(CustomCIR(ds).validate, "val")
    assert msg == f"image 'ghost' not found in {ds / 'images'} ({ds / 'gallery.val.txt'}:4)"


def test_triplets_are_validated_on_first_use(ds: Path):
    (ds / "images" / "c.webp").unlink()
    assert "image 'c' not found" in _error(CustomCIR(ds).triplets, "val")


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_corrupt_image(ds: Path, content):
    good = (ds / "images" / "a.png").read_bytes()
    bad = good[: len(good) // 2] if content == "truncated" else content
    path = ds / "images" / "img9.png"
    path.write_bytes(bad)
    msg = _error(CustomCIR(ds).load_image, "img9")
    assert msg.startswith(f"{path} (id 'img9'): cannot decode image: ")
    assert len(msg) > len(f"{path} (id 'img9'): cannot decode image: ")


def test_ambiguous_image_id(ds: Path):
    Image.new("RGB", (4, 4)).save(ds / "images" / "a.jpeg")
    msg = _error(CustomCIR(ds).image_path, "a")
    assert "'a'" in msg and "a.jpeg" in msg and "a.png" in msg


def test_missing_split(ds: Path):
    msg = _error(CustomCIR(ds).triplets, "foo")
    assert msg == f"{ds / 'triplets.foo.jsonl'} not found (splits here: train, val)"
    (ds / "gallery.val.txt").unlink()
    msg = _error(CustomCIR(ds).gallery, "val")
    assert msg == f"{ds / 'gallery.val.txt'} not found (splits here: train, val)"


def test_missing_captions_file(ds: Path):
    (ds / "captions.jsonl").unlink()
    assert _error(CustomCIR(ds).captions) == f"{ds / 'captions.jsonl'} not found"
