"""jaxdiff: denoising diffusion probabilistic models in JAX, as pure functions and a Flax UNet.

``import jaxdiff`` loads the pure math only (:mod:`~jaxdiff.schedules`, :mod:`~jaxdiff.diffusion`,
:mod:`~jaxdiff.losses`, :mod:`~jaxdiff.bound`; :mod:`jaxdiff.samplers` on import): no Flax, no TensorFlow. The
network and the Pipeline are re-exported lazily: ``jaxdiff.UNet`` or ``jaxdiff.Pipeline`` imports them on first use.
"""

import importlib

from jaxdiff import _extras
from jaxdiff.bound import (
    DECODERS,
    VariationalBound,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    variational_bound,
    vb_term_bpd,
)
from jaxdiff.diffusion import (
    PREDICTIONS,
    VARIANCES,
    PMeanVariance,
    p_mean_variance,
    posterior_mean_from_eps,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    prediction_target,
    predictions_from_output,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    q_step_mean_variance,
    v_from_x0_eps,
    x0_and_eps,
)
from jaxdiff.losses import LOSS_TYPES, WEIGHTINGS, diffusion_loss, snr_weight, training_losses
from jaxdiff.schedules import (
    BETA_SCHEDULES,
    Schedule,
    beta_schedule,
    make_schedule,
    rescale_zero_terminal_snr,
    respace,
    space_timesteps,
)

__version__ = "0.2.0.dev0"

_extras.install_if_needed()  # on a core install (no `train` extra), a module that needs the extra names it

# Names that need Flax (the network) or the layers above the math (the Pipeline), imported on first use.
_LAZY = {
    "UNet": "jaxdiff.models",
    "UNetConfig": "jaxdiff.models",
    "init_params": "jaxdiff.models",
    "load_diffusers_unet": "jaxdiff.models",
    "DiffusionConfig": "jaxdiff.spec",
    "ModelSpec": "jaxdiff.spec",
    "Pipeline": "jaxdiff.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")


__all__ = [
    "BETA_SCHEDULES",
    "DECODERS",
    "LOSS_TYPES",
    "PREDICTIONS",
    "VARIANCES",
    "WEIGHTINGS",
    "DiffusionConfig",
    "ModelSpec",
    "PMeanVariance",
    "Pipeline",
    "Schedule",
    "UNet",
    "UNetConfig",
    "VariationalBound",
    "beta_schedule",
    "diffusion_loss",
    "discretized_gaussian_log_likelihood",
    "gaussian_log_likelihood",
    "init_params",
    "load_diffusers_unet",
    "make_schedule",
    "normal_kl",
    "p_mean_variance",
    "posterior_mean_from_eps",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "prediction_target",
    "predictions_from_output",
    "prior_bpd",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "q_step_mean_variance",
    "rescale_zero_terminal_snr",
    "respace",
    "snr_weight",
    "space_timesteps",
    "training_losses",
    "v_from_x0_eps",
    "variational_bound",
    "vb_term_bpd",
    "x0_and_eps",
]
