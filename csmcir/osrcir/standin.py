"""A STAND-IN for OSrCIR's MLLM on the synthetic benchmark: reason over the reference's caption.

NOT a real MLLM. It knows the reference image only through its lossy MCoT caption (the one csmcir
trains on, with its omitted and wrong attributes) and reads the modification text perfectly: the
generator's own structured edit (``meta.mods``) stands in for a model that understands the text.
It parses the caption's final sentence into objects, applies the edit, and writes the target
description in the captioner's own phrasing. Retrieved against the gallery's captions
(:class:`~csmcir.osrcir.retrieve.CaptionRetriever`), that is the training-free ceiling of
reason-then-retrieve here: every error left comes from what the caption lost and from the text
matcher, none from reasoning. Its records say ``model: osrcir-standin (...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import CsmcirError

__all__ = ["STANDIN_MODEL_ID", "StandinReasoner", "parse_final_caption", "describe_objects"]

STANDIN_MODEL_ID = "osrcir-standin (caption-reasoning stand-in for an MLLM, synthetic benchmark only)"


@dataclass(frozen=True)
class _Obj:
    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    pattern: str | None = None
    cell: int | None = None


def _vocab():
    from ..data.synthetic.scene import ATTRIBUTES, POSITIONS

    word = {v: a for a, values in ATTRIBUTES.items() for v in values}
    return word, POSITIONS


def _parse_phrase(phrase: str, cell: int | None = None) -> _Obj:
    """ "a small red striped circle" / "large cyan hollow triangle" -> an object (words it does not know: an error)."""
    word, _ = _vocab()
    words = phrase.split()
    if words and words[0] in ("a", "an"):
        words = words[1:]
    fields: dict = {"cell": cell}
    for w in words:
        if w == "shape":
            continue
        if w not in word:
            raise CsmcirError(f"the stand-in reasoner cannot read {w!r} in {phrase!r}")
        fields[word[w]] = w
    return _Obj(**fields)


def parse_final_caption(final: str) -> list[_Obj]:
    """The objects of a synthetic caption's final sentence (the captioner's fixed grammar:
    ``a <size> <colour> <pattern> <shape> at the <position>`` joined by ", " and " and ")."""
    _, positions = _vocab()
    final = final.strip()
    if not final or final == "an empty light canvas":
        return []
    parts = [p for chunk in final.split(", ") for p in chunk.split(" and ")]
    out = []
    for p in parts:
        cell = None
        for c, name in enumerate(positions):
            suffix = " in the center" if name == "center" else f" at the {name}"
            if p.endswith(suffix):
                cell, p = c, p[: -len(suffix)]
                break
        out.append(_parse_phrase(p, cell))
    return out


def describe_objects(objects: list[_Obj]) -> str:
    """The captioner's final sentence for ``objects`` (unknown attributes left out)."""
    from ..data.synthetic.captioner import _and_list
    from ..data.synthetic.language import at_position, with_article

    described = []
    for o in objects:
        words = [w for w in (o.size, o.colour, o.pattern) if w] + [o.shape or "shape"]
        described.append(with_article(" ".join(words)) + ("" if o.cell is None else " " + at_position(o.cell)))
    return _and_list(described) if described else "an empty light canvas"


def apply_mods(objects: list[_Obj], mods: list[dict]) -> tuple[list[_Obj], list[str]]:
    """``objects`` after the edit ``mods`` (``meta.mods`` entries), and notes on what could not be
    applied because the caption does not place the edited object (the stand-in then keeps it)."""
    from ..data.synthetic.scene import ATTRIBUTES, POSITIONS

    objs = list(objects)
    notes = []
    for m in mods:
        cell = 3 * m["cell"][0] + m["cell"][1]
        at = next((k for k, o in enumerate(objs) if o.cell == cell), None)
        kind = m["type"]
        if kind == "add":
            objs.append(replace(_parse_phrase(m["value"]), cell=cell))
        elif at is None:
            notes.append(f"{kind}: the caption has no object at the {POSITIONS[cell]}")
        elif kind == "remove":
            objs.pop(at)
        elif kind == "move":
            objs[at] = replace(objs[at], cell=POSITIONS.index(m["value"]))
        elif kind in ATTRIBUTES:
            objs[at] = replace(objs[at], **{kind: m["value"]})  # a free colour change: None, colour unsaid
        else:
            raise CsmcirError(f"unknown modification type {kind!r}")
    return objs, notes


class StandinReasoner:
    """Answers OSrCIR's prompt for synthetic-benchmark queries, in the template's format."""

    needs_images = False
    model_id = STANDIN_MODEL_ID

    def __init__(self, dataset, template):
        self.template = template
        self.captions = dataset.captions()
        if not self.captions:
            raise CsmcirError(f"{dataset.root}: no captions.jsonl; the stand-in reasons over the reference's caption")

    def settings(self) -> dict:
        return {}

    def answer(self, triplet) -> str:
        if "mods" not in triplet.meta:
            raise CsmcirError(f"query {triplet.id!r} has no meta.mods: the stand-in reasoner works on the synthetic benchmark only")
        cap = self.captions.get(triplet.reference)
        if cap is None:
            raise CsmcirError(f"no caption for reference image {triplet.reference!r} of query {triplet.id!r}")
        objects, notes = apply_mods(parse_final_caption(cap.final), triplet.meta["mods"])
        levels = {"caption": cap.final, "thoughts": triplet.text, "reflection": "; ".join(notes) or "every change is supported"}
        return self.template.render(levels, describe_objects(objects))
