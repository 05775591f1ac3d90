"""A procedurally generated CIR benchmark with exact ground truth.

Scenes are a few coloured, patterned shapes on a 3x3 grid; queries are a reference scene plus a
modification text (one to three edits: colour, shape, size, pattern, add, remove, move), and the
targets are the edited scene (several when the text leaves an attribute unsaid). Val, test and
heldout queries come with hard distractors (near-miss edits of the same reference); the heldout
split tests edit/value pairs never seen in training (:data:`HELDOUT_PAIRS`). Every image also gets a
deliberately lossy multi-level caption, standing in for an MLLM's chain-of-thought captions.

Output is the custom folder format (:mod:`csmcir.data.custom`) plus ``benchmark.json`` and
``scenes.jsonl``::

    from csmcir.data.synthetic import generate
    root = generate("data/synth", seed=0, difficulty="standard", workers=4)

Modules: :mod:`.params` (every knob), :mod:`.scene` (vocabulary, scene graphs), :mod:`.language`
(referring expressions, phrasings), :mod:`.edits` (queries, distractors), :mod:`.render`
(rasterising), :mod:`.captioner` (lossy captions), :mod:`.builder` (splits, files, generate).
"""

from .builder import SPLITS, ensure_benchmark, gallery_scenes, generate
from .captioner import caption_scene
from .params import DIFFICULTIES, GENERATOR_VERSION, SynthParams
from .scene import HELDOUT_PAIRS

__all__ = [
    "DIFFICULTIES",
    "GENERATOR_VERSION",
    "HELDOUT_PAIRS",
    "SPLITS",
    "SynthParams",
    "caption_scene",
    "ensure_benchmark",
    "gallery_scenes",
    "generate",
]
