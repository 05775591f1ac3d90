"""MCoT captioning: multi-level chain-of-thought captions of every gallery image, written once.

``prompts`` (versioned templates and the parser), ``backends`` (transformers MLLMs, the synthetic
scene captioner), ``store`` (the resumable JSONL store and shard merging), ``run`` (the loop).
The command is ``csmcir caption``; ``csmcir caption-merge`` joins shards.
"""

from .prompts import TEMPLATES, ParsedCaption, PromptTemplate, default_template_for, load_template
from .run import caption_dataset, caption_images, parse_shard, select_ids, split_image_ids
from .store import CaptionStore, merge_stores, read_store

__all__ = [
    "TEMPLATES",
    "ParsedCaption",
    "PromptTemplate",
    "default_template_for",
    "load_template",
    "caption_dataset",
    "caption_images",
    "parse_shard",
    "select_ids",
    "split_image_ids",
    "CaptionStore",
    "merge_stores",
    "read_store",
]
