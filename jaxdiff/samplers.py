"""Sampling: start from noise, remove the learned noise step by step; each sampler is one ``lax.scan`` over timesteps.

Pure: the network enters as ``model_fn(x_t, timesteps) -> output`` (called with ``schedule.timestep_map[t]``) and all
noise comes from one key, ``fold_in(key, t)`` at step t, drawn for the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff import diffusion
from jaxdiff.diffusion import ModelFn
from jaxdiff.schedules import Schedule


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
    """One ancestral step (DDPM Algorithm 2): x_{t-1} = mu_theta(x_t, t) + sigma_t z, with no noise at t = 1.

    Args:
      x_t: ``[B, ...]``.
      t: scalar int, the 0-indexed step of ``schedule``.

    Returns:
      (x_{t-1}, predicted x_0), both ``[B, ...]``.
    """
    t_batch = jnp.full((x_t.shape[0],), t, jnp.int32)
    out = model_fn(x_t, jnp.take(schedule.timestep_map, t_batch))
    p = diffusion.p_mean_variance(
        schedule, out, x_t, t_batch, prediction=prediction, variance=variance, clip_x0=clip_x0
    )
    noise = jax.random.normal(key, x_t.shape, x_t.dtype)
    x_prev = p.mean + jnp.where(t > 0, jnp.exp(0.5 * p.log_variance), 0.0) * noise
    return x_prev, p.pred_x0


def ddpm_sample(
    schedule: Schedule,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = True,
) -> jax.Array:
    """Ancestral sampling from x_T ~ N(0, I) down to x_0, as one ``lax.scan`` over the T steps of ``schedule``.

    Args:
      shape: ``[B, ...]`` of the images.
      key: the noise of x_T is ``normal(fold_in(key, T))``; of step t, ``normal(fold_in(key, t))``.

    Returns:
      x_0, ``[B, ...]`` (in [-1, 1] up to the last step's mean when ``clip_x0``).
    """
    T = schedule.num_timesteps
    x_T = jax.random.normal(jax.random.fold_in(key, T), shape)

    def body(x_t, t):
        x_prev, _ = ddpm_step(
            schedule,
            model_fn,
            x_t,
            t,
            jax.random.fold_in(key, t),
            prediction=prediction,
            variance=variance,
            clip_x0=clip_x0,
        )
        return x_prev, None

    x_0, _ = jax.lax.scan(body, x_T, jnp.arange(T - 1, -1, -1, dtype=jnp.int32))
    return x_0


def to_uint8(images: jax.Array) -> jax.Array:
    """Images in [-1, 1] -> uint8 in [0, 255] (rounded, clipped)."""
    return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
