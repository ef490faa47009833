"""Solvers of the probability-flow ODE: DPM-Solver++ 2M and 3M (Lu et al. 2022) and Heun's method (Karras et al.
2022), deterministic for 10-25 network calls (Heun with churn adds noise).

Both run in data prediction (the network's x_0, clipped or dynamically thresholded when asked) between the levels of
a respaced schedule: :func:`jaxdiff.schedules.respaced` with ``logsnr`` spacing is DPM-Solver's grid, with ``karras``
Karras et al.'s.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import ModelFn, fold_keys, normal_noise
from jaxdiff.errors import ConfigError
from jaxdiff.samplers.common import (
    _data_prediction,
    _downwards,
    _finish_x0,
    _may_start_from_pure_noise,
    _starting_noise,
    predictions_between_steps,
)
from jaxdiff.schedules import Schedule, log_sigmas

__all__ = ["THIRD_ORDER_FORMS", "dpm_solver_sample", "heun_sample"]

#: 3M's second-derivative term: ``exact`` is the exponential integral of the quadratic through the last three x_0
#: predictions; ``reference`` is half of it, as DPM-Solver's reference code, diffusers' DPMSolverMultistepScheduler
#: (solver_order=3) and k-diffusion's sample_dpmpp_3m_sde have it (docs/conventions.md).
THIRD_ORDER_FORMS = ("exact", "reference")


#: Below this step h, :func:`_phi2` and :func:`_phi3` sum their series (``_PHI_SERIES_TERMS`` terms); from it on they
#: use the closed form. Measured in float32 against 40-digit closed forms on 4,001 points of [1e-4, 5]: the closed
#: forms cancel for small h (relative error 1.5e-6 for phi_2 at h ~ 0.3, 1.0e-6 for phi_3 at h ~ 0.7, 3e-7 at h = 1)
#: and come down to ~1.5e-7 from h ~ 1.5, where 11 terms of the series are still within 1.4e-7 (5 terms up to h = 0.5
#: were 1.4e-5 off). Together: 1.2e-7 (phi_2) and 1.8e-7 (phi_3) at most.
_PHI_SERIES_BELOW = 1.5
_PHI_SERIES_TERMS = 11


def _alternating_series(h: jax.Array, shift: int) -> jax.Array:
    """sum_{k=1}^{n} (-1)^(k+1) h^k / (k + shift)! with n = ``_PHI_SERIES_TERMS``, by Horner's rule."""
    acc = jnp.zeros_like(h)
    for k in range(_PHI_SERIES_TERMS, 0, -1):
        acc = (-1) ** (k + 1) / math.factorial(k + shift) + h * acc
    return h * acc


def _phi2(h: jax.Array) -> jax.Array:
    """phi_2(h) = (h - 1 + e^-h) / h = sum_{k>=1} (-1)^(k+1) h^k / (k+1)!, for h >= 0.

    The series below ``_PHI_SERIES_BELOW``, the closed form from it on: within 2e-7 relative in float32 (measured over
    [1e-4, 5]; never differentiated). Each branch sees an input clamped to its own range, so neither makes an inf or a
    NaN, even at h = 0.
    """
    small = jnp.minimum(h, _PHI_SERIES_BELOW)
    large = jnp.maximum(h, _PHI_SERIES_BELOW)
    return jnp.where(h < _PHI_SERIES_BELOW, _alternating_series(small, 1), 1 + jnp.expm1(-large) / large)


def _phi3(h: jax.Array) -> jax.Array:
    """phi_3(h) = (h^2 - 2h + 2 - 2e^-h) / (2h^2) = sum_{k>=1} (-1)^(k+1) h^k / (k+2)!, for h >= 0: the series below
    ``_PHI_SERIES_BELOW``, the closed form from it on, as :func:`_phi2`."""
    small = jnp.minimum(h, _PHI_SERIES_BELOW)
    large = jnp.maximum(h, _PHI_SERIES_BELOW)
    closed = (large / 2 - 1 - jnp.expm1(-large) / large) / large  # the closed form divided through: no h^2 to overflow
    return jnp.where(h < _PHI_SERIES_BELOW, _alternating_series(small, 2), closed)


def dpm_solver_sample(
    schedule: Schedule,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    order: int = 2,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    thresholding: float | None = None,
    x_T: jax.Array | None = None,
    third_order: str = "exact",
) -> jax.Array:
    r"""DPM-Solver++ (Lu et al. 2022), multistep in data prediction, over the steps of ``schedule`` (usually respaced:
    :func:`jaxdiff.schedules.respaced` with ``logsnr`` spacing is DPM-Solver's grid), one network call a step.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma), h = lambda_next - lambda_now and
    D the network's x_0, the exact solution of the probability-flow ODE is
    x_next = (sigma_next / sigma_now) x + sigma_next * integral of e^lambda D(lambda) over [lambda_now, lambda_next].
    Order 1 takes D constant (DDIM). ``order=2`` (2M) is DPM-Solver++(2M)'s update: the difference of the last two
    predictions weighted by (1 - e^-h) / 2, not by the exact integral's phi_2(h) (the two agree to the method's
    order). ``order=3`` (3M) integrates the quadratic through the last three predictions exactly. The first steps use
    the orders their history allows, and the last step (to abar = 1) returns D.

    With r_0 = h_{-1} / h, r_1 = h_{-2} / h and the divided differences d_0 = (D_0 - D_{-1}) / r_0,
    d_1 = (D_{-1} - D_{-2}) / r_1, 3M's step is

    .. math::

        x_{next} = \frac{\sigma_{next}}{\sigma_{now}} x - \alpha_{next} (e^{-h} - 1) D_0
          + \alpha_{next} \big(\varphi_2(h)\, s + \varphi_3(h)\, c\big),
        \quad s = d_0 + \frac{r_0}{r_0 + r_1} (d_0 - d_1),
        \quad c = \frac{2 (d_0 - d_1)}{r_0 + r_1},

    with :math:`\varphi_2(h) = (h - 1 + e^{-h}) / h` and :math:`\varphi_3(h) = (h^2 - 2h + 2 - 2e^{-h}) / (2h^2)`:
    s and c are h D' and h^2 D'' of the quadratic through the three predictions. ``third_order="reference"`` uses
    c / 2 instead, as the reference codes do (DPM-Solver's ``dpm_solver_pytorch.py``, diffusers'
    ``DPMSolverMultistepScheduler(solver_order=3)``, k-diffusion's ``sample_dpmpp_3m_sde``): their samples, at a
    lower order of accuracy (on a closed form, 10 to 80 steps, its error falls as steps^-2.7 against steps^-4).

    Args:
      order: 1, 2 or 3.
      third_order: ``exact`` (the default) or ``reference``: the form of 3M's second-derivative term (above).
      clip_x0: clip each x_0 prediction to [-1, 1]; ``thresholding``: or Imagen's dynamic thresholding at this
        percentile (e.g. 0.995) instead.
      key: only for x_T = ``normal(fold_in(key, T))`` (unless ``x_T`` is given): the solver is deterministic.

    Returns:
      x_0 ``[B, ...]``.
    """
    if order not in (1, 2, 3):
        raise ConfigError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}.")
    if third_order not in THIRD_ORDER_FORMS:
        raise ConfigError(f"third_order must be one of {', '.join(THIRD_ORDER_FORMS)}, got {third_order!r}.")
    curve_weight = 1.0 if third_order == "exact" else 0.5
    T = schedule.num_timesteps
    x_T = _starting_noise(key, shape, T, x_T)
    log_alpha = lambda abar: 0.5 * jnp.log(abar)
    log_sigma = lambda abar: 0.5 * jnp.log1p(-abar)

    def step(carry, t):
        x, m1, m2, h1, h2, done = carry
        abar_now, abar_next = schedule.alphas_cumprod[t], schedule.alphas_cumprod_prev[t]
        last = t == 0
        # From pure noise (abar = 0, zero terminal SNR: lambda = -inf) the exact step is DDIM's, taken below; the
        # level is swapped for a finite one here so that nothing divides by zero, and the step is kept out of the
        # history (the next step is first order).
        pure = abar_now == 0.0
        abar = jnp.where(pure, abar_next, abar_now)
        h = jnp.where(last, 1.0, log_alpha(abar_next) - log_sigma(abar_next) - log_alpha(abar) + log_sigma(abar))
        m0 = _data_prediction(schedule, model_fn, x, t, prediction, variance, clip_x0, thresholding)
        r0, r1 = h1 / h, h2 / h
        a2 = (m0 - m1) / (2 * r0)  # 2M: D = m0 + (m0 - m1) / (2 r)
        d0, d1 = (m0 - m1) / r0, (m1 - m2) / r1
        slope = d0 + r0 / (r0 + r1) * (d0 - d1)  # 3M: the first and second derivatives (times h, h^2) of D
        curve = 2 * (d0 - d1) / (r0 + r1)
        alpha_next, ratio = jnp.sqrt(abar_next), jnp.exp(log_sigma(abar_next) - log_sigma(abar))
        first = ratio * x - alpha_next * jnp.expm1(-h) * m0
        second = first - alpha_next * jnp.expm1(-h) * a2
        third = first + alpha_next * (_phi2(h) * slope + _phi3(h) * curve_weight * curve)
        use = jnp.minimum(done + 1, order)
        x_next = jnp.where(last, m0, jnp.where(use == 3, third, jnp.where(use == 2, second, first)))
        x_next = jnp.where(pure, alpha_next * m0 + jnp.sqrt(1.0 - abar_next) * x, x_next)  # x is eps there
        return (x_next.astype(x.dtype), m0, m1, h, h1, jnp.where(pure, done, done + 1)), None

    zeros = jnp.zeros_like(x_T)
    init = (x_T, zeros, zeros, jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0))
    (x, *_), _ = jax.lax.scan(step, init, _downwards(T))
    return x


def heun_sample(
    schedule: Schedule,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    thresholding: float | None = None,
    x_T: jax.Array | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> jax.Array:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2) on the VP model, in
    sigma = sqrt(1 - abar) / sqrt(abar) and x~ = x / sqrt(abar): dx~/dsigma = (x~ - D(x~, sigma)) / sigma.

    Steps between the levels of ``schedule`` (respace it: ``karras`` spacing is their grid), two network calls a step
    and one for the last (to sigma = 0, which returns D). Arguments as :func:`dpm_solver_sample`, and Karras et al.'s
    stochastic churn: at a level sigma_i in [``s_tmin``, ``s_tmax``] the step first raises the noise to
    sigma^ = sigma_i (1 + gamma), gamma = min(``s_churn`` / N, sqrt(2) - 1), by adding fresh noise of standard deviation
    ``s_noise`` sqrt(sigma^2 - sigma_i^2) (from ``fold_in(key, t)``), then solves from sigma^. The network is called at
    sigma^ with the fractional timestep :func:`jaxdiff.schedules.timestep_at` gives, read along the original chain
    (every step of it, not only those a respaced schedule kept); sigma^ is capped at the schedule's top level.
    ``s_churn = 0`` (the default) is the deterministic solver.
    """
    if not (s_churn >= 0 and s_noise >= 0 and s_tmin <= s_tmax):
        raise ConfigError(
            f"Heun's churn needs s_churn >= 0, s_noise >= 0 and s_tmin <= s_tmax; got {s_churn}, {s_noise}, "
            f"{s_tmin}, {s_tmax}."
        )
    T = schedule.num_timesteps
    x_T = _starting_noise(key, shape, T, x_T)
    denoise = lambda x, t: _data_prediction(schedule, model_fn, x, t, prediction, variance, clip_x0, thresholding)
    sigmas = jnp.exp(log_sigmas(schedule))
    top_sigma = jnp.max(jnp.where(jnp.isfinite(sigmas), sigmas, 0.0))  # the highest finite level: churn's cap
    gamma_max = min(s_churn / T, math.sqrt(2.0) - 1.0)

    def denoise_between(x_tilde, sigma):
        """D at a level off the grid: the network at the fractional timestep of sigma."""
        x = x_tilde * jax.lax.rsqrt(1.0 + sigma**2)
        kinds = {"prediction": prediction, "variance": variance}
        pred_x0, _ = predictions_between_steps(schedule, model_fn, x, jnp.log(sigma), **kinds)
        return _finish_x0(pred_x0, clip_x0, thresholding)

    def from_pure_noise(x, t):
        """The step from abar = 0 (zero terminal SNR, sigma = inf), where x is eps: the Euler step's limit,
        x~_next = D + sigma_next eps, which is DDIM's; no second-order correction exists from an infinite level."""
        abar_next = schedule.alphas_cumprod_prev[t]
        return (jnp.sqrt(abar_next) * denoise(x, t) + jnp.sqrt(1.0 - abar_next) * x).astype(x.dtype)

    def step(x, t):
        if _may_start_from_pure_noise(schedule):
            return jax.lax.cond(schedule.alphas_cumprod[t] == 0.0, from_pure_noise, heun_step, x, t), None
        return heun_step(x, t), None

    def heun_step(x, t):
        abar, abar_next = schedule.alphas_cumprod[t], schedule.alphas_cumprod_prev[t]
        sigma, sigma_next = sigmas[t], jnp.sqrt((1 - abar_next) / abar_next)
        x_tilde = x / jnp.sqrt(abar)
        if gamma_max > 0:  # raise the noise to sigma_hat first
            gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), gamma_max, 0.0)
            sigma_hat = jnp.minimum(sigma * (1.0 + gamma), top_sigma)
            noise = normal_noise(fold_keys(key, t), x.shape, x.dtype)
            x_tilde = x_tilde + s_noise * jnp.sqrt(jnp.maximum(sigma_hat**2 - sigma**2, 0.0)) * noise
            sigma = sigma_hat
            d = (x_tilde - denoise_between(x_tilde, sigma)) / sigma
        else:
            d = (x_tilde - denoise(x, t)) / sigma
        euler = x_tilde + (sigma_next - sigma) * d

        def correct(euler):
            t_next = jnp.maximum(t - 1, 0)
            d_next = (euler - denoise(euler * jnp.sqrt(abar_next), t_next)) / sigma_next
            return x_tilde + (sigma_next - sigma) * (d + d_next) / 2

        x_tilde_next = jax.lax.cond(t > 0, correct, lambda euler: euler, euler)
        return (x_tilde_next * jnp.sqrt(abar_next)).astype(x.dtype)

    x, _ = jax.lax.scan(step, x_T, _downwards(T))
    return x
