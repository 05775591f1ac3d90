#!/usr/bin/env python
"""The real user's path at real sizes, with random weights: time, peak memory and output sizes.

    python tools/real_user_path.py --work /tmp/rup                 # BLIP-2 ViT-g sizes (slow, GBs)
    python tools/real_user_path.py --work /tmp/rup --size tiny     # the same path on a tiny BLIP-2

What a new user following the README does, step by step, each CLI command in its own process so
that its peak memory is its own (``os.wait4``'s ``ru_maxrss`` of that child):

1. ``blip2``: a ``transformers.Blip2ForImageTextRetrieval`` of the Salesforce/blip2-itm-vit-g
   sizes (``--size tiny``: a small one), random weights, ``save_pretrained`` into
   ``WORK/blip2-itm-vit-g`` (skipped when a folder of the same sizes is there).
2. ``cirr root``: a CIRR root in the release layout (``WORK/cirr``) cut from the real annotation
   files (``--annotations``, default ``../shared/benchmarks/cirr``): the first ``--val`` /
   ``--test1`` queries of val / test1 and ``--train`` train queries, a placeholder PNG for every
   image they need (reference, targets, image-set members), and cut ``cap.rc2.<split>.json`` /
   ``split.rc2.<split>.json`` files. The gallery is the images of the cut split files; val's and
   test1's are padded with further images of the real split file up to ``--min-gallery`` (default
   51, what ``submit`` needs for CIRR; 0 = only the images the queries need). Without
   ``cap.rc2.train.json`` (the shared copy has none) the train queries are val queries after the
   first ``--val``, their images renamed onto train image names (image sets kept).
3. ``fit`` (configs/cirr.yaml + configs/blip2.yaml, the BLIP-2 folder as ``model.net.init.path``,
   image-only targets, ``--steps`` steps, the feature cache in ``WORK/cache``), ``rank`` (val),
   ``evaluate`` (val, the official protocol), ``submit`` (test1, from the checkpoint), ``index``
   (val gallery) and ``search`` (one val reference image and its text).

A failed step is reported with the last line of its stderr; the rest still run and the script
exits 1 at the end. Prints a markdown table and writes it and a JSON of every number (and the
machine) to ``--out`` (default ``WORK/real_user_path.md`` / ``.json``). Logs of each step:
``WORK/logs/<step>.out|.err``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ANNOTATIONS = Path(os.environ.get("CSMCIR_SHARED", REPO.parent / "shared")) / "benchmarks" / "cirr"
MODEL_DIR = "blip2-itm-vit-g"

# Blip2Config keyword arguments (transformers), per --size
BLIP2_SIZES = {
    "real": dict(  # Salesforce/blip2-itm-vit-g
        vision_config=dict(
            hidden_size=1408, num_hidden_layers=39, num_attention_heads=16, intermediate_size=6144, image_size=224, patch_size=14
        ),
        qformer_config=dict(
            vocab_size=30523,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            cross_attention_frequency=2,
            use_qformer_text_input=True,
        ),
        num_query_tokens=32,
        image_text_hidden_size=256,
    ),
    "tiny": dict(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14),
        qformer_config=dict(
            vocab_size=30523,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            cross_attention_frequency=1,
            use_qformer_text_input=True,
        ),
        num_query_tokens=4,
        image_text_hidden_size=16,
    ),
}


# ------------------------------------------------------------------------------ step 1: BLIP-2


def _same_sizes(folder: Path, size: str) -> bool:
    """Whether ``folder`` holds a saved model of ``size``'s sizes (config.json and weights)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    want = BLIP2_SIZES[size]
    for section in ("vision_config", "qformer_config"):
        got = cfg.get(section) or {}
        if any(got.get(k) != v for k, v in want[section].items()):
            return False
    if any(cfg.get(k) != want[k] for k in ("num_query_tokens", "image_text_hidden_size")):
        return False
    return any(folder.glob("*.safetensors"))


def build_blip2(size: str, folder: Path) -> None:
    """Random-weight Blip2ForImageTextRetrieval of ``size``, saved with save_pretrained (run as a
    child process: ``python tools/real_user_path.py _build-blip2 SIZE FOLDER``)."""
    import torch
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(Blip2Config(**BLIP2_SIZES[size])).eval()
    n = sum(p.numel() for p in model.parameters())
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    print(f"saved a random Blip2ForImageTextRetrieval ({size}, {n / 1e6:.1f}M parameters) to {folder}")


# --------------------------------------------------------------------------- step 2: CIRR root


def placeholder_png(name: str, side: int = 8) -> bytes:
    """A small solid-colour PNG (the colour from the name), written with the standard library."""
    r, g, b = hashlib.sha1(name.encode()).digest()[:3]
    rows = b"".join(b"\x00" + bytes((r, g, b)) * side for _ in range(side))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _entry_images(e: dict) -> list[str]:
    names = [e["reference"], *e["img_set"]["members"]]
    if "target_hard" in e:
        names.append(e["target_hard"])
    names += list(e.get("target_soft") or {})
    return list(dict.fromkeys(names))


def _rename_entry(e: dict, new: dict[str, str]) -> dict:
    e = json.loads(json.dumps(e))
    e["reference"] = new[e["reference"]]
    e["img_set"]["members"] = [new[m] for m in e["img_set"]["members"]]
    if "target_hard" in e:
        e["target_hard"] = new[e["target_hard"]]
    if "target_soft" in e:
        e["target_soft"] = {new[k]: v for k, v in e["target_soft"].items()}
    return e


def make_cirr_root(src: Path, root: Path, counts: dict[str, int], min_gallery: int) -> dict:
    """Write the cut CIRR root; returns, per split, its queries, gallery and placeholder images."""
    caps = src / "captions"
    splits = src / "image_splits"
    val_entries = json.loads((caps / "cap.rc2.val.json").read_text())
    entries = {"val": val_entries[: counts["val"]], "test1": json.loads((caps / "cap.rc2.test1.json").read_text())[: counts["test1"]]}
    train_note = "the first entries of cap.rc2.train.json"
    if (caps / "cap.rc2.train.json").is_file():
        entries["train"] = json.loads((caps / "cap.rc2.train.json").read_text())[: counts["train"]]
    else:  # rename val queries onto train image names, in the train split file's order
        pool = iter(json.loads((splits / "split.rc2.train.json").read_text()))
        taken = val_entries[counts["val"] : counts["val"] + counts["train"]]
        if len(taken) < counts["train"]:
            raise SystemExit(f"error: --train {counts['train']}: only {len(taken)} val entries are left to stand in for train queries")
        new: dict[str, str] = {}
        for e in taken:
            for name in _entry_images(e):
                if name not in new:
                    new[name] = next(pool)
        entries["train"] = [_rename_entry(e, new) for e in taken]
        train_note = f"val entries {counts['val']}..{counts['val'] + counts['train'] - 1} renamed onto train images (no cap.rc2.train.json in {caps})"
    shutil.rmtree(root, ignore_errors=True)
    (root / "cirr" / "captions").mkdir(parents=True)
    (root / "cirr" / "image_splits").mkdir(parents=True)
    info = {}
    for split in ("train", "val", "test1"):
        full = json.loads((splits / f"split.rc2.{split}.json").read_text())
        need = list(dict.fromkeys(n for e in entries[split] for n in _entry_images(e)))
        missing = [n for n in need if n not in full]
        if missing:
            raise SystemExit(f"error: {split}: image {missing[0]!r} of the cut queries is not in split.rc2.{split}.json")
        names = list(need)
        if split != "train" and len(names) < min_gallery:
            names += [n for n in full if n not in set(need)][: min_gallery - len(names)]
        cut = {n: full[n] for n in names}
        (root / "cirr" / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(entries[split], indent=1))
        (root / "cirr" / "image_splits" / f"split.rc2.{split}.json").write_text(json.dumps(cut, indent=1))
        for n, rel in cut.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(placeholder_png(n))
        info[split] = {"queries": len(entries[split]), "gallery": len(cut), "images_the_queries_need": len(need)}
    info["train"]["source"] = train_note
    return info


def check_cirr_root(root: Path) -> dict:
    """The cut root read back by the package's loader (what fit and rank will read)."""
    from csmcir.data.benchmarks import load_benchmark

    out = {}
    for split in ("train", "val", "test1"):
        b = load_benchmark("cirr", root, split)
        missing = [g for g in b.gallery if not b.image_path(g).is_file()]
        if missing:
            raise SystemExit(f"error: {split}: no placeholder for {missing[0]!r}")
        out[split] = {"queries": len(b.queries), "gallery": len(b.gallery)}
    return out


# -------------------------------------------------------------------------------- step 3: CLI


def _snapshot(work: Path, skip: set[Path]) -> dict[str, tuple[int, int]]:
    files = {}
    for dirpath, dirnames, filenames in os.walk(work):
        d = Path(dirpath)
        dirnames[:] = [x for x in dirnames if d / x not in skip]
        for f in filenames:
            p = d / f
            try:
                st = p.stat()
            except OSError:
                continue
            files[str(p.relative_to(work))] = (st.st_size, st.st_mtime_ns)
    return files


def _tree_size(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def _last_line(path: Path) -> str:
    lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1] if lines else ""


def run_step(name: str, cmd: list[str], work: Path, outputs: dict[str, Path] | None = None, env: dict | None = None) -> dict:
    """Run ``cmd`` as a child process: wall seconds, its own peak RSS, what it wrote under ``work``
    (new or changed files), the sizes of its named ``outputs`` (else of its stdout), and on failure
    its stderr's last line."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    slug = name.replace(" ", "_")
    out_log, err_log = logs / f"{slug}.out", logs / f"{slug}.err"
    before = _snapshot(work, {logs})
    t0 = time.perf_counter()
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    after = _snapshot(work, {logs})
    written = {k: v[0] for k, v in after.items() if before.get(k) != v}
    rc = p.returncode
    step = {
        "step": name,
        "command": [str(c) for c in cmd],
        "ok": rc == 0,
        "returncode": rc,
        "wall_s": round(wall, 3),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "user_cpu_s": round(usage.ru_utime, 3),
        "system_cpu_s": round(usage.ru_stime, 3),
        # a step that writes no file of its own (evaluate, search) answers on stdout
        "outputs": {k: _tree_size(v) for k, v in outputs.items()} if outputs else {"stdout": out_log.stat().st_size},
        "written_bytes": sum(written.values()),
        "written_files": len(written),
        "written": dict(sorted(written.items(), key=lambda kv: -kv[1])[:40]),  # the 40 largest
        "stdout_log": str(out_log),
        "stderr_log": str(err_log),
        "stdout_tail": out_log.read_text(errors="replace")[-2000:],
    }
    if rc != 0:
        step["error"] = _last_line(err_log) or f"exit status {rc}, no stderr"
    return step


def _mib(n: int | None) -> str:
    if n is None:
        return "missing"
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def markdown_table(steps: list[dict]) -> str:
    rows = ["| step | status | wall s | peak RSS MiB | output size |", "|---|---|---:|---:|---|"]
    for s in steps:
        sizes = ", ".join(f"{k} {_mib(v)}" for k, v in s.get("outputs", {}).items())
        if "written_bytes" in s:
            sizes = (sizes + "; " if sizes else "") + f"wrote {_mib(s['written_bytes'])} in {s['written_files']} files"
        if s.get("skipped"):
            sizes += " (already there: skipped)"
        status = "ok" if s["ok"] else "FAILED: " + s.get("error", "").replace("|", "\\|")
        rss = f"{s['peak_rss_mib']:.0f}" if s.get("peak_rss_mib") is not None else "-"
        rows.append(f"| {s['step']} | {status} | {s['wall_s']:.1f} | {rss} | {sizes} |")
    return "\n".join(rows)


def machine_info() -> dict:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_build-blip2"]:
        build_blip2(argv[1], Path(argv[2]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, type=Path, help="working folder (model, CIRR root, run, cache, outputs, logs)")
    p.add_argument("--size", default="real", choices=sorted(BLIP2_SIZES), help="real = Salesforce/blip2-itm-vit-g sizes (default); tiny")
    p.add_argument("--annotations", type=Path, default=DEFAULT_ANNOTATIONS, help=f"CIRR annotation folder (default {DEFAULT_ANNOTATIONS})")
    p.add_argument("--train", type=int, default=60, help="train queries (default 60)")
    p.add_argument("--val", type=int, default=32, help="val queries (default 32)")
    p.add_argument("--test1", type=int, default=16, help="test1 queries (default 16)")
    p.add_argument(
        "--min-gallery", type=int, default=51, help="pad the val and test1 galleries to this many images (default 51; 0 = no padding)"
    )
    p.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    p.add_argument("--batch-size", type=int, default=4, help="training batch size (default 4)")
    p.add_argument(
        "--precision",
        default="32-true",
        choices=["32-true", "bf16-mixed"],
        help="fit precision (default 32-true); bf16-mixed also ranks in bfloat16",
    )
    p.add_argument("--out", type=Path, help="report path without suffix (default WORK/real_user_path -> .md and .json)")
    a = p.parse_args(argv)

    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = (a.out or work / "real_user_path").resolve()
    if out.suffix in (".md", ".json"):
        out = out.with_suffix("")
    model, root, run, cache, res = work / MODEL_DIR, work / "cirr", work / "run", work / "cache", work / "outputs"
    for stale in (run, cache, res, work / "logs"):  # a fresh measurement each time (the model is kept)
        shutil.rmtree(stale, ignore_errors=True)
    res.mkdir()
    py = [sys.executable]
    cli = [*py, "-m", "csmcir.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    steps: list[dict] = []
    report: dict = {"size": a.size, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, "steps": steps}

    # 1. the BLIP-2 folder
    if _same_sizes(model, a.size):
        steps.append(
            {
                "step": "blip2 model",
                "ok": True,
                "skipped": True,
                "wall_s": 0.0,
                "peak_rss_mib": None,
                "outputs": {MODEL_DIR: _tree_size(model)},
            }
        )
    else:
        steps.append(
            run_step("blip2 model", [*py, str(Path(__file__).resolve()), "_build-blip2", a.size, str(model)], work, {MODEL_DIR: model}, env)
        )

    # 2. the cut CIRR root (in this process: file copying only)
    t0 = time.perf_counter()
    try:
        counts = make_cirr_root(a.annotations, root, {"train": a.train, "val": a.val, "test1": a.test1}, a.min_gallery)
        counts["read_back"] = check_cirr_root(root)
        steps.append(
            {
                "step": "cirr root",
                "ok": True,
                "wall_s": round(time.perf_counter() - t0, 3),
                "peak_rss_mib": None,
                "outputs": {"cirr": _tree_size(root)},
            }
        )
        report["cirr"] = counts
    except (SystemExit, OSError, ValueError, KeyError) as e:
        steps.append(
            {"step": "cirr root", "ok": False, "error": str(e), "wall_s": round(time.perf_counter() - t0, 3), "peak_rss_mib": None}
        )
        counts = None
    if counts and counts["test1"]["gallery"] < 51:
        print(
            f"note: the cut test1 gallery has {counts['test1']['gallery']} images; CIRR's submit needs 51 (raise --min-gallery)",
            file=sys.stderr,
        )

    # 3. the CLI, each command a child process
    ckpt = run / "last.ckpt"
    dtype = ["--dtype", "bfloat16"] if a.precision == "bf16-mixed" else []
    data = ["--dataset", "cirr", "--root", str(root)]
    fit = [
        *cli,
        "fit",
        "--config",
        str(REPO / "configs" / "cirr.yaml"),
        "--config",
        str(REPO / "configs" / "blip2.yaml"),
        "--model.net.init.path",
        str(model),
        "--data.root",
        str(root),
        "--data.target_text",
        "none",
        "--trainer.max_steps",
        str(a.steps),
        "--data.batch_size",
        str(a.batch_size),
        "--trainer.precision",
        a.precision,
        "--trainer.default_root_dir",
        str(run),
        "--model.feature_cache",
        str(cache),
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
    ]
    steps.append(run_step("fit", fit, work, {"last.ckpt": ckpt, "run": run, "cache": cache}, env))
    fit_step = steps[-1]
    stats = run / "train_stats.json"
    if stats.is_file():
        fit_step["train_stats"] = json.loads(stats.read_text())
    fit_step["checkpoints"] = {str(c.relative_to(run)): c.stat().st_size for c in sorted(run.glob("*.ckpt"))}
    # images whose frozen-tower features the fit cached (what rank/index read instead of the ViT)
    fit_step["cached_images"] = {str(f.relative_to(cache)): len(f.read_text().split()) for f in sorted(cache.rglob("*.ids.txt"))}

    rankings = res / "rankings.val.json"
    steps.append(
        run_step(
            "rank",
            [*cli, "rank", *data, "--split", "val", "--ckpt", str(ckpt), "--out", str(rankings), "--device", "cpu", *dtype],
            work,
            {"rankings": rankings},
            env,
        )
    )
    steps.append(run_step("evaluate", [*cli, "evaluate", *data, "--split", "val", "--rankings", str(rankings)], work, None, env))
    if steps[-1]["ok"]:
        try:
            steps[-1]["metrics"] = json.loads(steps[-1]["stdout_tail"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            pass
    sub = res / "submission"
    steps.append(
        run_step(
            "submit",
            [*cli, "submit", *data, "--split", "test1", "--ckpt", str(ckpt), "--out", str(sub), "--device", "cpu", *dtype],
            work,
            {"submission": sub},
            env,
        )
    )
    index = res / "index.val"
    steps.append(
        run_step(
            "index",
            [*cli, "index", *data, "--split", "val", "--ckpt", str(ckpt), "--out", str(index), "--device", "cpu", *dtype],
            work,
            {"index": index},
            env,
        )
    )
    first = json.loads((root / "cirr" / "captions" / "cap.rc2.val.json").read_text())[0] if counts else None
    image = (
        root / json.loads((root / "cirr" / "image_splits" / "split.rc2.val.json").read_text())[first["reference"]]
        if first
        else root / "missing.png"
    )
    text = first["caption"] if first else "make it red"
    steps.append(
        run_step(
            "search",
            [
                *cli,
                "search",
                "--ckpt",
                str(ckpt),
                "--index",
                str(index),
                "--image",
                str(image),
                "--text",
                text,
                "-k",
                "5",
                "--json",
                "--device",
                "cpu",
                *dtype,
            ],
            work,
            None,
            env,
        )
    )
    if steps[-1]["ok"]:
        try:
            steps[-1]["hits"] = len(json.loads(steps[-1]["stdout_tail"]))
        except ValueError:
            pass
    for s in steps:  # what each inference step wrote into the fit's feature cache (0: it only read it)
        if "written" in s and s["step"] != "fit":
            s["cache_bytes_written"] = sum(v for k, v in s["written"].items() if k.startswith("cache" + os.sep))

    report["machine"] = machine_info()
    report["failed"] = [s["step"] for s in steps if not s["ok"]]
    table = markdown_table(steps)
    m = report["machine"]
    head = (
        f"# csmcir real user's path ({a.size} BLIP-2, random weights, {a.precision})\n\n"
        f"{m['date']}, {m['cpus_usable']} CPUs ({m['cpu_count']} on the machine), torch {m['torch']} with {m['torch_threads']} threads; "
        f"CIRR cut to {a.train} train / {a.val} val / {a.test1} test1 queries"
        + (f" (galleries: val {counts['val']['gallery']}, test1 {counts['test1']['gallery']} images)" if counts else "")
        + f", {a.steps} training steps of batch {a.batch_size}.\n\n"
    )
    md = head + table + "\n"
    if report["failed"]:
        md += "\nFailed: " + "; ".join(f"{s['step']}: {s.get('error', '')}" for s in steps if not s["ok"]) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(table)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    if report["failed"]:
        print("failed steps: " + ", ".join(report["failed"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
