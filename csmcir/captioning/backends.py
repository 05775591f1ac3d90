"""Captioning backends behind one interface: ``generate(ids, images, prompt) -> raw answers``.

* :class:`TransformersBackend`: any transformers image-text-to-text MLLM (``AutoProcessor`` +
  ``AutoModelForImageTextToText``) from a local folder or a hub id; the processor's chat template
  formats the prompt (Qwen2-VL and Qwen2.5-VL included), batches are left-padded and decoded
  greedily by default.
* :class:`SyntheticBackend`: the synthetic benchmark's lossy scene captioner (it reads
  ``scenes.jsonl``, not pixels), answering in the template's format. A stand-in for an MLLM so the
  whole captioning stage runs on the embedded benchmark.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Protocol

from ..devices import resolve_device as _resolve_device
from ..devices import resolve_dtype
from ..errors import CsmcirError

__all__ = ["CaptionBackend", "TransformersBackend", "SyntheticBackend", "make_backend", "resolve_device", "resolve_dtype"]


class CaptionBackend(Protocol):
    model_id: str
    needs_images: bool

    def settings(self) -> dict[str, Any]:
        """Generation settings stored in every record."""

    def generate(self, ids: list[str], images: list, prompt: str) -> list[str]:
        """The raw answer for each image (``images`` is empty when ``needs_images`` is false)."""


def resolve_device(device: str) -> str:
    """The device name for ``device`` (:func:`csmcir.devices.resolve_device`)."""
    return str(_resolve_device(device))


def load_mllm(model: str, device: str, dtype, local_files_only: bool = True, **processor_kw):
    """``(processor, model)`` of an image-text-to-text MLLM, on ``device`` in eval mode, its
    tokenizer left-padded (every row of a batch ends at its last real token)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model, local_files_only=local_files_only, **processor_kw)
        net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError, ImportError) as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        if "torchvision" in str(e).lower() or "video processor" in msg.lower():
            msg += " (transformers 5 loads Qwen-VL processors with their video processor, which needs torchvision: install the torchvision build matching your torch)"
        raise CsmcirError(f"cannot load MLLM {model!r}: {msg}") from None
    net.to(device).eval()
    tok = getattr(processor, "tokenizer", None)
    if tok is None or getattr(processor, "chat_template", None) is None and getattr(tok, "chat_template", None) is None:
        raise CsmcirError(f"MLLM {model!r} has no tokenizer with a chat template: not an instruction-tuned image-text-to-text model")
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return processor, net


class TransformersBackend:
    """An MLLM through ``AutoProcessor`` + ``AutoModelForImageTextToText``.

    Args:
        model: local folder or hub id (e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``).
        device: ``auto`` (GPU if present), ``cpu``, ``cuda``, ``cuda:1``.
        dtype: ``auto`` (bfloat16 on GPU, float32 on CPU), ``float32``, ``bfloat16``, ``float16``.
        max_new_tokens: answer length limit; 256 fits the five lines of the built-in templates.
        do_sample, temperature, top_p: sampling (greedy by default, so reruns agree).
        min_pixels, max_pixels: image resolution bounds passed to Qwen-VL image processors.
        local_files_only: never reach the hub (default true: pass a folder, or download first).
    """

    needs_images = True

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        local_files_only: bool = True,
    ):
        import torch

        self.model_id = model
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.gen = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            self.gen.update(temperature=temperature, top_p=top_p)
        proc_kw: dict[str, Any] = {}
        if min_pixels is not None:
            proc_kw["min_pixels"] = min_pixels
        if max_pixels is not None:
            proc_kw["max_pixels"] = max_pixels
        self.pixels = {k: proc_kw[k] for k in ("min_pixels", "max_pixels") if k in proc_kw}
        self.processor, self.model = load_mllm(model, self.device, self.dtype, local_files_only, **proc_kw)
        self._torch = torch

    def settings(self) -> dict[str, Any]:
        return {**self.gen, "dtype": str(self.dtype).replace("torch.", ""), **self.pixels}

    def messages(self, prompt: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]

    def generate(self, ids: list[str], images: list, prompt: str | list[str]) -> list[str]:
        """One answer per image; ``prompt`` is one message for all, or one per image (OSrCIR puts
        each query's modification text in its prompt)."""
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise CsmcirError(f"{len(prompts)} prompts for {len(images)} images")
        texts = [self.processor.apply_chat_template(self.messages(p), add_generation_prompt=True, tokenize=False) for p in prompts]
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        with self._torch.inference_mode():
            out = self.model.generate(**inputs, **self.gen, pad_token_id=self.processor.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new, skip_special_tokens=True)


class SyntheticBackend:
    """The synthetic benchmark's scene captioner, answering in a template's format.

    Each image gets its own generator seeded from ``seed`` and its id, so the answer does not depend
    on batching, sharding or resuming. Its levels are ``scene, objects, attributes, relations``
    (the ``natural`` template's keys).
    """

    needs_images = False
    model_id = "csmcir/synthetic-scene-captioner"

    def __init__(self, root: str | Path, template, seed: int = 0):
        from ..data.synthetic.builder import benchmark_params, gallery_scenes

        self.root, self.template, self.seed = Path(root), template, seed
        self.params = benchmark_params(root)
        self.scenes = gallery_scenes(root)

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "difficulty": self.params.name}

    def generate(self, ids: list[str], images: list, prompt: str) -> list[str]:
        import numpy as np

        from ..data.synthetic.captioner import caption_scene

        out = []
        for i in ids:
            if i not in self.scenes:
                raise CsmcirError(f"{self.root / 'scenes.jsonl'}: no scene for image {i!r}")
            rng = np.random.default_rng([self.seed, zlib.crc32(i.encode())])
            c = caption_scene(self.scenes[i], rng, self.params)
            out.append(self.template.render(c.levels, c.final))
        return out


def make_backend(
    name: str,
    *,
    model: str | None,
    root: str,
    template,
    device: str = "auto",
    dtype: str = "auto",
    max_new_tokens: int = 256,
    seed: int = 0,
    **kw,
) -> CaptionBackend:
    if name == "synthetic":
        return SyntheticBackend(root, template, seed=seed)
    if name == "transformers":
        if not model:
            raise CsmcirError("--backend transformers needs --model (a local folder or a hub id)")
        return TransformersBackend(model, device=device, dtype=dtype, max_new_tokens=max_new_tokens, **kw)
    raise CsmcirError(f"unknown captioning backend {name!r} (transformers, synthetic)")
