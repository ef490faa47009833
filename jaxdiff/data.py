"""Input pipelines: TFDS image datasets, batched as a pure function of (seed, step), held in memory or streamed.

The order of examples is a function of (seed, step) alone: epoch e visits the split in the order of
``permutation(seed, e)``, and the global batch of step s is the next ``global_batch`` indices of that endless
sequence. So a resumed run sees exactly the batches an uninterrupted run would, whatever the number of hosts, and
process p of P reads rows ``[p * B/P, (p + 1) * B/P)`` of every global batch (disjoint shards). Random flips are drawn
from (seed, step) too.

Two ways to read a split give the same batches, bit for bit (:func:`open_split` picks one and says which):

- :class:`InMemory`: the whole split read once into host memory as uint8 (CIFAR-10 train: 150 MB). The fastest for
  small datasets, and the only one for datasets stored as TFRecord.
- :class:`Streamed`: random access into a split stored as ArrayRecord (``tfds build --file_format=array_record``):
  each process reads, decodes and resizes only its own rows of each global batch, on a pool of threads, ahead of the
  step. Host memory stays a few batches, whatever the split's size (LSUN bedroom: 3M images).

Nothing is downloaded unless asked (``download=True``). The built-in ``digits`` dataset (scikit-learn's bundled 8x8
digits, 1,797 images, split 1,500 train / 297 test) is built offline on first use.

Images are centre-cropped to a square and resized to ``image_size`` (one by one when their sizes vary, as LSUN's do).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from jaxdiff.images import from_uint8
from jaxdiff.parallel import process_verdicts

KNOWN_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "celeb_a", "celeb_a_hq", "lsun")
READERS = ("auto", "memory", "stream")


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's bundled 8x8 handwritten digits as a TFDS dataset, built offline.

    Pixel intensities 0..16 are rescaled to 0..255. A fixed permutation (seed 0) puts 1,500 images in ``train`` and
    the other 297 in ``test``.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "scikit-learn's load_digits, 1500 train / 297 test.",
        "1.1.0": "The same examples, stored as ArrayRecord: read without TensorFlow.",
    }
    NUM_TRAIN = 1500

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(8, 8, 1)), "label": tfds.features.ClassLabel(num_classes=10)}
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        order = np.random.default_rng(0).permutation(1797)
        return {
            "train": self._generate_examples(order[: self.NUM_TRAIN]),
            "test": self._generate_examples(order[self.NUM_TRAIN :]),
        }

    def _generate_examples(self, indices):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        for i in indices:
            yield int(i), {"image": images[i], "label": int(digits.target[i])}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to shape it.

    ``config.data`` of a run, field for field.

    Attributes:
      dataset: a TFDS name (``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``, ``celeb_a``, ``lsun/church_outdoor``,
        ... any TFDS image dataset).
      split: e.g. ``train``, ``test``, ``train[:90%]``.
      eval_split: the held-out split (the bound in bits/dim).
      image_size: output height = width (images are centre-cropped to a square, then resized, if they differ).
      random_flip: flip each image left-right with probability 1/2.
      data_dir: TFDS data directory (``None``: TFDS's default, ``~/tensorflow_datasets``).
      download: allow TFDS to download and prepare a dataset that is not prepared yet.
      class_conditional: the model is given the labels (``label_key``).
      image_key, label_key: the feature names in the dataset.
      reader: how the split is read (:func:`open_split`): ``memory`` (whole, once), ``stream`` (random access, only
        this process's rows of each batch; the dataset must be stored as ArrayRecord), or ``auto``: ``memory`` when
        the split, decoded at ``image_size``, takes at most ``memory_limit_gb``, else ``stream``.
      memory_limit_gb: the largest split (decoded uint8 at ``image_size``) that ``auto`` holds in memory.
    """

    dataset: str = "digits"
    split: str = "train"
    eval_split: str = "test"
    image_size: int = 8
    random_flip: bool = False
    data_dir: str | None = None
    download: bool = False
    class_conditional: bool = False
    image_key: str = "image"
    label_key: str = "label"
    reader: str = "auto"
    memory_limit_gb: float = 4.0

    def __post_init__(self):
        if self.reader not in READERS:
            raise ValueError(f"config.data.reader must be one of {READERS}, got {self.reader!r}.")
        if not self.memory_limit_gb >= 0:
            raise ValueError(f"config.data.memory_limit_gb must be >= 0, got {self.memory_limit_gb}.")


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
    builder = builder or _prepared_builder(config)
    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        return _read_all(_streamed(builder, config), config)
    chunks = _read_chunks(builder, config.split, config.image_key, config.label_key, config.image_size)
    images, labels = [], []
    for chunk_images, chunk_labels in chunks:
        images.append(chunk_images)
        if chunk_labels is not None:
            labels.append(chunk_labels)
    if not images:
        raise ValueError(f"Split {config.split!r} of {config.dataset!r} is empty.")
    return np.concatenate(images), (np.concatenate(labels) if labels else None)


def _read_all(split: Streamed, config: DataConfig, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray | None]:
    """Every row of ``split``, read ``chunk`` at a time into one array (the memory of the split and one chunk)."""
    n = len(split)
    if not n:
        raise ValueError(f"Split {config.split!r} of {config.dataset!r} is empty.")
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
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
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
    builder = _prepared_builder(config)
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
        raise ValueError(
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


def num_classes(config: DataConfig) -> int | None:
    """The number of classes the dataset declares (its ``label_key`` feature's ``ClassLabel.num_classes``), or None if
    it has no such feature. Read from the metadata, not from the labels seen: a split that happens to lack the last
    class still gets the right count."""
    features = _prepared_builder(config).info.features
    feature = features[config.label_key] if config.label_key in features else None
    return int(feature.num_classes) if isinstance(feature, tfds.features.ClassLabel) else None


def _builder(config: DataConfig) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(config.dataset, data_dir=config.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"Unknown dataset {config.dataset!r}: not a TFDS dataset. Use one of {', '.join(KNOWN_DATASETS)} or "
            "any TFDS image dataset name (see `tfds.list_builders()`)."
        ) from e


def _prepare(builder: tfds.core.DatasetBuilder, config: DataConfig) -> None:
    """Build the dataset where it is not prepared: digits offline; others only with ``download``."""
    if builder.is_prepared():
        return
    if isinstance(builder, Digits):
        builder.download_and_prepare()  # offline: built from scikit-learn's bundled copy
    elif config.download:  # ArrayRecord: both readers can read it (TFRecord has no random access for streaming).
        builder.download_and_prepare(file_format=None if config.reader == "memory" else "array_record")
    else:
        raise FileNotFoundError(
            f"Dataset {config.dataset!r} is not prepared in {builder.data_dir}. Prepare it with "
            f"`tfds build {config.dataset} --data_dir={builder.data_dir_root}` on a machine with internet access "
            "(or copy the prepared folder there), or set config.data.download=True to let this run download it."
        )


def _prepared_builder(config: DataConfig) -> tfds.core.DatasetBuilder:
    """The dataset's TFDS builder, prepared (digits offline; others only with ``download``), with an image feature.

    On several processes, process 0 prepares a dataset while the others wait (hosts that share the data directory
    must not build it side by side: the second one's final rename fails), and its failure is raised on every process
    (one that raised alone would leave the others waiting in their next collective); a host whose directory is its
    own then prepares its copy. Every process calls this alike (a run's and sample.py's code is the same on all).
    """
    import jax

    builder = _builder(config)
    if jax.process_count() > 1:
        failure = None
        if jax.process_index() == 0:
            try:
                _prepare(builder, config)
            except Exception as e:  # raised below, on every process
                failure = e
        if not process_verdicts(failure is None).all():  # the others wait here for process 0
            raise failure or RuntimeError(f"Process 0 could not prepare {config.dataset!r}; its log says why.")
        builder = _builder(config)  # prepared by process 0 where the directory is shared
    _prepare(builder, config)
    if config.image_key not in builder.info.features:
        raise ValueError(
            f"Dataset {config.dataset!r} has no feature {config.image_key!r}; it has {list(builder.info.features)}."
        )
    return builder


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


def global_indices(num_examples: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """The dataset indices of the global batch at ``step``: the next ``global_batch`` entries of the concatenation of
    per-epoch permutations ``default_rng([seed, epoch]).permutation(num_examples)``."""
    start = step * global_batch
    out, filled = np.empty(global_batch, np.int64), 0
    while filled < global_batch:
        epoch, offset = divmod(start + filled, num_examples)
        perm = _epoch_order(num_examples, seed, epoch)
        take = min(num_examples - offset, global_batch - filled)
        out[filled : filled + take] = perm[offset : offset + take]
        filled += take
    return out


@functools.lru_cache(maxsize=2)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's permutation, kept while the steps walk through it (a 3M-image split's takes ~50 ms to draw)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.flags.writeable = False
    return order


class Batches:
    """Batches of one process as a function of the step: ``batches.at(step)`` or iterate from a start step.

    Each batch is ``{'image': float32 [B/P, S, S, C] in [-1, 1], 'label': int32 [B/P]}`` (label 0 when the dataset
    has none). Only this process's rows of each global batch are read from ``data`` (:class:`InMemory` or
    :class:`Streamed`), so both give the same batches. Iterating reads the next batches on a background thread.
    """

    def __init__(
        self,
        data: InMemory | Streamed,
        *,
        global_batch: int,
        seed: int,
        random_flip: bool = False,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if global_batch % process_count:
            raise ValueError(f"The global batch {global_batch} is not divisible by the {process_count} processes.")
        self.data = data
        self.global_batch, self.seed, self.random_flip = global_batch, seed, random_flip
        self.local_batch = global_batch // process_count
        self.rows = slice(process_index * self.local_batch, (process_index + 1) * self.local_batch)

    def at(self, step: int) -> dict[str, np.ndarray]:
        idx = global_indices(len(self.data), self.global_batch, self.seed, step)[self.rows]
        images, labels = self.data.read(idx)
        if self.random_flip:
            # Flips come from (seed, step) and the example's position in the global batch, like the order.
            flips = np.random.default_rng([self.seed, step, 1]).random(self.global_batch)[self.rows] < 0.5
            images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
        labels = labels if labels is not None else np.zeros(len(idx), np.int32)
        return {"image": from_uint8(images), "label": labels.astype(np.int32)}

    def iterate(
        self, start_step: int = 0, prefetch: int = 2, transfer: Callable[[dict], object] | None = None
    ) -> Iterator:
        """Batches for start_step, start_step + 1, ... read ``prefetch`` steps ahead on a thread.

        ``transfer`` (e.g. onto the devices: ``lambda b: parallel.global_batch(b, mesh)``) runs on that thread too, so
        that the step finds its batch already in place; the iterator then yields what it returns. Close the iterator
        (``.close()``) when done: that stops the thread and waits for it, so that no transfer is cut off by the
        process's exit (a daemon thread killed inside XLA aborts the interpreter).
        """
        results: dict[int, object] = {}
        ready = threading.Condition()
        stop = threading.Event()

        def produce():
            step = start_step
            while not stop.is_set():
                try:
                    batch = self.at(step)
                    batch = transfer(batch) if transfer is not None else batch
                except Exception as e:  # handed to the consumer, which raises it
                    batch = _Failed(e)
                with ready:
                    while len(results) >= prefetch and not stop.is_set():
                        ready.wait(0.1)
                    results[step] = batch
                    ready.notify_all()
                if isinstance(batch, _Failed):
                    return
                step += 1

        worker = threading.Thread(target=produce, daemon=True, name="jaxdiff-batches")
        worker.start()
        step = start_step
        try:
            while True:
                with ready:
                    while step not in results:
                        ready.wait(0.1)
                    batch = results.pop(step)
                    ready.notify_all()
                if isinstance(batch, _Failed):
                    raise batch.error
                yield batch
                step += 1
        finally:
            stop.set()
            worker.join()


@dataclasses.dataclass
class _Failed:
    """A batch that could not be read (the reading thread's exception)."""

    error: Exception


def make_batches(
    config: DataConfig, *, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1
) -> Batches:
    """Open ``config``'s split (:func:`open_split`) and return its :class:`Batches` for this process."""
    return Batches(
        open_split(config),
        global_batch=global_batch,
        seed=seed,
        random_flip=config.random_flip,
        process_index=process_index,
        process_count=process_count,
    )
