r"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"): the same network,
preconditioned, trained on log-normal noise levels, and sampled by Heun's method on the rho grid.

The process is variance exploding, :math:`x = x_0 + \sigma \epsilon`. The network F is wrapped into a denoiser
(Table 1, "Ours"),

.. math::

    D(x; \sigma) = c_\text{skip}(\sigma)\, x + c_\text{out}(\sigma)\, F\big(c_\text{in}(\sigma)\, x;
      c_\text{noise}(\sigma)\big), \quad
    c_\text{skip} = \frac{\sigma_\text{data}^2}{\sigma^2 + \sigma_\text{data}^2}, \;
    c_\text{out} = \frac{\sigma \sigma_\text{data}}{\sqrt{\sigma^2 + \sigma_\text{data}^2}}, \;
    c_\text{in} = \frac{1}{\sqrt{\sigma^2 + \sigma_\text{data}^2}}, \;
    c_\text{noise} = \tfrac14 \ln \sigma,

and trained on :math:`\mathbb{E}\, \lambda(\sigma) \|D(x_0 + \sigma\epsilon; \sigma) - x_0\|^2` with
:math:`\ln \sigma \sim \mathcal{N}(P_\text{mean}, P_\text{std}^2)` and
:math:`\lambda(\sigma) = (\sigma^2 + \sigma_\text{data}^2) / (\sigma \sigma_\text{data})^2 = 1 / c_\text{out}^2`: the
loss is ``||F - F_target||^2`` with unit weight, and F's target has unit variance at every sigma for data of std
sigma_data (eq. 8 and appendix B.6).

The UNet's sinusoidal embedding was made for DDPM's integer timesteps in [0, 1000), while c_noise spans only 2.65 over
[0.002, 80]; the network reads ``NOISE_LABEL_SCALE * c_noise`` (a fixed affine change of its input, which Karras et
al.'s c_noise leaves to the architecture: their VP preconditioning feeds 999 t).

The rest of jaxdiff samples on VP chains (``x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps``): :func:`vp_betas` is the
chain of ``T`` levels log-uniform in sigma over [sigma_min, sigma_max] (abar = 1 / (1 + sigma^2)), and
:func:`vp_model` presents the denoiser on it as an x_0-predicting network, so DDPM, DDIM, DPM-Solver++, Heun, the
bound and FID run on an EDM model unchanged. :func:`edm_sample` is Karras et al.'s own sampler (Algorithm 2),
deterministic or with churn; :func:`denoiser` gives it the D of any VP model.

All functions are pure and work under ``jit``, ``vmap`` and ``grad``; ``x`` is ``[B, ...]``, sigma ``[B]`` (or a
scalar where said).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import Array, ModelFn, _per_example, fold_keys, mean_flat, normal_noise
from jaxdiff.errors import ConfigError
from jaxdiff.samplers.common import _starting_noise, predictions_between_steps
from jaxdiff.schedules import Schedule

#: The data's std of Karras et al.'s CIFAR-10 setting (Table 1); set it to your data's (configs/digits_edm.py: 0.85).
SIGMA_DATA = 0.5
#: The mean of ln sigma of the training levels (Table 1: ln sigma ~ N(P_MEAN, P_STD^2)).
P_MEAN = -1.2
#: The std of ln sigma of the training levels.
P_STD = 1.2
#: The lowest level of the sampling grid (section 5).
SIGMA_MIN = 0.002
#: The highest level of the sampling grid, where sampling starts from sigma_max eps.
SIGMA_MAX = 80.0
#: The grid's rho (eq. 5): sigma^(1/rho) evenly spaced, denser at low noise.
RHO = 7.0
#: The network's noise input is this times c_noise = ln(sigma) / 4: 62.5 per unit of ln sigma, so [0.002, 80] spans
#: [-388, 274], a range like that of the DDPM timesteps the UNet's embedding was made for.
NOISE_LABEL_SCALE = 250.0

__all__ = [
    "NOISE_LABEL_SCALE",
    "P_MEAN",
    "P_STD",
    "RHO",
    "SIGMA_DATA",
    "SIGMA_MAX",
    "SIGMA_MIN",
    "Preconditioning",
    "denoise",
    "denoiser",
    "draw_sigmas",
    "edm_loss",
    "edm_sample",
    "loss_weight",
    "noise_label",
    "preconditioning",
    "sigma_grid",
    "training_target",
    "vp_betas",
    "vp_model",
]


class Preconditioning(NamedTuple):
    """The four coefficients of Karras et al.'s Table 1, each of the shape of sigma."""

    c_skip: Array
    c_out: Array
    c_in: Array
    c_noise: Array


def preconditioning(sigma: Array, sigma_data: float = SIGMA_DATA) -> Preconditioning:
    r"""c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
    c_noise = ln(sigma) / 4, with sd = ``sigma_data`` (Karras et al. 2022, Table 1)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    total = jnp.square(sigma) + sigma_data**2
    root = jax.lax.rsqrt(total)
    return Preconditioning(sigma_data**2 / total, sigma * sigma_data * root, root, jnp.log(sigma) / 4.0)


def noise_label(sigma: Array) -> Array:
    """What the network reads as its noise input: ``NOISE_LABEL_SCALE * c_noise(sigma)``."""
    return NOISE_LABEL_SCALE * jnp.log(jnp.asarray(sigma, jnp.float32)) / 4.0


def denoise(model_fn: ModelFn, x: Array, sigma: Array, sigma_data: float = SIGMA_DATA) -> Array:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise): the preconditioned network's estimate of x_0.

    Args:
      model_fn: the network F, ``model_fn(x_in [B, ...], noise_label [B]) -> [B, ...]``.
      x: noisy images x_0 + sigma eps, ``[B, ...]``.
      sigma: ``[B]`` (or a scalar), > 0.
    """
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    c = preconditioning(sigma, sigma_data)
    out = model_fn(_per_example(c.c_in, x) * x, noise_label(sigma))
    return _per_example(c.c_skip, x) * x + _per_example(c.c_out, x) * out


def training_target(x0: Array, noise: Array, sigma: Array, sigma_data: float = SIGMA_DATA) -> Array:
    """F's target at x = x_0 + sigma eps: (x_0 - c_skip x) / c_out, so that D = x_0 exactly when F hits it
    (eq. 8). For data of std sigma_data (independent of eps) it has unit variance at every sigma."""
    c = preconditioning(sigma, sigma_data)
    x = x0 + _per_example(sigma, x0) * noise
    return (x0 - _per_example(c.c_skip, x0) * x) / _per_example(c.c_out, x0)


def loss_weight(sigma: Array, sigma_data: float = SIGMA_DATA) -> Array:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2, the weight of ||D - x_0||^2 (Table 1)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return (jnp.square(sigma) + sigma_data**2) / jnp.square(sigma * sigma_data)


def draw_sigmas(key: Array, batch_size: int, p_mean: float = P_MEAN, p_std: float = P_STD) -> Array:
    """Training levels ``[B]``: ln sigma ~ N(p_mean, p_std^2) (Karras et al.'s log-normal, -1.2 and 1.2)."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, (batch_size,), jnp.float32))


def edm_loss(model_fn: ModelFn, x0: Array, noise: Array, sigma: Array, sigma_data: float = SIGMA_DATA) -> Array:
    """The per-example loss ``[B]``: lambda(sigma) ||D(x_0 + sigma eps; sigma) - x_0||^2 averaged over the
    dimensions, computed as ||F - F_target||^2 (the same number: lambda c_out^2 = 1), so no weight blows up at small
    sigma. ``model_fn`` as in :func:`denoise`."""
    c = preconditioning(sigma, sigma_data)
    x = x0 + _per_example(sigma, x0) * noise
    out = model_fn(_per_example(c.c_in, x0) * x, noise_label(sigma))
    return mean_flat(jnp.square(out - training_target(x0, noise, sigma, sigma_data)))


def sigma_grid(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> Array:
    """Karras et al.'s grid (eq. 5), ``[steps + 1]`` float32, decreasing, with a final 0:
    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i < N = ``steps``.

    Raises:
      ValueError: steps < 1, or not 0 < sigma_min < sigma_max.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"The EDM grid needs steps >= 1, got {steps!r}.")
    if not 0 < sigma_min < sigma_max:
        raise ConfigError(f"The EDM grid needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")
    ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return jnp.asarray(np.append(sigmas, 0.0), jnp.float32)


def edm_sample(
    denoise_fn,
    shape: tuple[int, ...],
    key: Array,
    sigmas: Array,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    x_T: Array | None = None,
) -> Array:
    r"""Karras et al.'s sampler (Algorithm 2): Heun's method on dx/dsigma = (x - D(x; sigma)) / sigma over the grid
    ``sigmas`` (``[N + 1]``, decreasing, ending at 0: :func:`sigma_grid`), 2N - 1 calls of D (the step to sigma = 0 is
    Euler's, which returns D).

    With ``s_churn > 0`` it is the stochastic sampler: at a level sigma_i in [s_tmin, s_tmax] the noise is first raised
    to sigma^ = sigma_i (1 + gamma), gamma = min(s_churn / N, sqrt(2) - 1), by adding ``s_noise`` sqrt(sigma^2 -
    sigma_i^2) times fresh noise (from ``fold_in(key, i)``), and the step is solved from sigma^.

    Args:
      denoise_fn: ``D(x [B, ...], sigma [B]) -> [B, ...]`` (:func:`denoise` of an EDM network, or :func:`denoiser` of
        any VP model).
      shape: ``[B, ...]``.
      key: x = sigma_0 ``normal(fold_in(key, N))`` unless ``x_T`` (the noise itself, of unit variance) is given; one
        key or ``[B]`` keys (then image b's noise comes from ``key[b]`` alone).

    Returns:
      x_0 ``[B, ...]``.
    """
    if not (s_churn >= 0 and s_noise >= 0 and s_tmin <= s_tmax):
        raise ConfigError(
            f"EDM's churn needs s_churn >= 0, s_noise >= 0 and s_tmin <= s_tmax; got {s_churn}, {s_noise}, "
            f"{s_tmin}, {s_tmax}."
        )
    sigmas = jnp.asarray(sigmas, jnp.float32)
    steps = sigmas.shape[0] - 1
    gamma_max = min(s_churn / steps, math.sqrt(2.0) - 1.0)
    x = sigmas[0] * _starting_noise(key, shape, steps, x_T)
    batch = lambda s: jnp.full((shape[0],), s, jnp.float32)

    def step(x, i):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if gamma_max > 0:
            gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), gamma_max, 0.0)
            sigma_hat = sigma * (1.0 + gamma)
            noise = normal_noise(fold_keys(key, i), x.shape, x.dtype)
            x = x + s_noise * jnp.sqrt(jnp.square(sigma_hat) - jnp.square(sigma)) * noise
            sigma = sigma_hat
        d = (x - denoise_fn(x, batch(sigma))) / sigma
        euler = x + (sigma_next - sigma) * d

        def correct(euler):
            d_next = (euler - denoise_fn(euler, batch(sigma_next))) / sigma_next
            return x + (sigma_next - sigma) * (d + d_next) / 2

        return jax.lax.cond(sigma_next > 0, correct, lambda euler: euler, euler).astype(x.dtype), None

    x, _ = jax.lax.scan(step, x, jnp.arange(steps))
    return x


def denoiser(schedule: Schedule, model_fn: ModelFn, *, prediction: str, variance: str = "fixed_small"):
    """D(x; sigma) of a VP model (``model_fn(x_t, timesteps)`` on the chain of ``schedule``, predicting
    ``prediction``): the x_0 it predicts at x_t = x / sqrt(1 + sigma^2), level sigma (abar = 1 / (1 + sigma^2)),
    called at the fractional timestep of that level (:func:`jaxdiff.schedules.timestep_at`), so that
    :func:`edm_sample` runs on any model. On an EDM model's own chain (:func:`vp_betas`, linear in ln sigma) it is
    that model's D at exactly sigma, up to float rounding."""

    def denoise_fn(x, sigma):
        scale = jax.lax.rsqrt(1.0 + jnp.square(sigma))
        x_t = _per_example(scale, x) * x
        log_sigma = jnp.log(sigma[0])  # one level for the batch: the samplers step it together
        pred_x0, _ = predictions_between_steps(
            schedule, model_fn, x_t, log_sigma, prediction=prediction, variance=variance
        )
        return pred_x0

    return denoise_fn


def vp_betas(num_timesteps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> np.ndarray:
    """The VP chain of an EDM model, float64 ``[T]``: T levels with ln sigma evenly spaced from ln sigma_min to
    ln sigma_max, abar_t = 1 / (1 + sigma_t^2), beta_t = 1 - abar_t / abar_{t-1} (abar_0 = 1). The sampler's grids
    (:func:`jaxdiff.schedules.respaced`) respace it as any chain.

    Raises:
      ValueError: T < 2, or not 0 < sigma_min < sigma_max.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
        raise ConfigError(f"An EDM model's chain needs num_timesteps >= 2, got {num_timesteps!r}.")
    if not 0 < sigma_min < sigma_max:
        raise ConfigError(f"EDM needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")
    sigmas = np.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), num_timesteps))
    abar = 1.0 / (1.0 + sigmas**2)
    return 1.0 - abar / np.concatenate([[1.0], abar[:-1]])


def vp_model(model_fn: ModelFn, num_timesteps: int, sigma_min: float, sigma_max: float, sigma_data: float) -> ModelFn:
    """The EDM network ``model_fn(x_in, noise_label)`` as a VP network on the chain of :func:`vp_betas`:
    ``(x_t, timesteps) -> x_0``, with ln sigma = ln sigma_min + timestep / (T - 1) (ln sigma_max - ln sigma_min) (any
    real timestep) and x = x_t sqrt(1 + sigma^2), the VE point of x_t. Read its output with ``prediction='x0'``."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)

    def vp_fn(x_t, timesteps):
        sigma = jnp.exp(lo + jnp.asarray(timesteps, jnp.float32) * ((hi - lo) / (num_timesteps - 1)))
        x = _per_example(jnp.sqrt(1.0 + jnp.square(sigma)), x_t) * x_t
        return denoise(model_fn, x, sigma, sigma_data)

    return vp_fn
