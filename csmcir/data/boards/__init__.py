"""A composed-retrieval benchmark of real photographs, offline: Fashion-MNIST product boards.

Boards of 1-4 real Zalando article photos (Debian's ``dataset-fashion-mnist``) on a 2 x 2 grid;
queries replace an article by another class ("swap the sandal for a sneaker"), remove, add, move
or swap articles, with relational references and several phrasings. Untouched articles keep their
exact photo in the target, so a retriever must keep instance identity from pixels; a replace or an
add leaves the new photo free, so it has several correct targets. Every evaluation query brings
hard distractors (the same board under other edits, or the right edit with another photo of a
kept article) into its gallery. Train boards use only the training photos; validation and test
boards only the test photos (disjoint halves). Written in the custom format::

    from csmcir.data.boards import generate
    root = generate("data/fashion_boards", seed=0, difficulty="standard")

or ``csmcir synth --source fashion --out data/fashion_boards``; ``configs/fashion.yaml`` trains
on it.
"""

from .board import DIFFICULTIES, EDIT_TYPES, HELDOUT_PAIRS, BoardParams
from .builder import GENERATOR_VERSION, SPLITS, ensure_benchmark, generate, read_boards
from .photos import CLASSES, available, load_photos

__all__ = [
    "CLASSES",
    "DIFFICULTIES",
    "EDIT_TYPES",
    "GENERATOR_VERSION",
    "HELDOUT_PAIRS",
    "SPLITS",
    "BoardParams",
    "available",
    "ensure_benchmark",
    "generate",
    "load_photos",
    "read_boards",
]
