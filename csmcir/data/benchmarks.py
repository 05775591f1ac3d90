"""FashionIQ, CIRR, CIRCO and Shoes read from their official release layouts.

Each loader returns a :class:`BenchmarkSplit`: the split's queries (id, reference, evaluation
text, the training text forms, correct targets, CIRR's image set) and its gallery ids, with
where each image lives. Only the annotation files are read here; images are opened later, by id.

Layouts under ``root`` (as the datasets ship):

* FashionIQ: ``captions/cap.<cat>.<split>.json``, ``image_splits/split.<cat>.<split>.json``,
  ``images/<ASIN>.jpg``. Query id: the entry's position in its captions file.
* CIRR: ``cirr/captions/cap.rc2.<split>.json``, ``cirr/image_splits/split.rc2.<split>.json``
  (name -> path relative to ``root``). Query id: ``pairid``.
* CIRCO: ``annotations/<split>.json``; gallery = the images of
  ``COCO2017_unlabeled/annotations/image_info_unlabeled2017.json``, files in
  ``COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg``. Query id: ``id``.
* Shoes: ``relative_captions_shoes.json``, ``train_im_names.txt``, ``eval_im_names.txt``; images
  anywhere under ``root``, found by file name. A triplet is in a split when both its images are;
  query id: its position among that split's triplets, in file order.

All ids are strings. Malformed files raise :class:`~csmcir.errors.CsmcirError` naming the file
and the entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CsmcirError
from ..io import read_json
from .custom import Triplet
from .registry import DATASETS

__all__ = ["BenchmarkCIR", "BenchmarkQuery", "BenchmarkSplit", "BENCHMARKS", "FASHIONIQ_CATEGORIES", "check_split", "load_benchmark"]

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
# whether each benchmark's protocol drops a query's reference image from its ranking
# from the one dataset registry (csmcir/data/registry.py)
REMOVES_REFERENCE = {n: d.remove_reference for n, d in DATASETS.items() if d.layout == "benchmark"}


@dataclass
class BenchmarkQuery:
    id: str
    reference: str
    text: str  # the evaluation text
    targets: list[str] = field(default_factory=list)  # empty on test splits without answers
    train_texts: list[str] = field(default_factory=list)  # the forms training draws from
    members: list[str] | None = None  # CIRR: the image set (reference included)


@dataclass
class BenchmarkSplit:
    dataset: str
    split: str
    queries: list[BenchmarkQuery]
    gallery: list[str]
    image_paths: dict[str, Path] | None = None  # id -> file, where the layout gives it
    image_pattern: str | None = None  # else: root / pattern.format(id=...)
    root: Path = Path(".")
    category: str | None = None
    # FashionIQ's three categories together: each category's own gallery (query ids "<cat>/<n>")
    sub_galleries: dict[str, list[str]] | None = None

    @property
    def remove_reference(self) -> bool:
        """Whether the protocol drops each query's reference from its ranking."""
        return REMOVES_REFERENCE[self.dataset]

    @property
    def has_targets(self) -> bool:
        return bool(self.queries) and all(q.targets for q in self.queries)

    def image_path(self, image_id: str) -> Path:
        if self.image_paths is not None:
            try:
                return self.image_paths[image_id]
            except KeyError:
                raise CsmcirError(f"{self.dataset} {self.split}: image id {image_id!r} has no file in the split's image list") from None
        assert self.image_pattern is not None
        return self.root / self.image_pattern.format(id=image_id)


# ------------------------------------------------------------------------------------ helpers


def _list_of_dicts(data, path: Path) -> list[dict]:
    if not isinstance(data, list):
        raise CsmcirError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise CsmcirError(f"{path}: entry {i} is {type(e).__name__}, expected an object")
    return data


def _field(entry: dict, key: str, kind, path: Path, i: int, entry_id=None):
    if key not in entry:
        raise CsmcirError(f"{path}: entry {i}{_id(entry_id)} has no {key!r}")
    v = entry[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CsmcirError(f"{path}: entry {i}{_id(entry_id)}: {key!r} must be {want}, got {type(v).__name__}")
    return v


def _id(entry_id) -> str:
    return "" if entry_id is None else f" (id {str(entry_id)!r})"


def _check_unique(queries: list[BenchmarkQuery], path: Path) -> None:
    seen = set()
    for q in queries:
        if q.id in seen:
            raise CsmcirError(f"{path}: query id {q.id!r} appears twice")
        seen.add(q.id)


def _split_error(dataset: str, split: str, known) -> CsmcirError:
    return CsmcirError(f"{dataset} has no split {split!r} (known: {', '.join(known)})")


# ------------------------------------------------------------------------------------ FashionIQ


def fashioniq_eval_text(c0: str, c1: str) -> str:
    """The common protocol's evaluation text: ``"{c0.strip('.?, ').capitalize()} and {c1.strip('.?, ')}"``."""
    return f"{c0.strip('.?, ').capitalize()} and {c1.strip('.?, ')}"


def fashioniq_train_texts(c0: str, c1: str) -> list[str]:
    """The four forms training draws from: c0 and c1, c1 and c0, c0, c1."""
    a, b = c0.strip(".?, "), c1.strip(".?, ")
    return [f"{a.capitalize()} and {b}", f"{b.capitalize()} and {a}", a.capitalize(), b.capitalize()]


def load_fashioniq(root: Path, split: str, category: str) -> BenchmarkSplit:
    if category not in FASHIONIQ_CATEGORIES:
        raise CsmcirError(f"unknown FashionIQ category {category!r} (known: {', '.join(FASHIONIQ_CATEGORIES)})")
    if split not in ("train", "val", "test"):
        raise _split_error("fashioniq", split, ("train", "val", "test"))
    cap_path = root / "captions" / f"cap.{category}.{split}.json"
    queries = []
    for i, e in enumerate(_list_of_dicts(read_json(cap_path), cap_path)):
        ref = _field(e, "candidate", str, cap_path, i)
        caps = _field(e, "captions", list, cap_path, i)
        if len(caps) != 2 or not all(isinstance(c, str) for c in caps):
            raise CsmcirError(f"{cap_path}: entry {i}: 'captions' must be two strings")
        targets = [_field(e, "target", str, cap_path, i)] if "target" in e or split != "test" else []
        queries.append(BenchmarkQuery(str(i), ref, fashioniq_eval_text(*caps), targets, fashioniq_train_texts(*caps)))
    img_path = root / "image_splits" / f"split.{category}.{split}.json"
    gallery = read_json(img_path)
    if not isinstance(gallery, list) or not all(isinstance(g, str) for g in gallery):
        raise CsmcirError(f"{img_path}: expected a JSON list of image names")
    return BenchmarkSplit("fashioniq", split, queries, gallery, image_pattern="images/{id}.jpg", root=root, category=category)


def load_fashioniq_all(root: Path, split: str) -> BenchmarkSplit:
    """The three categories as one split: query ids ``<category>/<n>``, the union of the
    categories' galleries, and each category's gallery kept for its protocol (a query is ranked
    within its own category)."""
    parts = {c: load_fashioniq(root, split, c) for c in FASHIONIQ_CATEGORIES}
    queries = [BenchmarkQuery(f"{c}/{q.id}", q.reference, q.text, q.targets, q.train_texts) for c, b in parts.items() for q in b.queries]
    gallery = list(dict.fromkeys(g for b in parts.values() for g in b.gallery))
    return BenchmarkSplit(
        "fashioniq",
        split,
        queries,
        gallery,
        image_pattern="images/{id}.jpg",
        root=root,
        sub_galleries={c: b.gallery for c, b in parts.items()},
    )


# ----------------------------------------------------------------------------------------- CIRR


def load_cirr(root: Path, split: str) -> BenchmarkSplit:
    if split not in ("train", "val", "test1"):
        raise _split_error("cirr", split, ("train", "val", "test1"))
    cap_path = root / "cirr" / "captions" / f"cap.rc2.{split}.json"
    queries = []
    for i, e in enumerate(_list_of_dicts(read_json(cap_path), cap_path)):
        pid = _field(e, "pairid", int, cap_path, i)
        ref = _field(e, "reference", str, cap_path, i, pid)
        text = _field(e, "caption", str, cap_path, i, pid)
        img_set = _field(e, "img_set", dict, cap_path, i, pid)
        members = img_set.get("members")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise CsmcirError(f"{cap_path}: entry {i} (id {str(pid)!r}): 'img_set.members' must be a list of image names")
        targets = [] if split == "test1" else [_field(e, "target_hard", str, cap_path, i, pid)]
        queries.append(BenchmarkQuery(str(pid), ref, text, targets, [text], members))
    _check_unique(queries, cap_path)
    split_path = root / "cirr" / "image_splits" / f"split.rc2.{split}.json"
    names = read_json(split_path)
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise CsmcirError(f"{split_path}: expected a JSON object mapping image names to relative paths")
    paths = {k: root / v for k, v in names.items()}
    return BenchmarkSplit("cirr", split, queries, list(names), image_paths=paths, root=root)


# ---------------------------------------------------------------------------------------- CIRCO


def load_circo(root: Path, split: str, need_gallery: bool = True) -> BenchmarkSplit:
    if split not in ("val", "test"):
        raise _split_error("circo", split, ("val", "test"))
    ann_path = root / "annotations" / f"{split}.json"
    queries = []
    for i, e in enumerate(_list_of_dicts(read_json(ann_path), ann_path)):
        qid = _field(e, "id", int, ann_path, i)
        ref = _field(e, "reference_img_id", int, ann_path, i, qid)
        text = _field(e, "relative_caption", str, ann_path, i, qid)
        targets = []
        if split == "val":
            gts = _field(e, "gt_img_ids", list, ann_path, i, qid)
            if not gts or not all(isinstance(g, int) and not isinstance(g, bool) for g in gts):
                raise CsmcirError(f"{ann_path}: entry {i} (id {str(qid)!r}): 'gt_img_ids' must be a non-empty list of image ids")
            targets = [str(g) for g in gts]
        queries.append(BenchmarkQuery(str(qid), str(ref), text, targets, [text]))
    _check_unique(queries, ann_path)
    gallery: list[str] = []
    if need_gallery:
        info_path = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
        info = read_json(info_path)
        images = info.get("images") if isinstance(info, dict) else None
        if not isinstance(images, list):
            raise CsmcirError(f"{info_path}: expected an object with an 'images' list")
        for i, im in enumerate(images):
            if not isinstance(im, dict) or not isinstance(im.get("id"), int):
                raise CsmcirError(f"{info_path}: images[{i}] has no integer 'id'")
            gallery.append(str(im["id"]))
    return BenchmarkSplit("circo", split, queries, gallery, image_pattern="COCO2017_unlabeled/unlabeled2017/{id:0>12}.jpg", root=root)


# ---------------------------------------------------------------------------------------- Shoes


def _read_names(path: Path) -> list[str]:
    if not path.is_file():
        raise CsmcirError(f"{path}: file not found")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_shoes(root: Path, split: str, find_images: bool = True) -> BenchmarkSplit:
    if split not in ("train", "test"):
        raise _split_error("shoes", split, ("train", "test"))
    names = _read_names(root / ("train_im_names.txt" if split == "train" else "eval_im_names.txt"))
    in_split = set(names)
    cap_path = root / "relative_captions_shoes.json"
    queries = []
    for i, e in enumerate(_list_of_dicts(read_json(cap_path), cap_path)):
        tgt = _field(e, "ImageName", str, cap_path, i)
        ref = _field(e, "ReferenceImageName", str, cap_path, i)
        text = _field(e, "RelativeCaption", str, cap_path, i)
        if tgt in in_split and ref in in_split:
            queries.append(BenchmarkQuery(str(len(queries)), ref, text, [tgt], [text]))
    paths = None
    if find_images:
        paths = {}
        for p in sorted(root.rglob("*")):
            if p.name in in_split and p.is_file():
                paths.setdefault(p.name, p)
    return BenchmarkSplit("shoes", split, queries, names, image_paths=paths, image_pattern=None if find_images else "{id}", root=root)


# --------------------------------------------------------------------------------------- public

BENCHMARKS = ("fashioniq", "cirr", "circo", "shoes")


def load_benchmark(name: str, root: str | Path, split: str, category: str | None = None, images: bool = True) -> BenchmarkSplit:
    """One split of a real benchmark. ``images=False`` skips what only image access needs (the
    CIRCO gallery list, the Shoes file search), for scoring rankings."""
    root = Path(root)
    if name == "fashioniq":
        if category is None:
            return load_fashioniq_all(root, split)
        return load_fashioniq(root, split, category)
    if category is not None:
        raise CsmcirError(f"{name} has no categories (--category is for fashioniq)")
    if name == "cirr":
        return load_cirr(root, split)
    if name == "circo":
        return load_circo(root, split, need_gallery=images)
    if name == "shoes":
        return load_shoes(root, split, find_images=images)
    raise CsmcirError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")


# ---------------------------------------------------------------------------------------- check


def check_split(split: BenchmarkSplit, quick: bool = False, progress: bool = True, shown: int = 10) -> dict:
    """Every image a split needs (gallery, references, targets, image sets): present and, unless
    ``quick``, fully decodable. Returns counts and the bad ids (the first ``shown`` of each kind)."""
    from tqdm.auto import tqdm

    from .custom import decode_image

    needed = dict.fromkeys(split.gallery)
    for q in split.queries:
        needed.update(dict.fromkeys([q.reference, *q.targets, *(q.members or [])]))
    missing, unreadable = [], []
    for image_id in tqdm(needed, desc=f"checking {split.dataset} {split.split} images", unit="img", disable=not progress, mininterval=1.0):
        try:
            path = split.image_path(image_id)
        except CsmcirError:
            missing.append(image_id)
            continue
        if not path.is_file():
            missing.append(image_id)
            continue
        if quick:
            continue
        try:
            decode_image(path, image_id)
        except CsmcirError:
            unreadable.append(image_id)
    return {
        "dataset": split.dataset,
        "split": split.split,
        **({"category": split.category} if split.category else {}),
        "queries": len(split.queries),
        "gallery": len(split.gallery),
        "images_checked": len(needed),
        "decoded": not quick,
        "missing": len(missing),
        "unreadable": len(unreadable),
        "missing_ids": missing[:shown],
        "unreadable_ids": unreadable[:shown],
    }


# ------------------------------------------------------------- the dataset interface of training


class BenchmarkCIR:
    """A real benchmark behind the interface the DataModule, ``rank`` and ``index`` use for the
    custom format (:class:`~csmcir.data.custom.CustomCIR`): ``triplets``, ``gallery``,
    ``captions``, ``load_image``, ``validate``.

    Triplets carry ``meta.type`` = the FashionIQ category (so per-group recall is per category)
    and, for CIRR's train split, the image-set members other than the reference and the target as
    hard ``negatives``. ``captions`` is the target-side caption file (``captions.jsonl`` in the
    custom format, e.g. written by MCoT captioning); ``None`` reads ``root/captions.jsonl``.
    """

    def __init__(self, name: str, root: str | Path, category: str | None = None, captions: str | Path | None = None):
        self.name, self.root, self.category = name, Path(root), category
        if not self.root.is_dir():
            raise CsmcirError(f"dataset folder {self.root} not found")
        self.captions_file = Path(captions) if captions is not None else self.root / "captions.jsonl"
        self._splits: dict[str, BenchmarkSplit] = {}
        self._paths: dict[str, Path] = {}
        self._captions = None

    def __repr__(self) -> str:
        return f"BenchmarkCIR({self.name!r}, {str(self.root)!r}{f', {self.category!r}' if self.category else ''})"

    @property
    def remove_reference(self) -> bool:
        """Whether the protocol drops each query's reference from its ranking (CIRR, Shoes)."""
        return REMOVES_REFERENCE[self.name]

    def split(self, split: str) -> BenchmarkSplit:
        if split not in self._splits:
            b = load_benchmark(self.name, self.root, split, self.category)
            self._splits[split] = b
            for image_id in dict.fromkeys([*b.gallery, *(x for q in b.queries for x in (q.reference, *q.targets))]):
                try:
                    self._paths.setdefault(image_id, b.image_path(image_id))
                except CsmcirError:
                    pass
        return self._splits[split]

    def triplets(self, split: str) -> list[Triplet]:
        b = self.split(split)
        out = []
        for q in b.queries:
            negatives: tuple[str, ...] = ()
            if self.name == "cirr" and split == "train" and q.members:
                negatives = tuple(m for m in q.members if m != q.reference and m not in q.targets)
            if self.category:
                meta = {"type": self.category}
            elif self.name == "fashioniq":
                meta = {"type": q.id.split("/", 1)[0]}
            else:
                meta = {}
            if len(q.train_texts) > 1:
                meta["train_texts"] = list(q.train_texts)
            out.append(Triplet(q.id, q.reference, q.text, tuple(q.targets), meta, negatives))
        return out

    def gallery(self, split: str) -> list[str]:
        return list(self.split(split).gallery)

    def captions(self):
        from .custom import read_captions

        if self._captions is None:
            # no file = no captions: the caller's missing-caption policy decides (error by default)
            self._captions = read_captions(self.captions_file) if self.captions_file.is_file() else {}
        return self._captions

    def image_path(self, image_id: str) -> Path:
        if image_id not in self._paths:
            raise CsmcirError(f"{self.name}: image id {image_id!r} belongs to no loaded split")
        return self._paths[image_id]

    def load_image(self, image_id: str):
        from .custom import decode_image

        return decode_image(self.image_path(image_id), image_id)

    def validate(self, split: str) -> None:
        """Every image the split needs exists (files are decoded when loaded, not here)."""
        b = self.split(split)
        for q in b.queries:
            for image_id in (q.reference, *q.targets):
                if image_id not in self._paths or not self._paths[image_id].is_file():
                    raise CsmcirError(
                        f"{self.name} {split}: image {image_id!r} of query {q.id!r} not found ({self._paths.get(image_id, 'no file listed')})"
                    )
        for image_id in b.gallery:
            if image_id not in self._paths or not self._paths[image_id].is_file():
                raise CsmcirError(
                    f"{self.name} {split}: gallery image {image_id!r} not found ({self._paths.get(image_id, 'no file listed')})"
                )
