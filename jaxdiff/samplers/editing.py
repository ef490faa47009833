"""Editing with a sampler: SDEdit (noise an image part of the way, then sample back) and RePaint inpainting (the
known pixels replaced at every step by the image noised to that step's level)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import ModelFn, fold_keys, normal_noise
from jaxdiff.errors import ConfigError
from jaxdiff.samplers.ancestral import ddpm_step
from jaxdiff.samplers.common import _split, _starting_noise
from jaxdiff.schedules import Schedule, truncated

__all__ = ["check_mask", "check_strength", "repaint_path", "repaint_sample", "sdedit"]


def check_strength(strength: float) -> None:
    """Raise a ValueError unless 0 <= strength <= 1."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(
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
        raise ConfigError(f"jump_length and resamplings must be >= 1, got {jump_length} and {resamplings}.")
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
    """Raise a ConfigError unless the inpainting ``mask`` (1 = filled in, 0 = kept) broadcasts to the images'
    ``shape`` ``[B, H, W, C]`` without growing it."""
    mask_shape = tuple(np.shape(mask))
    try:
        fits = np.broadcast_shapes(mask_shape, shape) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:
        raise ConfigError(
            f"The mask's shape {mask_shape} does not fit images of shape {tuple(shape)}: give [H, W, 1], [H, W, C] "
            "or [B, H, W, C] (1 = filled in, 0 = kept)."
        )


def repaint_sample(
    schedule: Schedule,
    model_fn: ModelFn,
    x0: jax.Array,
    key: jax.Array,
    *,
    mask: jax.Array,
    jump_length: int = 10,
    resamplings: int = 1,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = True,
) -> jax.Array:
    """RePaint inpainting (Lugmayr et al. 2022): ancestral sampling in which the known pixels are replaced, at every
    step, by the given image noised to that step's level; with resampling jumps to harmonise the two parts.

    Each down-step from level n: x_{n-1} = (1 - m) * (sqrt(abar_{n-1}) x0 + sqrt(1 - abar_{n-1}) z) + m * DDPM(x_n),
    with m the mask (1 where a pixel is filled in);
    each up-step: x_{n+1} = sqrt(1 - beta_{n+1}) x_n + sqrt(beta_{n+1}) z. The walk is :func:`repaint_path`; one
    ``lax.scan`` over it, row i's noise from ``fold_in(key, i)``, x_T from ``fold_in(key, n)`` (n rows). The last
    step sets the known pixels to ``x0`` itself, so they come back exactly.

    Args:
      x0: ``[B, ...]`` images in [-1, 1] (the pixels to be filled in are ignored).
      key: one key, or ``[B]`` keys (image b drawn from ``key[b]`` alone).
      mask: the hole, 1 where a pixel is filled in and 0 where ``x0``'s pixel is kept, as ``jaxdiff-sample --mask``
        and :class:`jaxdiff.pipeline.Edit` have it (and inpainting tools: white is the hole); broadcast to ``x0``
        (e.g. ``[H, W, 1]``). Keyword-only: before jaxdiff 0.2 it was positional with the opposite polarity.
      jump_length, resamplings: RePaint's j and r (``resamplings = 1``: no jumps).

    Raises:
      ValueError: a mask that does not fit ``x0``.
    """
    check_mask(mask, x0.shape)
    keep = 1.0 - jnp.broadcast_to(jnp.asarray(mask, x0.dtype), x0.shape)
    path = jnp.asarray(repaint_path(schedule.num_timesteps, jump_length, resamplings))
    down = functools.partial(ddpm_step, schedule, model_fn, prediction=prediction, variance=variance, clip_x0=clip_x0)

    def walk(x, row):
        (t, direction), i = row
        step_key, known_key = _split(fold_keys(key, i))

        def go_down(x):
            unknown, _ = down(x, t, step_key)
            noise = normal_noise(known_key, x.shape, x.dtype)
            known = schedule.sqrt_alphas_cumprod_prev[t] * x0 + jnp.sqrt(1.0 - schedule.alphas_cumprod_prev[t]) * noise
            return keep * known + (1.0 - keep) * unknown

        def go_up(x):
            noise = normal_noise(step_key, x.shape, x.dtype)
            return jnp.sqrt(schedule.alphas[t]) * x + jnp.sqrt(schedule.betas[t]) * noise

        return jax.lax.cond(direction > 0, go_down, go_up, x).astype(x.dtype), None

    x_T = normal_noise(fold_keys(key, path.shape[0]), x0.shape, x0.dtype)
    rows = (path, jnp.arange(path.shape[0], dtype=jnp.int32))
    x, _ = jax.lax.scan(walk, x_T, rows)
    return x
