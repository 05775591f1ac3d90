"""Rasterising scenes to PNG.

Each object is drawn as a binary mask at ``supersample`` times the output resolution and reduced
to a coverage map ("stamp") with LANCZOS; the image is then ``background + sum_i (colour_i -
background) * stamp_i``. Because LANCZOS resampling is linear, this equals drawing the whole canvas
at high resolution and downsampling it once (up to the final rounding), but a stamp depends only
on (shape, size, pattern): the 40 possible stamps are computed once per process and every image
costs a few small array additions plus PNG encoding. Stamps are placed at whole output pixels, so
the position jitter is in whole pixels.

Patterns are textures inside the silhouette; striped and checkered objects keep their outline so
the shape stays readable, and hollow objects are the outline alone. Texture periods are fixed
fractions of the object's extent, so a small object shows as many stripes or checks as a large one
(absolute periods would leave a small object at 64 px with a single, unreadable stripe).
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .scene import BACKGROUND

OUTLINE = 0.12
"""Outline width of hollow/striped/checkered objects, as a fraction of the object's extent."""
STRIPE = 0.17
"""Width of one stripe (and of the gap after it), as a fraction of the object's extent."""
CHECK = 0.21
"""Side of one checkerboard square, as a fraction of the object's extent."""
LANCZOS_SUPPORT = 3
"""Output pixels a LANCZOS-downsampled stamp spreads beyond the drawn object."""

RenderObject = tuple[str, str, str, tuple[int, int, int], int, int]
"""(shape, size, pattern, rgb, x, y): an object as drawn, with its centre pixel (x, y)."""


@dataclass(frozen=True)
class RenderConfig:
    """The rendering subset of :class:`~csmcir.data.synthetic.params.SynthParams`."""

    image_size: int = 64
    supersample: int = 4
    large_scale: float = 0.78
    small_scale: float = 0.45

    @property
    def cell(self) -> float:
        return self.image_size / 3

    @property
    def stamp_radius(self) -> int:
        """Half the stamp side: the largest object's half-extent plus the LANCZOS spread."""
        return math.ceil(self.large_scale * self.cell / 2) + LANCZOS_SUPPORT + 1

    def cell_centre(self, cell: int) -> tuple[int, int]:
        """The output pixel (x, y) nearest to the centre of grid cell ``cell``."""
        row, col = divmod(cell, 3)
        return int((col + 0.5) * self.cell), int((row + 0.5) * self.cell)


def _shape_mask(shape: str, side: int, half: float) -> Image.Image:
    """A binary ("L") mask of ``shape`` with half-extent ``half``, centred in a ``side`` canvas."""
    c = side / 2
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((c - half, c - half, c + half, c + half), fill=255)
    elif shape == "square":
        h = 0.86 * half  # a square looks larger than a circle of the same extent
        draw.rectangle((c - h, c - h, c + h, c + h), fill=255)
    elif shape == "triangle":
        h = 1.05 * half
        draw.polygon([(c, c - h), (c + h, c + 0.8 * h), (c - h, c + 0.8 * h)], fill=255)
    elif shape == "diamond":
        h = 1.05 * half
        draw.polygon([(c, c - h), (c + h, c), (c, c + h), (c - h, c)], fill=255)
    elif shape == "cross":
        h, w = half, 0.4 * half
        draw.polygon(
            [
                (c - w, c - h),
                (c + w, c - h),
                (c + w, c - w),
                (c + h, c - w),
                (c + h, c + w),
                (c + w, c + w),
                (c + w, c + h),
                (c - w, c + h),
                (c - w, c + w),
                (c - h, c + w),
                (c - h, c - w),
                (c - w, c - w),
            ],  # fmt: skip
            fill=255,
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


@cache
def stamp(cfg: RenderConfig, shape: str, size: str, pattern: str) -> np.ndarray:
    """Coverage in [0, 1] (float32, ``(2r+1, 2r+1)``) of one object centred on the middle pixel."""
    ss = cfg.supersample
    side = (2 * cfg.stamp_radius + 1) * ss
    scale = cfg.large_scale if size == "large" else cfg.small_scale
    extent = scale * cfg.cell * ss  # object extent in supersampled pixels
    mask_img = _shape_mask(shape, side, extent / 2)
    mask = np.asarray(mask_img) > 127
    if pattern == "solid":
        cover = mask
    else:
        width = max(1, round(OUTLINE * extent))
        inner = np.asarray(mask_img.filter(ImageFilter.MinFilter(2 * width + 1))) > 127
        ring = mask & ~inner
        coords = np.arange(side, dtype=np.float64) - side / 2
        y, x = np.meshgrid(coords, coords, indexing="ij")
        if pattern == "hollow":
            texture = np.zeros_like(mask)
        elif pattern == "striped":
            # Diagonal bands, except on a diamond (diagonal edges), where they are vertical.
            if shape == "diamond":
                texture = np.floor(x / (STRIPE * extent) + 0.5).astype(np.int64) % 2 == 0
            else:
                band = STRIPE * extent * math.sqrt(2)
                texture = np.floor((x + y) / band).astype(np.int64) % 2 == 0
        elif pattern == "checkered":
            sq = CHECK * extent
            texture = (np.floor(x / sq) + np.floor(y / sq)).astype(np.int64) % 2 == 0
        else:
            raise ValueError(f"unknown pattern {pattern!r}")
        cover = ring | (inner & texture)
    big = Image.fromarray(cover.astype(np.float32), "F")
    small = big.resize((side // ss, side // ss), Image.LANCZOS)
    return np.asarray(small, dtype=np.float32)


def render(cfg: RenderConfig, objects: Sequence[RenderObject]) -> np.ndarray:
    """The RGB image (uint8, ``(S, S, 3)``) of ``objects`` on the light background."""
    size = cfg.image_size
    bg = np.asarray(BACKGROUND, dtype=np.float32)
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[...] = bg
    r = cfg.stamp_radius
    for shape, obj_size, pattern, rgb, x, y in objects:
        cover = stamp(cfg, shape, obj_size, pattern)
        x0, y0 = x - r, y - r
        # Clip the stamp to the canvas (objects near the border lose only LANCZOS ringing).
        sx0, sy0 = max(0, -x0), max(0, -y0)
        sx1 = min(cover.shape[1], size - x0)
        sy1 = min(cover.shape[0], size - y0)
        delta = np.asarray(rgb, dtype=np.float32) - bg
        canvas[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1] += cover[sy0:sy1, sx0:sx1, None] * delta
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(array: np.ndarray) -> bytes:
    """Encode an RGB uint8 array as a PNG file (8-bit truecolour, filter 0, zlib level 2).

    A direct encoder rather than ``PIL.Image.save``: Pillow tries every row filter per row, which
    costs ~0.5 ms for a 64x64 image (more than rendering it) and yields larger files here, where
    the flat background compresses best unfiltered. The output depends only on the pixels and
    zlib, so equal images give equal bytes whatever the Pillow version.
    """
    height, width, channels = array.shape
    if channels != 3 or array.dtype != np.uint8:
        raise ValueError("encode_png expects an (H, W, 3) uint8 array")
    rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # column 0: filter type 0 (None)
    rows[:, 1:] = array.reshape(height, 3 * width)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 2)) + _png_chunk(b"IEND", b"")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write an RGB array to ``path`` as PNG (see :func:`encode_png`).

    Plain ``os.open``/``os.write`` rather than ``open()``: with tens of thousands of tiny files, the
    extra system calls of a buffered file object (fstat, ioctl, seek) nearly double the time spent
    creating files on slow or virtualised file systems.
    """
    data = encode_png(array)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


# ---------------------------------------------------------------- multiprocessing entry points

_WORKER_CFG: RenderConfig | None = None


def init_worker(cfg: RenderConfig) -> None:
    """Pool initializer: remember the render settings (jobs then carry only their objects)."""
    global _WORKER_CFG
    _WORKER_CFG = cfg


def render_chunk(jobs: Sequence[tuple[str, Sequence[RenderObject]]]) -> int:
    """Render and save a chunk of ``(png path, objects)`` jobs; returns how many were written."""
    assert _WORKER_CFG is not None, "init_worker was not called"
    for path, objects in jobs:
        save_png(render(_WORKER_CFG, objects), path)
    return len(jobs)
