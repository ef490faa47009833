"""Evaluation of a :class:`~jaxdiff.pipeline.Pipeline`: the bound in bits/dim over a whole split, FID and the
Inception Score.

* :func:`bound_over_split` -- DDPM's NLL (Table 2) with :func:`jaxdiff.pipeline.make_bound_fn`: the bound's total,
  its prior, denoising and reconstruction terms and the per-t curve, averaged over every image of a split, with one
  PRNG key per image (``fold_in(key, index)``) so the figure depends neither on the batch size nor on the device
  count.
* :func:`frechet_distance` of two :class:`FeatureStats`, computed in float64:
  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``; :func:`inception_score`:
  ``exp(E_x KL(p(y|x) || p(y)))`` over splits of the samples.
* :func:`reference_stats` -- the statistics of a dataset split under an extractor, computed once and cached.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from jaxdiff import parallel
from jaxdiff.data import DataConfig, InMemory, load_split, open_split
from jaxdiff.logs import is_main_process, log
from jaxdiff.xla_flags import jaxdiff_cache_dir

TERMS = ("total", "prior", "denoising", "reconstruction")


# ---------------------------------------------------------------------------------------------------------------------
# Feature statistics, FID, Inception Score


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
        raise FileNotFoundError(f"No reference statistics file {path}.")
    try:
        with np.load(path) as f:
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
            num = int(f["num"]) if "num" in f.files else 0
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not an .npz with 'mu' and 'sigma' ({e}).") from e
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{path}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}.")
    if dim is not None and mu.size != dim:
        raise ValueError(f"{path} holds statistics of {mu.size} features; the extractor gives {dim}.")
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
        raise ValueError(f"Feature statistics need at least 2 samples, got {n}.")
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
        raise ValueError(f"Feature dimensions differ: {a.mu.shape} vs {b.mu.shape}; use the same extractor.")
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
        raise ValueError(f"The Inception Score over {splits} splits needs at least {splits} samples, got {len(probs)}.")
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


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
        raise ValueError(f"{data.dataset} {data.split} has no labels: no per-class statistics.")
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
    """:func:`feature_stats` of a split too large for memory (:class:`jaxdiff.data.Streamed`), ``chunk`` images at a
    time: the sums of the features and of their outer products in float64, then ``mu = sum / n`` and
    ``sigma = (sum_outer - n mu mu^T) / (n - 1)``. Memory: one chunk and two ``[D, D]`` float64 sums, whatever N."""
    n = len(split)
    if n < 2:
        raise ValueError(f"Feature statistics need at least 2 samples, got {n}.")
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
    With ``class_reference`` (:func:`class_reference_stats`) also ``fid_per_class``: each class's samples against that
    class's reference images (few samples per class: biased upwards, for comparing settings).
    """
    features, probs = extractor(images)
    result = {"fid": frechet_distance(feature_stats(features), reference), "num_samples": len(images)}
    if probs is not None:
        splits = splits or (10 if len(images) >= 10_000 else 1)
        result["score"], result["score_std"] = inception_score(probs, splits=splits)
    if labels is not None and probs is not None and getattr(extractor, "classifies", False):
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


# ---------------------------------------------------------------------------------------------------------------------
# The bound over a split


@dataclasses.dataclass(frozen=True)
class SplitBound:
    """The bound averaged over ``num_examples`` images, in bits/dim: the terms, their standard errors, the per-t curve.

    ``per_timestep[0]`` is L_0 (reconstruction) and ``per_timestep[i]`` the KL term L_i at the paper's t = i + 1.
    """

    total: float
    prior: float
    denoising: float
    reconstruction: float
    total_stderr: float
    per_timestep: np.ndarray
    num_examples: int

    def to_json(self, **extra) -> dict:
        terms = {k: getattr(self, k) for k in TERMS}
        return {
            **extra,
            "num_examples": self.num_examples,
            "bits_per_dim": terms,
            "total_stderr": self.total_stderr,
            "per_timestep_bits_per_dim": [float(x) for x in self.per_timestep],
        }

    def write_json(self, path: str | os.PathLike, **extra) -> str:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(**extra), indent=1))
        return str(path)


def bound_over_split(
    bound_fn: Callable,
    params,
    images: np.ndarray,
    key: jax.Array,
    batch_size: int,
    labels: np.ndarray | None = None,
    mesh=None,
    progress: Callable[[int], None] | None = None,
) -> SplitBound:
    """The bound of every image of ``images`` (uint8 ``[N, H, W, C]``), averaged; image i uses ``fold_in(key, i)``.

    ``bound_fn`` is :func:`jaxdiff.pipeline.make_bound_fn`'s, compiled over ``mesh``. ``labels`` (int ``[N]``) are
    given to a conditional network. The batches run through :func:`jaxdiff.parallel.map_batches` (each process feeds
    its rows, the last batch padded), so the figure depends neither on the batch size nor on the device or process
    count; every process gets it.
    """
    result = _over_split(bound_fn, params, images, key, batch_size, labels, mesh, progress)
    result = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), result)
    n = len(images)
    means = {k: float(getattr(result, k).mean()) for k in TERMS}
    stderr = float(result.total.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return SplitBound(**means, total_stderr=stderr, per_timestep=result.per_timestep.mean(axis=0), num_examples=n)


def ode_bpd_over_split(
    bpd_fn: Callable,
    params,
    images: np.ndarray,
    key: jax.Array,
    batch_size: int,
    labels: np.ndarray | None = None,
    mesh=None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """The probability-flow ODE's bits/dim of every image of ``images`` (uint8 ``[N, H, W, C]``), float64 ``[N]``, and
    the solver's steps of each batch; image i's dequantisation and probe from ``fold_in(key, i)``.

    ``bpd_fn`` is :func:`jaxdiff.pipeline.make_ode_bpd_fn`'s, compiled over ``mesh``; the batches run as in
    :func:`bound_over_split`. The solver's steps are shared by a batch, so an image's figure moves with its batch
    within the tolerances.
    """
    bits, steps = _over_split(bpd_fn, params, images, key, batch_size, labels, mesh, progress)
    return bits.astype(np.float64), [int(s) for s in steps[::batch_size]]


def _over_split(fn: Callable, params, images, key, batch_size: int, labels, mesh, progress):
    """``fn(params, images, keys, labels)`` (a function jitted over ``mesh``) over every image of a split, image i
    keyed ``fold_in(key, i)``, through :func:`jaxdiff.parallel.map_batches`."""
    mesh = mesh or parallel.make_mesh()
    if len(images) == 0:
        raise ValueError("No images to evaluate.")
    params = parallel.replicate(params, mesh)
    inputs = {"image": images, "label": None if labels is None else np.asarray(labels, np.int32)}
    run = lambda batch: fn(params, batch["image"], batch["key"], batch.get("label"))
    return parallel.map_batches(run, inputs, len(images), batch_size, mesh, key=key, progress=progress)
