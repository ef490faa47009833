"""Samplers: with the exact denoiser of Gaussian data they reproduce the data's mean and covariance; the scan equals a
Python loop step by step; DDIM is deterministic at eta = 0, equals DDPM at eta = 1, and inverts; respacing with all
steps changes nothing; guidance at w = 0 is the conditional model; trajectories; bad input."""

import dataclasses
import decimal
import functools
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import parallel, pipeline, samplers
from jaxdiff.samplers.ode import _phi2, _phi3
from jaxdiff.schedules import beta_schedule, log_sigma_at, log_sigmas, make_schedule, snr_spaced_timesteps, timestep_at
from tests import reference
from tests.helpers import ROOT, fake_run

T = 1000
SHAPE = (2, 2, 1)  # four dimensions per "image", independent Gaussians
DATA_MEAN = np.array([0.5, -0.3, 0.2, 0.0], np.float32).reshape(SHAPE)
DATA_VAR = np.array([0.25, 0.04, 0.5, 0.1], np.float32).reshape(SHAPE)


FULL = make_schedule("linear", T)


def optimal_eps(x_t, timesteps):
    """E[eps | x_t] for data N(DATA_MEAN, diag(DATA_VAR)): sqrt(1 - a) (x_t - sqrt(a) mu) / (a var + 1 - a)."""
    a = FULL.alphas_cumprod[timesteps].reshape((-1,) + (1,) * len(SHAPE))
    return jnp.sqrt(1.0 - a) * (x_t - jnp.sqrt(a) * DATA_MEAN) / (a * DATA_VAR + 1.0 - a)


def optimal_output(prediction):
    """The same optimal model, predicting eps, x0 or v."""

    def model_fn(x_t, timesteps):
        a = FULL.alphas_cumprod[timesteps].reshape((-1,) + (1,) * len(SHAPE))
        eps = optimal_eps(x_t, timesteps)
        x0 = (x_t - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
        return {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0}[prediction]

    return model_fn


def assert_moments_match_the_data(x, slack=0.01):
    """Mean and variance within 5 standard errors of the sample (plus ``slack`` for the sampler's own bias)."""
    x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    n = x.shape[0]
    mean, var = DATA_MEAN.ravel(), DATA_VAR.ravel()
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * np.sqrt(var / n) + slack)
    np.testing.assert_array_less(np.abs(x.var(0) - var), 5 * var * np.sqrt(2 / n) + slack)
    cov = np.cov(x.T)
    off = cov[~np.eye(cov.shape[0], dtype=bool)]
    assert np.all(np.abs(off) < 5 * np.sqrt(np.outer(var, var)[~np.eye(4, dtype=bool)] / n) + slack)


N = 8000


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddpm_sampling_with_the_optimal_denoiser_reproduces_the_data(prediction):
    sample = jax.jit(
        lambda key: samplers.ddpm_sample(
            FULL, optimal_output(prediction), (N, *SHAPE), key, prediction=prediction, clip_x0=False
        )
    )
    assert_moments_match_the_data(sample(jax.random.key(0)))


@pytest.mark.parametrize(("steps", "eta"), [(100, 0.0), (250, 0.5), (1000, 1.0)])
def test_ddim_sampling_with_the_optimal_denoiser_reproduces_the_data(steps, eta):
    schedule = samplers.sampling_schedule("linear", T, steps)
    sample = jax.jit(lambda key: samplers.ddim_sample(schedule, optimal_eps, (N, *SHAPE), key, eta=eta, clip_x0=False))
    assert_moments_match_the_data(sample(jax.random.key(1)), slack=0.02)


def test_the_data_check_has_power():
    """The moment check above rejects samples from a distribution only slightly off the data."""
    x = DATA_MEAN + np.sqrt(DATA_VAR * 1.15) * np.random.default_rng(0).standard_normal((N, *SHAPE))
    with pytest.raises(AssertionError):
        assert_moments_match_the_data(x)


def python_loop(step_fn, x, ts, key):
    xs, preds = [], []
    for t in ts:
        x, pred = step_fn(x, jnp.int32(t), jax.random.fold_in(key, t))
        xs.append(x)
        preds.append(pred)
    return np.stack(xs), np.stack(preds)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_the_scan_equals_a_python_loop_step_by_step(sampler):
    schedule = samplers.sampling_schedule("linear", T, 20)
    key, x_T = jax.random.key(3), jax.random.normal(jax.random.key(4), (5, *SHAPE))
    kwargs = {"variance": "fixed_large"} if sampler == "ddpm" else {"eta": 0.7}
    step = functools.partial(getattr(samplers, f"{sampler}_step"), schedule, optimal_eps, clip_x0=True, **kwargs)
    ref_x, ref_pred = python_loop(step, x_T, range(19, -1, -1), key)
    run = getattr(samplers, f"{sampler}_sample")
    x0, traj = jax.jit(
        lambda: run(schedule, optimal_eps, x_T.shape, key, x_T=x_T, trajectory_every=1, clip_x0=True, **kwargs)
    )()
    np.testing.assert_allclose(traj.x, ref_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(traj.pred_x0, ref_pred, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(traj.t, np.arange(19, -1, -1))
    np.testing.assert_array_equal(x0, traj.x[-1])


def test_trajectories_have_the_documented_shapes():
    schedule = samplers.sampling_schedule("linear", T, 10)
    x0, traj = samplers.ddim_sample(schedule, optimal_eps, (3, *SHAPE), jax.random.key(0), trajectory_every=4)
    chex.assert_shape([traj.x, traj.pred_x0], (3, 3, *SHAPE))  # ceil(10 / 4) snapshots: after steps 4, 8 and 10
    np.testing.assert_array_equal(traj.t, [6, 2, 0])
    full = samplers.ddim_sample(schedule, optimal_eps, (3, *SHAPE), jax.random.key(0))
    np.testing.assert_array_equal(traj.x[-1], full)
    np.testing.assert_array_equal(x0, full)
    _, every_step = samplers.ddim_sample(schedule, optimal_eps, (3, *SHAPE), jax.random.key(0), trajectory_every=1)
    np.testing.assert_array_equal(every_step.x[np.array([3, 7, 9])], traj.x)


def test_ddim_with_eta_0_is_deterministic_and_inverts():
    x_T = jax.random.normal(jax.random.key(0), (64, *SHAPE))
    errors = {}
    for steps in (100, 500):
        schedule = samplers.sampling_schedule("linear", T, steps)
        decode = jax.jit(
            lambda x_T, key, s=schedule: samplers.ddim_sample(s, optimal_eps, x_T.shape, key, x_T=x_T, clip_x0=False)
        )
        images = decode(x_T, jax.random.key(1))
        np.testing.assert_array_equal(images, decode(x_T, jax.random.key(2)))  # the key plays no part at eta = 0
        encoded = jax.jit(lambda x, s=schedule: samplers.ddim_invert(s, optimal_eps, x))(images)
        errors[steps] = float(jnp.max(jnp.abs(decode(encoded, jax.random.key(3)) - images)))
        assert float(jnp.max(jnp.abs(encoded - x_T))) < 0.1 * 500 / steps
    # Images have std ~0.5; the round trip is off by ~1e-2 at 500 steps and the error falls as the steps shrink
    # (measured 0.054 at 100 steps, 0.012 at 500: first order in the step, like the approximation it makes).
    assert errors[500] < 0.02 and errors[500] < errors[100] / 3


def test_ddim_with_eta_1_is_ancestral_sampling_on_the_same_schedule():
    schedule = samplers.sampling_schedule("linear", T, 25, spacing="quadratic")
    key = jax.random.key(7)
    ddim = samplers.ddim_sample(schedule, optimal_eps, (16, *SHAPE), key, eta=1.0)
    ddpm = samplers.ddpm_sample(schedule, optimal_eps, (16, *SHAPE), key, variance="fixed_small")
    np.testing.assert_allclose(ddim, ddpm, rtol=1e-5, atol=1e-5)


def test_respacing_with_all_steps_is_plain_ddpm():
    respaced = samplers.sampling_schedule("linear", T, T)
    np.testing.assert_array_equal(respaced.timestep_map, np.arange(T))
    np.testing.assert_allclose(respaced.betas, FULL.betas, rtol=1e-6)
    key = jax.random.key(5)
    run = jax.jit(lambda s: samplers.ddpm_sample(s, optimal_eps, (8, *SHAPE), key), static_argnums=())
    np.testing.assert_allclose(run(respaced), run(FULL), rtol=1e-5, atol=1e-6)


def optimal_eps_float64(x_t, timestep):
    """:func:`optimal_eps` at one original timestep, in numpy float64."""
    a = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))[timestep]
    return np.sqrt(1.0 - a) * (x_t - np.sqrt(a) * DATA_MEAN) / (a * DATA_VAR + 1.0 - a)


# A variance output that varies with the pixel: v in (-0.9, 0.9) for learned_range, log sigma^2 for learned.
VARIANCE_OUTPUTS = {"learned_range": lambda x, tanh: 0.9 * tanh(2.0 * x), "learned": lambda x, tanh: tanh(x) - 3.0}


@pytest.mark.parametrize("variance", ["learned_range", "learned"])
def test_learned_variances_sample_with_their_own_variance(variance):
    """ddpm_sample against tests/reference.py's float64 ancestral loop, which reads the variance output by improved
    DDPM's formulas (log sigma^2 = v, or frac log beta + (1 - frac) log beta~ with frac = (v + 1) / 2) and forms the
    mean by DDPM's eq. 11, on the same x_T and the same step noise."""
    schedule = samplers.sampling_schedule("linear", T, 10)
    kept = np.arange(10) * 111  # even spacing: round(i * 999 / 9)
    np.testing.assert_array_equal(schedule.timestep_map, kept)
    key, shape = jax.random.key(2), (4, *SHAPE)
    x_T = jax.random.normal(jax.random.key(6), shape)

    def learned(x, t):
        return jnp.concatenate([optimal_eps(x, t), VARIANCE_OUTPUTS[variance](x, jnp.tanh)], axis=-1)

    run = lambda: samplers.ddpm_sample(schedule, learned, shape, key, variance=variance, clip_x0=False, x_T=x_T)
    x = jax.jit(run)()
    # Step t's noise is normal(fold_in(key, t)) (ddpm_sample's documented draw).
    noise = [np.asarray(jax.random.normal(jax.random.fold_in(key, t), shape), np.float64) for t in range(10)]
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))[kept]
    model = lambda x, i: (optimal_eps_float64(x, kept[i]), VARIANCE_OUTPUTS[variance](x, np.tanh))
    x_T64 = np.asarray(x_T, np.float64)
    want = reference.ancestral_sample(abar, model, variance, x_T64, noise)
    np.testing.assert_allclose(x, want, rtol=0, atol=2e-6)  # measured (AMD EPYC): 4.4e-7 at most, on |x| up to 1.1
    # The reference has power: the same loop with the variance output ignored (beta~, fixed_small) lands elsewhere.
    fixed = lambda x, i: (optimal_eps_float64(x, kept[i]), -np.ones_like(x))
    assert np.abs(reference.ancestral_sample(abar, fixed, "learned_range", x_T64, noise) - want).max() > 0.1
    # DDIM uses the mean half only: the variance half changes nothing.
    a = samplers.ddim_sample(schedule, learned, shape, key, variance=variance)
    b = samplers.ddim_sample(schedule, optimal_eps, shape, key)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_guidance_at_w_0_is_the_conditional_model_and_extrapolates_otherwise():
    def apply(x, t, labels):  # a "conditional network": the label shifts the prediction
        return optimal_eps(x, t) + 0.1 * labels.reshape(-1, 1, 1, 1).astype(jnp.float32)

    labels, null = jnp.array([0, 3, 5, 9]), 10
    x, t = jax.random.normal(jax.random.key(0), (4, *SHAPE)), jnp.array([10, 200, 500, 999])
    np.testing.assert_allclose(samplers.guided(apply, labels, null, 0.0)(x, t), apply(x, t, labels), rtol=1e-6)
    w = 2.5
    expected = (1 + w) * apply(x, t, labels) - w * apply(x, t, jnp.full_like(labels, null))
    np.testing.assert_allclose(samplers.guided(apply, labels, null, w)(x, t), expected, rtol=1e-5, atol=1e-6)
    learned = samplers.guided(
        lambda x, t, y: jnp.concatenate([apply(x, t, y), y.reshape(-1, 1, 1, 1) + 0 * x], -1),
        labels,
        null,
        w,
        variance="learned",
    )(x, t)
    np.testing.assert_allclose(learned[..., :1], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(learned[..., 1:], np.broadcast_to(labels.reshape(-1, 1, 1, 1), x.shape))


def test_autoguidance_cancels_a_guide_error_that_is_the_main_error_scaled():
    """A guide whose error is k times the main network's: w = 1 / (k - 1) steps exactly onto the true denoiser."""
    error = lambda x, t: 0.05 * jnp.sin(3.0 * x) * (t.reshape(-1, 1, 1, 1) / 1000.0)
    main = lambda x, t: optimal_eps(x, t) + error(x, t)
    k = 3.0
    guide = lambda x, t: optimal_eps(x, t) + k * error(x, t)
    x, t = jax.random.normal(jax.random.key(1), (4, *SHAPE)), jnp.array([10, 200, 500, 999])
    exact = samplers.autoguided(main, guide, 1.0 / (k - 1.0))(x, t)
    np.testing.assert_allclose(exact, optimal_eps(x, t), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(main(x, t) - optimal_eps(x, t)).max()) > 1e-2  # the main network alone is off
    w = 0.7  # any other scale: the affine combination
    np.testing.assert_allclose(
        samplers.autoguided(main, guide, w)(x, t), (1 + w) * main(x, t) - w * guide(x, t), rtol=1e-5, atol=1e-6
    )

    def unused(x, t):
        raise AssertionError("w = 0 must not call the guide")

    assert samplers.autoguided(main, unused, 0.0) is main
    with_var = lambda f, v: lambda x, t: jnp.concatenate([f(x, t), jnp.full_like(x, v)], -1)
    learned = samplers.autoguided(with_var(main, 0.25), with_var(guide, 0.75), w, variance="learned_range")(x, t)
    np.testing.assert_allclose(learned[..., :1], (1 + w) * main(x, t) - w * guide(x, t), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(learned[..., 1:], np.full(x.shape, 0.25, np.float32))  # the main's variance


def test_bad_input():
    with pytest.raises(ValueError, match=r"steps must lie in \[1, 1000\]"):
        samplers.sampling_schedule("linear", T, 1001)
    with pytest.raises(ValueError, match="steps must lie"):
        samplers.sampling_schedule("linear", T, 0)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        samplers.ddim_sample(FULL, optimal_eps, (1, *SHAPE), jax.random.key(0), eta=-0.1)
    with pytest.raises(ValueError, match="trajectory_every must be >= 1"):
        samplers.ddim_sample(FULL, optimal_eps, (1, *SHAPE), jax.random.key(0), trajectory_every=0)
    np.testing.assert_allclose(beta_schedule("linear", T)[[0, -1]], [1e-4, 0.02])


# ------------------------------------------------------------------------------- the probability-flow ODE solvers


def ode_endpoint(x_T):
    """The closed form of the probability-flow ODE for the Gaussian data: z = (x_t - sqrt(a) m) / sqrt(a v + 1 - a)
    is constant along it, so from x_T at t = T - 1 it reaches x at t = 0, and the last step returns E[x_0 | x]."""
    abar = np.cumprod(1.0 - beta_schedule("linear", T))
    a_T, a_0 = abar[-1], abar[0]
    z = (np.asarray(x_T, np.float64) - np.sqrt(a_T) * DATA_MEAN) / np.sqrt(a_T * DATA_VAR + 1 - a_T)
    return DATA_MEAN + np.sqrt(a_0) * DATA_VAR * z / np.sqrt(a_0 * DATA_VAR + 1 - a_0)


def ode_error(sampler, steps, spacing="logsnr", prediction="eps", x_T=None):
    """The largest distance of the sampler's x_0 from :func:`ode_endpoint`, over 64 draws of x_T."""
    x_T = jax.random.normal(jax.random.key(5), (64, *SHAPE)) if x_T is None else x_T
    schedule = samplers.respaced(beta_schedule("linear", T), steps, spacing)
    kwargs = dict(x_T=x_T, prediction=prediction)
    run = {
        "dpm++2m": lambda: samplers.dpm_solver_sample(
            schedule, optimal_output(prediction), x_T.shape, KEY, order=2, **kwargs
        ),
        "dpm++3m": lambda: samplers.dpm_solver_sample(
            schedule, optimal_output(prediction), x_T.shape, KEY, order=3, **kwargs
        ),
        "dpm++3m-ref": lambda: samplers.dpm_solver_sample(
            schedule, optimal_output(prediction), x_T.shape, KEY, order=3, third_order="reference", **kwargs
        ),
        "heun": lambda: samplers.heun_sample(schedule, optimal_output(prediction), x_T.shape, KEY, **kwargs),
        "ddim": lambda: samplers.ddim_sample(
            schedule, optimal_output(prediction), x_T.shape, KEY, clip_x0=False, **kwargs
        ),
    }[sampler]
    return float(np.abs(np.asarray(jax.jit(run)(), np.float64) - ode_endpoint(x_T)).max())


KEY = jax.random.key(0)


@pytest.mark.parametrize(
    ("sampler", "steps", "min_slope", "max_slope"),
    [
        ("ddim", (20, 40, 80, 160), 0.8, 1.2),  # first order: the control
        ("dpm++2m", (20, 40, 80, 160), 1.8, 2.6),
        ("heun", (20, 40, 80, 160), 1.8, 2.6),
        ("dpm++3m", (10, 20, 40, 80), 2.7, 5.0),
        ("dpm++3m-ref", (10, 20, 40, 80), 2.2, 3.2),  # the reference codes' half third-order term: ~2.7 here
    ],
)
def test_ode_solvers_converge_to_the_closed_form_at_their_order(sampler, steps, min_slope, max_slope):
    errors = [ode_error(sampler, n) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert min_slope <= slope <= max_slope, (errors, slope)
    assert errors[-1] < (0.06 if sampler == "ddim" else 5e-3), errors


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_ode_solvers_serve_every_prediction(prediction):
    for sampler in ("dpm++2m", "heun"):
        assert ode_error(sampler, 40, prediction=prediction) == pytest.approx(ode_error(sampler, 40), abs=2e-4)


def test_snr_spacings_are_distinct_sorted_and_spread_by_noise_level():
    betas = beta_schedule("linear", T)
    log_sigma = 0.5 * (np.log1p(-np.cumprod(1 - betas)) - np.log(np.cumprod(1 - betas)))
    for spacing in ("logsnr", "karras"):
        for n in (2, 10, 50, 1000):
            kept = snr_spaced_timesteps(betas, n, spacing)
            assert len(kept) == n and kept[0] == 0 and kept[-1] == T - 1 and np.all(np.diff(kept) > 0)
    gaps = np.diff(log_sigma[snr_spaced_timesteps(betas, 10, "logsnr")])
    np.testing.assert_allclose(gaps, gaps.mean(), rtol=0.25)  # evenly spaced in log-SNR, up to rounding to steps
    with pytest.raises(ValueError, match="Unknown spacing"):
        samplers.respaced(betas, 10, "cosine")


def phi_closed_forms(h: float) -> tuple[float, float]:
    """phi_2(h) = (h - 1 + e^-h) / h and phi_3(h) = (h^2 - 2h + 2 - 2 e^-h) / (2 h^2) as written, in 40-digit decimal
    arithmetic (float64 would lose phi_3's digits to cancellation below h ~ 1e-3)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        x = decimal.Decimal(float(h))
        e = (-x).exp()
        return float((x - 1 + e) / x), float((x * x - 2 * x + 2 - 2 * e) / (2 * x * x))


@pytest.mark.parametrize("jit", [False, True])
def test_the_phi_functions_are_float32_exact_over_every_step_size(jit):
    """DPM-Solver++ 3M's phi_2 and phi_3 in float32 against their closed forms, relative error <= 1e-6 over a dense
    log grid of h in [1e-4, 5] (measured: 1.2e-7 and 1.8e-7 at most; a 5-term series up to h = 0.5 was 1.4e-5 off, and
    the bare float32 closed forms are 4e-6 and 1e-4 off at h = 0.1); finite at h = 0 and for huge h."""
    h = np.geomspace(1e-4, 5.0, 4001).astype(np.float32)
    want = np.array([phi_closed_forms(v) for v in h])  # at the float32 grid points themselves
    edges = jnp.array([0.0, 1e-30, 1e4, 1e30], jnp.float32)
    edge_values = {
        _phi2: [0.0, 1e-30 / 2, 1.0 - 1e-4, 1.0],
        _phi3: [0.0, 1e-30 / 6, 0.5 - 1e-4, 0.5],
    }  # ~h/2, h/6 near 0; 1 - 1/h, 1/2 - 1/h far
    for i, phi in enumerate((_phi2, _phi3)):
        run = jax.jit(phi) if jit else phi
        got = run(jnp.asarray(h))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got, np.float64), want[:, i], rtol=1e-6, atol=0, err_msg=phi.__name__)
        np.testing.assert_allclose(run(edges), edge_values[phi], rtol=1e-6, err_msg=phi.__name__)


def test_dynamic_thresholding_leaves_images_in_range_alone_and_rescales_the_rest():
    x = jnp.stack([jnp.linspace(-0.9, 0.9, 16).reshape(4, 4, 1), jnp.linspace(-3.0, 3.0, 16).reshape(4, 4, 1)])
    out = samplers.dynamic_threshold(x, 0.9)
    np.testing.assert_allclose(out[0], x[0])  # s = max(1, quantile) = 1: unchanged
    s = float(jnp.quantile(jnp.abs(x[1]), 0.9))
    np.testing.assert_allclose(out[1], jnp.clip(x[1], -s, s) / s, rtol=1e-6)
    assert float(jnp.abs(out).max()) <= 1.0


# ----------------------------------------------------------------------------------- sample.py and many devices


def test_sample_py_writes_the_grid_the_pngs_and_an_npz_for_fid_tools(tmp_path, subprocess_env):
    fake_run(tmp_path / "run")
    cmd = [sys.executable, str(ROOT / "sample.py"), f"--workdir={tmp_path / 'run'}", "--num_samples=10"]
    result = subprocess.run(
        [*cmd, "--batch_size=4", "--sampler=ddim", "--steps=5", f"--out={tmp_path / 'out'}"],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"Wrote 10 images 8x8x1 .* images/s", result.stdout), result.stdout
    images = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0
    from PIL import Image

    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir())[-1] == "000009.png"
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "images" / "000004.png")), images[4, ..., 0])
    assert (tmp_path / "out" / "grid.png").is_file()
    # The same request gives the same images (image i from fold_in(key(seed), i)); bad requests fail clearly.
    pipe = pipeline.from_workdir(tmp_path / "run")
    run = pipeline.make_sampler(pipe, "ddim", 5)
    np.testing.assert_array_equal(pipeline.generate(pipe, run, 10, 4, seed=0), images)
    missing = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), f"--workdir={tmp_path / 'none'}"],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert missing.returncode == 2 and "No checkpoint in" in missing.stderr


def test_bad_sampling_requests_fail_before_any_compile(tmp_path):
    fake_run(tmp_path)
    model = pipeline.from_workdir(tmp_path)
    with pytest.raises(ValueError, match=r"steps must lie in \[1, 100\]"):
        pipeline.check_request(model, "ddim", 101, 0.0, None, 0.0)
    with pytest.raises(ValueError, match="steps must lie"):
        pipeline.check_request(model, "ddpm", 0, 0.0, None, 0.0)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        pipeline.check_request(model, "ddim", 10, -1.0, None, 0.0)
    with pytest.raises(ValueError, match="unconditional"):
        pipeline.check_request(model, "ddim", 10, 0.0, 3, 0.0)
    with pytest.raises(ValueError, match="unconditional"):
        pipeline.check_request(model, "ddim", 10, 0.0, None, 2.0)
    with pytest.raises(ValueError, match="Unknown sampler"):
        pipeline.check_request(model, "dpm", 10, 0.0, None, 0.0)
    with pytest.raises(ValueError, match="eta is a DDIM setting"):
        pipeline.check_request(model, "heun", 10, 0.5, None, 0.0)
    conditional = dataclasses.replace(model, num_classes=10)
    with pytest.raises(ValueError, match=r"label must lie in \[0, 9\]"):
        pipeline.check_request(conditional, "ddpm", None, 0.0, 10, 1.0)
    np.testing.assert_array_equal(pipeline.labels_for(5, 3, None), [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(pipeline.labels_for(3, 3, 2), [2, 2, 2])


def test_the_pipeline_s_samplers_are_their_float64_update_loops_on_their_own_grids():
    """make_sampler's images against tests/reference.py's float64 loops of each update formula (DDIM at eta = 0,
    DPM-Solver++ 3M by quadrature of its interpolant, Heun's method in sigma), for a closed-form network in a Pipeline:
    the optimal eps of Gaussian data whose mean, 1.5 in the first pixel, makes the x_0 clip bite. Each sampler runs on
    its own grid of 6 steps: even in t for DDIM, even in log-SNR for DPM-Solver++, Karras et al.'s for Heun."""
    betas = np.linspace(1e-4, 0.02, T)
    abar = np.cumprod(1.0 - betas)
    abar32 = jnp.asarray(abar, jnp.float32)

    def apply_fn(params, x, t, labels):
        a = abar32[t].reshape(-1, 1, 1, 1)
        return jnp.sqrt(1.0 - a) * (x - jnp.sqrt(a) * params["mean"]) / (a * params["var"] + 1.0 - a)

    params = {"mean": jnp.asarray(3.0 * DATA_MEAN), "var": jnp.asarray(DATA_VAR)}
    pipe = pipeline.Pipeline(apply_fn, params, betas, clip_x0=True, image_shape=SHAPE)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(3), jnp.arange(4))
    # A 6-step chain draws image b's x_T from normal(fold_in(keys[b], 6)) (the samplers' documented draw).
    x_T = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, 6), SHAPE), np.float64) for k in keys])
    grids = {
        "ddim": np.array([0, 200, 400, 599, 799, 999]),  # round(i * 999 / 5)
        "dpm++3m": reference.noise_level_grid(abar, 6, "logsnr"),
        "heun": reference.noise_level_grid(abar, 6, "karras"),
    }
    loops = {
        "ddim": reference.ddim_deterministic_sample,
        "dpm++3m": reference.dpm_solver_pp_3m_sample,
        "heun": reference.heun_sample,
    }
    # Measured (AMD EPYC): 1.4e-6 (DDIM), 1.7e-5 (DPM-Solver++), 1.1e-6 (Heun). Most of it is abar in float32: near
    # abar = 1 its 1 - abar keeps few digits (dpm_solver_sample takes log1p(-abar) of it). Clipping x_0, or another
    # grid, moves the images by 0.46 or more.
    tolerances = {"ddim": 5e-6, "dpm++3m": 6e-5, "heun": 5e-6}
    for sampler, grid in grids.items():

        def denoise(x, i, grid=grid):
            a = abar[grid[i]]
            eps = np.sqrt(1.0 - a) * (x - np.sqrt(a) * 3.0 * DATA_MEAN) / (a * DATA_VAR + 1.0 - a)
            return np.clip((x - np.sqrt(1.0 - a) * eps) / np.sqrt(a), -1.0, 1.0)

        images = np.asarray(pipeline.make_sampler(pipe, sampler, 6)(params, keys), np.float64)
        want = loops[sampler](abar[grid], denoise, x_T)
        np.testing.assert_allclose(images, want, rtol=0, atol=tolerances[sampler], err_msg=sampler)
        assert np.abs(images).max() <= 1.0 + 1e-6  # the last step returns the clipped x_0


# ----------------------------------------------------------------------------- Heun's churn, SDEdit and RePaint


def eps_between_steps(x_t, timesteps):
    """The optimal eps at fractional timesteps: the level is read as the solvers write it (``log_sigma_at``)."""
    a = jax.nn.sigmoid(-2.0 * log_sigma_at(FULL, timesteps)).reshape((-1,) + (1,) * len(SHAPE))
    return jnp.sqrt(1.0 - a) * (x_t - jnp.sqrt(a) * DATA_MEAN) / (a * DATA_VAR + 1.0 - a)


def test_fractional_timesteps_and_noise_levels_are_inverse_and_exact_on_the_steps():
    levels = np.asarray(log_sigma_at(FULL, jnp.arange(T)))
    abar = np.cumprod(1.0 - beta_schedule("linear", T))
    np.testing.assert_allclose(levels, 0.5 * np.log((1 - abar) / abar), rtol=1e-5, atol=1e-5)
    t = jnp.linspace(0.0, T - 1.0, 777)
    np.testing.assert_allclose(timestep_at(FULL, log_sigma_at(FULL, t)), t, atol=2e-3)
    # On a respaced schedule the network is still called with the original timesteps.
    short = samplers.respaced(beta_schedule("linear", T), 10)
    np.testing.assert_allclose(timestep_at(short, log_sigmas(short)), short.timestep_map, atol=1e-3)
    np.testing.assert_allclose(
        eps_between_steps(jnp.ones((3, *SHAPE)), jnp.array([0, 400, 999])),
        optimal_eps(jnp.ones((3, *SHAPE)), jnp.array([0, 400, 999])),
        rtol=1e-3,
        atol=1e-5,
    )


def test_heun_with_churn_still_samples_the_data_and_without_it_is_the_ode_solver():
    schedule = samplers.respaced(beta_schedule("linear", T), 40, "karras")
    run = jax.jit(
        lambda key, churn: samplers.heun_sample(schedule, eps_between_steps, (N, *SHAPE), key, s_churn=churn),
        static_argnums=1,
    )
    churned = run(jax.random.key(2), 40.0)
    assert_moments_match_the_data(churned, slack=0.02)
    x_T = jax.random.normal(jax.random.fold_in(jax.random.key(2), 40), (N, *SHAPE))
    assert float(jnp.abs(churned - run(jax.random.key(2), 0.0)).mean()) > 0.05  # the churn changes the path
    direct = samplers.heun_sample(schedule, optimal_eps, x_T.shape, KEY, x_T=x_T)  # the same x_T, no churn
    np.testing.assert_allclose(run(jax.random.key(2), 0.0), direct, atol=1e-4)
    with pytest.raises(ValueError, match="s_churn >= 0"):
        samplers.heun_sample(schedule, optimal_eps, (1, *SHAPE), KEY, s_churn=-1.0)


def test_heun_s_churn_calls_the_network_at_the_whole_chain_s_timestep_of_the_raised_level():
    """Issue #31: on Karras et al.'s grid of 10 steps, churn raises each level by 1 + gamma (gamma = s_churn / 10 = 0.2)
    and must call the network at the raised level's timestep along the whole chain, not between the kept steps
    (1.2 times step 102's level: 121.9, not 130.5)."""
    betas = beta_schedule("linear", T)
    schedule = samplers.respaced(betas, 10, "karras")
    kept = np.asarray(schedule.timestep_map)
    calls = []

    def model_fn(x_t, timesteps):  # records each call's timestep, in the order the compiled sampler makes them
        jax.debug.callback(lambda t: calls.append(float(t)), timesteps[0], ordered=True)
        return eps_between_steps(x_t, timesteps)

    jax.jit(lambda: samplers.heun_sample(schedule, model_fn, (1, *SHAPE), KEY, s_churn=2.0))().block_until_ready()
    jax.effects_barrier()
    # Step i calls the network at its raised level, then (all but the last) at the kept step below.
    raised, corrections = np.array(calls[::2]), np.array(calls[1::2])
    np.testing.assert_array_equal(corrections, kept[-2::-1])
    sigma = jnp.exp(log_sigmas(schedule))
    sigma_hat = jnp.minimum(1.2 * sigma, sigma[-1])[::-1]  # capped at the top level
    np.testing.assert_allclose(raised, timestep_at(FULL, jnp.log(sigma_hat)), rtol=0, atol=1e-4)
    # The same against float64 numpy, and the numbers.
    abar = np.cumprod(1.0 - betas)
    chain = 0.5 * np.log((1.0 - abar) / abar)
    want = np.interp(np.minimum(np.log(1.2) + chain[kept], chain[-1])[::-1], chain, np.arange(T))
    np.testing.assert_allclose(raised, want, rtol=0, atol=5e-4)  # measured: 5e-5
    assert raised[list(kept[::-1]).index(102)] == pytest.approx(121.93, abs=0.01)


def test_churned_heun_approaches_the_data_distribution_as_its_steps_grow():
    """Gaussian data, the exact denoiser, churn at every level (gamma = sqrt(2) - 1): the end points' mean and variance
    approach the data's (which the probability-flow ODE's end points match, to 2e-3 in the mean). The sampler is affine
    in x_T and its noise, so x_T = 0 without noise (s_noise = 0) gives the end points' mean exactly; the variance comes
    from 2^15 draws (standard error 0.8%). Measured (relative variance error, mean over the 4 dimensions): 1.13, 0.25,
    0.083 at 10, 20, 40 steps; mean error 2.9e-4, 1.7e-5, 2e-7 (5.3e-3, 8.1e-4, 7.7e-5 with the network called at
    levels interpolated between the kept steps, issue #31's bug)."""
    betas = beta_schedule("linear", T)
    n, mean_errors, var_errors = 1 << 15, [], []
    for steps in (10, 20, 40):
        schedule = samplers.respaced(betas, steps, "karras")
        run = jax.jit(
            lambda key, x_T, s_noise, s=schedule: samplers.heun_sample(
                s, eps_between_steps, x_T.shape, key, x_T=x_T, s_churn=40.0, s_noise=s_noise
            ),
            static_argnums=2,
        )
        mean = np.asarray(run(KEY, jnp.zeros((1, *SHAPE)), 0.0), np.float64).ravel()
        mean_errors.append(np.abs(mean - DATA_MEAN.ravel()).max())
        x_T = jax.random.normal(jax.random.key(steps), (n, *SHAPE))
        x = np.asarray(run(jax.random.key(steps + 1), x_T, 1.0), np.float64).reshape(n, -1)
        var_errors.append(np.mean(np.abs(x.var(0) / DATA_VAR.ravel() - 1.0)))
    assert var_errors[1] < var_errors[0] / 2 and var_errors[2] < var_errors[1] / 2, var_errors
    assert var_errors[2] < 0.15, var_errors
    assert mean_errors[2] <= mean_errors[0] < 1e-3 and mean_errors[2] < 1e-4, mean_errors


def test_sdedit_at_strength_0_returns_its_input_and_from_data_keeps_the_data_distribution():
    schedule = samplers.respaced(beta_schedule("linear", T), 50)
    data = DATA_MEAN + np.sqrt(DATA_VAR) * np.random.default_rng(1).standard_normal((N, *SHAPE)).astype(np.float32)
    ddim = lambda s, key, x_T: samplers.ddim_sample(s, optimal_eps, x_T.shape, key, x_T=x_T, clip_x0=False)
    np.testing.assert_array_equal(samplers.sdedit(ddim, schedule, data, 0.0, KEY), data)
    for strength in (0.3, 1.0):
        edited = np.asarray(jax.jit(lambda x, s=strength: samplers.sdedit(ddim, schedule, x, s, KEY))(data))
        # Noising data to step k gives exactly q(x_k), so sampling back gives the data distribution again ...
        assert_moments_match_the_data(edited, slack=0.02)
        # ... and deterministic DDIM keeps z = (x_k - sqrt(a) m) / sqrt(a v + 1 - a): each edit correlates with its
        # image by sqrt(a v / (a v + 1 - a)), a = abar at step k = round(strength * 50).
        a = float(schedule.alphas_cumprod[round(strength * 50) - 1])
        want = np.sqrt(a * DATA_VAR / (a * DATA_VAR + 1 - a)).ravel()
        flat, flat_data = edited.reshape(N, -1), data.reshape(N, -1)
        got = np.array([np.corrcoef(flat[:, i], flat_data[:, i])[0, 1] for i in range(4)])
        np.testing.assert_array_less(np.abs(got - want), 5 * (1 - want**2) / np.sqrt(N) + 0.01)
    with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\]"):
        samplers.sdedit(ddim, schedule, data, 1.5, KEY)


def test_repaint_walks_from_noise_to_the_image_with_the_documented_number_of_jumps():
    for steps, jump, r in ((100, 10, 1), (100, 10, 3), (50, 5, 4), (7, 3, 2)):
        path = samplers.repaint_path(steps, jump, r)
        levels = steps - np.cumsum(path[:, 1])
        assert levels[-1] == 0 and levels.min() == 0 and levels.max() <= steps
        np.testing.assert_array_equal(path[:, 0], np.where(path[:, 1] > 0, levels, levels - 1))  # step = lower level
        jumps = len(range(jump, steps - jump + 1, jump))
        assert (path[:, 1] > 0).sum() == steps + (r - 1) * jump * jumps
    with pytest.raises(ValueError, match="jump_length and resamplings must be >= 1"):
        samplers.repaint_path(10, 0, 1)


COV = 0.2 * np.array([[1, 0.8, 0.5, 0.2], [0.8, 1, 0.6, 0.4], [0.5, 0.6, 1, 0.7], [0.2, 0.4, 0.7, 1]], np.float32)
COV_MEAN = np.array([0.3, -0.2, 0.1, 0.4], np.float32)


def correlated_eps(x_t, timesteps):
    """The optimal eps for correlated Gaussian data N(COV_MEAN, COV), through COV's eigenvectors."""
    lam, vecs = np.linalg.eigh(COV)
    a = FULL.alphas_cumprod[timesteps][:, None]
    z = (x_t.reshape(x_t.shape[0], -1) - jnp.sqrt(a) * COV_MEAN) @ vecs
    return ((jnp.sqrt(1.0 - a) * z / (a * lam + 1.0 - a)) @ vecs.T).reshape(x_t.shape)


def test_repaint_keeps_the_known_pixels_and_samples_the_conditional_gaussian():
    known_values = np.array([0.6, 0.1], np.float32)
    x0 = np.zeros((N, *SHAPE), np.float32)
    x0.reshape(N, 4)[:, :2] = known_values
    x0.reshape(N, 4)[:, 2:] = 5.0  # the unknown pixels' values must play no part
    hole = np.array([0, 0, 1, 1], np.float32).reshape(SHAPE)  # the last two pixels are filled in
    schedule = samplers.respaced(beta_schedule("linear", T), 250)
    run = jax.jit(
        lambda key: samplers.repaint_sample(
            schedule, correlated_eps, jnp.asarray(x0), key, mask=hole, jump_length=5, resamplings=10, clip_x0=False
        )
    )
    x = np.asarray(run(jax.random.key(0)), np.float64).reshape(N, 4)
    np.testing.assert_array_equal(x[:, :2], np.broadcast_to(known_values, (N, 2)))  # exactly, not approximately
    k, u = [0, 1], [2, 3]
    gain = COV[np.ix_(u, k)] @ np.linalg.inv(COV[np.ix_(k, k)])
    mean = COV_MEAN[u] + gain @ (known_values - COV_MEAN[k])
    cov = COV[np.ix_(u, u)] - gain @ COV[np.ix_(k, u)]
    # RePaint is not exact: the known pixels are re-noised independently of the unknown ones. With resampling its
    # bias here is ~0.01 in the mean and ~0.012 in the covariance (measured; 0.05 without resampling at 100 steps), so
    # the tolerance is the sample's 5 standard errors plus 0.02. The unconditional mean is 0.18 and 0.1 away.
    se = np.sqrt(np.diag(cov) / N)
    np.testing.assert_array_less(np.abs(x[:, 2:].mean(0) - mean), 5 * se + 0.02)
    np.testing.assert_array_less(np.abs(np.cov(x[:, 2:].T) - cov), 5 * np.sqrt(2 / N) * 0.16 + 0.02)
    assert np.all(np.abs(x[:, 2:].mean(0) - COV_MEAN[u]) > 0.08)
    with pytest.raises(ValueError, match=r"does not fit images .* \(1 = filled in, 0 = kept\)"):
        samplers.repaint_sample(schedule, correlated_eps, jnp.asarray(x0), KEY, mask=np.ones((3, 2, 1)))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta", "heun_churn", "sdedit", "repaint"])
def test_with_a_key_per_image_an_image_does_not_depend_on_its_batch(sampler):
    """Every sampler that draws noise, given ``[B]`` keys, draws image b from ``key[b]`` alone: 4 images in one batch
    equal the same 4 in two batches of 2 (the pipeline's image i key ``fold_in(key, i)`` rests on it); and they
    differ from one another (each key its own noise)."""
    schedule = samplers.respaced(beta_schedule("linear", T), 8, "karras" if sampler == "heun_churn" else "even")
    given = jnp.broadcast_to(jnp.asarray(DATA_MEAN), (4, *SHAPE))
    hole = jnp.asarray(np.array([0.0, 1.0, 0.0, 1.0], np.float32).reshape(SHAPE))

    def draw(keys, x0):
        shape = x0.shape
        if sampler == "ddpm":
            return samplers.ddpm_sample(schedule, optimal_eps, shape, keys, clip_x0=False)
        if sampler == "ddim_eta":
            return samplers.ddim_sample(schedule, optimal_eps, shape, keys, eta=1.0, clip_x0=False)
        if sampler == "heun_churn":
            return samplers.heun_sample(schedule, eps_between_steps, shape, keys, s_churn=4.0)  # fractional t
        if sampler == "sdedit":
            start = lambda s, k, x_T: samplers.ddim_sample(s, optimal_eps, x_T.shape, k, x_T=x_T, eta=1.0)
            return samplers.sdedit(start, schedule, x0, 0.5, keys)
        return samplers.repaint_sample(schedule, optimal_eps, x0, keys, mask=hole, jump_length=2, resamplings=2)

    keys = parallel.example_keys(jax.random.key(7), jnp.arange(4))
    run = jax.jit(draw)
    whole = np.asarray(run(keys, given))
    halves = np.concatenate([np.asarray(run(keys[:2], given[:2])), np.asarray(run(keys[2:], given[2:]))])
    np.testing.assert_allclose(halves, whole, rtol=1e-6, atol=1e-6)
    assert len({image.tobytes() for image in whole}) == 4


def test_sample_py_edits_given_images_with_sdedit_and_inpainting(tmp_path, subprocess_env):
    fake_run(tmp_path / "run")
    given = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
    np.savez(tmp_path / "given.npz", given)
    common = [sys.executable, str(ROOT / "sample.py"), f"--workdir={tmp_path / 'run'}", "--num_samples=6"]
    common += ["--batch_size=4", f"--init_images={tmp_path / 'given.npz'}", "--steps=8"]

    def sample(*flags, out):
        command = [*common, *flags, f"--out={tmp_path / out}"]
        return subprocess.run(command, env=subprocess_env, capture_output=True, text=True, timeout=600)

    inpaint = sample("--mask=left_half", "--resamplings=2", "--jump_length=2", out="inpaint")
    assert inpaint.returncode == 0, inpaint.stderr[-3000:]
    filled = np.load(tmp_path / "inpaint" / "samples.npz")["arr_0"]
    # Image i inpaints given[i % 3]: the kept right half comes back exactly, the left half is drawn.
    np.testing.assert_array_equal(filled[:, :, 4:], given[np.arange(6) % 3][:, :, 4:])
    assert np.any(filled[:, :, :4] != given[np.arange(6) % 3][:, :, :4])
    untouched = sample("--strength=0", "--sampler=ddim", out="sdedit0")
    assert untouched.returncode == 0, untouched.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "sdedit0" / "samples.npz")["arr_0"], given[np.arange(6) % 3])
    for flags, message in (
        (("--mask=left_half", "--sampler=ddim"), "use --sampler=ddpm"),
        (("--strength=1.5",), r"strength must lie in \[0, 1\]"),
        (("--mask=ring",), "Unknown mask 'ring'|neither one of"),
        (("--strength=0.5", "--churn=1"), "churn is Karras et al.'s"),
    ):
        bad = sample(*flags, out="bad")
        assert bad.returncode != 0 and re.search(message, bad.stderr), (flags, bad.stderr[-2000:])
    np.savez(tmp_path / "wrong.npz", np.zeros((2, 4, 4, 1), np.uint8))
    wrong = subprocess.run(
        [*common[:-1], f"--init_images={tmp_path / 'wrong.npz'}", "--strength=0.3", f"--out={tmp_path / 'w'}"],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert wrong.returncode == 2 and "takes 8x8x1 images" in wrong.stderr, wrong.stderr[-2000:]
    np.savez(tmp_path / "hole.npz", np.ones((4, 4), np.float32))
    hole = sample(f"--mask={tmp_path / 'hole.npz'}", out="hole")
    assert hole.returncode == 2 and "does not fit images" in hole.stderr, hole.stderr[-2000:]


def test_sample_py_s_default_batch_fills_about_2_to_the_18_values():
    from jaxdiff import commands

    assert commands.batch_for((8, 8, 1)) == 4096  # 900 digits: one batch
    assert commands.batch_for((32, 32, 3)) == 85
    assert commands.batch_for((256, 256, 3)) == 1
    assert commands.SampleRequest(workdir="w").batch_size is None
