r"""The DDPM forward process, its posterior, the eps/x0/v parametrisations, and the reverse model's Gaussians.

The forward process adds Gaussian noise step by step (alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s):

.. math::

    q(x_t | x_{t-1}) = \mathcal{N}(\sqrt{\alpha_t}\, x_{t-1}, \beta_t I), \qquad
    q(x_t | x_0) = \mathcal{N}(\sqrt{\bar\alpha_t}\, x_0, (1 - \bar\alpha_t) I),

and its posterior, given x_0, is Gaussian too:

.. math::

    q(x_{t-1} | x_t, x_0) = \mathcal{N}(\tilde\mu_t, \tilde\beta_t I), \quad
    \tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t} \beta_t, \quad
    \tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\, \beta_t}{1 - \bar\alpha_t} x_0
      + \frac{\sqrt{\alpha_t} (1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t} x_t
      = \frac{1}{\sqrt{\alpha_t}} \Big(x_t - \frac{\beta_t}{\sqrt{1 - \bar\alpha_t}} \epsilon\Big).

The network's output is read as eps, x_0 or v (:func:`x0_and_eps`), and :func:`p_mean_variance` turns it into the
reverse model's Gaussian p(x_{t-1} | x_t). The losses live in :mod:`jaxdiff.losses`, the variational bound in
:mod:`jaxdiff.bound`.

Every function here is pure: arrays in, arrays out, no randomness hidden inside (noise and keys are arguments), no
Flax. Images have any shape ``[B, ...]`` with channels last; ``t`` is an int array of shape ``[B]`` of 0-indexed
timesteps of ``schedule`` (index ``i`` is the paper's ``t = i + 1``). A network enters either as its output array or as
a callable ``model_fn(x_t, timesteps) -> output`` that is called with ``schedule.timestep_map[t]``.

All functions work under ``jax.jit``, ``jax.vmap`` and ``jax.grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.errors import ConfigError
from jaxdiff.schedules import Schedule

#: A JAX array.
Array = jax.Array
#: A network as the math sees it: ``model_fn(x_t [B, ...], timesteps [B]) -> output``.
ModelFn = Callable[[Array, Array], Array]

#: What the network predicts: the noise eps, the data x_0, or v = sqrt(abar) eps - sqrt(1 - abar) x_0.
PREDICTIONS = ("eps", "x0", "v")
#: The reverse process's variance: beta~_t (fixed_small), beta_t (fixed_large), or learned (log or interpolated).
VARIANCES = ("fixed_small", "fixed_large", "learned", "learned_range")
#: The variances the network outputs (a second half of its channels).
LEARNED_VARIANCES = ("learned", "learned_range")

__all__ = [
    "LEARNED_VARIANCES",
    "PREDICTIONS",
    "VARIANCES",
    "Array",
    "ModelFn",
    "PMeanVariance",
    "check_choice",
    "extract",
    "fold_keys",
    "key_per_example",
    "mean_flat",
    "normal_noise",
    "offset_noise",
    "p_mean_variance",
    "posterior_mean_from_eps",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "prediction_target",
    "predictions_from_output",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "q_step_mean_variance",
    "split_model_output",
    "v_from_x0_eps",
    "x0_and_eps",
    "x0_and_eps_at",
]


def __getattr__(name: str):
    # The losses and the bound moved to jaxdiff.losses and jaxdiff.bound (0.2); their old paths keep working.
    from jaxdiff._moved import moved

    return moved(__name__, name)


# --------------------------------------------------------------------------------------------------------------------
# Argument checks (shapes are static, so these run once at trace time)


def check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming ``what`` and the allowed values unless ``value`` is one of them."""
    if value not in allowed:
        raise ConfigError(f"Unknown {what} {value!r}; choose one of {', '.join(allowed)}.")


def key_per_example(key: Array) -> bool:
    """Whether ``key`` is ``[B]`` typed keys (``jax.random.key``), one per example, rather than one key for a batch."""
    return jnp.ndim(key) == 1 and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def fold_keys(key: Array, data) -> Array:
    """``fold_in(key, data)``: of the one key, or of each example's key."""
    if key_per_example(key):
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, data)
    return jax.random.fold_in(key, data)


def normal_noise(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """Standard normal noise of ``shape`` ``[B, ...]``: from one key for the whole batch, or example b's ``[...]``
    from ``key[b]`` alone (then it does not depend on the batch the example is in).

    Raises:
      ValueError: per-example keys that are not one per example.
    """
    if not key_per_example(key):
        return jax.random.normal(key, shape, dtype)
    if key.shape[0] != shape[0]:
        raise ConfigError(
            f"Got {key.shape[0]} keys for a batch of {shape[0]} examples; pass one key, or one per example."
        )
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(key)


def offset_noise(noise: Array, key: Array, strength: float) -> Array:
    """Offset noise: ``noise`` ``[B, ..., C]`` plus ``strength`` times one N(0, 1) draw per image and channel
    (shape ``[B, 1, ..., 1, C]``), so that the noise also moves each channel's mean (by strength^2 in variance, on top
    of 1 / (number of pixels)) and a network trained on it learns to change an image's overall brightness
    (Guttenberg 2023, "Diffusion with Offset Noise"; 0.1 is the usual strength)."""
    shape = (noise.shape[0],) + (1,) * (noise.ndim - 2) + (noise.shape[-1],)
    return noise + strength * jax.random.normal(key, shape, noise.dtype)


def _check_t(t: Array, x: Array) -> None:
    t_shape, t_dtype = jnp.shape(t), jnp.result_type(t)
    if x.ndim < 1 or t_shape != (x.shape[0],):
        raise ConfigError(
            f"t must have shape [B] = ({x.shape[0] if x.ndim else '?'},) to match x of shape {x.shape}, got {t_shape}."
        )
    if not jnp.issubdtype(t_dtype, jnp.integer):
        raise ConfigError(f"t must hold integer timesteps, got dtype {t_dtype}.")


def _check_same_shape(**arrays: Array) -> None:
    shapes = {name: jnp.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ConfigError("Shapes must match: " + ", ".join(f"{n} {s}" for n, s in shapes.items()) + ".")


def extract(coeff: Array, t: Array, x: Array) -> Array:
    """``coeff[t]`` reshaped to ``[B, 1, ..., 1]`` so that it broadcasts against ``x`` of shape ``[B, ...]``.

    An out-of-range ``t`` gives NaN (``jnp.take``'s fill mode) rather than a silently clamped coefficient.
    """
    _check_t(t, x)
    return jnp.take(coeff, t).reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def _per_example(a: Array, x: Array) -> Array:
    """A ``[B]`` array (or a scalar) broadcast to ``[B]`` and shaped ``[B, 1, ..., 1]`` against ``x`` of ``[B, ...]``:
    a per-example level (EDM's sigma, flow matching's t) as :func:`extract` gives a per-step coefficient."""
    a = jnp.broadcast_to(jnp.asarray(a, x.dtype), (x.shape[0],))
    return a.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def mean_flat(x: Array) -> Array:
    """The mean over every axis but the first: ``[B, ...] -> [B]``."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# --------------------------------------------------------------------------------------------------------------------
# Forward process


def q_step_mean_variance(schedule: Schedule, x_prev: Array, t: Array) -> tuple[Array, Array]:
    """One forward step q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I).

    Returns:
      (mean ``[B, ...]``, variance ``[B, 1, ..., 1]``).
    """
    mean = jnp.sqrt(extract(schedule.alphas, t, x_prev)) * x_prev
    return mean, extract(schedule.betas, t, x_prev)


def q_mean_variance(schedule: Schedule, x0: Array, t: Array) -> tuple[Array, Array, Array]:
    """The closed form q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

    Returns:
      (mean ``[B, ...]``, variance and log-variance ``[B, 1, ..., 1]``).
    """
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
    # Not 1 - abar_t in float32: that cancels catastrophically near t = 0, where abar_t is close to 1.
    variance = jnp.square(extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0))
    return mean, variance, extract(schedule.log_one_minus_alphas_cumprod, t, x0)


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """Draw x_t ~ q(x_t | x_0) by reparametrisation: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

    Args:
      x0: clean data ``[B, ...]``.
      t: ``[B]`` int timesteps.
      noise: eps ~ N(0, I), same shape as x0.
    """
    _check_same_shape(x0=x0, noise=noise)
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )


def q_posterior_mean_variance(schedule: Schedule, x0: Array, x_t: Array, t: Array) -> tuple[Array, Array, Array]:
    r"""The forward posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I).

    .. math::
      \tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\beta_t}{1-\bar\alpha_t} x_0
                    + \frac{\sqrt{\alpha_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t} x_t, \qquad
      \tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t

    Returns:
      (mean ``[B, ...]``, variance ``[B, 1, ..., 1]``, log-variance clipped at the first step as in DDPM).
    """
    _check_same_shape(x0=x0, x_t=x_t)
    mean = extract(schedule.posterior_mean_coef1, t, x_t) * x0 + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    variance = extract(schedule.posterior_variance, t, x_t)
    return mean, variance, extract(schedule.posterior_log_variance_clipped, t, x_t)


# --------------------------------------------------------------------------------------------------------------------
# Parametrisations: eps, x0 and v (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022)


def predict_x0_from_eps(schedule: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def predict_eps_from_x0(schedule: Schedule, x_t: Array, t: Array, x0: Array) -> Array:
    """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    return (x_t - extract(schedule.sqrt_alphas_cumprod, t, x_t) * x0) / extract(
        schedule.sqrt_one_minus_alphas_cumprod, t, x_t
    )


def v_from_x0_eps(schedule: Schedule, x0: Array, eps: Array, t: Array) -> Array:
    """The v target: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0) * eps - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    )


def predict_x0_from_v(schedule: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v
    )


def predict_eps_from_v(schedule: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    return (
        extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        + extract(schedule.sqrt_alphas_cumprod, t, x_t) * v
    )


def posterior_mean_from_eps(schedule: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
    """The eps-parametrised mean: mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) (DDPM eq. 11)."""
    coef = extract(schedule.betas, t, x_t) / extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    return (x_t - coef * eps) / jnp.sqrt(extract(schedule.alphas, t, x_t))


def prediction_target(schedule: Schedule, x0: Array, noise: Array, t: Array, prediction: str) -> Array:
    """What a network trained with ``prediction`` (``eps``, ``x0`` or ``v``) should output for this (x0, noise, t)."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return v_from_x0_eps(schedule, x0, noise, t)


def x0_and_eps(schedule: Schedule, x_t: Array, t: Array, pred: Array, prediction: str) -> tuple[Array, Array]:
    """Both (x_0, eps) implied by a network's prediction of kind ``prediction`` at (x_t, t)."""
    check_choice("prediction", prediction, PREDICTIONS)
    _check_same_shape(x_t=x_t, prediction=pred)
    if prediction == "eps":
        return predict_x0_from_eps(schedule, x_t, t, pred), pred
    if prediction == "x0":
        return pred, predict_eps_from_x0(schedule, x_t, t, pred)
    return predict_x0_from_v(schedule, x_t, t, pred), predict_eps_from_v(schedule, x_t, t, pred)


def x0_and_eps_at(alpha_bar: Array, x_t: Array, pred: Array, prediction: str) -> tuple[Array, Array]:
    """(x_0, eps) implied by a prediction at noise level ``alpha_bar`` (``[B]``, or a scalar) rather than at a step of a
    schedule: for solvers that call the network between steps. Same formulas as :func:`x0_and_eps`."""
    check_choice("prediction", prediction, PREDICTIONS)
    _check_same_shape(x_t=x_t, prediction=pred)
    a = jnp.reshape(alpha_bar, jnp.shape(alpha_bar) + (1,) * (x_t.ndim - jnp.ndim(alpha_bar)))
    root_a, root_1ma = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    if prediction == "eps":
        return (x_t - root_1ma * pred) / root_a, pred
    if prediction == "x0":
        return pred, (x_t - root_a * pred) / root_1ma
    return root_a * x_t - root_1ma * pred, root_1ma * x_t + root_a * pred


# --------------------------------------------------------------------------------------------------------------------
# The reverse model p_theta(x_{t-1} | x_t)


class PMeanVariance(NamedTuple):
    """The reverse step's Gaussian and the predictions behind it (all ``[B, ...]`` but variances may broadcast)."""

    mean: Array
    variance: Array
    log_variance: Array
    pred_x0: Array
    pred_eps: Array


def split_model_output(model_output: Array, x_t: Array, variance: str) -> tuple[Array, Array | None]:
    """Split a network output into (prediction, variance output or None).

    A learned variance doubles the channel (last) axis: the first half is the prediction, the second the variance.
    """
    check_choice("variance", variance, VARIANCES)
    if variance not in LEARNED_VARIANCES:
        _check_same_shape(model_output=model_output, x_t=x_t)
        return model_output, None
    expected = (*x_t.shape[:-1], 2 * x_t.shape[-1])
    if model_output.shape != expected:
        raise ConfigError(
            f"With variance {variance!r} the model output must have twice the channels of x_t: "
            f"expected {expected}, got {model_output.shape}."
        )
    return jnp.split(model_output, 2, axis=-1)


def predictions_from_output(
    schedule: Schedule,
    model_output: Array,
    x_t: Array,
    t: Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
) -> tuple[Array, Array, Array | None]:
    """(predicted x_0, predicted eps, variance output or None) from a network output at (x_t, t).

    With ``clip_x0`` the x_0 prediction is clipped to [-1, 1] and eps is derived again from the clipped x_0.
    """
    pred, var_out = split_model_output(model_output, x_t, variance)
    pred_x0, pred_eps = x0_and_eps(schedule, x_t, t, pred, prediction)
    if clip_x0:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        pred_eps = predict_eps_from_x0(schedule, x_t, t, pred_x0)
    return pred_x0, pred_eps, var_out


def p_mean_variance(
    schedule: Schedule,
    model_output: Array,
    x_t: Array,
    t: Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = False,
) -> PMeanVariance:
    """p_theta(x_{t-1} | x_t) = N(mu~_t(x_t, x0_theta), sigma_t^2 I) from a network output.

    Args:
      model_output: the network output at (x_t, t); ``[B, ..., C]``, or ``[B, ..., 2C]`` with a learned variance.
      prediction: what the network predicts: ``eps``, ``x0`` or ``v``.
      variance: ``fixed_small`` (sigma^2 = beta~_t), ``fixed_large`` (sigma^2 = beta_t, with beta~_2 at the first
        step as in DDPM), ``learned`` (the output is log sigma^2), ``learned_range`` (the output v in [-1, 1]
        interpolates log sigma^2 = (v+1)/2 log beta_t + (1-v)/2 log beta~_t, improved DDPM eq. 15).
      clip_x0: clip the predicted x_0 to [-1, 1] before forming the mean (and derive eps from the clipped x_0).

    Returns:
      PMeanVariance; ``mean`` is the posterior mean at the predicted x_0, which equals the eps form of DDPM eq. 11.
    """
    pred_x0, pred_eps, var_out = predictions_from_output(
        schedule, model_output, x_t, t, prediction=prediction, variance=variance, clip_x0=clip_x0
    )
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)

    if variance == "fixed_small":
        var = extract(schedule.posterior_variance, t, x_t)
        log_var = extract(schedule.posterior_log_variance_clipped, t, x_t)
    elif variance == "fixed_large":
        # DDPM's "fixedlarge": beta_t, except beta~_2 at the first step (the DDPM code does so for a better decoder).
        is_first = (t == 0).reshape((-1,) + (1,) * (x_t.ndim - 1))
        log_var = jnp.where(
            is_first, extract(schedule.posterior_log_variance_clipped, t, x_t), extract(schedule.log_betas, t, x_t)
        )
        var = jnp.exp(log_var)
    elif variance == "learned":
        log_var = var_out
        var = jnp.exp(log_var)
    else:  # learned_range
        frac = (var_out + 1.0) / 2.0
        log_var = frac * extract(schedule.log_betas, t, x_t) + (1.0 - frac) * extract(
            schedule.posterior_log_variance_clipped, t, x_t
        )
        var = jnp.exp(log_var)
    return PMeanVariance(mean, var, log_var, pred_x0, pred_eps)
