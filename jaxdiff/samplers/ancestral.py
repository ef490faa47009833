"""Ancestral and DDIM sampling: DDPM's Algorithm 2 and Song et al.'s implicit sampler, and DDIM run backwards.

  - :func:`ddpm_sample`: ancestral sampling (DDPM Algorithm 2) for every prediction (eps, x0, v) and variance
    (fixed small/large, learned, learned range), on the full or a respaced schedule;
  - :func:`ddim_sample`: DDIM (Song et al. 2021) with ``eta`` (0: deterministic; 1: the DDPM posterior variance of the
    schedule it runs on), on any respaced schedule (:func:`jaxdiff.schedules.sampling_schedule`);
  - :func:`ddim_invert`: DDIM run backwards (eta = 0): an image to the x_T that DDIM decodes back to it.

Each is one ``lax.scan`` over the steps, and returns the final x_0, and with ``trajectory_every=k`` also a
:class:`~jaxdiff.samplers.common.Trajectory` of x_t and the predicted x_0 after every k steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxdiff import diffusion
from jaxdiff.diffusion import ModelFn, normal_noise
from jaxdiff.errors import ConfigError
from jaxdiff.samplers.common import _model_prediction, _sample_down, _scan_steps
from jaxdiff.schedules import Schedule

__all__ = ["check_eta", "ddim_invert", "ddim_sample", "ddim_step", "ddpm_sample", "ddpm_step"]


def check_eta(eta: float) -> None:
    """Raise a ValueError unless eta >= 0."""
    if not eta >= 0:
        raise ConfigError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {eta}.")


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
      trajectory_every: also return a :class:`~jaxdiff.samplers.common.Trajectory` with snapshots after every this
        many steps.

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
    """DDIM sampling over the steps of ``schedule`` (respace it with :func:`jaxdiff.schedules.sampling_schedule` for
    fewer steps).

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
