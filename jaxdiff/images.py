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

from jaxdiff.errors import ConfigError

__all__ = [
    "MASKS",
    "from_uint8",
    "load_mask",
    "make_grid",
    "named_mask",
    "save_grid",
    "to_uint8",
    "write_samples",
]


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


#: The inpainting masks :func:`named_mask` makes by name (1 = filled in).
MASKS = ("left_half", "right_half", "top_half", "bottom_half", "center")


def named_mask(name: str, height: int, width: int) -> np.ndarray:
    """A float32 ``[H, W, 1]`` inpainting hole: 1 where pixels are filled in, 0 where the given image is kept.

    ``left_half``/``right_half``/``top_half``/``bottom_half`` fill that half; ``center`` fills the central square
    (rectangle) of half the height and width.
    """
    hole = np.zeros((height, width, 1), np.float32)
    rows, cols = slice(None), slice(None)
    if name == "left_half":
        cols = slice(0, width // 2)
    elif name == "right_half":
        cols = slice(width // 2, width)
    elif name == "top_half":
        rows = slice(0, height // 2)
    elif name == "bottom_half":
        rows = slice(height // 2, height)
    elif name == "center":
        rows = slice(height // 4, height // 4 + height // 2)
        cols = slice(width // 4, width // 4 + width // 2)
    else:
        raise ConfigError(f"Unknown mask {name!r}; choose one of {', '.join(MASKS)}, or give an .npz file.")
    hole[rows, cols] = 1.0
    return hole


def load_mask(spec: str, height: int, width: int) -> np.ndarray:
    """``named_mask(spec)``, or the hole under ``arr_0`` of an .npz file (``[H, W]``, ``[H, W, 1]`` or ``[H, W, C]``,
    1 = fill in, 0 = keep) as float32 with a channel axis."""
    if spec in MASKS:
        return named_mask(spec, height, width)
    try:
        with np.load(spec) as f:
            hole = np.asarray(f["arr_0"], np.float32)
    except (OSError, ValueError, KeyError) as e:
        names = ", ".join(MASKS)
        raise ConfigError(f"The mask {spec!r} is neither one of {names} nor an .npz file with arr_0 ({e}).") from e
    if hole.ndim == 2:
        hole = hole[..., None]
    if not np.all((hole == 0) | (hole == 1)):
        raise ConfigError(f"The mask {spec} must hold only 0 (keep) and 1 (fill in).")
    return hole
