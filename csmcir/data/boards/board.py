"""Product boards of real Fashion-MNIST photos: their vocabulary, edits, texts and captions.

A board is a 2 x 2 grid (cells 0..3 in reading order) holding 1-4 articles; an :class:`Article` is
one real photo (its index in its Fashion-MNIST part, its class) in a cell, optionally tinted. Two
boards show the same thing exactly when their article tuples are equal, so an untouched article
must keep its very photo in the target: a retriever has to keep instance identity from pixels,
since the captions (written from labels) cannot tell two sandals apart.

An edit is one of ``replace`` (another class in the same cell: "swap the sandal for a sneaker"),
``remove``, ``add`` (a new article in an empty cell), ``move`` (to an empty cell) and ``swap`` (two
articles trade cells). A replace or an add never names the new photo, and may leave its tint
unsaid, so its correct set is a :class:`Pattern`: every board with the kept articles as they were
and *any* photo of the new class there; a few of them are rendered as targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from ...errors import CsmcirError
from ..synthetic.edits import _weighted
from .photos import CLASSES

POSITIONS = ("top left", "top right", "bottom left", "bottom right")
"""Cell names of the 2 x 2 grid, indexed by cell (``row * 2 + col``)."""
TINTS: dict[str, tuple[int, int, int]] = {
    "grey": (255, 255, 255),  # the photo as it is
    "red": (232, 72, 58),
    "blue": (70, 118, 236),
    "green": (64, 190, 92),
    "yellow": (240, 204, 44),
}
"""Tint name -> the RGB a photo's grey levels are multiplied by (``grey`` leaves it as shot)."""
TINT_NAMES = tuple(TINTS)
EDIT_TYPES = ("replace", "remove", "add", "move", "swap")
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("replace", "bag"), ("add", "sneaker"), ("move", "top right")})
"""(edit, value) pairs that no train/val/test query uses; the ``heldout`` split tests them. Bags,
sneakers and top-right articles still appear everywhere: only the edit is held out."""
DISTRACTOR_KINDS = ("other_class", "other_article", "other_cell", "other_photo", "random")


@dataclass(frozen=True)
class BoardParams:
    """All settings of one Fashion-MNIST board benchmark.

    Attributes:
        name: difficulty name recorded in ``benchmark.json``.
        image_size: side of the square PNGs (default 64: four 28-px photos at their own
            resolution, never resampled, in 32-px cells).
        position_jitter: largest offset, in pixels, of a photo from its cell's centre, drawn
            afresh per image (two images of one board are never pixel-identical).
        min_articles, max_articles: articles on a reference board (1..4).
        p_tint: probability that an article is tinted (red, blue, green or yellow) rather than grey.
        p_tint_unsaid: probability that a replace or an add leaves the new article's tint unsaid
            (then any tint is correct).
        p_relational: probability of a relational reference ("the article left of the bag")
            when a unique one exists.
        edit_weights: relative frequency of each edit type.
        min_free_variants, max_free_variants: target images rendered for a replace or an add
            (each another photo of the new class).
        n_distractors: hard distractors per val / test / heldout query (other edits of the same
            board, see :data:`DISTRACTOR_KINDS`); ``n_train_negatives`` per training query,
            listed as its ``negatives``.
        distractor_weights: relative frequency of each distractor kind.
        n_train, n_val, n_test, n_heldout: queries per split.
        caption_omit_rate, caption_error_rate, caption_drop_rate: the lossy captioner's rates of
            leaving an attribute out, misreading it (a sandal called a sneaker), and missing an
            article.
    """

    name: str
    image_size: int = 64
    position_jitter: int = 2
    min_articles: int = 1
    max_articles: int = 3
    p_tint: float = 0.3
    p_tint_unsaid: float = 0.5
    p_relational: float = 0.2
    edit_weights: tuple[tuple[str, float], ...] = (("replace", 1.0), ("remove", 1.0), ("add", 1.0), ("move", 1.0), ("swap", 1.0))
    min_free_variants: int = 2
    max_free_variants: int = 3
    n_distractors: int = 4
    distractor_weights: tuple[tuple[str, float], ...] = (
        ("other_class", 1.0),
        ("other_article", 1.0),
        ("other_cell", 0.5),
        ("other_photo", 1.0),
        ("random", 0.5),
    )
    n_train: int = 15000
    n_train_negatives: int = 1
    n_val: int = 1000
    n_test: int = 2000
    n_heldout: int = 1000
    caption_omit_rate: float = 0.15
    caption_error_rate: float = 0.05
    caption_drop_rate: float = 0.05

    def __post_init__(self) -> None:
        problems = []
        if self.image_size < 64:
            problems.append("image_size must be at least 64 (four 28-px photos)")
        if not 0 <= self.position_jitter <= (self.image_size // 2 - 28) // 2:
            problems.append(f"position_jitter must be in 0..{(self.image_size // 2 - 28) // 2} at image_size {self.image_size}")
        if not 1 <= self.min_articles <= self.max_articles <= 4:
            problems.append("need 1 <= min_articles <= max_articles <= 4")
        for label, pairs, known in (
            ("edit_weights", self.edit_weights, EDIT_TYPES),
            ("distractor_weights", self.distractor_weights, DISTRACTOR_KINDS),
        ):
            names = [k for k, _ in pairs]
            if set(names) - set(known) or len(set(names)) != len(names):
                problems.append(f"{label} names must be distinct and among {', '.join(known)}")
            if any(w < 0 for _, w in pairs) or sum(w for _, w in pairs) <= 0:
                problems.append(f"{label} must be non-negative with a positive sum")
        if not 1 <= self.min_free_variants <= self.max_free_variants:
            problems.append("need 1 <= min_free_variants <= max_free_variants")
        for rate in ("p_tint", "p_tint_unsaid", "p_relational", "caption_omit_rate", "caption_error_rate", "caption_drop_rate"):
            if not 0 <= getattr(self, rate) <= 1:
                problems.append(f"{rate} must be in [0, 1]")
        if self.caption_omit_rate + self.caption_error_rate > 1:
            problems.append("caption_omit_rate + caption_error_rate must be at most 1")
        if min(self.n_distractors, self.n_train_negatives, self.n_train, self.n_val, self.n_test, self.n_heldout) < 0:
            problems.append("counts must be non-negative")
        if problems:
            raise CsmcirError(f"invalid board parameters {self.name!r}: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for f in fields(self):
            if isinstance(out[f.name], tuple):
                out[f.name] = [list(v) if isinstance(v, tuple) else v for v in out[f.name]]
        return out


DIFFICULTIES: dict[str, BoardParams] = {
    # smoke tests and CI: a few seconds
    "easy": BoardParams(name="easy", n_train=1500, n_val=200, n_test=300, n_heldout=150, n_distractors=3),
    # the standard size, as the shapes benchmark's: 15,000 training queries, 2,000 test queries
    "standard": BoardParams(name="standard"),
}


def resolve_params(difficulty: str | BoardParams) -> BoardParams:
    if isinstance(difficulty, BoardParams):
        return difficulty
    try:
        return DIFFICULTIES[difficulty]
    except (KeyError, TypeError):
        raise CsmcirError(f"unknown board difficulty {difficulty!r} (known: {', '.join(DIFFICULTIES)})") from None


# ------------------------------------------------------------------------------------ boards


@dataclass(frozen=True, slots=True, order=True)
class Article:
    """One photo on a board: its cell (0..3), class (index into CLASSES), photo index, tint."""

    cell: int
    label: int
    photo: int
    tint: str

    @property
    def noun(self) -> str:
        return CLASSES[self.label]

    def to_json(self) -> dict:
        return {"cell": self.cell, "class": CLASSES[self.label], "photo": self.photo, "tint": self.tint}


Board = tuple[Article, ...]


def make_board(articles: Sequence[Article]) -> Board:
    board = tuple(sorted(articles))
    if len({a.cell for a in board}) != len(board):
        raise ValueError(f"two articles share a cell: {board}")
    return board


def _at(board: Board, cell: int) -> Article:
    for a in board:
        if a.cell == cell:
            return a
    raise KeyError(cell)


def empty_cells(board: Board) -> list[int]:
    used = {a.cell for a in board}
    return [c for c in range(4) if c not in used]


@dataclass(frozen=True)
class Pattern:
    """The boards a query accepts: ``kept`` exactly, plus (for a replace or an add) one article of
    class ``label`` in ``cell`` with any photo and tint ``tint`` (``None``: any tint)."""

    kept: Board
    cell: int | None = None
    label: int | None = None
    tint: str | None = None

    def matches(self, board: Board) -> bool:
        if self.cell is None:
            return board == self.kept
        if len(board) != len(self.kept) + 1:
            return False
        try:
            new = _at(board, self.cell)
        except KeyError:
            return False
        if new.label != self.label or (self.tint is not None and new.tint != self.tint):
            return False
        return tuple(a for a in board if a.cell != self.cell) == self.kept


@dataclass(frozen=True)
class Edit:
    """One edit of a board.

    Attributes:
        type: replace, remove, add, move or swap.
        cell: the edited article's cell (for an add, the empty cell it fills).
        other: a move's destination cell, or a swap's second article.
        label: a replace's or an add's new class.
        tint: its stated tint; ``None`` when the text leaves it unsaid.
    """

    type: str
    cell: int
    other: int | None = None
    label: int | None = None
    tint: str | None = None

    def pattern(self, board: Board) -> Pattern | None:
        """The boards this edit of ``board`` accepts; ``None`` if it does not apply."""
        cells = {a.cell for a in board}
        if self.type in ("replace", "remove", "move", "swap") and self.cell not in cells:
            return None
        if self.type == "replace":
            if self.label == _at(board, self.cell).label:
                return None
            kept = tuple(a for a in board if a.cell != self.cell)
            return Pattern(kept, self.cell, self.label, self.tint)
        if self.type == "add":
            if self.cell in cells:
                return None
            return Pattern(board, self.cell, self.label, self.tint)
        if self.type == "remove":
            kept = tuple(a for a in board if a.cell != self.cell)
            return Pattern(kept) if kept else None
        if self.type == "move":
            if self.other in cells:
                return None
            return Pattern(make_board([replace(a, cell=self.other) if a.cell == self.cell else a for a in board]))
        if self.type == "swap":
            if self.other not in cells or self.other == self.cell:
                return None
            a, b = _at(board, self.cell), _at(board, self.other)
            if (a.label, a.tint) == (b.label, b.tint):
                return None  # an invisible swap
            moved = {self.cell: replace(b, cell=self.cell), self.other: replace(a, cell=self.other)}
            return Pattern(make_board([moved.get(x.cell, x) for x in board]))
        raise ValueError(f"unknown edit type {self.type!r}")

    def pair(self) -> tuple[str, str] | None:
        """The (edit, value) pair matched against :data:`HELDOUT_PAIRS`."""
        if self.type in ("replace", "add"):
            return (self.type, CLASSES[self.label])  # type: ignore[index]
        if self.type == "move":
            return ("move", POSITIONS[self.other])  # type: ignore[index]
        return None


def allowed(edit: Edit, heldout: bool) -> bool:
    return heldout or edit.pair() not in HELDOUT_PAIRS


# ------------------------------------------------------------------------------ photo sampling


class PhotoPool:
    """The photos one split may use, by class, and the tint a new article is drawn with."""

    def __init__(self, by_label: list[np.ndarray], params: BoardParams):
        self.by_label = by_label
        self.params = params

    def photo(self, rng: np.random.Generator, label: int) -> int:
        pool = self.by_label[label]
        return int(pool[int(rng.integers(len(pool)))])

    def tint(self, rng: np.random.Generator) -> str:
        if rng.random() < self.params.p_tint:
            return TINT_NAMES[1 + int(rng.integers(len(TINT_NAMES) - 1))]
        return "grey"

    def article(self, rng: np.random.Generator, cell: int, label: int | None = None, tint: str | None = None) -> Article:
        label = int(rng.integers(len(CLASSES))) if label is None else label
        drawn_tint = self.tint(rng)
        return Article(cell, label, self.photo(rng, label), tint or drawn_tint)

    def board(self, rng: np.random.Generator, n: int) -> Board:
        cells = rng.permutation(4)[:n]
        return make_board([self.article(rng, int(c)) for c in cells])

    def realise(self, rng: np.random.Generator, pattern: Pattern) -> Board:
        """A board matching ``pattern``: the free article gets a random photo (and tint if unsaid)."""
        if pattern.cell is None:
            return pattern.kept
        return make_board([*pattern.kept, self.article(rng, pattern.cell, pattern.label, pattern.tint)])


def sample_edit(
    rng: np.random.Generator, board: Board, etype: str, pool: PhotoPool, heldout: bool, forced: str | None = None
) -> Edit | None:
    """A random edit of type ``etype`` that applies to ``board`` (``forced``: its value, a class or
    a position name); ``None`` when the board admits none."""
    cells = [a.cell for a in board]
    empty = empty_cells(board)
    tint_said = rng.random() >= pool.params.p_tint_unsaid
    tint = pool.tint(rng)
    candidates: list[Edit] = []
    if etype == "replace":
        for c in cells:
            candidates += [Edit("replace", c, label=k, tint=tint if tint_said else None) for k in range(len(CLASSES))]
    elif etype == "add":
        for c in empty:
            candidates += [Edit("add", c, label=k, tint=tint if tint_said else None) for k in range(len(CLASSES))]
    elif etype == "remove":
        candidates = [Edit("remove", c) for c in cells] if len(board) > 1 else []
    elif etype == "move":
        candidates = [Edit("move", c, other=d) for c in cells for d in empty]
    elif etype == "swap":
        candidates = [Edit("swap", c, other=d) for c in cells for d in cells if c < d]
    else:
        raise ValueError(f"unknown edit type {etype!r}")
    ok = []
    for e in candidates:
        if not allowed(e, heldout) or e.pattern(board) is None:
            continue
        if forced is not None and (e.pair() or (None, None))[1] != forced:
            continue
        ok.append(e)
    return ok[int(rng.integers(len(ok)))] if ok else None


def sample_query_edit(rng: np.random.Generator, board: Board, pool: PhotoPool, heldout: bool, etype: str) -> Edit | None:
    """The edit of one query, of type ``etype`` (drawn once per query by the caller, so that
    types needing two articles are as common as the others). In the heldout split it states a
    held-out pair instead (tried in random order until one fits); elsewhere it never does."""
    if heldout:
        pairs = sorted(HELDOUT_PAIRS)
        for i in rng.permutation(len(pairs)):
            forced_type, value = pairs[int(i)]
            e = sample_edit(rng, board, forced_type, pool, heldout=True, forced=value)
            if e is not None:
                return e
        return None
    return sample_edit(rng, board, etype, pool, heldout=False)


def sample_edit_type(rng: np.random.Generator, params: BoardParams) -> str:
    return _weighted(rng, params.edit_weights)


# ------------------------------------------------------------------------------------ distractors


def _other_photo(rng: np.random.Generator, pattern: Pattern, pool: PhotoPool) -> Board | None:
    """The right edit, but one untouched article is another photo of its class and tint."""
    if not pattern.kept:
        return None
    k = int(rng.integers(len(pattern.kept)))
    a = pattern.kept[k]
    if len(pool.by_label[a.label]) < 2:
        return None
    photo = a.photo
    while photo == a.photo:
        photo = pool.photo(rng, a.label)
    kept = make_board([*pattern.kept[:k], replace(a, photo=photo), *pattern.kept[k + 1 :]])
    return pool.realise(rng, replace(pattern, kept=kept))


def distractor(rng: np.random.Generator, kind: str, board: Board, edit: Edit, pool: PhotoPool, heldout: bool) -> Board | None:
    """One hard distractor of ``kind``: another edit of the same reference board (or, for
    ``other_photo``, the right edit with one untouched article's photo exchanged). Outside the
    heldout split it never shows a held-out edit, not even as a negative."""
    if kind == "other_photo":
        return _other_photo(rng, edit.pattern(board), pool)  # type: ignore[arg-type]
    if kind == "other_class":
        if edit.type not in ("replace", "add"):
            return None
        label = int(rng.integers(len(CLASSES)))
        e2 = replace(edit, label=label) if label != edit.label else None
    elif kind == "other_article":
        others = [a.cell for a in board if a.cell not in (edit.cell, edit.other)]
        if edit.type == "add" or not others:
            return None
        cell = others[int(rng.integers(len(others)))]
        e2 = replace(edit, cell=cell)
    elif kind == "other_cell":
        if edit.type not in ("move", "add"):
            return None
        empty = [c for c in empty_cells(board) if c not in (edit.cell, edit.other)]
        if not empty:
            return None
        cell = empty[int(rng.integers(len(empty)))]
        e2 = replace(edit, other=cell) if edit.type == "move" else replace(edit, cell=cell)
    else:  # random: any other edit of the reference
        e2 = sample_edit(rng, board, _weighted(rng, pool.params.edit_weights), pool, heldout)
    if e2 is None or not allowed(e2, heldout):
        return None
    pattern = e2.pattern(board)
    return None if pattern is None else pool.realise(rng, pattern)


def sample_distractors(
    rng: np.random.Generator, board: Board, edit: Edit, pool: PhotoPool, n: int, avoid: set[Board], heldout: bool
) -> list[tuple[Board, str]]:
    """Up to ``n`` distinct (distractor board, kind) pairs, none accepted by the query and none in
    ``avoid``."""
    pattern = edit.pattern(board)
    assert pattern is not None
    out: list[tuple[Board, str]] = []
    seen = set(avoid) | {board}
    for _ in range(40 * n):
        if len(out) >= n:
            break
        kind = _weighted(rng, pool.params.distractor_weights)
        d = distractor(rng, kind, board, edit, pool, heldout)
        if d is not None and d not in seen and not pattern.matches(d):
            seen.add(d)
            out.append((d, kind))
    return out


# ------------------------------------------------------------------------------------- language


def with_article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def at_position(cell: int) -> str:
    return f"at the {POSITIONS[cell]}"


def describe(board: Board, a: Article) -> str:
    """The shortest unique description: "the sandal", "the red sandal", "the sandal at the top left"."""
    if sum(1 for b in board if b.label == a.label) == 1:
        return f"the {a.noun}"
    if sum(1 for b in board if (b.label, b.tint) == (a.label, a.tint)) == 1:
        return f"the {a.tint} {a.noun}"
    return f"the {a.noun} {at_position(a.cell)}"


_RELATIONS = {
    "left of": lambda a, b: a.cell % 2 < b.cell % 2,
    "right of": lambda a, b: a.cell % 2 > b.cell % 2,
    "above": lambda a, b: a.cell // 2 < b.cell // 2,
    "below": lambda a, b: a.cell // 2 > b.cell // 2,
}


def refer(board: Board, a: Article, rng: np.random.Generator, p_relational: float) -> tuple[str, bool]:
    """A referring expression for ``a`` and whether it is relational ("the article left of the
    bag"); the random draw is made on every call so the stream does not depend on the layout."""
    if rng.random() < p_relational:
        options = []
        for anchor in board:
            if anchor.cell == a.cell:
                continue
            for name, rel in _RELATIONS.items():
                if rel(a, anchor) and not any(rel(o, anchor) for o in board if o.cell not in (a.cell, anchor.cell)):
                    options.append((name, anchor))
        if options:
            name, anchor = options[int(rng.integers(len(options)))]
            head = ("article", "item", "product")[int(rng.integers(3))]
            return f"the {head} {name} {describe(board, anchor)}", True
    return describe(board, a), False


REPLACE_TEMPLATES = ("swap {ref} for {np}", "replace {ref} with {np}", "change {ref} into {np}", "put {np} in place of {ref}")
REMOVE_TEMPLATES = ("remove {ref}", "take away {ref}", "delete {ref}", "take {ref} off the board")
ADD_TEMPLATES = ("add {np} {at}", "put {np} {at}", "place {np} {at}", "fill the empty {pos} cell with {np}")
MOVE_TEMPLATES = ("move {ref} to the {pos}", "shift {ref} to the {pos}", "put {ref} {at}", "place {ref} {at}")
SWAP_TEMPLATES = ("swap {ref} and {ref2}", "swap the places of {ref} and {ref2}", "let {ref} and {ref2} trade places")


def _pick(rng: np.random.Generator, seq: Sequence[str]) -> str:
    return seq[int(rng.integers(len(seq)))]


def edit_text(board: Board, edit: Edit, rng: np.random.Generator, p_relational: float) -> tuple[str, bool]:
    """The modification text of ``edit`` on ``board`` and whether a reference is relational."""
    if edit.type in ("replace", "add"):
        np_ = with_article(f"{edit.tint} {CLASSES[edit.label]}" if edit.tint else CLASSES[edit.label])  # type: ignore[index]
        if edit.type == "add":
            return _pick(rng, ADD_TEMPLATES).format(np=np_, at=at_position(edit.cell), pos=POSITIONS[edit.cell]), False
        ref, rel = refer(board, _at(board, edit.cell), rng, p_relational)
        return _pick(rng, REPLACE_TEMPLATES).format(ref=ref, np=np_), rel
    ref, rel = refer(board, _at(board, edit.cell), rng, p_relational)
    if edit.type == "remove":
        return _pick(rng, REMOVE_TEMPLATES).format(ref=ref), rel
    if edit.type == "move":
        return _pick(rng, MOVE_TEMPLATES).format(ref=ref, pos=POSITIONS[edit.other], at=at_position(edit.other)), rel  # type: ignore[index]
    ref2, rel2 = refer(board, _at(board, edit.other), rng, p_relational)  # type: ignore[arg-type]
    return _pick(rng, SWAP_TEMPLATES).format(ref=ref, ref2=ref2), rel or rel2


def edit_meta(board: Board, edit: Edit, relational: bool, heldout: bool) -> dict:
    """The triplet's ``meta``: the edit type (the per-type metrics' key) and what it names."""
    a = _at(board, edit.cell) if edit.type != "add" else None
    return {
        "type": edit.type,
        "cell": POSITIONS[edit.cell],
        "article": a.noun if a else None,
        "value": CLASSES[edit.label] if edit.label is not None else (POSITIONS[edit.other] if edit.type == "move" else None),
        "other": _at(board, edit.other).noun if edit.type == "swap" else None,  # type: ignore[arg-type]
        "tint": edit.tint,
        "relational": relational,
        "free": edit.type in ("replace", "add"),
        "heldout": heldout,
        "n_articles": len(board),
    }


# -------------------------------------------------------------------------------------- captions

NUMBER_WORDS = ("no", "one", "two", "three", "four")


def _and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1] if items else ""


def caption_board(board: Board, rng: np.random.Generator, params: BoardParams) -> tuple[dict[str, str], str]:
    """A lossy multi-level caption from the labels, as an MLLM's chain of captions would be:
    each article is missed with ``caption_drop_rate``; its class, tint and cell are each left
    out with ``caption_omit_rate`` or misread with ``caption_error_rate``; every level is written
    from that one perception. Returns (levels, final)."""
    draws = rng.random((len(board), 7)).tolist()
    seen = []
    for a, u in zip(board, draws):
        if u[0] < params.caption_drop_rate:
            continue
        out = {}
        for k, (attr, truth, values) in enumerate((("noun", a.noun, CLASSES), ("tint", a.tint, TINT_NAMES), ("cell", a.cell, range(4)))):
            p, q = u[1 + 2 * k], u[2 + 2 * k]
            if p < params.caption_omit_rate:
                out[attr] = None
            elif p < params.caption_omit_rate + params.caption_error_rate:
                wrong = [v for v in values if v != truth]
                out[attr] = wrong[int(q * len(wrong))]
            else:
                out[attr] = truth
        seen.append(out)
    nouns = [o["noun"] or "article" for o in seen]
    n = len(seen)
    levels = {
        "scene": f"a product board with {NUMBER_WORDS[n]} {'article' if n == 1 else 'articles'}",
        "objects": _and_list([with_article(x) for x in nouns]) or "no articles",
        "attributes": "; ".join(f"the {x} is {o['tint']}" for x, o in zip(nouns, seen) if o["tint"]) or "no colours are clear",
        "relations": "; ".join(f"the {x} is {at_position(o['cell'])}" for x, o in zip(nouns, seen) if o["cell"] is not None)
        or "the positions are unclear",
    }
    described = [
        with_article(" ".join(w for w in (o["tint"], x) if w)) + ("" if o["cell"] is None else " " + at_position(o["cell"]))
        for x, o in zip(nouns, seen)
    ]
    return levels, _and_list(described) or "an empty product board"
