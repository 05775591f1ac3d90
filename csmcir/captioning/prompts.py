"""Versioned MCoT prompt templates: ask an MLLM to reason level by level, then conclude.

A template names its levels (from the whole image down to fine attributes and relations), asks
for one line per level in a fixed ``Label: text`` format and ends with a ``Final:`` line: one
discriminative caption written for retrieval. :meth:`PromptTemplate.parse` reads that format
back into fields; when a model does not follow it, the record keeps the raw text, is marked
``unparsed`` and uses the raw text as its final caption, so no image is ever dropped.

Built-in templates: ``natural`` (CIRR, CIRCO, the synthetic benchmark) and ``fashion``
(FashionIQ, Shoes). A user template is a YAML or JSON file::

    name: my-products
    version: "1"
    intro: Describe this product photo for a search engine.
    levels:
      - {key: category, label: Category, ask: the product category}
      - {key: attributes, label: Attributes, ask: colour, material, pattern, shape}
    final_ask: one sentence that tells this product apart from similar ones

Records store ``<name>@<version>``: change ``version`` whenever the wording changes, so caption
stores made with different prompts are never mixed silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CsmcirError

__all__ = ["Level", "PromptTemplate", "ParsedCaption", "TEMPLATES", "load_template", "default_template_for"]


@dataclass(frozen=True)
class Level:
    key: str  # field name in the caption record (``levels[key]``)
    label: str  # what the model writes before the colon
    ask: str  # what the line should contain


@dataclass(frozen=True)
class ParsedCaption:
    levels: dict[str, str]
    final: str
    status: str  # "ok" (every line found), "partial" (Final found, some levels missing), "unparsed", "empty"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: str
    intro: str
    levels: tuple[Level, ...]
    final_ask: str
    final_label: str = "Final"

    @property
    def id(self) -> str:
        """``name@version``, stored in every caption record."""
        return f"{self.name}@{self.version}"

    def prompt(self) -> str:
        """The user message sent with the image."""
        lines = [f"{i}. {lv.label}: <{lv.ask}>" for i, lv in enumerate(self.levels, start=1)]
        return (
            f"{self.intro} Reason step by step, from the whole image down to the details, and answer "
            f"with exactly these {len(self.levels) + 1} lines and nothing else:\n"
            + "\n".join(lines)
            + f"\n{self.final_label}: <{self.final_ask}>"
        )

    def render(self, levels: dict[str, str], final: str) -> str:
        """An answer in the requested format (what a compliant model writes)."""
        lines = [f"{i}. {lv.label}: {levels.get(lv.key, '')}" for i, lv in enumerate(self.levels, start=1)]
        return "\n".join(lines + [f"{self.final_label}: {final}"])

    def _line_pattern(self) -> re.Pattern:
        labels = [lv.label for lv in self.levels] + [self.final_label]
        alternatives = "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True))
        # "2. Objects: ...", "**Objects**: ...", "- objects - ...", "Final caption: ..."
        return re.compile(
            rf"^\s*(?:[-*#>]+\s*)?(?:\d+\s*[.)]\s*)?\**\s*({alternatives})(?:\s+caption)?\s*\**\s*[:\-–]\s*\**\s*(.*)$", re.IGNORECASE
        )

    def parse(self, raw: str) -> ParsedCaption:
        """Split ``raw`` into level fields and the final caption; see :class:`ParsedCaption`."""
        text = raw.strip()
        if not text:
            return ParsedCaption({}, "", "empty")
        by_label = {lv.label.lower(): lv.key for lv in self.levels}
        final_key = self.final_label.lower()
        pattern = self._line_pattern()
        found: dict[str, list[str]] = {}
        current: str | None = None
        for line in text.splitlines():
            m = pattern.match(line)
            if m:
                label = m.group(1).lower()
                current = "\0final" if label == final_key else by_label[label]
                found.setdefault(current, []).append(m.group(2).strip())
            elif current is not None and line.strip():
                found[current].append(line.strip())  # a wrapped line continues its field
        fields = {k: _clean(" ".join(v)) for k, v in found.items()}
        final = fields.pop("\0final", "")
        levels = {lv.key: fields[lv.key] for lv in self.levels if fields.get(lv.key)}
        if not final:
            return ParsedCaption(levels, _clean(text), "unparsed")
        return ParsedCaption(levels, final, "ok" if len(levels) == len(self.levels) else "partial")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "intro": self.intro,
            "final_ask": self.final_ask,
            "final_label": self.final_label,
            "levels": [vars(lv) for lv in self.levels],
        }


def _clean(s: str) -> str:
    """Collapse whitespace and strip markdown emphasis and wrapping quotes or brackets."""
    s = re.sub(r"\s+", " ", s.replace("**", "")).strip()
    if len(s) >= 2 and s[0] + s[-1] in ('""', "''", "<>", "[]"):
        s = s[1:-1].strip()
    return s


NATURAL = PromptTemplate(
    name="natural",
    version="1",
    intro="Describe this image so that it can be found among many similar images.",
    levels=(
        Level("scene", "Scene", "the overall scene and setting in a few words"),
        Level("objects", "Objects", "the salient objects, people and animals, with their counts"),
        Level("attributes", "Attributes", "colour, material, pattern, shape, size and any visible text of the main objects"),
        Level("relations", "Relations", "spatial relations between the objects, their actions and the context"),
    ),
    final_ask="one sentence that describes this exact image and tells it apart from similar ones",
)

FASHION = PromptTemplate(
    name="fashion",
    version="1",
    intro="Describe this fashion product image so that it can be found among many similar products.",
    levels=(
        Level("category", "Category", "the garment or shoe category"),
        Level("parts", "Parts", "the salient parts: neckline, sleeves, length, closure, heel, toe, sole"),
        Level("attributes", "Attributes", "colour, material, pattern, print, shape, fit and any text or logo on the item"),
        Level("context", "Context", "how it is shown and styled: model, pose, background, accessories"),
    ),
    final_ask="one sentence that describes this exact item and tells it apart from similar items",
)

TEMPLATES = {t.name: t for t in (NATURAL, FASHION)}


def default_template_for(dataset: str) -> str:
    """``fashion`` for FashionIQ and Shoes, ``natural`` otherwise."""
    return "fashion" if dataset in ("fashioniq", "shoes") else "natural"


def load_template(spec: str) -> PromptTemplate:
    """A built-in template by name (``natural``, ``fashion``) or a YAML/JSON file (module docstring)."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise CsmcirError(f"unknown prompt template {spec!r}: not one of {', '.join(TEMPLATES)} and no such file")
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001 - the YAML parser's own error types vary
        raise CsmcirError(f"{path}: cannot read prompt template: {str(e).splitlines()[0]}") from None
    try:
        if not isinstance(raw, dict):
            raise TypeError("expected a mapping")
        levels = tuple(Level(str(lv["key"]), str(lv["label"]), str(lv["ask"])) for lv in raw["levels"])
        if not levels:
            raise ValueError("no levels")
        t = PromptTemplate(
            str(raw["name"]),
            str(raw["version"]),
            str(raw.get("intro", NATURAL.intro)),
            levels,
            str(raw["final_ask"]),
            str(raw.get("final_label", "Final")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CsmcirError(f"{path}: not a prompt template (needs name, version, levels of key/label/ask, final_ask): {e}") from None
    keys = [lv.key for lv in t.levels]
    labels = [lv.label.lower() for lv in t.levels] + [t.final_label.lower()]
    if len(set(keys)) != len(keys) or len(set(labels)) != len(labels):
        raise CsmcirError(f"{path}: level keys and labels (and the final label) must be unique")
    return t
