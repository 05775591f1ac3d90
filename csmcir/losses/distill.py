"""Distillation from a CIR-CoT teacher: a head into the teacher's space and two losses.

* Feature alignment: the student's query embedding, through :class:`DistillHead`, matches the
  teacher's ``<emb>`` embedding of the same query (``cosine``: ``1 - cos``; ``mse``: squared
  distance of the L2-normalised vectors).
* Relational: over a set of candidate targets (the batch, and the memory bank when there is
  one), the student's query-to-target similarity distribution matches the teacher's,
  ``KL(softmax(T_q T_t^T / tau) || softmax(S_q S_t^T / tau))``, both sides L2-normalised.

The head is trained with the student and is not needed at inference (checkpoints keep it under
``distill_head.*``; the encoder reads ``model.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DistillHead", "feature_distill_loss", "relational_distill_loss"]


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


def relational_distill_loss(student_q: torch.Tensor, student_t: torch.Tensor, teacher_q: torch.Tensor, teacher_t: torch.Tensor,
                            temperature: float = 0.05) -> torch.Tensor:
    """KL from the teacher's to the student's softmax over the same candidates; mean over queries."""
    sq, st = F.normalize(student_q, dim=-1), F.normalize(student_t, dim=-1)
    tq, tt = F.normalize(teacher_q.detach().float(), dim=-1), F.normalize(teacher_t.detach().float(), dim=-1)
    log_p_s = torch.log_softmax(sq @ st.t() / temperature, dim=1)
    p_t = torch.softmax(tq @ tt.t() / temperature, dim=1).to(log_p_s.dtype)
    return F.kl_div(log_p_s, p_t, reduction="batchmean")
