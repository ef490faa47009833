"""Post-hoc EMA: power-function EMA profiles tracked during training, and any other EMA length reconstructed from
their snapshots afterwards (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
EDM2, section 3 and appendix C).

A power-function EMA of exponent gamma averages the parameters theta(tau) seen up to training time t with the profile

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)   on [0, t], 0 after          (EDM2 eq. 2)

(its integral over [0, t] is 1), so its length scales with the run. Its relative standard deviation, the width of the
profile over its time, is

    sigma_rel = (gamma + 1)^(1/2) (gamma + 2)^(-1) (gamma + 3)^(-1/2)              (EDM2 eq. 3)

(gamma 16.97 is sigma_rel 0.05, gamma 6.94 is 0.10). Tracked with one update per optimizer step, the EMA after the
t-th update (``step = t``, 1-based) is ``ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t`` with
``beta_t = (1 - 1/t)^(gamma + 1)`` (EDM2 appendix C.1; beta_1 = 0: the first update takes the parameters). The
product of the betas telescopes, so the weight of theta_s in ema_t is exactly

    w_s = (s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1)  =  integral of p_t over (s - 1, s],

the continuous profile applied to the parameters held constant over each step: the closed forms below are exact for
the discrete EMA.

Snapshots of a few tracked profiles (two, sigma_rel 0.05 and 0.10, every checkpoint period) span the others: the
coefficients x that make sum_i x_i p_i closest in L2 to a target profile p_r give ``sum_i x_i ema_i`` as the target's
EMA (:func:`synthesize`, EDM2 appendix C.2 and C.3).

Pure: JAX (the update inside the train step) and NumPy in float64 (the least squares), nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import ConfigError

__all__ = [
    "GAMMA_MIN",
    "SIGMA_RELS",
    "SIGMA_REL_MAX",
    "Snapshot",
    "combine",
    "gamma_to_sigma_rel",
    "power_ema_beta",
    "profile",
    "profile_inner",
    "sigma_rel_to_gamma",
    "synthesis_weights",
    "synthesize",
    "update_power_emas",
]

#: EDM2's two tracked profiles (sigma_rel): snapshots of these reconstruct any length in between and around.
SIGMA_RELS = (0.05, 0.10)
#: The exponent where sigma_rel peaks: d/dgamma log sigma_rel = 0 gives gamma^2 + 3 gamma + 1 = 0, gamma = (sqrt(5) -
#: 3) / 2 = -0.382. Below it sigma_rel falls again towards 0 at gamma = -1; :func:`sigma_rel_to_gamma` returns the
#: exponents at or above it, where a larger gamma is a shorter EMA.
GAMMA_MIN = (math.sqrt(5.0) - 3.0) / 2.0
#: The largest sigma_rel of any power-function EMA, at :data:`GAMMA_MIN`: 0.3003.
SIGMA_REL_MAX = math.sqrt(GAMMA_MIN + 1.0) / ((GAMMA_MIN + 2.0) * math.sqrt(GAMMA_MIN + 3.0))


class Snapshot(NamedTuple):
    """A tracked profile saved during training: the EMA of exponent ``gamma`` after ``step`` updates (its profile
    covers [0, step]), and its parameters (a pytree)."""

    step: int
    gamma: float
    params: Any


def gamma_to_sigma_rel(gamma):
    """sigma_rel = (gamma + 1)^(1/2) (gamma + 2)^(-1) (gamma + 3)^(-1/2) (EDM2 eq. 3), in float64; a float for a
    scalar, else an array of ``gamma``'s shape.

    Raises:
      ConfigError: a gamma <= -1 (its profile tau^gamma cannot be normalised over [0, t]).
    """
    g = np.asarray(gamma, np.float64)
    if not np.all(g > -1.0):
        raise ConfigError(f"A power-function EMA needs gamma > -1 (its profile grows as tau^gamma); got {gamma}.")
    s = np.sqrt(g + 1.0) / ((g + 2.0) * np.sqrt(g + 3.0))
    return float(s) if s.ndim == 0 else s


def _gamma_of(sigma_rel: float) -> float:
    """One sigma_rel's gamma: the largest real root of the cubic of :func:`sigma_rel_to_gamma`."""
    s2 = sigma_rel * sigma_rel
    roots = np.roots([1.0, 7.0, 16.0 - 1.0 / s2, 12.0 - 1.0 / s2])
    # At SIGMA_REL_MAX the two largest roots meet: rounding may leave them a complex pair with a tiny imaginary part.
    gamma = max(float(r.real) for r in roots)
    return max(gamma, GAMMA_MIN)


def sigma_rel_to_gamma(sigma_rel):
    """The exponent gamma of the power-function EMA of relative width ``sigma_rel``, in float64; a float for a
    scalar, else an array of ``sigma_rel``'s shape.

    Squaring EDM2 eq. 3 and clearing the denominators, sigma^2 (gamma + 2)^2 (gamma + 3) = gamma + 1, i.e. the cubic

        gamma^3 + 7 gamma^2 + (16 - 1/sigma^2) gamma + (12 - 1/sigma^2) = 0,

    whose largest real root is the gamma >= :data:`GAMMA_MIN` (the branch where sigma_rel falls as gamma grows; the
    other root above -1 is the same width of profile bent the other way, never used).

    Raises:
      ConfigError: sigma_rel outside (0, SIGMA_REL_MAX = 0.3003]: no power-function EMA is that wide.
    """
    s = np.asarray(sigma_rel, np.float64)
    if not np.all((s > 0.0) & (s <= SIGMA_REL_MAX * (1.0 + 1e-12))):
        raise ConfigError(
            f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}] (the widest power-function EMA; EDM2 tracks 0.05 and "
            f"0.10), got {sigma_rel}."
        )
    gammas = np.array([_gamma_of(float(x)) for x in s.reshape(-1)], np.float64).reshape(s.shape)
    return float(gammas) if gammas.ndim == 0 else gammas


def _coefficients(step, gamma: float) -> tuple[jax.Array, jax.Array]:
    """(beta_t, 1 - beta_t) in float32, each to its own relative precision: log beta_t = (gamma + 1) log1p(-1/t),
    then exp and -expm1 (a float32 ``1 - 1/t`` would lose 1/t's digits for long runs). t = 1 gives exactly (0, 1)."""
    t = jnp.asarray(step, jnp.float32)
    log_beta = (gamma + 1.0) * jnp.log1p(-1.0 / t)
    return jnp.exp(log_beta), -jnp.expm1(log_beta)


def power_ema_beta(step, gamma: float) -> jax.Array:
    """The decay of the power-function EMA at the update that makes ``step`` (the 1-based count of updates seen,
    ``>= 1``): beta_t = (1 - 1/t)^(gamma + 1) (EDM2 eq. 2, appendix C.1). A float32 array of ``step``'s shape; works
    on traced steps under jit (``gamma`` is a Python float)."""
    return _coefficients(step, gamma)[0]


def _update(ema, params, step, gamma: float):
    beta, rest = _coefficients(step, gamma)
    return jax.tree_util.tree_map(
        lambda e, p: beta.astype(e.dtype) * e + rest.astype(e.dtype) * p.astype(e.dtype), ema, params
    )


def update_power_emas(emas, params, step, gammas):
    """One update of each tracked profile: ``ema_i <- beta_t(gamma_i) ema_i + (1 - beta_t(gamma_i)) params``.

    Args:
      emas: one tree per profile, shaped like ``params``: a tuple (or list) with ``gammas`` a sequence of the same
        length, or a dict with ``gammas`` a dict of the same keys.
      params: the parameters after this update.
      step: the 1-based count of updates seen, this one included (``state.step + 1``); an int or a traced int32.
      gammas: the profiles' exponents (Python floats).

    Returns:
      The updated trees, in the container of ``emas``.
    """
    if isinstance(emas, Mapping):
        if set(emas) != set(gammas):
            raise ConfigError(f"The EMAs {sorted(emas)} and their gammas {sorted(gammas)} must have the same keys.")
        return {name: _update(tree, params, step, float(gammas[name])) for name, tree in emas.items()}
    if len(emas) != len(gammas):
        raise ConfigError(f"{len(emas)} tracked EMAs but {len(gammas)} gammas: give one gamma per EMA.")
    return type(emas)(_update(tree, params, step, float(g)) for tree, g in zip(emas, gammas, strict=True))


def profile(t_snapshot, gamma, tau):
    """The weight that the EMA of exponent ``gamma`` taken at training time ``t_snapshot`` gives to the parameters
    at time ``tau``: (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t], 0 after (EDM2 eq. 2). Float64, broadcast over
    the arguments' shapes (at tau = 0 it is 0 for gamma > 0, infinite for gamma < 0)."""
    t = np.asarray(t_snapshot, np.float64)
    g = np.asarray(gamma, np.float64)
    tau = np.asarray(tau, np.float64)
    inside = (tau >= 0) & (tau <= t)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (g + 1.0) * np.power(np.where(inside, tau, 0.0), g) / np.power(t, g + 1.0)
    return np.where(inside, value, 0.0)


def profile_inner(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> = integral over tau of p_a(tau) p_b(tau), in closed form (float64, broadcast):

        (ga + 1)(gb + 1) m^(ga + gb + 1) / ((ga + gb + 1) ta^(ga + 1) tb^(gb + 1)),   m = min(ta, tb),

    written as (ga + 1)(gb + 1) / ((ga + gb + 1) m) (m / ta)^(ga + 1) (m / tb)^(gb + 1): ratios <= 1, so long runs and
    large gammas do not overflow. Needs ga + gb + 1 > 0 (both gamma > -1/2)."""
    ta, ga = np.asarray(t_a, np.float64), np.asarray(gamma_a, np.float64)
    tb, gb = np.asarray(t_b, np.float64), np.asarray(gamma_b, np.float64)
    m = np.minimum(ta, tb)
    scale = (ga + 1.0) * (gb + 1.0) / ((ga + gb + 1.0) * m)
    return scale * np.power(m / ta, ga + 1.0) * np.power(m / tb, gb + 1.0)


def synthesis_weights(steps: Sequence[int], gammas: Sequence[float], sigma_rel: float, at_step: int) -> np.ndarray:
    """The coefficients x ``[N]`` (float64) that make sum_i x_i p_i closest in L2 to the profile of ``sigma_rel`` at
    ``at_step`` (EDM2 appendix C.2, C.3): the least-squares solution of A x = b with A_ij = <p_i, p_j> and
    b_i = <p_i, p_r> (:func:`profile_inner`), p_i the profile of ``gammas[i]`` at ``steps[i]``, p_r that of
    gamma(sigma_rel) at ``at_step``. Solved by ``np.linalg.lstsq`` (the Gram matrix of nearby profiles is close to
    singular; its minimum-norm solution is used). The times are divided by the latest one first: the x are unchanged
    (each inner product scales by the same factor) and the powers stay in range.

    Raises:
      ConfigError: no snapshots, steps < 1, a gamma <= -1/2, or sigma_rel out of range (:func:`sigma_rel_to_gamma`).
    """
    t = np.asarray(steps, np.float64).reshape(-1)
    g = np.asarray(gammas, np.float64).reshape(-1)
    if t.size == 0:
        raise ConfigError(
            "No EMA snapshots to reconstruct from: train with config.optim.posthoc_ema set (e.g. "
            "--config.optim.posthoc_ema=0.05,0.10), which saves them every checkpoint period."
        )
    if t.shape != g.shape:
        raise ConfigError(f"{t.size} snapshot steps but {g.size} gammas: give one gamma per snapshot.")
    if not (np.all(t >= 1) and at_step >= 1):
        raise ConfigError(f"Snapshot steps and at_step count updates and must be >= 1; got {t.tolist()}, {at_step}.")
    if not np.all(g > -0.5):
        raise ConfigError(f"Snapshots of gamma <= -1/2 have no finite inner products; got gammas {g.tolist()}.")
    target = sigma_rel_to_gamma(sigma_rel)
    scale = max(float(t.max()), float(at_step))
    t, at = t / scale, at_step / scale
    gram = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    rhs = profile_inner(t, g, at, target)
    x, *_ = np.linalg.lstsq(gram, rhs, rcond=None)
    return x


def combine(weights: Sequence[float], trees: Iterable) -> Any:
    """sum_i weights[i] trees[i], leaf by leaf, accumulated in float64 on the host (the weights of nearby profiles
    are large and of both signs) and returned as NumPy arrays of the first tree's dtypes. ``trees`` may be a
    generator: one tree is held at a time besides the sum."""
    total, dtypes, structure = None, None, None
    for w, tree in zip(weights, trees, strict=True):
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
        if total is None:
            structure, dtypes = jax.tree_util.tree_structure(tree), [x.dtype for x in leaves]
            total = [np.zeros(x.shape, np.float64) for x in leaves]
        for acc, x in zip(total, leaves, strict=True):
            acc += float(w) * x.astype(np.float64)
    if total is None:
        raise ConfigError("Nothing to combine: no trees were given.")
    return jax.tree_util.tree_unflatten(structure, [a.astype(d) for a, d in zip(total, dtypes, strict=True)])


def synthesize(snapshots: Sequence[Snapshot | tuple], sigma_rel: float, *, at_step: int | None = None) -> Any:
    """The parameters of the power-function EMA of width ``sigma_rel`` at ``at_step`` (default: the last snapshot's
    step), reconstructed from ``snapshots`` ((step, gamma, params) each): sum_i x_i params_i with x
    :func:`synthesis_weights`. Exact when the target's profile is one of the snapshots'; otherwise as close as the
    profiles' span allows (EDM2 appendix C.3). The trees come back as NumPy arrays of the inputs' dtypes.

    Raises:
      ConfigError: no snapshots, or sigma_rel out of range.
    """
    snapshots = [Snapshot(*s) for s in snapshots]
    if not snapshots:
        synthesis_weights([], [], sigma_rel, 1)  # raises its message
    at = snapshots[-1].step if at_step is None else at_step
    x = synthesis_weights([s.step for s in snapshots], [s.gamma for s in snapshots], sigma_rel, at)
    return combine(x, (s.params for s in snapshots))
