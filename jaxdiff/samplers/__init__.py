"""Sampling: start from noise, remove the learned noise step by step; each sampler is one ``lax.scan`` over timesteps.

Pure: the network enters as ``model_fn(x_t, timesteps) -> output`` (called with ``schedule.timestep_map[t]``, so a
respaced schedule calls the network with the original timesteps). All randomness comes from ``key``: x_T is
``normal(fold_in(key, T))`` and step t's noise ``normal(fold_in(key, t))``. ``key`` is one key (the noise drawn for
the whole batch at once) or ``[B]`` keys, one per image (typed keys, ``jax.random.key``): then image b's noise comes
from ``key[b]`` alone, so an image does not depend on the batch it is drawn in, nor on the devices or processes the
batch is split over. :func:`jaxdiff.pipeline.make_sampler` compiles them that way, image i's key ``fold_in(key, i)``.

This package's face re-exports its modules' names, one concept each:

* :mod:`~jaxdiff.samplers.ancestral`: :func:`ddpm_sample` (DDPM Algorithm 2), :func:`ddim_sample` (with ``eta``),
  :func:`ddim_invert`, and their single steps;
* :mod:`~jaxdiff.samplers.ode`: the probability-flow ODE's solvers, :func:`dpm_solver_sample` (DPM-Solver++ 2M/3M)
  and :func:`heun_sample` (Karras et al., with churn);
* :mod:`~jaxdiff.samplers.editing`: :func:`sdedit` and :func:`repaint_sample` (inpainting);
* :mod:`~jaxdiff.samplers.guidance`: :func:`guided` (classifier-free) and :func:`autoguided`;
* :mod:`~jaxdiff.samplers.common`: the :class:`Trajectory` snapshots, dynamic thresholding, predictions between
  steps.

The step grids they run on are the schedule's (:func:`jaxdiff.schedules.respaced`, re-exported here with
:func:`jaxdiff.schedules.sampling_schedule`). The names below are the registry that ``sample.py``, the config and
:func:`jaxdiff.pipeline.make_sampler` read.
"""

from jaxdiff.samplers.ancestral import check_eta, ddim_invert, ddim_sample, ddim_step, ddpm_sample, ddpm_step
from jaxdiff.samplers.common import Trajectory, dynamic_threshold, predictions_between_steps
from jaxdiff.samplers.editing import check_mask, check_strength, repaint_path, repaint_sample, sdedit
from jaxdiff.samplers.guidance import autoguided, guided
from jaxdiff.samplers.ode import THIRD_ORDER_FORMS, dpm_solver_sample, heun_sample
from jaxdiff.schedules import respaced, sampling_schedule

#: The deterministic solvers of the probability-flow ODE. ``dpm++3m-ref`` is 3M with the reference codes' third-order
#: term (half of the exact one: see docs/conventions.md).
ODE_SAMPLERS = ("dpm++2m", "dpm++3m", "dpm++3m-ref", "heun")
#: The samplers of the other paths, run on any model through its denoiser or velocity: ``edm`` is Karras et al.'s
#: sampler on the rho grid (:func:`jaxdiff.edm.edm_sample`, with churn), ``flow-euler`` and ``flow-heun`` integrate the
#: flow-matching ODE in t (:func:`jaxdiff.flow.flow_sample`). Their steps are their own grid's, not a respaced chain.
PATH_SAMPLERS = ("edm", "flow-euler", "flow-heun")
#: Every sampler name ``sample.py`` and :func:`jaxdiff.pipeline.make_sampler` take.
SAMPLERS = ("ddpm", "ddim", *ODE_SAMPLERS, *PATH_SAMPLERS)
#: The samplers that are deterministic with their defaults (DDIM's eta = 0, Heun's churn 0).
DETERMINISTIC_SAMPLERS = ("ddim", *ODE_SAMPLERS)
#: Each sampler's default step grid: DPM-Solver's is uniform in log-SNR, Heun's is Karras et al.'s sigma spacing.
DEFAULT_SPACINGS = {
    "ddpm": "even",
    "ddim": "even",
    "dpm++2m": "logsnr",
    "dpm++3m": "logsnr",
    "dpm++3m-ref": "logsnr",
    "heun": "karras",
    **{name: "even" for name in PATH_SAMPLERS},  # (not read: they step on their own grids)
}

__all__ = [
    "DEFAULT_SPACINGS",
    "DETERMINISTIC_SAMPLERS",
    "ODE_SAMPLERS",
    "PATH_SAMPLERS",
    "SAMPLERS",
    "THIRD_ORDER_FORMS",
    "Trajectory",
    "autoguided",
    "check_eta",
    "check_mask",
    "check_strength",
    "ddim_invert",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "dpm_solver_sample",
    "dynamic_threshold",
    "guided",
    "heun_sample",
    "predictions_between_steps",
    "repaint_path",
    "repaint_sample",
    "respaced",
    "sampling_schedule",
    "sdedit",
]
