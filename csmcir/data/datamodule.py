"""LightningDataModule for datasets in the custom format (the synthetic benchmark included)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from ..config import TextConfig
from ..errors import CsmcirError
from .datasets import EvalCollate, EvalQueries, GalleryImages, TrainTriplets, collate
from .registry import dataset_info, dataset_names, open_dataset
from .store import SplitStore

SYNTH_SOURCES = ("shapes", "fashion")
"""Generated benchmarks ``data.synth_source`` can name."""


class CIRDataModule(L.LightningDataModule):
    """Custom-format CIR data: ``root/images``, ``gallery.<split>.txt``, ``triplets.<split>.jsonl``,
    ``captions.jsonl`` (see the README), or a real benchmark in its release layout.

    What the LightningModule reads of it, and nothing else: :attr:`text_config` (saved in
    checkpoints), :attr:`train_store` (the training split in memory: teacher embeddings, bank
    drift probes), :meth:`evaluators` (one scorer per evaluation split) and
    :meth:`attach_feature_cache` (swap pixels for a frozen tower's cached features). Training
    batches are :class:`~csmcir.data.batch.TrainBatch`, evaluation batches
    :class:`~csmcir.data.batch.EvalBatch` (each names its split and kind).

    Args:
        root: dataset folder.
        dataset: ``custom`` (the custom format; the synthetic benchmark is one) or a real benchmark
            in its release layout: ``fashioniq`` (with ``category``), ``cirr``, ``shoes``
            (``csmcir evaluate --help`` lists the layouts). Validation then also logs the official
            metrics as ``val/<dataset>/<metric>``.
        category: FashionIQ category (dress, shirt, toptee); ``null`` = all three (query ids
            ``<category>/<n>``, one gallery for training, each category scored in its own).
        captions: target-side caption file (``captions.jsonl`` format, e.g. a ``csmcir caption``
            store); default ``root/captions.jsonl``.
        synthetic: if ``root`` is missing or empty, generate a benchmark there first (with
            ``synth_source``, ``synth_seed`` and ``synth_difficulty``). Set ``false`` for your own data.
        synth_source: ``shapes`` (the rendered-shapes benchmark, csmcir.data.synthetic) or
            ``fashion`` (boards of real Fashion-MNIST photos, csmcir.data.boards; needs Debian's
            dataset-fashion-mnist or ``$CSMCIR_FASHION_MNIST``).
        synth_seed: seed of the generated benchmark.
        synth_difficulty: shapes: ``easy`` (smoke tests), ``standard`` (the default), ``medium``,
            ``hard``; fashion: ``easy``, ``standard``.
        train_split, val_split: split names; ``test_splits``: every split ``csmcir test`` scores
            (the synthetic benchmark's ``heldout`` split holds unseen modification x value pairs).
        target_text: ``caption`` (symmetric: target = image + its MCoT caption) or ``none``
            (asymmetric, SPRC-style: target = image + empty text).
        caption_levels: caption levels joined into the target text (``final`` = the final caption).
        max_text_len: tokens kept per text (including [CLS] and [SEP]). Through the CLI it is the
            model config's ``qformer.max_text_len`` (linked; change it there).
        tokenizer: ``minilm`` (bert-base-uncased vocabulary, shipped offline) or a local folder.
        image_size: resize images to this side when loading; ``null`` = the vision tower's input
            side (``tower_image_size``, linked from the model config by the CLI), or the images'
            own size when that is unset too (all must then match).
        tower_image_size: the vision tower's input side; set by the CLI from the model config.
        missing_caption: ``error`` (name the first image without caption) or ``empty``.
        hard_negatives: listed hard negatives (``negatives`` in the triplets) encoded per training
            query as extra InfoNCE negatives, beside the in-batch ones; 0 turns them off.
        reference_negative: the query's own reference image with its caption is a negative of
            that query (the target always differs from it); it reuses the query side's image
            features, so it costs one Q-Former pass and no vision pass.
        batch_size: training batch per process; ``eval_batch_size`` for evaluation.
        num_workers: DataLoader workers (0 is right for in-memory data).
        teacher: a ``csmcir teacher`` store folder of query embeddings (``model.distill`` uses them);
            every training query must be in it; evaluation splits found in it log the student's
            agreement with the teacher.
        teacher_gallery: the store folder of the teacher's image embeddings (``csmcir teacher
            --gallery``), for relational distillation and the agreement's top-10 overlap.
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        dataset: str = "custom",
        category: str | None = None,
        captions: str | None = None,
        synthetic: bool = True,
        synth_source: str = "shapes",
        synth_seed: int = 0,
        synth_difficulty: str = "standard",
        train_split: str = "train",
        val_split: str = "val",
        test_splits: list[str] = ["test", "heldout"],
        target_text: str = "caption",
        caption_levels: list[str] = ["final"],
        max_text_len: int = 64,
        tokenizer: str = "minilm",
        image_size: int | None = None,
        tower_image_size: int | None = None,
        missing_caption: str = "error",
        hard_negatives: int = 0,
        reference_negative: bool = True,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        teacher: str | None = None,
        teacher_gallery: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        trainable = dataset_names(trainable=True)
        if dataset not in trainable:
            raise CsmcirError(f"data.dataset must be one of {', '.join(trainable)}, got {dataset!r} (CIRCO is evaluation only)")
        if dataset_info(dataset).layout != "custom" and synthetic:
            raise CsmcirError(f"data.dataset={dataset} reads a real benchmark: set data.synthetic=false")
        if synth_source not in SYNTH_SOURCES:
            raise CsmcirError(f"data.synth_source must be one of {', '.join(SYNTH_SOURCES)}, got {synth_source!r}")
        self.text_config = TextConfig(
            tokenizer=tokenizer,
            max_text_len=max_text_len,
            target_text=target_text,
            caption_levels=tuple(caption_levels),
            image_size=image_size or tower_image_size,
        )
        self.stores: dict[str, SplitStore] = {}
        self._teacher_cache: dict[str, tuple] = {}  # store folder -> (id -> row, embeddings)
        self._dataset = None

    # -- preparation -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        root = Path(self.hparams.root)
        empty = not root.exists() or not any(root.iterdir())
        if self.hparams.synthetic:
            own = sorted(root.glob("triplets.*.jsonl")) if root.is_dir() and not (root / "benchmark.json").exists() else []
            if own:  # the user's own data under the synthetic default's settings
                raise CsmcirError(
                    f"data.root {root} holds your own data in the custom format ({own[0].name}), not the synthetic "
                    "benchmark: add --data.synthetic false to train on it"
                )

            h = self.hparams
            if h.synth_source == "fashion":
                from .boards import ensure_benchmark as ensure_boards

                ensure_boards(root, seed=h.synth_seed, difficulty=h.synth_difficulty)
            else:
                from .synthetic import ensure_benchmark

                ensure_benchmark(root, seed=h.synth_seed, difficulty=h.synth_difficulty, workers=os.cpu_count() or 1)
        elif empty:
            raise CsmcirError(f"data.root {root} is missing or empty (set data.synthetic=true to generate the synthetic benchmark)")

    def dataset(self):
        """The dataset object (:class:`~csmcir.data.custom.CustomCIR` or
        :class:`~csmcir.data.benchmarks.BenchmarkCIR`), opened once."""
        h = self.hparams
        if self._dataset is None:
            self._dataset = open_dataset(h.dataset, h.root, h.category, h.captions)
        return self._dataset

    @property
    def remove_reference(self) -> bool:
        """Whether rankings leave each query's reference out (custom, CIRR, Shoes; not FashionIQ)."""
        return dataset_info(self.hparams.dataset).remove_reference

    def benchmark_split(self, split: str):
        """The :class:`~csmcir.data.benchmarks.BenchmarkSplit` of a real benchmark, else ``None``."""
        return self.dataset().split(split) if dataset_info(self.hparams.dataset).official_protocol else None

    @property
    def train_store(self) -> SplitStore | None:
        """The training split in memory (after ``setup("fit")``), else ``None``."""
        return self.stores.get(self.hparams.train_split)

    def evaluators(self, stage: str, ks=(1, 5, 10, 50)) -> dict:
        """One :class:`~csmcir.retrieval.evaluate.SplitEvaluator` per split ``stage`` scores
        (``validate``: the val split, logged as ``val/...``; ``test``: every test split, the
        first as ``test/...``, the others as ``test/<split>/...``)."""
        from ..retrieval.evaluate import SplitEvaluator

        h = self.hparams
        splits = [h.val_split] if stage == "validate" else list(h.test_splits)
        prefix = "val" if stage == "validate" else "test"
        return {
            split: SplitEvaluator(
                self.stores[split],
                prefix if i == 0 else f"{prefix}/{split}",
                ks=tuple(ks),
                exclude_reference=self.remove_reference,
                benchmark_split=self.benchmark_split(split),
            )
            for i, split in enumerate(splits)
        }

    def attach_feature_cache(self, cache, encode, device, batch_size: int | None = None, is_global_zero: bool = True, barrier=None) -> None:
        """Replace each loaded split's pixels by the frozen tower's features from ``cache`` (a
        :class:`~csmcir.data.feature_cache.FeatureCache`), encoding with ``encode(pixels)`` what
        is not cached yet. Under DDP rank 0 writes and the other ranks read after ``barrier()``."""
        import torch

        from .feature_cache import CACHE_BATCH_SIZE, pixel_digest

        for split, store in self.stores.items():
            if store.images.dim() != 4:  # features already
                continue
            with torch.no_grad():
                shape = tuple(encode(store.images[:1].to(device)).shape[1:])
            kw = dict(
                split=split,
                ids=store.image_ids,
                shape=shape,
                load=lambda rows, s=store: s.images[rows].to(device),
                encode=encode,
                batch_size=max(1, batch_size or CACHE_BATCH_SIZE),
                content=pixel_digest(store.images),
            )
            if is_global_zero:
                feats = cache.features(**kw)
            if barrier is not None:
                barrier()
            if not is_global_zero:
                feats = cache.features(**kw, write=False)
            store.images = feats

    def _store(self, split: str) -> SplitStore:
        if split not in self.stores:
            h = self.hparams
            self.stores[split] = SplitStore.build(self.dataset(), split, self.text_config, missing_caption=h.missing_caption)
            if h.teacher or h.teacher_gallery:
                self._attach_teacher(self.stores[split], required=split == h.train_split)
        return self.stores[split]

    def _attach_teacher(self, store: SplitStore, required: bool) -> None:
        """Align the teacher stores with ``store``'s queries and image rows. A training query or
        image missing from them is an error naming it; an evaluation split they do not cover is
        left without (no agreement logged for it)."""
        import torch

        from ..teacher import read_teacher_store

        h = self.hparams
        for path, ids, attr in (
            (h.teacher, [t.id for t in store.triplets], "teacher_query"),
            (h.teacher_gallery, store.image_ids, "teacher_image"),
        ):
            if not path:
                continue
            if path not in self._teacher_cache:
                _, t_ids, emb = read_teacher_store(path)
                self._teacher_cache[path] = ({i: k for k, i in enumerate(t_ids)}, torch.from_numpy(emb.astype("float32")))
            pos, emb = self._teacher_cache[path]
            missing = [i for i in ids if i not in pos]
            if missing:
                if required:
                    raise CsmcirError(
                        f"teacher store {path} has no embedding for {missing[0]!r} "
                        f"({len(missing)} of split '{store.split}' missing; run `csmcir teacher` on it)"
                    )
                continue
            setattr(store, attr, emb[torch.tensor([pos[i] for i in ids])])

    def setup(self, stage: str) -> None:
        h = self.hparams
        if stage == "fit":
            self._store(h.train_split)
            self._store(h.val_split)
        elif stage == "validate":
            self._store(h.val_split)
        elif stage == "test":
            for s in h.test_splits:
                self._store(s)

    # -- loaders -----------------------------------------------------------------------------
    def train_dataloader(self):
        """Training batches in :class:`~csmcir.data.datasets.EpochSampler` order: seeded by the
        run's seed (``seed_everything``) and the epoch, each item's draws by its own seed, so a
        fit resumed from a mid-epoch ``last.ckpt`` trains exactly the batches the killed one had
        left, each once."""
        from .datasets import EpochSampler, ResumableLoader

        data = TrainTriplets(self.stores[self.hparams.train_split], self.hparams.hard_negatives, self.hparams.reference_negative)
        if self.hparams.num_workers > 0 and self.trainer is not None and self.trainer.ckpt_path:
            warnings.warn(
                "data.num_workers > 0: a fit resumed mid-epoch does not continue the interrupted epoch exactly "
                "(workers draw indices before Lightning restores its progress); the data is in memory, so "
                "data.num_workers 0 (the default) costs nothing",
                stacklevel=2,
            )
        sampler = EpochSampler(
            len(data), self.hparams.batch_size, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)), position=self._batches_done_this_epoch
        )
        return ResumableLoader(
            data,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            drop_last=True,  # equal batches on every rank for gathered negatives
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def _batches_done_this_epoch(self) -> int:
        """Training batches already done in the current epoch (after a resume: restored by
        Lightning from the checkpoint; otherwise 0 when the epoch's first batch is drawn)."""
        if self.trainer is None:
            return 0
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.completed)

    def _eval_loaders(self, splits: list[str]):
        """A gallery loader and a query loader per split; their batches name split and kind."""
        loaders = []
        for split in splits:
            store = self.stores[split]
            for ds in (GalleryImages(store), EvalQueries(store)):
                loaders.append(
                    DataLoader(
                        ds,
                        batch_size=self.hparams.eval_batch_size,
                        shuffle=False,
                        collate_fn=EvalCollate(split, ds.kind),
                        num_workers=self.hparams.num_workers,
                    )
                )
        return loaders

    def val_dataloader(self):
        return self._eval_loaders([self.hparams.val_split])

    def test_dataloader(self):
        return self._eval_loaders(list(self.hparams.test_splits))
