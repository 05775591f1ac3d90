"""InfoNCE over in-batch negatives with false negatives masked.

For query ``i`` with embedding ``q_i`` and its sampled positive target ``t_i``::

    L_i = -log( exp(s * q_i.t_i) / sum_{j : not FN(i, j)} exp(s * q_i.t_j) )

where ``s = exp(logit_scale)`` is the learnable inverse temperature and ``FN(i, j)`` (j != i) is
true when target ``j`` is also a correct target of query ``i`` (the same image, or another of a
query's several correct targets): such a target is not a negative and is removed from the
denominator. With ``bidirectional=True`` the target-to-query direction is added and the two are
averaged (target ``j``'s negatives are the other queries it is not a correct answer for).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def same_target_mask(target_idx: torch.Tensor, all_targets: torch.Tensor) -> torch.Tensor:
    """``mask[i, j]`` = target ``j`` (``target_idx[j]``) is one of query ``i``'s correct targets.

    Args:
        target_idx: ``[Bt]`` integer id of each target embedding in the batch.
        all_targets: ``[Bq, T]`` integer ids of every correct target of each query, padded with -1.
    """
    return (all_targets[:, :, None] == target_idx[None, None, :]).any(dim=1)


def info_nce(
    query: torch.Tensor,
    target: torch.Tensor,
    logit_scale: torch.Tensor,
    positive_mask: torch.Tensor | None = None,
    bidirectional: bool = False,
    query_offset: int = 0,
    extra: torch.Tensor | None = None,
    extra_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE loss; ``query [Bq, D]`` against ``target [Bt, D]`` (both L2-normalised).

    The positive of local query ``i`` is target ``query_offset + i`` (``query_offset`` > 0 when
    targets were gathered from several processes and this rank's come after others').
    ``positive_mask [Bq, Bt]`` marks every target that is a correct answer of query ``i``;
    all but the designated positive are excluded from the denominator. ``extra [K, D]`` are
    further negatives of the query-to-target direction only (a memory bank), their logits shifted
    by ``extra_bias [Bq, K]`` (``-inf`` excludes an entry for that query).
    """
    bq = query.shape[0]
    labels = torch.arange(bq, device=query.device) + query_offset
    logits = logit_scale.exp() * query @ target.t()
    if positive_mask is not None:
        fn = positive_mask.clone()
        fn[torch.arange(bq, device=query.device), labels] = False
        logits = logits.masked_fill(fn, float("-inf"))
    if extra is not None:
        bank = logit_scale.exp() * query @ extra.t()
        if extra_bias is not None:
            bank = bank + extra_bias
        logits = torch.cat([logits, bank], dim=1)
    loss = F.cross_entropy(logits, labels)
    if bidirectional:
        # target -> query over this rank's queries: only the targets that are this rank's positives
        t_local = target[query_offset : query_offset + bq]
        logits_t = logit_scale.exp() * t_local @ query.t()
        if positive_mask is not None:
            fn_t = positive_mask[:, query_offset : query_offset + bq].t().clone()
            fn_t.fill_diagonal_(False)
            logits_t = logits_t.masked_fill(fn_t, float("-inf"))
        loss = (loss + F.cross_entropy(logits_t, torch.arange(bq, device=query.device))) / 2
    return loss


class InfoNCELoss(nn.Module):
    """InfoNCE with a learnable temperature (CLIP-style ``logit_scale``, clamped)."""

    def __init__(
        self, init_temperature: float = 0.07, learn_temperature: bool = True, max_scale: float = 100.0, bidirectional: bool = False
    ):
        super().__init__()
        t = torch.tensor(1.0 / init_temperature).log()
        self.logit_scale = nn.Parameter(t) if learn_temperature else nn.Buffer(t)
        self.max_log_scale = float(torch.tensor(max_scale).log())
        self.bidirectional = bidirectional

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale.detach().clamp(max=self.max_log_scale).exp())

    @property
    def scale(self) -> float:
        """The current inverse temperature (detached)."""
        return float(self.logit_scale.detach().clamp(max=self.max_log_scale).exp())

    def forward(self, query, target, positive_mask=None, query_offset: int = 0, extra=None, extra_bias=None):
        scale = self.logit_scale.clamp(max=self.max_log_scale)
        return info_nce(query, target, scale, positive_mask, self.bidirectional, query_offset, extra, extra_bias)
