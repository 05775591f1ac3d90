"""The ``csmcir`` command: argument parsing and short adapters over the library.

``fit``, ``validate`` and ``test`` go to LightningCLI (``csmcir fit --help``); every other
command reads files and writes files for the next stage through a library function
(:mod:`csmcir`'s public API). User errors print one line (``error: ...``) and exit with status 2.
Nothing in the library imports this module.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data.benchmarks import FASHIONIQ_CATEGORIES  # annotation code only: no torch, no PIL
from .data.registry import DATASETS, dataset_names
from .errors import CsmcirError

LIGHTNING_COMMANDS = ("fit", "validate", "test")


def _dataset(a, captions: bool = True):
    from .data.registry import open_dataset

    return open_dataset(a.dataset, a.root, getattr(a, "category", None), getattr(a, "captions", None) if captions else None)


def _encoder(a):
    from .inference import Encoder

    return Encoder.from_checkpoint(a.ckpt, a.device, a.dtype, None if a.feature_cache == "none" else a.feature_cache)


# -- synth --------------------------------------------------------------------------------------
def cmd_synth(a) -> None:
    if a.source == "fashion":
        from .data.boards import generate as generate_boards

        out = generate_boards(a.out, seed=a.seed, difficulty=a.difficulty, photos=a.photos, progress=not a.quiet)
    else:
        from .data.synthetic import generate

        out = generate(a.out, seed=a.seed, difficulty=a.difficulty, workers=a.workers, progress=not a.quiet)
    info = json.loads((Path(out) / "benchmark.json").read_text())
    counts = ", ".join(f"{s}: {v['queries']} queries / {v['gallery']} gallery" for s, v in info["splits"].items())
    kind = "Fashion-MNIST board benchmark" if a.source == "fashion" else "synthetic benchmark"
    print(f"{kind} (seed {a.seed}, {a.difficulty}) in {out}: {counts}")


# -- index / embed / search / rank ---------------------------------------------------------------
def cmd_index(a) -> None:
    from .io import ensure_writable_dir
    from .retrieval.ranking import build_index

    ensure_writable_dir(a.out)  # an unwritable --out fails before the checkpoint loads
    enc = _encoder(a)
    index = build_index(
        enc,
        _dataset(a),
        a.split,
        a.out,
        kind=a.index_type,
        batch_size=a.batch_size,
        nprobe=a.nprobe,
        embeddings=a.embeddings,
        dataset_name=a.dataset,
    )
    print(f"indexed {len(index.ids)} images ({index.kind}, dim {index.dim}) into {a.out}")


def cmd_embed(a) -> None:
    from .inference import Encoder, file_digest
    from .lightning.predict import embed_sharded
    from .retrieval.embed import gallery_texts

    enc = Encoder.from_checkpoint(a.ckpt, "cpu")  # Lightning places it on each rank's device
    ds = _dataset(a)
    ids = ds.gallery(a.split)
    info = {
        "checkpoint": str(a.ckpt),
        "checkpoint_digest": file_digest(a.ckpt),
        "dataset": a.dataset,
        "split": a.split,
        "category": a.category,
    }
    devices = int(a.devices) if str(a.devices).isdigit() else a.devices
    counts = embed_sharded(
        enc,
        ds,
        ids,
        gallery_texts(enc, ds, ids),
        a.out,
        info,
        batch_size=a.batch_size,
        accelerator=a.accelerator,
        devices=devices,
        num_nodes=a.num_nodes,
        strategy=a.strategy,
        num_workers=a.num_workers,
    )
    print(
        f"{a.split} gallery: {counts['items']} images, {counts['already_done']} already embedded, "
        f"{counts['embedded']} embedded now, in {a.out}"
    )


def _open_image(path: str):
    from .data.custom import decode_image

    p = Path(path)
    if not p.is_file():
        raise CsmcirError(f"image {p} not found")
    return decode_image(p, None)


def cmd_search(a) -> None:
    from .data.custom import read_captions
    from .retrieval.index import GalleryIndex
    from .retrieval.ranking import search

    index = GalleryIndex.load(a.index)
    enc = _encoder(a)
    if index.dim != enc.dim:
        raise CsmcirError(f"index {a.index} holds {index.dim}-d embeddings but checkpoint {a.ckpt} makes {enc.dim}-d ones")
    cap_file = Path(a.index) / "captions.jsonl"
    # the query image itself, when it is one of the gallery's images, is not an answer (as the
    # rankings leave the reference out); --keep-query-image keeps it
    image = Path(a.image).resolve()
    root = Path(index.info.get("root", "/nonexistent")).resolve()
    own = image.stem if image.stem in set(index.ids) and root in image.parents else None
    exclude = [own] if own is not None and not a.keep_query_image else []
    hits = search(enc, index, _open_image(a.image), a.text, a.k, read_captions(cap_file) if cap_file.is_file() else {}, exclude_ids=exclude)
    if a.json:
        print(json.dumps(hits, indent=2))
    else:
        for h in hits:
            print(f"{h['rank']:>3}  {h['score']:.4f}  {h['id']}  {h['caption']}")


def cmd_rank(a) -> None:
    from .retrieval.ranking import rank_split

    if a.ckpt is not None:
        if a.teacher or a.teacher_gallery:
            raise CsmcirError("give --ckpt (the student) or --teacher with --teacher-gallery (CIR-CoT as the retriever), not both")
        enc = _encoder(a)  # a bad checkpoint is reported before any dataset is read
        ds = _dataset(a)
        ranking = rank_split(enc, ds, a.split, k=a.k, batch_size=a.batch_size)
    elif a.teacher and a.teacher_gallery:
        from .retrieval.ranking import rank_teacher

        ds = _dataset(a)
        ranking = rank_teacher(ds, a.split, a.teacher, a.teacher_gallery, k=a.k)
    else:
        raise CsmcirError("rank needs --ckpt (a checkpoint), or --teacher and --teacher-gallery (two `csmcir teacher` stores)")
    _write_and_score(a, ds, ranking)


def _write_and_score(a, ds, ranking) -> None:
    """Write ``ranking`` to ``a.out`` and print the split's metrics (rank, osrcir rank)."""
    from .io import atomic_write_json
    from .retrieval.protocols import ProtocolError
    from .retrieval.ranking import score_rankings

    atomic_write_json(a.out, ranking.as_dict(), indent=None)
    try:
        m = score_rankings(ds, a.split, ranking, source=str(a.out))
    except ProtocolError as e:
        m = {}
        print(f"no official metrics: {e}")
    if m:
        print("  ".join(f"{k} {v:.2f}" for k, v in m.items()))
    kept = "reference excluded" if ranking.reference_removed else "reference kept, as the protocol does"
    print(f"wrote rankings of {len(ranking.triplets)} queries (top {a.k}, {kept}) to {a.out}")


# -- evaluate / data check / submit ---------------------------------------------------------------
def cmd_evaluate(a) -> None:
    from .data.benchmarks import load_benchmark
    from .retrieval.protocols import read_rankings, score_split

    rankings = read_rankings(a.rankings)
    # FashionIQ without --category: all three, keys "<category>/<id>", each within its category
    out = score_split(load_benchmark(a.dataset, a.root, a.split, a.category, images=False), rankings, source=str(a.rankings))
    print(json.dumps({k: round(v, 4) for k, v in out.items()}))


def cmd_data_check(a) -> None:
    from .data.benchmarks import check_split, load_benchmark

    b = load_benchmark(a.dataset, a.root, a.split, a.category)
    report = check_split(b, quick=a.quick, progress=not a.no_progress)
    print(json.dumps(report))
    bad = report["missing_ids"] + report["unreadable_ids"]
    if bad:
        kinds = " and ".join(f"{report[k]} {k}" for k in ("missing", "unreadable") if report[k])
        raise CsmcirError(f"{a.dataset} {a.split} under {a.root}: {kinds} images, first: {', '.join(map(repr, bad[:5]))}")


def cmd_submit(a) -> None:
    from .data.benchmarks import load_benchmark
    from .io import ensure_writable_dir
    from .retrieval.protocols import read_rankings
    from .retrieval.ranking import rank_split, write_submission

    enc = _encoder(a) if a.ckpt is not None else None
    ensure_writable_dir(a.out)
    if enc is not None:
        ds = _dataset(a)
        b = ds.split(a.split)
        # the server files hold 50 ids per query (CIRR: besides the reference): say so before encoding
        need = 51 if a.dataset == "cirr" else 50
        if len(b.gallery) < need:
            raise CsmcirError(
                f"{a.dataset} {a.split} under {a.root} has {len(b.gallery)} gallery images; the submission "
                f"files rank 50 per query, so the gallery needs at least {need}"
            )
        # CIRR's image-set top 3 needs every member ranked: rank the whole gallery
        rankings = rank_split(enc, ds, a.split, k=None if a.dataset == "cirr" else 50, batch_size=a.batch_size).as_dict()
        source = f"rankings of {a.ckpt}"
    else:
        b = load_benchmark(a.dataset, a.root, a.split, images=False)
        rankings, source = read_rankings(a.rankings), str(a.rankings)
    files = write_submission(b, rankings, a.out, a.name, source=source)
    print(f"wrote {', '.join(f.name for f in files)} ({len(b.queries)} queries) to {Path(a.out)}")


# -- caption / teacher ----------------------------------------------------------------------------
def cmd_caption(a) -> None:
    from .captioning import caption_dataset

    backend_kw = dict(
        device=a.device, dtype=a.dtype, max_new_tokens=a.max_new_tokens, seed=a.seed, min_pixels=a.min_pixels, max_pixels=a.max_pixels
    )
    if a.backend == "transformers":
        backend_kw["local_files_only"] = not a.allow_download
    counts = caption_dataset(
        _dataset(a, captions=False),
        a.split,
        a.out,
        backend=a.backend,
        template=a.template,
        model=a.model,
        shard=a.shard,
        limit=a.limit,
        batch_size=a.batch_size,
        progress=not a.no_progress,
        **backend_kw,
    )
    print(json.dumps(counts))
    if counts["unparsed"] + counts["empty"]:
        print(
            f"warning: {counts['unparsed']} answers did not follow the format (raw text kept as the final caption) "
            f"and {counts['empty']} were empty (those images count as uncaptioned)",
            file=sys.stderr,
        )


def cmd_caption_merge(a) -> None:
    from .captioning import merge_stores

    if Path(a.out).resolve() in {Path(x).resolve() for x in a.shards}:
        raise CsmcirError(f"--out {a.out} is one of the shards: write the merge to a new file")
    print(json.dumps({"out": str(a.out), **merge_stores(a.out, a.shards)}))


def cmd_teacher(a) -> None:
    from .teacher import embed_teacher

    counts = embed_teacher(
        _dataset(a, captions=False),
        a.split,
        a.out,
        backend=a.backend,
        model=a.model,
        mode=a.mode,
        gallery=a.gallery,
        layer=a.layer,
        shard=a.shard,
        limit=a.limit,
        batch_size=a.batch_size,
        device=a.device,
        dtype=a.dtype,
        max_new_tokens=a.max_new_tokens,
        local_files_only=not a.allow_download,
        progress=not a.no_progress,
    )
    print(json.dumps(counts))


def cmd_osrcir_describe(a) -> None:
    from .osrcir import describe_queries

    kw = {}
    if a.backend == "mllm":
        kw = dict(device=a.device, dtype=a.dtype, max_new_tokens=a.max_new_tokens, local_files_only=not a.allow_download)
    counts = describe_queries(
        _dataset(a, captions=a.backend == "standin"),
        a.split,
        a.out,
        backend=a.backend,
        model=a.model,
        shard=a.shard,
        limit=a.limit,
        batch_size=a.batch_size,
        progress=not a.no_progress,
        **kw,
    )
    print(json.dumps(counts))
    if counts["unparsed"] + counts["empty"]:
        print(
            f"warning: {counts['unparsed'] + counts['empty']} answers did not follow the format (raw text kept as the description)",
            file=sys.stderr,
        )


def cmd_osrcir_rank(a) -> None:
    from .osrcir import make_retriever, rank_descriptions, read_descriptions

    ds = _dataset(a)
    ds.validate(a.split)
    read_descriptions(a.descriptions)  # a missing or damaged store is reported before a model loads
    retriever = make_retriever(a.retriever, a.retriever_model, device=a.device, dtype=a.dtype, local_files_only=not a.allow_download)
    ranking = rank_descriptions(ds, a.split, a.descriptions, retriever, k=a.k, gallery_cache=a.gallery_cache, progress=not a.no_progress)
    _write_and_score(a, ds, ranking)


def cmd_teacher_import(a) -> None:
    from .teacher import import_embeddings

    n = import_embeddings(a.out, a.embeddings, a.ids, a.model, kind=a.kind)
    print(json.dumps({"out": str(a.out), "imported": n, "kind": a.kind}))


# -- report / serve -----------------------------------------------------------------------------
def cmd_report(a) -> None:
    from .report import build_report

    if a.k < 1 or (a.limit is not None and a.limit < 1):
        raise CsmcirError("-k and --limit must be at least 1")
    index = build_report(
        _encoder(a),
        _dataset(a),
        a.split,
        a.out,
        k=a.k,
        limit=a.limit,
        teacher=a.teacher,
        thumb_size=a.thumb_size,
        progress=not a.no_progress,
        dataset_name=a.dataset,
    )
    print(f"wrote {index} (open it in a browser)")


def cmd_serve(a) -> None:
    from .report.serve import serve

    serve(a.index, a.ckpt, host="127.0.0.1", port=a.port, device=a.device, k=a.k, max_upload_mb=a.max_upload_mb)


# -- bench --------------------------------------------------------------------------------------
def cmd_bench_retrieval(a) -> None:
    import numpy as np

    from .bench.retrieval import BenchSettings, markdown_table, run_retrieval_bench, write_outputs
    from .io import ensure_writable_dir

    emb = None
    if a.embeddings:
        try:
            emb = np.load(a.embeddings, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as e:
            raise CsmcirError(f"cannot read --embeddings {a.embeddings}: {e}") from None
        if emb.ndim != 2:
            raise CsmcirError(f"--embeddings {a.embeddings} must hold a 2-D array [N, D], got shape {emb.shape}")
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    cfg = BenchSettings(
        sizes=tuple(a.sizes),
        dim=a.dim,
        queries=a.queries,
        k=a.k,
        batch=a.batch,
        kinds=tuple(a.kinds),
        data=a.data,
        seed=a.seed,
        min_seconds=a.min_seconds,
        target_recall=a.target_recall,
    )
    ensure_writable_dir(a.out)  # an unwritable --out fails before the measurements, not after
    result = run_retrieval_bench(cfg, embeddings=emb, progress=True)
    paths = write_outputs(result, a.out)
    print(markdown_table(result))
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_bench_efficiency(a) -> None:
    from .bench.efficiency import EfficiencySettings, markdown_table, read_accuracy, run_efficiency_bench, write_outputs
    from .io import ensure_writable_dir

    ensure_writable_dir(a.out)
    accuracy = {}
    for item in a.accuracy:
        name, _, value = item.partition("=")
        try:
            accuracy[name] = float(value)
        except ValueError:
            raise CsmcirError(f"--accuracy {item!r}: expected NAME=NUMBER, e.g. student:small=51.1") from None
    cfg = EfficiencySettings(
        students=tuple(a.students),
        mllms=tuple(a.mllms),
        new_tokens=a.new_tokens,
        device=a.device,
        dtype=a.dtype,
        repeats=a.repeats,
        batch=a.batch,
        mllm_image_size=a.mllm_image_size,
        sides=tuple(a.sides),
        accuracy=accuracy,
        system_accuracy=read_accuracy(a.accuracy_file) if a.accuracy_file else None,
        clips=tuple(a.clips),
        isolate=not a.in_process,
    )
    result = run_efficiency_bench(cfg, progress=True)
    paths = write_outputs(result, a.out)
    print(markdown_table(result))
    print("wrote " + ", ".join(str(p) for p in paths))


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csmcir",
        description="Composed image retrieval with a symmetric shared Q-Former dual tower.",
        epilog=(
            "Training goes through LightningCLI: `csmcir fit [--config configs/synthetic.yaml]`, "
            "`csmcir validate|test --ckpt_path C`; see `csmcir fit --help`. With no config, fit runs "
            "the synthetic default (generated on first use under data/synthetic)."
        ),
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (see `csmcir {name} --help`)", add_help=False)

    s = sub.add_parser(
        "synth", help="write a seeded generated CIR benchmark in the custom format: rendered shapes, or boards of real Fashion-MNIST photos"
    )
    s.add_argument("--out", required=True, help="output folder (created; must be empty or hold the same benchmark)")
    s.add_argument(
        "--source",
        default="shapes",
        choices=["shapes", "fashion"],
        help="shapes (default): rendered shapes on a 3x3 grid; fashion: product boards of real Fashion-MNIST photos "
        "(Debian's dataset-fashion-mnist), train boards from its training photos, test boards from its test photos",
    )
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument(
        "--difficulty",
        default="standard",
        choices=["easy", "standard", "medium", "hard"],
        help="default: standard (fashion: easy or standard)",
    )
    s.add_argument("--workers", type=int, default=2, help="shapes: rendering processes (default 2); output is identical for any value")
    s.add_argument(
        "--photos",
        help="fashion: folder of Fashion-MNIST's four idx .gz files (default $CSMCIR_FASHION_MNIST, else /usr/share/datasets/fashion-mnist)",
    )
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_synth)

    def common(sp, dataset=True, ckpt_required=True):
        sp.add_argument("--ckpt", required=ckpt_required, help="checkpoint written by `csmcir fit` (e.g. checkpoints/synthetic/last.ckpt)")
        if dataset:
            sp.add_argument(
                "--dataset",
                default="custom",
                choices=list(DATASETS),
                help="custom (default; the synthetic benchmark is custom) or a real benchmark in its release layout",
            )
            sp.add_argument("--root", required=True, help="dataset folder")
            sp.add_argument("--split", default="test", help="split name (default test)")
            sp.add_argument("--category", choices=list(FASHIONIQ_CATEGORIES), help="FashionIQ category")
            sp.add_argument("--captions", help="a real benchmark's caption file (default ROOT/captions.jsonl)")
        sp.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
        sp.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
        encoder_args(sp)

    def encoder_args(sp):
        sp.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, or auto (bfloat16 on a GPU)")
        sp.add_argument(
            "--feature-cache",
            default="auto",
            help="frozen-tower features to read by image id instead of running the vision tower: auto (default: "
            "the fit's model.feature_cache, when it holds this tower's features), a folder, or none",
        )

    s = sub.add_parser("index", help="embed a gallery (image + caption) into a faiss index with ids beside it")
    common(s)
    s.add_argument("--out", required=True, help="index folder to write (index.faiss, ids.txt, index_info.json, captions.jsonl)")
    s.add_argument(
        "--index-type",
        default="flat",
        choices=["flat", "ivf_flat", "ivf_pq", "hnsw", "auto"],  # = retrieval.index.INDEX_KINDS (tested)
        help="flat = exact inner product (default); ivf_flat = approximate, for large galleries; ivf_pq = "
        "approximate and 16x smaller; hnsw = graph index; auto = flat up to 200k images, ivf_flat above "
        "(docs/benchmarks.md, 'Retrieval at scale')",
    )
    s.add_argument(
        "--embeddings",
        help="folder written by `csmcir embed` (sharded, multi-process): index its embeddings instead of embedding the gallery here",
    )
    s.add_argument("--nprobe", type=int, help="ivf kinds: cells searched per query (default 16; more = slower, closer to exact)")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser(
        "embed",
        help="embed a split's gallery with Lightning predict on any number of processes/GPUs/nodes, as shards",
        description="Writes part-*.safetensors shards (embeddings + ids) and store.json into --out; every rank "
        "writes its own batches. Scale with --devices/--num-nodes/--strategy, or launch under torchrun "
        "or SLURM (Lightning detects them). Rerun to resume a killed run. Then "
        "`csmcir index --embeddings OUT ...` merges the shards into one index.",
    )
    common(s)
    s.add_argument("--out", required=True, help="shard folder to create or resume")
    s.add_argument("--accelerator", default="auto", help="auto, cpu, gpu (default auto)")
    s.add_argument("--devices", default="auto", help="processes/GPUs per node: a number or auto (default auto)")
    s.add_argument("--num-nodes", type=int, default=1, help="nodes (default 1)")
    s.add_argument("--strategy", default="auto", help="Lightning strategy: auto, ddp, ... (default auto)")
    s.add_argument("--num-workers", type=int, default=2, help="image-decoding workers per process (default 2)")
    s.set_defaults(func=cmd_embed)

    bench = sub.add_parser("bench", help="cost benchmarks: `bench efficiency` (csmcir vs a full MLLM), `bench retrieval` (faiss at scale)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="{efficiency,retrieval}")
    bench.set_defaults(func=lambda a: bench.print_help())
    s = bsub.add_parser(
        "retrieval",
        help="exact and approximate search over 10k-1M embeddings: build time, memory, queries/s, recall against exact",
        description="Builds each index kind of `csmcir index` (and torch matmul+topk as the naive baseline) over "
        "synthetic L2-normalised embeddings (or --embeddings), and writes bench_retrieval.{json,md,png} to --out. "
        "Measure on an otherwise idle machine: faiss's OpenMP threads slow down many times over when "
        "another job holds the cores.",
    )
    s.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="gallery sizes (default 10k 100k 1M)")
    s.add_argument("--dim", type=int, default=256, help="embedding dimension (default 256, the BLIP-2 projection)")
    s.add_argument("--queries", type=int, default=1000, help="queries (default 1000)")
    s.add_argument("-k", type=int, default=50, help="neighbours per query; recall@k is measured (default 50)")
    s.add_argument("--batch", type=int, default=1000, help="queries per search call (default 1000; batch 1 is measured too)")
    s.add_argument(
        "--kinds",
        nargs="+",
        default=["torch", "flat", "ivf_flat", "ivf_pq", "hnsw"],
        choices=["torch", "flat", "ivf_flat", "ivf_pq", "hnsw"],
        help="what to measure (default all)",
    )
    s.add_argument(
        "--data",
        default="clustered",
        choices=["clustered", "uniform"],
        help="synthetic embeddings: clustered (default; queries have near neighbours) or uniform (worst case)",
    )
    s.add_argument("--embeddings", help=".npy [N, D] of your own embeddings: the first --queries rows query the rest")
    s.add_argument("--target-recall", type=float, default=0.95, help="recall@k an approximate index must reach (default 0.95)")
    s.add_argument("--min-seconds", type=float, default=2.0, help="time each measurement at least this long (default 2)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="folder for bench_retrieval.json, .md and .png")
    s.set_defaults(func=cmd_bench_retrieval)

    s = bsub.add_parser(
        "efficiency",
        help="per-query and per-gallery-image cost: csmcir dual tower vs a full MLLM (fast and full CoT mode)",
        description="Random-weight models at the named sizes (cost does not depend on weight values; nothing is "
        "downloaded): csmcir towers from csmcir/model_configs (tiny, small, base = BLIP-2 ViT-g + Q-Former) "
        "and Qwen2.5-VL MLLMs (tiny, 3b, 7b) run through the `csmcir teacher` code in fast mode (<emb> "
        "right away) and full mode (--new-tokens of reasoning first). Latency p50/p95 at batch 1, "
        "throughput at --batch, peak memory, parameters and FLOPs (torch's FlopCounterMode). Each model "
        "runs in its own process so peak memory is its own. Writes bench_efficiency.{json,md,png} to --out.",
    )
    s.add_argument("--students", nargs="*", default=["tiny", "small"], help="csmcir model configs (default tiny small; base = BLIP-2 size)")
    s.add_argument("--mllms", nargs="*", default=["tiny"], help="Qwen2.5-VL sizes: tiny, 3b, 7b (default tiny)")
    s.add_argument(
        "--clips",
        nargs="*",
        default=[],
        help="CLIP sizes for OSrCIR's retrieval step: tiny, b16, l14 (ViT-B/16, ViT-L/14; default none). With an MLLM, "
        "the systems table adds OSrCIR = MLLM generation + CLIP text per query, CLIP image per gallery image",
    )
    s.add_argument(
        "--accuracy-file",
        help='JSON {"metric": "R@1, synthetic test", "entries": {system or kind: {"value": 51.2, "source": "measured here" '
        '| "stand-in" | "published", "note": "..."}}}: the systems table and plot put cost against it',
    )
    s.add_argument("--new-tokens", type=int, default=64, help="full mode: generated reasoning tokens (default 64)")
    s.add_argument("--sides", nargs="+", default=["query", "gallery"], choices=["query", "gallery"])
    s.add_argument("--repeats", type=int, default=10, help="batch-1 calls timed per model (default 10; p50/p95 over them)")
    s.add_argument("--batch", type=int, default=8, help="batch size of the throughput measurement (default 8)")
    s.add_argument("--mllm-image-size", type=int, default=448, help="MLLM input side in pixels (default 448: 256 visual tokens)")
    s.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda")
    s.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16")
    s.add_argument(
        "--accuracy",
        nargs="*",
        default=[],
        metavar="NAME=R@1",
        help="accuracy figures to plot cost against, e.g. student:small=51.1 (names as in the table)",
    )
    s.add_argument("--in-process", action="store_true", help="run every model in this process (peak memory is then shared)")
    s.add_argument("--out", required=True, help="folder for bench_efficiency.json, .md and .png")
    s.set_defaults(func=cmd_bench_efficiency)

    s = sub.add_parser("search", help="top-k gallery images for one reference image + modification text")
    common(s, dataset=False)
    s.add_argument("--index", required=True, help="folder written by `csmcir index`")
    s.add_argument("--image", required=True, help="reference image file")
    s.add_argument("--text", required=True, help='modification text, e.g. "make the red circle blue"')
    s.add_argument("-k", type=int, default=10, help="hits to return (default 10)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument(
        "--keep-query-image",
        action="store_true",
        help="keep the query image among the hits when it is one of the index's images (default: left out)",
    )
    s.set_defaults(func=cmd_search)

    s = sub.add_parser(
        "rank",
        help="rank a split's gallery for every query; writes {query id: [gallery ids]}",
        description=(
            "Rank with a checkpoint (--ckpt), or with a CIR-CoT teacher as the retriever: its query <emb> store "
            "(--teacher, `csmcir teacher`) against its gallery store (--teacher-gallery, `csmcir teacher --gallery`). "
            "Either way the dataset's protocol applies and the output feeds `csmcir evaluate` and `csmcir submit`."
        ),
    )
    common(s, ckpt_required=False)
    s.add_argument("--teacher", help="instead of --ckpt: a teacher query store folder (`csmcir teacher`)")
    s.add_argument("--teacher-gallery", help="with --teacher: the same teacher's gallery store (`csmcir teacher --gallery`)")
    s.add_argument("--out", required=True, help="rankings JSON file to write")
    s.add_argument("--k", type=int, default=50, help="ranked ids kept per query (default 50)")
    s.set_defaults(func=cmd_rank)

    def benchmark_args(sp, split_help, root_note="", category_help=None, datasets=tuple(dataset_names(official_protocol=True))):
        sp.add_argument("--dataset", required=True, choices=list(datasets))
        sp.add_argument("--root", required=True, help=f"the dataset's folder in its release layout{root_note}")
        sp.add_argument("--split", required=True, help=split_help)
        if category_help:
            sp.add_argument("--category", choices=list(FASHIONIQ_CATEGORIES), help=category_help)

    s = sub.add_parser(
        "evaluate",
        help="score a rankings file by a benchmark's official protocol (no model needed)",
        description=(
            "Score {query id: [image ids, best first]} (csmcir rank output or a test-server submission) "
            "by the official protocol: FashionIQ R@10/50 (reference kept), CIRR R@1/5/10/50 (reference "
            "removed), Rsubset@1/2/3 and Avg, CIRCO mAP@5/10/25/50, Shoes R@1/10/50 (reference removed). "
            "Prints one JSON object of percentages. Every query of the split must be ranked."
        ),
    )
    benchmark_args(
        s,
        "fashioniq: val; cirr: val; circo: val; shoes: test",
        " (images not needed)",
        "FashionIQ category; without it all three are scored and averaged (keys '<category>/<id>')",
    )
    s.add_argument("--rankings", required=True, help="rankings JSON file")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("data", help="dataset utilities: `csmcir data check`")
    data_sub = s.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = data_sub.add_parser(
        "check",
        help="count a benchmark split and find missing or unreadable images before training",
        description=(
            "Load a split of a real benchmark in its release layout, print one JSON object (queries, "
            "gallery, images checked, missing and unreadable counts and ids) and exit non-zero naming the "
            "first bad ids. Every image is decoded (progress bar); --quick only checks that files exist."
        ),
    )
    benchmark_args(
        s,
        "fashioniq: train|val|test; cirr: train|val|test1; circo: val|test; shoes: train|test",
        "",
        "FashionIQ category; without it all three",
    )
    s.add_argument("--quick", action="store_true", help="only check that the files exist")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_data_check)

    s = sub.add_parser(
        "submit",
        help="write test-server submission files (CIRR test1, CIRCO test) from rankings or a checkpoint",
        description=(
            "From a rankings file or a checkpoint. CIRR test1: recall_submission_<name>.json (top 50, reference excluded) and "
            "recall_subset_submission_<name>.json (top 3 of the image set), every pairid, checked against "
            "the 5 MB limit. CIRCO test: submission_<name>.json, every id with 50 unique image ids. "
            "Nothing is written unless every query is valid."
        ),
    )
    benchmark_args(s, "cirr: test1; circo: test", "", category_help=None, datasets=dataset_names(submission=True))
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--rankings", help="rankings JSON (e.g. `csmcir rank` output, deep enough for CIRR's image sets)")
    source.add_argument("--ckpt", help="rank with this checkpoint instead (the whole gallery for CIRR)")
    s.add_argument("--captions", help="caption file for the checkpoint's target side (default ROOT/captions.jsonl)")
    s.add_argument("--device", default="auto", help="with --ckpt: auto, cpu, cuda, ...")
    encoder_args(s)
    s.add_argument("--batch-size", type=int, default=256, help="with --ckpt: images per forward pass")
    s.add_argument("--out", required=True, help="folder for the submission files")
    s.add_argument("--name", default="csmcir", help="suffix of the file names (default csmcir)")
    s.set_defaults(func=cmd_submit)

    def mllm_job_args(sp, unit: str, shards_then: str):
        """What the long MLLM jobs (caption, teacher) share: data, device, batching, sharding."""
        sp.add_argument(
            "--dataset",
            default="custom",
            choices=list(DATASETS),
            help="custom (default; the synthetic benchmark is custom) or a real benchmark",
        )
        sp.add_argument("--root", required=True, help="dataset folder")
        sp.add_argument("--category", choices=list(FASHIONIQ_CATEGORIES), help="FashionIQ category (default: all three)")
        sp.add_argument("--batch-size", type=int, default=8, help=f"{unit} per forward or generate call (default 8)")
        sp.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
        sp.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
        sp.add_argument("--limit", type=int, help=f"only the first N {unit} of this shard")
        sp.add_argument("--shard", help=f"i/n: every n-th of the {unit} from position i (run n processes, {shards_then})")
        sp.add_argument(
            "--allow-download", action="store_true", help="let transformers fetch --model from the hub (default: local files only)"
        )
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser(
        "caption",
        help="write multi-level chain-of-thought (MCoT) captions of a split's images with an MLLM",
        description=(
            "Caption every image a split reads (gallery, references, targets) with a prompt that makes the model "
            "reason level by level (scene, objects, attributes, relations; for fashion: category, parts, attributes, "
            "context) and then write one final discriminative caption. Records go to a JSONL store, one line per "
            "image, appended as each batch finishes: rerun the same command after a kill and it skips what is done "
            "(a truncated last line is repaired). Answers that do not follow the format keep their raw text as the "
            "final caption (status 'unparsed'). The store is a captions.jsonl: train with --data.captions FILE."
        ),
        epilog="example: csmcir caption --dataset cirr --root data/cirr --split train val --backend transformers "
        "--model Qwen/Qwen2.5-VL-7B-Instruct --out captions/cirr.qwen7b.jsonl --shard 0/4",
    )
    mllm_job_args(s, "images", "then caption-merge")
    s.add_argument("--split", nargs="+", required=True, help="one or more splits; their images are captioned once each")
    s.add_argument(
        "--backend",
        default="transformers",
        choices=["transformers", "synthetic"],
        help="transformers (an MLLM; default) or synthetic (the synthetic benchmark's scene captioner)",
    )
    s.add_argument("--model", help="transformers backend: local folder or hub id of an image-text-to-text MLLM")
    s.add_argument(
        "--template", help="prompt template: natural, fashion or a YAML file (default: fashion for fashioniq/shoes, else natural)"
    )
    s.add_argument("--out", required=True, help="caption store (JSONL) to create or resume")
    s.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    s.add_argument("--min-pixels", type=int, help="Qwen-VL image processors: lower bound on pixels per image")
    s.add_argument("--max-pixels", type=int, help="Qwen-VL image processors: upper bound on pixels per image")
    s.add_argument("--seed", type=int, default=0, help="synthetic backend: captioner seed (default 0)")
    s.set_defaults(func=cmd_caption)

    s = sub.add_parser("caption-merge", help="join caption-store shards into one file; refuses conflicting records")
    s.add_argument("--out", required=True, help="merged store to write")
    s.add_argument("shards", nargs="+", help="shard stores written by `csmcir caption --shard i/n`")
    s.set_defaults(func=cmd_caption_merge)
    s = sub.add_parser(
        "report",
        help="a static HTML report: each query's top-k hits with captions, ground truth and failures",
        description=(
            "Rank a split with a checkpoint and write DIR/index.html, which opens from disk: per query the "
            "reference and text, the top-k thumbnails with scores, the ground truth marked, each hit's MCoT "
            "caption levels with the words it shares with the query highlighted; recall per modification "
            "type (or category) with links to the failures; 20 queries a page."
        ),
    )
    common(s)
    s.add_argument("--out", required=True, help="report folder to write (index.html, data.js, report.js, thumbs/)")
    s.add_argument("-k", type=int, default=10, help="hits shown per query (default 10)")
    s.add_argument("--limit", type=int, help="only the first N queries of the split")
    s.add_argument("--thumb-size", type=int, default=96, help="thumbnail side in pixels (default 96)")
    s.add_argument("--teacher", help="a `csmcir teacher` store folder: show its reasoning for each query")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser(
        "serve",
        help="a local search page (127.0.0.1): upload a reference image and a text, see the hits",
        description=(
            "Serve a page with an upload form on 127.0.0.1 that searches an index written by `csmcir index` "
            "and shows the hits with their captions. Only the index's gallery images are served; uploads are "
            "size-limited and must decode as images. Stop with Ctrl-C."
        ),
    )
    common(s, dataset=False)
    s.add_argument("--index", required=True, help="folder written by `csmcir index`")
    s.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765; 0 picks a free one)")
    s.add_argument("-k", type=int, default=10, help="hits per search (default 10)")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default 10 MB)")
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser(
        "teacher",
        help="CIR-CoT teacher embeddings: an MLLM's hidden state at an <emb> token, per query (or gallery image)",
        description=(
            "Embed a split's queries (reference image + modification text) with an MLLM prompted CIR-CoT style: "
            "in full mode it writes Caption, Reasoning and Conclusion, then <emb> is appended and its hidden state "
            "(--layer) is the embedding; in fast mode <emb> follows the prompt directly. --gallery embeds the split's "
            "gallery images instead (fast). Writes a safetensors store folder (parts of [n, dim] with their ids, "
            "store.json, the reasoning text); rerun to resume, --shard i/n to split across processes into the same folder."
        ),
    )
    mllm_job_args(s, "items", "into the same --out folder")
    s.add_argument("--split", required=True, help="split whose queries (or gallery) to embed")
    s.add_argument(
        "--backend",
        default="mllm",
        choices=["mllm", "oracle"],
        help="mllm (default): a transformers MLLM; oracle: the synthetic benchmark's reasoning oracle + MiniLM, "
        "a STAND-IN for a real CIR-CoT model (see csmcir/teacher/oracle.py)",
    )
    s.add_argument("--model", help="mllm backend: local folder or hub id of an image-text-to-text MLLM")
    s.add_argument("--mode", default="fast", choices=["fast", "full"], help="fast (default): <emb> right away; full: reason first")
    s.add_argument("--gallery", action="store_true", help="embed the split's gallery images instead of its queries")
    s.add_argument("--layer", type=int, default=-1, help="hidden state to read (default -1, the last layer)")
    s.add_argument("--max-new-tokens", type=int, default=128, help="full mode: reasoning length limit (default 128)")
    s.add_argument("--out", required=True, help="store folder to create or resume")
    s.set_defaults(func=cmd_teacher)

    osr = sub.add_parser(
        "osrcir",
        help="OSrCIR-style training-free retrieval: an MLLM describes each target, the text retrieves",
        description=(
            "Reason-then-retrieve with no training (OSrCIR, CVPR 2025): `describe` makes one MLLM pass per query "
            "(reference image + modification text) with a reflective prompt: caption, thoughts, reflection, target "
            "description; `rank` retrieves the gallery with the descriptions through a CLIP-style dual encoder or "
            "against the gallery's MCoT captions."
        ),
    )
    osub = osr.add_subparsers(dest="osrcir_command", metavar="{describe,rank}")
    s = osub.add_parser(
        "describe",
        help="write each query's target description (resumable JSONL store, raw answers kept)",
        description=(
            "One line per query (query_id, levels caption/thoughts/reflection, final = the target description, "
            "status, raw answer, model, prompt osrcir@1), appended per batch: rerun after a kill and it continues. "
            "--backend standin is the synthetic benchmark's caption-reasoning stand-in, NOT an MLLM."
        ),
        epilog="example: csmcir osrcir describe --dataset cirr --root data/cirr --split val "
        "--model Qwen/Qwen2.5-VL-7B-Instruct --out osrcir/cirr-val.jsonl",
    )
    mllm_job_args(s, "queries", "into separate files")
    s.add_argument("--split", required=True, help="split whose queries to describe")
    s.add_argument(
        "--backend",
        default="mllm",
        choices=["mllm", "standin"],
        help="mllm (default): a transformers image-text-to-text MLLM; standin: the synthetic benchmark's stand-in "
        "(the reference's lossy caption edited by the query's structured modification; csmcir/osrcir/standin.py)",
    )
    s.add_argument("--model", help="mllm backend: local folder or hub id")
    s.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    s.add_argument("--out", required=True, help="description store (JSONL) to create or resume")
    s.set_defaults(func=cmd_osrcir_describe)
    s = osub.add_parser(
        "rank",
        help="rank a split's gallery by the target descriptions; writes {query id: [gallery ids]}",
        description="clip: the dual encoder's text tower embeds each description, its image tower each gallery image "
        "(cached with --gallery-cache); captions: a sentence encoder (default the packaged MiniLM) matches each "
        "description against the gallery images' final MCoT captions. Prints the split's metrics by its protocol.",
    )
    s.add_argument("--dataset", default="custom", choices=list(DATASETS), help="custom (default) or a real benchmark")
    s.add_argument("--root", required=True, help="dataset folder")
    s.add_argument("--split", default="test", help="split name (default test)")
    s.add_argument("--category", choices=list(FASHIONIQ_CATEGORIES), help="FashionIQ category")
    s.add_argument("--captions", help="caption file of the gallery (default ROOT/captions.jsonl)")
    s.add_argument("--descriptions", required=True, help="store written by `csmcir osrcir describe`")
    s.add_argument("--retriever", default="clip", choices=["clip", "captions"], help="clip (default) or captions")
    s.add_argument(
        "--retriever-model", help="clip: a CLIPModel/SiglipModel folder or hub id; captions: a sentence encoder (default MiniLM)"
    )
    s.add_argument("--gallery-cache", help="clip: folder keeping the gallery image embeddings between runs")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    s.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU), float32, bfloat16, float16")
    s.add_argument("--k", type=int, default=50, help="ranked ids kept per query (default 50)")
    s.add_argument("--out", required=True, help="rankings JSON file to write")
    s.add_argument("--allow-download", action="store_true", help="let transformers fetch --retriever-model from the hub")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_osrcir_rank)
    osr.set_defaults(func=lambda a: osr.print_help())

    s = sub.add_parser(
        "teacher-import",
        help="import teacher embeddings computed elsewhere into a store folder",
        description="From a .safetensors file (tensor 'embeddings' [N, dim], metadata 'ids' = JSON list) "
        "or an .npy array [N, dim] with --ids (a text file, one id a line).",
    )
    s.add_argument("--embeddings", required=True, help=".safetensors or .npy file")
    s.add_argument("--ids", help="with .npy: the ids, one a line, in row order")
    s.add_argument("--model", required=True, help="name of the model that made them (stored)")
    s.add_argument("--kind", default="query", choices=["query", "gallery"])
    s.add_argument("--out", required=True, help="store folder to write")
    s.set_defaults(func=cmd_teacher_import)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            from .lightning.cli import run_lightning_cli

            run_lightning_cli(argv)
            return 0
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0 if not argv else 2
        args.func(args)
        return 0
    except CsmcirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
