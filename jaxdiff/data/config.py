"""What a run reads and how it is shaped: :class:`DataConfig` (``config.data``, field for field).

Light on purpose: neither TensorFlow nor TFDS is imported here, so the types that name a dataset (a run's
:class:`~jaxdiff.spec.ModelSpec`, a Pipeline's ``data``) do not load them.
"""

from __future__ import annotations

import dataclasses

from jaxdiff.errors import ConfigError, DataError

#: The datasets jaxdiff's configs name (any TFDS image dataset works).
KNOWN_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "celeb_a", "celeb_a_hq", "lsun")
#: How a split is read (``DataConfig.reader``): chosen by size, whole in memory, or streamed.
READERS = ("auto", "memory", "stream")
#: The datasets whose images all have one size, and that size: ``DataConfig.image_size = None`` reads them at it.
_OWN_SIZES = {"digits": 8, "mnist": 28, "fashion_mnist": 28, "cifar10": 32}

__all__ = ["KNOWN_DATASETS", "READERS", "DataConfig"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to shape it.

    ``config.data`` of a run, field for field, with configs/default.py's defaults (CIFAR-10 at 32x32, flipped), as every
    other section's dataclass has that file's values: ``DataConfig()`` is what ``config.data`` of the default config
    resolves to (tests/test_config.py checks the two agree). The size defaults to the dataset's own, so that
    ``DataConfig(dataset="digits")`` still reads the digits at 8x8.

    Attributes:
      dataset: a TFDS name (``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``, ``celeb_a``, ``lsun/church_outdoor``,
        ... any TFDS image dataset).
      split: e.g. ``train``, ``test``, ``train[:90%]``.
      eval_split: the held-out split (the bound in bits/dim).
      image_size: output height = width (images are centre-cropped to a square, then resized, if they differ).
        ``None``: the dataset's own size, for those whose images have one (digits 8, mnist and fashion_mnist 28,
        cifar10 32); any other dataset needs it set. Resolved when built: the field of a DataConfig is an int.
      random_flip: flip each image left-right with probability 1/2.
      data_dir: TFDS data directory (``None``: TFDS's default, ``~/tensorflow_datasets``).
      download: allow TFDS to download and prepare a dataset that is not prepared yet.
      class_conditional: the model is given the labels (``label_key``).
      image_key, label_key: the feature names in the dataset.
      reader: how the split is read (:func:`jaxdiff.data.readers.open_split`): ``memory`` (whole, once), ``stream``
        (random access, only this process's rows of each batch; the dataset must be stored as ArrayRecord), or
        ``auto``: ``memory`` when the split, decoded at ``image_size``, takes at most ``memory_limit_gb``, else
        ``stream``.
      memory_limit_gb: the largest split (decoded uint8 at ``image_size``) that ``auto`` holds in memory.
    """

    dataset: str = "cifar10"
    split: str = "train"
    eval_split: str = "test"
    image_size: int | None = None
    random_flip: bool = True
    data_dir: str | None = None
    download: bool = False
    class_conditional: bool = False
    image_key: str = "image"
    label_key: str = "label"
    reader: str = "auto"
    memory_limit_gb: float = 4.0

    def __post_init__(self):
        if self.image_size is None:
            if self.dataset not in _OWN_SIZES:
                known = ", ".join(f"{name} {size}" for name, size in _OWN_SIZES.items())
                raise ConfigError(
                    f"config.data.image_size is None (the dataset's own size), which jaxdiff knows only for {known}: "
                    f"set config.data.image_size for {self.dataset!r} (e.g. 64)."
                )
            object.__setattr__(self, "image_size", _OWN_SIZES[self.dataset])
        if self.reader not in READERS:
            raise DataError(f"config.data.reader must be one of {READERS}, got {self.reader!r}.")
        if not self.memory_limit_gb >= 0:
            raise DataError(f"config.data.memory_limit_gb must be >= 0, got {self.memory_limit_gb}.")
