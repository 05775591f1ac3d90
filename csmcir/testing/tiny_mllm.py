"""A tiny, randomly initialised Qwen2-VL / Qwen2.5-VL (model, tokenizer, image processor) built
offline and saved to a folder, so tests and benchmarks load an MLLM by path as a user loads a real one.

The model is the real architecture (``Qwen2VLForConditionalGeneration`` /
``Qwen2_5_VLForConditionalGeneration``, a few layers, 64-d). The tokenizer is a byte-level BPE
trained here on a few sentences, with Qwen's special tokens and chat template. The processor is
saved as transformers' ``PaddleOCRVLProcessor``: in transformers 5.x ``Qwen2VLProcessor`` also
loads a video processor that needs torchvision, which this project cannot install beside its CPU
torch; PaddleOCRVLProcessor applies the same Qwen2-VL image processor and the same
``<|image_pad|>`` expansion (one token per merged 28x28 block) without one.
"""

import json
import os

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Same pre-tokenisation regex as Qwen2Tokenizer (transformers/models/qwen2/tokenization_qwen2.py)
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen2-VL special tokens. They get ids after the BPE vocab (300..313), but NOT in this order: Qwen2Tokenizer
# registers eos/pad first (<|im_end|>=300, <|endoftext|>=301, <|image_pad|>=302, ...); always look ids up.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Chat template of Qwen/Qwen2-VL-7B-Instruct (chat_template.json); Qwen2.5-VL uses the same one.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TRAIN_SENTENCES = [
    "You are a helpful assistant.",
    "Describe the image.",
    "Describe this image in detail, please.",
    "What is shown in the picture?",
    "The image shows a red square on a white background.",
    "A cat is sitting on a table next to a blue cup.",
    "There are two dogs playing in the green grass.",
    "The quick brown fox jumps over the lazy dog.",
    "system user assistant",
    "Hello, how are you today? I am fine, thank you!",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024",
    "Picture Video : ; , . ! ? ' \" ( ) [ ] { } < > / \\ - _ + = * & % $ # @",
]


def _build_tokenizer(bpe_vocab_size=300):
    """Train a tiny byte-level BPE offline and wrap it in Qwen2Tokenizer with Qwen's special tokens."""
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes -> no OOV ever
        special_tokens=[],
    )
    raw.train_from_iterator(TRAIN_SENTENCES * 4, trainer=trainer)

    model_state = json.loads(raw.to_str())["model"]
    vocab = model_state["vocab"]
    # tokenizers>=0.20 serialises merges as [a, b] pairs; BPE(...) in 0.23 wants a list of tuples
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model_state["merges"]]

    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",  # Qwen2-VL-Instruct: tokenizer eos = <|im_end|>
        pad_token="<|endoftext|>",
        padding_side="left",  # needed for batched generation
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        # named model-specific special tokens -> tok.image_token / tok.image_token_id etc. (saved in tokenizer_config)
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
    )
    tok.add_special_tokens(
        {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]},
        replace_extra_special_tokens=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _build_config(arch, tok, text=None, vision=None, vocab_size=None):
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # must cover every tokenizer id; padded to a multiple of 64 like the real checkpoints (151936 > len(tok))
    vocab_size = vocab_size or ((len(tok) + 63) // 64) * 64
    hidden, heads = (text or {}).get("hidden_size", 64), (text or {}).get("num_attention_heads", 4)
    vis_embed, vis_heads, vis_depth = 32, 2, 2
    head_dim = hidden // heads
    assert head_dim % 2 == 0
    half = head_dim // 2  # mrope_section must sum to head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # 8 -> [2, 3, 3]; 64 -> [16, 24, 24]
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    text_config.update(text or {})
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=text_config["tie_word_embeddings"],
    )
    if arch == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision_config = dict(
            depth=vis_depth,
            embed_dim=vis_embed,
            hidden_size=hidden,  # output dim of the patch merger == text hidden size
            num_heads=vis_heads,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
        vision_config.update(vision or {})
        cfg = Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **common)
        cls = Qwen2VLForConditionalGeneration
    elif arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision_config = dict(
            depth=vis_depth,
            hidden_size=vis_embed,  # NB: in 2.5-VL vision `hidden_size` is the ViT width ...
            out_hidden_size=hidden,  # ... and `out_hidden_size` the merger output (= text hidden)
            intermediate_size=vis_embed * 2,
            num_heads=vis_heads,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,  # window (in px) for windowed attention; 56 = 2x2 merged tokens
            fullatt_block_indexes=[vis_depth - 1],
            tokens_per_second=2,
            in_channels=3,
        )
        vision_config.update(vision or {})
        cfg = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **common)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(arch)
    return cfg, cls


# The public configs of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct (config.json), for latency
# measurements of the real architectures with random weights (arch="qwen2_5_vl").
_QWEN25_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)
QWEN25_VL_SIZES = {
    "3b": dict(
        vocab_size=151936,
        text=dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision=dict(_QWEN25_VISION, out_hidden_size=2048),
    ),
    "7b": dict(
        vocab_size=152064,
        text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision=dict(_QWEN25_VISION, out_hidden_size=3584),
    ),
}


def make_tiny_qwen2vl(
    path, arch="qwen2_vl", seed=0, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, text=None, vision=None, vocab_size=None, dtype=None
):
    """Create and save_pretrained a tiny random Qwen2-VL / Qwen2.5-VL model + processor into `path`.

    ``text`` / ``vision`` override the text and vision config (e.g. :data:`QWEN25_VL_SIZES` for a
    real-size architecture with random weights), ``vocab_size`` the embedding rows, ``dtype`` the
    weights' dtype (a real-size model is built directly in it).

    min/max_pixels: images are resized so that H*W is in [min_pixels, max_pixels] with H, W multiples of 28;
    each 28x28 block becomes one <|image_pad|> token in the LLM (4 patches of 14x14 merged 2x2).
    """
    processor, model = build_qwen2vl(arch, seed, min_pixels, max_pixels, text, vision, vocab_size, dtype)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_qwen2vl(
    arch="qwen2_vl", seed=0, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, text=None, vision=None, vocab_size=None, dtype=None
):
    """``(processor, model)`` of :func:`make_tiny_qwen2vl` in memory, not saved (same arguments)."""
    from transformers import GenerationConfig, Qwen2VLImageProcessorPil

    torch.manual_seed(seed)

    tok = _build_tokenizer()
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    # Qwen2VLProcessor cannot be used without torchvision in transformers 5.x: its __init__ requires a
    # video_processor (Qwen2VLVideoProcessor -> torchvision) and AutoProcessor.from_pretrained always tries to
    # load one via AutoVideoProcessor. PaddleOCRVLProcessor is a built-in processor with exactly the same
    # image logic (image_processor + tokenizer, <|image_pad|> repeated grid_thw.prod() // merge_size**2 times,
    # returns mm_token_type_ids) but no video processor, so AutoProcessor.from_pretrained works offline
    # without torchvision and without trust_remote_code. It reads tokenizer.image_token / image_token_id.
    from transformers import PaddleOCRVLProcessor

    processor = PaddleOCRVLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)

    cfg, cls = _build_config(arch, tok, text, vision, vocab_size)
    if dtype is not None:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = cls(cfg).eval()
        finally:
            torch.set_default_dtype(default)
    else:
        model = cls(cfg).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        do_sample=False,
    )
    return processor, model
