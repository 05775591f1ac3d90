"""An offline stand-in for a CIR-CoT teacher on the synthetic benchmark. NOT a real MLLM.

A "reasoning oracle": for a query it reads the ground-truth scenes, writes Caption (the reference,
described exactly), Reasoning (the modification text) and Conclusion (the correct target,
described exactly), and embeds the conclusion with the packaged all-MiniLM-L6-v2 sentence encoder
(mean pooling, L2-normalised, 384-d). A gallery image is embedded from its exact description. It
shows what distillation from a teacher that reasons perfectly can give the student; the store it
writes says ``model: oracle-minilm (stand-in for a CIR-CoT MLLM)``.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from ..errors import CsmcirError

__all__ = ["OracleTeacher", "ORACLE_MODEL_ID"]

ORACLE_MODEL_ID = "oracle-minilm (stand-in for a CIR-CoT MLLM)"


class OracleTeacher:
    def __init__(self, root, device: str = "cpu"):
        from ..data.synthetic.builder import benchmark_params, gallery_scenes
        from ..osrcir.retrieve import SentenceEncoder

        params = benchmark_params(root)
        # the captioner with every noise rate at 0 describes a scene exactly
        self.params = dataclasses.replace(params, caption_omit_rate=0.0, caption_error_rate=0.0, caption_drop_object_rate=0.0)
        self.scenes = gallery_scenes(root)
        self.encoder = SentenceEncoder("minilm", device)
        self.model_id = ORACLE_MODEL_ID

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def describe(self, image_id: str) -> str:
        from ..data.synthetic.captioner import caption_scene

        if image_id not in self.scenes:
            raise CsmcirError(f"scenes.jsonl has no scene for image {image_id!r}")
        return caption_scene(self.scenes[image_id], np.random.default_rng(0), self.params).final

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts)

    def embed_queries(self, triplets) -> tuple[np.ndarray, list[str]]:
        conclusions, reasoning = [], []
        for t in triplets:
            target = self.describe(t.targets[0])
            conclusions.append(target)
            reasoning.append(json.dumps({"caption": self.describe(t.reference), "reasoning": t.text, "conclusion": target}))
        return self.encode_texts(conclusions), reasoning

    def embed_images(self, image_ids: list[str]) -> np.ndarray:
        return self.encode_texts([self.describe(i) for i in image_ids])
