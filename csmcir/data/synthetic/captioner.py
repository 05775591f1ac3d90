"""A lossy multi-level captioner: a cheap, deterministic stand-in for an MLLM's chain of captions.

It first *perceives* the scene with noise, once: each object is missed with
``caption_drop_object_rate``; each of its attribute mentions (shape, colour, size, pattern,
position) is left out with ``caption_omit_rate`` or replaced by a wrong value with
``caption_error_rate``. Every level is then written from that one noisy perception, so the levels
agree with each other the way an MLLM's would (a misread colour is misread everywhere):

* ``scene``: "a light canvas with 3 shapes"
* ``objects``: "a circle, a square and a triangle"
* ``attributes``: "the circle is large, red and striped; the square is small and blue"
* ``relations``: "the circle is at the top left; the square is right of the circle"
* ``final``: "a large red striped circle at the top left, a small blue square in the center and
  a triangle at the bottom right"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..custom import Caption
from .language import at_position, with_article
from .params import SynthParams
from .scene import ATTRIBUTES, Scene

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PERCEIVED = ("shape", "colour", "size", "pattern", "cell")


@dataclass(frozen=True)
class Perceived:
    """An object as the captioner saw it; ``None`` marks an attribute it did not mention."""

    shape: str | None
    colour: str | None
    size: str | None
    pattern: str | None
    cell: int | None

    @property
    def noun(self) -> str:
        return self.shape or "shape"

    def phrase(self) -> str:
        """ "large red striped circle" with whatever attributes were perceived."""
        words = [w for w in (self.size, self.colour, self.pattern) if w]
        return " ".join([*words, self.noun])


def perceive(scene: Scene, rng: np.random.Generator, params: SynthParams) -> list[Perceived]:
    """The noisy perception of ``scene``.

    All random numbers come from one draw of ``(objects, 11)`` uniforms (one for dropping the
    object, then per attribute one for omit/error and one to choose the wrong value), which is
    several times faster than scalar draws and makes the stream depend only on the object count.
    """
    draws = rng.random((len(scene), 1 + 2 * len(PERCEIVED)))
    omit, error = params.caption_omit_rate, params.caption_error_rate
    out = []
    for obj, u in zip(scene, draws.tolist()):
        if u[0] < params.caption_drop_object_rate:
            continue
        seen: dict[str, object] = {}
        for k, attribute in enumerate(PERCEIVED):
            p, q = u[1 + 2 * k], u[2 + 2 * k]
            truth = obj.cell if attribute == "cell" else obj.get(attribute)
            if p < omit:
                seen[attribute] = None
            elif p < omit + error:
                values = range(9) if attribute == "cell" else ATTRIBUTES[attribute]
                wrong = [v for v in values if v != truth]
                seen[attribute] = wrong[int(q * len(wrong))]
            else:
                seen[attribute] = truth
        out.append(Perceived(**seen))  # type: ignore[arg-type]
    return out


def _and_list(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _names(objects: list[Perceived]) -> list[str]:
    """ "the circle", or "the first circle", "the second circle" when a noun repeats."""
    ordinals = (
        "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth"
    )  # fmt: skip
    counts: dict[str, int] = {}
    for o in objects:
        counts[o.noun] = counts.get(o.noun, 0) + 1
    seen: dict[str, int] = {}
    names = []
    for o in objects:
        if counts[o.noun] == 1:
            names.append(f"the {o.noun}")
        else:
            names.append(f"the {ordinals[seen.get(o.noun, 0)]} {o.noun}")
            seen[o.noun] = seen.get(o.noun, 0) + 1
    return names


def _relation(cell: int, anchor: int) -> str | None:
    """ "below and left of" etc.: where ``cell`` lies relative to ``anchor``; None if the same."""
    dr, dc = cell // 3 - anchor // 3, cell % 3 - anchor % 3
    vertical = "above" if dr < 0 else "below" if dr > 0 else ""
    horizontal = "left of" if dc < 0 else "right of" if dc > 0 else ""
    if vertical and horizontal:
        return f"{vertical} and {horizontal}"
    return vertical or horizontal or None


def caption_scene(scene: Scene, rng: np.random.Generator, params: SynthParams) -> Caption:
    """A lossy multi-level caption of ``scene`` (``image_id`` is left empty for the caller)."""
    objects = perceive(scene, rng, params)
    names = _names(objects)
    n = len(objects)
    noun = "shape" if n == 1 else "shapes"
    scene_level = f"a light canvas with {NUMBER_WORDS[n]} {noun}"
    objects_level = _and_list([with_article(o.noun) for o in objects]) or "no shapes"

    attribute_parts = []
    for name, o in zip(names, objects):
        words = [w for w in (o.size, o.colour, o.pattern) if w]
        if words:
            attribute_parts.append(f"{name} is {_and_list(words)}")
    attributes_level = "; ".join(attribute_parts) or "no attributes are clear"

    relation_parts = []
    anchor: tuple[str, int] | None = None
    for name, o in zip(names, objects):
        if o.cell is None:
            continue
        relation = None if anchor is None else _relation(o.cell, anchor[1])
        if relation is None:
            relation_parts.append(f"{name} is {at_position(o.cell)}")
        else:
            relation_parts.append(f"{name} is {relation} {anchor[0]}")  # type: ignore[index]
        anchor = (name, o.cell)
    relations_level = "; ".join(relation_parts) or "the positions are unclear"

    described = [with_article(o.phrase()) + ("" if o.cell is None else " " + at_position(o.cell)) for o in objects]
    final = _and_list(described) if described else "an empty light canvas"
    return Caption(
        image_id="",
        levels={"scene": scene_level, "objects": objects_level, "attributes": attributes_level, "relations": relations_level},
        final=final,
    )
