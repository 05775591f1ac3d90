"""Modifications of scene graphs: sampling queries, applying them, and making hard distractors.

A query is a list of one to three :class:`Mod` on *distinct* objects of the reference scene. Every
``Mod`` names its object by its cell in the reference, and moves and adds only go to cells that are
empty in the reference and not claimed by another part of the query, so the parts of a composition
commute: the target does not depend on the order in which they are read.

A *free* modification leaves one attribute unsaid (a colour change without the colour, an add
without the size, pattern or colour). Any value of that attribute is then correct: the query's
*correct set* is the target scene under every value, and hard distractors are drawn from outside
it. Only a few of those values are rendered as target images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .language import (
    ADD_TEMPLATES,
    COLOUR_TEMPLATES,
    FREE_COLOUR_TEMPLATES,
    MOVE_TEMPLATES,
    PATTERN_TEMPLATES,
    REMOVE_TEMPLATES,
    SHAPE_TEMPLATES,
    SIZE_TEMPLATES,
    at_position,
    noun_phrase,
    refer,
    to_position,
    with_article,
)
from .params import SynthParams
from .scene import ATTRIBUTES, HELDOUT_PAIRS, POSITIONS, Obj, Scene, empty_cells, make_scene, pick, random_object

Allow = Callable[[str, str], bool]
"""Whether a (modification type, value) pair may be used in a query."""

ADD_FREE_ATTRIBUTES = ("size", "pattern", "colour")
"""Attributes an "add" may leave unsaid."""


def allow_all(mtype: str, value: str) -> bool:
    return True


def allow_not_heldout(mtype: str, value: str) -> bool:
    return (mtype, value) not in HELDOUT_PAIRS


@dataclass(frozen=True)
class Mod:
    """One modification of one object.

    Attributes:
        type: colour, shape, size, pattern, add, remove or move.
        cell: the edited object's cell in the reference scene (for an add, the new object's cell).
        value: the new attribute value; for a move, the destination's position name; ``None`` for
            a free colour change (until resolved), an add or a remove.
        new: for an add, the object added (a free attribute holds an arbitrary placeholder).
        free: the attribute left unsaid, or ``None``.
    """

    type: str
    cell: int
    value: str | None = None
    new: Obj | None = None
    free: str | None = None

    @property
    def dest(self) -> int | None:
        """The cell a move or add puts an object in."""
        if self.type == "move":
            return POSITIONS.index(self.value)  # type: ignore[arg-type]
        if self.type == "add":
            return self.cell
        return None

    def pair(self) -> tuple[str, str] | None:
        """The (type, value) pair this modification states, as matched against HELDOUT_PAIRS."""
        if self.type in ("colour", "shape", "size", "pattern", "move") and self.value is not None:
            if not (self.type == "colour" and self.free):
                return (self.type, self.value)
        return None

    def resolve(self, value: str) -> Mod:
        """This free modification with its unsaid attribute set to ``value``."""
        if self.free is None:
            return self
        if self.type == "colour":
            return replace(self, value=value)
        assert self.new is not None
        return replace(self, new=self.new.with_(**{self.free: value}))

    def free_values(self, scene: Scene) -> tuple[str, ...]:
        """Every value of the unsaid attribute that satisfies the text."""
        if self.free is None:
            return ()
        if self.type == "colour":
            current = _object_at(scene, self.cell).colour
            return tuple(v for v in ATTRIBUTES["colour"] if v != current)
        return ATTRIBUTES[self.free]


def _object_at(scene: Scene, cell: int) -> Obj:
    for o in scene:
        if o.cell == cell:
            return o
    raise KeyError(cell)


def apply(scene: Scene, mods: Sequence[Mod]) -> Scene | None:
    """The scene after ``mods``, or ``None`` when they conflict or leave the canvas empty."""
    objs = {o.cell: o for o in scene}
    for m in mods:
        if m.type in ATTRIBUTES:
            o = objs.get(m.cell)
            if o is None or m.value is None:
                return None
            objs[m.cell] = o.with_(**{m.type: m.value})
        elif m.type == "remove":
            if objs.pop(m.cell, None) is None:
                return None
        elif m.type == "move":
            o = objs.pop(m.cell, None)
            dest = m.dest
            if o is None or dest in objs:
                return None
            objs[dest] = o.with_(cell=dest)
        elif m.type == "add":
            assert m.new is not None
            if m.cell in objs:
                return None
            objs[m.cell] = m.new
        else:
            raise ValueError(f"unknown modification type {m.type!r}")
    return make_scene(list(objs.values())) if objs else None


def _weighted(rng: np.random.Generator, pairs: Sequence[tuple[str, float]]) -> str:
    total = sum(w for _, w in pairs)
    u = rng.random() * total
    for name, w in pairs:
        u -= w
        if u < 0:
            return name
    return pairs[-1][0]


def sample_mod(
    rng: np.random.Generator, scene: Scene, mtype: str, busy: set[int], claimed: set[int], allow: Allow, forced: str | None = None
) -> Mod | None:
    """A random modification of type ``mtype`` avoiding ``busy`` objects and ``claimed`` cells.

    ``forced`` fixes the value (for an attribute change or a move's destination name); ``None`` is
    returned when no object or cell admits the modification.
    """
    if mtype in ATTRIBUTES:
        candidates = []
        for o in scene:
            if o.cell in busy:
                continue
            values = [v for v in ATTRIBUTES[mtype] if v != o.get(mtype) and allow(mtype, v) and (forced is None or v == forced)]
            if values:
                candidates.append((o, values))
        if not candidates:
            return None
        o, values = candidates[int(rng.integers(len(candidates)))]
        return Mod(mtype, o.cell, pick(rng, values))
    if mtype == "remove":
        objs = [o for o in scene if o.cell not in busy]
        return Mod("remove", pick(rng, objs).cell) if objs else None
    free_cells = [c for c in empty_cells(scene) if c not in claimed]
    if mtype == "move":
        objs = [o for o in scene if o.cell not in busy]
        dests = [c for c in free_cells if allow("move", POSITIONS[c]) and (forced is None or POSITIONS[c] == forced)]
        if not objs or not dests:
            return None
        return Mod("move", pick(rng, objs).cell, POSITIONS[pick(rng, dests)])
    if mtype == "add":
        if not free_cells:
            return None
        cell = pick(rng, free_cells)
        return Mod("add", cell, new=random_object(rng, cell))
    raise ValueError(f"unknown modification type {mtype!r}")


def _occupy(m: Mod, busy: set[int], claimed: set[int]) -> None:
    if m.type != "add":
        busy.add(m.cell)
    if m.dest is not None:
        claimed.add(m.dest)


@dataclass(frozen=True)
class Query:
    """A sampled query on a reference scene: its modifications, in reading order."""

    scene: Scene
    mods: tuple[Mod, ...]

    @property
    def free(self) -> Mod | None:
        return next((m for m in self.mods if m.free), None)

    def correct_scenes(self) -> set[Scene]:
        """Every scene that satisfies the text (one per value of an unsaid attribute)."""
        free = self.free
        if free is None:
            return {apply(self.scene, self.mods)}  # type: ignore[arg-type]
        out = set()
        for v in free.free_values(self.scene):
            out.add(apply(self.scene, [m.resolve(v) if m is free else m for m in self.mods]))
        out.discard(None)
        return out  # type: ignore[return-value]

    def resolved(self, value: str | None) -> tuple[Mod, ...]:
        """The modifications with the unsaid attribute (if any) set to ``value``."""
        return tuple(m.resolve(value) if m.free and value is not None else m for m in self.mods)

    def heldout_pairs(self) -> list[tuple[str, str]]:
        return [p for m in self.mods if (p := m.pair()) in HELDOUT_PAIRS]


def sample_query(rng: np.random.Generator, scene: Scene, params: SynthParams, heldout: bool) -> Query | None:
    """A random query on ``scene``, or ``None`` if the drawn combination does not fit the scene.

    Outside the heldout split no part may state a held-out pair. In the heldout split one part is
    forced to a held-out pair (tried in random order until one fits the scene) and the others are
    unrestricted; parts are then shuffled so the held-out one is not always first.
    """
    u = rng.random()
    k = 1 if u < params.n_mods_probs[0] else 2 if u < sum(params.n_mods_probs[:2]) else 3
    allow = allow_all if heldout else allow_not_heldout
    mods: list[Mod] = []
    busy: set[int] = set()
    claimed: set[int] = set()
    forced: Mod | None = None
    if heldout:
        pairs = sorted(HELDOUT_PAIRS)
        for i in rng.permutation(len(pairs)):
            mtype, value = pairs[int(i)]
            forced = sample_mod(rng, scene, mtype, busy, claimed, allow_all, forced=value)
            if forced is not None:
                break
        if forced is None:
            return None
        mods.append(forced)
        _occupy(forced, busy, claimed)
    for _ in range(4 * k):
        if len(mods) == k:
            break
        m = sample_mod(rng, scene, _weighted(rng, params.mod_weights), busy, claimed, allow)
        if m is not None:
            mods.append(m)
            _occupy(m, busy, claimed)
    if len(mods) < k or apply(scene, mods) is None:
        return None
    mods = [mods[int(i)] for i in rng.permutation(len(mods))]
    if rng.random() < params.p_free:
        eligible = [i for i, m in enumerate(mods) if m.type == "add" or (m.type == "colour" and m is not forced)]
        if eligible:
            i = eligible[int(rng.integers(len(eligible)))]
            m = mods[i]
            if m.type == "colour":
                mods[i] = replace(m, value=None, free="colour")
            else:
                mods[i] = replace(m, free=pick(rng, ADD_FREE_ATTRIBUTES))
    return Query(scene, tuple(mods))


def free_variant_values(rng: np.random.Generator, query: Query, params: SynthParams, heldout: bool) -> list[str | None]:
    """Values of the unsaid attribute to render as targets (``[None]`` for a query without one).

    Outside the heldout split a colour change never renders a held-out colour, so no train image
    pair shows a held-out edit even implicitly.
    """
    free = query.free
    if free is None:
        return [None]
    values = [v for v in free.free_values(query.scene) if heldout or free.type != "colour" or allow_not_heldout("colour", v)]
    n = int(rng.integers(params.min_free_variants, params.max_free_variants + 1))
    return [values[int(i)] for i in rng.permutation(len(values))[:n]]


def mod_clause(m: Mod, scene: Scene, rng: np.random.Generator, p_relational: float) -> tuple[str, bool]:
    """The English clause for one modification and whether its reference is relational."""
    if m.type == "add":
        assert m.new is not None
        said = [a for a in ("size", "colour", "pattern", "shape") if a != m.free]
        phrase = with_article(noun_phrase(m.new, said))
        return pick(rng, ADD_TEMPLATES).format(np=phrase, at=at_position(m.cell)), False
    ref, relational = refer(scene, _object_at(scene, m.cell), rng, p_relational)
    if m.type == "colour":
        if m.free:
            return pick(rng, FREE_COLOUR_TEMPLATES).format(ref=ref), relational
        return pick(rng, COLOUR_TEMPLATES).format(ref=ref, value=m.value), relational
    if m.type == "shape":
        return pick(rng, SHAPE_TEMPLATES).format(ref=ref, value=m.value), relational
    if m.type == "size":
        return pick(rng, SIZE_TEMPLATES[m.value]).format(ref=ref), relational  # type: ignore[index]
    if m.type == "pattern":
        templates = PATTERN_TEMPLATES[m.value]  # type: ignore[index]
        return pick(rng, templates).format(ref=ref), relational
    if m.type == "remove":
        return pick(rng, REMOVE_TEMPLATES).format(ref=ref), relational
    if m.type == "move":
        dest = m.dest
        assert dest is not None
        template = pick(rng, MOVE_TEMPLATES)
        return template.format(ref=ref, to=to_position(dest), at=at_position(dest)), relational
    raise ValueError(f"unknown modification type {m.type!r}")


def mod_meta(m: Mod, scene: Scene) -> dict:
    """The ``meta.mods`` entry of one modification.

    ``value`` is the stated value: the new attribute value (``None`` for a free colour change),
    the destination name of a move, the stated description of an added object, or the full
    description of a removed object. ``cell`` is [row, col] of the edited object in the
    reference (of the new object for an add).
    """
    if m.type == "add":
        assert m.new is not None
        said = [a for a in ("size", "colour", "pattern", "shape") if a != m.free]
        value = noun_phrase(m.new, said)
    elif m.type == "remove":
        value = noun_phrase(_object_at(scene, m.cell))
    else:
        value = m.value
    return {"type": m.type, "value": value, "cell": [m.cell // 3, m.cell % 3], "free": m.free}


# ------------------------------------------------------------------------------- hard distractors


def _other_value(rng: np.random.Generator, query: Query, mods: Sequence[Mod]) -> Scene | None:
    """The same object (or the same added object) given a different value."""
    scene = query.scene
    changeable = ("colour", "shape", "pattern", "move", "add")  # a size has no third value
    options = [i for i, m in enumerate(mods) if m.type in changeable]
    if not options:
        return None
    i = options[int(rng.integers(len(options)))]
    m = mods[i]
    claimed = {d for j, o in enumerate(mods) if j != i and (d := o.dest) is not None}
    if m.type in ("colour", "shape", "pattern"):
        if m.free:  # every other colour is also correct
            return None
        current = _object_at(scene, m.cell).get(m.type)
        values = [v for v in ATTRIBUTES[m.type] if v not in (current, m.value)]
        m2 = replace(m, value=pick(rng, values))
    elif m.type == "move":
        dests = [c for c in empty_cells(scene) if c not in claimed and c != m.dest]
        if not dests:
            return None
        m2 = replace(m, value=POSITIONS[pick(rng, dests)])
    else:  # add: change one stated attribute or the cell
        assert m.new is not None
        stated = [a for a in ("shape", "colour", "size", "pattern", "cell") if a != m.free]
        attribute = pick(rng, stated)
        if attribute == "cell":
            m2 = _add_elsewhere(rng, scene, m, claimed)
            if m2 is None:
                return None
        else:
            values = [v for v in ATTRIBUTES[attribute] if v != m.new.get(attribute)]
            m2 = replace(m, new=m.new.with_(**{attribute: pick(rng, values)}))
    return apply(scene, [*mods[:i], m2, *mods[i + 1 :]])


def _add_elsewhere(rng: np.random.Generator, scene: Scene, m: Mod, claimed: set) -> Mod | None:
    """The same "add" in another empty cell no other edit claims (None if there is none)."""
    assert m.new is not None
    dests = [c for c in empty_cells(scene) if c not in claimed and c != m.cell]
    if not dests:
        return None
    cell = pick(rng, dests)
    return replace(m, cell=cell, new=m.new.with_(cell=cell))


def _other_object(rng: np.random.Generator, query: Query, mods: Sequence[Mod]) -> Scene | None:
    """Another object given the same change (the intended object left as it was)."""
    scene = query.scene
    i = int(rng.integers(len(mods)))
    m = mods[i]
    busy = {o.cell for j, o in enumerate(mods) if j != i and o.type != "add"}
    claimed = {d for j, o in enumerate(mods) if j != i and (d := o.dest) is not None}
    if m.type == "add":
        m2 = _add_elsewhere(rng, scene, m, claimed)
        if m2 is None:
            return None
    else:
        others = [o for o in scene if o.cell != m.cell and o.cell not in busy and (m.type not in ATTRIBUTES or o.get(m.type) != m.value)]
        if not others:
            return None
        m2 = replace(m, cell=pick(rng, others).cell)
    return apply(scene, [*mods[:i], m2, *mods[i + 1 :]])


def _partial(rng: np.random.Generator, query: Query, mods: Sequence[Mod]) -> Scene | None:
    """A composition with one or more parts left out."""
    if len(mods) < 2:
        return None
    keep = int(rng.integers(1, len(mods)))
    chosen = sorted(int(i) for i in rng.permutation(len(mods))[:keep])
    return apply(query.scene, [mods[i] for i in chosen])


def _random_edit(rng: np.random.Generator, query: Query, mods: Sequence[Mod], params: SynthParams) -> Scene | None:
    """A random single edit of the reference."""
    m = sample_mod(rng, query.scene, _weighted(rng, params.mod_weights), set(), set(), allow_all)
    return None if m is None else apply(query.scene, [m])


def _extra(rng: np.random.Generator, query: Query, mods: Sequence[Mod], params: SynthParams) -> Scene | None:
    """The requested edit plus one more on an untouched object."""
    busy: set[int] = set()
    claimed: set[int] = set()
    for m in mods:
        _occupy(m, busy, claimed)
    extra = sample_mod(rng, query.scene, _weighted(rng, params.mod_weights), busy, claimed, allow_all)
    return None if extra is None else apply(query.scene, [*mods, extra])


def sample_distractors(
    rng: np.random.Generator, query: Query, variant_values: Sequence[str | None], params: SynthParams, avoid: set[Scene]
) -> list[Scene]:
    """Up to ``params.n_distractors`` distinct scenes, each a small edit away from the reference.

    ``avoid`` must hold the reference and the query's correct scenes; nothing in it is returned,
    so a distractor never satisfies the text. A free query's distractors start from one of its
    rendered variants. Fewer than asked are returned only when the scene admits no more.
    """
    out: list[Scene] = []
    seen = set(avoid)
    for _ in range(40 * params.n_distractors):
        if len(out) >= params.n_distractors:
            break
        kind = _weighted(rng, params.distractor_weights)
        mods = query.resolved(pick(rng, variant_values))
        if kind == "other_value":
            d = _other_value(rng, query, mods)
        elif kind == "other_object":
            d = _other_object(rng, query, mods)
        elif kind == "partial":
            d = _partial(rng, query, mods)
        elif kind == "extra":
            d = _extra(rng, query, mods, params)
        else:
            d = _random_edit(rng, query, mods, params)
        if d is not None and d not in seen:
            seen.add(d)
            out.append(d)
    return out
