r"""Flow matching on the linear path (Lipman et al. 2023, "Flow Matching for Generative Modeling"; Liu et al. 2023,
"Flow Straight and Fast": rectified flow; Esser et al. 2024, SD3: logit-normal t).

The path from data (t = 0) to noise (t = 1) is

.. math::

    x_t = (1 - t)\, x_0 + t\, \epsilon, \qquad u_t = \frac{dx_t}{dt} = \epsilon - x_0,

and the network learns the velocity: :math:`\mathbb{E}_{t, x_0, \epsilon} \|u_\theta(x_t, t) - (\epsilon - x_0)\|^2`,
with t uniform or logit-normal (:math:`t = \sigma(m + s n)`, n ~ N(0, 1); SD3's m = 0, s = 1). Sampling integrates
:math:`dx/dt = u_\theta(x, t)` from x_1 = eps down to t = 0 (:func:`flow_sample`: Euler or Heun).

**It is a Gaussian path like DDPM's.** With :math:`\cos\phi = (1 - t) / n`, :math:`\sin\phi = t / n` and
:math:`n = \sqrt{(1 - t)^2 + t^2}`, the VP point :math:`x^{VP} = \cos\phi\, x_0 + \sin\phi\, \epsilon` (abar =
cos^2 phi, sigma = t / (1 - t)) is :math:`x_t / n`, and the velocity is v-prediction's
:math:`v = \cos\phi\, \epsilon - \sin\phi\, x_0` moved by a fixed linear map:

.. math::

    u = (\sin\phi - \cos\phi)\, x^{VP} + (\cos\phi + \sin\phi)\, v
    \quad\Longleftrightarrow\quad
    v = \frac{u - (\sin\phi - \cos\phi)\, x^{VP}}{\cos\phi + \sin\phi}

(:func:`velocity_from_v`, :func:`v_from_velocity`; from :math:`\epsilon = \sin\phi\, x^{VP} + \cos\phi\, v` and
:math:`x_0 = \cos\phi\, x^{VP} - \sin\phi\, v`). So a flow model is a v-prediction model of the VP chain of
:func:`vp_betas`, whose last step is t = 1, abar = 0 (zero terminal SNR by construction): :func:`vp_model` presents it
so, and DDPM, DDIM, DPM-Solver++, Heun, the bound and FID run on it unchanged; :func:`velocity` gives any VP model's
velocity, so that :func:`flow_sample` runs on any model.

The network reads ``TIME_SCALE * t`` (diffusers' and SD3's timesteps, 1000 t: the range the UNet's sinusoidal
embedding was made for). Pure functions; ``x`` is ``[B, ...]``, t ``[B]`` in [0, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import Array, ModelFn, _per_example, check_choice, mean_flat
from jaxdiff.errors import ConfigError
from jaxdiff.samplers.common import _starting_noise, predictions_between_steps
from jaxdiff.schedules import Schedule, log_sigma_at

#: The network's time input is TIME_SCALE * t.
TIME_SCALE = 1000.0
#: How training draws t.
TIME_SAMPLINGS = ("uniform", "logit_normal")
#: The ODE solvers of :func:`flow_sample`.
METHODS = ("euler", "heun")

__all__ = [
    "METHODS",
    "TIME_SAMPLINGS",
    "TIME_SCALE",
    "draw_times",
    "flow_loss",
    "flow_path",
    "flow_sample",
    "time_grid",
    "v_from_velocity",
    "velocity",
    "velocity_from_v",
    "velocity_target",
    "vp_angles",
    "vp_betas",
    "vp_model",
]


def flow_path(x0: Array, noise: Array, t: Array) -> Array:
    """x_t = (1 - t) x_0 + t eps, t ``[B]``."""
    t = _per_example(t, x0)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: Array, noise: Array) -> Array:
    """u = dx_t / dt = eps - x_0 (the same at every t: the path is straight)."""
    return noise - x0


def draw_times(key: Array, batch_size: int, sampling: str = "uniform", mean: float = 0.0, std: float = 1.0) -> Array:
    """Training times ``[B]`` in (0, 1): uniform, or logit-normal t = sigmoid(mean + std n) (SD3's mean 0, std 1)."""
    check_choice("flow time sampling", sampling, TIME_SAMPLINGS)
    if sampling == "uniform":
        return jax.random.uniform(key, (batch_size,), jnp.float32)
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch_size,), jnp.float32))


def flow_loss(model_fn: ModelFn, x0: Array, noise: Array, t: Array) -> Array:
    """The per-example loss ``[B]``: ||u_theta(x_t, t) - (eps - x_0)||^2 averaged over the dimensions, the network
    called as ``model_fn(x_t, TIME_SCALE * t)``."""
    out = model_fn(flow_path(x0, noise, t), TIME_SCALE * jnp.asarray(t, jnp.float32))
    return mean_flat(jnp.square(out - velocity_target(x0, noise)))


def vp_angles(t: Array) -> tuple[Array, Array]:
    """(cos phi, sin phi) = ((1 - t) / n, t / n), n = sqrt((1 - t)^2 + t^2): the VP chain's sqrt(abar) and
    sqrt(1 - abar) at flow time t."""
    t = jnp.asarray(t, jnp.float32)
    return (1.0 - t) / _norm(t), t / _norm(t)


def velocity_from_v(x_vp: Array, v: Array, t: Array) -> Array:
    """u = (sin phi - cos phi) x^VP + (cos phi + sin phi) v: the flow velocity of a v-prediction at the VP point
    x^VP = x_t / n of flow time t (module docstring)."""
    cos, sin = (_per_example(a, x_vp) for a in vp_angles(t))
    return (sin - cos) * x_vp + (cos + sin) * v


def v_from_velocity(x_vp: Array, u: Array, t: Array) -> Array:
    """v = (u - (sin phi - cos phi) x^VP) / (cos phi + sin phi): the inverse of :func:`velocity_from_v`
    (cos phi + sin phi >= 1 on [0, 1], so nothing divides by less than 1)."""
    cos, sin = (_per_example(a, x_vp) for a in vp_angles(t))
    return (u - (sin - cos) * x_vp) / (cos + sin)


def time_grid(steps: int, t_max: float = 1.0) -> Array:
    """``[steps + 1]`` float32 times from ``t_max`` down to 0, evenly spaced (rectified flow's uniform grid).

    Raises:
      ValueError: steps < 1, or t_max outside (0, 1].
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"The flow sampler needs steps >= 1, got {steps!r}.")
    if not 0.0 < t_max <= 1.0:
        raise ConfigError(f"The flow sampler starts at a time in (0, 1], got {t_max}.")
    return jnp.asarray(np.linspace(t_max, 0.0, steps + 1), jnp.float32)


def flow_sample(
    velocity_fn,
    shape: tuple[int, ...],
    key: Array,
    times: Array,
    *,
    method: str = "euler",
    x_T: Array | None = None,
) -> Array:
    """Integrate dx/dt = u(x, t) over ``times`` (``[N + 1]``, decreasing to 0: :func:`time_grid`) from
    x = n(t_0) ``normal(fold_in(key, N))`` (eps itself at t_0 = 1).

    ``euler``: x_{k+1} = x_k + (t_{k+1} - t_k) u(x_k, t_k), N calls (order 1). ``heun``: the Euler point corrected by
    the mean of the two velocities, 2N - 1 calls (order 2; the step to t = 0 is Euler's, as in Karras et al.'s
    sampler, so the velocity is never read at t = 0).

    Args:
      velocity_fn: ``u(x [B, ...], t [B]) -> [B, ...]``: :func:`vp_model`'s network read as a velocity, or
        :func:`velocity` of any VP model.
      key: one key or ``[B]`` keys (image b's noise from ``key[b]`` alone); ``x_T``: the unit noise, to override it.

    Returns:
      x_0 ``[B, ...]``.
    """
    check_choice("flow method", method, METHODS)
    times = jnp.asarray(times, jnp.float32)
    steps = times.shape[0] - 1
    x = _norm(times[0]) * _starting_noise(key, shape, steps, x_T)  # x_t = n(t) x^VP, and x^VP is eps at the top
    batch = lambda t: jnp.full((shape[0],), t, jnp.float32)

    def step(x, k):
        t, t_next = times[k], times[k + 1]
        u = velocity_fn(x, batch(t))
        euler = x + (t_next - t) * u
        if method == "euler":
            return euler.astype(x.dtype), None

        def correct(euler):
            return x + (t_next - t) * (u + velocity_fn(euler, batch(t_next))) / 2

        return jax.lax.cond(t_next > 0, correct, lambda euler: euler, euler).astype(x.dtype), None

    x, _ = jax.lax.scan(step, x, jnp.arange(steps))
    return x


def velocity(schedule: Schedule, model_fn: ModelFn, *, prediction: str, variance: str = "fixed_small"):
    """u(x, t) of a VP model (``model_fn(x_t, timesteps)`` on the chain of ``schedule``): eps - x_0 of its
    predictions at the VP point x / n(t), level sigma = t / (1 - t), called at that level's fractional timestep
    (:func:`jaxdiff.schedules.timestep_at`), so that :func:`flow_sample` runs on any model. On a flow model's own
    chain (:func:`vp_model`, whose output is v) it is that model's velocity at t, up to float rounding, for t from
    the chain's first level (1 / T) to its last finite one ((T - 1) / T) and at t = 1 (a level below the first reads
    as the first; one inside the last interval as its lower end). :func:`time_grid` of at most T steps stays there."""

    def velocity_fn(x, t):
        t0 = t[0]  # one time for the batch: the sampler steps it together
        log_sigma = jnp.log(t0) - jnp.log1p(-t0)  # +inf at t = 1: pure noise, the chain's last step
        pred_x0, pred_eps = predictions_between_steps(
            schedule, model_fn, x / _norm(t0), log_sigma, prediction=prediction, variance=variance
        )
        return pred_eps - pred_x0

    return velocity_fn


def vp_betas(num_timesteps: int) -> np.ndarray:
    """The VP chain of a flow model, float64 ``[T]``: t_i = (i + 1) / T for i = 0 .. T - 1, abar = cos^2 phi =
    (1 - t)^2 / ((1 - t)^2 + t^2), so beta_T = 1 and abar_T = 0 (t = 1: pure noise).

    Raises:
      ValueError: T < 2.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
        raise ConfigError(f"A flow model's chain needs num_timesteps >= 2, got {num_timesteps!r}.")
    t = np.arange(1, num_timesteps + 1, dtype=np.float64) / num_timesteps
    abar = (1.0 - t) ** 2 / ((1.0 - t) ** 2 + t**2)
    abar[-1] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = abar / np.concatenate([[1.0], abar[:-1]])
    return 1.0 - ratios


def vp_model(model_fn: ModelFn, num_timesteps: int) -> ModelFn:
    """The flow network ``model_fn(x_t, TIME_SCALE t) -> u`` as a v-predicting VP network on the chain of
    :func:`vp_betas`: ``(x^VP, timesteps) -> v`` with x_t = n(t) x^VP and v = :func:`v_from_velocity`. Read its
    output with ``prediction='v'``.

    Timestep i is t = (i + 1) / T; a fractional one reads its level as every jaxdiff solver does, piecewise linear in
    ln sigma between the steps (:func:`jaxdiff.schedules.log_sigma_at`), and t = sigma / (1 + sigma), so that
    :func:`velocity` of this model at any t is its network's velocity at that t (levels above step T - 2, in the last
    interval, read as t = 1: its level is infinite)."""
    chain = Schedule.from_betas(vp_betas(num_timesteps))

    def vp_fn(x_vp, timesteps):
        t = jax.nn.sigmoid(log_sigma_at(chain, timesteps))
        return v_from_velocity(x_vp, model_fn(_per_example(_norm(t), x_vp) * x_vp, TIME_SCALE * t), t)

    return vp_fn


def _norm(t: Array) -> Array:
    """n(t) = sqrt((1 - t)^2 + t^2): x_t = n(t) x^VP."""
    return jnp.sqrt(jnp.square(1.0 - t) + jnp.square(t))
