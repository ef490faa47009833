r"""The variational bound and its pieces: Gaussian KL, the decoders, the prior term, one term per timestep, and all
of them over the whole chain.

The bound (DDPM eq. 5) splits into a prior matching, T - 1 denoising matching and one reconstruction term:

.. math::

    -\log p_\theta(x_0) \le \underbrace{D_{KL}(q(x_T|x_0) \,\|\, \mathcal{N}(0, I))}_{L_T}
      + \sum_{t=2}^{T} \underbrace{\mathbb{E}_q D_{KL}(q(x_{t-1}|x_t,x_0) \,\|\, p_\theta(x_{t-1}|x_t))}_{L_{t-1}}
      \underbrace{- \mathbb{E}_q \log p_\theta(x_0|x_1)}_{L_0}

Every term is reported in bits per dimension (nats / (D ln 2), D = the number of dimensions of one image).
Pure functions of arrays, like :mod:`jaxdiff.diffusion`: noise and keys are arguments.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from jaxdiff.diffusion import (
    Array,
    ModelFn,
    _check_same_shape,
    check_choice,
    fold_keys,
    key_per_example,
    mean_flat,
    normal_noise,
    p_mean_variance,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
)
from jaxdiff.errors import ConfigError
from jaxdiff.schedules import Schedule

#: The decoders of the reconstruction term L_0: DDPM's discretised Gaussian (8-bit data) or a plain Gaussian.
DECODERS = ("discretized", "gaussian")

__all__ = [
    "DECODERS",
    "VariationalBound",
    "discretized_gaussian_log_likelihood",
    "gaussian_log_likelihood",
    "normal_kl",
    "prior_bpd",
    "variational_bound",
    "vb_term_bpd",
]


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    r"""Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats; arguments broadcast.

    .. math::
      \tfrac12\left(\log\sigma_2^2 - \log\sigma_1^2 + \frac{\sigma_1^2 + (\mu_1-\mu_2)^2}{\sigma_2^2} - 1\right)
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _log_sub_exp(log_a: Array, log_b: Array) -> Array:
    """log(exp(log_a) - exp(log_b)) for log_a >= log_b, accurate when the two are close or both tiny."""
    return log_a + jnp.log(jnp.maximum(-jnp.expm1(log_b - log_a), 1e-30))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, log_scale: Array, num_bins: int = 256) -> Array:
    """Elementwise log-probability of discretised data under a Gaussian, in nats (the DDPM decoder).

    The data ``x`` lie on ``num_bins`` evenly spaced levels in [-1, 1] (8-bit images: 256). Each level owns the bin of
    half-width 1 / (num_bins - 1) around it; the two edge bins extend to -inf and +inf, so the probabilities of all
    levels sum to 1. Bin masses are formed in log space from the nearer tail, so they stay accurate far from the mean.

    Args:
      x: data, ``[B, ...]``, values on the levels.
      mean: the Gaussian's mean, broadcastable to x.
      log_scale: the log standard deviation (0.5 * log-variance), broadcastable to x.
    """
    delta = 1.0 / (num_bins - 1)
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    upper = inv_std * (centered + delta)
    lower = inv_std * (centered - delta)
    log_cdf_upper = log_ndtr(upper)  # log P(X <= x + delta): the whole lowest bin
    log_sf_lower = log_ndtr(-lower)  # log P(X > x - delta): the whole highest bin
    # Middle bins: Phi(upper) - Phi(lower), taken on the side of the mean where both CDF values are small.
    right = centered > 0
    log_a = jnp.where(right, log_ndtr(-lower), log_ndtr(upper))
    log_b = jnp.where(right, log_ndtr(-upper), log_ndtr(lower))
    log_mid = _log_sub_exp(log_a, log_b)
    edge = 1.0 - delta / 2
    return jnp.where(x < -edge, log_cdf_upper, jnp.where(x > edge, log_sf_lower, log_mid))


def gaussian_log_likelihood(x: Array, mean: Array, log_variance: Array) -> Array:
    """Elementwise log N(x; mean, exp(log_variance)) in nats (a continuous decoder, for continuous data)."""
    return -0.5 * (math.log(2 * math.pi) + log_variance + jnp.square(x - mean) * jnp.exp(-log_variance))


def _nats_to_bits_per_dim(elementwise_nats: Array) -> Array:
    return mean_flat(elementwise_nats) / math.log(2.0)


def prior_bpd(schedule: Schedule, x0: Array) -> Array:
    """The prior matching term L_T = KL(q(x_T | x_0) || N(0, I)), in bits/dim, shape ``[B]``."""
    t_last = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_var = q_mean_variance(schedule, x0, t_last)
    return _nats_to_bits_per_dim(normal_kl(mean, log_var, 0.0, 0.0))


def vb_term_bpd(
    schedule: Schedule,
    model_output: Array,
    x0: Array,
    x_t: Array,
    t: Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    decoder: str = "discretized",
) -> Array:
    """One term of the variational bound, in bits/dim, shape ``[B]``.

    For t > 1 (index > 0) the denoising matching term L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t));
    at t = 1 (index 0) the reconstruction term L_0 = -log p_theta(x_0 | x_1), with the discretised 8-bit decoder (or a
    continuous Gaussian one with ``decoder='gaussian'``).
    """
    check_choice("decoder", decoder, DECODERS)
    _check_same_shape(x0=x0, x_t=x_t)
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    p = p_mean_variance(schedule, model_output, x_t, t, prediction=prediction, variance=variance, clip_x0=clip_x0)
    kl = normal_kl(true_mean, true_log_var, p.mean, p.log_variance)
    if decoder == "discretized":
        nll = -discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance)
    else:
        nll = -gaussian_log_likelihood(x0, p.mean, p.log_variance)
    kl, nll = jnp.broadcast_to(kl, x0.shape), jnp.broadcast_to(nll, x0.shape)
    return jnp.where(t == 0, _nats_to_bits_per_dim(nll), _nats_to_bits_per_dim(kl))


class VariationalBound(NamedTuple):
    """The bound -log p(x_0) <= L_T + sum_{t>=2} L_{t-1} + L_0, per example, in bits per dimension.

    Attributes:
      total: ``[B]`` the whole bound.
      prior: ``[B]`` L_T, prior matching.
      denoising: ``[B]`` sum_{t=2..T} L_{t-1}, denoising matching.
      reconstruction: ``[B]`` L_0 = -log p(x_0 | x_1).
      per_timestep: ``[B, T]`` column 0 is L_0, column i is L_i (the KL at the paper's t = i + 1).
    """

    total: Array
    prior: Array
    denoising: Array
    reconstruction: Array
    per_timestep: Array

    def to_nats(self, num_dims: int) -> VariationalBound:
        """The same terms in nats per example (bits/dim times num_dims * ln 2); num_dims = prod(x0.shape[1:])."""
        return VariationalBound(*(x * (num_dims * math.log(2.0)) for x in self))


def variational_bound(
    schedule: Schedule,
    model_fn: ModelFn,
    x0: Array,
    key: Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
    decoder: str = "discretized",
    chunk_size: int = 16,
) -> VariationalBound:
    """Every term of the variational bound for a batch, over all T timesteps, in one compiled program.

    Timesteps are processed ``chunk_size`` at a time (``lax.map`` over chunks, the network called on ``B * chunk_size``
    images at once, example-major: row ``b * chunk_size + j`` is example b at the chunk's j-th timestep, so that a batch
    split over devices stays split and each device runs only its own examples), so memory is bounded by the chunk and
    the program does not grow with T. The noise of timestep t
    is ``normal(fold_in(key, t))``, so the result does not depend on ``chunk_size``. With one key per example
    (``key`` of shape ``[B]``), example b's noise is ``normal(fold_in(key[b], t))``: then the result of an example
    does not depend on which batch it is in either (what an evaluation over a whole split needs).

    Args:
      model_fn: ``model_fn(x_t, timesteps) -> output`` on batches of ``B * chunk_size``, example-major (a conditional
        network repeats each label ``chunk_size`` times: ``jnp.repeat(labels, chunk_size)``).
      x0: data in [-1, 1], ``[B, ...]`` (on the 256 levels for the discretised decoder).
      key: PRNG key of the noise, or ``[B]`` keys, one per example.
      decoder: ``discretized`` (8-bit data, DDPM) or ``gaussian`` (continuous data).

    Returns:
      VariationalBound in bits/dim (``.to_nats(num_dims)`` converts).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    check_choice("decoder", decoder, DECODERS)
    T, B = schedule.num_timesteps, x0.shape[0]
    if key_per_example(key) and key.shape[0] != B:
        raise ConfigError(f"Got {key.shape[0]} keys for a batch of {B} examples; pass one key, or one per example.")
    chunk = min(chunk_size, T)
    num_chunks = -(-T // chunk)
    x0_rep = jnp.repeat(x0, chunk, axis=0)  # [B * chunk, ...], example-major

    def chunk_terms(ts: Array) -> Array:  # [chunk] -> [B, chunk]
        ts = jnp.minimum(ts, T - 1)  # the padding of the last chunk repeats T - 1; discarded below
        noise = jax.vmap(lambda s: normal_noise(fold_keys(key, s), x0.shape, x0.dtype))(ts)  # [chunk, B, ...]
        noise = jnp.swapaxes(noise, 0, 1)
        t_flat = jnp.tile(ts, B)
        x_t = q_sample(schedule, x0_rep, t_flat, noise.reshape(x0_rep.shape))
        out = model_fn(x_t, jnp.take(schedule.timestep_map, t_flat))
        terms = vb_term_bpd(
            schedule,
            out,
            x0_rep,
            x_t,
            t_flat,
            prediction=prediction,
            variance=variance,
            clip_x0=clip_x0,
            decoder=decoder,
        )
        return terms.reshape(B, chunk)

    steps = jnp.arange(num_chunks * chunk, dtype=jnp.int32).reshape(num_chunks, chunk)
    per_t = jnp.moveaxis(jax.lax.map(chunk_terms, steps), 0, 1).reshape(B, num_chunks * chunk)[:, :T]
    prior = prior_bpd(schedule, x0)
    reconstruction = per_t[:, 0]
    denoising = jnp.sum(per_t[:, 1:], axis=1)
    return VariationalBound(prior + reconstruction + denoising, prior, denoising, reconstruction, per_t)
