"""Reading a split: whole into host memory (:class:`InMemory`) or at random from ArrayRecord (:class:`Streamed`),
the two giving the same batches bit for bit; :func:`open_split` picks one and says which.

- :class:`InMemory`: the whole split read once into host memory as uint8 (CIFAR-10 train: 150 MB). The fastest for
  small datasets, and the only one for datasets stored as TFRecord.
- :class:`Streamed`: random access into a split stored as ArrayRecord (``tfds build --file_format=array_record``):
  each process reads, decodes and resizes only its own rows of each global batch, on a pool of threads, ahead of the
  step. Host memory stays a few batches, whatever the split's size (LSUN bedroom: 3M images).

Images are centre-cropped to a square and resized to ``image_size`` (one by one when their sizes vary, as LSUN's do).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from jaxdiff.data.config import DataConfig
from jaxdiff.data.prepare import prepared_builder
from jaxdiff.errors import DataError

__all__ = ["InMemory", "Streamed", "load_split", "open_split", "resize_square"]


def load_split(
    config: DataConfig, builder: tfds.core.DatasetBuilder | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole split as ``(images uint8 [N, S, S, C], labels int32 [N] or None)``, S = config.image_size.

    A dataset stored as ArrayRecord (the built-in digits; any dataset built with ``tfds build
    --file_format=array_record``) is read as :class:`Streamed` reads it, chunk by chunk on its threads, and without
    TensorFlow (whose import is ~3.5 s of a process's start) unless images need resizing; a TFRecord one through
    tf.data. Either way only the resized images are kept.

    Raises:
      ValueError: an unknown dataset name, or a dataset without the image feature.
      FileNotFoundError: the dataset is not prepared in data_dir and ``download`` is False (says how to prepare it).
    """
    builder = builder or prepared_builder(config)
    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        return _read_all(_streamed(builder, config), config)
    chunks = _read_chunks(builder, config.split, config.image_key, config.label_key, config.image_size)
    images, labels = [], []
    for chunk_images, chunk_labels in chunks:
        images.append(chunk_images)
        if chunk_labels is not None:
            labels.append(chunk_labels)
    if not images:
        raise DataError(f"Split {config.split!r} of {config.dataset!r} is empty.")
    return np.concatenate(images), (np.concatenate(labels) if labels else None)


def _read_all(split: Streamed, config: DataConfig, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray | None]:
    """Every row of ``split``, read ``chunk`` at a time into one array (the memory of the split and one chunk)."""
    n = len(split)
    if not n:
        raise DataError(f"Split {config.split!r} of {config.dataset!r} is empty.")
    images = np.empty((n, config.image_size, config.image_size, split.channels), np.uint8)
    labels = np.empty(n, np.int32) if split.has_labels else None
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        images[rows], chunk_labels = split.read(rows)
        if labels is not None:
            labels[rows] = chunk_labels
    return images, labels


def _read_chunks(
    builder: tfds.core.DatasetBuilder, split: str, image_key: str, label_key: str, image_size: int, size: int = 4096
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """A TFRecord split through tf.data, as ``(images, labels or None)`` batches of ``size`` at ``image_size``.
    Images of varying sizes (LSUN, CelebA) are centre-cropped and resized one by one (as :func:`resize_square`)
    before they are batched."""
    dataset = builder.as_dataset(split=split)
    if None in builder.info.features[image_key].shape[:2]:
        import tensorflow as tf

        square = lambda example: {**example, image_key: _resize_square_tf(example[image_key], image_size)}
        dataset = dataset.map(square, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for chunk in tfds.as_numpy(dataset.batch(size)):
        labels = np.asarray(chunk[label_key], np.int32) if label_key in chunk else None
        yield resize_square(np.asarray(chunk[image_key]), image_size), labels


class InMemory:
    """A split held whole in host memory: ``images`` uint8 ``[N, S, S, C]`` and ``labels`` int32 ``[N]`` (or None)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
        if labels is not None and len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels.")
        self.images, self.labels = images, labels
        self.channels, self.has_labels = images.shape[-1], labels is not None

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows ``indices``: ``(images uint8 [n, S, S, C], labels int32 [n] or None)``."""
        return self.images[indices], (None if self.labels is None else self.labels[indices])

    def describe(self) -> str:
        return f"held in memory ({len(self):,} images, {_gigabytes(self.images.nbytes)})"


class Streamed:
    """Random access into a split stored as ArrayRecord: :meth:`read` fetches, decodes, crops and resizes only the rows
    asked for, on a pool of threads (ArrayRecord's reads and PIL's decodes release the GIL; Grain reads TFDS data
    sources from threads the same way). Each image becomes what :class:`InMemory` would hold, bit for bit.

    Args:
      source: a TFDS data source (``builder.as_data_source(split)``): ``len()`` and ``source[i]`` -> example dict.
      image_key, label_key: the features to read (``label_key`` None: no labels).
      image_size: the output height = width.
      channels: the images' channels.
      threads: how many examples are read at once (None: two per CPU core, at most 16; ``benchmarks/input_speed.py``
        measures 1 to 16).
    """

    def __init__(
        self,
        source,
        *,
        image_key: str,
        label_key: str | None,
        image_size: int,
        channels: int,
        threads: int | None = None,
    ):
        self.source, self.image_key, self.label_key = source, image_key, label_key
        self.image_size, self.channels, self.has_labels = image_size, channels, label_key is not None
        threads = threads or min(16, 2 * (os.cpu_count() or 1))
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jaxdiff-read")

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows ``indices``, read now: ``(images uint8 [n, S, S, C], labels int32 [n] or None)``."""
        rows = list(self._pool.map(self._example, np.asarray(indices).tolist()))
        labels = np.asarray([label for _, label in rows], np.int32) if self.has_labels else None
        return np.stack([image for image, _ in rows]), labels

    def _example(self, index: int) -> tuple[np.ndarray, int]:
        example = self.source[index]
        image = np.asarray(example[self.image_key])
        if image.shape[:2] != (self.image_size, self.image_size):
            image = resize_square(image[None], self.image_size)[0]
        return image, (int(example[self.label_key]) if self.has_labels else 0)

    def describe(self) -> str:
        size = len(self) * self.image_size**2 * self.channels
        return f"streamed from ArrayRecord ({len(self):,} images, {_gigabytes(size)} decoded; read as needed)"


def open_split(config: DataConfig) -> InMemory | Streamed:
    """The split ``config`` names, as :class:`InMemory` or :class:`Streamed` (``config.reader``; ``auto``: in memory
    when it takes at most ``config.memory_limit_gb`` decoded at ``image_size``). Its ``describe()`` says which.

    Raises:
      ValueError: streaming was asked for (or chosen, for a split too large for memory) but the dataset is stored as
        TFRecord, which has no random access (the message gives the command that rebuilds it as ArrayRecord).
    """
    builder = prepared_builder(config)
    decoded = _split_examples(builder, config.split) * config.image_size**2 * _channels(builder, config)
    reader = config.reader
    if reader == "auto":
        reader = "memory" if decoded <= config.memory_limit_gb * 2**30 else "stream"
    if reader == "memory":
        return InMemory(*load_split(config, builder))
    try:
        return _streamed(builder, config)
    except NotImplementedError as e:
        why = (
            "config.data.reader='stream'"
            if config.reader == "stream"
            else f"{config.split!r} takes ~{_gigabytes(decoded)} decoded, over config.data.memory_limit_gb="
            f"{config.memory_limit_gb:g}, so it"
        )
        raise DataError(
            f"{why} must be read at random, but {config.dataset!r} is stored as {builder.info.file_format.value} in "
            f"{builder.data_dir}, which has none. Rebuild it as ArrayRecord: `tfds build {config.dataset} "
            f"--file_format=array_record --data_dir=<a new directory>` and point config.data.data_dir there (or set "
            "config.data.reader='memory' if this host has the memory)."
        ) from e


def _streamed(builder: tfds.core.DatasetBuilder, config: DataConfig) -> Streamed:
    """:class:`Streamed` over ``config``'s split (NotImplementedError from TFDS if it is not stored as ArrayRecord)."""
    return Streamed(
        builder.as_data_source(split=config.split),
        image_key=config.image_key,
        label_key=config.label_key if config.label_key in builder.info.features else None,
        image_size=config.image_size,
        channels=_channels(builder, config),
    )


def _channels(builder: tfds.core.DatasetBuilder, config: DataConfig) -> int:
    """The image feature's channels (3 where the metadata leaves them open)."""
    return builder.info.features[config.image_key].shape[-1] or 3


def _split_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
    """The number of examples in ``split`` (slices such as ``train[:90%]`` too) from the metadata; 0 if unknown."""
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError):
        return 0


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GB" if nbytes >= 2**28 else f"{nbytes / 2**20:.1f} MB"


def _resize_square_tf(image, size: int):
    """:func:`resize_square` of one ``[H, W, C]`` uint8 image of any size, as TensorFlow ops (for ``tf.data.map``)."""
    import tensorflow as tf

    h, w = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top : top + side, left : left + side]

    def resized(method: str, antialias: bool):
        out = tf.image.resize(image, (size, size), method=method, antialias=antialias)
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    square = tf.case(
        [(side > size, lambda: resized("area", True)), (side < size, lambda: resized("bilinear", False))],
        default=lambda: image,  # side == size: the crop as it is
    )
    return tf.ensure_shape(square, (size, size, image.shape[-1]))


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop ``[N, H, W, C]`` uint8 images to a square, then resize to ``size`` (area filter to shrink)."""
    _n, h, w, _c = images.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[:, top : top + side, left : left + side]
    if side == size:
        return images
    import tensorflow as tf

    method = "area" if size < side else "bilinear"
    resized = tf.image.resize(images, (size, size), method=method, antialias=size < side).numpy()
    return np.clip(np.round(resized), 0, 255).astype(np.uint8)
