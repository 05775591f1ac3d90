"""Seeing the retrieval: a static HTML report (``csmcir report``) and a local demo (``csmcir serve``)."""

from .html import highlight, thumbnail_bytes, write_report

__all__ = ["highlight", "thumbnail_bytes", "write_report"]
