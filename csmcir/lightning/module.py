"""The one LightningModule: training logic for the symmetric dual tower.

The network (:class:`csmcir.models.CIRDualTower`) and the loss
(:class:`csmcir.losses.InfoNCELoss`) are plain modules; this class wires them to batches,
optimisation, distributed gathering and evaluation.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import torch

from ..config import get_model_config
from ..losses import DistillHead, InfoNCELoss, MemoryBank, bank_nce, feature_distill_loss, relational_distill_loss, same_target_mask
from ..models import CIRDualTower
from ..inference import CHECKPOINT_KEY
from ..retrieval.evaluate import evaluate_embeddings, protocol_metrics

CHECKPOINT_FORMAT = 1


class CIRModule(L.LightningModule):
    """Trains the shared Q-Former dual tower with InfoNCE over in-batch negatives.

    Args:
        model: a named model config (``tiny``, ``small``, ``base``) or a JSON path.
        model_overrides: nested overrides of the model config, e.g. ``{qformer: {num_layers: 4}}``.
        lr: peak learning rate of AdamW; ``weight_decay`` applies to weights, not to norms,
            biases, embeddings or the temperature.
        warmup_steps: linear warm-up, then cosine decay to ``lr * min_lr_ratio`` at the last step.
        temperature: initial InfoNCE temperature; ``learn_temperature`` makes it learnable.
        bidirectional: add the target-to-query InfoNCE direction (each positive target against
            this rank's queries) and average the two; on by default (+1.8 test R@1 over 3 seeds
            on the synthetic default, docs/benchmarks.md section 2, s5).
        gather_negatives: under DDP, use every rank's targets as negatives (gradients flow back
            to the rank that computed them).
        memory_bank: ``null`` (default: in-batch negatives only) or the options of
            :class:`~csmcir.losses.MemoryBank` (``capacity``, ``max_age``, ``half_life``,
            ``min_fraction``): target embeddings of earlier steps as extra negatives, weighted by
            age and selected by each query's entropy; ``momentum`` makes an EMA copy encode them
            (``momentum_keys: qformer``: only its Q-Former, on the step's own image features; frozen
            vision towers only).
            Off by default: on the synthetic default, banks of the trained model's own old
            targets collapse training and the momentum bank does not beat in-batch negatives on
            the test split (docs/memory_bank.md).
        distill: ``null`` (default) or distillation from a CIR-CoT teacher (``data.teacher``):
            ``teacher_dim`` (required), ``feature`` (``cosine``, ``mse`` or ``null``),
            ``feature_weight`` (1.0), ``relational_weight`` (0.0; needs ``data.teacher_gallery``),
            ``temperature`` (0.05), ``hidden`` (0: a linear head). See
            :mod:`csmcir.losses.distill`; the head is dropped at inference.
        init: ``null`` (random) or pretrained weights: ``{source: bert|lavis|hf_blip2|hf_clip,
            path: ..., allow_partial: false}``, or a list of them merged in order (e.g. LAVIS's
            ``eva_vit_g.pth`` then ``blip2_pretrained.pth``; a CLIP tower then ``bert``). ``path:
            minilm`` is the packaged all-MiniLM-L6-v2; see :mod:`csmcir.models.weights`. Applied
            when the module is built, before training.
        freeze_vision: keep the vision tower's weights fixed (``null``: frozen exactly when
            ``init`` loaded pretrained vision weights, as BLIP-2 trains its Q-Former).
        grad_checkpointing: recompute the Q-Former's activations in the backward pass instead of
            keeping them (less memory, about a third more compute); off by default.
        feature_cache: ``null`` (default) or a folder: with the vision tower frozen, encode every
            image once into float16 memory-mapped features there (keyed by tower weights and image
            id, resumable; :mod:`csmcir.data.feature_cache`) and train and evaluate the Q-Former
            from them instead of re-encoding pixels every step.
        eval_ks: the K of the logged Recall@K.
    """

    def __init__(
        self,
        model: str = "small",
        model_overrides: dict[str, Any] | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.05,
        temperature: float = 0.01,
        learn_temperature: bool = True,
        bidirectional: bool = True,
        gather_negatives: bool = True,
        memory_bank: dict[str, Any] | None = None,
        distill: dict[str, Any] | None = None,
        init: dict[str, Any] | list[dict[str, Any]] | None = None,
        freeze_vision: bool | None = None,
        grad_checkpointing: bool = False,
        feature_cache: str | None = None,
        eval_ks: list[int] = [1, 5, 10, 50],
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_config = get_model_config(model, model_overrides)
        self.model = CIRDualTower(self.model_config)
        report = {"loaded": []}
        if init:
            from lightning.pytorch.utilities import rank_zero_info

            from ..models.weights import load_pretrained

            entries = init if isinstance(init, list) else [init]
            for e in entries:
                if not isinstance(e, dict) or set(e) - {"source", "path", "allow_partial"} or "source" not in e or "path" not in e:
                    raise ValueError(f"model.init takes source, path and allow_partial (or a list of them), got {e!r}")
            pairs = [(e["source"], e["path"]) for e in entries]
            report = load_pretrained(self.model, pairs, allow_partial=any(bool(e.get("allow_partial", False)) for e in entries))
            rank_zero_info(f"model.init: {len(report['loaded'])} tensors from {', '.join(f'{s} {p}' for s, p in pairs)}; "
                           f"{len(report['missing'])} missing, {len(report['unused'])} unused")
        pretrained_vision = any(k.startswith("vision.") for k in report["loaded"])
        if freeze_vision or (freeze_vision is None and pretrained_vision):
            self.model.vision.requires_grad_(False)
        if grad_checkpointing:
            qf = self.model.qformer
            if hasattr(qf, "activation_checkpointing_enable"):  # transformers >= 5
                qf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                qf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.loss = InfoNCELoss(temperature, learn_temperature, bidirectional=bidirectional)
        # extra negatives from earlier steps (csmcir/losses/memory_bank.py); off by default until
        # its ablation shows it helps
        self.bank = MemoryBank(self.model_config.embed_dim, **memory_bank) if memory_bank else None
        # with a momentum bank: an EMA copy of the tower encodes the bank's keys (saved in
        # checkpoints as ema_model.*; inference reads model.* only)
        self.ema_model = None
        if self.bank is not None and self.bank.momentum is not None:
            qformer_keys = self.bank.momentum_keys == "qformer"
            if qformer_keys and any(p.requires_grad for p in self.model.vision.parameters()):
                # measured: keys that pair a trained tower's current features with an EMA Q-Former let
                # the model separate the positive key from older entries by the tower's drift alone
                raise ValueError("model.memory_bank.momentum_keys: qformer needs a frozen vision tower (model.freeze_vision: "
                                 "true, or pretrained vision weights from model.init); with a trained tower the synthetic "
                                 "fit did not learn (test R@1 0.0, docs/memory_bank.md). Use momentum_keys: tower.")
            # momentum_keys qformer: keys read the (frozen) tower's features, so the copy leaves the
            # vision tower out (an empty stand-in; the memo keeps deepcopy from copying it at all)
            memo = {id(self.model.vision): torch.nn.Identity()} if qformer_keys else {}
            self.ema_model = copy.deepcopy(self.model, memo).requires_grad_(False)
        self.distill = None
        self.distill_head = None
        if distill:
            known = {"teacher_dim", "feature", "feature_weight", "relational_weight", "temperature", "hidden"}
            if set(distill) - known or "teacher_dim" not in distill:
                raise ValueError(f"model.distill takes {sorted(known)} (teacher_dim required), got {sorted(distill)}")
            self.distill = {"feature": "cosine", "feature_weight": 1.0, "relational_weight": 0.0, "temperature": 0.05, "hidden": 0, **distill}
            if self.distill["feature"] not in ("cosine", "mse", None):
                raise ValueError("model.distill.feature must be cosine, mse or null")
            self.distill_head = DistillHead(self.model_config.embed_dim, int(self.distill["teacher_dim"]), int(self.distill["hidden"]))
        self._eval: dict[str, dict[str, list]] = {}

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        ref_features = self.model.encode_image(batch["ref"])
        q = self.model.encode(batch["query_ids"], batch["query_mask"], image_features=ref_features)
        bs = q.shape[0]
        # the target side: positives, then any hard negatives, then any reference negatives
        # (the reference image with its caption, reusing the query side's image features), in
        # one Q-Former pass
        pixels, ids, mask, rows = batch["target"], batch["caption_ids"], batch["caption_mask"], batch["target_row"]
        if "neg" in batch:
            pixels = torch.cat([pixels, batch["neg"].flatten(0, 1)])
            ids = torch.cat([ids, batch["neg_caption_ids"].flatten(0, 1)])
            mask = torch.cat([mask, batch["neg_caption_mask"].flatten(0, 1)])
            rows = torch.cat([rows, batch["neg_rows"].flatten()])
        features = self.model.encode_image(pixels)
        if "ref_caption_ids" in batch:
            features = torch.cat([features, ref_features])
            ids = torch.cat([ids, batch["ref_caption_ids"]])
            mask = torch.cat([mask, batch["ref_caption_mask"]])
            rows = torch.cat([rows, batch["ref_row"]])
        c = self.model.encode(ids, mask, image_features=features)
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
        cand_rows = torch.cat([target_rows, neg_rows])
        mask = same_target_mask(cand_rows, batch["all_targets"])
        extra = extra_bias = None
        key = None
        if self.bank is not None:
            step = int(self.global_step)
            self.bank.evict(step)
            scale = self.loss.scale
            with torch.no_grad():
                batch_logits = scale * q.detach() @ cand.detach().t()
                fn = mask.clone()
                fn[torch.arange(bs, device=fn.device), offset + torch.arange(bs, device=fn.device)] = False
                batch_logits = batch_logits.masked_fill(fn, float("-inf"))
            # a copy: the enqueue below writes the buffer before backward needs it
            extra, extra_bias = self.bank.emb.clone(), self.bank.bias(q, scale, batch["all_targets"], step, batch_logits)
            self.log("train/bank_kept", torch.isfinite(extra_bias).float().sum(1).mean(), batch_size=bs)
            if self.ema_model is not None:
                with torch.no_grad():  # this rank's targets through the momentum encoder
                    if self.bank.momentum_keys == "qformer":  # the step's own target features, EMA Q-Former only
                        key = self.ema_model.encode(batch["caption_ids"], batch["caption_mask"], image_features=features[:bs].detach())
                    else:
                        key = self.ema_model.encode(batch["caption_ids"], batch["caption_mask"], pixels=batch["target"])
        bank_kw = {} if extra is None or key is not None else {"extra": extra, "extra_bias": extra_bias}
        loss = self.loss(q, cand, mask, query_offset=offset, **bank_kw)
        if key is not None:
            l_bank = bank_nce(q, key, extra, extra_bias, self.loss.logit_scale.clamp(max=self.loss.max_log_scale))
            self.log("train/loss_bank", l_bank, batch_size=bs)
            loss = loss + self.bank.weight * l_bank
        if self.bank is not None:
            # every rank enqueues the same, gathered positives, so the banks stay identical
            bank_t, bank_rows = (t.detach(), target_rows) if key is None else (key, local_rows)
            if (key is not None or not gathered) and self.trainer.world_size > 1:
                bank_t = self.all_gather(bank_t).flatten(0, 1)
                bank_rows = self.all_gather(bank_rows).flatten(0, 1)
            if self.bank.drift_every and self.global_step % self.bank.drift_every == 0:
                drift = self._bank_drift()  # entries of earlier steps, before this step's enqueue
                if drift is not None:
                    self.log("train/bank_drift", drift, batch_size=bs)
            self.bank.enqueue(bank_t, bank_rows, int(self.global_step))
        if self.distill is not None:
            loss = loss + self._distill_loss(q, t[offset : offset + bs] if gathered else t, batch, bs)
        self.log("train/loss_nce", loss, prog_bar=True, batch_size=bs)
        self.log("train/temperature", self.loss.temperature, batch_size=bs)
        return loss

    # -- frozen-feature cache -------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._use_feature_cache()

    def on_validation_start(self) -> None:
        self._use_feature_cache()

    def on_test_start(self) -> None:
        self._use_feature_cache()

    def _use_feature_cache(self) -> None:
        """Swap each data store's pixels for the frozen tower's cached features (model.feature_cache)."""
        folder = self.hparams.get("feature_cache")
        dm = getattr(self.trainer, "datamodule", None)
        if not folder or dm is None or not hasattr(dm, "stores"):
            return
        from dataclasses import asdict

        from ..data.feature_cache import FeatureCache, tower_key
        from ..errors import CsmcirError

        if any(p.requires_grad for p in self.model.vision.parameters()):
            raise CsmcirError("model.feature_cache needs a frozen vision tower: set model.freeze_vision true "
                              "(pretrained vision weights from model.init are frozen by default)")
        todo = [(split, store) for split, store in dm.stores.items() if store.images.dim() == 4]  # still pixels
        if not todo:
            return
        vision_cfg = asdict(self.model_config.vision)
        cache = FeatureCache(folder, tower_key(self.model.vision, vision_cfg), vision_cfg)
        was_training = self.model.vision.training
        self.model.vision.eval()
        dtype = next(self.model.parameters()).dtype
        for split, store in todo:
            with torch.no_grad():
                shape = tuple(self.model.encode_image(store.images[:1].to(self.device)).shape[1:])
            kw = dict(split=split, ids=store.image_ids, shape=shape, load=lambda rows, s=store: s.images[rows].to(self.device),
                      encode=lambda px: self.model.encode_image(px), batch_size=max(1, dm.hparams.eval_batch_size))
            if self.trainer.is_global_zero:
                feats = cache.features(**kw)
            self.trainer.strategy.barrier("feature_cache")
            if not self.trainer.is_global_zero:
                feats = cache.features(**kw, write=False)
            store.images = feats
        self.model.vision.train(was_training)

    def setup(self, stage: str) -> None:
        if self.distill is None or stage != "fit":
            return
        dm = self.trainer.datamodule
        store = dm.stores.get(dm.hparams.train_split) if hasattr(dm, "stores") else None
        from ..errors import CsmcirError

        if store is None or store.teacher_query is None:
            raise CsmcirError("model.distill is set but no teacher embeddings were loaded: set data.teacher (a `csmcir teacher` store)")
        if store.teacher_query.shape[1] != self.distill["teacher_dim"]:
            raise CsmcirError(f"teacher store {dm.hparams.teacher} holds {store.teacher_query.shape[1]}-d embeddings "
                              f"but model.distill.teacher_dim is {self.distill['teacher_dim']}")
        if self.distill["relational_weight"] and store.teacher_image is None:
            raise CsmcirError("relational distillation needs the teacher's image embeddings: set data.teacher_gallery")

    def _distill_loss(self, q: torch.Tensor, t: torch.Tensor, batch: dict, bs: int) -> torch.Tensor:
        """Feature and relational distillation of this rank's queries (module docstring)."""
        d = self.distill
        if "teacher_query" not in batch:
            raise RuntimeError("model.distill is set but the batch has no teacher embeddings: set data.teacher")
        tq = batch["teacher_query"]
        if tq.shape[1] != d["teacher_dim"]:
            raise ValueError(f"teacher embeddings are {tq.shape[1]}-d but model.distill.teacher_dim is {d['teacher_dim']}")
        total = q.new_zeros(())
        if d["feature"] and d["feature_weight"]:
            f = feature_distill_loss(self.distill_head(q), tq, d["feature"])
            self.log("train/loss_distill_feature", f, batch_size=bs)
            total = total + d["feature_weight"] * f
        if d["relational_weight"]:
            if "teacher_target" not in batch:
                raise RuntimeError("relational distillation needs the teacher's image embeddings: set data.teacher_gallery")
            st, tt = t, batch["teacher_target"]
            if self.bank is not None and self.bank.momentum is None and len(self.bank):
                # the bank's entries are training-store rows: their teacher embeddings are known
                valid = self.bank.valid()
                images = self.trainer.datamodule.stores[self.trainer.datamodule.hparams.train_split].teacher_image
                st = torch.cat([st, self.bank.emb[valid].detach()])
                tt = torch.cat([tt, images[self.bank.ids[valid].cpu()].to(tt.device)])
            r = relational_distill_loss(q, st, tq, tt, d["temperature"])
            self.log("train/loss_distill_relational", r, batch_size=bs)
            total = total + d["relational_weight"] * r
        return total

    @torch.no_grad()
    def _bank_drift(self) -> float | None:
        """Re-encode a sample of bank entries (their ids are training-store rows) with the current
        model; the mean cosine drift against the stored embeddings (``train/bank_drift``)."""
        dm = self.trainer.datamodule
        store = dm.stores.get(dm.hparams.train_split) if hasattr(dm, "stores") else None
        slots = self.bank.valid().nonzero().flatten()
        if store is None or len(slots) == 0:
            return None
        g = torch.Generator().manual_seed(int(self.global_step))
        slots = slots[torch.randperm(len(slots), generator=g)[: self.bank.drift_sample].to(slots.device)]
        rows = self.bank.ids[slots].cpu()
        n = int(store.caption_lengths[rows].max())
        ids = store.caption_ids[rows, :n].long().to(self.device)
        mask = (torch.arange(n)[None, :] < store.caption_lengths[rows][:, None]).long().to(self.device)
        encoder = self.model if self.ema_model is None else self.ema_model  # the encoder that made the entries
        if self.ema_model is not None and self.bank.momentum_keys == "qformer":  # its vision side is the trained tower
            fresh = encoder.encode(ids, mask, image_features=self.model.encode_image(store.images[rows].to(self.device)))
        else:
            fresh = encoder.encode(ids, mask, pixels=store.images[rows].to(self.device))
        return self.bank.drift(slots, fresh)

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema_model is not None:  # after the optimizer step: ema = m * ema + (1 - m) * model
            m = self.bank.momentum
            params, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
            for name, pe in self.ema_model.named_parameters():  # what the copy holds (no vision with qformer keys)
                pe.lerp_(params[name].detach(), 1 - m)
            for name, be in self.ema_model.named_buffers():
                be.copy_(buffers[name])

    def on_train_epoch_end(self):
        if self.bank is not None and self.trainer.world_size > 1:
            # every rank must hold the same bank: log the largest difference to any other rank
            ids = self.all_gather(self.bank.ids)
            emb = self.all_gather(self.bank.emb)
            diff = max(float((ids != ids[0]).sum()), float((emb - emb[0]).abs().max()))
            self.log("train/bank_rank_mismatch", diff, rank_zero_only=True, sync_dist=False)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim < 2 or "embeddings" in name or name.endswith("query_tokens") or name.endswith(".pos") or "logit_scale" in name:
                no_decay.append(p)
            else:
                decay.append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=(0.9, 0.98),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total // 2)
        floor = self.hparams.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- evaluation --------------------------------------------------------------------------
    def _eval_step(self, stage: str, batch, dataloader_idx: int):
        split, kind = self.trainer.datamodule.eval_specs(stage)[dataloader_idx]
        if kind == "gallery":
            emb = self.model.encode(batch["caption_ids"], batch["caption_mask"], pixels=batch["image"])
        else:
            emb = self.model.encode(batch["query_ids"], batch["query_mask"], pixels=batch["ref"])
        self._eval.setdefault(split, {"gallery": [], "queries": []})[kind].append((batch["index"], emb.float()))

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self._eval_step("validate", batch, dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self._eval_step("test", batch, dataloader_idx)

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

    def _finish_eval(self, stage: str, prefix: str):
        dm = self.trainer.datamodule
        for split, parts in self._eval.items():
            store = dm.stores[split]
            g_idx, g = self._gather(parts["gallery"])
            q_idx, q = self._gather(parts["queries"])
            metrics = evaluate_embeddings(store, q, g, self.hparams.eval_ks, q_idx.tolist(), g_idx.tolist(), exclude_reference=getattr(dm, "remove_reference", True))
            bsplit = dm.benchmark_split(split) if hasattr(dm, "benchmark_split") else None
            if bsplit is not None:  # a real benchmark: also its official metrics, as <dataset>/<metric>
                official = protocol_metrics(bsplit, store, q, g, q_idx.tolist(), g_idx.tolist())
                metrics.update({f"{bsplit.dataset}/{k}": v for k, v in official.items()})
            # the stage's main split logs as val/R@1 or test/R@1; others as test/<split>/R@1
            main = dm.hparams.val_split if stage == "validate" else list(dm.hparams.test_splits)[0]
            name = prefix if split == main else f"{prefix}/{split}"
            if self.distill_head is not None:
                metrics.update(self._teacher_agreement(store, q, g, q_idx, g_idx, getattr(dm, "remove_reference", True)))
            for k, v in metrics.items():
                self.log(f"{name}/{k}", v, rank_zero_only=False, sync_dist=False)
        self._eval = {}

    @torch.no_grad()
    def _teacher_agreement(self, store, q, g, q_idx, g_idx, exclude_reference: bool) -> dict[str, float]:
        """``teacher_cos``: mean cosine of head(student query) and the teacher's query embedding;
        ``teacher_top10_overlap``: mean share of the student's top 10 also in the teacher's."""
        from ..retrieval.metrics import topk_rankings

        out = {}
        if store.teacher_query is None:
            return out
        tq = torch.nn.functional.normalize(store.teacher_query[q_idx.cpu()].to(q.device), dim=1)
        out["teacher_cos"] = float((torch.nn.functional.normalize(self.distill_head(q), dim=1) * tq).sum(1).mean())
        if store.teacher_image is not None:
            rows = store.gallery_rows[g_idx.cpu()]
            tg = torch.nn.functional.normalize(store.teacher_image[rows].to(q.device), dim=1)
            pos = {int(r): j for j, r in enumerate(rows.tolist())}
            exclude = [pos.get(int(store.ref_rows[i])) for i in q_idx.tolist()] if exclude_reference else None
            k = min(10, len(rows) - (1 if exclude else 0))
            s_top, _ = topk_rankings(q, g, k, exclude=exclude)
            t_top, _ = topk_rankings(tq, tg, k, exclude=exclude)
            same = [len(set(a) & set(b)) / k for a, b in zip(s_top.tolist(), t_top.tolist())]
            out["teacher_top10_overlap"] = 100.0 * sum(same) / len(same)
        return out

    def on_validation_epoch_end(self):
        self._finish_eval("validate", "val")

    def on_test_epoch_end(self):
        self._finish_eval("test", "test")

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store what inference needs, in types ``torch.load(weights_only=True)`` accepts."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.model_config.to_dict(),
            "text": dm.text_settings() if dm is not None and hasattr(dm, "text_settings") else None,
        }
