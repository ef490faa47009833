r"""Judging samples against data the model never saw, and measuring copying (the digits judge).

A Fréchet distance referenced to the *training* split rewards memorisation: a model that reproduced its training
images would score below what real unseen images score. :class:`HeldoutJudge` takes its reference from a held-out
split instead, and reports three things side by side:

- **the held-out distance and its floor.** ``fid``: the Fréchet distance of the N samples to the held-out split's
  feature statistics. ``floor``: the same distance for N real *training* images (``draws`` random draws, without
  replacement up to the split's size and with it past that; :func:`real_data_floor`), with its spread. A model whose
  samples are as good as real data sits at ``fid / floor ~ 1``; a Fréchet distance's bias depends on N, so the
  floor is always taken at the samples' own N.
- **copying** (:func:`copy_measure`). For each sample, the L2 distance in pixel space (pixels in [0, 1]) to its
  nearest training image, :math:`d_s`; for each held-out image the same, :math:`d_h`. Then

  .. math::

      \text{median ratio} = \frac{\operatorname{median} d_s}{\operatorname{median} d_h},
      \qquad
      \text{copy share} = \Pr\big(d_s < q_{0.01}(d_h)\big),

  where :math:`q_{0.01}(d_h)` is the 1% quantile of the held-out distances: a sample counts as a near-copy when it
  is closer to a training image than 99% of real unseen images are. Held-out images fed as samples give a median
  ratio of 1 and a copy share of ~1% by construction; training images fed as samples give 0 and 1.
- **the train-referenced distance** (``fid_train``), labelled as such: what the digits FID was before, for
  comparison only.

CIFAR-10 and the other image datasets keep the field's convention (the train split's statistics, as in the DDPM
paper); this judge serves the digits, whose 297-image test split the models never train on.
"""

from __future__ import annotations

import warnings

import numpy as np

from jaxdiff.errors import ConfigError
from jaxdiff.metrics.fid import FeatureStats, feature_stats, features_quality, frechet_distance

__all__ = ["COPY_QUANTILE", "HELDOUT_SPLITS", "HeldoutJudge", "copy_measure", "heldout_judge", "nearest_distances"]
__all__ += ["real_data_floor", "uses_heldout_judge"]

#: A sample is a near-copy when it is nearer a training image than this share of held-out images is (1%).
COPY_QUANTILE = 0.01


def nearest_distances(images: np.ndarray, train: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """``[N]`` L2 distance of each of ``images [N, ...]`` to its nearest of ``train [M, ...]``, in float64.

    uint8 images are read as pixels in [0, 1] (``/ 255``); float images are taken as they are. The squared distance
    is expanded as ``|a|^2 + |b|^2 - 2 a.b`` in float64 (exact to ~1e-12 at these sizes), ``chunk`` rows at a time.
    """
    a, b = _pixels(images), _pixels(train)
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"Images of {a.shape[1]} values cannot be compared with training images of {b.shape[1]}.")
    b_sq = np.einsum("md,md->m", b, b)
    out = np.empty(len(a), np.float64)
    for start in range(0, len(a), chunk):
        part = a[start : start + chunk]
        sq = np.einsum("nd,nd->n", part, part)[:, None] + b_sq[None, :] - 2.0 * part @ b.T
        out[start : start + chunk] = np.sqrt(np.clip(sq.min(axis=1), 0.0, None))
    return out


def _pixels(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    flat = images.reshape(len(images), -1).astype(np.float64)
    return flat / 255.0 if images.dtype == np.uint8 else flat


def copy_measure(sample_distances: np.ndarray, heldout_distances: np.ndarray, quantile: float = COPY_QUANTILE) -> dict:
    """Copying, from nearest-training distances (:func:`nearest_distances`) of samples ``d_s`` and held-out ``d_h``.

    Returns:
      ``{"copy_share", "copy_median_ratio", "copy_threshold"}``: the share of samples with ``d_s`` below the
      ``quantile`` of ``d_h`` (the threshold), and ``median(d_s) / median(d_h)``.
    """
    d_s, d_h = np.asarray(sample_distances, np.float64), np.asarray(heldout_distances, np.float64)
    if d_s.size == 0 or d_h.size == 0:
        raise ConfigError("The copy measure needs at least one sample and one held-out distance.")
    threshold = float(np.quantile(d_h, quantile))
    return {
        "copy_share": float(np.mean(d_s < threshold)),
        "copy_median_ratio": float(np.median(d_s) / np.median(d_h)),
        "copy_threshold": threshold,
    }


def real_data_floor(
    train_features: np.ndarray, reference: FeatureStats, n: int, draws: int = 30, seed: int = 0
) -> tuple[float, float]:
    """``(mean, std)`` over ``draws`` of the Fréchet distance of ``n`` real training feature vectors to
    ``reference`` (the held-out split's): what real data scores at the samples' ``n``.

    Each draw takes ``n`` rows of ``train_features [M, D]`` without replacement when ``n <= M``, with it past ``M``.
    ``std`` is the spread across draws (ddof 1; 0 for one draw).
    """
    rng = np.random.default_rng(seed)
    m = len(train_features)
    values = []
    with warnings.catch_warnings():  # the rank warning of n <= D is the samples' too: the floor shares their bias
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(draws):
            rows = rng.choice(m, n, replace=n > m)
            values.append(frechet_distance(feature_stats(train_features[rows]), reference))
    return float(np.mean(values)), float(np.std(values, ddof=1)) if draws > 1 else 0.0


class HeldoutJudge:
    """Samples against a held-out split: distance and floor, copying, score, and the train-referenced distance.

    Args:
      extractor: a feature extractor (:mod:`jaxdiff.metrics.features`) ``images -> (features, probs)``.
      train_images, heldout_images: uint8 ``[M, H, W, C]`` and ``[K, H, W, C]``: what the model trained on, and a
        split it never saw.
      train_labels, heldout_labels: the classes, for class-conditional samples (per-class distances to the held-out
        images of each class, and their floors).
      floor_draws: draws of real training images for each floor.
      name: what the held-out split is, for the log line (``"digits test"``).
    """

    def __init__(
        self,
        extractor,
        train_images: np.ndarray,
        heldout_images: np.ndarray,
        train_labels: np.ndarray | None = None,
        heldout_labels: np.ndarray | None = None,
        floor_draws: int = 30,
        name: str = "held-out",
    ):
        self.extractor, self.floor_draws, self.name = extractor, floor_draws, name
        self.train_images = np.asarray(train_images)
        self.train_features, _ = extractor(self.train_images)
        heldout_features, _ = extractor(np.asarray(heldout_images))
        self.reference = feature_stats(heldout_features)
        self.train_reference = feature_stats(self.train_features)
        self.heldout_distances = nearest_distances(heldout_images, self.train_images)
        self.num_heldout = len(heldout_images)
        self.train_labels, self.heldout_labels = train_labels, heldout_labels
        self.class_reference = None
        if train_labels is not None and heldout_labels is not None:
            with warnings.catch_warnings():  # a few dozen images per class: biased, as the floor that goes with it
                warnings.simplefilter("ignore", UserWarning)
                self.class_reference = {
                    int(k): feature_stats(heldout_features[heldout_labels == k]) for k in np.unique(heldout_labels)
                }
        self._floors: dict[tuple[int, int | None], tuple[float, float]] = {}

    def floor(self, n: int, label: int | None = None) -> tuple[float, float]:
        """``(mean, std)`` of the distance of ``n`` real training images (of class ``label``) to the held-out ones."""
        if (n, label) not in self._floors:
            if label is None:
                feats, ref = self.train_features, self.reference
            else:
                feats, ref = self.train_features[self.train_labels == label], self.class_reference[label]
            self._floors[n, label] = real_data_floor(feats, ref, n, self.floor_draws)
        return self._floors[n, label]

    def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict:
        """Judge uint8 ``images [N, H, W, C]`` (drawn for classes ``labels``, if conditional).

        Returns:
          ``fid`` (to the held-out split), ``floor`` and ``floor_std`` (real training images at the same N),
          ``fid_ratio`` (``fid / floor``), ``fid_train`` (to the training split, for comparison only), ``score`` and
          ``score_std`` (the classifier score, one split below 10,000 samples), the copy measure
          (:func:`copy_measure`), ``num_samples``; with ``labels`` and a classifier of the dataset's classes also
          ``cond_accuracy``, and with the held-out labels ``fid_per_class`` and ``floor_per_class``.
        """
        images = np.asarray(images)
        features, probs = self.extractor(images)
        classifies = getattr(self.extractor, "classifies", False)
        result = features_quality(features, probs, self.reference, None, labels, self.class_reference, classifies)
        floor, floor_std = self.floor(len(images))
        result.update(floor=floor, floor_std=floor_std, fid_ratio=result["fid"] / floor)
        result["fid_train"] = frechet_distance(feature_stats(features), self.train_reference)
        result.update(copy_measure(nearest_distances(images, self.train_images), self.heldout_distances))
        if "fid_per_class" in result:  # each class's floor at its own count of samples
            counts = {k: int(np.sum(np.asarray(labels) == k)) for k in result["fid_per_class"]}
            result["floor_per_class"] = {k: self.floor(n, k)[0] for k, n in counts.items()}
        return result

    def summary(self, result: dict) -> str:
        """One line: the held-out distance against its floor, copying, the score, and the train-referenced figure."""
        line = (
            f"FD {result['fid']:.3f} to the {self.name} split, {result['fid_ratio']:.2f}x the real-data floor "
            f"{result['floor']:.3f} +- {result['floor_std']:.3f}; near-copies {100 * result['copy_share']:.1f}% "
            f"(nearest-training distance {result['copy_median_ratio']:.2f}x held-out's)"
        )
        if "score" in result:
            line += f", score {result['score']:.3f}"
        if "cond_accuracy" in result:
            line += f", conditional accuracy {result['cond_accuracy']:.3f}"
        if "fid_per_class" in result:
            ratios = [result["fid_per_class"][k] / result["floor_per_class"][k] for k in result["fid_per_class"]]
            line += f", per-class FD {np.mean(ratios):.2f}x its floor (mean over classes)"
        return line + f"; train-referenced FD {result['fid_train']:.3f}"


#: Datasets judged by :class:`HeldoutJudge` (by default, with the digits classifier): name -> held-out split.
HELDOUT_SPLITS = {"digits": "test"}


def uses_heldout_judge(data, extractor) -> bool:
    """Whether samples of dataset ``data`` (a DataConfig) under ``extractor`` are judged against a held-out split
    (:data:`HELDOUT_SPLITS`: the digits, by a classifier of their own classes)."""
    return data.dataset in HELDOUT_SPLITS and getattr(extractor, "classifies", False)


def heldout_judge(extractor, data, split: str | None = None, floor_draws: int = 30) -> HeldoutJudge:
    """The :class:`HeldoutJudge` of dataset ``data`` (a DataConfig): its train split against ``split`` (by default
    :data:`HELDOUT_SPLITS`' entry), with the labels of both when the extractor's classes are the dataset's."""
    import dataclasses

    from jaxdiff.data.readers import load_split

    split = split or HELDOUT_SPLITS.get(data.dataset)
    if split is None or split == "train":
        raise ConfigError(f"A held-out judge needs a split the model never trained on, not {split!r}.")
    read = lambda s: load_split(dataclasses.replace(data, split=s, random_flip=False))
    train_images, train_labels = read("train")
    heldout_images, heldout_labels = read(split)
    classes = getattr(extractor, "classifies", False) and train_labels is not None and heldout_labels is not None
    return HeldoutJudge(
        extractor,
        train_images,
        heldout_images,
        train_labels if classes else None,
        heldout_labels if classes else None,
        floor_draws=floor_draws,
        name=f"{data.dataset} {split}",
    )
