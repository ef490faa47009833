"""The DDPM forward process, its posterior, the reverse model's Gaussians, the losses and the variational bound.

Every function here is pure: arrays in, arrays out, no randomness hidden inside (noise and keys are arguments), no
Flax. Images have any shape ``[B, ...]`` with channels last; ``t`` is an int array of shape ``[B]`` of 0-indexed
timesteps of ``schedule`` (index ``i`` is the paper's ``t = i + 1``). A network enters either as its output array or as
a callable ``model_fn(x_t, timesteps) -> output`` that is called with ``schedule.timestep_map[t]``.

All functions work under ``jax.jit``, ``jax.vmap`` and ``jax.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from jaxdiff.schedules import Schedule

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned", "learned_range")
LEARNED_VARIANCES = ("learned", "learned_range")
LOSS_TYPES = ("simple", "bound", "hybrid")
WEIGHTINGS = ("none", "min_snr")
DECODERS = ("discretized", "gaussian")


# --------------------------------------------------------------------------------------------------------------------
# Argument checks (shapes are static, so these run once at trace time)


def check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming ``what`` and the allowed values unless ``value`` is one of them."""
    if value not in allowed:
        raise ValueError(f"Unknown {what} {value!r}; choose one of {', '.join(allowed)}.")


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
        raise ValueError(
            f"Got {key.shape[0]} keys for a batch of {shape[0]} examples; pass one key, or one per example."
        )
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(key)


def _check_t(t: Array, x: Array) -> None:
    t_shape, t_dtype = jnp.shape(t), jnp.result_type(t)
    if x.ndim < 1 or t_shape != (x.shape[0],):
        raise ValueError(
            f"t must have shape [B] = ({x.shape[0] if x.ndim else '?'},) to match x of shape {x.shape}, got {t_shape}."
        )
    if not jnp.issubdtype(t_dtype, jnp.integer):
        raise ValueError(f"t must hold integer timesteps, got dtype {t_dtype}.")


def _check_same_shape(**arrays: Array) -> None:
    shapes = {name: jnp.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("Shapes must match: " + ", ".join(f"{n} {s}" for n, s in shapes.items()) + ".")


def extract(coeff: Array, t: Array, x: Array) -> Array:
    """``coeff[t]`` reshaped to ``[B, 1, ..., 1]`` so that it broadcasts against ``x`` of shape ``[B, ...]``.

    An out-of-range ``t`` gives NaN (``jnp.take``'s fill mode) rather than a silently clamped coefficient.
    """
    _check_t(t, x)
    return jnp.take(coeff, t).reshape((x.shape[0],) + (1,) * (x.ndim - 1))


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
        raise ValueError(
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


# --------------------------------------------------------------------------------------------------------------------
# Log-likelihood pieces


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


# --------------------------------------------------------------------------------------------------------------------
# Training losses


def snr_weight(schedule: Schedule, t: Array, prediction: str, gamma: float) -> Array:
    """Min-SNR-gamma weights (Hang et al. 2023) of the simple loss, ``[B]``.

    The weight makes each prediction's loss equal min(SNR_t, gamma) times the x0 error:
    eps: min(SNR, gamma) / SNR; x0: min(SNR, gamma); v: min(SNR, gamma) / (SNR + 1).
    """
    check_choice("prediction", prediction, PREDICTIONS)
    snr = jnp.take(schedule.snr, t)
    clipped = jnp.minimum(snr, gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    return clipped / (snr + 1.0)


def check_objective(loss_type: str, prediction: str, variance: str, weighting: str = "none") -> None:
    """Raise a ValueError for an unknown or meaningless combination of training objective settings."""
    check_choice("loss type", loss_type, LOSS_TYPES)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("variance", variance, VARIANCES)
    check_choice("weighting", weighting, WEIGHTINGS)
    if loss_type == "simple" and variance in LEARNED_VARIANCES:
        raise ValueError(
            f"variance {variance!r} is learned only through the bound: use loss_type 'hybrid' or "
            "'bound', or a fixed variance ('fixed_small', 'fixed_large')."
        )
    if loss_type == "hybrid" and variance not in LEARNED_VARIANCES:
        raise ValueError(
            "loss_type 'hybrid' trains the variance through the bound, so it needs variance 'learned' "
            f"or 'learned_range' (got {variance!r}); with a fixed variance use 'simple' or 'bound'."
        )


def training_losses(
    schedule: Schedule,
    model_output: Array,
    x0: Array,
    x_t: Array,
    t: Array,
    noise: Array,
    *,
    loss_type: str = "simple",
    prediction: str = "eps",
    variance: str = "fixed_small",
    weighting: str = "none",
    snr_gamma: float = 5.0,
    vb_weight: float = 0.001,
) -> Array:
    """The per-example training loss ``[B]`` for a network output at (x_t, t), where x_t = q_sample(x0, t, noise).

    Loss types:
      ``simple``: L_simple = mean over dims of ||target - prediction||^2 (DDPM eq. 14), target by ``prediction``,
        optionally min-SNR weighted (``weighting='min_snr'``, gamma ``snr_gamma``).
      ``bound``: T * L_{t-1} in bits/dim: with t uniform, its mean is the bound without the prior term.
      ``hybrid``: simple + vb_weight * T * L_{t-1}, the bound's mean under stop-gradient so that it trains only the
        variance (improved DDPM; vb_weight = lambda = 0.001).
    """
    check_objective(loss_type, prediction, variance, weighting)
    pred, var_out = split_model_output(model_output, x0, variance)
    loss = jnp.zeros((x0.shape[0],), jnp.float32)
    if loss_type in ("simple", "hybrid"):
        target = prediction_target(schedule, x0, noise, t, prediction)
        mse = mean_flat(jnp.square(target - pred))
        if weighting == "min_snr":
            mse = mse * snr_weight(schedule, t, prediction, snr_gamma)
        loss = loss + mse
    if loss_type in ("bound", "hybrid"):
        if loss_type == "hybrid":
            model_output = jnp.concatenate([jax.lax.stop_gradient(pred), var_out], axis=-1)
        vb = vb_term_bpd(schedule, model_output, x0, x_t, t, prediction=prediction, variance=variance)
        loss = loss + (vb_weight if loss_type == "hybrid" else 1.0) * schedule.num_timesteps * vb
    return loss


def diffusion_loss(schedule: Schedule, model_fn: ModelFn, x0: Array, t: Array, noise: Array, **loss_kwargs) -> Array:
    """Noise x0 to x_t, run ``model_fn(x_t, timestep_map[t])``, and return :func:`training_losses` ``[B]``."""
    x_t = q_sample(schedule, x0, t, noise)
    model_output = model_fn(x_t, jnp.take(schedule.timestep_map, t))
    return training_losses(schedule, model_output, x0, x_t, t, noise, **loss_kwargs)


# --------------------------------------------------------------------------------------------------------------------
# The whole variational bound


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
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    check_choice("decoder", decoder, DECODERS)
    T, B = schedule.num_timesteps, x0.shape[0]
    if key_per_example(key) and key.shape[0] != B:
        raise ValueError(f"Got {key.shape[0]} keys for a batch of {B} examples; pass one key, or one per example.")
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
