"""Folder bookkeeping shared by the generated benchmarks (shapes: :mod:`.synthetic`; Fashion-MNIST
boards: :mod:`.boards`).

A generated benchmark is a custom-format folder plus ``benchmark.json``, whose header (name,
format and generator versions, seed, difficulty, every parameter) says exactly what was made.
Everything is written into a hidden temporary folder beside the destination
(``.<name>.partial-XXXX``) that is renamed onto it at the end, ``benchmark.json`` last: a killed
run leaves only that hidden folder (safe to delete), never a half benchmark that looks complete.
Reuse is allowed only when the header matches what is asked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from ..errors import CsmcirError
from ..io import ensure_writable_dir


def read_info(path: Path) -> dict:
    """A ``benchmark.json`` as a dict; a one-line :class:`CsmcirError` if it is not one."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CsmcirError(f"{path}: not a readable benchmark.json ({e})") from None
    if not isinstance(info, dict):
        raise CsmcirError(f"{path}: not a benchmark.json (expected a JSON object)")
    return info


def holds_matching(out: Path, expected: Mapping, what: str, asked: str) -> dict | None:
    """The benchmark.json of a complete benchmark in ``out`` whose header equals ``expected``;
    ``None`` if ``out`` is missing or empty; a :class:`CsmcirError` if it holds anything else.

    ``what`` names the kind in messages ("synthetic benchmark"); ``asked`` lists the request
    ("seed=0, difficulty='standard', generator_version='2'").
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise CsmcirError(f"{out} exists and is not a folder")
    marker = out / "benchmark.json"
    if not marker.is_file():
        if any(out.iterdir()):
            raise CsmcirError(f"{out} is not empty and holds no complete {what} (no benchmark.json): write the {what} to another folder")
        return None
    info = read_info(marker)
    differ = [key for key, value in expected.items() if info.get(key) != value]
    if differ:
        found = ", ".join(f"{k}={info.get(k)!r}" for k in differ if k != "params")
        if "params" in differ:
            found = (found + ", " if found else "") + "other parameters"
        raise CsmcirError(f"{out} holds a different {what} ({found}; asked {asked}); delete it or choose another folder")
    return info


def _publish(tmp: Path, out: Path, expected: Mapping, what: str, asked: str) -> None:
    """Move the finished ``tmp`` folder onto ``out``.

    ``rename`` is atomic and works when ``out`` is missing or an empty folder. Where it cannot be
    used (``out`` is a mount point, say) and ``out`` is empty, the contents are moved in one by
    one, benchmark.json last. If another run finished the same benchmark first, that one is kept.
    """
    try:
        os.rename(tmp, out)
        return
    except OSError as e:
        error = e
    if out.is_dir() and not any(out.iterdir()):
        for child in sorted(tmp.iterdir(), key=lambda p: p.name == "benchmark.json"):
            shutil.move(str(child), str(out / child.name))
        tmp.rmdir()
        return
    if holds_matching(out, expected, what, asked) is None:  # raises if ``out`` holds anything else
        raise CsmcirError(f"cannot move the generated benchmark to {out}: {error.strerror}")


def build_atomically(out: Path, expected: Mapping, what: str, asked: str, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` in a hidden folder beside ``out`` and publish it as ``out``.

    Nothing is done when ``out`` already holds the benchmark ``expected`` describes; ``write`` must
    write ``benchmark.json`` last.
    """
    if holds_matching(out, expected, what, asked) is not None:
        return out
    parent = ensure_writable_dir(out.parent if str(out.parent) else ".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    try:
        write(tmp)
        _publish(tmp, out, expected, what, asked)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        raise CsmcirError(f"{path} is missing; delete {path.parent} to regenerate it") from None


def verify(root: Path, info: Mapping, per_image_files: tuple[str, ...]) -> None:
    """Cheap completeness checks of an existing benchmark against its benchmark.json: every
    split's triplet and gallery counts, the image count, and one line per image in each of
    ``per_image_files``."""

    def check(path: Path, found: int, expected: object) -> None:
        if found != expected:
            raise CsmcirError(f"{path} has {found} entries but {root / 'benchmark.json'} says {expected}; delete {root} to regenerate it")

    splits = info.get("splits")
    if not isinstance(splits, dict):
        raise CsmcirError(f"{root / 'benchmark.json'}: no 'splits' entry")
    for split, counts in splits.items():
        for name, key in ((f"triplets.{split}.jsonl", "queries"), (f"gallery.{split}.txt", "gallery")):
            path = root / name
            check(path, _count_lines(path), counts.get(key) if isinstance(counts, dict) else None)
    images = root / "images"
    n_images = sum(1 for _ in os.scandir(images)) if images.is_dir() else 0
    check(images, n_images, info.get("images"))
    for name in per_image_files:
        check(root / name, _count_lines(root / name), info.get("images"))
