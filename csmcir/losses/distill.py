"""Distillation from a CIR-CoT teacher: a head into the teacher's space and two losses.

* Feature alignment: the student's query embedding, through :class:`DistillHead`, matches the
  teacher's ``<emb>`` embedding of the same query (``cosine``: ``1 - cos``; ``mse``: squared
  distance of the L2-normalised vectors).
* Relational: over a set of candidate targets (the batch, and the memory bank when there is
  one), the student's query-to-target similarity distribution matches the teacher's,
  ``KL(softmax(T_q T_t^T / tau) || softmax(S_q S_t^T / tau))``, both sides L2-normalised.

The head is trained with the student and is not needed at inference (checkpoints keep it under
``distill.head.*``; the encoder reads ``model.*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["DistillConfig", "DistillHead", "DistillLoss", "feature_distill_loss", "relational_distill_loss"]


@dataclass
class DistillConfig:
    """Distillation from a CIR-CoT teacher (``model.distill`` in YAML).

    Args:
        teacher_dim: the teacher's embedding size (required).
        feature: ``cosine``, ``mse`` or ``None`` (no feature alignment).
        feature_weight: weight of the feature term.
        relational_weight: weight of the relational term (0: off; needs the teacher's image
            embeddings, ``data.teacher_gallery``).
        temperature: of the relational softmaxes.
        hidden: 0 for a linear head, else the hidden width of a one-layer MLP head.
    """

    teacher_dim: int
    feature: str | None = "cosine"
    feature_weight: float = 1.0
    relational_weight: float = 0.0
    temperature: float = 0.05
    hidden: int = 0

    def __post_init__(self):
        if self.feature not in ("cosine", "mse", None):
            raise ConfigError("model.distill.feature must be cosine, mse or null")


class DistillHead(nn.Module):
    """A linear map (``hidden=0``) or a one-hidden-layer MLP from the student's to the teacher's space."""

    def __init__(self, student_dim: int, teacher_dim: int, hidden: int = 0):
        super().__init__()
        if hidden:
            self.net = nn.Sequential(nn.Linear(student_dim, hidden), nn.GELU(), nn.Linear(hidden, teacher_dim))
        else:
            self.net = nn.Linear(student_dim, teacher_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def feature_distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """``student [B, Dt]`` (after the head) against ``teacher [B, Dt]``; mean over the batch."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher.detach().to(student.dtype), dim=-1)
    if kind == "cosine":
        return (1 - (s * t).sum(-1)).mean()
    if kind == "mse":
        return ((s - t) ** 2).sum(-1).mean()
    raise ValueError(f"feature distillation must be cosine or mse, got {kind!r}")


def relational_distill_loss(
    student_q: torch.Tensor, student_t: torch.Tensor, teacher_q: torch.Tensor, teacher_t: torch.Tensor, temperature: float = 0.05
) -> torch.Tensor:
    """KL from the teacher's to the student's softmax over the same candidates; mean over queries."""
    sq, st = F.normalize(student_q, dim=-1), F.normalize(student_t, dim=-1)
    tq, tt = F.normalize(teacher_q.detach().float(), dim=-1), F.normalize(teacher_t.detach().float(), dim=-1)
    log_p_s = torch.log_softmax(sq @ st.t() / temperature, dim=1)
    p_t = torch.softmax(tq @ tt.t() / temperature, dim=1).to(log_p_s.dtype)
    return F.kl_div(log_p_s, p_t, reduction="batchmean")


class DistillLoss(nn.Module):
    """Both distillation terms, from embeddings: ``forward(q, t, teacher_q, teacher_t)`` returns
    ``(total, {"feature": ..., "relational": ...})`` with the terms that are on.

    ``q [B, D]`` student queries, ``t [M, D]`` student candidate targets (the batch's, and the
    bank's when there is one), ``teacher_q [B, Dt]``, ``teacher_t [M, Dt]`` (only with the
    relational term). Holds the :class:`DistillHead`, which inference does not need.
    """

    def __init__(self, student_dim: int, cfg: DistillConfig):
        super().__init__()
        self.cfg = cfg
        self.head = DistillHead(student_dim, int(cfg.teacher_dim), int(cfg.hidden))

    def forward(self, q: torch.Tensor, t: torch.Tensor, teacher_q: torch.Tensor, teacher_t: torch.Tensor | None = None):
        c = self.cfg
        if teacher_q.shape[1] != c.teacher_dim:
            raise ConfigError(f"teacher embeddings are {teacher_q.shape[1]}-d but model.distill.teacher_dim is {c.teacher_dim}")
        total, terms = q.new_zeros(()), {}
        if c.feature and c.feature_weight:
            terms["feature"] = feature_distill_loss(self.head(q), teacher_q, c.feature)
            total = total + c.feature_weight * terms["feature"]
        if c.relational_weight:
            if teacher_t is None:
                raise ConfigError("relational distillation needs the teacher's image embeddings: set data.teacher_gallery")
            terms["relational"] = relational_distill_loss(q, t, teacher_q, teacher_t, c.temperature)
            total = total + c.relational_weight * terms["relational"]
        return total, terms
