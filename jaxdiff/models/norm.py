"""GroupNorm (Wu & He 2018) with float32 statistics from a shifted one-pass variance, the normalisation and the
affine map as one multiply-add per value, and its derivative in closed form (forward and reverse mode).

For ``x`` ``[B, ..., C]`` with ``G`` groups of ``C / G`` channels, each (example, group) over its ``n`` values:

.. math::

    \\mu = \\mathrm{E}[x], \\quad \\sigma^2 = \\mathrm{Var}[x], \\quad
    \\hat x = (x - \\mu) / \\sqrt{\\sigma^2 + \\epsilon}, \\quad y = \\gamma \\hat x + \\beta

**The variance.** One pass over ``x``, E[x^2] - E[x]^2 (flax's default), loses digits as a group's mean grows against
its spread: where the mean is 100x the spread, its float32 output is 1e-2 off float64. Here the pass runs on
``u = x - k``, ``k`` per (example, group) the mean of the group's values in the first row ``x[:, 0]`` (a value
within a fraction of the spread of the mean): Var[u] = E[u^2] - E[u]^2 = Var[x], with E[u] small, so the subtraction
keeps its digits (within 1e-5 of float64 at 100x, tests/test_norm.py). ``x - k`` and every statistic are float32
even for bfloat16 inputs. The sums run over the positions first, per channel (a reduction over the major axis), then
over each group's channels on the small ``[B, C]`` result. The output is ``u a + (beta - E[u] a)`` with
``a = gamma / sqrt(var + eps)`` per (example, channel): one multiply-add per value.

**The derivative** is a custom JVP, so both forward mode (the probability-flow likelihood's divergence,
:mod:`jaxdiff.likelihood`) and reverse mode (training) use it. With ``k`` a constant of the derivative (GroupNorm
does not depend on it), ``du = dx``, and per (example, group) ``M_1 = E[du]`` and ``M_2 = E[u du]``:

.. math::

    \\tfrac{1}{2} d\\sigma^2 = M_2 - \\mathrm{E}[u] M_1, \\quad
    dy = \\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}} \\Big(du - M_1 - \\hat x \\frac{\\tfrac{1}{2} d\\sigma^2}
    {\\sqrt{\\sigma^2 + \\epsilon}}\\Big) + d\\gamma \\, \\hat x + d\\beta

computed as ``du A + u B + C`` per (example, channel): one pass over ``du`` and ``u`` for the two sums, one for the
output. Reverse mode is JAX's transpose of this linear map, the closed form: with ``g`` the output's cotangent and
``S_1 = sum g``, ``S_2 = sum g \\hat x`` per (example, channel) over the positions,

.. math::

    \\partial\\beta = \\textstyle\\sum_B S_1, \\quad \\partial\\gamma = \\sum_B S_2, \\quad
    \\partial x = \\frac{1}{\\sqrt{\\sigma^2 + \\epsilon}} \\Big(\\gamma g - \\frac{1}{n} \\sum_{c \\in \\text{group}}
    \\gamma_c S_{1,c} - \\hat x \\, \\frac{1}{n} \\sum_{c \\in \\text{group}} \\gamma_c S_{2,c}\\Big)

keeping ``u`` and the per-group ``E[u]`` and ``1 / sqrt(var + eps)``. Against autodiff through flax's GroupNorm the
UNet's gradient takes 1.003x the time on CIFAR-10 (batch 8) and 0.978x on the digits (batch 32), both within the
rounds' spread (``benchmarks/groupnorm_speed.py``; benchmarks/README.md, "CPU training against PyTorch").
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.errors import ConfigError
from jaxdiff.models.initializers import Constant

__all__ = ["GroupNorm", "group_norm"]

Array = jax.Array


def group_norm(x: Array, scale: Array, bias: Array, num_groups: int, eps: float = 1e-6, dtype=None) -> Array:
    """GroupNorm of ``x`` ``[B, ..., C]`` with per-channel ``scale`` and ``bias`` ``[C]``.

    Statistics per (example, group) over the positions and the group's ``C / num_groups`` channels, in float32 with
    the shifted one-pass variance (the module docstring); the derivatives, forward and reverse, are the
    closed forms there.

    Args:
      x: ``[B, ..., C]`` (``[B, C]`` is a group over channels alone); any float dtype.
      scale, bias: ``[C]``.
      num_groups: ``G``, dividing ``C``.
      eps: added to the variance.
      dtype: the output's dtype; ``x.dtype`` when None.

    Returns:
      ``[B, ..., C]`` of ``dtype``.
    """
    if x.ndim < 2 or x.shape[-1] % num_groups:
        raise ConfigError(
            f"group_norm needs x [B, ..., C] with C divisible by num_groups={num_groups}, got shape {x.shape}."
        )
    if scale.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise ConfigError(f"scale and bias must be [C] = [{x.shape[-1]}], got {scale.shape} and {bias.shape}.")
    return _group_norm(num_groups, float(eps), jnp.dtype(dtype or x.dtype), x, scale, bias)


def _positions(x: Array) -> Array:
    """``[B, ..., C]`` -> float32 ``[B, P, C]`` (P positions; P = 1 for ``[B, C]``)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(x.shape[0], -1, x.shape[-1])


def _group_sum(v: Array, num_groups: int) -> Array:
    """``[B, 1, C]`` -> ``[B, 1, C]``: each channel's entry replaced by the sum over its group."""
    b, _, c = v.shape
    sums = v.reshape(b, 1, num_groups, c // num_groups).sum(axis=3, keepdims=True)
    return jnp.broadcast_to(sums, (b, 1, num_groups, c // num_groups)).reshape(b, 1, c)


def _statistics(x: Array, num_groups: int, eps: float) -> tuple[Array, Array, Array]:
    """Per (example, channel) ``[B, 1, C]``, constant over each group: the shift ``k``, ``E[x - k]`` and
    ``1 / sqrt(Var[x] + eps)`` of the channel's group."""
    c = x.shape[-1]
    n = math.prod(x.shape[1:-1]) * (c // num_groups)
    first_row = _positions(x[:, 0] if x.ndim > 2 else x)
    k = _group_sum(first_row.sum(axis=1, keepdims=True), num_groups) / (first_row.shape[1] * (c // num_groups))
    u = _positions(x) - k
    # Per-channel sums over the positions first (a reduction over the major axis), then over each group's channels.
    mean_u = _group_sum(u.sum(axis=1, keepdims=True), num_groups) / n
    mean_u2 = _group_sum(jnp.square(u).sum(axis=1, keepdims=True), num_groups) / n
    inv = jax.lax.rsqrt(jnp.maximum(mean_u2 - jnp.square(mean_u), 0.0) + eps)
    return k, mean_u, inv


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _group_norm(num_groups: int, eps: float, out_dtype, x: Array, scale: Array, bias: Array) -> Array:
    return _normalise(num_groups, eps, out_dtype, x, scale, bias)[0]


def _normalise(num_groups, eps, out_dtype, x, scale, bias):
    """The output ``gamma x_hat + beta`` as ``u a + (beta - E[u] a)`` (``u = x - k`` keeps its digits: ``k`` is near
    the mean), and what the derivative takes from the forward: ``u`` ``[B, P, C]``, and ``E[u]``,
    ``1 / sqrt(var + eps)`` and ``a = gamma / sqrt(var + eps)`` per (example, channel) ``[B, 1, C]``."""
    k, mean_u, inv = _statistics(x, num_groups, eps)
    u = _positions(x) - k
    a = scale.astype(jnp.float32) * inv
    y = u * a + (bias.astype(jnp.float32) - mean_u * a)
    return y.reshape(x.shape).astype(out_dtype), (u, mean_u, inv, a)


@_group_norm.defjvp
def _group_norm_jvp(num_groups, eps, out_dtype, primals, tangents):
    x, scale, bias = primals
    dx, d_scale, d_bias = tangents
    y, (u, mean_u, inv, a) = _normalise(num_groups, eps, out_dtype, x, scale, bias)
    n = math.prod(x.shape[1:-1]) * (x.shape[-1] // num_groups)
    du = _positions(dx)  # k is a constant of the derivative: GroupNorm does not depend on it
    # Per (example, channel), constant over each group: M_1 = E[du], M_2 = E[u du] and dVar / 2 = M_2 - E[u] M_1.
    m1 = _group_sum(du.sum(axis=1, keepdims=True), num_groups) / n
    half_dvar = _group_sum((u * du).sum(axis=1, keepdims=True), num_groups) / n - mean_u * m1
    dg = d_scale.astype(jnp.float32) * inv
    # dy = a (du - M_1) - a inv^2 (u - E[u]) dVar / 2 + dgamma inv (u - E[u]) + dbeta: du A + u B + C per channel.
    slope = dg - a * jnp.square(inv) * half_dvar
    dy = du * a + u * slope + (d_bias.astype(jnp.float32) - a * m1 - mean_u * slope)
    return y, dy.reshape(x.shape).astype(out_dtype)


class GroupNorm(nn.Module):
    """:func:`group_norm` as a Flax layer, with flax's ``nn.GroupNorm`` parameters (``scale`` and ``bias``, ``[C]``,
    float32), so checkpoints and weight import are unchanged.

    Attributes:
      num_groups: groups over the channels.
      epsilon: added to the variance.
      dtype: the output's dtype (None: the input's).
      scale_init, bias_init: the parameters' initialisers (host-drawable, :mod:`jaxdiff.models.initializers`).
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: object = None
    scale_init: Constant = Constant(1.0)
    bias_init: Constant = Constant(0.0)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
        bias = self.param("bias", self.bias_init, (channels,), jnp.float32)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.dtype)
