"""csmcir: composed image retrieval with a symmetric shared Q-Former dual tower.

The public Python API (each name is imported on first use, so ``import csmcir`` stays light):

* models: :func:`create_model`, :func:`build_network`, :class:`NetworkSpec`, :class:`ModelConfig`,
  :class:`TextConfig`, :class:`CIRDualTower`
* data: :func:`open_dataset`, :data:`DATASETS`, :class:`CIRDataModule`, :func:`generate_synthetic`,
  :func:`generate_fashion_boards` (real Fashion-MNIST photos)
* training: :class:`CIRModule` (Lightning; the network injected)
* inference: :class:`Encoder` (a checkpoint's tower + text settings), :func:`convert_checkpoint`
  (format 1 -> 2), :func:`rank_split`,
  :class:`Ranking`, :func:`score_rankings`, :func:`embed_gallery`, :func:`build_index`,
  :class:`GalleryIndex`, :func:`search`, :func:`write_submission`
* offline stages: :func:`caption_dataset` (MCoT captions), :func:`embed_teacher` (CIR-CoT
  ``<emb>`` embeddings), :func:`build_report` (the HTML report)
* errors: :class:`CsmcirError` (every user error, one line)
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "create_model": "csmcir.factory",
    "build_network": "csmcir.models.build",
    "NetworkSpec": "csmcir.models.build",
    "CIRDualTower": "csmcir.models.dual_tower",
    "ModelConfig": "csmcir.config",
    "TextConfig": "csmcir.config",
    "open_dataset": "csmcir.data.registry",
    "DATASETS": "csmcir.data.registry",
    "CIRDataModule": "csmcir.data.datamodule",
    "CIRModule": "csmcir.lightning.module",
    "Encoder": "csmcir.inference",
    "convert_checkpoint": "csmcir.inference",
    "rank_split": "csmcir.retrieval.ranking",
    "rank_embeddings": "csmcir.retrieval.ranking",
    "rank_teacher": "csmcir.retrieval.ranking",
    "describe_queries": "csmcir.osrcir.run",
    "rank_descriptions": "csmcir.osrcir.run",
    "make_retriever": "csmcir.osrcir.retrieve",
    "Ranking": "csmcir.retrieval.ranking",
    "score_rankings": "csmcir.retrieval.ranking",
    "embed_gallery": "csmcir.retrieval.ranking",
    "build_index": "csmcir.retrieval.ranking",
    "search": "csmcir.retrieval.ranking",
    "write_submission": "csmcir.retrieval.ranking",
    "GalleryIndex": "csmcir.retrieval.index",
    "caption_dataset": "csmcir.captioning.run",
    "embed_teacher": "csmcir.teacher.run",
    "build_report": "csmcir.report.build",
    "CsmcirError": "csmcir.errors",
}

__all__ = ["__version__", "generate_synthetic", "generate_fashion_boards", *_EXPORTS]


def __getattr__(name: str):
    if name == "generate_synthetic":
        from .data.synthetic import generate

        return generate
    if name == "generate_fashion_boards":
        from .data.boards import generate as generate_boards

        return generate_boards
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'csmcir' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
