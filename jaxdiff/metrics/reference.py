"""The reference statistics of a dataset split under an extractor, computed once and cached: of the whole split
(:func:`reference_stats`, streamed for a split too large for memory) or of each class (:func:`class_reference_stats`).

The cache files, ``<cache_dir()>/fid_stats/<extractor>_<dataset>_<split>_<size>.npz``, are written atomically by
process 0; every process reads them, and they agree on whether to compute them again.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Callable

import numpy as np

from jaxdiff import parallel
from jaxdiff.data.config import DataConfig
from jaxdiff.data.readers import InMemory, load_split, open_split
from jaxdiff.errors import DataError
from jaxdiff.logs import log
from jaxdiff.metrics.fid import FeatureStats, _save_npz, feature_stats
from jaxdiff.xla_flags import jaxdiff_cache_dir

__all__ = ["cache_dir", "class_reference_stats", "reference_stats", "streamed_feature_stats"]


def class_reference_stats(
    extractor, data: DataConfig, directory: str | os.PathLike | None = None, log=log
) -> dict[int, FeatureStats]:
    """The feature statistics of each class of the split ``data`` (its labels), from the cache or computed once."""
    path = _stats_path(extractor, data, directory, "_per_class")

    def read():
        with np.load(path) as f:
            return {int(k): FeatureStats(f[f"mu_{k}"], f[f"sigma_{k}"], int(f[f"num_{k}"])) for k in f["classes"]}

    cached = _read_cache(path, read)
    if cached is not None:
        return cached
    images, labels = load_split(dataclasses.replace(data, random_flip=False))
    if labels is None:
        raise DataError(f"{data.dataset} {data.split} has no labels: no per-class statistics.")
    features, _ = extractor(images)
    stats = {int(k): feature_stats(features[labels == k]) for k in np.unique(labels)}
    arrays = {"classes": np.asarray(sorted(stats))}
    for k, st in stats.items():
        arrays.update({f"mu_{k}": st.mu, f"sigma_{k}": st.sigma, f"num_{k}": np.asarray(st.num)})
    _save_npz(path, **arrays)
    return stats


def _stats_path(extractor, data: DataConfig, directory, suffix: str = "") -> pathlib.Path:
    """``<directory or cache_dir()>/fid_stats/<extractor>_<dataset>_<split>_<size><suffix>.npz``, made file-safe."""
    name = f"{extractor.name}_{data.dataset}_{data.split}_{data.image_size}{suffix}"
    return pathlib.Path(directory or cache_dir()) / "fid_stats" / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name) + ".npz")


def _read_cache(path: pathlib.Path, read: Callable):
    """``read()`` of a cache file, or None (computed again) when it is missing or unreadable on any process: every
    process then computes the statistics together (the extractor's batches are collectives)."""
    value, why = None, None
    if path.is_file():
        try:
            value = read()
        except Exception as e:  # a damaged cache file raises many kinds (EOFError, BadZipFile, ...): compute anew
            why = e
    if why is not None:
        log(f"The cached statistics {path} are unreadable ({why}); computing them again.")
    return value if parallel.process_verdicts(value is not None).all() else None


def cache_dir() -> pathlib.Path:
    """``$JAXDIFF_CACHE``, else ``~/.cache/jaxdiff``: cached reference statistics (and the Inception weights)."""
    return jaxdiff_cache_dir()


def reference_stats(extractor, data: DataConfig, directory: str | os.PathLike | None = None, log=log) -> FeatureStats:
    """The feature statistics of the whole split ``data`` under ``extractor``, from the cache or computed once.

    The cache file, ``<directory>/fid_stats/<extractor>_<dataset>_<split>_<size>.npz``, is written atomically.
    """
    path = _stats_path(extractor, data, directory)
    cached = _read_cache(path, lambda: FeatureStats.load(path))
    if cached is not None:
        return cached
    split = open_split(dataclasses.replace(data, random_flip=False))
    log(f"Computing the {extractor.name} statistics of {data.dataset} {data.split}, {split.describe()}, once...")
    if isinstance(split, InMemory):
        stats = feature_stats(extractor(split.images)[0])
    else:
        stats = streamed_feature_stats(extractor, split)
    stats.save(path)
    log(f"Cached them in {path}.")
    return stats


def streamed_feature_stats(extractor, split, chunk: int = 10_000) -> FeatureStats:
    """:func:`~jaxdiff.metrics.fid.feature_stats` of a split too large for memory
    (:class:`jaxdiff.data.readers.Streamed`), ``chunk`` images at a time: the sums of the features and of their outer
    products in float64, then ``mu = sum / n`` and ``sigma = (sum_outer - n mu mu^T) / (n - 1)``. Memory: one chunk
    and two ``[D, D]`` float64 sums, whatever N."""
    n = len(split)
    if n < 2:
        raise DataError(f"Feature statistics need at least 2 samples, got {n}.")
    total, outer = None, None
    for start in range(0, n, chunk):
        # Each process reads only its rows of each batch of the chunk (the extractor's batch runner).
        read = lambda index, start=start: {"image": split.read(start + index)[0]}
        features = extractor.extract(read, min(chunk, n - start))[0].astype(np.float64)
        if total is None:
            total, outer = np.zeros(features.shape[1]), np.zeros((features.shape[1],) * 2)
        total += features.sum(axis=0)
        outer += features.T @ features
    mu = total / n
    return FeatureStats(mu, (outer - n * np.outer(mu, mu)) / (n - 1), n)
