"""Retrieval: ranking a gallery for composed queries and scoring the rankings.

Submodules are imported on demand, so that importing this package pulls in neither torch nor
faiss:

* :mod:`csmcir.retrieval.metrics`: exact top-k rankings in torch (:func:`topk_rankings`) and
  Recall@K in the CIRR / FashionIQ sense (:func:`recall_at_k`, :func:`recall_by_group`).
* :mod:`csmcir.retrieval.index`: :class:`GalleryIndex`, a faiss index of gallery embeddings with
  its ids and an ``index_info.json``, saved and loaded as a folder.
"""
