"""``csmcir bench efficiency``: what one query and one gallery image cost, csmcir against a full MLLM.

Candidates, all with random weights (cost does not depend on weight values; nothing is downloaded):

* ``student:<config>``: the csmcir dual tower of ``csmcir/model_configs/<config>.json`` (vision
  tower + Q-Former), through :class:`csmcir.inference.Encoder`, the code ``csmcir index`` / ``rank``
  run. ``base`` is the BLIP-2 size (EVA ViT-g/14 at 224 px, a 12-layer BERT-base Q-Former, 32
  queries, 256-d). Query = (reference image, modification text); gallery = (image, final caption):
  the same function, so the two sides differ only in text length.
* ``mllm:<size>``: a Qwen2.5-VL of that size (``tiny``; ``3b`` / ``7b`` = the public
  Qwen2.5-VL-3B/7B-Instruct configurations) through :class:`csmcir.teacher.TeacherEncoder`, the
  code ``csmcir teacher`` runs: ``fast`` mode (the prompt, then the ``<emb>`` token's hidden state)
  and ``full`` mode (``new_tokens`` of generated reasoning first, then ``<emb>``). Gallery images
  are embedded in fast mode, as ``csmcir teacher --gallery`` does.

Per candidate, side and mode: latency p50/p95 over ``repeats`` batch-1 calls, throughput at
``batch``, peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, so each
candidate runs in its own process unless ``isolate=False``), parameters, and FLOPs per item
counted by :class:`torch.utils.flop_counter.FlopCounterMode` on one batch-1 call (matrix products
and attention; elementwise work is not counted). Random weights seldom emit the end token; full
mode is held to exactly ``new_tokens`` tokens (``min_new_tokens``) so runs are comparable.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CsmcirError

__all__ = ["EfficiencySettings", "run_efficiency_bench", "markdown_table", "write_outputs", "system_costs", "read_accuracy"]

QUERY_TEXT = "make the dress red and sleeveless, with a thin belt and a floral print"
# a final MCoT caption of typical length (the target side of the symmetric tower)
GALLERY_CAPTION = (
    "a knee-length red sleeveless dress with a thin black belt at the waist, a small white floral "
    "print, a round neckline and a flared skirt, photographed on a plain light background"
)
MLLM_SIZES = ("tiny", "3b", "7b")
# OSrCIR's retriever: a CLIP dual encoder. b16 / l14 = the public openai/clip-vit-base-patch16 and
# clip-vit-large-patch14 configurations (text 512/768 wide x 12 layers; vision ViT-B/16, ViT-L/14 at 224)
CLIP_SIZES = {
    "tiny": ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
             {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}, 16),
    "b16": ({"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
            {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224, "patch_size": 16}, 512),
    "l14": ({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
            {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224, "patch_size": 14}, 768),
}  # fmt: skip


@dataclass
class EfficiencySettings:
    students: tuple[str, ...] = ("tiny", "small")
    mllms: tuple[str, ...] = ("tiny",)
    clips: tuple[str, ...] = ()
    new_tokens: int = 64
    device: str = "auto"
    dtype: str = "auto"
    repeats: int = 10
    batch: int = 8
    mllm_image_size: int = 448
    sides: tuple[str, ...] = ("query", "gallery")
    accuracy: dict = field(default_factory=dict)  # per model row: {"student:small": 51.1}
    system_accuracy: dict | None = None  # per system, with sources (:func:`read_accuracy`)
    isolate: bool = True


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _peak_memory(device: str) -> dict:
    import torch

    if device.startswith("cuda"):
        return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "peak_mem_kind": "cuda max_memory_allocated"}
    return {"peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_mem_kind": "process peak RSS"}


def _measure(call_1, call_b, batch: int, repeats: int, device: str) -> dict:
    """Time ``call_1()`` (one item) ``repeats`` times after a FLOP-counted warm-up, and ``call_b()``
    (``batch`` items) until 3 calls or 1/3 of the batch-1 time have passed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    counter = FlopCounterMode(display=False)
    with counter:
        call_1()
    sync()
    flops = int(counter.get_total_flops())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call_1()
        sync()
        times.append(time.perf_counter() - t)
    call_b()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < 3 or (time.perf_counter() - t0 < sum(times) / 3 and n < 50):
        call_b()
        sync()
        n += 1
    per_s = n * batch / (time.perf_counter() - t0)
    return {
        "p50_ms": 1000 * statistics.median(times),
        "p95_ms": 1000 * _percentile(times, 95),
        "repeats": repeats,
        "throughput_per_s": per_s,
        "batch": batch,
        "gflops": flops / 1e9,
    }


def _random_images(n: int, side: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def measure_student(name: str, cfg: EfficiencySettings) -> list[dict]:
    import torch

    from ..config import TextConfig
    from ..factory import create_model
    from ..inference import Encoder, resolve_device

    dev = resolve_device(cfg.device)
    dtype = _dtype(cfg.dtype, str(dev))
    torch.manual_seed(0)
    model = create_model(name).to(dev, dtype=dtype).eval()
    mc = model.cfg
    enc = Encoder(model, TextConfig.from_dict(None, mc), dev)  # the model config's tokenizer and length
    side = mc.vision.image_size
    imgs = _random_images(cfg.batch, side)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for s in cfg.sides:
        text = QUERY_TEXT if s == "query" else GALLERY_CAPTION
        m = _measure(lambda: enc.encode(imgs[:1], [text]), lambda: enc.encode(imgs, [text] * cfg.batch), cfg.batch, cfg.repeats, str(dev))
        rows.append(
            {
                "model": f"student:{name}",
                "family": "csmcir",
                "side": s,
                "mode": "encode",
                "params_m": params / 1e6,
                "device": str(dev),
                "dtype": str(dtype).replace("torch.", ""),
                "image_px": side,
                **m,
                **_peak_memory(str(dev)),
            }
        )
    return rows


def _dtype(name: str, device: str):
    from ..devices import resolve_dtype

    return resolve_dtype(name, device)


def measure_mllm(size: str, cfg: EfficiencySettings) -> list[dict]:
    from ..inference import resolve_device
    from ..teacher.extract import TeacherEncoder
    from ..testing.tiny_mllm import QWEN25_VL_SIZES, build_qwen2vl

    if size not in MLLM_SIZES:
        raise CsmcirError(f"unknown MLLM size {size!r}: choose one of {', '.join(MLLM_SIZES)}")
    dev = str(resolve_device(cfg.device))
    dtype = _dtype(cfg.dtype, dev)
    px = cfg.mllm_image_size * cfg.mllm_image_size
    sizes = {} if size == "tiny" else QWEN25_VL_SIZES[size]
    processor, net = build_qwen2vl("qwen2_5_vl", min_pixels=px, max_pixels=px, dtype=dtype, **sizes)
    net.to(dev, dtype=dtype).eval()
    processor.tokenizer.padding_side = "left"
    net.generation_config.min_new_tokens = cfg.new_tokens  # random weights: every answer exactly new_tokens long
    teacher = TeacherEncoder.from_loaded(processor, net, f"qwen2.5-vl-{size} (random weights)", max_new_tokens=cfg.new_tokens)
    params = sum(p.numel() for p in net.parameters())
    imgs = _random_images(cfg.batch, cfg.mllm_image_size)
    rows = []
    plan = [(s, mode) for s in cfg.sides for mode in (("fast", "full") if s == "query" else ("fast",))]
    for s, mode in plan:
        texts = (lambda n: [QUERY_TEXT] * n) if s == "query" else (lambda n: None)
        repeats = cfg.repeats if mode == "fast" or size == "tiny" else max(2, cfg.repeats // 3)
        m = _measure(
            lambda: teacher.embed(imgs[:1], texts(1), mode), lambda: teacher.embed(imgs, texts(cfg.batch), mode), cfg.batch, repeats, dev
        )
        rows.append(
            {
                "model": f"mllm:{size}",
                "family": "mllm",
                "side": s,
                "mode": mode,
                "params_m": params / 1e6,
                "device": dev,
                "dtype": str(dtype).replace("torch.", ""),
                "image_px": cfg.mllm_image_size,
                "new_tokens": cfg.new_tokens if mode == "full" else 0,
                **m,
                **_peak_memory(dev),
            }
        )
    return rows


def measure_clip(size: str, cfg: EfficiencySettings) -> list[dict]:
    """OSrCIR's retrieval step: a CLIP text tower on one target description (query side) and its
    image tower on one gallery image, random weights of the public sizes (:data:`CLIP_SIZES`)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from ..inference import resolve_device

    if size not in CLIP_SIZES:
        raise CsmcirError(f"unknown CLIP size {size!r}: choose one of {', '.join(CLIP_SIZES)}")
    dev = str(resolve_device(cfg.device))
    dtype = _dtype(cfg.dtype, dev)
    text, vision, proj = CLIP_SIZES[size]
    torch.manual_seed(0)
    net = (
        CLIPModel(CLIPConfig(text_config={**text, "vocab_size": 49408}, vision_config=vision, projection_dim=proj))
        .to(dev, dtype=dtype)
        .eval()
    )
    params = sum(p.numel() for p in net.parameters())
    side = vision["image_size"]
    g = torch.Generator().manual_seed(0)
    px = torch.randn(cfg.batch, 3, side, side, generator=g).to(dev, dtype)
    ids = torch.randint(0, 49407, (cfg.batch, 32), generator=g).to(dev)  # a target description: 32 tokens
    rows = []
    for s in cfg.sides:
        if s == "query":
            one, many, mode = (lambda: net.get_text_features(input_ids=ids[:1])), (lambda: net.get_text_features(input_ids=ids)), "text"
        else:
            one, many, mode = (
                (lambda: net.get_image_features(pixel_values=px[:1])),
                (lambda: net.get_image_features(pixel_values=px)),
                "image",
            )
        with torch.inference_mode():
            m = _measure(one, many, cfg.batch, cfg.repeats, dev)
        rows.append(
            {
                "model": f"clip:{size}",
                "family": "clip",
                "side": s,
                "mode": mode,
                "params_m": params / 1e6,
                "device": dev,
                "dtype": str(dtype).replace("torch.", ""),
                "image_px": side,
                **m,
                **_peak_memory(dev),
            }
        )
    return rows


_MEASURE = {"student": measure_student, "mllm": measure_mllm, "clip": measure_clip}


def _run_job(kind: str, name: str, cfg: EfficiencySettings) -> list[dict]:
    if not cfg.isolate:
        return _MEASURE[kind](name, cfg)
    payload = json.dumps({"kind": kind, "name": name, "cfg": {**asdict(cfg), "isolate": False}})
    proc = subprocess.run([sys.executable, "-m", "csmcir.bench.efficiency", payload], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CsmcirError(f"bench efficiency: measuring {kind}:{name} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_efficiency_bench(cfg: EfficiencySettings, progress: bool = True) -> dict:
    """Measure every candidate (module docstring); returns ``{"machine", "settings", "rows", "ratios"}``."""
    import torch
    from tqdm.auto import tqdm

    for s in cfg.mllms:
        if s not in MLLM_SIZES:
            raise CsmcirError(f"unknown MLLM size {s!r}: choose one of {', '.join(MLLM_SIZES)}")
    for s in cfg.clips:
        if s not in CLIP_SIZES:
            raise CsmcirError(f"unknown CLIP size {s!r}: choose one of {', '.join(CLIP_SIZES)}")
    jobs = [("student", s) for s in cfg.students] + [("mllm", s) for s in cfg.mllms] + [("clip", s) for s in cfg.clips]
    rows: list[dict] = []
    for kind, name in tqdm(jobs, desc="bench efficiency", disable=not progress):
        rows += _run_job(kind, name, cfg)
    for r in rows:
        r["accuracy"] = cfg.accuracy.get(r["model"])
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    result = {"machine": machine, "settings": asdict(cfg), "rows": rows, "ratios": cost_ratios(rows)}
    result["systems"] = system_costs(rows, cfg.system_accuracy)
    result["accuracy"] = cfg.system_accuracy
    return result


def cost_ratios(rows: list[dict]) -> list[dict]:
    """For each (student, MLLM) pair: MLLM cost / student cost per query (fast and full mode) and per
    gallery image, in measured batch-1 latency and in counted FLOPs."""
    out = []
    students = [r for r in rows if r["family"] == "csmcir"]
    for m in sorted({r["model"] for r in rows if r["family"] == "mllm"}):
        for s in sorted({r["model"] for r in students}):
            for side, mode in (("query", "fast"), ("query", "full"), ("gallery", "fast")):
                a = next((r for r in students if r["model"] == s and r["side"] == side), None)
                b = next((r for r in rows if r["model"] == m and r["side"] == side and r["mode"] == mode), None)
                if a and b:
                    out.append(
                        {
                            "student": s,
                            "mllm": m,
                            "side": side,
                            "mllm_mode": mode,
                            "latency_ratio": b["p50_ms"] / a["p50_ms"],
                            "flops_ratio": b["gflops"] / a["gflops"] if a["gflops"] else None,
                            "throughput_ratio": a["throughput_per_s"] / b["throughput_per_s"],
                        }
                    )
    return out


def system_costs(rows: list[dict], accuracy: dict | None = None) -> list[dict]:
    """The retrieval systems the measured rows make up, with what each costs per query and per
    gallery image, and its accuracy where ``accuracy`` gives one.

    * ``csmcir``: the student, query = (reference, text) encode, gallery = (image, caption) encode.
    * ``cir-cot-fast`` / ``cir-cot-full``: the MLLM's ``<emb>`` as the retriever (``csmcir rank
      --teacher``), query in fast or full mode, gallery in fast mode.
    * ``osrcir``: one MLLM generation per query (the reflective answer, as long as full mode's
      ``new_tokens``) plus the CLIP text tower on the description; the CLIP image tower per gallery image.

    ``accuracy``: ``{"metric": "...", "entries": {name: {"value", "source"}}}``, ``name`` a system
    name as in the table (``csmcir student:small``) or its kind (``osrcir``); ``source`` says where
    the figure comes from: ``measured here``, ``stand-in`` or ``published`` (with a reference)."""
    by = {(r["model"], r["side"], r["mode"]): r for r in rows}
    models = lambda fam: sorted({r["model"] for r in rows if r["family"] == fam})  # noqa: E731
    out = []

    def add(name, kind, q_parts, g_parts):
        if any(p is None for p in q_parts + g_parts):
            return
        out.append(
            {
                "system": name,
                "kind": kind,
                "query_p50_ms": sum(p["p50_ms"] for p in q_parts),
                "query_gflops": sum(p["gflops"] for p in q_parts),
                "gallery_p50_ms": sum(p["p50_ms"] for p in g_parts),
                "gallery_gflops": sum(p["gflops"] for p in g_parts),
                "device": q_parts[0]["device"],
            }
        )

    for m in models("csmcir"):
        add(f"csmcir {m}", "csmcir", [by.get((m, "query", "encode"))], [by.get((m, "gallery", "encode"))])
    for m in models("mllm"):
        for mode in ("fast", "full"):
            add(f"CIR-CoT {mode} ({m})", f"cir-cot-{mode}", [by.get((m, "query", mode))], [by.get((m, "gallery", "fast"))])
        for c in models("clip"):
            add(
                f"OSrCIR ({m} + {c})",
                "osrcir",
                [by.get((m, "query", "full")), by.get((c, "query", "text"))],
                [by.get((c, "gallery", "image"))],
            )
    entries = (accuracy or {}).get("entries", {})
    for r in out:
        r["accuracy"] = entries.get(r["system"], entries.get(r["kind"]))
    return out


def read_accuracy(path: str | Path) -> dict:
    """An accuracy file for :func:`system_costs`, checked: ``{"metric": str, "entries": {name:
    {"value": number, "source": "measured here" | "stand-in" | "published", ...}}}``."""
    from ..io import read_json

    data = read_json(Path(path), "accuracy file")
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not isinstance(data.get("metric"), str):
        raise CsmcirError(f'{path}: expected {{"metric": "R@1 ...", "entries": {{name: {{"value": ..., "source": ...}}}}}}')
    for name, e in entries.items():
        if not isinstance(e, dict) or not isinstance(e.get("value"), (int, float)) or e.get("source") not in ACCURACY_SOURCES:
            raise CsmcirError(f"{path}: entry {name!r} needs a numeric value and a source, one of {', '.join(ACCURACY_SOURCES)}")
    return data


ACCURACY_SOURCES = ("measured here", "stand-in", "published")


def markdown_table(result: dict) -> str:
    m = result["machine"]
    head = (
        f"Device: {result['rows'][0]['device'] if result['rows'] else '-'}"
        f"{' (' + m['gpu'] + ')' if m.get('gpu') else ''}; {m['processor']}, {m['cpu_threads']} threads; "
        f"load average at start {m['load_average_1min']}; MLLM full mode generates {result['settings']['new_tokens']} tokens.\n\n"
    )
    lines = [
        "| model | side | mode | params (M) | dtype | p50 ms | p95 ms | items/s @ batch | GFLOPs / item | peak mem GiB |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['side']} | {r['mode']} | {r['params_m']:.1f} | {r['dtype']} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['throughput_per_s']:.3g} @ {r['batch']} | {r['gflops']:.3g} | {r['peak_mem_gib']:.2f} |"
        )
    if result["ratios"]:
        lines += [
            "",
            "| MLLM / student | per | MLLM mode | latency ratio (p50) | FLOPs ratio | throughput ratio |",
            "|---|---|---|---:|---:|---:|",
        ]
        for q in result["ratios"]:
            fr = f"{q['flops_ratio']:.3g}x" if q["flops_ratio"] else "-"
            lines.append(
                f"| {q['mllm']} / {q['student']} | {'query' if q['side'] == 'query' else 'gallery image'} | {q['mllm_mode']} | "
                f"{q['latency_ratio']:.3g}x | {fr} | {q['throughput_ratio']:.3g}x |"
            )
    systems = result.get("systems") or []
    if systems:
        metric = (result.get("accuracy") or {}).get("metric", "accuracy")
        lines += [
            "",
            f"| system | per query ms (p50) | per query GFLOPs | per gallery image ms (p50) | per gallery image GFLOPs | {metric} | source of the accuracy |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in systems:
            acc = r.get("accuracy")
            lines.append(
                f"| {r['system']} | {r['query_p50_ms']:.3g} | {r['query_gflops']:.3g} | {r['gallery_p50_ms']:.3g} | "
                f"{r['gallery_gflops']:.3g} | {'-' if acc is None else format(acc['value'], '.1f')} | "
                f"{'-' if acc is None else acc['source'] + (' (' + acc['note'] + ')' if acc.get('note') else '')} |"
            )
        lines.append("\nCosts: measured here, random weights at the named sizes. Accuracy: as its source column says.")
    return head + "\n".join(lines) + "\n"


def write_outputs(result: dict, out: str | Path) -> list[Path]:
    """``bench_efficiency.json``, ``.md`` and ``.png`` (per-query latency, against accuracy where given)."""
    from . import write_bench_outputs

    return write_bench_outputs(result, out, "bench_efficiency", markdown_table(result), _plot)


def _plot(plt, result: dict):
    systems = [r for r in result.get("systems") or [] if r.get("accuracy") is not None]
    if len(systems) >= 2:  # cost per query and per gallery image against accuracy, marked by source
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        markers = {"measured here": "o", "stand-in": "^", "published": "s"}
        for ax, side in zip(axes, ("query", "gallery")):
            for src, mk in markers.items():
                pts = [r for r in systems if r["accuracy"]["source"] == src]
                if pts:
                    ax.scatter(
                        [r[f"{side}_p50_ms"] for r in pts], [r["accuracy"]["value"] for r in pts], marker=mk, s=50, label=f"accuracy {src}"
                    )
            for r in systems:
                ax.annotate(
                    r["system"], (r[f"{side}_p50_ms"], r["accuracy"]["value"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
                )
            ax.set_xscale("log")
            ax.set_xlabel(f"per {'query' if side == 'query' else 'gallery image'} latency p50, ms (log; measured here)")
        axes[0].set_ylabel((result.get("accuracy") or {}).get("metric", "accuracy"))
        axes[0].legend(fontsize=7)
        fig.suptitle(f"cost against accuracy ({systems[0]['device']})")
        return fig
    q = [r for r in result["rows"] if r["side"] == "query"]
    fig, ax = plt.subplots(figsize=(7, 4))
    with_acc = [r for r in q if r.get("accuracy") is not None]
    if len({r["model"] for r in with_acc}) >= 2:  # cost against accuracy
        for r in with_acc:
            ax.scatter(r["p50_ms"], r["accuracy"], s=40)
            ax.annotate(f"{r['model']} {r['mode']}", (r["p50_ms"], r["accuracy"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("per-query latency p50, ms (log)")
        ax.set_ylabel("R@1")
    else:
        labels = [f"{r['model']}\n{r['mode']}" for r in q]
        ax.bar(range(len(q)), [r["p50_ms"] for r in q], color=["tab:blue" if r["family"] == "csmcir" else "tab:orange" for r in q])
        ax.set_xticks(range(len(q)), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("per-query latency p50, ms (log)")
    ax.set_title(f"csmcir vs MLLM per query ({q[0]['device'] if q else ''})")
    return fig


if __name__ == "__main__":  # one isolated measurement: python -m csmcir.bench.efficiency '<json>'
    job = json.loads(sys.argv[1])
    c = EfficiencySettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["cfg"].items()})
    try:
        rows = _MEASURE[job["kind"]](job["name"], c)
    except CsmcirError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(rows))
