"""OSrCIR's one-stage reflective chain-of-thought prompt, versioned.

OSrCIR (Tang et al., CVPR 2025, "Reason-before-Retrieve") asks an MLLM, in ONE pass over the
reference image and the modification text, for: a caption of the reference, thoughts about what
the modification changes, a reflection that drops details the image and the text do not support,
and a final description of the target image. The description then retrieves the gallery through
a text-image dual encoder (CLIP), with no training at all. The wording below is csmcir's own;
the four-part structure is the paper's.

The answer is read back with the captioning templates' parser (:class:`PromptTemplate`): one
``Label: text`` line per part and a ``Target:`` line. A model that ignores the format keeps its
raw text, marked ``unparsed``, and the raw text becomes the description, so no query is dropped.
Records store ``osrcir@<version>``: change the version whenever the wording changes.
"""

from __future__ import annotations

from ..captioning.prompts import Level, PromptTemplate

__all__ = ["OSRCIR", "query_prompt"]

OSRCIR = PromptTemplate(
    name="osrcir",
    version="1",
    intro=(
        'You are given a reference image and a modification request: "{modification}". Imagine the target '
        "image: the reference image changed as the request says and in no other way."
    ),
    levels=(
        Level("caption", "Caption", "a caption of the reference image: every object, its attributes and position"),
        Level("thoughts", "Thoughts", "what the request changes, adds or removes, and what it keeps"),
        Level("reflection", "Reflection", "which details of your thoughts the image and the request do not support, dropped"),
    ),
    final_ask="one sentence describing the target image, for a search engine",
    final_label="Target",
)


def query_prompt(text: str, template: PromptTemplate = OSRCIR) -> str:
    """The user message for one query: ``template``'s prompt with the modification text in it."""
    return template.prompt().replace("{modification}", " ".join(text.split()).replace('"', "'"))
