"""Sampling: start from noise, remove the learned noise step by step; each sampler is one ``lax.scan`` over timesteps.

Pure: the network enters as ``model_fn(x_t, timesteps) -> output`` (called with ``schedule.timestep_map[t]``, so a
respaced schedule calls the network with the original timesteps). All randomness comes from ``key``: x_T is
``normal(fold_in(key, T))`` and step t's noise ``normal(fold_in(key, t))``. ``key`` is one key (the noise drawn for
the whole batch at once) or ``[B]`` keys, one per image (typed keys, ``jax.random.key``): then image b's noise comes
from ``key[b]`` alone, so an image does not depend on the batch it is drawn in, nor on the devices or processes the
batch is split over. :func:`jaxdiff.pipeline.make_sampler` compiles them that way, image i's key ``fold_in(key, i)``.

Samplers:
  - :func:`ddpm_sample`: ancestral sampling (DDPM Algorithm 2) for every prediction (eps, x0, v) and variance
    (fixed small/large, learned, learned range), on the full or a respaced schedule;
  - :func:`ddim_sample`: DDIM (Song et al. 2021) with ``eta`` (0: deterministic; 1: the DDPM posterior variance of the
    schedule it runs on), on any respaced schedule (:func:`sampling_schedule`);
  - :func:`ddim_invert`: DDIM run backwards (eta = 0): an image to the x_T that DDIM decodes back to it;
  - :func:`dpm_solver_sample`: DPM-Solver++ 2M and 3M (Lu et al. 2022), multistep solvers of the probability-flow
    ODE in data prediction, for 10-25 network calls;
  - :func:`heun_sample`: Heun's second-order method on the same ODE in Karras et al.'s sigma;
  - :func:`guided`: classifier-free guidance wrapped around a conditional network;
  - :func:`autoguided`: autoguidance, a network guided away from a weaker version of itself.
Each returns the final x_0, and with ``trajectory_every=k`` also a :class:`Trajectory` of x_t and the predicted x_0
after every k steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import diffusion
from jaxdiff.diffusion import ModelFn, fold_keys, key_per_example, normal_noise
from jaxdiff.schedules import (
    SNR_SPACINGS,
    Schedule,
    beta_schedule,
    log_sigmas,
    respace,
    snr_spaced_timesteps,
    space_timesteps,
    timestep_at,
    truncated,
)

ODE_SAMPLERS = ("dpm++2m", "dpm++3m", "heun")  # deterministic solvers of the probability-flow ODE
SAMPLERS = ("ddpm", "ddim", *ODE_SAMPLERS)
DETERMINISTIC_SAMPLERS = ("ddim", *ODE_SAMPLERS)  # with DDIM's default eta = 0 and Heun's churn 0
# Each sampler's default grid: DPM-Solver's is uniform in log-SNR, Heun's is Karras et al.'s sigma spacing.
DEFAULT_SPACINGS = {"ddpm": "even", "ddim": "even", "dpm++2m": "logsnr", "dpm++3m": "logsnr", "heun": "karras"}


class Trajectory(NamedTuple):
    """Snapshots after every k steps of a sampler, ``n = ceil(steps / k)`` of them (the last one after the last step).

    Attributes:
      x: ``[n, B, ...]``, the latent after the snapshot's step: x_{t-1} (x_0 at the end) for sampling, x_{t} for
        inversion.
      pred_x0: ``[n, B, ...]``, the x_0 predicted at that step.
      t: ``[n]`` int32, the index (in the schedule sampled from) of the step just taken.
    """

    x: jax.Array
    pred_x0: jax.Array
    t: jax.Array


def sampling_schedule(
    name: str, num_timesteps: int, steps: int | None = None, spacing: str = "even", **schedule_kwargs
) -> Schedule:
    """The schedule to sample from: beta schedule ``name`` of ``num_timesteps`` steps, respaced to ``steps``.

    :func:`respaced` of ``beta_schedule(name, num_timesteps, **schedule_kwargs)``.

    Raises:
      ValueError: ``steps`` < 1 or > ``num_timesteps``.
    """
    return respaced(beta_schedule(name, num_timesteps, **schedule_kwargs), steps, spacing)


def respaced(betas: np.ndarray, steps: int | None = None, spacing: str = "even") -> Schedule:
    """The chain of ``betas`` (float64 ``[T]``) respaced to ``steps`` (None or T: all of them), with abar kept at the
    kept steps. ``spacing``: ``even`` or ``quadratic`` in t (:func:`jaxdiff.schedules.space_timesteps`), or ``logsnr``
    or ``karras`` by noise level (:func:`jaxdiff.schedules.snr_spaced_timesteps`).

    Raises:
      ValueError: ``steps`` < 1 or > T, or an unknown spacing.
    """
    num_timesteps = len(betas)
    steps = num_timesteps if steps is None else steps
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}] (the model's T), got {steps}.")
    if spacing in SNR_SPACINGS:
        return respace(betas, snr_spaced_timesteps(betas, steps, spacing))
    return respace(betas, space_timesteps(num_timesteps, steps, spacing))


def check_eta(eta: float) -> None:
    """Raise a ValueError unless eta >= 0."""
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {eta}.")


def _split(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two keys from ``key`` (each image's key split for per-image keys)."""
    if key_per_example(key):
        pairs = jax.vmap(jax.random.split)(key)
        return pairs[:, 0], pairs[:, 1]
    first, second = jax.random.split(key)
    return first, second


def _model_prediction(
    schedule: Schedule, model_fn: ModelFn, x_t, t_batch, prediction: str, variance: str, clip_x0: bool
):
    """(pred_x0, pred_eps) of the network at (x_t, t)."""
    out = model_fn(x_t, jnp.take(schedule.timestep_map, t_batch))
    pred_x0, pred_eps, _ = diffusion.predictions_from_output(
        schedule, out, x_t, t_batch, prediction=prediction, variance=variance, clip_x0=clip_x0
    )
    return pred_x0, pred_eps


def ddpm_step(
    schedule: Schedule,
    model_fn: ModelFn,
    x_t: jax.Array,
    t: jax.Array,
    key: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One ancestral step (DDPM Algorithm 2): x_{t-1} = mu_theta(x_t, t) + sigma_t z, with no noise at the last step.

    Args:
      x_t: ``[B, ...]``.
      t: scalar int, the 0-indexed step of ``schedule``.
      key: the step's noise key, or ``[B]`` keys, one per image.

    Returns:
      (x_{t-1}, predicted x_0), both ``[B, ...]``.
    """
    t_batch = jnp.full((x_t.shape[0],), t, jnp.int32)
    out = model_fn(x_t, jnp.take(schedule.timestep_map, t_batch))
    p = diffusion.p_mean_variance(
        schedule, out, x_t, t_batch, prediction=prediction, variance=variance, clip_x0=clip_x0
    )
    noise = normal_noise(key, x_t.shape, x_t.dtype)
    x_prev = p.mean + jnp.where(t > 0, jnp.exp(0.5 * p.log_variance), 0.0) * noise
    return x_prev, p.pred_x0


def ddim_step(
    schedule: Schedule,
    model_fn: ModelFn,
    x_t: jax.Array,
    t: jax.Array,
    key: jax.Array,
    *,
    eta: float = 0.0,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM step (Song et al. 2021, eq. 12) from index t to t - 1 of ``schedule`` (usually a respaced one).

    x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma^2) eps_hat + sigma z, with
    sigma^2 = eta^2 (1 - abar_{t-1}) / (1 - abar_t) (1 - abar_t / abar_{t-1}) = eta^2 beta~_t (on this schedule).
    A learned variance output is ignored (its mean half is used).

    Returns:
      (x_{t-1}, predicted x_0).
    """
    t_batch = jnp.full((x_t.shape[0],), t, jnp.int32)
    pred_x0, pred_eps = _model_prediction(schedule, model_fn, x_t, t_batch, prediction, variance, clip_x0)
    abar_prev = schedule.alphas_cumprod_prev[t]
    sigma2 = eta**2 * schedule.posterior_variance[t]
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma2, 0.0))
    noise = normal_noise(key, x_t.shape, x_t.dtype)
    x_prev = jnp.sqrt(abar_prev) * pred_x0 + direction * pred_eps + jnp.sqrt(sigma2) * noise
    return x_prev.astype(x_t.dtype), pred_x0


def _scan_steps(step_fn, x_init, ts, trajectory_every: int | None):
    """Run ``step_fn(x, t) -> (x_next, pred_x0)`` over ``ts`` in one scan; snapshots every k steps if asked."""
    if trajectory_every is None:
        x, _ = jax.lax.scan(lambda x, t: (step_fn(x, t)[0], None), x_init, ts)
        return x, None
    if trajectory_every < 1:
        raise ValueError(f"trajectory_every must be >= 1, got {trajectory_every}.")
    n = ts.shape[0]
    k = min(trajectory_every, n)
    chunks = -(-n // k)
    padded = jnp.concatenate([ts, jnp.full((chunks * k - n,), -1, ts.dtype)]).reshape(chunks, k)

    def inner(carry, t):
        x, pred_x0, last_t = carry
        new_x, new_pred = jax.lax.cond(t >= 0, step_fn, lambda x, t: (x, pred_x0), x, t)
        return (new_x, new_pred, jnp.where(t >= 0, t, last_t)), None

    def outer(carry, chunk):
        carry, _ = jax.lax.scan(inner, carry, chunk)
        return carry, carry

    init = (x_init, jnp.zeros_like(x_init), jnp.asarray(-1, ts.dtype))
    (x, _, _), (xs, preds, last_ts) = jax.lax.scan(outer, init, padded)
    return x, Trajectory(xs, preds, last_ts)


def _starting_noise(key: jax.Array, shape: tuple[int, ...], T: int, x_T: jax.Array | None) -> jax.Array:
    """x_T as given, else ``normal(fold_in(key, T))``: every sampler starts from the same noise for the same key."""
    return normal_noise(fold_keys(key, T), shape) if x_T is None else x_T


def _downwards(T: int) -> jax.Array:
    """The step indices T - 1, ..., 0 that a sampler scans over."""
    return jnp.arange(T - 1, -1, -1, dtype=jnp.int32)


def _sample_down(step, key, shape, T, x_T, trajectory_every):
    """``step(x_t, t, key_t)`` from x_T (given, or ``normal(fold_in(key, T))``) through t = T-1, ..., 0, with
    ``key_t = fold_in(key, t)``."""
    x_T = _starting_noise(key, shape, T, x_T)
    keyed = lambda x, t: step(x, t, fold_keys(key, t))
    x, traj = _scan_steps(keyed, x_T, _downwards(T), trajectory_every)
    return x if trajectory_every is None else (x, traj)


def ddpm_sample(
    schedule: Schedule,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = True,
    x_T: jax.Array | None = None,
    trajectory_every: int | None = None,
):
    """Ancestral sampling from x_T ~ N(0, I) down to x_0, as one ``lax.scan`` over the steps of ``schedule``.

    Args:
      shape: ``[B, ...]`` of the images.
      key: x_T is ``normal(fold_in(key, T))`` (unless ``x_T`` is given); step t's noise ``normal(fold_in(key, t))``.
        One key, or ``[B]`` keys: image b's noise from ``key[b]`` alone.
      x_T: the starting noise, to override the key's.
      trajectory_every: also return a :class:`Trajectory` with snapshots after every this many steps.

    Returns:
      x_0 ``[B, ...]`` (within [-1, 1] up to the last step's mean when ``clip_x0``), or ``(x_0, Trajectory)``.
    """
    step = functools.partial(ddpm_step, schedule, model_fn, prediction=prediction, variance=variance, clip_x0=clip_x0)
    return _sample_down(step, key, shape, schedule.num_timesteps, x_T, trajectory_every)


def ddim_sample(
    schedule: Schedule,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    eta: float = 0.0,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = True,
    x_T: jax.Array | None = None,
    trajectory_every: int | None = None,
):
    """DDIM sampling over the steps of ``schedule`` (respace it with :func:`sampling_schedule` for fewer steps).

    With ``eta = 0`` the result is a deterministic function of x_T; with ``eta = 1`` each step adds the DDPM posterior
    variance of ``schedule`` and equals ancestral sampling with ``variance='fixed_small'``. Arguments as
    :func:`ddpm_sample`.

    Raises:
      ValueError: ``eta`` < 0.
    """
    check_eta(eta)
    step = functools.partial(
        ddim_step, schedule, model_fn, eta=eta, prediction=prediction, variance=variance, clip_x0=clip_x0
    )
    return _sample_down(step, key, shape, schedule.num_timesteps, x_T, trajectory_every)


def ddim_invert(
    schedule: Schedule,
    model_fn: ModelFn,
    x0: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    trajectory_every: int | None = None,
):
    """Encode images into the x_T that deterministic DDIM (eta = 0, no clipping) on ``schedule`` decodes back to them.

    Runs the DDIM update forwards: from level abar_{t-1} (abar = 1 for the image) to abar_t, with the network's eps at
    the target step t evaluated on the current latent (the usual approximation eps(x_t, t) ~ eps(x_{t-1}, t), exact as
    the steps get small). Returns x_T ``[B, ...]`` (or ``(x_T, Trajectory)``).
    """

    def step(x, t):
        t_batch = jnp.full((x.shape[0],), t, jnp.int32)
        _, eps = _model_prediction(schedule, model_fn, x, t_batch, prediction, variance, False)
        abar_cur = schedule.alphas_cumprod_prev[t]
        abar_next = schedule.alphas_cumprod[t]
        pred_x0 = (x - jnp.sqrt(1.0 - abar_cur) * eps) / jnp.sqrt(abar_cur)
        return jnp.sqrt(abar_next) * pred_x0 + jnp.sqrt(1.0 - abar_next) * eps, pred_x0

    ts = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
    x, traj = _scan_steps(step, x0, ts, trajectory_every)
    return x if trajectory_every is None else (x, traj)


def dynamic_threshold(x0: jax.Array, percentile: float) -> jax.Array:
    """Imagen's dynamic thresholding: per image, s = max(1, the ``percentile`` quantile of |x0|); clip to [-s, s] and
    divide by s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def predictions_between_steps(
    schedule: Schedule, model_fn: ModelFn, x: jax.Array, log_sigma: jax.Array, *, prediction: str, variance: str
) -> tuple[jax.Array, jax.Array]:
    """(x_0, eps) of the network at noise level ``log_sigma`` (a scalar; sigma = sqrt((1 - abar) / abar)), which may
    lie between the schedule's steps: the network is called with the level's fractional timestep
    (:func:`jaxdiff.schedules.timestep_at`). For solvers that leave the grid (Heun's churn, the likelihood ODE)."""
    alpha_bar = jax.nn.sigmoid(-2.0 * log_sigma)  # 1 / (1 + sigma^2)
    out = model_fn(x, jnp.full((x.shape[0],), timestep_at(schedule, log_sigma)))
    pred, _ = diffusion.split_model_output(out, x, variance)
    return diffusion.x0_and_eps_at(alpha_bar, x, pred, prediction)


def _finish_x0(pred_x0: jax.Array, clip_x0: bool, thresholding: float | None) -> jax.Array:
    """An x_0 prediction dynamically thresholded at ``thresholding``, else clipped to [-1, 1] if ``clip_x0``."""
    if thresholding is not None:
        return dynamic_threshold(pred_x0, thresholding)
    return jnp.clip(pred_x0, -1.0, 1.0) if clip_x0 else pred_x0


def _data_prediction(schedule, model_fn, x, t, prediction, variance, clip_x0, thresholding):
    """The network's x_0 at (x, index t): clipped to [-1, 1] (``clip_x0``) or dynamically thresholded."""
    t_batch = jnp.full((x.shape[0],), t, jnp.int32)
    pred_x0, _ = _model_prediction(schedule, model_fn, x, t_batch, prediction, variance, False)
    return _finish_x0(pred_x0, clip_x0, thresholding)


def _phi2(h: jax.Array) -> jax.Array:
    """(h - 1 + e^-h) / h, by its series below h = 0.5 (the direct form cancels in float32 there)."""
    series = h / 2 - h**2 / 6 + h**3 / 24 - h**4 / 120 + h**5 / 720
    safe = jnp.maximum(h, 0.5)
    return jnp.where(h < 0.5, series, (safe + jnp.expm1(-safe)) / safe)


def _phi3(h: jax.Array) -> jax.Array:
    """(h^2 - 2h + 2 - 2e^-h) / (2h^2), by its series below h = 0.5."""
    series = h / 6 - h**2 / 24 + h**3 / 120 - h**4 / 720 + h**5 / 5040
    safe = jnp.maximum(h, 0.5)
    return jnp.where(h < 0.5, series, (safe**2 - 2 * safe - 2 * jnp.expm1(-safe)) / (2 * safe**2))


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
) -> jax.Array:
    """DPM-Solver++ (Lu et al. 2022), multistep in data prediction, over the steps of ``schedule`` (usually respaced:
    :func:`respaced` with ``logsnr`` spacing is DPM-Solver's grid), one network call a step.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma), h = lambda_next - lambda_now and
    D the network's x_0, the exact solution of the probability-flow ODE is
    x_next = (sigma_next / sigma_now) x + sigma_next * integral of e^lambda D(lambda) over [lambda_now, lambda_next].
    Order 1 takes D constant (DDIM); ``order=2`` (2M) extrapolates D linearly from the last two steps' predictions,
    ``order=3`` (3M) quadratically from three, with the exact exponential integrals of those polynomials. The first
    steps use the orders their history allows, and the last step (to abar = 1) returns D.

    Args:
      order: 1, 2 or 3.
      clip_x0: clip each x_0 prediction to [-1, 1]; ``thresholding``: or Imagen's dynamic thresholding at this
        percentile (e.g. 0.995) instead.
      key: only for x_T = ``normal(fold_in(key, T))`` (unless ``x_T`` is given): the solver is deterministic.

    Returns:
      x_0 ``[B, ...]``.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}.")
    T = schedule.num_timesteps
    x_T = _starting_noise(key, shape, T, x_T)
    log_alpha = lambda abar: 0.5 * jnp.log(abar)
    log_sigma = lambda abar: 0.5 * jnp.log1p(-abar)

    def step(carry, t):
        x, m1, m2, h1, h2, done = carry
        abar, abar_next = schedule.alphas_cumprod[t], schedule.alphas_cumprod_prev[t]
        last = t == 0
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
        third = first + alpha_next * (_phi2(h) * slope + _phi3(h) * curve)
        use = jnp.minimum(done + 1, order)
        x_next = jnp.where(last, m0, jnp.where(use == 3, third, jnp.where(use == 2, second, first)))
        return (x_next.astype(x.dtype), m0, m1, h, h1, done + 1), None

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
    sigma^ with the fractional timestep :func:`jaxdiff.schedules.timestep_at`; sigma^ is capped at the schedule's top
    level. ``s_churn = 0`` (the default) is the deterministic solver.
    """
    if not (s_churn >= 0 and s_noise >= 0 and s_tmin <= s_tmax):
        raise ValueError(
            f"Heun's churn needs s_churn >= 0, s_noise >= 0 and s_tmin <= s_tmax; got {s_churn}, {s_noise}, "
            f"{s_tmin}, {s_tmax}."
        )
    T = schedule.num_timesteps
    x_T = _starting_noise(key, shape, T, x_T)
    denoise = lambda x, t: _data_prediction(schedule, model_fn, x, t, prediction, variance, clip_x0, thresholding)
    sigmas = jnp.exp(log_sigmas(schedule))
    gamma_max = min(s_churn / T, math.sqrt(2.0) - 1.0)

    def denoise_between(x_tilde, sigma):
        """D at a level off the grid: the network at the fractional timestep of sigma."""
        x = x_tilde * jax.lax.rsqrt(1.0 + sigma**2)
        kinds = {"prediction": prediction, "variance": variance}
        pred_x0, _ = predictions_between_steps(schedule, model_fn, x, jnp.log(sigma), **kinds)
        return _finish_x0(pred_x0, clip_x0, thresholding)

    def step(x, t):
        abar, abar_next = schedule.alphas_cumprod[t], schedule.alphas_cumprod_prev[t]
        sigma, sigma_next = sigmas[t], jnp.sqrt((1 - abar_next) / abar_next)
        x_tilde = x / jnp.sqrt(abar)
        if gamma_max > 0:  # raise the noise to sigma_hat first
            gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), gamma_max, 0.0)
            sigma_hat = jnp.minimum(sigma * (1.0 + gamma), sigmas[-1])
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
        return (x_tilde_next * jnp.sqrt(abar_next)).astype(x.dtype), None

    x, _ = jax.lax.scan(step, x_T, _downwards(T))
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Editing: SDEdit and RePaint


def check_strength(strength: float) -> None:
    """Raise a ValueError unless 0 <= strength <= 1."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(
            f"strength must lie in [0, 1] (0 returns the given images, 1 starts from nearly pure noise), got "
            f"{strength}."
        )


def sdedit(
    sample_fn: Callable[..., jax.Array],
    schedule: Schedule,
    x0: jax.Array,
    strength: float,
    key: jax.Array,
) -> jax.Array:
    """SDEdit (Meng et al. 2022): noise the given images to a fraction ``strength`` of the way down the chain, then run
    a sampler from there.

    With k = round(strength * T) of the schedule's T steps, x_k = sqrt(abar) x0 + sqrt(1 - abar) z at step k - 1
    (z = ``normal(fold_in(key, k))``), and ``sample_fn(truncated(schedule, k), key, x_T=x_k)`` runs the last k steps.

    Args:
      sample_fn: any sampler with the model bound, ``(schedule, key, x_T) -> x_0``, e.g.
        ``lambda s, k, x_T: ddim_sample(s, model_fn, x_T.shape, k, x_T=x_T)``.
      schedule: the schedule to sample on (usually respaced).
      x0: ``[B, ...]`` images in [-1, 1].
      strength: in [0, 1]; 0 returns ``x0`` unchanged (no step is taken).

    Raises:
      ValueError: ``strength`` outside [0, 1].
    """
    check_strength(strength)
    k = round(strength * schedule.num_timesteps)
    if k == 0:
        return x0
    start = truncated(schedule, k)
    noise = _starting_noise(key, x0.shape, k, None).astype(x0.dtype)
    x_k = start.sqrt_alphas_cumprod[k - 1] * x0 + start.sqrt_one_minus_alphas_cumprod[k - 1] * noise
    return sample_fn(start, key, x_k)


def repaint_path(num_steps: int, jump_length: int = 10, resamplings: int = 1) -> np.ndarray:
    """RePaint's walk over the chain: ``[n, 2]`` int32 rows (step index, +1 down / -1 up), from level T to level 0.

    Going down from level n takes step n - 1 (x_n -> x_{n-1}); going up from level n re-noises with step n's
    q(x_{n+1} | x_n). On reaching a level that is a multiple of ``jump_length`` (above 0, with room above it), the walk
    goes back up ``jump_length`` levels and down again, ``resamplings - 1`` times per level: about
    ``resamplings * T`` down-steps in all (``resamplings = 1``: straight down, T steps).

    Raises:
      ValueError: ``jump_length`` or ``resamplings`` < 1.
    """
    if jump_length < 1 or resamplings < 1:
        raise ValueError(f"jump_length and resamplings must be >= 1, got {jump_length} and {resamplings}.")
    jumps_left = {n: resamplings - 1 for n in range(jump_length, num_steps - jump_length + 1, jump_length)}
    path, level = [], num_steps
    while level > 0:
        path.append((level - 1, 1))
        level -= 1
        if jumps_left.get(level, 0) > 0:
            jumps_left[level] -= 1
            for _ in range(jump_length):
                path.append((level, -1))
                level += 1
    return np.asarray(path, np.int32).reshape(-1, 2)


def check_mask(mask: jax.Array | np.ndarray, shape: tuple[int, ...]) -> None:
    """Raise a ValueError unless ``mask`` broadcasts to the images' ``shape`` ``[B, H, W, C]`` without growing it."""
    mask_shape = tuple(np.shape(mask))
    try:
        fits = np.broadcast_shapes(mask_shape, shape) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"The mask's shape {mask_shape} does not fit images of shape {tuple(shape)}: give [H, W, 1], [H, W, C] "
            "or [B, H, W, C] (1 = known pixel, kept; 0 = filled in)."
        )


def repaint_sample(
    schedule: Schedule,
    model_fn: ModelFn,
    x0: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    *,
    jump_length: int = 10,
    resamplings: int = 1,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = True,
) -> jax.Array:
    """RePaint inpainting (Lugmayr et al. 2022): ancestral sampling in which the known pixels are replaced, at every
    step, by the given image noised to that step's level; with resampling jumps to harmonise the two parts.

    Each down-step from level n: x_{n-1} = m * (sqrt(abar_{n-1}) x0 + sqrt(1 - abar_{n-1}) z) + (1 - m) * DDPM(x_n);
    each up-step: x_{n+1} = sqrt(1 - beta_{n+1}) x_n + sqrt(beta_{n+1}) z. The walk is :func:`repaint_path`; one
    ``lax.scan`` over it, row i's noise from ``fold_in(key, i)``, x_T from ``fold_in(key, n)`` (n rows). The last
    step sets the known pixels to ``x0`` itself, so they come back exactly.

    Args:
      x0: ``[B, ...]`` images in [-1, 1] (their unknown pixels are ignored).
      mask: 1 where a pixel is known, 0 where it is to be filled; broadcast to ``x0`` (e.g. ``[H, W, 1]``).
      jump_length, resamplings: RePaint's j and r (``resamplings = 1``: no jumps).

    Raises:
      ValueError: a mask that does not fit ``x0``.
    """
    check_mask(mask, x0.shape)
    mask = jnp.broadcast_to(jnp.asarray(mask, x0.dtype), x0.shape)
    path = jnp.asarray(repaint_path(schedule.num_timesteps, jump_length, resamplings))
    down = functools.partial(ddpm_step, schedule, model_fn, prediction=prediction, variance=variance, clip_x0=clip_x0)

    def walk(x, row):
        (t, direction), i = row
        step_key, known_key = _split(fold_keys(key, i))

        def go_down(x):
            unknown, _ = down(x, t, step_key)
            noise = normal_noise(known_key, x.shape, x.dtype)
            known = schedule.sqrt_alphas_cumprod_prev[t] * x0 + jnp.sqrt(1.0 - schedule.alphas_cumprod_prev[t]) * noise
            return mask * known + (1.0 - mask) * unknown

        def go_up(x):
            noise = normal_noise(step_key, x.shape, x.dtype)
            return jnp.sqrt(schedule.alphas[t]) * x + jnp.sqrt(schedule.betas[t]) * noise

        return jax.lax.cond(direction > 0, go_down, go_up, x).astype(x.dtype), None

    x_T = normal_noise(fold_keys(key, path.shape[0]), x0.shape, x0.dtype)
    rows = (path, jnp.arange(path.shape[0], dtype=jnp.int32))
    x, _ = jax.lax.scan(walk, x_T, rows)
    return x


def guided(
    apply_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    labels: jax.Array,
    null_label: int,
    scale: float,
    *,
    variance: str = "fixed_small",
) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022): ``(1 + w) f(x, t, y) - w f(x, t, null)`` as a ``model_fn``.

    Args:
      apply_fn: the conditional network, ``apply_fn(x_t, timesteps, labels) -> output``.
      labels: ``[B]`` int class labels.
      null_label: the label of the unconditional model (``num_classes`` for jaxdiff's UNet).
      scale: w; 0 is the plain conditional model. Both branches run in one batched call of ``2B`` rows, image-major
        (rows 2b and 2b + 1 are image b with its label and with the null label), so that a batch split over devices
        stays where it is: each device runs both branches of its own images.
      variance: with a learned variance only the prediction half is guided; the variance half is the conditional one.

    The combination is affine with weights summing to 1, so guiding the raw output is the same as guiding eps for
    eps, x0 and v predictions alike.
    """

    def model_fn(x_t, timesteps):
        pair = lambda a, b: jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])
        both = apply_fn(pair(x_t, x_t), pair(timesteps, timesteps), pair(labels, jnp.full_like(labels, null_label)))
        both = both.reshape(x_t.shape[0], 2, *both.shape[1:])
        return _extrapolate(both[:, 0], both[:, 1], scale, variance)

    return model_fn


def autoguided(main_fn: ModelFn, guide_fn: ModelFn, scale: float, *, variance: str = "fixed_small") -> ModelFn:
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): a network guided
    away from a weaker version of itself, ``(1 + w) main(x, t) - w guide(x, t)``, as a ``model_fn``.

    Args:
      main_fn: the network, ``model_fn(x_t, timesteps) -> output``.
      guide_fn: a weaker network of the same task, trained on the same data and making the same kind of errors more
        strongly (e.g. the same run's EMA parameters at an earlier step). Its errors point away from the data, so
        stepping away from them pulls samples into the data's well-learned regions; unlike classifier-free guidance it
        needs no labels and keeps the variety.
      scale: w; 0 is the main network alone (the guide is then not called).
      variance: with a learned variance only the prediction half is guided; the variance half is the main one's.

    As for :func:`guided`, the weights sum to 1, so guiding the raw output guides eps, x0 and v alike.
    """
    if scale == 0:
        return main_fn
    return lambda x_t, timesteps: _extrapolate(main_fn(x_t, timesteps), guide_fn(x_t, timesteps), scale, variance)


def _extrapolate(strong: jax.Array, weak: jax.Array, scale: float, variance: str) -> jax.Array:
    """``(1 + scale) strong - scale weak``; for a learned variance the prediction half only, the variance strong's."""
    if variance in diffusion.LEARNED_VARIANCES:
        (s_pred, s_var), (w_pred, _) = jnp.split(strong, 2, axis=-1), jnp.split(weak, 2, axis=-1)
        return jnp.concatenate([(1.0 + scale) * s_pred - scale * w_pred, s_var], axis=-1)
    return (1.0 + scale) * strong - scale * weak
