"""The ``csmcir`` command.

``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI (``csmcir fit --help``); the
stage commands (``synth``, ``caption``, ``teacher``, ``index``, ``search``, ``rank``, ``evaluate``,
``submit``, ``report``, ``serve``) each read files and write files for the next stage. User errors print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data.benchmarks import FASHIONIQ_CATEGORIES  # annotation code only: no torch, no PIL
from .errors import CsmcirError

LIGHTNING_COMMANDS = ("fit", "validate", "test")
DATASETS = ("custom", "synthetic", "fashioniq", "cirr", "circo", "shoes")


def _open_dataset(name: str, root: str, category: str | None = None, captions: str | None = None):
    from .data.benchmarks import BenchmarkCIR
    from .data.custom import CustomCIR

    if name not in DATASETS:
        raise CsmcirError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    if name in ("custom", "synthetic"):
        return CustomCIR(root, captions)
    return BenchmarkCIR(name, root, category, captions)


# -- synth --------------------------------------------------------------------------------------
def cmd_synth(a) -> None:
    from .data.synthetic import generate

    out = generate(a.out, seed=a.seed, difficulty=a.difficulty, workers=a.workers, progress=not a.quiet)
    info = json.loads((Path(out) / "benchmark.json").read_text())
    counts = ", ".join(f"{s}: {v['queries']} queries / {v['gallery']} gallery" for s, v in info["splits"].items())
    print(f"synthetic benchmark (seed {a.seed}, {a.difficulty}) in {out}: {counts}")


# -- index --------------------------------------------------------------------------------------
def cmd_index(a) -> None:
    from .inference import Encoder
    from .io import ensure_writable_dir
    from .retrieval.embed import embed_pairs, gallery_texts
    from .retrieval.index import GalleryIndex
    from .data.custom import write_captions

    out = ensure_writable_dir(a.out)
    enc = Encoder.from_checkpoint(a.ckpt, a.device)
    ds = _open_dataset(a.dataset, a.root, a.category, a.captions)
    ids = ds.gallery(a.split)
    if a.embeddings:  # written by `csmcir embed` (any number of processes): merge its parts
        from .inference import file_digest
        from .lightning.predict import STORE_FILE, merge_shards

        store = Path(a.embeddings) / STORE_FILE
        made_by = json.loads(store.read_text()).get("checkpoint_digest") if store.is_file() else None
        if made_by is not None and made_by != file_digest(a.ckpt):
            raise CsmcirError(f"{a.embeddings} was embedded with another checkpoint than {a.ckpt}")
        emb = merge_shards(a.embeddings, ids, enc.dim)
    else:
        texts = gallery_texts(enc, ds, ids)
        emb = embed_pairs(enc, ds, ids, texts, a.batch_size, desc=f"embedding {a.split} gallery", partial=out / ".embeddings.partial.npz")
    info = {"checkpoint": str(a.ckpt), "dataset": a.dataset, "root": str(Path(a.root).resolve()), "split": a.split,
            "category": a.category, "target_text": enc.text.get("target_text")}
    index = GalleryIndex.build(emb, ids, kind=a.index_type, info=info)
    if a.nprobe is not None:
        index.set_search_params(nprobe=a.nprobe)
    captions = ds.captions() if enc.text.get("target_text", "caption") != "none" else {}
    write_captions(out / "captions.jsonl", [captions[i] for i in ids if i in captions])
    index.save(out)
    (out / ".embeddings.partial.npz").unlink(missing_ok=True)
    print(f"indexed {len(ids)} images ({index.kind}, dim {emb.shape[1]}) into {out}")


# -- embed --------------------------------------------------------------------------------------
def cmd_embed(a) -> None:
    from .inference import Encoder, file_digest
    from .lightning.predict import embed_sharded
    from .retrieval.embed import gallery_texts

    enc = Encoder.from_checkpoint(a.ckpt, "cpu")  # Lightning places it on each rank's device
    ds = _open_dataset(a.dataset, a.root, a.category, a.captions)
    ids = ds.gallery(a.split)
    texts = gallery_texts(enc, ds, ids)
    info = {"checkpoint": str(a.ckpt), "checkpoint_digest": file_digest(a.ckpt), "dataset": a.dataset, "split": a.split,
            "category": a.category}
    devices = int(a.devices) if str(a.devices).isdigit() else a.devices
    counts = embed_sharded(enc, ds, ids, texts, a.out, info, batch_size=a.batch_size, accelerator=a.accelerator,
                           devices=devices, num_nodes=a.num_nodes, strategy=a.strategy, num_workers=a.num_workers)
    print(f"{a.split} gallery: {counts['items']} images, {counts['already_done']} already embedded, "
          f"{counts['embedded']} embedded now, in {a.out}")


# -- bench --------------------------------------------------------------------------------------
def cmd_bench_retrieval(a) -> None:
    import numpy as np

    from .bench.retrieval import BenchSettings, markdown_table, run_retrieval_bench, write_outputs

    emb = None
    if a.embeddings:
        try:
            emb = np.load(a.embeddings, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as e:
            raise CsmcirError(f"cannot read --embeddings {a.embeddings}: {e}") from None
        if emb.ndim != 2:
            raise CsmcirError(f"--embeddings {a.embeddings} must hold a 2-D array [N, D], got shape {emb.shape}")
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    cfg = BenchSettings(sizes=tuple(a.sizes), dim=a.dim, queries=a.queries, k=a.k, batch=a.batch, kinds=tuple(a.kinds),
                        data=a.data, seed=a.seed, min_seconds=a.min_seconds, target_recall=a.target_recall)
    from .io import ensure_writable_dir

    ensure_writable_dir(a.out)  # an unwritable --out fails before the measurements, not after
    result = run_retrieval_bench(cfg, embeddings=emb, progress=True)
    paths = write_outputs(result, a.out)
    print(markdown_table(result))
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_bench_efficiency(a) -> None:
    from .bench.efficiency import EfficiencySettings, markdown_table, run_efficiency_bench, write_outputs
    from .io import ensure_writable_dir

    ensure_writable_dir(a.out)
    accuracy = {}
    for item in a.accuracy:
        name, _, value = item.partition("=")
        try:
            accuracy[name] = float(value)
        except ValueError:
            raise CsmcirError(f"--accuracy {item!r}: expected NAME=NUMBER, e.g. student:small=51.1") from None
    cfg = EfficiencySettings(students=tuple(a.students), mllms=tuple(a.mllms), new_tokens=a.new_tokens, device=a.device,
                             dtype=a.dtype, repeats=a.repeats, batch=a.batch, mllm_image_size=a.mllm_image_size,
                             sides=tuple(a.sides), accuracy=accuracy, isolate=not a.in_process)
    result = run_efficiency_bench(cfg, progress=True)
    paths = write_outputs(result, a.out)
    print(markdown_table(result))
    print("wrote " + ", ".join(str(p) for p in paths))


# -- search -------------------------------------------------------------------------------------
def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise CsmcirError(f"image {p} not found")
    try:
        img = Image.open(p)
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise CsmcirError(f"{p}: cannot decode image: {e}") from None


def cmd_search(a) -> None:
    from .data.custom import read_captions
    from .inference import Encoder
    from .retrieval.index import GalleryIndex

    index = GalleryIndex.load(a.index)
    enc = Encoder.from_checkpoint(a.ckpt, a.device)
    if index.dim != enc.dim:
        raise CsmcirError(f"index {a.index} holds {index.dim}-d embeddings but checkpoint {a.ckpt} makes {enc.dim}-d ones")
    q = enc.encode([_open_image(a.image)], [a.text])
    scores, ids = index.search(q, a.k)
    cap_file = Path(a.index) / "captions.jsonl"
    captions = read_captions(cap_file) if cap_file.is_file() else {}
    hits = [
        {"rank": r + 1, "id": i, "score": round(float(s), 4), "caption": captions[i].final if i in captions else ""}
        for r, (i, s) in enumerate(zip(ids[0], scores[0]))
    ]
    if a.json:
        print(json.dumps(hits, indent=2))
    else:
        for h in hits:
            print(f"{h['rank']:>3}  {h['score']:.4f}  {h['id']}  {h['caption']}")


# -- rank ---------------------------------------------------------------------------------------
def _load_encoder(a):
    from .inference import Encoder

    return Encoder.from_checkpoint(a.ckpt, a.device)


def _embed_and_rank(enc, ds, split: str, triplets: list, k: int, batch_size: int, missing_caption: str = "error"):
    """Embed ``triplets`` and the gallery of ``split`` with encoder ``enc``; returns ``(gallery
    ids, top-k gallery positions [Q, k'], their scores [Q, k'])``, the reference excluded where
    the protocol removes it."""
    import torch

    from .retrieval.embed import embed_pairs, gallery_texts
    from .retrieval.metrics import topk_rankings

    gallery = ds.gallery(split)
    texts = gallery_texts(enc, ds, gallery, missing_caption=missing_caption)
    g = embed_pairs(enc, ds, gallery, texts, batch_size, desc=f"embedding {split} gallery")
    q = embed_pairs(enc, ds, [t.reference for t in triplets], [t.text for t in triplets], batch_size, desc=f"embedding {split} queries")
    pos = {gid: j for j, gid in enumerate(gallery)}
    exclude = [pos.get(t.reference) for t in triplets] if ds.remove_reference else None
    idx, scores = topk_rankings(torch.from_numpy(q), torch.from_numpy(g), k, exclude=exclude)
    return gallery, idx, scores


def _rank_with_checkpoint(enc, a, ds, split: str, k: int) -> tuple[dict[str, list[str]], list]:
    """Embed ``split`` of ``ds`` with encoder ``enc`` and rank its gallery for each query."""
    ds.validate(split)
    triplets = ds.triplets(split)
    gallery, idx, _ = _embed_and_rank(enc, ds, split, triplets, k, a.batch_size)
    return {t.id: [gallery[j] for j in row] for t, row in zip(triplets, idx.tolist())}, triplets


def cmd_rank(a) -> None:
    from .io import atomic_write_json
    from .retrieval.metrics import recall_at_k

    enc = _load_encoder(a)  # a bad checkpoint is reported before any dataset is read
    ds = _open_dataset(a.dataset, a.root, a.category, a.captions)
    rankings, triplets = _rank_with_checkpoint(enc, a, ds, a.split, a.k)
    atomic_write_json(a.out, rankings, indent=None)
    if all(t.targets for t in triplets):
        if hasattr(ds, "split"):  # a real benchmark: its official metrics
            from .retrieval.protocols import ProtocolError, score_split

            try:
                m = score_split(ds.split(a.split), rankings, source=str(a.out))
            except ProtocolError as e:
                m = {}
                print(f"no official metrics: {e}")
        else:
            ks = tuple(k for k in (1, 5, 10, 50) if k <= a.k)
            m = recall_at_k(list(rankings.values()), [set(t.targets) for t in triplets], ks=ks)
        if m:
            print("  ".join(f"{k} {v:.2f}" for k, v in m.items()))
    kept = "reference excluded" if ds.remove_reference else "reference kept, as the protocol does"
    print(f"wrote rankings of {len(rankings)} queries (top {a.k}, {kept}) to {a.out}")


# -- evaluate -----------------------------------------------------------------------------------
def cmd_evaluate(a) -> None:
    from .data.benchmarks import load_benchmark
    from .retrieval.protocols import read_rankings, score_split

    rankings = read_rankings(a.rankings)
    # FashionIQ without --category: all three, keys "<category>/<id>", each within its category
    out = score_split(load_benchmark(a.dataset, a.root, a.split, a.category, images=False), rankings, source=str(a.rankings))
    print(json.dumps({k: round(v, 4) for k, v in out.items()}))


# -- data check / submit ------------------------------------------------------------------------
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
    from .io import atomic_write_json, ensure_writable_dir
    from .retrieval.protocols import circo_submission, cirr_submission, read_rankings

    enc = _load_encoder(a) if a.ckpt is not None else None
    out = ensure_writable_dir(a.out)
    if enc is not None:
        ds = _open_dataset(a.dataset, a.root, None, a.captions)
        b = ds.split(a.split)
        # CIRR's image-set top 3 needs every member ranked: rank the whole gallery
        rankings, _ = _rank_with_checkpoint(enc, a, ds, a.split, len(b.gallery) if a.dataset == "cirr" else 50)
        source = f"rankings of {a.ckpt}"
    else:
        b = load_benchmark(a.dataset, a.root, a.split, images=False)
        rankings, source = read_rankings(a.rankings), str(a.rankings)
    if a.dataset == "cirr":
        recall, subset = cirr_submission(b, rankings, source=source)
        files = {f"recall_submission_{a.name}.json": recall, f"recall_subset_submission_{a.name}.json": subset}
    else:
        files = {f"submission_{a.name}.json": circo_submission(b, rankings, source=source)}
    for name, data in files.items():  # everything validated before the first file is written
        atomic_write_json(out / name, data, indent=None)
    print(f"wrote {', '.join(files)} ({len(b.queries)} queries) to {out}")


# -- caption ------------------------------------------------------------------------------------
def cmd_caption(a) -> None:
    from .captioning import CaptionStore, caption_images, default_template_for, load_template, parse_shard, select_ids, split_image_ids
    from .captioning.backends import make_backend

    template = load_template(a.template or default_template_for(a.dataset))
    shard = parse_shard(a.shard)
    if a.limit is not None and a.limit < 0:
        raise CsmcirError("--limit must be >= 0")
    ds = _open_dataset(a.dataset, a.root, a.category)
    ids: dict[str, None] = {}
    for split in a.split:
        ids.update(dict.fromkeys(split_image_ids(ds, split)))
    ids = select_ids(list(ids), shard, a.limit)
    with CaptionStore(a.out) as store:  # opens (and repairs) the store before the model loads
        for i, rec in store.records.items():
            if rec.get("prompt") not in (None, template.id):
                raise CsmcirError(f"{a.out}: image {i!r} was captioned with prompt {rec.get('prompt')} but this run uses "
                                  f"{template.id}; write to another file")
        todo = [i for i in ids if i not in store.records]
        if a.backend == "transformers":  # before a large model loads: every image file is there
            missing = [(i, path) for i in todo if not (path := ds.image_path(i)).is_file()]
            if missing:
                raise CsmcirError(f"{len(missing)} of {len(todo)} images to caption are missing, first: image {missing[0][0]!r} "
                                  f"at {missing[0][1]}: image file not found")
        backend = make_backend(a.backend, model=a.model, root=a.root, template=template, device=a.device, dtype=a.dtype,
                               max_new_tokens=a.max_new_tokens, seed=a.seed, min_pixels=a.min_pixels, max_pixels=a.max_pixels,
                               **({"local_files_only": not a.allow_download} if a.backend == "transformers" else {}))
        counts = caption_images(ids, ds.load_image, backend, template, store,
                                batch_size=a.batch_size, progress=not a.no_progress)
    print(json.dumps({"out": str(a.out), "model": backend.model_id, "prompt": template.id, "shard": f"{shard[0]}/{shard[1]}", **counts}))
    bad = counts["unparsed"] + counts["empty"]
    if bad:
        print(f"warning: {counts['unparsed']} answers did not follow the format (raw text kept as the final caption) "
              f"and {counts['empty']} were empty (those images count as uncaptioned)", file=sys.stderr)


def cmd_caption_merge(a) -> None:
    from .captioning import merge_stores

    if Path(a.out).resolve() in {Path(x).resolve() for x in a.shards}:
        raise CsmcirError(f"--out {a.out} is one of the shards: write the merge to a new file")
    print(json.dumps({"out": str(a.out), **merge_stores(a.out, a.shards)}))


# -- report / serve -----------------------------------------------------------------------------
def cmd_report(a) -> None:
    from .report import write_report
    from .retrieval.metrics import recall_at_k

    if a.k < 1 or (a.limit is not None and a.limit < 1):
        raise CsmcirError("-k and --limit must be at least 1")
    enc = _load_encoder(a)
    ds = _open_dataset(a.dataset, a.root, a.category, a.captions)
    ds.validate(a.split)
    triplets = ds.triplets(a.split)[: a.limit]
    gallery, idx, scores = _embed_and_rank(enc, ds, a.split, triplets, a.k, a.batch_size, missing_caption="empty")
    queries, groups = [], {}
    for t, row, sc in zip(triplets, idx.tolist(), scores.tolist()):
        group = t.meta.get("type") or (t.id.split("/")[0] if "/" in t.id else None)
        queries.append({"id": t.id, "reference": t.reference, "text": t.text, "group": group, "targets": list(t.targets),
                        "hits": [[gallery[j], s] for j, s in zip(row, sc)]})
    scored = [qq for qq in queries if qq["targets"]]

    ks = [k for k in (1, 5, 10) if k <= a.k]

    def recall(qs):
        if not qs:
            return {}
        return recall_at_k([[h[0] for h in x["hits"]] for x in qs], [x["targets"] for x in qs], ks, num_candidates=idx.shape[1])

    for qq in scored:
        groups.setdefault(qq["group"] or "all", []).append(qq)
    group_metrics = {name: {**recall(qs), "queries": len(qs)} for name, qs in groups.items()} if len(groups) > 1 else {}
    captions = ds.captions() if enc.text.get("target_text", "caption") != "none" else {}
    if a.teacher:
        from .teacher import read_reasoning

        reasoning = read_reasoning(a.teacher)
        for qq in queries:
            qq["reasoning"] = reasoning.get(qq["id"], "")
    title = f"csmcir report: {a.dataset} {a.split} ({len(queries)} queries, top {a.k}) - {Path(a.ckpt).name}"
    index = write_report(a.out, queries, ds.load_image, captions, title, recall(scored), group_metrics,
                         thumb_size=a.thumb_size, progress=not a.no_progress)
    print(f"wrote {index} ({len(queries)} queries; open it in a browser)")


def cmd_serve(a) -> None:
    from .report.serve import serve

    serve(a.index, a.ckpt, host="127.0.0.1", port=a.port, device=a.device, k=a.k, max_upload_mb=a.max_upload_mb)


# -- teacher ------------------------------------------------------------------------------------
def cmd_teacher(a) -> None:
    from tqdm import tqdm

    from .captioning import parse_shard, select_ids
    from .teacher import TeacherEncoder, TeacherStore

    shard = parse_shard(a.shard)
    if a.batch_size < 1:
        raise CsmcirError("--batch-size must be at least 1")
    ds = _open_dataset(a.dataset, a.root, a.category)
    if a.gallery:
        items = [(i, i, None) for i in ds.gallery(a.split)]
    else:
        triplets = {t.id: t for t in ds.triplets(a.split)}
        items = [(t.id, t.reference, t.text) for t in triplets.values()]
    items = [items[k] for k in select_ids(list(range(len(items))), shard, a.limit)]
    kind = "gallery" if a.gallery else "query"
    if a.backend == "oracle":
        from .teacher.oracle import ORACLE_MODEL_ID, OracleTeacher

        model_id, mode = ORACLE_MODEL_ID, "oracle"
    else:
        if not a.model:
            raise CsmcirError("--backend mllm needs --model (a local folder or a hub id)")
        model_id, mode = a.model, "fast" if a.gallery else a.mode
    store = TeacherStore(a.out, model=model_id, mode=mode, layer=a.layer, kind=kind, shard=shard[0])
    todo = [x for x in items if x[0] not in store.done]
    if a.backend == "oracle":
        enc = OracleTeacher(a.root)

        def embed(batch):
            if a.gallery:
                return enc.embed_images([x[0] for x in batch]), None
            return enc.embed_queries([triplets[x[0]] for x in batch])
    else:
        missing = [(i, p) for _, i, _ in todo if not (p := ds.image_path(i)).is_file()]
        if missing:
            raise CsmcirError(f"{len(missing)} images are missing, first: image {missing[0][0]!r} at {missing[0][1]}: image file not found")
        enc = TeacherEncoder(a.model, device=a.device, dtype=a.dtype, layer=a.layer, max_new_tokens=a.max_new_tokens,
                             local_files_only=not a.allow_download)

        def embed(batch):
            emb, reasoning = enc.embed([ds.load_image(i) for _, i, _ in batch], None if a.gallery else [t for _, _, t in batch], mode)
            return emb, reasoning if mode == "full" else None
    bar = tqdm(total=len(todo), unit="item", desc=f"teacher {kind} ({mode})", disable=a.no_progress, dynamic_ncols=True)
    for start in range(0, len(todo), a.batch_size):
        batch = todo[start : start + a.batch_size]
        emb, reasoning = embed(batch)
        store.append([x[0] for x in batch], emb, reasoning)
        bar.update(len(batch))
    bar.close()
    print(json.dumps({"out": str(a.out), "kind": kind, "mode": mode, "model": model_id, "dim": enc.dim, "layer": a.layer,
                      "selected": len(items), "already_done": len(items) - len(todo), "embedded": len(todo)}))


def cmd_teacher_import(a) -> None:
    from .teacher import import_embeddings

    n = import_embeddings(a.out, a.embeddings, a.ids, a.model, kind=a.kind)
    print(json.dumps({"out": str(a.out), "imported": n, "kind": a.kind}))


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

    s = sub.add_parser("synth", help="write the seeded synthetic CIR benchmark in the custom format")
    s.add_argument("--out", required=True, help="output folder (created; must be empty or hold the same benchmark)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--difficulty", default="standard", choices=["easy", "standard", "medium", "hard"], help="default: standard")
    s.add_argument("--workers", type=int, default=2, help="rendering processes (default 2); output is identical for any value")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_synth)

    def common(sp, dataset=True):
        sp.add_argument("--ckpt", required=True, help="checkpoint written by `csmcir fit` (e.g. checkpoints/synthetic/last.ckpt)")
        if dataset:
            sp.add_argument("--dataset", default="custom", choices=DATASETS, help="custom (default; the synthetic benchmark is custom) or a real benchmark in its release layout")
            sp.add_argument("--root", required=True, help="dataset folder")
            sp.add_argument("--split", default="test", help="split name (default test)")
            sp.add_argument("--category", choices=list(FASHIONIQ_CATEGORIES), help="FashionIQ category")
            sp.add_argument("--captions", help="a real benchmark's caption file (default ROOT/captions.jsonl)")
        sp.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
        sp.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")

    s = sub.add_parser("index", help="embed a gallery (image + caption) into a faiss index with ids beside it")
    common(s)
    s.add_argument("--out", required=True, help="index folder to write (index.faiss, ids.txt, index_info.json, captions.jsonl)")
    s.add_argument("--index-type", default="flat", choices=["flat", "ivf_flat", "ivf_pq", "hnsw", "auto"],  # = retrieval.index.INDEX_KINDS (tested)
                   help="flat = exact inner product (default); ivf_flat = approximate, for large galleries; ivf_pq = "
                        "approximate and 16x smaller; hnsw = graph index; auto = flat up to 200k images, ivf_flat above "
                        "(docs/benchmarks.md, 'Retrieval at scale')")
    s.add_argument("--embeddings", help="folder written by `csmcir embed` (sharded, multi-process): index its "
                                         "embeddings instead of embedding the gallery here")
    s.add_argument("--nprobe", type=int, help="ivf kinds: cells searched per query (default 16; more = slower, closer to exact)")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser(
        "embed",
        help="embed a split's gallery with Lightning predict on any number of processes/GPUs/nodes, as shards",
        description="Writes part-*.safetensors shards (embeddings + ids) and store.json into --out; every rank "
                    "writes its own batches. Scale with --devices/--num-nodes/--strategy, or launch under torchrun "
                    "or SLURM (Lightning detects them). Rerun to resume a killed run. Then "
                    "`csmcir index --embeddings OUT ...` merges the shards into one index.")
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
                    "another job holds the cores.")
    s.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="gallery sizes (default 10k 100k 1M)")
    s.add_argument("--dim", type=int, default=256, help="embedding dimension (default 256, the BLIP-2 projection)")
    s.add_argument("--queries", type=int, default=1000, help="queries (default 1000)")
    s.add_argument("-k", type=int, default=50, help="neighbours per query; recall@k is measured (default 50)")
    s.add_argument("--batch", type=int, default=1000, help="queries per search call (default 1000; batch 1 is measured too)")
    s.add_argument("--kinds", nargs="+", default=["torch", "flat", "ivf_flat", "ivf_pq", "hnsw"],
                   choices=["torch", "flat", "ivf_flat", "ivf_pq", "hnsw"], help="what to measure (default all)")
    s.add_argument("--data", default="clustered", choices=["clustered", "uniform"],
                   help="synthetic embeddings: clustered (default; queries have near neighbours) or uniform (worst case)")
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
                    "runs in its own process so peak memory is its own. Writes bench_efficiency.{json,md,png} to --out.")
    s.add_argument("--students", nargs="*", default=["tiny", "small"], help="csmcir model configs (default tiny small; base = BLIP-2 size)")
    s.add_argument("--mllms", nargs="*", default=["tiny"], help="Qwen2.5-VL sizes: tiny, 3b, 7b (default tiny)")
    s.add_argument("--new-tokens", type=int, default=64, help="full mode: generated reasoning tokens (default 64)")
    s.add_argument("--sides", nargs="+", default=["query", "gallery"], choices=["query", "gallery"])
    s.add_argument("--repeats", type=int, default=10, help="batch-1 calls timed per model (default 10; p50/p95 over them)")
    s.add_argument("--batch", type=int, default=8, help="batch size of the throughput measurement (default 8)")
    s.add_argument("--mllm-image-size", type=int, default=448, help="MLLM input side in pixels (default 448: 256 visual tokens)")
    s.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda")
    s.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16")
    s.add_argument("--accuracy", nargs="*", default=[], metavar="NAME=R@1",
                   help="accuracy figures to plot cost against, e.g. student:small=51.1 (names as in the table)")
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
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("rank", help="rank a split's gallery for every query; writes {query id: [gallery ids]}")
    common(s)
    s.add_argument("--out", required=True, help="rankings JSON file to write")
    s.add_argument("--k", type=int, default=50, help="ranked ids kept per query (default 50)")
    s.set_defaults(func=cmd_rank)

    def benchmark_args(sp, split_help, root_note="", category_help=None, datasets=("fashioniq", "cirr", "circo", "shoes")):
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
    benchmark_args(s, "fashioniq: val; cirr: val; circo: val; shoes: test", " (images not needed)",
                   "FashionIQ category; without it all three are scored and averaged (keys '<category>/<id>')")
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
    benchmark_args(s, "fashioniq: train|val|test; cirr: train|val|test1; circo: val|test; shoes: train|test", "",
                   "FashionIQ category; without it all three")
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
    benchmark_args(s, "cirr: test1; circo: test", "", category_help=None, datasets=["cirr", "circo"])
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--rankings", help="rankings JSON (e.g. `csmcir rank` output, deep enough for CIRR's image sets)")
    source.add_argument("--ckpt", help="rank with this checkpoint instead (the whole gallery for CIRR)")
    s.add_argument("--captions", help="caption file for the checkpoint's target side (default ROOT/captions.jsonl)")
    s.add_argument("--device", default="auto", help="with --ckpt: auto, cpu, cuda, ...")
    s.add_argument("--batch-size", type=int, default=256, help="with --ckpt: images per forward pass")
    s.add_argument("--out", required=True, help="folder for the submission files")
    s.add_argument("--name", default="csmcir", help="suffix of the file names (default csmcir)")
    s.set_defaults(func=cmd_submit)
    def mllm_job_args(sp, unit: str, shards_then: str):
        """What the long MLLM jobs (caption, teacher) share: data, device, batching, sharding."""
        sp.add_argument("--dataset", default="custom", choices=DATASETS, help="custom (default; the synthetic benchmark is custom) or a real benchmark")
        sp.add_argument("--root", required=True, help="dataset folder")
        sp.add_argument("--category", choices=list(FASHIONIQ_CATEGORIES), help="FashionIQ category (default: all three)")
        sp.add_argument("--batch-size", type=int, default=8, help=f"{unit} per forward or generate call (default 8)")
        sp.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
        sp.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
        sp.add_argument("--limit", type=int, help=f"only the first N {unit} of this shard")
        sp.add_argument("--shard", help=f"i/n: every n-th of the {unit} from position i (run n processes, {shards_then})")
        sp.add_argument("--allow-download", action="store_true", help="let transformers fetch --model from the hub (default: local files only)")
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
    s.add_argument("--backend", default="transformers", choices=["transformers", "synthetic"],
                   help="transformers (an MLLM; default) or synthetic (the synthetic benchmark's scene captioner)")
    s.add_argument("--model", help="transformers backend: local folder or hub id of an image-text-to-text MLLM")
    s.add_argument("--template", help="prompt template: natural, fashion or a YAML file (default: fashion for fashioniq/shoes, else natural)")
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
    s.add_argument("--backend", default="mllm", choices=["mllm", "oracle"],
                   help="mllm (default): a transformers MLLM; oracle: the synthetic benchmark's reasoning oracle + MiniLM, "
                        "a STAND-IN for a real CIR-CoT model (see csmcir/teacher/oracle.py)")
    s.add_argument("--model", help="mllm backend: local folder or hub id of an image-text-to-text MLLM")
    s.add_argument("--mode", default="fast", choices=["fast", "full"], help="fast (default): <emb> right away; full: reason first")
    s.add_argument("--gallery", action="store_true", help="embed the split's gallery images instead of its queries")
    s.add_argument("--layer", type=int, default=-1, help="hidden state to read (default -1, the last layer)")
    s.add_argument("--max-new-tokens", type=int, default=128, help="full mode: reasoning length limit (default 128)")
    s.add_argument("--out", required=True, help="store folder to create or resume")
    s.set_defaults(func=cmd_teacher)

    s = sub.add_parser("teacher-import", help="import teacher embeddings computed elsewhere into a store folder",
                       description="From a .safetensors file (tensor 'embeddings' [N, dim], metadata 'ids' = JSON list) "
                                   "or an .npy array [N, dim] with --ids (a text file, one id a line).")
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
