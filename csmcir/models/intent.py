"""CIR-LVLM's hybrid intent instruction for the shared Q-Former: a task prompt per side and
instance-specific soft prompts chosen from a learnable pool.

CIR-LVLM (Sun et al.) tells its shared encoder which task it serves with two prompts: a task
prompt stating the task, and a soft prompt picked per example from a pool by matching the
example's visual and text features against the pool's keys (the prompt-pool mechanism of L2P,
Wang et al. 2022, with its key-pulling term). Here both are token embeddings placed between the
Q-Former's learned query tokens and the text, so the query tokens read them by self-attention:

    [query tokens | task prompt (side) | chosen soft prompts (top_k * L) | [CLS] text [SEP]]

Every parameter is shared by the query side (reference image + modification text) and the
target side (target image + caption); only the task prompt's words differ by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IntentConfig

SIDES = ("query", "target")


@dataclass
class Selection:
    """Which soft prompts each example chose: ``index [B, k]`` into the pool and ``cosine [B, k]``
    between the example's selection feature and those keys (the key-pulling term's input)."""

    index: torch.Tensor
    cosine: torch.Tensor

    def pull_loss(self) -> torch.Tensor:
        """``mean(1 - cos)``: pulls each chosen key towards the examples that chose it."""
        return (1 - self.cosine).mean()


def select_prompts(feature: torch.Tensor, keys: torch.Tensor, top_k: int) -> Selection:
    """The ``top_k`` keys nearest (cosine) to each row of ``feature [B, D]`` among ``keys [N, D]``;
    ties go to the lower index. Gradients reach ``keys`` through ``cosine``."""
    cos = F.normalize(feature, dim=-1) @ F.normalize(keys, dim=-1).t()
    index = cos.detach().topk(top_k, dim=1).indices
    return Selection(index, cos.gather(1, index))


def usage_entropy(counts: torch.Tensor) -> float:
    """How evenly the pool's prompts are chosen: the entropy of the choice counts over
    ``log N`` (1: every prompt equally often; 0: one prompt only, a collapsed pool)."""
    n = counts.numel()
    total = counts.sum()
    if n < 2 or total == 0:
        return 0.0
    p = counts.float() / total
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return float(h / torch.log(torch.tensor(float(n))))


class IntentPrompts(nn.Module):
    """The prompt tokens for one batch (:meth:`forward`), and their parameters.

    Args:
        cfg: the :class:`~csmcir.config.IntentConfig`.
        hidden: the Q-Former's hidden size.
        image_width: the width of the image features (for the keys).
        phrase_ids: ``{side: token ids}`` of the task phrases (without [CLS]/[SEP]).
    """

    def __init__(self, cfg: IntentConfig, hidden: int, image_width: int, phrase_ids: dict[str, list[int]]):
        super().__init__()
        if cfg.pool_size < 0 or cfg.prompt_length < 1 or (cfg.pool_size and not 1 <= cfg.top_k <= cfg.pool_size):
            raise ValueError(
                f"model.intent: pool_size {cfg.pool_size}, prompt_length {cfg.prompt_length}, top_k {cfg.top_k}: "
                "need pool_size >= 0, prompt_length >= 1 and 1 <= top_k <= pool_size"
            )
        if not cfg.task_prompt and not cfg.pool_size:
            raise ValueError("model.intent has neither a task prompt nor a pool: set task_prompt true or pool_size > 0 (or intent null)")
        self.cfg = cfg
        self.phrase_len = {s: len(phrase_ids[s]) for s in SIDES} if cfg.task_prompt else {s: 0 for s in SIDES}
        if cfg.task_prompt:
            for side in SIDES:
                self.register_buffer(f"{side}_ids", torch.tensor(phrase_ids[side], dtype=torch.long), persistent=False)
            self.task_offset = nn.ParameterDict({s: nn.Parameter(torch.zeros(len(phrase_ids[s]), hidden)) for s in SIDES})
        if cfg.pool_size:
            self.keys = nn.Parameter(torch.randn(cfg.pool_size, image_width + hidden) * 0.02)
            self.prompts = nn.Parameter(torch.randn(cfg.pool_size, cfg.prompt_length, hidden) * 0.02)

    def num_tokens(self, side: str) -> int:
        """Prompt tokens placed before the text on ``side``."""
        pool = self.cfg.top_k * self.cfg.prompt_length if self.cfg.pool_size else 0
        return self.phrase_len[side] + pool

    def selection_feature(self, image_features: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """``[B, width + hidden]``: the mean image feature and the mean (unmasked) word embedding of
        the text, each L2-normalised, side by side; detached."""
        m = text_mask.unsqueeze(-1).to(text_embeds.dtype)
        text = (text_embeds * m).sum(1) / m.sum(1).clamp(min=1)
        image = image_features.mean(1)
        return torch.cat([F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)], -1).detach()

    def forward(
        self, side: str, word_embeddings: nn.Embedding, image_features: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, Selection | None]:
        """The ``[B, num_tokens(side), hidden]`` prompt embeddings, and the pool's :class:`Selection`."""
        if side not in SIDES:
            raise ValueError(f"the intent prompts need the side an input is encoded for: 'query' or 'target', got {side!r}")
        b = input_ids.shape[0]
        parts, selection = [], None
        if self.cfg.task_prompt:
            ids = getattr(self, f"{side}_ids")
            task = word_embeddings(ids) + self.task_offset[side]
            parts.append(task.unsqueeze(0).expand(b, -1, -1))
        if self.cfg.pool_size:
            feature = self.selection_feature(image_features, word_embeddings(input_ids), text_mask)
            selection = select_prompts(feature, self.keys, self.cfg.top_k)
            parts.append(self.prompts[selection.index].flatten(1, 2))
        return torch.cat(parts, 1), selection
