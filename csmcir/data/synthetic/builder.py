"""Building the synthetic benchmark and writing it in the custom format.

Determinism: every scene graph, text, jitter and caption is drawn in the main process from NumPy
generators seeded by ``(seed, split index)`` (captions: ``(seed, split index, 1, image number)``),
so the output does not depend on ``workers``; worker processes only rasterise fixed scenes, which
is a pure function. Each split has its own stream, so changing ``n_train`` leaves val and test
unchanged. Nothing iterates over a set or dict whose order could vary between runs.

Atomicity: everything is written into a hidden temporary folder beside ``out_dir``
(``.<name>.partial-XXXX``) that is renamed onto ``out_dir`` at the end, ``benchmark.json`` last. A
killed run leaves only that hidden folder (safe to delete), never a half benchmark that looks
complete: ``benchmark.json`` exists only in a complete benchmark (:mod:`csmcir.data.generated`).

Image ids are assigned after a random permutation of each split's images, so a query's reference,
targets and distractors do not sit next to each other in id order and ids leak nothing.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import CsmcirError
from ...io import atomic_write_json, atomic_write_text
from ..custom import Caption, Triplet, write_captions, write_gallery, write_triplets
from ..generated import build_atomically, holds_matching, read_info, verify
from .captioner import caption_scene
from .edits import Query, apply, free_variant_values, mod_clause, mod_meta, sample_distractors, sample_query
from .language import join_clauses
from .params import DIFFICULTIES, GENERATOR_VERSION, SynthParams, resolve_params
from .render import RenderConfig, RenderObject, init_worker, render_chunk
from .scene import COLOURS, HELDOUT_PAIRS, Scene, sample_scene, scene_to_json

FORMAT_VERSION = 1
BENCHMARK_NAME = "csmcir-synthetic"
SPLITS = ("train", "val", "test", "heldout")
"""Split names; a split's index here seeds its random stream."""
CAPTION_STREAM = 1
CHUNK = 256
"""Images per task sent to a render worker."""
MAX_DRAWS = 1000
"""Reference scenes drawn for one query before the parameters are declared unsatisfiable."""


@dataclass
class SplitData:
    """One built split: its queries, and its images in id order with their scenes and drawings."""

    name: str
    triplets: list[Triplet]
    images: list[tuple[str, Scene, tuple[RenderObject, ...]]]

    @property
    def gallery(self) -> list[str]:
        return [image_id for image_id, _, _ in self.images]


def render_config(params: SynthParams) -> RenderConfig:
    return RenderConfig(
        image_size=params.image_size, supersample=params.supersample, large_scale=params.large_scale, small_scale=params.small_scale
    )


def _split_size(params: SynthParams, split: str) -> int:
    return {"train": params.n_train, "val": params.n_val, "test": params.n_test, "heldout": params.n_heldout}[split]


def _drawing(rng: np.random.Generator, scene: Scene, params: SynthParams, cfg: RenderConfig) -> tuple[RenderObject, ...]:
    """Per-image appearance of ``scene``: position jitter and colour tint, drawn afresh."""
    n = len(scene)
    jitter_px = int(round(params.position_jitter * cfg.cell))
    offsets = rng.integers(-jitter_px, jitter_px + 1, size=(n, 2)).tolist()
    tints = rng.integers(-params.colour_jitter, params.colour_jitter + 1, size=(n, 3)).tolist()
    out = []
    for obj, (dx, dy), tint in zip(scene, offsets, tints):
        x, y = cfg.cell_centre(obj.cell)
        rgb = tuple(min(255, max(0, c + t)) for c, t in zip(COLOURS[obj.colour], tint))
        out.append((obj.shape, obj.size, obj.pattern, rgb, x + dx, y + dy))
    return tuple(out)


def _sample_group(
    rng: np.random.Generator, params: SynthParams, heldout: bool, distractors: bool
) -> tuple[Query, list[Scene], set[Scene], list[Scene]]:
    """One query with its target scenes, its correct set and its hard distractors.

    Scenes that admit no query of the drawn kind, or too few distinct distractors, are redrawn;
    parameters under which that keeps happening (say, 9 objects and moves only) are an error.
    """
    for _ in range(MAX_DRAWS):
        n_objects = int(rng.integers(params.min_objects, params.max_objects + 1))
        scene = sample_scene(rng, n_objects)
        query = sample_query(rng, scene, params, heldout)
        if query is None:
            continue
        values = free_variant_values(rng, query, params, heldout)
        targets = [apply(scene, query.resolved(v)) for v in values]
        correct = query.correct_scenes()
        found: list[Scene] = []
        if distractors and params.n_distractors:
            found = sample_distractors(rng, query, values, params, avoid=correct | {scene})
            if len(found) < params.n_distractors:
                continue  # a scene too small for enough distinct distractors: draw another
        return query, targets, correct, found  # type: ignore[return-value]
    raise CsmcirError(
        f"synthetic parameters {params.name!r} admit almost no queries: {MAX_DRAWS} scenes in a "
        f"row had no valid query or fewer than {params.n_distractors} distinct distractors"
    )


def build_split(split: str, seed: int, params: SynthParams) -> SplitData:
    """All queries and images of one split (scene graphs only; nothing is rendered here)."""
    index = SPLITS.index(split)
    rng = np.random.default_rng([seed, index])
    cfg = render_config(params)
    heldout = split == "heldout"
    # train queries carry n_train_negatives distractors as hard negatives; others n_distractors
    group_params = dataclasses.replace(params, n_distractors=params.n_train_negatives) if split == "train" else params
    with_distractors = group_params.n_distractors > 0

    scenes: list[Scene] = []
    drawings: list[tuple[RenderObject, ...]] = []

    def new_image(scene: Scene) -> int:
        scenes.append(scene)
        drawings.append(_drawing(rng, scene, params, cfg))
        return len(scenes) - 1

    pending = []  # (query id, text, meta, reference number, target numbers, correct set)
    for q in range(_split_size(params, split)):
        query, targets, correct, distractors = _sample_group(rng, group_params, heldout, with_distractors)
        clauses = [mod_clause(m, query.scene, rng, params.p_relational) for m in query.mods]
        text = join_clauses([c for c, _ in clauses], rng)
        reference = new_image(query.scene)
        target_numbers = [new_image(t) for t in targets]
        distractor_numbers = [new_image(d) for d in distractors]
        k = len(query.mods)
        meta = {
            "type": query.mods[0].type if k == 1 else f"compose{k}",
            "mods": [mod_meta(m, query.scene) for m in query.mods],
            "relational": any(r for _, r in clauses),
            "free": query.free is not None,
            "heldout": bool(query.heldout_pairs()),
            "n_objects": len(query.scene),
        }
        negatives = distractor_numbers if split == "train" else []
        pending.append((f"{split}-{q:06d}", text, meta, reference, target_numbers, correct, negatives))

    # Ids follow a random permutation, so a query's images are scattered over the id range.
    n = len(scenes)
    width = max(6, len(str(max(n - 1, 0))))
    rank = np.empty(n, dtype=np.int64)
    rank[rng.permutation(n)] = np.arange(n)
    ids = [f"{split}-i{int(r):0{width}d}" for r in rank]
    order = np.argsort(rank).tolist()
    images = [(ids[i], scenes[i], drawings[i]) for i in order]

    # Any gallery image showing a correct scene is a correct target too.
    by_scene: dict[Scene, list[str]] = {}
    for image_id, scene, _ in images:
        by_scene.setdefault(scene, []).append(image_id)
    triplets = []
    for qid, text, meta, reference, target_numbers, correct, negatives in pending:
        targets = [ids[t] for t in target_numbers]
        listed = set(targets) | {ids[reference]}
        extra = sorted(i for s in correct for i in by_scene.get(s, ()) if i not in listed)
        triplets.append(Triplet(qid, ids[reference], text, tuple(targets + extra), meta, tuple(ids[n] for n in negatives)))
    return SplitData(split, triplets, images)


def caption_split(data: SplitData, seed: int, params: SynthParams) -> list[Caption]:
    """A caption for every image of ``data``, each from its own seeded generator."""
    index = SPLITS.index(data.name)
    out = []
    for number, (image_id, scene, _) in enumerate(data.images):
        rng = np.random.default_rng([seed, index, CAPTION_STREAM, number])
        c = caption_scene(scene, rng, params)
        out.append(Caption(image_id, c.levels, c.final))
    return out


def _render_all(jobs: list[tuple[str, tuple[RenderObject, ...]]], cfg: RenderConfig, workers: int, progress: bool) -> None:
    """Rasterise every job, in this process or in a pool of ``workers`` processes."""
    from tqdm import tqdm

    chunks = [jobs[i : i + CHUNK] for i in range(0, len(jobs), CHUNK)]
    with tqdm(total=len(jobs), desc="rendering", unit="img", disable=not progress) as bar:
        if workers <= 1:
            init_worker(cfg)
            for chunk in chunks:
                bar.update(render_chunk(chunk))
            return
        # "spawn" rather than fork: the caller may hold threads (torch, a DataLoader) that a
        # forked child would inherit in an undefined state.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=init_worker, initargs=(cfg,)) as pool:
            for done in pool.imap_unordered(render_chunk, chunks):
                bar.update(done)


# --------------------------------------------------------------------------- folder bookkeeping


def _expected_header(seed: int, params: SynthParams) -> dict:
    return {
        "name": BENCHMARK_NAME,
        "format_version": FORMAT_VERSION,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "difficulty": params.name,
        "params": params.to_json(),
    }


WHAT = "synthetic benchmark"


def _asked(seed: int, params: SynthParams) -> str:
    return f"seed={seed}, difficulty={params.name!r}, generator_version={GENERATOR_VERSION!r}"


def _holds_matching(out: Path, seed: int, params: SynthParams) -> dict | None:
    """The benchmark.json of a complete matching benchmark in ``out``; ``None`` if ``out`` is
    missing or empty; a :class:`CsmcirError` if it holds anything else."""
    return holds_matching(out, _expected_header(seed, params), WHAT, _asked(seed, params))


def _write_benchmark(tmp: Path, seed: int, params: SynthParams, workers: int, progress: bool) -> None:
    """Build, render and write every file of the benchmark into ``tmp``."""
    splits = [build_split(s, seed, params) for s in SPLITS]
    images_dir = tmp / "images"
    images_dir.mkdir()
    jobs = [(str(images_dir / f"{i}.png"), d) for data in splits for i, _, d in data.images]
    _render_all(jobs, render_config(params), workers, progress)

    captions: list[Caption] = []
    scene_lines: list[str] = []
    for data in splits:
        write_triplets(tmp / f"triplets.{data.name}.jsonl", data.triplets)
        write_gallery(tmp / f"gallery.{data.name}.txt", data.gallery)
        captions.extend(caption_split(data, seed, params))
        scene_lines.extend(json.dumps(scene_to_json(i, s)) + "\n" for i, s, _ in data.images)
    write_captions(tmp / "captions.jsonl", captions)
    atomic_write_text(tmp / "scenes.jsonl", "".join(scene_lines))

    info = _expected_header(seed, params)
    info["splits"] = {data.name: {"queries": len(data.triplets), "gallery": len(data.images)} for data in splits}
    info["images"] = len(jobs)
    info["heldout_pairs"] = [list(p) for p in sorted(HELDOUT_PAIRS)]
    atomic_write_json(tmp / "benchmark.json", info)  # last: its presence means complete


def generate(
    out_dir: str | Path, seed: int = 0, difficulty: str | SynthParams = "standard", workers: int = 1, progress: bool = True
) -> Path:
    """Generate the synthetic benchmark into ``out_dir`` in the custom format; returns the path.

    Args:
        out_dir: destination; must be missing, empty, or hold this very benchmark (then nothing is
            done). Anything else raises :class:`CsmcirError`.
        seed: random seed; the same seed and difficulty give byte-identical files.
        difficulty: a name from :data:`DIFFICULTIES` or a :class:`SynthParams` (for tuning).
        workers: processes rendering PNGs; does not change the output.
        progress: show a tqdm bar of images rendered.
    """
    params = resolve_params(difficulty)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CsmcirError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out_dir)
    expected = _expected_header(seed, params)
    return build_atomically(
        out, expected, WHAT, _asked(seed, params), lambda tmp: _write_benchmark(tmp, seed, params, max(1, int(workers)), progress)
    )


def ensure_benchmark(
    root: str | Path, seed: int = 0, difficulty: str | SynthParams = "standard", workers: int | None = None, progress: bool = True
) -> Path:
    """Return ``root`` holding the requested benchmark; generate it if ``root`` is missing or empty.

    An existing benchmark is accepted only if its benchmark.json matches (seed, difficulty,
    generator version, parameters) and its files have the counts benchmark.json lists; anything
    else raises :class:`CsmcirError` saying what differs. ``workers`` defaults to the CPU count
    (at most 4).
    """
    params = resolve_params(difficulty)
    root = Path(root)
    info = _holds_matching(root, seed, params)
    if info is not None:
        verify(root, info, ("captions.jsonl", "scenes.jsonl"))
        return root
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    return generate(root, seed=seed, difficulty=params, workers=workers, progress=progress)


def benchmark_params(root: str | Path) -> SynthParams:
    """The generator parameters a synthetic benchmark in ``root`` was made with (its benchmark.json)."""
    path = Path(root) / "benchmark.json"
    if not path.is_file():
        raise CsmcirError(f"{path} not found (only synthetic benchmarks have one)")
    info = read_info(path)
    name = info.get("difficulty")
    return DIFFICULTIES[name] if name in DIFFICULTIES else SynthParams(**info["params"])


def gallery_scenes(root: str | Path) -> dict[str, Scene]:
    """``{image_id: scene}`` from a benchmark's ``scenes.jsonl`` (ground truth for tools)."""
    from .scene import scene_from_json

    path = Path(root) / "scenes.jsonl"
    out = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    out[record["image_id"]] = scene_from_json(record)
    except FileNotFoundError:
        raise CsmcirError(f"{path} not found (only synthetic benchmarks have scenes)") from None
    return out
