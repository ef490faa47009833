r"""Training losses: what the network minimises at a random timestep.

``simple`` is DDPM's L_simple (eq. 14) for any prediction target,

.. math::

    L_\text{simple} = \mathbb{E}_{t, x_0, \epsilon} \big\| \epsilon - \epsilon_\theta(\sqrt{\bar\alpha_t} x_0
      + \sqrt{1 - \bar\alpha_t}\, \epsilon, t) \big\|^2,

optionally min-SNR weighted; ``bound`` is T times one term of the variational bound (:mod:`jaxdiff.bound`), and
``hybrid`` improved DDPM's sum of the two (the bound training only the learned variance). Pure functions of arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.bound import vb_term_bpd
from jaxdiff.diffusion import (
    LEARNED_VARIANCES,
    PREDICTIONS,
    VARIANCES,
    Array,
    ModelFn,
    check_choice,
    mean_flat,
    prediction_target,
    q_sample,
    split_model_output,
)
from jaxdiff.errors import ConfigError
from jaxdiff.schedules import Schedule

#: The training objectives of :func:`training_losses`.
LOSS_TYPES = ("simple", "bound", "hybrid")
#: The weightings of the simple loss over timesteps (none, or min-SNR-gamma).
WEIGHTINGS = ("none", "min_snr")

__all__ = ["LOSS_TYPES", "WEIGHTINGS", "check_objective", "diffusion_loss", "snr_weight", "training_losses"]


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
        raise ConfigError(
            f"variance {variance!r} is learned only through the bound: use loss_type 'hybrid' or "
            "'bound', or a fixed variance ('fixed_small', 'fixed_large')."
        )
    if loss_type == "hybrid" and variance not in LEARNED_VARIANCES:
        raise ConfigError(
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

    The loss types:

    * ``simple``: L_simple = mean over dims of ``||target - prediction||^2`` (DDPM eq. 14), the target by
      ``prediction``, optionally min-SNR weighted (``weighting='min_snr'``, gamma ``snr_gamma``).
    * ``bound``: T * L_{t-1} in bits/dim: with t uniform, its mean is the bound without the prior term.
    * ``hybrid``: simple + vb_weight * T * L_{t-1}, the bound's mean under stop-gradient so that it trains only the
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
