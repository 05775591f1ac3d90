"""OSrCIR-style training-free reason-then-retrieve (Tang et al., CVPR 2025), runnable.

One MLLM pass per query writes a reflective chain of thought ending in a target description
(:mod:`~csmcir.osrcir.prompt`, :func:`describe_queries`); the descriptions retrieve the gallery
through a CLIP-style dual encoder or against the gallery's MCoT captions
(:mod:`~csmcir.osrcir.retrieve`, :func:`rank_descriptions`). On the synthetic benchmark a labelled
stand-in reasoner replaces the MLLM (:mod:`~csmcir.osrcir.standin`). CLI: ``csmcir osrcir describe``
and ``csmcir osrcir rank``.
"""

from .prompt import OSRCIR, query_prompt
from .retrieve import CaptionRetriever, SentenceEncoder, TextImageRetriever, make_retriever
from .run import describe_queries, rank_descriptions, read_descriptions

__all__ = [
    "OSRCIR",
    "query_prompt",
    "describe_queries",
    "read_descriptions",
    "rank_descriptions",
    "make_retriever",
    "CaptionRetriever",
    "TextImageRetriever",
    "SentenceEncoder",
]
