"""Fashion-MNIST's photographs, read offline from Debian's ``dataset-fashion-mnist``.

The package (Expat licence) installs the four original gzip'd idx files under
``/usr/share/datasets/fashion-mnist``: 60,000 training and 10,000 test photos of Zalando articles,
28 x 28 grey levels (article bright, background 0), 10 classes. Another folder holding the same
four files can be named with ``CSMCIR_FASHION_MNIST`` or the ``photos`` argument.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ...errors import CsmcirError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "CSMCIR_FASHION_MNIST"
CLASSES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
"""Fashion-MNIST's ten labels, as words a modification text uses ("swap the sandal for a sneaker")."""
PARTS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
INSTALL_HINT = f"install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set {ENV_VAR} to a folder holding it"


def photo_root(photos: str | Path | None = None) -> Path:
    """The folder of the idx files: ``photos``, else ``$CSMCIR_FASHION_MNIST``, else Debian's."""
    return Path(photos or os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def available(photos: str | Path | None = None) -> bool:
    """Whether all four idx files are present."""
    root = photo_root(photos)
    return all((root / name).is_file() for files in PARTS.values() for name in files)


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte idx array (the MNIST file format) from a gzip'd file."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CsmcirError(f"{path} not found: {INSTALL_HINT}") from None
    except (OSError, EOFError) as e:
        raise CsmcirError(f"{path}: not a readable gzip file ({e}); reinstall dataset-fashion-mnist") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CsmcirError(f"{path}: not an unsigned-byte idx file (bad magic number); reinstall dataset-fashion-mnist")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise CsmcirError(f"{path}: {len(data) - header} bytes of data for shape {shape}; the file is truncated, reinstall it")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


@dataclass(frozen=True)
class Photos:
    """One part of Fashion-MNIST: ``images`` (N, 28, 28) uint8 and ``labels`` (N,) in 0..9."""

    part: str
    images: np.ndarray
    labels: np.ndarray

    def by_label(self, pool: np.ndarray) -> list[np.ndarray]:
        """The photo indices of ``pool`` grouped by label (ascending within each label)."""
        pool = np.sort(pool)
        return [pool[self.labels[pool] == c] for c in range(len(CLASSES))]


@lru_cache(maxsize=4)
def _load(part: str, root: str) -> Photos:
    images_file, labels_file = PARTS[part]
    images = read_idx(Path(root) / images_file)
    labels = read_idx(Path(root) / labels_file)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
        raise CsmcirError(f"{Path(root) / images_file}: shape {images.shape} with {labels.shape} labels is not Fashion-MNIST's")
    if labels.max(initial=0) >= len(CLASSES):
        raise CsmcirError(f"{Path(root) / labels_file}: label {int(labels.max())} outside 0..9")
    return Photos(part, images, labels)


def load_photos(part: str, photos: str | Path | None = None) -> Photos:
    """``train`` (60,000 photos) or ``t10k`` (10,000), cached per process."""
    if part not in PARTS:
        raise CsmcirError(f"unknown Fashion-MNIST part {part!r} (known: train, t10k)")
    return _load(part, str(photo_root(photos)))


def fingerprint(photos: str | Path | None = None) -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of each idx file: another copy of the data set makes other boards.

    Hashed once per process for a given set of files (size and modification time unchanged), so
    checking a benchmark, then generating it, reads the 30 MB once."""
    root = photo_root(photos)
    stamps = []
    for files in PARTS.values():
        for name in files:
            try:
                st = (root / name).stat()
            except FileNotFoundError:
                raise CsmcirError(f"{root / name} not found: {INSTALL_HINT}") from None
            stamps.append((name, st.st_size, st.st_mtime_ns))
    return dict(_hashes(str(root), tuple(stamps)))


@lru_cache(maxsize=4)
def _hashes(root: str, stamps: tuple[tuple[str, int, int], ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for name, _, _ in stamps:
        try:
            out.append((name, hashlib.sha256((Path(root) / name).read_bytes()).hexdigest()[:16]))
        except FileNotFoundError:
            raise CsmcirError(f"{Path(root) / name} not found: {INSTALL_HINT}") from None
    return tuple(out)
