r"""Sample quality from feature statistics: the Fréchet distance (FID), the Inception Score, and both for a set of
samples (:func:`sample_quality`). Plain NumPy in float64.

.. math::

    \mathrm{FD} = \|\mu_1 - \mu_2\|^2 + \operatorname{tr}\big(\Sigma_1 + \Sigma_2
      - 2 (\Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2})^{1/2}\big),
    \qquad
    \mathrm{IS} = \exp\big(\mathbb{E}_x\, D_{KL}(p(y|x) \,\|\, p(y))\big).

The features come from an extractor of :mod:`jaxdiff.metrics.features` (the FID Inception, or the digits
classifier); the reference statistics of a dataset from :mod:`jaxdiff.metrics.reference`.
"""

from __future__ import annotations

import math
import os
import pathlib
import warnings
from typing import NamedTuple

import numpy as np

from jaxdiff.errors import ConfigError, MissingFileError
from jaxdiff.logs import is_main_process

__all__ = ["FeatureStats", "feature_stats", "frechet_distance", "inception_score", "load_precomputed_stats"]
__all__ += ["features_quality", "sample_quality"]


class FeatureStats(NamedTuple):
    """Mean ``[D]`` and covariance ``[D, D]`` (float64, unbiased) of ``num`` feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int

    def save(self, path: str | os.PathLike) -> None:
        _save_npz(path, mu=self.mu, sigma=self.sigma, num=self.num)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        with np.load(path) as f:
            return cls(f["mu"], f["sigma"], int(f["num"]))


def load_precomputed_stats(path: str | os.PathLike, dim: int | None = None) -> FeatureStats:
    """Reference statistics from a standard precomputed ``.npz`` with ``mu [D]`` and ``sigma [D, D]`` (as written by
    TTUR's and pytorch-fid's tools, or :meth:`FeatureStats.save`). ``num`` is read when the file has it, else 0.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the arrays are missing, mis-shaped, or not of ``dim`` features (the extractor's).
    """
    if not os.path.isfile(path):
        raise MissingFileError(f"No reference statistics file {path}.")
    try:
        with np.load(path) as f:
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
            num = int(f["num"]) if "num" in f.files else 0
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path} is not an .npz with 'mu' and 'sigma' ({e}).") from e
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ConfigError(f"{path}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}.")
    if dim is not None and mu.size != dim:
        raise ConfigError(f"{path} holds statistics of {mu.size} features; the extractor gives {dim}.")
    return FeatureStats(mu, sigma, num)


def _save_npz(path: str | os.PathLike, **arrays) -> None:
    """``np.savez`` through a temporary file (of this process's own) and a rename: never a half-written cache file.
    On several processes only process 0 writes (they all computed the same arrays)."""
    if not is_main_process():
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def feature_stats(features: np.ndarray) -> FeatureStats:
    """Statistics of ``features [N, D]`` accumulated in float64 (in slices, so 50,000 x 2048 needs no float64 copy).

    Warns when N <= D: the covariance is then rank-deficient and the FID estimate biased (the standard is N = 50,000
    for the 2048 Inception features).
    """
    n, d = features.shape
    if n < 2:
        raise ConfigError(f"Feature statistics need at least 2 samples, got {n}.")
    if n <= d:
        warnings.warn(
            f"FID from {n} samples of {d}-dimensional features: the covariance estimate is rank-deficient and the "
            f"FID is biased upwards. Use more than {d} samples (50,000 is the standard for Inception features).",
            UserWarning,
            stacklevel=2,
        )
    total = np.zeros(d, np.float64)
    for start in range(0, n, 4096):
        total += features[start : start + 4096].astype(np.float64).sum(axis=0)
    mu = total / n
    sigma = np.zeros((d, d), np.float64)
    for start in range(0, n, 4096):
        centred = features[start : start + 4096].astype(np.float64) - mu
        sigma += centred.T @ centred
    return FeatureStats(mu, sigma / (n - 1), n)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """The Fréchet distance between the Gaussians N(a.mu, a.sigma) and N(b.mu, b.sigma), in float64.

    tr((S1 S2)^1/2) is computed as the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    S1^1/2 S2 S1^1/2 (same eigenvalues as S1 S2), which avoids the complex round-off of a general matrix sqrtm.
    """
    if a.mu.shape != b.mu.shape:
        raise ConfigError(f"Feature dimensions differ: {a.mu.shape} vs {b.mu.shape}; use the same extractor.")
    diff = np.asarray(a.mu, np.float64) - np.asarray(b.mu, np.float64)
    s1, s2 = np.asarray(a.sigma, np.float64), np.asarray(b.sigma, np.float64)
    root = _sqrtm_psd(s1)
    middle = root @ s2 @ root
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """``exp(E_x KL(p(y|x) || p(y)))`` on each of ``splits`` equal parts of ``probs [N, K]``: (mean, std) over parts.

    Between 1 (every prediction the same, or each one uniform) and K (confident, evenly spread predictions). The
    digits classifier score uses the same formula with the digits classifier's probabilities.
    """
    probs = np.asarray(probs, np.float64)
    if len(probs) < splits:
        raise ConfigError(
            f"The Inception Score over {splits} splits needs at least {splits} samples, got {len(probs)}."
        )
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def sample_quality(
    extractor,
    images: np.ndarray,
    reference: FeatureStats,
    splits: int | None = None,
    labels: np.ndarray | None = None,
    class_reference: dict[int, FeatureStats] | None = None,
) -> dict:
    """FID against ``reference`` and the score (Inception Score, or digits classifier score) of uint8 ``images``.

    ``splits`` of the score: by default the standard 10 from 10,000 samples on, else 1 (a split of a few hundred
    samples estimates p(y) poorly and biases the score down).

    For class-conditional samples, ``labels`` (the class each image was drawn for) adds ``cond_accuracy``: the share
    the classifier puts in the requested class (extractors whose classes are the dataset's: the digits classifier).
    With ``class_reference`` (:func:`~jaxdiff.metrics.reference.class_reference_stats`) also ``fid_per_class``: each
    class's samples against that class's reference images (few samples per class: biased upwards, for comparing
    settings).
    """
    features, probs = extractor(images)
    classifies = getattr(extractor, "classifies", False)
    return features_quality(features, probs, reference, splits, labels, class_reference, classifies)


def features_quality(
    features: np.ndarray,
    probs: np.ndarray | None,
    reference: FeatureStats,
    splits: int | None = None,
    labels: np.ndarray | None = None,
    class_reference: dict[int, FeatureStats] | None = None,
    classifies: bool = False,
) -> dict:
    """:func:`sample_quality` of features ``[N, D]`` and probabilities ``[N, K]`` (or None) already extracted;
    ``classifies``: whether the probabilities are over the dataset's classes (then ``labels`` give
    ``cond_accuracy``)."""
    result = {"fid": frechet_distance(feature_stats(features), reference), "num_samples": len(features)}
    if probs is not None:
        splits = splits or (10 if len(features) >= 10_000 else 1)
        result["score"], result["score_std"] = inception_score(probs, splits=splits)
    if labels is not None and probs is not None and classifies:
        labels = np.asarray(labels)
        result["cond_accuracy"] = float(np.mean(np.argmax(probs, axis=1) == labels))
        if class_reference:
            with warnings.catch_warnings():  # a few dozen samples per class: biased, but comparable across settings
                warnings.simplefilter("ignore", UserWarning)
                result["fid_per_class"] = {
                    int(k): frechet_distance(feature_stats(features[labels == k]), ref)
                    for k, ref in sorted(class_reference.items())
                    if np.sum(labels == k) >= 2
                }
    return result
