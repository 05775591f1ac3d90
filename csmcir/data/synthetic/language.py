"""Words for the synthetic world: referring expressions and modification phrasings.

Referring expressions always describe an object in the *reference* scene, with the fewest
attributes that single it out (shape, then colour + shape, then size and pattern added, then its
position), or, with probability ``p_relational``, by a unique spatial relation to another object
("the shape left of the red circle"). Each modification type has several phrasings, chosen at
random, so a model cannot key on one template.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .scene import POSITIONS, Obj, Scene, pick

# Attribute combinations tried in order for a non-relational description; the first that matches
# exactly one object of the scene is used, and the cell is the last resort.
_DESCRIPTION_LEVELS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour", "shape"),
    ("size", "colour", "shape"),
    ("colour", "pattern", "shape"),
    ("size", "colour", "pattern", "shape"),
)

RELATIONS = ("left of", "right of", "above", "below")


def _satisfies(obj: Obj, relation: str, anchor: Obj) -> bool:
    """Relations by column or row order: any row for left/right, any column for above/below."""
    if relation == "left of":
        return obj.col < anchor.col
    if relation == "right of":
        return obj.col > anchor.col
    if relation == "above":
        return obj.row < anchor.row
    return obj.row > anchor.row


def at_position(cell: int) -> str:
    """ "at the top left", "in the center"."""
    return "in the center" if POSITIONS[cell] == "center" else f"at the {POSITIONS[cell]}"


def to_position(cell: int) -> str:
    """ "to the top left", "to the center"."""
    return f"to the {POSITIONS[cell]}"


def noun_phrase(obj: Obj, attributes: Sequence[str] = ("size", "colour", "pattern", "shape")) -> str:
    """Attributes of ``obj`` in the fixed English order size, colour, pattern, shape."""
    order = ("size", "colour", "pattern", "shape")
    return " ".join(obj.get(a) for a in order if a in attributes)


def with_article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def describe(scene: Scene, obj: Obj) -> str:
    """The minimal unique non-relational description of ``obj`` in ``scene`` ("the red circle")."""
    for level in _DESCRIPTION_LEVELS:
        key = tuple(obj.get(a) for a in level)
        if sum(1 for o in scene if tuple(o.get(a) for a in level) == key) == 1:
            return "the " + noun_phrase(obj, level)
    return f"the {obj.shape} {at_position(obj.cell)}"


def relational_candidates(scene: Scene, obj: Obj) -> list[tuple[str, Obj]]:
    """(relation, anchor) pairs under which ``obj`` is the only object in that relation."""
    out = []
    for anchor in scene:
        if anchor.cell == obj.cell:
            continue
        for relation in RELATIONS:
            if _satisfies(obj, relation, anchor) and not any(
                o.cell not in (obj.cell, anchor.cell) and _satisfies(o, relation, anchor) for o in scene
            ):
                out.append((relation, anchor))
    return out


def refer(scene: Scene, obj: Obj, rng: np.random.Generator, p_relational: float) -> tuple[str, bool]:
    """A referring expression for ``obj`` and whether it is relational.

    The random draw is made for every call (even when no relational reference exists) so that the
    random stream, and with it the rest of the benchmark, does not depend on the scene's layout.
    """
    want_relational = rng.random() < p_relational
    if want_relational:
        candidates = relational_candidates(scene, obj)
        if candidates:
            relation, anchor = candidates[int(rng.integers(len(candidates)))]
            head = pick(rng, ("shape", "object"))
            return f"the {head} {relation} {describe(scene, anchor)}", True
    return describe(scene, obj), False


# ------------------------------------------------------------------------ modification phrasings

COLOUR_TEMPLATES = (
    "make {ref} {value}",
    "change the colour of {ref} to {value}",
    "paint {ref} {value}",
    "colour {ref} {value}",
    "recolour {ref} in {value}",
)
FREE_COLOUR_TEMPLATES = ("change the colour of {ref}", "give {ref} a different colour", "recolour {ref}", "paint {ref} another colour")
SHAPE_TEMPLATES = (
    "turn {ref} into a {value}",
    "change {ref} into a {value}",
    "make {ref} a {value}",
    "replace {ref} with a {value} of the same colour",
)
SIZE_TEMPLATES = {
    "large": ("make {ref} bigger", "enlarge {ref}", "make {ref} larger", "scale up {ref}"),
    "small": ("make {ref} smaller", "shrink {ref}", "make {ref} small", "scale down {ref}"),
}
PATTERN_TEMPLATES = {
    "striped": ("make {ref} striped", "give {ref} a striped pattern", "add stripes to {ref}"),
    "checkered": ("make {ref} checkered", "give {ref} a checkered pattern", "fill {ref} with a checkerboard pattern"),
    "hollow": ("make {ref} hollow", "leave only the outline of {ref}", "empty out {ref}"),
    "solid": ("make {ref} solid", "fill {ref} in completely", "give {ref} a solid fill"),
}
ADD_TEMPLATES = ("add {np} {at}", "put {np} {at}", "place {np} {at}", "insert {np} {at}")
REMOVE_TEMPLATES = ("remove {ref}", "delete {ref}", "take away {ref}", "get rid of {ref}")
MOVE_TEMPLATES = ("move {ref} {to}", "put {ref} {at}", "shift {ref} {to}", "place {ref} {at}")

TWO_JOINERS = ("{0} and {1}", "{0}, then {1}", "{0} and also {1}", "first {0}, then {1}")
THREE_JOINERS = ("{0}, {1} and {2}", "{0}, {1}, then {2}", "{0}, then {1} and {2}")


def join_clauses(clauses: Sequence[str], rng: np.random.Generator) -> str:
    """One instruction from 1-3 clauses ("make the red circle blue and remove the square")."""
    if len(clauses) == 1:
        return clauses[0]
    joiners = TWO_JOINERS if len(clauses) == 2 else THREE_JOINERS
    return pick(rng, joiners).format(*clauses)
