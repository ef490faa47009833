"""The built-in ``digits`` dataset: scikit-learn's bundled 8x8 digits as a TFDS dataset, built offline on first use.

Importing this module registers the builder with TFDS under the name ``digits``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

__all__ = ["Digits"]


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
