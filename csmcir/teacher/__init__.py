"""CIR-CoT teacher embeddings (``csmcir teacher``): extraction at an ``<emb>`` token and the store."""

from .extract import EMB_TOKEN, GALLERY_PROMPT, QUERY_PROMPT, TeacherEncoder
from .run import embed_teacher
from .store import TeacherStore, import_embeddings, read_reasoning, read_teacher_store

__all__ = [
    "EMB_TOKEN",
    "GALLERY_PROMPT",
    "QUERY_PROMPT",
    "TeacherEncoder",
    "TeacherStore",
    "embed_teacher",
    "import_embeddings",
    "read_reasoning",
    "read_teacher_store",
]
