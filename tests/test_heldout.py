"""The held-out judge (jaxdiff.metrics.heldout): the copy measure on cases whose answer is known by construction, the
real-data floor's draws, and the judge's figures on real digits fed as samples."""

from __future__ import annotations

import numpy as np
import pytest

from jaxdiff import metrics
from jaxdiff.data import DataConfig, load_split
from jaxdiff.metrics import features, heldout


@pytest.fixture(scope="module")
def digits():
    train = load_split(DataConfig("digits", "train"))
    test = load_split(DataConfig("digits", "test"))
    return train, test, features.DigitsClassifier(*train)


def test_nearest_distances_equal_a_brute_force_search():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (50, 8, 8, 1), dtype=np.uint8)
    b = rng.integers(0, 256, (70, 8, 8, 1), dtype=np.uint8)
    diffs = a.reshape(50, 1, -1).astype(np.float64) / 255 - b.reshape(1, 70, -1).astype(np.float64) / 255
    want = np.sqrt((diffs**2).sum(-1)).min(axis=1)
    np.testing.assert_allclose(heldout.nearest_distances(a, b, chunk=16), want, rtol=1e-10, atol=1e-10)
    # Float images are taken as they are (no /255), and an image is at distance 0 from itself.
    np.testing.assert_allclose(heldout.nearest_distances(b.astype(np.float32) / 255, b), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be compared"):
        heldout.nearest_distances(a, np.zeros((3, 4, 4, 1), np.uint8))


def test_the_copy_measure_is_exact_on_real_digits(digits):
    (train_x, _), (test_x, _), _ = digits
    d_h = heldout.nearest_distances(test_x, train_x)
    assert d_h.min() > 0  # no test digit is a training digit
    # Held-out digits fed as samples: the median ratio is 1, the copy share the 1% quantile's ~1% (3 of 297).
    own = heldout.copy_measure(d_h, d_h)
    assert own["copy_median_ratio"] == 1.0
    assert own["copy_share"] == pytest.approx(0.01, abs=0.005)
    # Training digits fed as samples: every one a copy, at distance 0.
    copies = heldout.copy_measure(heldout.nearest_distances(train_x[:400], train_x), d_h)
    assert copies["copy_share"] == 1.0 and copies["copy_median_ratio"] == 0.0


def test_noisy_training_digits_are_copies_and_a_gaussian_mixtures_samples_are_not(digits):
    (train_x, train_y), (test_x, _), _ = digits
    rng = np.random.default_rng(1)
    d_h = heldout.nearest_distances(test_x, train_x)
    # Small noise (2 of 255 levels per pixel) leaves a training digit nearer its original than held-out digits are.
    noisy = train_x[:300].astype(np.float64) / 255 + rng.normal(0, 2 / 255, (300, 8, 8, 1))
    assert heldout.copy_measure(heldout.nearest_distances(noisy, train_x), d_h)["copy_share"] >= 0.95
    # A Gaussian per class (the class mean and covariance of the training digits) draws new digits, not copies.
    flat = train_x.reshape(len(train_x), -1).astype(np.float64) / 255
    drawn = []
    for k in range(10):
        members = flat[train_y == k]
        drawn.append(rng.multivariate_normal(members.mean(0), np.cov(members.T), size=40))
    mixture = heldout.copy_measure(heldout.nearest_distances(np.clip(np.concatenate(drawn), 0, 1), train_x), d_h)
    assert mixture["copy_share"] <= 0.05 and mixture["copy_median_ratio"] > 1.0


def test_the_floor_draws_without_replacement_up_to_the_split_and_with_it_past(digits):
    (train_x, _), (test_x, _), clf = digits
    train_features, test_features = clf(train_x)[0], clf(test_x)[0]
    reference = metrics.feature_stats(test_features)
    # All 1,500 training digits: every draw is the whole split (in another order: float round-off only), so no
    # spread and the whole split's distance.
    whole, spread = heldout.real_data_floor(train_features, reference, len(train_x), draws=3)
    assert spread < 1e-5 * whole
    assert whole == pytest.approx(metrics.frechet_distance(metrics.feature_stats(train_features), reference))
    # Past the split (with replacement) the draws differ; fewer images, a larger distance (the estimate's bias).
    _, more_spread = heldout.real_data_floor(train_features, reference, 3000, draws=4)
    fewer, _ = heldout.real_data_floor(train_features, reference, 150, draws=4)
    assert more_spread > 0 and fewer > whole


def test_the_judge_on_real_digits(digits):
    (train_x, train_y), (test_x, test_y), clf = digits
    judge = heldout.HeldoutJudge(clf, train_x, test_x, train_y, test_y, floor_draws=3, name="digits test")
    # The held-out digits themselves: at distance 0 from their own statistics (to the eigensolver's round-off), ~1%
    # near-copies, median ratio 1.
    own = judge(test_x, test_y)
    assert abs(own["fid"]) < 1e-4 and own["copy_median_ratio"] == 1.0
    assert own["copy_share"] == pytest.approx(0.01, abs=0.005)
    assert own["cond_accuracy"] > 0.95 and own["score"] > 8.5
    assert all(abs(v) < 1e-4 for v in own["fid_per_class"].values())
    # The training digits: their distance to the held-out split is the floor at N = 1,500 (every draw the same), at
    # distance 0 from their own statistics (the train-referenced figure), and all copies.
    train = judge(train_x)
    assert train["fid_ratio"] == pytest.approx(1.0, rel=1e-6) and train["floor_std"] < 1e-5 * train["floor"]
    assert abs(train["fid_train"]) < 1e-4 and train["copy_share"] == 1.0
    # A memorising model scores below the floor on the train-referenced distance, but is caught by the copy share.
    line = judge.summary(judge(train_x[:297]))
    assert "near-copies 100.0%" in line and "train-referenced" in line


def test_the_judge_for_a_dataset_reads_its_splits_and_refuses_the_train_split(digits):
    clf = digits[2]
    judge = heldout.heldout_judge(clf, DataConfig("digits", "train"))
    assert judge.num_heldout == 297 and len(judge.train_images) == 1500 and judge.class_reference is not None
    with pytest.raises(ValueError, match="never trained on"):
        heldout.heldout_judge(clf, DataConfig("digits", "train"), split="train")
