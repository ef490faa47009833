"""Judging samples: feature extractors, the Fréchet distance and the Inception Score, and cached reference
statistics.

One concept per module:

* :mod:`~jaxdiff.metrics.inception`: the FID Inception network (TF-GAN's ``inception-2015-12-05`` graph) in Flax,
  and its weights;
* :mod:`~jaxdiff.metrics.features`: extractors, uint8 images -> (features, class probabilities): the Inception's,
  and a small classifier of the 8x8 digits (:func:`make_extractor` picks one);
* :mod:`~jaxdiff.metrics.fid`: feature statistics, :func:`frechet_distance`, :func:`inception_score`, and
  :func:`sample_quality` (both for a set of samples);
* :mod:`~jaxdiff.metrics.reference`: the statistics of a dataset split, computed once and cached;
* :mod:`~jaxdiff.metrics.heldout`: samples against a split the model never saw (the digits judge): the distance
  against a real-data floor at the same N, and the share of near-copies of training images.
"""

from jaxdiff.metrics.features import DigitsClassifier, InceptionFeatures, make_extractor
from jaxdiff.metrics.fid import (
    FeatureStats,
    feature_stats,
    frechet_distance,
    inception_score,
    load_precomputed_stats,
    sample_quality,
)
from jaxdiff.metrics.heldout import HeldoutJudge, copy_measure, heldout_judge, nearest_distances, real_data_floor
from jaxdiff.metrics.inception import InceptionV3, load_inception
from jaxdiff.metrics.reference import cache_dir, class_reference_stats, reference_stats, streamed_feature_stats

__all__ = [
    "DigitsClassifier",
    "FeatureStats",
    "HeldoutJudge",
    "InceptionFeatures",
    "InceptionV3",
    "cache_dir",
    "class_reference_stats",
    "copy_measure",
    "feature_stats",
    "frechet_distance",
    "heldout_judge",
    "inception_score",
    "load_inception",
    "load_precomputed_stats",
    "make_extractor",
    "nearest_distances",
    "real_data_floor",
    "reference_stats",
    "sample_quality",
    "streamed_feature_stats",
]
