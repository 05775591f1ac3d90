"""A memory bank of target-side negatives, weighted by age and selected by query entropy.

Rule (``docs/memory_bank.md`` will carry the measurements; this is the definition):

* The bank is a ring buffer of ``capacity`` detached, L2-normalised target embeddings ``m_j``
  with their target ids and the global step ``s_j`` at which they were computed.
* **Age.** At step ``s`` entry ``j`` has age ``a_j = s - s_j``. Entries with ``a_j > max_age``
  are evicted. A kept entry enters the softmax denominator with weight
  ``w_j = 2 ** (-a_j / half_life)``, i.e. its logit gets ``+ log w_j``: a stale embedding (made
  by an older model) counts less than a fresh one.
* **False negatives.** An entry whose id is one of query ``i``'s correct targets is excluded
  (datasets list identical scenes and several correct answers as targets, so content-equal
  entries are covered by the same ids).
* **Entropy.** For query ``i`` let ``p_i`` be the softmax of its scaled similarities over the
  in-batch candidates and the kept bank entries, and ``h_i = H(p_i) / log(n_i)`` its normalised
  entropy in [0, 1]. Query ``i`` keeps its ``k_i = ceil(n_bank * (min_fraction + (1 -
  min_fraction) * h_i))`` most similar bank entries: a confident query (low entropy) gets only
  the hardest negatives, an uncertain one a broad set. Selection is computed without gradient.
* **Momentum keys** (``momentum`` set): the LightningModule keeps an exponential moving average
  (EMA) copy of the dual tower; bank entries are the EMA's target embeddings, and the bank enters
  through its own term :func:`bank_nce`, whose positive is the EMA embedding of the query's own
  target (as in MoCo and ALBEF). Positive and bank negatives then come from one slowly moving
  encoder, so the trained model cannot lower the term by drifting away from old entries.
* **Plain FIFO** (MoCo-style, the ablation's control): ``max_age=None, half_life=None,
  min_fraction=1`` turns off eviction, decay and selection; only the id masking stays.

The bank never imports Lightning; the LightningModule gathers embeddings across ranks before
:meth:`MemoryBank.enqueue`, so every rank holds the same bank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["MemoryBank", "MemoryBankConfig", "bank_nce"]


@dataclass
class MemoryBankConfig:
    """The options of :class:`MemoryBank` (``model.memory_bank`` in YAML); see its docstring.
    The defaults are the entropy + temporal bank."""

    capacity: int = 4096
    max_age: int | None = 200
    half_life: float | None = 100.0
    min_fraction: float = 0.25
    drift_every: int = 50
    drift_sample: int = 64
    momentum: float | None = None
    weight: float = 1.0
    momentum_keys: str = "tower"

    def build(self, dim: int) -> MemoryBank:
        return MemoryBank(dim, **asdict(self))


def bank_nce(
    query: torch.Tensor, key: torch.Tensor, bank: torch.Tensor, bank_bias: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """InfoNCE of each query against its momentum key (the positive) and the bank entries:
    ``-log softmax([s q.k, s q.m_j + bias_j])[0]``, averaged; ``s = exp(logit_scale)``.

    Args:
        query: ``[B, D]`` L2-normalised queries (with gradient).
        key: ``[B, D]`` momentum-encoder embeddings of each query's target (no gradient).
        bank: ``[M, D]`` bank entries; ``bank_bias``: ``[B, M]`` from :meth:`MemoryBank.bias`.
    """
    s = logit_scale.exp()
    pos = s * (query * key.detach()).sum(1, keepdim=True)
    logits = torch.cat([pos, s * query @ bank.detach().t() + bank_bias], 1)
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()


class MemoryBank(nn.Module):
    """Ring buffer of detached target embeddings; its buffers live in checkpoints.

    Args:
        dim: embedding size.
        capacity: entries kept (the oldest are overwritten first).
        max_age: entries older than this many steps are evicted (``None``: only overwritten).
        half_life: steps after which an entry's weight in the denominator halves (``None``: no
            decay).
        min_fraction: the share of the bank a zero-entropy query still keeps (its hardest);
            ``1`` keeps every entry for every query (no entropy selection).
        drift_every: every this many steps the trainer re-encodes up to ``drift_sample`` entries
            with the encoder that made them (the EMA copy with ``momentum``, else the trained
            model) and logs their mean cosine drift (0 turns it off).
        momentum: ``None`` (entries are the trained model's targets, extra negatives of the main
            loss) or the EMA momentum of a key encoder (e.g. 0.99; see the module docstring).
        weight: weight of the :func:`bank_nce` term (with ``momentum``).
        momentum_keys: with ``momentum``, what the EMA copy covers. ``"tower"`` (default): the whole
            tower, vision included, re-encodes each target image for its key. ``"qformer"``: the
            EMA Q-Former (with its query tokens, text embeddings and projection) reads the image
            features the step already computed with the trained vision tower, so a key costs one
            Q-Former pass and no vision pass. Only for a frozen vision tower (there it gives the
            same keys as ``"tower"``); with a trained tower the keys carry the tower's current drift and
            the synthetic fit did not learn, so :class:`CIRModule` refuses that combination.
    """

    def __init__(
        self,
        dim: int,
        capacity: int = 4096,
        max_age: int | None = 200,
        half_life: float | None = 100.0,
        min_fraction: float = 0.25,
        drift_every: int = 50,
        drift_sample: int = 64,
        momentum: float | None = None,
        weight: float = 1.0,
        momentum_keys: str = "tower",
    ):
        super().__init__()
        if momentum is not None and not 0 <= momentum < 1:
            raise ConfigError("memory bank momentum must be in [0, 1) or null")
        if momentum_keys not in ("tower", "qformer"):
            raise ConfigError(f"memory bank momentum_keys must be 'tower' or 'qformer', got {momentum_keys!r}")
        self.momentum, self.weight, self.momentum_keys = momentum, float(weight), momentum_keys
        if capacity < 1 or (max_age is not None and max_age < 0) or (half_life is not None and half_life <= 0) or not 0 < min_fraction <= 1:
            raise ConfigError("memory bank needs capacity >= 1, max_age >= 0 or null, half_life > 0 or null, 0 < min_fraction <= 1")
        self.capacity, self.max_age, self.min_fraction = capacity, max_age, min_fraction
        self.half_life = None if half_life is None else float(half_life)
        self.drift_every, self.drift_sample = drift_every, drift_sample
        self.register_buffer("emb", torch.zeros(capacity, dim))
        self.register_buffer("ids", torch.full((capacity,), -1, dtype=torch.long))
        self.register_buffer("steps", torch.zeros(capacity, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    # -- contents ----------------------------------------------------------------------------
    @torch.no_grad()
    def enqueue(self, emb: torch.Tensor, ids: torch.Tensor, step: int) -> None:
        """Write ``emb [N, D]`` (detached) with ``ids [N]`` at ``step``, oldest slots first."""
        emb, ids = emb.detach()[-self.capacity :], ids.detach()[-self.capacity :]
        n = emb.shape[0]
        slots = (self.ptr + torch.arange(n, device=self.ids.device)) % self.capacity
        self.emb[slots] = emb.to(self.emb.dtype)
        self.ids[slots] = ids.to(self.ids.device, torch.long)
        self.steps[slots] = int(step)
        self.ptr.fill_(int((self.ptr + n) % self.capacity))

    @torch.no_grad()
    def evict(self, step: int) -> int:
        """Drop entries older than ``max_age``; returns how many were dropped."""
        if self.max_age is None:
            return 0
        old = (self.ids >= 0) & self._too_old(step)
        self.ids[old] = -1
        return int(old.sum())

    def _too_old(self, step: int) -> torch.Tensor:
        if self.max_age is None:
            return torch.zeros_like(self.ids, dtype=torch.bool)
        return int(step) - self.steps > self.max_age

    def valid(self) -> torch.Tensor:
        return self.ids >= 0

    def __len__(self) -> int:
        return int(self.valid().sum())

    def drift(self, slots: torch.Tensor, fresh: torch.Tensor) -> float:
        """Mean cosine drift ``1 - cos(m_j, fresh_j)`` of the entries in ``slots`` against the same
        targets re-encoded now (``fresh``, L2-normalised): how stale the bank is."""
        return float((1 - (self.emb[slots] * fresh.to(self.emb.dtype)).sum(1)).mean())

    def log_age_weights(self, step: int) -> torch.Tensor:
        """``log w_j = -(step - s_j) / half_life * log 2`` for every slot (0 without decay)."""
        if self.half_life is None:
            return torch.zeros_like(self.emb[:, 0])
        age = (int(step) - self.steps).clamp(min=0).to(self.emb.dtype)
        return -age / self.half_life * math.log(2.0)

    # -- the loss' extra negatives ----------------------------------------------------------
    def bias(
        self, query: torch.Tensor, scale: float, all_targets: torch.Tensor, step: int, batch_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, capacity]`` additive bias for the bank's logits ``scale * query @ emb.T``:
        ``log w_j`` for selected entries, ``-inf`` for empty, evicted, false-negative or
        unselected ones. ``batch_logits [B, Bt]`` (the in-batch logits, ``-inf`` where masked)
        join the entropy; no gradient flows through the selection."""
        with torch.no_grad():
            b = query.shape[0]
            sims = scale * query.detach() @ self.emb.t()
            bias = self.log_age_weights(step).expand(b, -1).clone()
            excluded = ~self.valid()[None, :] | self._too_old(step)[None, :]
            excluded = excluded | (all_targets[:, :, None] == self.ids[None, None, :]).any(1)
            bias[excluded.expand(b, -1)] = float("-inf")
            if self.min_fraction >= 1:
                return bias  # every valid entry, no selection
            logits = sims + bias
            full = logits if batch_logits is None else torch.cat([batch_logits.detach(), logits], 1)
            p = torch.softmax(full, dim=1)
            n = torch.isfinite(full).sum(1).clamp(min=2).to(p.dtype)
            h = -(p * torch.log(p.clamp_min(1e-30))).sum(1) / torch.log(n)
            n_bank = torch.isfinite(logits).sum(1)
            k = torch.ceil(n_bank * (self.min_fraction + (1 - self.min_fraction) * h.clamp(0, 1))).long()
            # keep each query's k hardest: everything below its k-th largest logit goes (a sort of
            # the values and a gather; ranking every entry by argsort + scatter cost twice as much)
            kth = logits.sort(dim=1, descending=True).values.gather(1, (k - 1).clamp(min=0)[:, None])
            return bias.masked_fill(logits < kth, float("-inf"))
