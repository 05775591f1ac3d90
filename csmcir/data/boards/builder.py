"""Building the Fashion-MNIST board benchmark and writing it in the custom format.

Splits and photos: train boards use only Fashion-MNIST's 60,000 training photos; validation
boards one half of its 10,000 test photos and test / heldout boards the other half (a fixed
permutation, the same for every seed), so the test scores photos never seen in training or model
selection. Determinism: every board, text, jitter and caption comes from NumPy generators seeded
by ``(seed, split index)`` (captions ``(seed, split index, 1, image number)``); the same seed,
parameters and photo files give byte-identical folders. Writing is atomic
(:mod:`csmcir.data.generated`): ``benchmark.json`` exists only in a complete benchmark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import CsmcirError
from ...io import atomic_write_json, atomic_write_text
from ..custom import Caption, Triplet, write_captions, write_gallery, write_triplets
from ..generated import build_atomically, holds_matching, verify
from ..synthetic.render import save_png
from .board import (
    HELDOUT_PAIRS,
    TINTS,
    Board,
    BoardParams,
    Edit,
    Pattern,
    PhotoPool,
    caption_board,
    edit_meta,
    edit_text,
    resolve_params,
    sample_distractors,
    sample_edit_type,
    sample_query_edit,
)
from .photos import CLASSES, Photos, fingerprint, load_photos

FORMAT_VERSION = 1
GENERATOR_VERSION = "1"
BENCHMARK_NAME = "csmcir-fashion-boards"
WHAT = "Fashion-MNIST board benchmark"
SPLITS = ("train", "val", "test", "heldout")
PART = {"train": "train", "val": "t10k", "test": "t10k", "heldout": "t10k"}
"""The Fashion-MNIST part each split draws its photos from."""
PHOTO_SPLIT_SEED = 20260
"""Seeds the permutation that halves the 10,000 test photos into validation and test photos."""
CAPTION_STREAM = 1
MAX_DRAWS = 1000
BACKGROUND = (236, 236, 230)


@dataclass
class SplitData:
    name: str
    triplets: list[Triplet]
    images: list[tuple[str, Board]]  # (id, board) in id order
    offsets: dict[str, np.ndarray]  # image id -> (n_articles, 2) pixel offsets

    @property
    def gallery(self) -> list[str]:
        return [image_id for image_id, _ in self.images]


def photo_pool(split: str, photos: Photos, params: BoardParams) -> PhotoPool:
    """The photos ``split`` may use: all training photos, or one half of the test photos."""
    if split == "train":
        indices = np.arange(len(photos.labels))
    else:
        perm = np.random.default_rng(PHOTO_SPLIT_SEED).permutation(len(photos.labels))
        half = len(perm) // 2
        indices = perm[:half] if split == "val" else perm[half:]
    return PhotoPool(photos.by_label(indices), params)


def _split_size(params: BoardParams, split: str) -> int:
    return {"train": params.n_train, "val": params.n_val, "test": params.n_test, "heldout": params.n_heldout}[split]


def _sample_group(rng: np.random.Generator, pool: PhotoPool, heldout: bool, n_distractors: int):
    params = pool.params
    etype = sample_edit_type(rng, params)
    for _ in range(MAX_DRAWS):
        board = pool.board(rng, int(rng.integers(params.min_articles, params.max_articles + 1)))
        edit = sample_query_edit(rng, board, pool, heldout, etype)
        if edit is None:
            continue
        pattern = edit.pattern(board)
        assert pattern is not None
        n_targets = int(rng.integers(params.min_free_variants, params.max_free_variants + 1)) if pattern.cell is not None else 1
        targets: list[Board] = []
        for _ in range(4 * n_targets):
            t = pool.realise(rng, pattern)
            if t not in targets:
                targets.append(t)
            if len(targets) == n_targets:
                break
        distractors = sample_distractors(rng, board, edit, pool, n_distractors, set(targets), heldout)
        if len(distractors) < n_distractors:
            continue  # too few distinct distractors on this board: draw another
        return board, edit, pattern, targets, distractors
    raise CsmcirError(f"board parameters {params.name!r} admit almost no queries: {MAX_DRAWS} boards in a row failed")


def build_split(split: str, seed: int, params: BoardParams, photos: Photos) -> SplitData:
    """All queries and boards of one split (nothing is rendered here)."""
    index = SPLITS.index(split)
    rng = np.random.default_rng([seed, index])
    pool = photo_pool(split, photos, params)
    heldout = split == "heldout"
    n_distractors = params.n_train_negatives if split == "train" else params.n_distractors

    boards: list[Board] = []
    offsets: list[np.ndarray] = []
    j = params.position_jitter

    def new_image(board: Board) -> int:
        boards.append(board)
        offsets.append(rng.integers(-j, j + 1, size=(len(board), 2)))
        return len(boards) - 1

    pending = []
    for q in range(_split_size(params, split)):
        board, edit, pattern, targets, distractors = _sample_group(rng, pool, heldout, n_distractors)
        text, relational = edit_text(board, edit, rng, params.p_relational)
        reference = new_image(board)
        target_numbers = [new_image(t) for t in targets]
        distractor_numbers = [(new_image(d), kind) for d, kind in distractors]
        meta = edit_meta(board, edit, relational, heldout=edit.pair() in HELDOUT_PAIRS)
        pending.append((f"{split}-{q:06d}", text, meta, reference, target_numbers, pattern, distractor_numbers))

    n = len(boards)
    width = max(6, len(str(max(n - 1, 0))))
    rank = np.empty(n, dtype=np.int64)
    rank[rng.permutation(n)] = np.arange(n)
    ids = [f"{split}-i{int(r):0{width}d}" for r in rank]
    order = np.argsort(rank).tolist()
    images = [(ids[i], boards[i]) for i in order]

    # Every gallery image a query's pattern accepts is a correct target, rendered for it or not.
    exact: dict[Board, list[str]] = {}
    wild: dict[tuple, list[tuple[str, str]]] = {}
    for image_id, board in images:
        exact.setdefault(board, []).append(image_id)
        for a in board:
            rest = tuple(b for b in board if b.cell != a.cell)
            wild.setdefault((rest, a.cell, a.label), []).append((image_id, a.tint))
    triplets = []
    for qid, text, meta, reference, target_numbers, pattern, distractor_numbers in pending:
        targets = [ids[t] for t in target_numbers]
        if pattern.cell is None:
            found = exact.get(pattern.kept, [])
        else:
            found = [i for i, tint in wild.get((pattern.kept, pattern.cell, pattern.label), []) if pattern.tint in (None, tint)]
        listed = set(targets) | {ids[reference]}
        extra = sorted(i for i in found if i not in listed)
        # training lists its distractors as hard negatives; evaluation keeps them (and their kinds)
        # in meta only, for error analysis: they are in the gallery, which is what scoring needs
        negatives = tuple(ids[k] for k, _ in distractor_numbers) if split == "train" else ()
        meta = {**meta, "distractors": [[ids[k], kind] for k, kind in distractor_numbers]}
        triplets.append(Triplet(qid, ids[reference], text, tuple(targets + extra), meta, negatives))
    return SplitData(split, triplets, images, {ids[i]: offsets[i] for i in range(n)})


def render_board(board: Board, offsets: np.ndarray, photos: Photos, params: BoardParams) -> np.ndarray:
    """The RGB image of ``board``: each 28-px photo at its own resolution, tinted, centred in its
    cell and shifted by ``offsets``, on a light canvas."""
    size = params.image_size
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[...] = BACKGROUND
    cell = size // 2
    for a, (dx, dy) in zip(board, offsets.tolist()):
        x0 = (a.cell % 2) * cell + (cell - 28) // 2 + dx
        y0 = (a.cell // 2) * cell + (cell - 28) // 2 + dy
        photo = photos.images[a.photo].astype(np.float32) / 255.0
        canvas[y0 : y0 + 28, x0 : x0 + 28] = photo[:, :, None] * np.asarray(TINTS[a.tint], dtype=np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _expected_header(seed: int, params: BoardParams, photos_dir: str | Path | None) -> dict:
    return {
        "name": BENCHMARK_NAME,
        "format_version": FORMAT_VERSION,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "difficulty": params.name,
        "params": params.to_json(),
        "photos": fingerprint(photos_dir),
    }


def _asked(seed: int, params: BoardParams) -> str:
    return f"seed={seed}, difficulty={params.name!r}, generator_version={GENERATOR_VERSION!r}"


def _write_benchmark(tmp: Path, seed: int, params: BoardParams, photos_dir: str | Path | None, progress: bool) -> None:
    from tqdm import tqdm

    parts = {p: load_photos(p, photos_dir) for p in sorted(set(PART.values()))}
    splits = [build_split(s, seed, params, parts[PART[s]]) for s in SPLITS]
    images_dir = tmp / "images"
    images_dir.mkdir()
    total = sum(len(d.images) for d in splits)
    with tqdm(total=total, desc="rendering boards", unit="img", disable=not progress) as bar:
        for data in splits:
            photos = parts[PART[data.name]]
            for image_id, board in data.images:
                save_png(render_board(board, data.offsets[image_id], photos, params), images_dir / f"{image_id}.png")
                bar.update(1)

    captions: list[Caption] = []
    lines: list[str] = []
    for data in splits:
        write_triplets(tmp / f"triplets.{data.name}.jsonl", data.triplets)
        write_gallery(tmp / f"gallery.{data.name}.txt", data.gallery)
        for number, (image_id, board) in enumerate(data.images):
            rng = np.random.default_rng([seed, SPLITS.index(data.name), CAPTION_STREAM, number])
            levels, final = caption_board(board, rng, params)
            captions.append(Caption(image_id, levels, final))
            record = {"image_id": image_id, "part": PART[data.name], "articles": [a.to_json() for a in board]}
            lines.append(json.dumps(record) + "\n")
    write_captions(tmp / "captions.jsonl", captions)
    atomic_write_text(tmp / "boards.jsonl", "".join(lines))

    info = _expected_header(seed, params, photos_dir)
    info["splits"] = {d.name: {"queries": len(d.triplets), "gallery": len(d.images)} for d in splits}
    info["images"] = total
    info["classes"] = list(CLASSES)
    info["heldout_pairs"] = [list(p) for p in sorted(HELDOUT_PAIRS)]
    atomic_write_json(tmp / "benchmark.json", info)  # last: its presence means complete


def generate(
    out_dir: str | Path, seed: int = 0, difficulty: str | BoardParams = "standard", photos: str | Path | None = None, progress: bool = True
) -> Path:
    """Generate the Fashion-MNIST board benchmark into ``out_dir`` (custom format); returns it.

    Args:
        out_dir: destination; must be missing, empty, or hold this very benchmark (then nothing
            is done). Anything else raises :class:`CsmcirError`.
        seed: random seed; the same seed, difficulty and photo files give byte-identical files.
        difficulty: ``easy`` or ``standard`` (:data:`~.board.DIFFICULTIES`) or a :class:`BoardParams`.
        photos: folder of Fashion-MNIST's idx files (default ``$CSMCIR_FASHION_MNIST``, else
            Debian's ``/usr/share/datasets/fashion-mnist``).
        progress: a tqdm bar of boards rendered.
    """
    params = resolve_params(difficulty)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CsmcirError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out_dir)
    expected = _expected_header(seed, params, photos)
    return build_atomically(out, expected, WHAT, _asked(seed, params), lambda tmp: _write_benchmark(tmp, seed, params, photos, progress))


def ensure_benchmark(
    root: str | Path, seed: int = 0, difficulty: str | BoardParams = "standard", photos: str | Path | None = None, progress: bool = True
) -> Path:
    """``root`` holding the requested board benchmark, generated if missing or empty; an existing
    one is accepted only if its header matches and its files have the counts it lists."""
    params = resolve_params(difficulty)
    root = Path(root)
    info = holds_matching(root, _expected_header(seed, params, photos), WHAT, _asked(seed, params))
    if info is not None:
        verify(root, info, ("captions.jsonl", "boards.jsonl"))
        return root
    return generate(root, seed=seed, difficulty=params, photos=photos, progress=progress)


def read_boards(root: str | Path) -> dict[str, dict]:
    """``{image_id: record}`` from a board benchmark's ``boards.jsonl`` (ground truth for tools)."""
    path = Path(root) / "boards.jsonl"
    try:
        with open(path, encoding="utf-8") as f:
            return {r["image_id"]: r for r in map(json.loads, filter(str.strip, f))}
    except FileNotFoundError:
        raise CsmcirError(f"{path} not found (only Fashion-MNIST board benchmarks have one)") from None


__all__ = ["BENCHMARK_NAME", "GENERATOR_VERSION", "SPLITS", "Edit", "Pattern", "build_split", "ensure_benchmark", "generate", "read_boards"]
