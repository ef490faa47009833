"""The probability-flow ODE's likelihood against closed forms: with the exact denoiser of Gaussian data the flow is
linear, so log p_0 is known exactly; Hutchinson's estimate is unbiased; bits/dim of 8-bit images; sample.py."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import likelihood
from jaxdiff.schedules import log_sigma_at, log_sigmas, make_schedule
from tests.helpers import ROOT, fake_run

T = 1000
FULL = make_schedule("linear", T)
MEAN = np.array([0.3, -0.2, 0.1, 0.4])
COV = 0.2 * np.array([[1, 0.8, 0.5, 0.2], [0.8, 1, 0.6, 0.4], [0.5, 0.6, 1, 0.7], [0.2, 0.4, 0.7, 1]])
SHAPE = (2, 2, 1)


def exact_output(prediction):
    """The exact eps/x0/v of N(MEAN, COV) at any (fractional) timestep, its level read by ``log_sigma_at``."""
    lam, vecs = np.linalg.eigh(COV)
    lam, vecs, mean = (jnp.asarray(a, jnp.float32) for a in (lam, vecs, MEAN))

    def model_fn(x_t, timesteps):
        a = jax.nn.sigmoid(-2.0 * log_sigma_at(FULL, timesteps))[:, None]
        x = x_t.reshape(x_t.shape[0], -1)
        eps = (jnp.sqrt(1.0 - a) * ((x - jnp.sqrt(a) * mean) @ vecs) / (a * lam + 1.0 - a)) @ vecs.T
        x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
        out = {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0}[prediction]
        return out.reshape(x_t.shape)

    return model_fn


def closed_form_log_prob(x):
    """log p_0(x) of the model: N(0, I) at the last step carried back by the exact (linear) flow, in float64.

    In x~ = x / sqrt(abar) and sigma, x~ ~ N(m, S + sigma^2 I) and z = (S + sigma^2 I)^(-1/2) (x~ - m) is constant
    along the flow. So x~_T is known in closed form, and log p_0(x) = log N(x_T; 0, I) + D log sqrt(abar_T)
    + [log N(x~_0; m, S + s0^2) - log N(x~_T; m, S + s1^2)] - D log sqrt(abar_0).
    """
    sigmas = np.exp(np.asarray(log_sigmas(FULL), np.float64)[[0, -1]])
    root_abar = 1.0 / np.sqrt(1.0 + sigmas**2)
    d = len(MEAN)

    def root(c):
        w, v = np.linalg.eigh(c)
        return v @ np.diag(np.sqrt(w)) @ v.T

    def log_normal(y, c):
        r = y - MEAN
        return -0.5 * np.einsum("bi,ij,bj->b", r, np.linalg.inv(c), r) - 0.5 * np.linalg.slogdet(2 * np.pi * c)[1]

    c0, c1 = COV + sigmas[0] ** 2 * np.eye(d), COV + sigmas[1] ** 2 * np.eye(d)
    x_tilde0 = np.asarray(x, np.float64).reshape(len(x), -1) / root_abar[0]
    x_tilde1 = MEAN + (x_tilde0 - MEAN) @ np.linalg.inv(root(c0)).T @ root(c1).T
    x_T = root_abar[1] * x_tilde1
    prior = -0.5 * np.sum(x_T**2, 1) - 0.5 * d * np.log(2 * np.pi) + d * np.log(root_abar[1])
    return prior + log_normal(x_tilde0, c0) - log_normal(x_tilde1, c1) - d * np.log(root_abar[0])


POINTS = jax.random.normal(jax.random.key(1), (16, *SHAPE)) * 0.5 + MEAN.reshape(SHAPE).astype(np.float32)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_exact_divergence_gives_the_gaussian_log_density_to_1e_3(prediction):
    run = jax.jit(lambda x: likelihood.ode_log_likelihood(FULL, exact_output(prediction), x, prediction=prediction))
    result = run(POINTS)
    want = closed_form_log_prob(POINTS)
    np.testing.assert_allclose(result.log_prob, want, rtol=1e-3, atol=1e-3)  # 1e-3 of max(|log p|, 1 nat)
    # The prior term is only a small part of the answer: the flow's own integral carries it.
    assert np.all(np.abs(np.asarray(result.delta)) > 10) and 5 < int(result.num_steps) < 200
    # And the density is the one of the data smoothed by the first step's noise (the prior N(0, I) at the last
    # step is off by ~1e-3 nats from the exact marginal there).
    a0 = float(FULL.alphas_cumprod[0])
    c = a0 * COV + (1 - a0) * np.eye(4)
    r = np.asarray(POINTS, np.float64).reshape(16, 4) - np.sqrt(a0) * MEAN
    nll = 0.5 * np.einsum("bi,ij,bj->b", r, np.linalg.inv(c), r) + 0.5 * np.linalg.slogdet(2 * np.pi * c)[1]
    np.testing.assert_allclose(-np.asarray(result.log_prob), nll, rtol=1e-2, atol=2e-2)


def test_hutchinson_is_unbiased_and_per_image_keys_make_it_batch_independent():
    x = jnp.broadcast_to(POINTS[:1], (256, *SHAPE))
    keys = jax.random.split(jax.random.key(4), 256)
    run = jax.jit(lambda x, k: likelihood.ode_log_likelihood(FULL, exact_output("eps"), x, k, divergence="hutchinson"))
    estimates = np.asarray(run(x, keys).log_prob, np.float64)
    want = closed_form_log_prob(POINTS[:1])[0]
    assert estimates.std() > 0.1  # one probe per image: noisy ...
    assert abs(estimates.mean() - want) < 4 * estimates.std() / np.sqrt(256)  # ... and unbiased
    with pytest.raises(ValueError, match="needs a key"):
        likelihood.ode_log_likelihood(FULL, exact_output("eps"), x, divergence="hutchinson")
    with pytest.raises(ValueError, match="Unknown divergence"):
        likelihood.ode_log_likelihood(FULL, exact_output("eps"), x, divergence="trace")


def test_bits_per_dim_of_8_bit_images_count_the_bin_width():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, *SHAPE)), jnp.float32) / 127.5 - 1.0
    keys = jax.random.split(jax.random.key(0), 8)
    bpd, result = jax.jit(lambda x, k: likelihood.ode_bits_per_dim(FULL, exact_output("eps"), x, k))(images, keys)
    dequantised = likelihood.dequantize(images, keys)
    assert float(jnp.abs(dequantised - images).max()) <= 1 / 255 + 1e-7  # within each pixel's bin ...
    assert float(jnp.abs(dequantised - images).max()) > 0.9 / 255  # ... and filling it
    np.testing.assert_array_equal(likelihood.dequantize(images[3:5], keys[3:5]), dequantised[3:5])  # per-image keys
    np.testing.assert_allclose(bpd, -(np.asarray(result.log_prob) + 4 * np.log(2 / 255)) / (4 * np.log(2)), rtol=1e-6)


def test_sample_py_eval_ode_bpd_writes_each_image_and_the_mean(tmp_path, subprocess_env):
    fake_run(tmp_path / "run")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            f"--workdir={tmp_path / 'run'}",
            "--eval=ode_bpd",
            "--eval_images=6",
            "--batch_size=4",
            "--divergence=hutchinson",
            "--tolerance=1e-3",
            f"--out={tmp_path / 'out'}",
        ],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "out" / "ode_bpd.json").read_text())
    assert written["num_examples"] == 6 and len(written["per_image"]) == 6
    assert written["bpd"] == pytest.approx(np.mean(written["per_image"]))
    assert 0 < written["bpd"] < 20 and re.search(r"ODE bits/dim \d+\.\d+ \+- ", result.stdout), result.stdout
