"""The vocabulary of the synthetic world and its scene graphs.

A scene is a tuple of :class:`Obj` sorted by grid cell (a 3x3 grid, cells numbered 0..8 in
reading order); two objects never share a cell. Because an object carries only its semantic
attributes (shape, colour, size, pattern, cell) and no pixel jitter, the scene tuple itself is the
*canonical scene*: two images show the same thing exactly when their scene tuples are equal. Pixel
jitter and colour tints are sampled separately, per image, when a scene is materialised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 185),
    "orange": (255, 127, 14),
    "cyan": (23, 190, 207),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
PATTERNS = ("solid", "striped", "hollow", "checkered")
BACKGROUND = (242, 242, 236)
"""The light canvas colour."""

POSITIONS = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)  # fmt: skip
"""Position names of the nine cells, indexed by cell number (``row * 3 + col``)."""

ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZES, "pattern": PATTERNS}
"""The attribute families of an object and their values (the position is the cell)."""

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("colour", "purple"), ("shape", "diamond"), ("pattern", "checkered"), ("move", "top right")}
)
"""(modification type, value) pairs that no train/val/test query uses; the ``heldout`` split tests
them. Objects with these attribute values still appear in every split: only the *edit* is held
out. Types must be among colour, shape, size, pattern and move."""


@dataclass(frozen=True, slots=True)
class Obj:
    """One object: semantic attributes and its grid cell (0..8)."""

    cell: int
    shape: str
    colour: str
    size: str
    pattern: str

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def get(self, attribute: str) -> str:
        return getattr(self, attribute)

    def with_(self, **changes) -> Obj:
        return replace(self, **changes)

    def to_json(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "pattern": self.pattern, "cell": [self.row, self.col]}


Scene = tuple[Obj, ...]


def make_scene(objects: Sequence[Obj]) -> Scene:
    """Sort objects by cell into a canonical scene; two objects in one cell is a bug."""
    scene = tuple(sorted(objects, key=lambda o: o.cell))
    if len({o.cell for o in scene}) != len(scene):
        raise ValueError(f"two objects share a cell: {scene}")
    return scene


def pick(rng: np.random.Generator, seq: Sequence):
    """A uniformly random element (indexing is much faster than ``rng.choice`` on short tuples)."""
    return seq[int(rng.integers(len(seq)))]


def random_object(rng: np.random.Generator, cell: int) -> Obj:
    return Obj(cell=cell, shape=pick(rng, SHAPES), colour=pick(rng, COLOUR_NAMES), size=pick(rng, SIZES), pattern=pick(rng, PATTERNS))


def sample_scene(rng: np.random.Generator, n_objects: int) -> Scene:
    """``n_objects`` objects with uniform attributes in distinct random cells."""
    cells = rng.permutation(9)[:n_objects]
    return make_scene([random_object(rng, int(c)) for c in cells])


def empty_cells(scene: Scene) -> list[int]:
    used = {o.cell for o in scene}
    return [c for c in range(9) if c not in used]


def scene_to_json(image_id: str, scene: Scene) -> dict:
    """One line of ``scenes.jsonl``."""
    return {"image_id": image_id, "objects": [o.to_json() for o in scene]}


def scene_from_json(record: dict) -> Scene:
    """Inverse of :func:`scene_to_json` (without the id), for tools that read ``scenes.jsonl``."""
    return make_scene(
        [
            Obj(cell=3 * o["cell"][0] + o["cell"][1], shape=o["shape"], colour=o["colour"], size=o["size"], pattern=o["pattern"])
            for o in record["objects"]
        ]
    )
