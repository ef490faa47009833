"""Input pipelines: TFDS image datasets, batched as a pure function of (seed, step), held in memory or streamed.

One concept per module:

* :mod:`~jaxdiff.data.config`: :class:`DataConfig`, what to read and how to shape it (no TensorFlow);
* :mod:`~jaxdiff.data.prepare`: the TFDS builder of a dataset, prepared offline or only when asked to download;
* :mod:`~jaxdiff.data.readers`: a split in host memory (:class:`InMemory`) or streamed from ArrayRecord
  (:class:`Streamed`), and :func:`open_split`, which picks one;
* :mod:`~jaxdiff.data.batches`: the batches of a run as a function of (seed, step) (:class:`Batches`);
* :mod:`~jaxdiff.data.digits`: the built-in ``digits`` dataset (scikit-learn's bundled 8x8 digits, 1,797 images,
  split 1,500 train / 297 test), built offline on first use.

Nothing is downloaded unless asked (``download=True``). ``from jaxdiff.data import DataConfig`` loads neither
TensorFlow nor TFDS; the readers load TFDS on first use.
"""

import importlib

from jaxdiff.data.config import KNOWN_DATASETS, READERS, DataConfig

# Names that need TFDS, imported on first use.
_LAZY = {
    "Batches": "jaxdiff.data.batches",
    "Digits": "jaxdiff.data.digits",
    "InMemory": "jaxdiff.data.readers",
    "Streamed": "jaxdiff.data.readers",
    "global_indices": "jaxdiff.data.batches",
    "load_split": "jaxdiff.data.readers",
    "make_batches": "jaxdiff.data.batches",
    "num_classes": "jaxdiff.data.prepare",
    "open_split": "jaxdiff.data.readers",
    "resize_square": "jaxdiff.data.readers",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxdiff.data' has no attribute {name!r}")


__all__ = ["KNOWN_DATASETS", "READERS", "DataConfig", *sorted(_LAZY)]
