"""Every knob of the synthetic benchmark, in one frozen dataclass, and the named difficulty levels.

To tune a level (say, so that a trained model lands at a target test R@1), change the numbers in
:data:`DIFFICULTIES` or pass ``dataclasses.replace(DIFFICULTIES["standard"], n_distractors=8)`` as
``difficulty`` to :func:`~csmcir.data.synthetic.generate`. The knobs that move retrieval difficulty
most, roughly in order: ``n_distractors`` (more near-duplicates per query), ``max_objects`` (longer
referring expressions, more clutter), ``n_mods_probs`` (more compositions), ``p_relational``
(references that need spatial reasoning), ``image_size`` (smaller patterns are harder to see) and
the ``caption_*`` rates (noisier target captions). The full parameter set is stored in
``benchmark.json`` and compared on reuse, so a tuned level never silently reuses an old folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ...errors import CsmcirError

GENERATOR_VERSION = "2"
"""Bump whenever the same (seed, params) would produce different files."""

MOD_TYPES = ("colour", "shape", "size", "pattern", "add", "remove", "move")
"""Single modification types, in the order used for weights and reports."""

DISTRACTOR_KINDS = ("other_value", "other_object", "partial", "random", "extra")
"""Hard-distractor strategies (see :mod:`csmcir.data.synthetic.edits`)."""


@dataclass(frozen=True)
class SynthParams:
    """All settings of one synthetic benchmark.

    Attributes:
        name: difficulty name recorded in ``benchmark.json``.
        image_size: side of the square PNGs, in pixels (default 64).
        supersample: objects are drawn at ``supersample`` times the resolution and downsampled with
            LANCZOS, so thin outlines, stripes and checks survive at 64 px (default 4).
        large_scale: extent of a large object as a fraction of a grid cell (default 0.78).
        small_scale: extent of a small object as a fraction of a grid cell (default 0.45).
        position_jitter: maximum random offset of an object from its cell centre, as a fraction
            of the cell (default 0.1, i.e. +-2 px at 64 px). Sampled afresh for every image, so two
            images of the same scene are never pixel-identical.
        colour_jitter: maximum per-channel RGB offset added to each object's colour (default 6).
        min_objects: fewest objects in a reference scene.
        max_objects: most objects in a reference scene (at most 9, the grid's cells).
        n_mods_probs: probabilities of a query having 1, 2 or 3 modifications (on distinct
            objects); they must sum to 1.
        mod_weights: relative frequency of each single modification type, as (type, weight) pairs.
        p_relational: probability that an object is referred to relationally ("the shape left of
            the red circle") when such a unique reference exists.
        p_free: probability that a query with an "add" or a colour change leaves one attribute of
            it unsaid (the add's size, pattern or colour; the new colour), giving several correct
            targets. About 40% of standard queries qualify, so ~6% of them get several targets.
        min_free_variants: fewest target images rendered for a query with an unsaid attribute.
        max_free_variants: most target images rendered for such a query.
        n_distractors: hard distractors per query in val, test and heldout.
        distractor_weights: relative frequency of each distractor strategy, as (kind, weight) pairs;
            kinds are ``other_value`` (the same object given another value), ``other_object``
            (another object given the same change), ``partial`` (a composition with parts left
            out), ``random`` (a random single edit of the reference) and ``extra`` (the correct edit
            plus one more).
        n_train: train queries.
        n_train_negatives: hard distractors rendered per train query and listed as its
            ``negatives`` (training uses them as hard negatives; 0 = none).
        n_val: validation queries.
        n_test: test queries.
        n_heldout: queries of the ``heldout`` split (each uses at least one held-out pair).
        caption_omit_rate: probability that the captioner leaves out one attribute mention
            (shape, colour, size, pattern or position) of an object it describes.
        caption_error_rate: probability that an attribute mention is replaced by a wrong value.
        caption_drop_object_rate: probability that the captioner leaves out an object entirely.
    """

    name: str
    image_size: int = 64
    supersample: int = 4
    large_scale: float = 0.78
    small_scale: float = 0.45
    position_jitter: float = 0.1
    colour_jitter: int = 6
    min_objects: int = 1
    max_objects: int = 2
    n_mods_probs: tuple[float, float, float] = (0.88, 0.10, 0.02)
    mod_weights: tuple[tuple[str, float], ...] = (
        ("colour", 1.0),
        ("shape", 1.0),
        ("size", 1.0),
        ("pattern", 1.0),
        ("add", 1.0),
        ("remove", 1.0),
        ("move", 1.0),
    )
    p_relational: float = 0.1
    p_free: float = 0.15
    min_free_variants: int = 2
    max_free_variants: int = 3
    n_distractors: int = 4
    distractor_weights: tuple[tuple[str, float], ...] = (
        ("other_value", 1.0),
        ("other_object", 1.0),
        ("partial", 1.0),
        ("random", 0.5),
        ("extra", 0.5),
    )
    n_train: int = 15000
    n_train_negatives: int = 1
    n_val: int = 1000
    n_test: int = 2000
    n_heldout: int = 1000
    caption_omit_rate: float = 0.15
    caption_error_rate: float = 0.05
    caption_drop_object_rate: float = 0.05

    def __post_init__(self) -> None:
        problems = []
        if self.image_size < 16:
            problems.append("image_size must be at least 16")
        if self.supersample < 1:
            problems.append("supersample must be at least 1")
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            problems.append("need 1 <= min_objects <= max_objects <= 9")
        if len(self.n_mods_probs) != 3 or abs(sum(self.n_mods_probs) - 1) > 1e-6:
            problems.append("n_mods_probs must be three probabilities summing to 1")
        if any(p < 0 for p in self.n_mods_probs):
            problems.append("n_mods_probs must be non-negative")
        for label, pairs, known in (
            ("mod_weights", self.mod_weights, MOD_TYPES),
            ("distractor_weights", self.distractor_weights, DISTRACTOR_KINDS),
        ):
            names = [k for k, _ in pairs]
            if set(names) - set(known) or len(set(names)) != len(names):
                problems.append(f"{label} names must be distinct and among {', '.join(known)}")
            if any(w < 0 for _, w in pairs) or sum(w for _, w in pairs) <= 0:
                problems.append(f"{label} must be non-negative with a positive sum")
        if not 1 <= self.min_free_variants <= self.max_free_variants:
            problems.append("need 1 <= min_free_variants <= max_free_variants")
        for rate in ("p_relational", "p_free", "caption_omit_rate", "caption_error_rate", "caption_drop_object_rate"):
            if not 0 <= getattr(self, rate) <= 1:
                problems.append(f"{rate} must be in [0, 1]")
        if self.caption_omit_rate + self.caption_error_rate > 1:
            problems.append("caption_omit_rate + caption_error_rate must be at most 1")
        if min(self.n_distractors, self.n_train_negatives, self.n_train, self.n_val, self.n_test, self.n_heldout) < 0:
            problems.append("counts must be non-negative")
        if problems:
            raise CsmcirError(f"invalid synthetic parameters {self.name!r}: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        """The parameters as plain JSON values (tuples become lists), as in benchmark.json."""
        out = asdict(self)
        for f in fields(self):
            if isinstance(out[f.name], tuple):
                out[f.name] = [list(v) if isinstance(v, tuple) else v for v in out[f.name]]
        return out


_MEDIUM = SynthParams(
    name="medium", min_objects=2, max_objects=3, n_mods_probs=(0.85, 0.12, 0.03), p_relational=0.2, n_distractors=5, n_train=16000
)

DIFFICULTIES: dict[str, SynthParams] = {
    # Quick smoke tests: generation takes a few seconds.
    "easy": SynthParams(
        name="easy",
        min_objects=1,
        max_objects=3,
        n_mods_probs=(1.0, 0.0, 0.0),
        n_distractors=3,
        n_train=2000,
        n_val=300,
        n_test=300,
        n_heldout=200,
    ),
    # The default benchmark; the class defaults above are its values: 1-2 objects, mostly
    # single edits, 4 hard distractors (with the target and the reference, CIRR's image-set size
    # of six). Calibrated against the default fit (about 13 CPU minutes): docs/benchmarks.md.
    "standard": SynthParams(name="standard"),
    # Headroom: 2-3 objects, more compositions and relational references, 5 distractors.
    "medium": _MEDIUM,
    # More headroom: up to 5 objects, nearly half the queries compositions, 6 distractors.
    "hard": replace(_MEDIUM, name="hard", max_objects=5, n_mods_probs=(0.55, 0.30, 0.15), p_relational=0.25, n_distractors=6),
}
"""Named difficulty levels: ``easy``, ``standard``, ``medium`` and ``hard``."""


def resolve_params(difficulty: str | SynthParams) -> SynthParams:
    """A difficulty name from :data:`DIFFICULTIES`, or a :class:`SynthParams` passed through."""
    if isinstance(difficulty, SynthParams):
        return difficulty
    try:
        return DIFFICULTIES[difficulty]
    except (KeyError, TypeError):
        raise CsmcirError(f"unknown difficulty {difficulty!r} (known: {', '.join(DIFFICULTIES)})") from None
