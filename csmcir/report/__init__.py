"""Seeing the retrieval: a static HTML report (``csmcir report``) and a local demo (``csmcir serve``)."""

from .build import build_report
from .html import highlight, thumbnail_bytes, write_report

__all__ = ["build_report", "highlight", "thumbnail_bytes", "write_report"]
