"""The one LightningModule: training logic for the symmetric dual tower, nothing else.

The network (a :class:`csmcir.models.CIRDualTower`) is injected: built from its spec
(``model.net`` in YAML, :func:`csmcir.models.build_network`) or passed in built. The losses are
separate objects that take embeddings (:class:`~csmcir.losses.InfoNCELoss`, the
:class:`~csmcir.losses.MemoryBank` and :func:`~csmcir.losses.bank_nce`,
:class:`~csmcir.losses.DistillLoss`). The optimizer and scheduler are configurable (LightningCLI's
``model.optimizer`` / ``model.scheduler``); AdamW with linear warm-up and cosine decay is the
default. Of the DataModule it reads only ``text_config``, ``train_store``, ``evaluators(stage)``
and ``attach_feature_cache`` (see :class:`~csmcir.data.datamodule.CIRDataModule`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import asdict

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ..config import IntentConfig
from ..data.batch import EvalBatch, TrainBatch
from ..errors import ConfigError, CsmcirError
from ..inference import CHECKPOINT_FORMAT, CHECKPOINT_KEY
from ..losses import DistillConfig, DistillLoss, InfoNCELoss, MemoryBankConfig, bank_nce, same_target_mask
from ..models import CIRDualTower, NetworkSpec, build_network


def _typed(value, cls, name: str):
    """A config section given as a dict (Python users, old hparams) -> its dataclass."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"model.{name} must be a mapping of {cls.__name__} fields or null, got {value!r}")
    try:
        return cls(**value)
    except TypeError as e:
        raise ConfigError(f"model.{name}: {e}") from None


class CIRModule(L.LightningModule):
    """Trains the shared Q-Former dual tower with InfoNCE over in-batch negatives.

    Args:
        net: the network: a :class:`~csmcir.models.NetworkSpec` (``model.net.model``,
            ``.overrides``, ``.init``, ``.freeze_vision``, ``.grad_checkpointing``; the default is
            the synthetic default's ``lite0_small``: the packaged ImageNet EfficientNet-Lite0,
            frozen, at 112 px, under a 128-wide Q-Former trained from scratch), or an already built
            :class:`~csmcir.models.CIRDualTower` (Python API).
        lr: peak learning rate of the default AdamW; ``weight_decay`` applies to weights, not to
            norms, biases, embeddings or the temperature.
        warmup_steps: linear warm-up, then cosine decay to ``lr * min_lr_ratio`` at the last step
            (the default scheduler).
        temperature: initial InfoNCE temperature; ``learn_temperature`` makes it learnable.
        bidirectional: add the target-to-query InfoNCE direction (each positive target against
            this rank's queries) and average the two; on by default (+1.8 test R@1 over 3 seeds
            on the synthetic default, docs/benchmarks.md section 2, s5).
        gather_negatives: under DDP, use every rank's targets as negatives (gradients flow back
            to the rank that computed them).
        memory_bank: ``null`` (default: in-batch negatives only) or a
            :class:`~csmcir.losses.MemoryBankConfig`: target embeddings of earlier steps as extra
            negatives, weighted by age and selected by each query's entropy; ``momentum`` makes an
            EMA copy encode them (``momentum_keys: auto``, the default: only its Q-Former, on the
            step's own image features, while the vision tower is frozen; the whole tower when it
            trains); ``gate`` weights entries by the measured drift.
            Off here (the CLI's synthetic default turns on
            :meth:`~csmcir.losses.MemoryBankConfig.drift_gated`): banks of the trained model's own
            old targets collapse training; the drift-gated bank with bfloat16 keys costs about
            14 % more a step and, at the in-batch recipe's wall clock over the frozen tower, wins
            test R@1 on 5 of 5 seeds and held-out R@1 on 4 of 5 (docs/memory_bank.md).
        distill: ``null`` (default) or a :class:`~csmcir.losses.DistillConfig` (distillation from
            a CIR-CoT teacher, ``data.teacher``); the head is dropped at inference.
        intent: ``null`` (default) or an :class:`~csmcir.config.IntentConfig`: CIR-LVLM's task
            prompt per side and soft prompts chosen from a learnable pool, before the Q-Former's
            text (:mod:`csmcir.models.intent`); part of the network, so checkpoints and inference
            keep it. Logs ``train/loss_intent_pull`` and, per epoch, ``train/intent_pool_entropy``
            (1: prompts chosen evenly, 0: a collapsed pool) and ``train/intent_pool_used``.
        feature_cache: a folder: with the vision tower frozen, encode every image once into
            float16 memory-mapped features there (keyed by tower weights and image id, resumable;
            :mod:`csmcir.data.feature_cache`) and train and evaluate the Q-Former from them
            instead of re-encoding pixels every step. ``auto`` (default): ``cache/features`` when
            the tower is frozen, no cache when it trains; ``null``: never.
        eval_ks: the K of the logged Recall@K.
        optimizer: ``null`` (AdamW, betas (0.9, 0.98), ``lr``, ``weight_decay`` on weights only)
            or any optimizer class (``--model.optimizer SGD --model.optimizer.lr 0.1``); it
            receives the two weight-decay parameter groups.
        scheduler: ``null`` (warm-up + cosine, stepped every step) or any LR scheduler class,
            stepped every step.
    """

    def __init__(
        self,
        net: NetworkSpec = NetworkSpec(model="lite0_small"),
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.05,
        temperature: float = 0.01,
        learn_temperature: bool = True,
        bidirectional: bool = True,
        gather_negatives: bool = True,
        memory_bank: MemoryBankConfig | None = None,
        distill: DistillConfig | None = None,
        intent: IntentConfig | None = None,
        feature_cache: str | None = "auto",
        eval_ks: list[int] = [1, 5, 10, 50],
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "memory_bank", "distill", "intent"])
        memory_bank = _typed(memory_bank, MemoryBankConfig, "memory_bank")
        distill = _typed(distill, DistillConfig, "distill")
        intent = _typed(intent, IntentConfig, "intent")
        self.hparams["intent"] = None if intent is None else asdict(intent)
        # checkpoints hold plain types only (torch.load(weights_only=True) reads them back)
        self.hparams["memory_bank"] = None if memory_bank is None else asdict(memory_bank)
        self.hparams["distill"] = None if distill is None else asdict(distill)
        if isinstance(net, torch.nn.Module):
            if intent is not None:
                raise ConfigError("model.intent with a built network: give the network's config an intent instead")
            self.model = net
        else:
            from lightning.pytorch.utilities import rank_zero_info

            spec = _typed(net, NetworkSpec, "net")
            if intent is not None:  # the prompts are part of the network: its config carries them
                spec = dataclasses.replace(spec, overrides={**(spec.overrides or {}), "intent": asdict(intent)})
            self.hparams["net"] = spec.to_dict()
            self.model = build_network(spec, info=rank_zero_info)
        if not isinstance(self.model, CIRDualTower):
            raise ConfigError(f"model.net must build a CIRDualTower, got {type(self.model).__name__}")
        self.model_config = self.model.cfg
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.loss = InfoNCELoss(temperature, learn_temperature, bidirectional=bidirectional)
        # extra negatives from earlier steps (csmcir/losses/memory_bank.py); off by default until
        # its ablation shows it helps
        self.bank = memory_bank.build(self.model_config.embed_dim) if memory_bank else None
        # with a momentum bank: an EMA copy of the tower encodes the bank's keys (saved in
        # checkpoints as ema_model.*; inference reads model.* only)
        self.ema_model = None
        if self.bank is not None and self.bank.momentum is not None:
            if self.bank.momentum_keys == "auto":  # keys follow the tower: no EMA vision pass while it is frozen
                self.bank.momentum_keys = "tower" if self._vision_trains() else "qformer"
            qformer_keys = self.bank.momentum_keys == "qformer"
            if qformer_keys and self._vision_trains():
                # measured: keys that pair a trained tower's current features with an EMA Q-Former let
                # the model separate the positive key from older entries by the tower's drift alone
                raise ConfigError(
                    "model.memory_bank.momentum_keys: qformer needs a frozen vision tower (model.net.freeze_vision: "
                    "true, or pretrained vision weights from model.net.init); with a trained tower the synthetic "
                    "fit did not learn (test R@1 0.0, docs/memory_bank.md). Use momentum_keys: tower."
                )
            # momentum_keys qformer: keys read the (frozen) tower's features, so the copy leaves the
            # vision tower out (an empty stand-in; the memo keeps deepcopy from copying it at all)
            memo = {id(self.model.vision): torch.nn.Identity()} if qformer_keys else {}
            self.ema_model = copy.deepcopy(self.model, memo).requires_grad_(False)
        self._ema_pairs = None  # update_ema's (ema, model) tensor lists, built at its first call
        self.distill = DistillLoss(self.model_config.embed_dim, distill) if distill else None
        self._eval: dict[str, dict[str, list]] = {}
        pool = self.model.intent.cfg.pool_size if self.model.intent is not None else 0
        self._intent_counts = torch.zeros(pool, dtype=torch.long) if pool else None

    def _vision_trains(self) -> bool:
        return any(p.requires_grad for p in self.model.vision.parameters())

    # -- training ----------------------------------------------------------------------------
    def _encode_step(self, b: TrainBatch):
        """Queries ``q [B, D]``, and the target side in one Q-Former pass: positives, then any
        hard negatives, then any reference negatives (the reference image with its caption,
        reusing the query side's image features). Returns ``(q, candidates, their rows, target
        image features)``."""
        ref_features = self.model.encode_image(b.ref)
        q = self._encode(b.query_ids, b.query_mask, ref_features, "query")
        pixels, ids, mask, rows = b.target, b.caption_ids, b.caption_mask, b.target_row
        if b.neg is not None:
            negs = b.neg.flatten(0, 1)
            if pixels.is_floating_point():
                # cached features (float16) in the model's dtype first: under CPU bf16 autocast,
                # torch.cat of float16 tensors fails ("Unexpected floating ScalarType")
                pixels, negs = self.model.encode_image(pixels), self.model.encode_image(negs)
            pixels = torch.cat([pixels, negs.to(pixels.dtype)])
            ids = torch.cat([ids, b.neg_caption_ids.flatten(0, 1)])
            mask = torch.cat([mask, b.neg_caption_mask.flatten(0, 1)])
            rows = torch.cat([rows, b.neg_rows.flatten()])
        features = self.model.encode_image(pixels)
        if b.ref_caption_ids is not None:
            features = torch.cat([features, ref_features.to(features.dtype)])
            ids = torch.cat([ids, b.ref_caption_ids])
            mask = torch.cat([mask, b.ref_caption_mask])
            rows = torch.cat([rows, b.ref_row])
        return q, self._encode(ids, mask, features, "target"), rows, features

    def _encode(self, ids, mask, features, side: str) -> torch.Tensor:
        """``model.encode`` of one side; with an intent pool, the key-pulling term of its choices
        joins the step's loss (``self._intent_pull``) and the choices are counted."""
        if self.model.intent is None:
            return self.model.encode(ids, mask, image_features=features, side=side)
        emb, sel = self.model.encode(ids, mask, image_features=features, side=side, return_selection=True)
        if sel is not None:
            self._intent_pull.append(sel.pull_loss())
            self._intent_counts += torch.bincount(sel.index.flatten().cpu(), minlength=len(self._intent_counts))
        return emb

    def training_step(self, batch: TrainBatch, batch_idx):
        b = batch
        self._intent_pull: list[torch.Tensor] = []
        q, c, rows, features = self._encode_step(b)
        bs = q.shape[0]
        t, neg, neg_rows = c[:bs], c[bs:], rows[bs:]
        target_rows = local_rows = rows[:bs]
        offset = 0
        gathered = self.hparams.gather_negatives and self.trainer.world_size > 1
        if gathered:
            # every rank's candidates are negatives for every query; gradients flow back to their rank
            t = self.all_gather(t, sync_grads=True).flatten(0, 1)
            target_rows = self.all_gather(target_rows).flatten(0, 1)
            if neg.shape[0]:
                neg = self.all_gather(neg, sync_grads=True).flatten(0, 1)
                neg_rows = self.all_gather(neg_rows).flatten(0, 1)
            offset = self.global_rank * bs
        cand = torch.cat([t, neg])
        mask = same_target_mask(torch.cat([target_rows, neg_rows]), b.all_targets)
        bank_terms = self._bank_terms(b, q, cand, mask, offset, features[:bs]) if self.bank is not None else None
        extra, extra_bias, key, positive = bank_terms if bank_terms is not None else (None, None, None, None)
        nk = bs if key is None else key.shape[0]  # the queries that take the bank term (keys_per_step)
        bank_kw = {} if extra is None or key is not None else {"extra": extra, "extra_bias": extra_bias}
        loss = self.loss(q, cand, mask, query_offset=offset, **bank_kw)
        if key is not None:
            main_scale = self.loss.logit_scale.clamp(max=self.loss.max_log_scale)
            l_bank = bank_nce(q[:nk], key, extra, extra_bias, self.bank.scale_param(main_scale), positive)
            self._log_step("train/loss_bank", l_bank, batch_size=nk)
            gate = self.bank.gate_weight(int(self.global_step))
            if self.bank.gate is not None:
                self._log_step("train/bank_gate", gate, batch_size=bs)
            if self.bank.logit_scale is not None:
                self._log_step("train/bank_temperature", lambda: float(1 / self.bank.scale_param(main_scale).detach().exp()), batch_size=bs)
            anneal = 1.0
            if self.bank.anneal_from is not None:  # the fit's own length (max_steps or epochs)
                anneal = self.bank.anneal(int(self.global_step), max(1, int(self.trainer.estimated_stepping_batches)))
                self._log_step("train/bank_anneal", anneal, batch_size=bs)
            loss = loss + self.bank.weight * gate * anneal * l_bank
        if self.bank is not None:
            self._enqueue(t, target_rows, local_rows[:nk], key, gathered, bs)
        if self.distill is not None:
            loss = loss + self._distill_loss(q, t[offset : offset + bs] if gathered else t, b, bs)
        if self._intent_pull:
            pull = torch.stack(self._intent_pull).mean()
            self._log_step("train/loss_intent_pull", pull, batch_size=bs)
            loss = loss + self.model.intent.cfg.key_weight * pull
        self.log("train/loss_nce", loss, prog_bar=True, batch_size=bs)
        self._log_step("train/temperature", self.loss.temperature, batch_size=bs)
        return loss

    def _log_step(self, name: str, value, force: bool = False, **kwargs) -> None:
        """``self.log`` of a per-step training scalar, only on the steps the logger writes (every
        ``trainer.log_every_n_steps``, and the last) or when ``force``d: each ``self.log`` costs
        about 0.5 ms on a CPU (docs/memory_bank.md), and the other steps' values are overwritten
        unread. ``value`` may be a callable, computed only when logged. The progress bar's loss
        and the probes' every-N-steps values go through ``self.log`` whenever made."""
        connector = getattr(self._trainer, "_logger_connector", None)
        if force or connector is None or connector.should_update_logs:
            self.log(name, value() if callable(value) else value, **kwargs)

    def _bank_terms(self, b: TrainBatch, q, cand, mask, offset: int, target_features):
        """The bank's entries and per-query bias (:meth:`MemoryBank.bias`) and, with momentum
        keys, this rank's targets through the EMA encoder and the entries that are positives."""
        bs = q.shape[0]
        step = int(self.global_step)
        self.bank.evict(step)
        if self.bank.gate is not None:
            self.bank.gate.advance(step)
        scale = self.loss.scale
        if self.bank.logit_scale is not None:  # its own temperature also ranks its entries
            scale = float(self.bank.scale_param(self.loss.logit_scale).detach().exp())
        # with keys_per_step only the first nk queries (a random subset: batches are shuffled) take the term
        nk = bs if self.ema_model is None or self.bank.keys_per_step is None else min(bs, self.bank.keys_per_step)
        all_targets = b.all_targets[:nk]
        with torch.no_grad():
            batch_logits = scale * q[:nk].detach() @ cand.detach().t()
            fn = mask[:nk].clone()
            fn[torch.arange(nk, device=fn.device), offset + torch.arange(nk, device=fn.device)] = False
            batch_logits = batch_logits.masked_fill(fn, float("-inf"))
        key = None
        if self.ema_model is not None:
            ids, att = b.caption_ids[:nk], b.caption_mask[:nk]
            key = self._ema_keys(ids, att, b.target[:nk], features=target_features[:nk].detach())
        # the entries of a correct target, found once: excluded as negatives, and with
        # same_id_positive the bank term's positives
        same = self.bank.same_id(all_targets)
        positive = self.bank.positives(all_targets, step, same) if self.bank.same_id_positive else None
        # a copy: the enqueue after the loss writes the buffer before backward needs it
        extra = self.bank.emb.clone()
        extra_bias = self.bank.bias(q[:nk], scale, all_targets, step, batch_logits, key=key, positive=positive, same=same)
        self._bank_kept = (extra_bias > float("-inf")).float().sum(1).mean()
        self._log_step("train/bank_kept", self._bank_kept, batch_size=bs)
        return extra, extra_bias, key, positive

    def _enqueue(self, t, target_rows, local_rows, key, gathered: bool, bs: int) -> None:
        """Every rank enqueues the same, gathered positives, so the banks stay identical."""
        bank_t, bank_rows = (t.detach(), target_rows) if key is None else (key, local_rows)
        if (key is not None or not gathered) and self.trainer.world_size > 1:
            bank_t = self.all_gather(bank_t).flatten(0, 1)
            bank_rows = self.all_gather(bank_rows).flatten(0, 1)
        step = int(self.global_step)
        if self.bank.drift_every and step % self.bank.drift_every == 0:
            drift = self._bank_drift()  # entries of earlier steps, before this step's enqueue
            if drift is not None:
                self.log("train/bank_drift", drift, batch_size=bs)
                if self.bank.gate is not None:
                    self.log("train/bank_drift_rate", float(self.bank.gate.rate), batch_size=bs)
        if self.bank.gate is not None:
            # the trained model's targets, every rank's (so every rank takes the same decision)
            all_t = t.detach() if gathered or self.trainer.world_size == 1 else self.all_gather(t.detach()).flatten(0, 1)
            # the bank acts once queries keep entries: every rank's mean, so the decision is shared
            kept = self._bank_kept if self.trainer.world_size == 1 else self.all_gather(self._bank_kept).mean()
            rank, backed_off = self.bank.observe_rank(all_t, step, kept=float(kept))
            self._log_step("train/erank", rank, force=backed_off, batch_size=bs)
            self._log_step("train/bank_backoff", float(self.bank.gate.backing_off(step) or backed_off), force=backed_off, batch_size=bs)
            if backed_off:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"step {step}: the targets' effective rank fell to {rank:.1f}, below {self.bank.gate.rank_floor:.0%} of its "
                    f"best since the memory bank started acting: the bank is emptied and off for {self.bank.gate.backoff_steps} steps"
                )
        self.bank.enqueue(bank_t, bank_rows, step)

    def _distill_loss(self, q: torch.Tensor, t: torch.Tensor, b: TrainBatch, bs: int) -> torch.Tensor:
        """Feature and relational distillation of this rank's queries (:class:`DistillLoss`);
        with a plain bank, the bank's entries (training-store rows) join the relational candidates."""
        if b.teacher_query is None:
            raise CsmcirError("model.distill is set but the batch has no teacher embeddings: set data.teacher")
        st, tt = t, b.teacher_target
        if (
            self.distill.cfg.relational_weight
            and tt is not None
            and self.bank is not None
            and self.bank.momentum is None
            and len(self.bank)
        ):
            valid = self.bank.valid()
            images = self._datamodule().train_store.teacher_image
            st = torch.cat([st, self.bank.emb[valid].detach()])
            tt = torch.cat([tt, images[self.bank.ids[valid].cpu()].to(tt.device)])
        total, terms = self.distill(q, st, b.teacher_query, tt)  # a ConfigError (one line) on wrong sizes
        for name, value in terms.items():
            self._log_step(f"train/loss_distill_{name}", value, batch_size=bs)
        return total

    @torch.no_grad()
    def _bank_drift(self) -> float | None:
        """Re-encode a sample of bank entries (their ids are training-store rows) with the current
        model; the mean cosine drift against the stored embeddings (``train/bank_drift``)."""
        store = self._datamodule().train_store
        slots = self.bank.valid().nonzero().flatten()
        if store is None or len(slots) == 0:
            return None
        g = torch.Generator().manual_seed(int(self.global_step))
        slots = slots[torch.randperm(len(slots), generator=g)[: self.bank.drift_sample].to(slots.device)]
        rows = self.bank.ids[slots].cpu()
        n = int(store.caption_lengths[rows].max())
        ids = store.caption_ids[rows, :n].long().to(self.device)
        mask = (torch.arange(n)[None, :] < store.caption_lengths[rows][:, None]).long().to(self.device)
        pixels = store.images[rows].to(self.device)
        if self.ema_model is None:  # the trained model made the entries
            fresh = self.model.encode(ids, mask, pixels=pixels, side="target")
        else:
            fresh = self._ema_keys(ids, mask, pixels)
        return self.bank.drift(slots, fresh, int(self.global_step))

    def _ema_keys(self, ids, mask, pixels, features=None) -> torch.Tensor:
        """Target keys from the EMA encoder at the bank's ``key_dtype``. Q-Former keys read the
        trained (frozen) tower's image ``features`` (computed from ``pixels`` when not given);
        tower keys run the EMA copy's own vision tower on ``pixels``."""
        if self.bank.momentum_keys == "qformer":
            feats = self.model.encode_image(pixels) if features is None else features
            return self.bank.encode_keys(lambda: self.ema_model.encode(ids, mask, image_features=feats, side="target"), self.device.type)
        return self.bank.encode_keys(lambda: self.ema_model.encode(ids, mask, pixels=pixels, side="target"), self.device.type)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # the EMA follows each optimizer step here, inside the step: an on_train_batch_end hook runs
        # after the callbacks', so a mid-epoch last.ckpt would hold the EMA one update behind and a
        # resumed fit would drift from the uninterrupted one (tests/test_resume.py)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """``ema = m * ema + (1 - m) * model`` for the momentum bank's key encoder (no-op without)."""
        if self.ema_model is not None:
            if self._ema_pairs is None:  # matched by name once (the copy holds no vision with qformer keys)
                params = dict(self.model.named_parameters())
                named = list(self.ema_model.named_parameters())
                self._ema_pairs = ([pe for _, pe in named], [params[n] for n, _ in named])
            ema_p, model_p = self._ema_pairs
            # one fused lerp over every tensor instead of a Python loop of small ones
            torch._foreach_lerp_(ema_p, [p.detach() for p in model_p], 1 - self.bank.momentum)
            buffers = dict(self.model.named_buffers())  # frozen statistics and ids: copied
            for name, be in self.ema_model.named_buffers():
                be.copy_(buffers[name])

    def on_train_epoch_end(self):
        if self._intent_counts is not None:
            from ..models.intent import usage_entropy

            counts = self._intent_counts.to(self.device)
            if self.trainer.world_size > 1:
                counts = self.all_gather(counts).sum(0)
            self.log("train/intent_pool_entropy", usage_entropy(counts), sync_dist=False, rank_zero_only=True)
            self.log("train/intent_pool_used", float((counts > 0).float().mean()), sync_dist=False, rank_zero_only=True)
            self._intent_counts.zero_()
        if self.bank is not None and self.trainer.world_size > 1:
            # every rank must hold the same bank: log the largest difference to any other rank
            ids = self.all_gather(self.bank.ids)
            emb = self.all_gather(self.bank.emb)
            diff = max(float((ids != ids[0]).sum()), float((emb - emb[0]).abs().max()))
            if self.bank.gate is not None:  # and the same gate: drift rate, odometer, back-off, entry stamps
                for state in (self.bank.written_at, *self.bank.gate.buffers()):
                    every = self.all_gather(state.double())
                    diff = max(diff, float((every - every[0]).abs().max()))
            self.log("train/bank_rank_mismatch", diff, rank_zero_only=True, sync_dist=False)

    # -- optimisation --------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """Trainable parameters in two groups: weights (``weight_decay``) and norms, biases,
        embeddings, query tokens and the temperature (no decay)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim < 2 or "embeddings" in name or name.endswith("query_tokens") or name.endswith(".pos") or "logit_scale" in name:
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        groups = self.parameter_groups()
        if self.optimizer_factory is None:
            opt = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=(0.9, 0.98))
        else:
            opt = self.optimizer_factory(groups)
        if self.scheduler_factory is not None:
            sched = self.scheduler_factory(opt)
        else:
            total = max(1, int(self.trainer.estimated_stepping_batches))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, self.hparams.warmup_steps, self.hparams.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- frozen-feature cache -------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._use_feature_cache()

    def on_validation_start(self) -> None:
        self._use_feature_cache()

    def on_test_start(self) -> None:
        self._use_feature_cache()

    def _datamodule(self):
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            raise CsmcirError("CIRModule needs a CIRDataModule (trainer.fit(module, datamodule=...))")
        return dm

    def _use_feature_cache(self) -> None:
        """Swap the data's pixels for the frozen tower's cached features (model.feature_cache)."""
        from ..data.feature_cache import FeatureCache, resolve_cache_folder, tower_key

        value = self.hparams.get("feature_cache")
        folder = resolve_cache_folder(value, frozen=not self._vision_trains())
        if not folder:
            return
        if self._vision_trains():
            raise CsmcirError(
                "model.feature_cache needs a frozen vision tower: set model.net.freeze_vision true "
                "(pretrained vision weights from model.net.init are frozen by default)"
            )
        vision_cfg = asdict(self.model_config.vision)
        cache = FeatureCache(folder, tower_key(self.model.vision, vision_cfg), vision_cfg)
        was_training = self.model.vision.training
        self.model.vision.eval()
        fast = self.model.vision.inference_copy()  # e.g. BatchNorm folded: same features, faster
        self._datamodule().attach_feature_cache(
            cache,
            fast,
            self.device,
            is_global_zero=self.trainer.is_global_zero,
            barrier=lambda: self.trainer.strategy.barrier("feature_cache"),
        )
        self.model.vision.train(was_training)

    def setup(self, stage: str) -> None:
        if self.distill is None or stage != "fit":
            return
        dm = self._datamodule()
        store = dm.train_store
        if store is None or store.teacher_query is None:
            raise CsmcirError("model.distill is set but no teacher embeddings were loaded: set data.teacher (a `csmcir teacher` store)")
        if store.teacher_query.shape[1] != self.distill.cfg.teacher_dim:
            raise CsmcirError(
                f"the teacher store {dm.hparams.get('teacher')} (data.teacher) holds {store.teacher_query.shape[1]}-d embeddings "
                f"but model.distill.teacher_dim is {self.distill.cfg.teacher_dim}"
            )
        if self.distill.cfg.relational_weight and store.teacher_image is None:
            raise CsmcirError("relational distillation needs the teacher's image embeddings: set data.teacher_gallery")

    # -- evaluation --------------------------------------------------------------------------
    def _eval_step(self, batch: EvalBatch):
        side = "query" if batch.kind == "queries" else "target"
        emb = self.model.encode(batch.text_ids, batch.text_mask, pixels=batch.pixels, side=side)
        self._eval.setdefault(batch.split, {"gallery": [], "queries": []})[batch.kind].append((batch.index, emb.float()))

    def validation_step(self, batch: EvalBatch, batch_idx, dataloader_idx=0):
        self._eval_step(batch)

    def test_step(self, batch: EvalBatch, batch_idx, dataloader_idx=0):
        self._eval_step(batch)

    def _gather(self, parts: list) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.cat([p[0] for p in parts])
        emb = torch.cat([p[1] for p in parts])
        if self.trainer.world_size > 1:
            idx = self.all_gather(idx).flatten(0, 1)
            emb = self.all_gather(emb).flatten(0, 1)
        # distributed samplers pad with repeats: keep one embedding per index, in index order
        order = torch.argsort(idx, stable=True)
        idx, emb = idx[order], emb[order]
        keep = torch.ones_like(idx, dtype=torch.bool)
        keep[1:] = idx[1:] != idx[:-1]
        return idx[keep], emb[keep]

    def _finish_eval(self, stage: str):
        evaluators = self._datamodule().evaluators(stage, ks=tuple(self.hparams.eval_ks))
        for split, parts in self._eval.items():
            ev = evaluators[split]
            g_idx, g = self._gather(parts["gallery"])
            q_idx, q = self._gather(parts["queries"])
            metrics = ev.score(q_idx.tolist(), q, g_idx.tolist(), g)
            if self.distill is not None:
                metrics.update(self._teacher_agreement(ev.store, q, g, q_idx, g_idx, ev.exclude_reference))
            for k, v in metrics.items():
                self.log(f"{ev.log_name}/{k}", v, rank_zero_only=False, sync_dist=False)
        self._eval = {}

    @torch.no_grad()
    def _teacher_agreement(self, store, q, g, q_idx, g_idx, exclude_reference: bool) -> dict[str, float]:
        """``teacher_cos``: mean cosine of head(student query) and the teacher's query embedding;
        ``teacher_top10_overlap``: mean share of the student's top 10 also in the teacher's."""
        from ..retrieval.metrics import reference_positions, topk_rankings

        out = {}
        if store.teacher_query is None:
            return out
        tq = torch.nn.functional.normalize(store.teacher_query[q_idx.cpu()].to(q.device), dim=1)
        out["teacher_cos"] = float((torch.nn.functional.normalize(self.distill.head(q), dim=1) * tq).sum(1).mean())
        if store.teacher_image is not None:
            rows = store.gallery_rows[g_idx.cpu()]
            tg = torch.nn.functional.normalize(store.teacher_image[rows].to(q.device), dim=1)
            refs = [int(store.ref_rows[i]) for i in q_idx.tolist()]
            exclude = reference_positions(refs, rows.tolist()) if exclude_reference else None
            k = min(10, len(rows) - (1 if exclude else 0))
            s_top, _ = topk_rankings(q, g, k, exclude=exclude)
            t_top, _ = topk_rankings(tq, tg, k, exclude=exclude)
            same = [len(set(a) & set(b)) / k for a, b in zip(s_top.tolist(), t_top.tolist())]
            out["teacher_top10_overlap"] = 100.0 * sum(same) / len(same)
        return out

    def on_validation_epoch_end(self):
        self._finish_eval("validate")

    def on_test_epoch_end(self):
        self._finish_eval("test")

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store what inference needs, in types ``torch.load(weights_only=True)`` accepts. A
        frozen pretrained vision tower is not stored: the checkpoint records its sources and
        digest (``frozen_vision``), and loading rebuilds it from them (as LAVIS saves only what
        trains)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        text = getattr(dm, "text_config", None)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.model_config.to_dict(),
            "text": text.to_dict() if text is not None else None,
        }
        frozen = self._frozen_vision()
        if frozen is not None:
            meta["frozen_vision"] = frozen
            sd = checkpoint["state_dict"]
            for k in [k for k in sd if k.startswith(("model.vision.", "ema_model.vision."))]:
                del sd[k]
        checkpoint[CHECKPOINT_KEY] = meta

    def _frozen_vision(self) -> dict | None:
        """``{"init": [...], "digest": ...}`` of a frozen tower loaded from pretrained weights."""
        if self.model.vision_source is None or self._vision_trains():
            return None
        if getattr(self, "_vision_digest", None) is None:
            from ..data.feature_cache import tower_key

            self._vision_digest = tower_key(self.model.vision, asdict(self.model_config.vision))
        return {"init": list(self.model.vision_source), "digest": self._vision_digest}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from ..inference import check_checkpoint_format, restore_frozen_vision

        check_checkpoint_format(checkpoint, "the checkpoint being resumed", resumable=True)
        # the tower was rebuilt from model.net.init with the module: it must be the one trained with;
        # an EMA copy with momentum_keys tower holds the same frozen tower
        ema_has_vision = self.ema_model is not None and self.bank.momentum_keys == "tower"
        restore_frozen_vision(
            checkpoint, self.model, "the checkpoint being resumed", ("model.", "ema_model.") if ema_has_vision else ("model.",)
        )


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """The default schedule as a ``LambdaLR`` factor: linear warm-up over ``min(warmup_steps,
    total_steps // 2)`` steps, then cosine decay from 1 to ``min_lr_ratio`` at ``total_steps``."""
    warmup = min(warmup_steps, total_steps // 2)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule
