"""The custom CIR folder format: the one on-disk layout every csmcir tool reads.

A benchmark is a folder ``DIR`` that any team can fill with its own data::

    DIR/images/<image_id>.<ext>        png, jpg, jpeg or webp (extension matched case-insensitively)
    DIR/gallery.<split>.txt            one image id a line; blank lines are ignored
    DIR/triplets.<split>.jsonl         one query a line:
                                       {"id", "reference", "text", "targets": [...], "meta": {...}}
    DIR/captions.jsonl                 one image a line: {"image_id", "levels": {...}, "final"}
    DIR/benchmark.json                 optional metadata (written by the synthetic generator)
    DIR/scenes.jsonl                   optional ground-truth scene graphs (synthetic only)

Design choices:

* Targets are always a list (CIRCO-style): a query may have several correct images.
* Ids are strings and nothing else. JSON numbers are rejected rather than coerced, because ``1`` and
  ``"01"`` would silently name different files.
* Every problem a user can cause raises a one-line :class:`~csmcir.errors.CsmcirError` that names
  the file, the line where there is one, and the offending id, so a broken line among millions can
  be found and fixed without a debugger.
* :class:`CustomCIR` reads lazily and caches: opening a folder costs nothing, the first call to
  :meth:`CustomCIR.triplets` parses and validates one split, and :meth:`CustomCIR.image_path`
  lists ``images/`` once (one ``os.scandir``) instead of probing four extensions per lookup.
* Writers go through :mod:`csmcir.io`, so a killed writer never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CsmcirError, where
from ..io import atomic_write_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
"""File extensions recognised in ``images/`` (compared in lower case)."""

KNOWN_SPLITS = ("train", "val", "test", "heldout")
"""Splits listed first, in this order, by :meth:`CustomCIR.splits`; any other split follows."""


@dataclass(frozen=True)
class Triplet:
    """One query: a reference image and a modification text, with one or more correct targets.

    ``meta`` is free-form per-query information (the synthetic generator stores the modification
    types there); it takes no part in equality or hashing. ``negatives`` (optional) are hard
    negatives for training: images that look like a correct answer but are not (CIRR's image-set
    members, the synthetic benchmark's distractors); they must be in the split's gallery.
    """

    id: str
    reference: str
    text: str
    targets: tuple[str, ...]
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    negatives: tuple[str, ...] = ()


@dataclass(frozen=True)
class Caption:
    """A multi-level caption of one image: named intermediate ``levels``, a ``final`` sentence."""

    image_id: str
    levels: dict[str, str]
    final: str


# --------------------------------------------------------------------------------------- reading


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for every non-blank line of a JSON-lines file."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise CsmcirError(f"{path} not found") from None
    except OSError as e:
        raise CsmcirError(f"cannot read {path}: {e.strerror}") from None
    with f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CsmcirError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise CsmcirError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
        except UnicodeDecodeError as e:
            raise CsmcirError(f"{path}: not valid UTF-8 text ({e.reason})") from None


def _required_id(obj: dict, key: str, path: Path, lineno: int) -> str:
    """The record's own id field: a non-empty string (reported without an id, as there is none)."""
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise CsmcirError(f"{path}:{lineno}: field {key!r} must be a non-empty string")
    return value


def _field_error(path: Path, lineno: int, rid: str, key: str, what: str) -> CsmcirError:
    return CsmcirError(f"{where(path, lineno, rid)}: field {key!r} must be {what}")


def _parse_triplet(obj: dict, path: Path, lineno: int) -> Triplet:
    qid = _required_id(obj, "id", path, lineno)
    reference = obj.get("reference")
    if not isinstance(reference, str) or not reference:
        raise _field_error(path, lineno, qid, "reference", "a non-empty string")
    text = obj.get("text")
    if not isinstance(text, str):
        raise _field_error(path, lineno, qid, "text", "a string")
    targets = obj.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise _field_error(path, lineno, qid, "targets", "a non-empty list of strings")
    if len(set(targets)) != len(targets):
        dup = next(t for i, t in enumerate(targets) if t in targets[:i])
        raise CsmcirError(f"{where(path, lineno, qid)}: target {dup!r} is listed twice")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise _field_error(path, lineno, qid, "meta", "a JSON object")
    negatives = obj.get("negatives", [])
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n for n in negatives):
        raise _field_error(path, lineno, qid, "negatives", "a list of strings")
    clash = set(negatives) & set(targets)
    if clash:
        raise CsmcirError(f"{where(path, lineno, qid)}: {sorted(clash)[0]!r} is both a target and a negative")
    return Triplet(qid, reference, text, tuple(targets), meta, tuple(negatives))


def _first_seen(first_line: dict[str, int], key: str, path: Path, lineno: int, what: str) -> None:
    """Record ``key`` at ``lineno``; a second occurrence is an error naming both lines."""
    if key in first_line:
        raise CsmcirError(f"{where(path, lineno, key)}: duplicate {what} (first on line {first_line[key]})")
    first_line[key] = lineno


def _read_triplets_numbered(path: Path) -> list[tuple[int, Triplet]]:
    """Parse a triplets file, keeping each query's line number for later error messages."""
    out: list[tuple[int, Triplet]] = []
    first_line: dict[str, int] = {}
    for lineno, obj in _iter_jsonl(path):
        t = _parse_triplet(obj, path, lineno)
        _first_seen(first_line, t.id, path, lineno, "query id")
        out.append((lineno, t))
    return out


def read_triplets(path: str | Path) -> list[Triplet]:
    """Read ``triplets.<split>.jsonl``; raises :class:`CsmcirError` on any malformed line."""
    return [t for _, t in _read_triplets_numbered(Path(path))]


def _read_gallery_numbered(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CsmcirError(f"{path} not found") from None
    except UnicodeDecodeError as e:
        raise CsmcirError(f"{path}: not valid UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise CsmcirError(f"cannot read {path}: {e.strerror}") from None
    out: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        image_id = line.strip()
        if not image_id:
            continue
        if image_id in first_line:
            raise CsmcirError(f"{where(path, lineno, image_id)}: duplicate image id (first on line {first_line[image_id]})")
        first_line[image_id] = lineno
        out.append((lineno, image_id))
    return out


def read_gallery(path: str | Path) -> list[str]:
    """Read ``gallery.<split>.txt``: image ids in file order (a duplicate id is an error)."""
    return [i for _, i in _read_gallery_numbered(Path(path))]


def _parse_caption(obj: dict, path: Path, lineno: int) -> Caption | None:
    image_id = _required_id(obj, "image_id", path, lineno)
    if obj.get("status") == "empty" and obj.get("final") == "":
        return None  # a captioner's empty answer (csmcir.captioning): the image counts as uncaptioned
    levels = obj.get("levels", {})
    if not isinstance(levels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in levels.items()):
        raise _field_error(path, lineno, image_id, "levels", "an object of strings")
    final = obj.get("final")
    if not isinstance(final, str) or not final:
        raise _field_error(path, lineno, image_id, "final", "a non-empty string")
    return Caption(image_id, dict(levels), final)


def decode_image(path: Path, image_id: str):
    """``path`` fully decoded as RGB; a corrupt or truncated file raises an error naming both."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise CsmcirError(f"{where(path, id=image_id)}: image file not found") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise CsmcirError(f"{where(path, id=image_id)}: cannot decode image: {reason}") from None


def read_captions(path: str | Path) -> dict[str, Caption]:
    """Read ``captions.jsonl`` into ``{image_id: Caption}`` (a duplicate image id is an error)."""
    path = Path(path)
    out: dict[str, Caption] = {}
    first_line: dict[str, int] = {}
    for lineno, obj in _iter_jsonl(path):
        c = _parse_caption(obj, path, lineno)
        _first_seen(first_line, obj["image_id"], path, lineno, "caption image_id")
        if c is not None:
            out[c.image_id] = c
    return out


# --------------------------------------------------------------------------------------- writing


def _check_id(value: Any, what: str) -> str:
    """Writers refuse what the readers would refuse, so a written file always reads back."""
    if not isinstance(value, str) or not value or "\n" in value or "\r" in value:
        raise CsmcirError(f"{what} must be a non-empty one-line string, got {value!r}")
    return value


def _jsonl(records: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def triplet_to_json(t: Triplet) -> dict[str, Any]:
    """The JSON object of one triplets line (key order is fixed, so output is reproducible)."""
    _check_id(t.id, "query id")
    _check_id(t.reference, f"reference of query {t.id!r}")
    if not t.targets:
        raise CsmcirError(f"query {t.id!r} has no targets")
    for target in t.targets:
        _check_id(target, f"target of query {t.id!r}")
    out = {"id": t.id, "reference": t.reference, "text": t.text, "targets": list(t.targets), "meta": t.meta}
    if t.negatives:
        out["negatives"] = list(t.negatives)
    return out


def write_triplets(path: str | Path, triplets: Iterable[Triplet]) -> None:
    """Write ``triplets.<split>.jsonl`` atomically."""
    atomic_write_text(path, _jsonl(triplet_to_json(t) for t in triplets))


def write_gallery(path: str | Path, ids: Iterable[str]) -> None:
    """Write ``gallery.<split>.txt`` atomically, one id a line."""
    atomic_write_text(path, "".join(_check_id(i, "gallery image id") + "\n" for i in ids))


def write_captions(path: str | Path, captions: Iterable[Caption] | Mapping[str, Caption]) -> None:
    """Write ``captions.jsonl`` atomically from a list or the dict :func:`read_captions` returns."""
    items = captions.values() if isinstance(captions, Mapping) else captions
    records = ({"image_id": _check_id(c.image_id, "caption image_id"), "levels": c.levels, "final": c.final} for c in items)
    atomic_write_text(path, _jsonl(records))


# --------------------------------------------------------------------------------------- dataset


class CustomCIR:
    """A benchmark folder in the custom format, read lazily with per-split caches.

    Opening checks only that ``root`` and ``root/images`` exist. :meth:`triplets` validates its
    split on first use (see :meth:`validate`), so a training run fails at start, with a message
    naming the bad line, rather than hours later on the first batch that touches it.
    """

    def __init__(self, root: str | Path, captions: str | Path | None = None):
        self.root = Path(root)
        # the target-side captions: root/captions.jsonl, or another file (e.g. a `csmcir caption` store)
        self.captions_file = Path(captions) if captions is not None else self.root / "captions.jsonl"
        if not self.root.is_dir():
            raise CsmcirError(f"dataset folder {self.root} not found")
        self.images_dir = self.root / "images"
        if not self.images_dir.is_dir():
            raise CsmcirError(f"{self.images_dir} not found (expected the folder of images)")
        self._triplets: dict[str, list[tuple[int, Triplet]]] = {}
        self._validated: set[str] = set()
        self._galleries: dict[str, list[tuple[int, str]]] = {}
        self._captions: dict[str, Caption] | None = None
        self._image_paths: dict[str, Path] | None = None
        self._ambiguous: dict[str, list[Path]] = {}

    remove_reference = True  # rankings leave each query's reference out (the custom protocol)

    def __repr__(self) -> str:
        return f"CustomCIR({str(self.root)!r})"

    # -- files

    def triplets_file(self, split: str) -> Path:
        return self.root / f"triplets.{split}.jsonl"

    def gallery_file(self, split: str) -> Path:
        return self.root / f"gallery.{split}.txt"

    def splits(self) -> list[str]:
        """Splits with a ``triplets.<split>.jsonl``: train, val, test, heldout first, then A-Z."""
        found = {p.name[len("triplets.") : -len(".jsonl")] for p in self.root.glob("triplets.*.jsonl") if p.is_file()}
        found.discard("")
        return [s for s in KNOWN_SPLITS if s in found] + sorted(found - set(KNOWN_SPLITS))

    def _missing_split(self, path: Path) -> CsmcirError:
        here = ", ".join(self.splits()) or "none"
        return CsmcirError(f"{path} not found (splits here: {here})")

    # -- annotations

    def _numbered_triplets(self, split: str) -> list[tuple[int, Triplet]]:
        if split not in self._triplets:
            path = self.triplets_file(split)
            if not path.is_file():
                raise self._missing_split(path)
            self._triplets[split] = _read_triplets_numbered(path)
        return self._triplets[split]

    def _numbered_gallery(self, split: str) -> list[tuple[int, str]]:
        if split not in self._galleries:
            path = self.gallery_file(split)
            if not path.is_file():
                raise self._missing_split(path)
            self._galleries[split] = _read_gallery_numbered(path)
        return self._galleries[split]

    def triplets(self, split: str) -> list[Triplet]:
        """The queries of ``split``, parsed and validated once, then cached."""
        numbered = self._numbered_triplets(split)
        if split not in self._validated:
            self.validate(split)
        return [t for _, t in numbered]

    def gallery(self, split: str) -> list[str]:
        """The image ids of ``gallery.<split>.txt`` in file order (cached)."""
        return [i for _, i in self._numbered_gallery(split)]

    def captions(self) -> dict[str, Caption]:
        """``{image_id: Caption}`` from ``captions.jsonl`` (cached)."""
        if self._captions is None:
            self._captions = read_captions(self.captions_file)
        return self._captions

    # -- images

    def _scan_images(self) -> dict[str, Path]:
        """One ``os.scandir`` of ``images/``: ``{id: path}``; ids with two files are remembered."""
        paths: dict[str, Path] = {}
        with os.scandir(self.images_dir) as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                if not stem or ext.lower() not in IMAGE_EXTENSIONS or stem.startswith("."):
                    continue
                path = self.images_dir / entry.name
                if stem in paths:
                    self._ambiguous.setdefault(stem, [paths[stem]]).append(path)
                paths[stem] = path
        return paths

    def has_image(self, image_id: str) -> bool:
        if self._image_paths is None:
            self._image_paths = self._scan_images()
        return image_id in self._image_paths

    def image_path(self, image_id: str) -> Path:
        """The file of ``image_id`` in ``images/``; an id with no file or two files is an error."""
        if not self.has_image(image_id):
            raise CsmcirError(f"image {image_id!r} not found in {self.images_dir}")
        if image_id in self._ambiguous:
            names = ", ".join(sorted(p.name for p in self._ambiguous[image_id]))
            raise CsmcirError(f"image {image_id!r} is ambiguous in {self.images_dir}: several files ({names})")
        return self._image_paths[image_id]  # type: ignore[index]

    def load_image(self, image_id: str):
        """Open ``image_id`` as a fully decoded RGB ``PIL.Image.Image``.

        Decoding is forced here (``convert`` reads every pixel) so that a truncated or corrupt file
        fails now, with its path in the message, and not later inside a DataLoader worker.
        """
        return decode_image(self.image_path(image_id), image_id)

    # -- validation

    def validate(self, split: str) -> None:
        """Check that ``split`` is consistent: raise :class:`CsmcirError` at the first problem.

        Every reference and target has an image file, every target is listed in
        ``gallery.<split>.txt`` (a target outside the gallery could never be retrieved, which would
        silently lower recall), and every gallery id has an image file. Image files are not decoded
        here (that is :meth:`load_image`'s job); only their presence is checked.
        """
        numbered = self._numbered_triplets(split)
        gallery_path = self.gallery_file(split)
        gallery = {i for _, i in self._numbered_gallery(split)}
        tpath = self.triplets_file(split)
        for lineno, t in numbered:
            for image_id in (t.reference, *t.targets, *t.negatives):
                if not self.has_image(image_id):
                    raise CsmcirError(f"image {image_id!r} not found in {self.images_dir} (query {t.id!r}, {tpath}:{lineno})")
            for kind, image_id in [("target", x) for x in t.targets] + [("negative", x) for x in t.negatives]:
                if image_id not in gallery:
                    raise CsmcirError(f"{where(tpath, lineno, t.id)}: {kind} {image_id!r} is not in {gallery_path}")
        for lineno, image_id in self._numbered_gallery(split):
            if not self.has_image(image_id):
                raise CsmcirError(f"image {image_id!r} not found in {self.images_dir} ({gallery_path}:{lineno})")
        self._validated.add(split)
