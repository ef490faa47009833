"""Image grids for people to look at."""

from __future__ import annotations

import math
import os
import pathlib

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 images ``[N, H, W, C]`` into one ``[rows*(H+pad)+pad, cols*(W+pad)+pad, C]`` image (white gaps)."""
    n, h, w, c = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = image
    return grid


def save_grid(images: np.ndarray, path: str | os.PathLike, *, columns: int | None = None, min_size: int = 256) -> str:
    """Save uint8 images ``[N, H, W, C]`` as a PNG grid, enlarged (nearest) so that small images stay legible."""
    grid = make_grid(images, columns)
    scale = max(1, math.ceil(min_size / max(grid.shape[:2])))
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        picture = picture.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    path = pathlib.Path(path)
    picture.save(path)
    return str(path)
