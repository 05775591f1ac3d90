"""A tiny, randomly initialised CLIP or SigLIP dual encoder (model, tokenizer, image processor)
saved to a folder, so tests load it by path exactly as a user loads ``openai/clip-vit-large-patch14``.

The tokenizer is the packaged all-MiniLM-L6-v2 WordPiece (offline); the text tower pools at its
``[SEP]`` token (CLIP pools at the end-of-text token). Image processors are the PIL ones, which
need no torchvision.
"""

from __future__ import annotations

import os

__all__ = ["make_tiny_clip"]


def make_tiny_clip(path, kind: str = "clip", seed: int = 0, image_size: int = 32):
    import torch
    from transformers import AutoTokenizer

    from ..tokenizer import minilm_path

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    text = dict(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    if kind == "clip":
        from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        images = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    elif kind == "siglip":
        from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

        text["max_position_embeddings"] = 64
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        images = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    else:
        raise ValueError(f"kind must be clip or siglip, not {kind!r}")
    os.makedirs(path, exist_ok=True)
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    images.save_pretrained(path)
    return str(path)
