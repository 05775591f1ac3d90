"""The symmetric dual tower: ONE shared Q-Former encodes both sides of a CIR pair.

Query side:  ``encode(reference image, modification text)``
Target side: ``encode(target image, its MCoT caption)``

Same function, same weights, same embedding space. The Q-Former path is the query+text path of
transformers' ``Blip2ForImageTextRetrieval``: learned query tokens are concatenated in front of
the text embeddings, the query positions cross-attend to the image features, all positions
self-attend, and the mean of the query-token outputs (or, with ``pooling="cls"``, the fused [CLS]
text token at position ``num_query_tokens``; with ``"concat_query"``, the query-token outputs side
by side) is projected and L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .vision import GridAdapter, build_vision_tower

POOLINGS = ("mean_query", "cls", "concat_query")


class CIRDualTower(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

        self.cfg = cfg
        qcfg = cfg.qformer_config()
        self.vision = build_vision_tower(cfg.vision)
        # optional: positions and a LayerNorm over a frozen CNN grid, trained with the Q-Former (GridAdapter)
        self.grid_adapter = (
            GridAdapter(self.vision.num_tokens, cfg.vision.width)
            if cfg.vision.kind == "efficientnet_lite0" and cfg.vision.grid_adapter
            else None
        )
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.qformer.num_query_tokens, qcfg.hidden_size) * 0.02)
        self.text_embeddings = Blip2TextEmbeddings(qcfg)
        self.qformer = Blip2QFormerModel(qcfg)
        if cfg.pooling not in POOLINGS:
            raise ValueError(f"pooling {cfg.pooling!r}: choose one of {', '.join(POOLINGS)}")
        pooled = qcfg.hidden_size * (cfg.qformer.num_query_tokens if cfg.pooling == "concat_query" else 1)
        self.proj = nn.Linear(pooled, cfg.embed_dim)
        self.num_query_tokens = cfg.qformer.num_query_tokens
        # CIR-LVLM's intent instruction (model.intent): prompt tokens between the queries and the text
        self.intent = None
        if cfg.intent is not None:
            from ..tokenizer import load_tokenizer
            from .intent import IntentPrompts

            tok = load_tokenizer(cfg.tokenizer)
            phrases = {"query": cfg.intent.query_phrase, "target": cfg.intent.target_phrase}
            ids = {side: tok(text, add_special_tokens=False)["input_ids"] for side, text in phrases.items()}
            self.intent = IntentPrompts(cfg.intent, qcfg.hidden_size, cfg.vision.width, ids)
        # where a frozen pretrained vision tower's weights come from (``model.net.init`` entries,
        # set by build_network); checkpoints store this instead of the tower
        self.vision_source: list[dict] | None = None

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features ``[B, N, width]`` the Q-Former cross-attends to (cacheable when frozen).

        Features given instead of pixels (a floating ``[B, N, width]`` tensor, e.g. from the
        feature cache of :mod:`csmcir.data.feature_cache`) are passed through in the model's dtype.
        """
        if pixels.dim() == 3 and pixels.is_floating_point():
            return pixels.to(self.proj.weight.dtype)
        return self.vision(pixels)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        side: str | None = None,
        return_selection: bool = False,
    ):
        """L2-normalised embedding ``[B, embed_dim]`` of (image, text).

        Give either ``pixels`` (``[B, 3, H, W]``, uint8 or float) or precomputed
        ``image_features`` (``[B, N, width]`` from :meth:`encode_image`). ``input_ids`` and
        ``attention_mask`` are ``[B, L]`` with [CLS] first (an empty text is ``[CLS] [SEP]``).
        ``side`` (``"query"`` or ``"target"``) says which side the input is; only a model with
        ``intent`` prompts needs it (its task prompt depends on it). ``return_selection``: also
        return the soft prompts chosen (:class:`~csmcir.models.intent.Selection`, or None).
        """
        if image_features is None:
            if pixels is None:
                raise ValueError("encode() needs pixels or image_features")
            image_features = self.encode_image(pixels)
        if self.grid_adapter is not None:
            image_features = self.grid_adapter(image_features)
        b = input_ids.shape[0]
        queries = self.query_tokens.expand(b, -1, -1)
        x = self.text_embeddings(input_ids=input_ids, query_embeds=queries)
        n_prompt, selection = 0, None
        if self.intent is not None:
            if side is None:
                raise ValueError("this model has intent prompts: encode() needs side='query' or side='target'")
            prompts, selection = self.intent(side, self.text_embeddings.word_embeddings, image_features, input_ids, attention_mask)
            n_prompt = prompts.shape[1]
            q = self.num_query_tokens
            x = torch.cat([x[:, :q], prompts.to(x.dtype), x[:, q:]], 1)
        mask = torch.cat(
            [torch.ones(b, self.num_query_tokens + n_prompt, dtype=attention_mask.dtype, device=attention_mask.device), attention_mask],
            dim=1,
        )
        out = self.qformer(
            query_embeds=x,
            query_length=self.num_query_tokens,
            attention_mask=mask,
            encoder_hidden_states=image_features,
            encoder_attention_mask=torch.ones(image_features.shape[:2], dtype=torch.long, device=image_features.device),
        ).last_hidden_state
        if self.cfg.pooling == "cls":
            pooled = out[:, self.num_query_tokens + n_prompt]
        elif self.cfg.pooling == "mean_query":
            pooled = out[:, : self.num_query_tokens].mean(1)
        else:  # concat_query
            pooled = out[:, : self.num_query_tokens].flatten(1)
        emb = F.normalize(self.proj(pooled), dim=-1)
        return (emb, selection) if return_selection else emb

    def encode_query(self, ref_pixels, input_ids, attention_mask) -> torch.Tensor:
        """Query side: reference image + modification text."""
        return self.encode(input_ids, attention_mask, pixels=ref_pixels, side="query")

    def encode_target(self, target_pixels, input_ids, attention_mask) -> torch.Tensor:
        """Target side: target image + its caption (or an empty text for the image-only ablation)."""
        return self.encode(input_ids, attention_mask, pixels=target_pixels, side="target")
