"""The exact likelihood of a trained model through the probability-flow ODE (Song et al. 2021, section 4.3).

The variational bound (:func:`jaxdiff.bound.variational_bound`) is an upper bound on -log p; the ODE gives the
log-density of the continuous-time flow itself. Pure functions of any ``model_fn(x_t, timesteps)``; the adaptive solver
is diffrax's (Dormand-Prince 5(4) with a PID step controller, as score_sde's RK45).

The flow, in Karras et al.'s variables x~ = x / sqrt(abar) and sigma = sqrt((1 - abar) / abar), integrated in
u = log sigma from the schedule's first step (sigma_1 = sqrt(beta_1 / (1 - beta_1))) to its last:

    dx~/du = sigma eps(sqrt(abar) x~, t(u)),   d(delta)/du = div_x~ of that = sigma sqrt(abar) div_x eps

with t(u) the fractional timestep of the level (:func:`jaxdiff.schedules.timestep_at`). Then
log p_0(x) = log N(x_T; 0, I) + D log sqrt(abar_T) + delta - D log sqrt(abar_1): the prior of the last step, the
change of density along the flow, and the two changes of variable x <-> x~. As in score_sde, the point at the first
step's level is the data: p_0 is the data smoothed by that step's noise (sigma_1 = 0.01 for DDPM's schedule, about a
pixel's width of 2/255).

The divergence is exact (one JVP per dimension) for small images, or Hutchinson's estimate e^T J e with one
Rademacher probe per image, fixed for the whole solve.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp

from jaxdiff import diffusion
from jaxdiff.diffusion import ModelFn
from jaxdiff.errors import ConfigError
from jaxdiff.samplers import predictions_between_steps
from jaxdiff.schedules import Schedule, log_sigmas

__all__ = [
    "DIVERGENCES",
    "EXACT_UP_TO",
    "ODELikelihood",
    "dequantize",
    "ode_bits_per_dim",
    "ode_log_likelihood",
]

#: How the ODE's divergence is computed: exactly (D JVPs), by Hutchinson's estimator, or chosen by size.
DIVERGENCES = ("exact", "hutchinson", "auto")
EXACT_UP_TO = 16  #: "auto": exact up to this many dimensions. It costs D JVPs per evaluation: 64x for 8x8 digits


class ODELikelihood(NamedTuple):
    """The ODE's answer for a batch; every field ``[B]`` except ``num_steps``.

    Attributes:
      log_prob: log p_0(x) in nats (of the continuous point given).
      prior: log N(x_T; 0, I) + the change of variable at the top level.
      delta: the integral of the divergence along the flow.
      num_steps: the solver's accepted steps (each costs 6 network evaluations for Dormand-Prince, times D for the
        exact divergence).
    """

    log_prob: jax.Array
    prior: jax.Array
    delta: jax.Array
    num_steps: jax.Array


def ode_log_likelihood(
    schedule: Schedule,
    model_fn: ModelFn,
    x: jax.Array,
    key: jax.Array | None = None,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    divergence: str = "auto",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
) -> ODELikelihood:
    """log p_0(x) of the probability-flow ODE of ``model_fn`` on ``schedule``, for a batch of continuous points.

    Args:
      schedule: the model's full schedule (the flow interpolates between its steps).
      x: ``[B, ...]`` points at the first step's level (images in [-1, 1]; dequantise them first, see
        :func:`ode_bits_per_dim`).
      key: the Hutchinson probes (needed only for that divergence): one key, or ``[B]`` keys, one per image (then each
        image's probe depends on its key alone).
      divergence: ``exact`` (D JVPs per evaluation), ``hutchinson``, or ``auto`` (exact up to 16 dimensions).
      rtol, atol: the step controller's tolerances (score_sde's 1e-5).
      max_steps: the solver's step limit; more raises an error (make the tolerances looser).

    Raises:
      ValueError: an unknown divergence, or ``hutchinson`` without a key.
    """
    diffusion.check_choice("divergence", divergence, DIVERGENCES)
    dims = math.prod(x.shape[1:])
    exact = divergence == "exact" or (divergence == "auto" and dims <= EXACT_UP_TO)
    if not exact and key is None:
        raise ConfigError("The Hutchinson divergence needs a key for its probes: pass key=jax.random.key(seed).")
    eps = lambda x, u: predictions_between_steps(schedule, model_fn, x, u, prediction=prediction, variance=variance)[1]
    levels = log_sigmas(schedule)
    # To the chain's top level; on a zero-terminal-SNR chain (an infinite top) to its highest finite one, where the
    # prior N(0, I) is taken to hold as it is at any chain's top (abar there is 1 / (1 + sigma^2)).
    u0, u1 = levels[0], jnp.max(jnp.where(jnp.isfinite(levels), levels, -jnp.inf))
    batch = x.shape[0]
    flat = lambda a: a.reshape(batch, -1)

    if exact:
        basis = jnp.eye(dims, dtype=x.dtype).reshape((dims, 1, *x.shape[1:]))

        def divergence_of(fn, y):
            column = lambda e: flat(jax.jvp(fn, (y,), (jnp.broadcast_to(e, y.shape),))[1])
            columns = jax.lax.map(column, basis)  # [D, B, D]: column d of each image's Jacobian
            return jnp.einsum("dbd->b", columns)

    else:
        if jnp.ndim(key) == 1:
            probes = jax.vmap(lambda k: jax.random.rademacher(k, x.shape[1:], x.dtype))(key)
        else:
            probes = jax.random.rademacher(key, x.shape, x.dtype)

        def divergence_of(fn, y):
            return jnp.sum(flat(jax.jvp(fn, (y,), (probes,))[1] * probes), axis=1)

    def flow(u, state, args):
        x_tilde, _ = state
        sigma = jnp.exp(u)
        root_abar = jax.lax.rsqrt(1.0 + sigma**2)
        eps_of = lambda y: eps(root_abar * y, u)
        velocity = sigma * eps_of(x_tilde)
        return velocity, sigma * divergence_of(eps_of, x_tilde)  # d/dx~ of eps(sqrt(abar) x~) holds sqrt(abar)

    root_abar0, root_abar1 = jax.lax.rsqrt(1.0 + jnp.exp(2 * u0)), jax.lax.rsqrt(1.0 + jnp.exp(2 * u1))
    state0 = (x / root_abar0, jnp.zeros((batch,), x.dtype))
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(flow),
        diffrax.Dopri5(),
        u0,
        u1,
        None,
        state0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
    )
    x_tilde_T, delta = jax.tree_util.tree_map(lambda a: a[-1], solution.ys)
    x_T = flat(root_abar1 * x_tilde_T)
    prior = -0.5 * jnp.sum(x_T**2, axis=1) - 0.5 * dims * math.log(2 * math.pi) + dims * jnp.log(root_abar1)
    log_prob = prior + delta - dims * jnp.log(root_abar0)
    return ODELikelihood(log_prob, prior, delta, solution.stats["num_accepted_steps"])


def dequantize(x0: jax.Array, keys: jax.Array) -> jax.Array:
    """Uniform dequantisation on the grid the model was trained on: x0 = k / 127.5 - 1 plus U(-1/255, 1/255), a bin
    of width 2/255 around each 8-bit value; image b's noise from ``keys[b]``."""
    noise = jax.vmap(lambda k: jax.random.uniform(k, x0.shape[1:], x0.dtype, -1.0 / 255.0, 1.0 / 255.0))(keys)
    return x0 + noise


def ode_bits_per_dim(
    schedule: Schedule, model_fn: ModelFn, x0: jax.Array, keys: jax.Array, **kwargs
) -> tuple[jax.Array, ODELikelihood]:
    """Bits/dim of 8-bit images under the ODE model, with uniform dequantisation (as score_sde and VDM report it).

    -log2 P(k) <= -E_u[log p_0(x0 + u)] / ln 2 - D log2(2/255) per image (the bin's volume is (2/255)^D); one
    dequantisation draw per image. The solver's steps are shared by the batch, so an image's figure moves with its
    batch within the tolerances. ``kwargs`` as :func:`ode_log_likelihood`.

    Args:
      x0: ``[B, ...]`` images k / 127.5 - 1 (:func:`jaxdiff.images.from_uint8`).
      keys: ``[B]`` keys: image b's dequantisation and Hutchinson probe come from ``keys[b]`` alone.

    Returns:
      (bits/dim ``[B]``, the :class:`ODELikelihood` of the dequantised points).
    """
    noise_keys, probe_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    dims = math.prod(x0.shape[1:])
    result = ode_log_likelihood(schedule, model_fn, dequantize(x0, noise_keys), probe_keys, **kwargs)
    bpd = -(result.log_prob + dims * math.log(2.0 / 255.0)) / (dims * math.log(2.0))
    return bpd, result
