"""Images between the model's range and people: uint8 <-> [-1, 1], grids, and sample files.

The model sees images in [-1, 1] (DDPM's scaling of 8-bit data); files and feature extractors see uint8 in [0, 255].
:func:`from_uint8` and :func:`to_uint8` are the one place each way is written; both work on numpy and jax arrays.
"""

from __future__ import annotations

import math
import os
import pathlib

import jax.numpy as jnp
import numpy as np


def from_uint8(images):
    """uint8 ``[..., C]`` in [0, 255] -> float32 in [-1, 1]: ``x / 127.5 - 1`` (numpy in, numpy out; jax likewise)."""
    return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images):
    """Images in [-1, 1] -> uint8 in [0, 255] (rounded, clipped); the inverse of :func:`from_uint8` on its range."""
    return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


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


def _picture(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def save_grid(images: np.ndarray, path: str | os.PathLike, *, columns: int | None = None, min_size: int = 256) -> str:
    """Save uint8 images ``[N, H, W, C]`` as a PNG grid, enlarged (nearest) so that small images stay legible."""
    from PIL import Image

    grid = make_grid(images, columns)
    scale = max(1, math.ceil(min_size / max(grid.shape[:2])))
    picture = _picture(grid)
    if scale > 1:
        picture = picture.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    path = pathlib.Path(path)
    picture.save(path)
    return str(path)


def write_samples(images: np.ndarray, out: str | os.PathLike, individual: bool = True) -> dict[str, str]:
    """Write ``grid.png`` (up to 256 images), ``images/000000.png``... and ``samples.npz`` (``arr_0``) under ``out``.

    ``samples.npz`` holds uint8 ``[N, H, W, C]`` under ``arr_0``, the format FID tools read.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"npz": str(out / "samples.npz"), "grid": save_grid(images[:256], out / "grid.png")}
    np.savez(out / "samples.npz", arr_0=images)
    if individual:
        folder = out / "images"
        folder.mkdir(exist_ok=True)
        for i, image in enumerate(images):
            _picture(image).save(folder / f"{i:06d}.png")
        paths["images"] = str(folder)
    return paths
