"""CIR-CoT teacher embeddings: an MLLM reads (reference image, modification text), reasons, and
the last hidden state at a special ``<emb>`` token is the query embedding.

Two modes:

* ``full``: the model generates its Caption -> Reasoning -> Conclusion text first (greedy, up to
  ``max_new_tokens``); ``<emb>`` is appended after it and one forward pass reads the hidden state
  there.
* ``fast``: ``<emb>`` follows the prompt directly (no generation).

Gallery images are embedded the same way with a describe-the-image prompt (``fast``). If the
tokenizer has no ``<emb>`` token it is added (and the embedding matrix grown if needed): a model
fine-tuned CIR-CoT-style already has it trained; for any other MLLM the new row is untrained and
the hidden state at it is still a usable, if weaker, summary of the sequence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CsmcirError

__all__ = ["TeacherEncoder", "QUERY_PROMPT", "GALLERY_PROMPT", "EMB_TOKEN"]

EMB_TOKEN = "<emb>"
QUERY_PROMPT = (
    'This is a reference image. Modification: "{text}". Find the target image: first describe the reference '
    "image (Caption), then reason about what the target image must show after the modification (Reasoning), "
    "then describe the target image in one sentence (Conclusion)."
)
GALLERY_PROMPT = "Describe this image in one sentence for image retrieval."


class TeacherEncoder:
    """Embeds queries (image + text) and gallery images with an MLLM at its ``<emb>`` token.

    Args:
        model: local folder or hub id of an image-text-to-text MLLM.
        layer: which hidden state (``-1`` = the last layer's output; ``0`` = the input embeddings).
        max_new_tokens: reasoning length limit in ``full`` mode.
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        layer: int = -1,
        max_new_tokens: int = 128,
        local_files_only: bool = True,
        **processor_kw: Any,
    ):
        from ..captioning.backends import load_mllm, resolve_device, resolve_dtype

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        processor, net = load_mllm(model, dev, dt, local_files_only, **processor_kw)
        self._attach(processor, net, model, dev, dt, layer, max_new_tokens)

    @classmethod
    def from_loaded(cls, processor, net, model_id: str, layer: int = -1, max_new_tokens: int = 128) -> TeacherEncoder:
        """Wrap an MLLM already in memory (``csmcir bench efficiency`` builds random-weight ones);
        the tokenizer must pad on the left, as :func:`~csmcir.captioning.backends.load_mllm` sets."""
        out = cls.__new__(cls)
        p = next(net.parameters())
        out._attach(processor, net, model_id, str(p.device), p.dtype, layer, max_new_tokens)
        return out

    def _attach(self, processor, net, model_id: str, device: str, dtype, layer: int, max_new_tokens: int) -> None:
        import torch

        self.model_id, self.layer, self.max_new_tokens = model_id, layer, max_new_tokens
        self.device, self.dtype = device, dtype
        self.processor, self.model = processor, net
        tok = self.processor.tokenizer
        if EMB_TOKEN not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": [EMB_TOKEN]}, replace_extra_special_tokens=False)
        self.emb_id = tok.convert_tokens_to_ids(EMB_TOKEN)
        rows = self.model.get_input_embeddings().weight.shape[0]
        if self.emb_id >= rows:  # grow only: real checkpoints pad their vocabulary beyond the tokenizer
            self.model.resize_token_embeddings(self.emb_id + 1)
        n_layers = self.model.config.get_text_config().num_hidden_layers
        if not -(n_layers + 1) <= layer <= n_layers:
            raise CsmcirError(f"--layer {layer}: {model_id} has {n_layers} layers (hidden states -{n_layers + 1}..{n_layers})")
        self._torch = torch

    @property
    def dim(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    def chat(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def embed(self, images: list, texts: list[str] | None, mode: str = "fast") -> tuple[np.ndarray, list[str]]:
        """``([B, dim] float32 hidden states at <emb>, reasoning texts)``; ``texts=None`` embeds
        gallery images. ``mode``: ``fast`` or ``full`` (see the module docstring)."""
        if mode not in ("fast", "full"):
            raise CsmcirError(f"teacher mode must be fast or full, got {mode!r}")
        torch = self._torch
        prompts = [GALLERY_PROMPT] * len(images) if texts is None else [QUERY_PROMPT.format(text=t) for t in texts]
        chats = [self.chat(p) for p in prompts]
        reasoning = [""] * len(images)
        with torch.inference_mode():
            if mode == "full":
                inputs = self.processor(text=chats, images=images, return_tensors="pt", padding=True).to(self.device)
                out = self.model.generate(
                    **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.processor.tokenizer.pad_token_id
                )
                reasoning = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            inputs = self.processor(
                text=[c + r + EMB_TOKEN for c, r in zip(chats, reasoning)], images=images, return_tensors="pt", padding=True
            ).to(self.device)
            if not bool((inputs["input_ids"][:, -1] == self.emb_id).all()):
                raise CsmcirError(f"{self.model_id}: the tokenizer did not keep {EMB_TOKEN} as the last token")
            hidden = self.model(**inputs, output_hidden_states=True).hidden_states[self.layer][:, -1]
        return hidden.float().cpu().numpy(), reasoning
