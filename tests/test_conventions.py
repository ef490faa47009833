"""The conventions where jaxdiff differs from a well-known implementation (docs/conventions.md), each pinned down.

* ``dpm++3m`` takes the exact second-derivative term of the exponential integrator; ``dpm++3m-ref`` takes half of it,
  as DPM-Solver's ``dpm_solver_pytorch.py``, diffusers' ``DPMSolverMultistepScheduler(solver_order=3)`` and
  k-diffusion's ``sample_dpmpp_3m_sde`` do. Both are checked against the update written out here in float64.
* DDIM with clipping re-derives eps from the clipped x_0 (diffusers' ``use_clipped_model_output=True``).
* Timesteps are 0-based: index i is the paper's t = i + 1.
* Respaced grids are rounded to integer steps of the chain, whose abar they keep exactly.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import pipeline, samplers
from jaxdiff.schedules import beta_schedule, log_sigmas, make_schedule, respaced

SHAPE = (3, 4, 4, 1)
MEAN, VAR = 0.3, 0.2  # the data: N(MEAN, VAR) in every dimension


def gaussian_x0(abar, x):
    """E[x_0 | x_t] for data N(MEAN, VAR): the exact denoiser, any float type."""
    return MEAN + math.sqrt(abar) * VAR * (x - math.sqrt(abar) * MEAN) / (abar * VAR + 1.0 - abar)


def eps_model():
    """The exact denoiser as an eps-predicting ``model_fn`` of DDPM's chain (linear, T = 1000), called with the
    chain's timesteps (what a schedule respaced from it passes)."""
    chain = make_schedule("linear", 1000)

    def model_fn(x, timesteps):
        a = chain.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        x0 = MEAN + jnp.sqrt(a) * VAR * (x - jnp.sqrt(a) * MEAN) / (a * VAR + 1.0 - a)
        return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)

    return model_fn


def reference_multistep(abars: np.ndarray, x: np.ndarray, order: int, second_derivative: float) -> np.ndarray:
    """DPM-Solver++ multistep in float64, as the reference codes write it (``multistep_dpm_solver_third_update``):

    with h = lambda_t - lambda_s and r_k = h_k / h of the last steps, D1_0 = (m_0 - m_1) / r_0,
    D1_1 = (m_1 - m_2) / r_1, D1 = D1_0 + r_0 / (r_0 + r_1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r_0 + r_1),
    phi_1 = expm1(-h), phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2:
    x_t = sigma_t / sigma_s x - alpha_t phi_1 m_0 + alpha_t phi_2 D1 - ``second_derivative`` alpha_t phi_3 D2
    (the codes' ``second_derivative`` is 1; 2 is the exact quadratic's). Second order:
    x_t = sigma_t / sigma_s x - alpha_t phi_1 m_0 - alpha_t phi_1 D1_0 / 2. The first steps take the order their
    history allows; the last step (to abar = 1) returns the data prediction. ``abars``: the levels, noisiest first.
    """
    lam = lambda a: 0.5 * math.log(a) - 0.5 * math.log1p(-a)
    models, hs = [], []
    for abar, nxt in itertools.pairwise(abars):
        m0 = gaussian_x0(abar, x)
        if nxt == 1.0:
            return m0
        h = lam(nxt) - lam(abar)
        alpha_t, phi_1 = math.sqrt(nxt), math.expm1(-h)
        first = math.sqrt((1 - nxt) / (1 - abar)) * x - alpha_t * phi_1 * m0
        use = min(len(models) + 1, order)
        if use == 1:
            x = first
        elif use == 2:
            x = first - 0.5 * alpha_t * phi_1 * (m0 - models[-1]) / (hs[-1] / h)
        else:
            r0, r1 = hs[-1] / h, hs[-2] / h
            d1_0, d1_1 = (m0 - models[-1]) / r0, (models[-1] - models[-2]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            x = first + alpha_t * phi_2 * d1 - second_derivative * alpha_t * phi_3 * d2
        models.append(m0)
        hs.append(h)
    raise AssertionError("unreachable")


@pytest.mark.parametrize(("sampler", "second_derivative"), [("dpm++3m-ref", 1.0), ("dpm++3m", 2.0)])
def test_third_order_multistep_matches_the_update_written_out(sampler, second_derivative):
    schedule = respaced(beta_schedule("linear", 1000), 12, "logsnr")
    x_T = np.asarray(jax.random.normal(jax.random.key(0), SHAPE), np.float64)
    abars = np.concatenate([np.asarray(schedule.alphas_cumprod, np.float64)[::-1], [1.0]])
    form = "reference" if sampler == "dpm++3m-ref" else "exact"
    ours = samplers.dpm_solver_sample(
        schedule, eps_model(), SHAPE, jax.random.key(0), order=3, third_order=form, x_T=jnp.asarray(x_T)
    )
    want = reference_multistep(abars, x_T, 3, second_derivative)
    other = reference_multistep(abars, x_T, 3, 3.0 - second_derivative)
    np.testing.assert_allclose(np.asarray(ours, np.float64), want, atol=2e-5)
    assert np.abs(want - other).max() > 50 * 2e-5  # the two forms differ by far more than the tolerance


def test_the_pipeline_samples_dpm3m_ref_with_the_reference_form():
    betas = beta_schedule("linear", 1000)
    apply_fn = lambda params, x, t, labels: eps_model()(x, t)
    pipe = pipeline.Pipeline(apply_fn=apply_fn, params={}, betas=betas, clip_x0=False, image_shape=SHAPE[1:])
    keys = jax.random.split(jax.random.key(3), SHAPE[0])
    draw = lambda name: np.asarray(pipeline.make_sampler(pipe, name, 12)({}, keys), np.float64)
    ref, exact = draw("dpm++3m-ref"), draw("dpm++3m")
    schedule = respaced(betas, 12, samplers.DEFAULT_SPACINGS["dpm++3m-ref"])
    # Image b starts from normal(fold_in(keys[b], T)), T the respaced chain's length (the samplers' convention).
    x_T = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, 12), SHAPE[1:]), np.float64) for k in keys])
    abars = np.concatenate([np.asarray(schedule.alphas_cumprod, np.float64)[::-1], [1.0]])
    np.testing.assert_allclose(ref, reference_multistep(abars, x_T, 3, 1.0), atol=2e-5)
    assert np.abs(ref - exact).max() > 1e-3


def test_ddim_rederives_eps_from_the_clipped_x0():
    """diffusers' ``use_clipped_model_output=True``: with x0' = clip(x0_hat), eps' = (x_t - sqrt(a) x0') / sqrt(1 - a)
    and x_{t-1} = sqrt(a_prev) x0' + sqrt(1 - a_prev) eps' (eta = 0); its default keeps the network's eps."""
    schedule = respaced(beta_schedule("linear", 1000), 10)
    t = 2  # a low-noise step, where x0_hat of a large x_t leaves [-1, 1]
    x = np.linspace(-3.0, 3.0, 48).reshape(SHAPE)
    eps = 0.1 * np.ones(SHAPE)
    a, a_prev = float(schedule.alphas_cumprod[t]), float(schedule.alphas_cumprod_prev[t])
    x0 = np.clip((x - math.sqrt(1 - a) * eps) / math.sqrt(a), -1, 1)
    clipped_eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    want = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * clipped_eps
    diffusers_default = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    model_fn = lambda x_t, timesteps: jnp.asarray(eps, jnp.float32)
    ours, _ = samplers.ddim_step(schedule, model_fn, jnp.asarray(x, jnp.float32), t, jax.random.key(0), clip_x0=True)
    np.testing.assert_allclose(np.asarray(ours, np.float64), want, atol=1e-5)
    assert np.abs(want - diffusers_default).max() > 0.1  # the convention matters where x0 is clipped


def test_timesteps_are_0_based():
    """Index i is the paper's t = i + 1: betas[0] is beta_1, and q_sample at index 0 is one step of noise."""
    schedule = make_schedule("linear", 1000)
    assert float(schedule.betas[0]) == pytest.approx(1e-4, rel=1e-6)
    assert float(schedule.betas[-1]) == pytest.approx(0.02, rel=1e-6)
    x0, noise = jnp.full((1, 2), 0.5), jnp.full((1, 2), 1.0)
    one_step = jaxdiff.q_sample(schedule, x0, jnp.zeros((1,), jnp.int32), noise)
    np.testing.assert_allclose(np.asarray(one_step), math.sqrt(1 - 1e-4) * 0.5 + math.sqrt(1e-4), rtol=1e-6)


def test_respaced_grids_sit_on_integer_steps_of_the_chain():
    """Every spacing keeps integer timesteps of the chain, and abar there exactly; the Karras grid's levels are the
    chain's at the nearest integer steps, not Karras et al.'s continuous sigmas."""
    betas = beta_schedule("linear", 1000)
    abar = np.cumprod(1.0 - betas)
    for spacing in ("even", "quadratic", "logsnr", "karras"):
        schedule = respaced(betas, 20, spacing)
        kept = np.asarray(schedule.timestep_map)
        assert kept.dtype == np.int32 and np.all(np.diff(kept) > 0), spacing
        np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod, np.float64), abar[kept], rtol=1e-6)
    karras = respaced(betas, 20, "karras")
    kept = np.asarray(karras.timestep_map)
    chain = np.log(np.sqrt((1 - abar) / abar))  # log sigma of every step of the chain
    np.testing.assert_allclose(np.asarray(log_sigmas(karras), np.float64), chain[kept], rtol=1e-5)
    # Karras et al.'s continuous grid (rho = 7) between the chain's extreme levels, highest first
    lo, hi = np.exp(chain[0]), np.exp(chain[-1])
    ramp = np.linspace(0, 1, 20)
    continuous = np.log((hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7)[::-1]
    gap = np.abs(chain[kept] - continuous)
    assert gap.max() > 1e-3  # the grid is not the continuous one...
    nearest = np.abs(chain[None, :] - continuous[:, None]).min(axis=1)
    np.testing.assert_allclose(gap, nearest, atol=1e-9)  # ...but the chain's nearest steps (none merged at 20)
