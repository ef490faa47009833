"""What the samplers share: the snapshots of a trajectory, the scan over steps, the starting noise, the network's
predictions at a step or between steps, and the x_0 clipping and thresholding.

All randomness comes from ``key``: x_T is ``normal(fold_in(key, T))`` and step t's noise ``normal(fold_in(key, t))``
(:func:`jaxdiff.diffusion.fold_keys`), with ``key`` one key or ``[B]`` typed keys, one per image.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff import diffusion
from jaxdiff.diffusion import ModelFn, fold_keys, key_per_example, normal_noise
from jaxdiff.errors import ConfigError
from jaxdiff.schedules import Schedule, timestep_at

__all__ = ["Trajectory", "dynamic_threshold", "predictions_between_steps"]


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


def _scan_steps(step_fn, x_init, ts, trajectory_every: int | None):
    """Run ``step_fn(x, t) -> (x_next, pred_x0)`` over ``ts`` in one scan; snapshots every k steps if asked."""
    if trajectory_every is None:
        x, _ = jax.lax.scan(lambda x, t: (step_fn(x, t)[0], None), x_init, ts)
        return x, None
    if trajectory_every < 1:
        raise ConfigError(f"trajectory_every must be >= 1, got {trajectory_every}.")
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


def _may_start_from_pure_noise(schedule: Schedule) -> bool:
    """Whether a step of ``schedule`` may start at abar = 0 (a zero-terminal-SNR chain): False only when its levels
    are known at trace time (closed over, not passed into jit) and the top one is above 0. A sampler that needs a
    separate branch for that step traces it only when this is True."""
    top = schedule.alphas_cumprod[-1]
    return isinstance(top, jax.core.Tracer) or float(top) == 0.0


def dynamic_threshold(x0: jax.Array, percentile: float) -> jax.Array:
    """Imagen's dynamic thresholding: per image, s = max(1, the ``percentile`` quantile of ``|x0|``); clip to
    [-s, s] and divide by s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def predictions_between_steps(
    schedule: Schedule, model_fn: ModelFn, x: jax.Array, log_sigma: jax.Array, *, prediction: str, variance: str
) -> tuple[jax.Array, jax.Array]:
    """(x_0, eps) of the network at noise level ``log_sigma`` (a scalar; sigma = sqrt((1 - abar) / abar)), which may
    lie between the schedule's steps: the network is called with the level's fractional timestep along the original
    chain, even for a respaced schedule (:func:`jaxdiff.schedules.timestep_at`). For solvers that leave the grid
    (Heun's churn, the likelihood ODE)."""
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
