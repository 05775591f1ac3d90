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
  A bank of more than ``select_sample`` entries finds the k-th largest as the same quantile
  (``k_i / n_i``) of evenly spaced slots instead of sorting every entry.
* **Momentum keys** (``momentum`` set): the LightningModule keeps an exponential moving average
  (EMA) copy of the dual tower; bank entries are the EMA's target embeddings, and the bank enters
  through its own term :func:`bank_nce`, whose positive is the EMA embedding of the query's own
  target (as in MoCo and ALBEF). Positive and bank negatives then come from one slowly moving
  encoder, so the trained model cannot lower the term by drifting away from old entries.
  With ``keys_per_step`` only that many queries of a batch take the term and write keys (the
  key pass is the bank's largest cost).
* **Plain FIFO** (MoCo-style, the ablation's control): ``max_age=None, half_life=None,
  min_fraction=1`` turns off eviction, decay and selection; only the id masking stays.
* **The drift gate** (``gate`` set, with momentum keys; :class:`DriftGate`): weights follow the
  MEASURED drift instead of the step count. Every ``drift_every`` steps the probe re-encodes a
  sample of entries with the key encoder; their drifts ``1 - cos`` against their ages give the key
  encoder's drift rate ``r`` (``sum d / sum age``). An odometer accumulates ``D += r`` a step, every
  entry remembers ``D`` when it was written, and entry ``j``'s staleness is ``delta_j = D - D_j``:
  its weight is ``w_j = 2 ** (-delta_j / drift_half)``, and it is evicted past ``max_drift``. The
  bank term is weighted by ``g = sum_j w_j / capacity`` (its consistent share): 0 until the first
  drift measurement, small while the model moves fast, towards 1 once it settles, so the bank
  switches itself on and grows as the drift falls (XBM's "slow drift"). Entries of a query's
  correct target count as positives of :func:`bank_nce` (``same_id_positive``, as BLIP does), an
  entry closer than ``duplicate_cos`` to the query's own key is no negative (an unlisted duplicate),
  and the bank has its own learnable temperature (``temperature``, clamped to [0.01, 0.5]).
* **Back-off**: with the gate, the effective rank of each step's target embeddings is measured; if
  it falls below ``rank_floor`` times its best since the bank started acting, the bank empties, its
  term is off for ``backoff_steps`` steps, and the module logs ``train/bank_backoff``. The bank
  acts once its gate is open AND a query keeps at least ``ACTING_KEPT`` entry on average: from
  random weights the targets' rank falls in the first steps whatever the bank does, while the
  duplicate guard still drops nearly every entry, and that fall is no reason to back off.

The bank never imports Lightning; the LightningModule gathers embeddings across ranks before
:meth:`MemoryBank.enqueue`, so every rank holds the same bank.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ..errors import ConfigError

# the bank term's own temperature stays in ALBEF's range (its learnable tau is clamped to [0.001, 0.5];
# 0.01 is the main loss's clamp here)
TEMPERATURE_BOUNDS = (0.01, 0.5)
# the key pass's precision (``key_dtype``): name -> the autocast dtype (None: no autocast; "auto": bfloat16
# where the device has bfloat16 units, see native_bfloat16)
KEY_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "auto": "auto"}


# mean entries a query keeps (over every rank's queries) from which the bank counts as acting, and
# the back-off's reference rank starts (before it, the duplicate guard still drops nearly every entry)
ACTING_KEPT = 1.0


@functools.cache
def native_bfloat16(device_type: str) -> bool:
    """Whether ``device_type`` computes bfloat16 natively: a CUDA GPU that supports it, or an x86
    CPU with AVX-512 BF16 (elsewhere bfloat16 autocast is emulated and slower than float32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private, so looked up with care
        return bool(probe()) if callable(probe) else False
    return False


__all__ = ["MemoryBank", "MemoryBankConfig", "DriftGate", "bank_nce", "effective_rank"]


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
    momentum_keys: str = "auto"
    gate: bool = False
    drift_half: float = 0.05
    max_drift: float = 0.2
    same_id_positive: bool = False
    duplicate_cos: float | None = None
    temperature: float | None = None
    rank_floor: float = 0.5
    backoff_steps: int = 100
    select_sample: int | None = 512
    keys_per_step: int | None = None
    anneal_from: float | None = None
    key_dtype: str = "float32"

    def build(self, dim: int) -> MemoryBank:
        return MemoryBank(dim, **asdict(self))

    @classmethod
    def drift_gated(cls, **changes) -> MemoryBankConfig:
        """The drift-gated bank measured in docs/memory_bank.md and used by the synthetic default
        (``pt_gated_bank_bf16_k64`` in tools/ablation.py), with ``changes`` applied: EMA keys (momentum
        0.995, ``auto`` keys, the key pass in bfloat16 where the device has the units) of half of each
        batch's targets (``keys_per_step`` 64: the other half's key pass would cost more than its
        gain), a bank term of its own whose positives include same-id entries, gated and backed off
        by the measured drift and rank (probed every 10 steps), temperature 0.07, 4096 entries of any
        age, entropy selection down to a quarter of them per query."""
        base = cls(
            capacity=4096,
            max_age=None,
            half_life=None,
            min_fraction=0.25,
            drift_every=10,
            momentum=0.995,
            gate=True,
            same_id_positive=True,
            duplicate_cos=0.95,
            temperature=0.07,
            key_dtype="auto",
            keys_per_step=64,
        )
        return replace(base, **changes)


def bank_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    bank: torch.Tensor,
    bank_bias: torch.Tensor,
    logit_scale: torch.Tensor,
    positive: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE of each query against its momentum key (the positive) and the bank entries:
    ``-log softmax([s q.k, s q.m_j + bias_j])[0]``, averaged; ``s = exp(logit_scale)``. With
    ``positive [B, M]`` the entries it marks are positives too (entries of the query's own correct
    target): ``-log(sum_{pos} e^l / sum_all e^l)``, the key always among the positives.

    Args:
        query: ``[B, D]`` L2-normalised queries (with gradient).
        key: ``[B, D]`` momentum-encoder embeddings of each query's target (no gradient).
        bank: ``[M, D]`` bank entries; ``bank_bias``: ``[B, M]`` from :meth:`MemoryBank.bias`.
    """
    s = logit_scale.exp()
    pos = s * (query * key.detach()).sum(1, keepdim=True)
    logits = torch.cat([pos, s * query @ bank.detach().t() + bank_bias], 1)
    if positive is None:
        return -torch.log_softmax(logits, dim=1)[:, 0].mean()
    is_pos = torch.cat([torch.ones_like(positive[:, :1]), positive], 1)
    num = torch.logsumexp(logits.masked_fill(~is_pos, float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - num).mean()


def effective_rank(emb: torch.Tensor) -> float:
    """Effective rank (Roy and Vetterli 2007) of ``emb [N, D]``: ``exp(H(p))`` with ``p`` the
    singular values divided by their sum; 1 for embeddings on one line, ``min(N, D)`` for an
    orthogonal set. A collapsing model drives it down (docs/memory_bank.md)."""
    sv = torch.linalg.svdvals(emb.detach().float())
    p = sv / sv.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))


class DriftGate(nn.Module):
    """The bank's measured-drift state (see the module docstring); buffers, so it checkpoints.

    ``rate`` < 0 means no drift measured yet (the bank is off); ``odometer`` is the accumulated
    drift ``D``; ``rank_best`` the best effective rank since the bank started acting (0: not yet);
    ``backoff_until`` the step before which the bank stays off after a back-off.
    """

    def __init__(self, drift_half: float = 0.05, max_drift: float = 0.2, rank_floor: float = 0.5, backoff_steps: int = 100):
        super().__init__()
        if drift_half <= 0 or max_drift <= 0 or not 0 <= rank_floor < 1 or backoff_steps < 0:
            raise ConfigError("memory bank gate needs drift_half > 0, max_drift > 0, 0 <= rank_floor < 1, backoff_steps >= 0")
        self.drift_half, self.max_drift, self.rank_floor, self.backoff_steps = (
            float(drift_half),
            float(max_drift),
            rank_floor,
            backoff_steps,
        )
        self.register_buffer("rate", torch.tensor(-1.0, dtype=torch.float64))
        self.register_buffer("odometer", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("last_step", torch.tensor(0, dtype=torch.long))
        self.register_buffer("rank_best", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("backoff_until", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("backoffs", torch.tensor(0, dtype=torch.long))

    @property
    def measured(self) -> bool:
        return float(self.rate) >= 0

    @torch.no_grad()
    def advance(self, step: int) -> None:
        """Move the odometer to ``step`` at the last measured rate."""
        if self.measured and step > int(self.last_step):
            self.odometer += float(self.rate) * (step - int(self.last_step))
        self.last_step.fill_(max(int(step), int(self.last_step)))

    @torch.no_grad()
    def observe_drift(self, drift: torch.Tensor, age: torch.Tensor) -> float:
        """Set the rate from entries' drifts ``1 - cos`` and ages in steps: ``sum d / sum age``."""
        total_age = float(age.clamp(min=0).sum())
        if total_age > 0:
            self.rate.fill_(max(0.0, float(drift.double().sum()) / total_age))
        return float(self.rate)

    def staleness(self, written_at: torch.Tensor) -> torch.Tensor:
        """``delta_j = D - D_j``: the drift accumulated since each entry was written."""
        return (self.odometer - written_at.double()).clamp(min=0)

    def log_weights(self, written_at: torch.Tensor) -> torch.Tensor:
        """``log w_j = -delta_j / drift_half * log 2``; ``-inf`` past ``max_drift`` or before any
        drift was measured."""
        delta = self.staleness(written_at)
        lw = -delta / self.drift_half * math.log(2.0)
        lw = lw.masked_fill(delta > self.max_drift, float("-inf"))
        if not self.measured:
            lw = torch.full_like(lw, float("-inf"))
        return lw.float()

    def backing_off(self, step: int) -> bool:
        return int(step) < int(self.backoff_until)

    @torch.no_grad()
    def observe_rank(self, rank: float, step: int, bank_on: bool) -> bool:
        """Record this step's effective rank while the bank acts (``bank_on``); returns True when it
        starts a back-off (the rank fell below ``rank_floor`` times its best since the bank started
        acting)."""
        if not bank_on or self.backing_off(step):
            return False
        best = max(float(self.rank_best), rank)
        self.rank_best.fill_(best)
        if rank < self.rank_floor * best:
            self.backoff_until.fill_(int(step) + self.backoff_steps)
            self.rank_best.fill_(0.0)  # measured afresh when the bank comes back
            self.backoffs += 1
            return True
        return False


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
        momentum_keys: with ``momentum``, what the EMA copy covers. ``"auto"`` (default):
            ``"qformer"`` when the vision tower is frozen, ``"tower"`` when it trains
            (:class:`CIRModule` decides). ``"tower"``: the whole
            tower, vision included, re-encodes each target image for its key. ``"qformer"``: the
            EMA Q-Former (with its query tokens, text embeddings and projection) reads the image
            features the step already computed with the trained vision tower, so a key costs one
            Q-Former pass and no vision pass. Only for a frozen vision tower (there it gives the
            same keys as ``"tower"``); with a trained tower the keys carry the tower's current drift and
            the synthetic fit did not learn, so :class:`CIRModule` refuses that combination.
        gate: weight entries and the bank term by the measured drift (:class:`DriftGate`, the
            module docstring); needs ``momentum``. ``drift_half``, ``max_drift``, ``rank_floor`` and
            ``backoff_steps`` are its settings.
        same_id_positive: entries of a query's correct target are positives of :func:`bank_nce`
            (otherwise they are dropped); needs ``momentum``.
        duplicate_cos: an entry whose cosine to the query's own momentum key is above this is not
            a negative for that query (an unlisted duplicate of its target); ``None``: no guard.
        temperature: the bank term's own learnable temperature (start; clamped to [0.01, 0.5]);
            ``None``: the main loss's.
        select_sample: a bank larger than this finds each query's k-th largest logit in this
            many evenly spaced slots (the same quantile, ``k_i / n_i``, of a sample) instead of
            sorting all of them; ``None``: always exact. At 512 slots of 4096, 128 queries, one
            thread: the kept share moves by 1.4 points of the bank on average (7 at most) and the
            selection takes 11-12 ms against the exact sort's 39-41 (docs/memory_bank.md).
        keys_per_step: with ``momentum``, only the first this many queries of each batch (batches
            are shuffled: a random subset) take the bank term, so the EMA encodes only their
            targets and only those keys enter the bank; the key pass, the selection and the term
            cost that share of a full batch's. ``None``: every query.
        anneal_from: from this share of the fit's steps on (e.g. ``0.5``), the bank term's weight
            falls linearly, reaching 0 at the fit's step count (:meth:`anneal`); ``None``: constant.
        key_dtype: with ``momentum``, the precision of the EMA encoder's key pass and of the drift
            probe's re-encoding: ``"float32"`` (default: the step's own precision, a mixed-precision
            trainer's autocast included) or ``"bfloat16"`` (autocast; the keys are stored in float32,
            L2-normalised again). The key pass is no-grad, so only the keys' rounding changes
            (tests/test_memory_bank.py bounds 1 - cos to the float32 key). It can only pay where the
            device has bfloat16 units (GPUs, x86 CPUs with AVX-512 BF16); on such a CPU the
            bank's cost a step fell from about +29 % to +14 % (steps with and without the bank
            alternating inside one fit, tools/bench_bank_paired.py; docs/memory_bank.md).
            ``"auto"``: ``"bfloat16"`` where :func:`native_bfloat16` says the device has those
            units, ``"float32"`` elsewhere.
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
        momentum_keys: str = "auto",
        gate: bool = False,
        drift_half: float = 0.05,
        max_drift: float = 0.2,
        same_id_positive: bool = False,
        duplicate_cos: float | None = None,
        temperature: float | None = None,
        rank_floor: float = 0.5,
        backoff_steps: int = 100,
        select_sample: int | None = 512,
        keys_per_step: int | None = None,
        anneal_from: float | None = None,
        key_dtype: str = "float32",
    ):
        super().__init__()
        if key_dtype not in KEY_DTYPES:
            raise ConfigError(f"memory bank key_dtype must be one of {sorted(KEY_DTYPES)}, got {key_dtype!r}")
        if key_dtype == "bfloat16" and momentum is None:
            raise ConfigError("memory bank key_dtype applies to momentum keys only (set momentum, e.g. 0.995)")
        self.key_dtype = key_dtype
        if anneal_from is not None and not 0 <= anneal_from < 1:
            raise ConfigError(f"memory bank anneal_from must lie in [0, 1) or be null, got {anneal_from}")
        self.anneal_from = anneal_from
        if select_sample is not None and select_sample < 1:
            raise ConfigError(f"memory bank select_sample must be >= 1 or null, got {select_sample}")
        self.select_sample = select_sample
        if keys_per_step is not None and (keys_per_step < 1 or momentum is None):
            raise ConfigError(f"memory bank keys_per_step must be >= 1 and needs momentum keys, got {keys_per_step}")
        self.keys_per_step = keys_per_step
        if (gate or same_id_positive) and momentum is None:
            raise ConfigError("memory bank gate and same_id_positive need momentum keys (e.g. momentum: 0.995)")
        if temperature is not None and not TEMPERATURE_BOUNDS[0] <= temperature <= TEMPERATURE_BOUNDS[1]:
            raise ConfigError(f"memory bank temperature must lie in {list(TEMPERATURE_BOUNDS)}, got {temperature}")
        if duplicate_cos is not None and not -1 < duplicate_cos <= 1:
            raise ConfigError(f"memory bank duplicate_cos must be in (-1, 1] or null, got {duplicate_cos}")
        if momentum is not None and not 0 <= momentum < 1:
            raise ConfigError("memory bank momentum must be in [0, 1) or null")
        if momentum_keys not in ("auto", "tower", "qformer"):
            raise ConfigError(f"memory bank momentum_keys must be 'auto', 'tower' or 'qformer', got {momentum_keys!r}")
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
        self.same_id_positive, self.duplicate_cos = same_id_positive, duplicate_cos
        self.gate = DriftGate(drift_half, max_drift, rank_floor, backoff_steps) if gate else None
        if gate:  # the odometer reading when each slot was written
            self.register_buffer("written_at", torch.zeros(capacity, dtype=torch.float64))
        # the bank term's own inverse temperature, learnable (no weight decay: "logit_scale" in its name)
        self.logit_scale = None if temperature is None else nn.Parameter(torch.tensor(1.0 / temperature).log())

    def scale_param(self, fallback: torch.Tensor) -> torch.Tensor:
        """The bank term's log inverse temperature, clamped to its bounds (``fallback``: the main
        loss's, already clamped, when the bank has none)."""
        if self.logit_scale is None:
            return fallback
        return self.logit_scale.clamp(math.log(1 / TEMPERATURE_BOUNDS[1]), math.log(1 / TEMPERATURE_BOUNDS[0]))

    def encode_keys(self, encode, device_type: str) -> torch.Tensor:
        """``encode()`` (the key encoder's pass, a no-argument callable) under no grad at
        ``key_dtype``; the keys come back in float32, L2-normalised."""
        dtype = KEY_DTYPES[self.key_dtype]
        if dtype == "auto":
            dtype = torch.bfloat16 if native_bfloat16(device_type) else None
        if dtype is None:  # the precision the step runs at (under a mixed-precision trainer, its autocast)
            with torch.no_grad():
                return encode()
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype):
            keys = encode()
        return nn.functional.normalize(keys.float(), dim=-1)

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
        if self.gate is not None:
            self.written_at[slots] = self.gate.odometer
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

    def drift(self, slots: torch.Tensor, fresh: torch.Tensor, step: int | None = None) -> float:
        """Mean cosine drift ``1 - cos(m_j, fresh_j)`` of the entries in ``slots`` against the same
        targets re-encoded now (``fresh``, L2-normalised): how stale the bank is. With the gate and
        ``step``, the drifts and the entries' ages also set its drift rate."""
        d = 1 - (self.emb[slots] * fresh.to(self.emb.dtype)).sum(1)
        if self.gate is not None and step is not None:
            self.gate.observe_drift(d, int(step) - self.steps[slots])
        return float(d.mean())

    def log_age_weights(self, step: int) -> torch.Tensor:
        """``log w_j = -(step - s_j) / half_life * log 2`` for every slot (0 without decay); with
        the gate, the measured-drift weights of :meth:`DriftGate.log_weights` join them."""
        if self.gate is not None:
            lw = self.gate.log_weights(self.written_at)
            return lw if self.half_life is None else lw + self._age_decay(step)
        return self._age_decay(step)

    def _age_decay(self, step: int) -> torch.Tensor:
        if self.half_life is None:
            return torch.zeros_like(self.emb[:, 0])
        age = (int(step) - self.steps).clamp(min=0).to(self.emb.dtype)
        return -age / self.half_life * math.log(2.0)

    def anneal(self, step: int, total_steps: int) -> float:
        """The bank term's scheduled weight factor at ``step`` of ``total_steps``: 1 up to
        ``anneal_from * total_steps``, then falling linearly to 0 at ``total_steps`` (the last
        step, ``total_steps - 1``, keeps ``1 / ((1 - anneal_from) * total_steps)`` of it)."""
        if self.anneal_from is None:
            return 1.0
        start = self.anneal_from * total_steps
        return min(1.0, max(0.0, (total_steps - step) / max(total_steps - start, 1.0)))

    def gate_weight(self, step: int) -> float:
        """The bank term's weight factor ``g``: 1 without the gate; with it, the kept entries'
        summed weight over the capacity (0 before the first drift measurement and while backing off)."""
        if self.gate is None:
            return 1.0
        if self.gate.backing_off(step) or not self.gate.measured:
            return 0.0
        lw = self.log_age_weights(step).masked_fill(~self.valid() | self._too_old(step), float("-inf"))
        return float(lw.exp().sum()) / self.capacity

    @torch.no_grad()
    def observe_rank(self, emb: torch.Tensor, step: int, kept: float | None = None) -> tuple[float, bool]:
        """With the gate: the effective rank of this step's target embeddings ``emb``; a fall below
        ``rank_floor`` times its best since the bank started acting empties the bank and starts a
        back-off. ``kept``: the mean entries a query kept this step, over every rank's queries (so
        every rank decides alike); below ``ACTING_KEPT`` the bank has not acted yet and the rank is
        not recorded. ``None``: acting whenever the gate is open. Returns ``(rank, backed_off_now)``."""
        rank = effective_rank(emb)
        if self.gate is None:
            return rank, False
        acting = self.gate_weight(step) > 0 and (kept is None or kept >= ACTING_KEPT)
        started = self.gate.observe_rank(rank, step, bank_on=acting)
        if started:
            self.ids.fill_(-1)
        return rank, started

    # -- the loss' extra negatives ----------------------------------------------------------
    def same_id(self, all_targets: torch.Tensor) -> torch.Tensor:
        """``[B, capacity]``: slots whose id is one of query ``i``'s correct targets (empty slots
        included; callers mask them). Computed once a step and passed to :meth:`positives` and
        :meth:`bias`. A lookup table ``[B, max id + 2]`` marked at each query's targets, read at
        the slots' ids (the ``[B, T, capacity]`` comparison it replaces took 62-99 ms against 2-4
        at 128 x 4096 with the synthetic train split's T = 68, one thread, docs/memory_bank.md)."""
        b = all_targets.shape[0]
        n = int(max(int(all_targets.max()) if all_targets.numel() else -1, int(self.ids.max()))) + 2
        table = torch.zeros(b, n, dtype=torch.bool, device=self.ids.device)
        # -1 (padding, empty slot) maps to column 0, which stays False
        table.scatter_(1, all_targets.to(self.ids.device, torch.long).clamp(min=-1) + 1, True)
        table[:, 0] = False
        return table[:, self.ids + 1]

    def positives(self, all_targets: torch.Tensor, step: int, same: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, capacity]``: kept entries whose id is one of query ``i``'s correct targets
        (``same``: :meth:`same_id`, when the caller has it already)."""
        kept = self.valid() & ~self._too_old(step) & torch.isfinite(self.log_age_weights(step))
        return (self.same_id(all_targets) if same is None else same) & kept[None, :]

    def bias(
        self,
        query: torch.Tensor,
        scale: float,
        all_targets: torch.Tensor,
        step: int,
        batch_logits: torch.Tensor | None = None,
        key: torch.Tensor | None = None,
        positive: torch.Tensor | None = None,
        same: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, capacity]`` additive bias for the bank's logits ``scale * query @ emb.T``:
        ``log w_j`` for selected entries, ``-inf`` for empty, evicted, false-negative or
        unselected ones. ``batch_logits [B, Bt]`` (the in-batch logits, ``-inf`` where masked)
        join the entropy; no gradient flows through the selection. With ``duplicate_cos`` and the
        queries' momentum keys ``key [B, D]``, entries closer than it to the key are excluded too.
        With ``same_id_positive`` the entries of :meth:`positives` (``positive``, when the caller
        has it already) get ``log w_j`` (never selected away); the caller passes that mask to
        :func:`bank_nce`. ``same``: :meth:`same_id`, when the caller has it already."""
        with torch.no_grad():
            b = query.shape[0]
            sims = scale * query.detach() @ self.emb.t()
            lw = self.log_age_weights(step)
            bias = lw.expand(b, -1).clone()
            excluded = ~self.valid()[None, :] | self._too_old(step)[None, :]
            same = self.same_id(all_targets) if same is None else same
            excluded = excluded | same
            if self.duplicate_cos is not None and key is not None:
                excluded = excluded | (key.detach().to(self.emb.dtype) @ self.emb.t() > self.duplicate_cos)
            bias.masked_fill_(excluded, float("-inf"))
            if self.same_id_positive:
                pos = self.positives(all_targets, step, same) if positive is None else positive
                return torch.where(pos, lw.expand(b, -1), self._select(bias, sims, batch_logits))
            return self._select(bias, sims, batch_logits)

    def _select(self, bias: torch.Tensor, sims: torch.Tensor, batch_logits: torch.Tensor | None) -> torch.Tensor:
        """Entropy selection: each query keeps its ``k_i`` hardest of the entries ``bias`` allows."""
        with torch.no_grad():
            if self.min_fraction >= 1:
                return bias  # every valid entry, no selection
            logits = sims + bias
            full = logits if batch_logits is None else torch.cat([batch_logits.detach(), logits], 1)
            p = torch.softmax(full, dim=1)
            # entries are finite or -inf (masked): "> -inf" counts them in one pass (isfinite takes three)
            n = (full > float("-inf")).sum(1).clamp(min=2).to(p.dtype)
            h = -(p * torch.log(p.clamp_min(1e-30))).sum(1) / torch.log(n)
            n_bank = (logits > float("-inf")).sum(1)
            k = torch.ceil(n_bank * (self.min_fraction + (1 - self.min_fraction) * h.clamp(0, 1))).long()
            # keep each query's k hardest: everything below its k-th largest logit goes (a sort of
            # the values and a gather; ranking every entry by argsort + scatter cost twice as much)
            m = logits.shape[1]
            if self.select_sample is not None and m > self.select_sample:
                # the same quantile in evenly spaced slots (every age of the ring): k_s / n_s = k / n
                cols = torch.linspace(0, m - 1, self.select_sample, device=logits.device).round().long()
                sample = logits[:, cols]
                n_s = (sample > float("-inf")).sum(1)
                k = torch.ceil(n_s * k / n_bank.clamp(min=1)).long()
                logits_k = sample
            else:
                logits_k = logits
            kth = logits_k.sort(dim=1, descending=True).values.gather(1, (k - 1).clamp(min=0)[:, None])
            return bias.masked_fill(logits < kth, float("-inf"))
