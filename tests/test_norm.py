"""The fused GroupNorm (jaxdiff.models.norm): float64 forward, finite-difference derivatives in reverse and forward
mode, large group means, bfloat16, and the UNet built with it equal to the UNet built with flax's GroupNorm
(outputs, gradients and forward-mode derivatives)."""

import dataclasses
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.errors import ConfigError
from jaxdiff.experiment import run_config
from jaxdiff.models import UNet, UNetConfig, init_params, unet
from jaxdiff.models.norm import GroupNorm, group_norm

EPS = 1e-6


def group_norm64(x, scale, bias, groups):
    """GroupNorm in float64 NumPy, two passes: per (example, group), (x - mean) / sqrt(var + eps) * scale + bias."""
    x = np.asarray(x, np.float64)
    g = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
    mean = g.mean((1, 3), keepdims=True)
    var = np.square(g - mean).mean((1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + EPS)).reshape(x.shape) * np.float64(scale) + np.float64(bias)


def finite_difference_gradient(f, x, h):
    """d f / d x of a scalar float64 function, by central differences, entry by entry."""
    x = np.array(x, np.float64)
    grad = np.empty_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = h
        grad[i] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def data(shape, groups, offset, seed=0):
    """x whose groups have means ``offset`` times their spread (per example and group), and scale, bias, weights."""
    rng = np.random.default_rng(seed)
    batch, channels = shape[0], shape[-1]
    spread = rng.uniform(0.5, 2.0, (batch, 1, groups, 1))
    mean = offset * spread * rng.choice([-1.0, 1.0], spread.shape)
    x = mean + spread * rng.standard_normal((batch, int(np.prod(shape[1:-1])), groups, channels // groups))
    scale = 1 + 0.2 * rng.standard_normal(channels)
    bias = 0.2 * rng.standard_normal(channels)
    weights = rng.standard_normal(shape)
    return x.reshape(shape).astype(np.float32), scale.astype(np.float32), bias.astype(np.float32), weights


@pytest.mark.parametrize("shape,groups", [((2, 16, 16, 64), 32), ((3, 64), 8), ((2, 4, 6, 3, 16), 4)])
def test_forward_matches_float64_where_group_means_are_100x_their_spread(shape, groups):
    """float32 in and out, within 1e-5 of float64; flax's default one-pass variance on the same input is not."""
    x, scale, bias, _ = data(shape, groups, offset=100.0)
    want = group_norm64(x, scale, bias, groups)
    for fn in (group_norm, jax.jit(group_norm, static_argnums=(3, 4))):
        out = fn(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), groups, EPS)
        assert out.dtype == jnp.float32 and out.shape == shape
        assert float(np.abs(np.asarray(out, np.float64) - want).max()) < 1e-5
    fast = nn.GroupNorm(num_groups=groups, epsilon=EPS, use_fast_variance=True)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    flax_error = np.abs(
        np.asarray(fast.apply(params, jnp.asarray(x)), np.float64) - group_norm64(x, scale, bias, groups)
    )
    assert float(flax_error.max()) > 1e-3  # the test can fail


@pytest.mark.parametrize("offset", [0.5, 100.0])
def test_the_custom_gradient_matches_float64_finite_differences(offset):
    """d/dx, d/dscale and d/dbias of sum(w * GN(x)), against central differences of the float64 GroupNorm (h = 1e-5
    times the spread: truncation ~1e-10); within 1e-5 of the largest entry, for modest means and means 100x the
    spread."""
    shape, groups = (2, 3, 4, 8), 4
    x, scale, bias, w = data(shape, groups, offset)
    loss = lambda x, s, b: jnp.sum(jnp.asarray(w, jnp.float32) * group_norm(x, s, b, groups, EPS))
    got = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    x64, s64, b64 = (np.asarray(a, np.float64) for a in (x, scale, bias))
    want = (
        finite_difference_gradient(lambda v: np.sum(w * group_norm64(v, s64, b64, groups)), x64, 1e-5),
        finite_difference_gradient(lambda v: np.sum(w * group_norm64(x64, v, b64, groups)), s64, 1e-6),
        finite_difference_gradient(lambda v: np.sum(w * group_norm64(x64, s64, v, groups)), b64, 1e-6),
    )
    for g, ref in zip(got, want, strict=True):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g, np.float64), ref, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("offset", [0.5, 100.0])
def test_forward_mode_matches_float64_directional_differences_and_reverse_mode(offset):
    """jax.jvp along (dx, dscale, dbias) against central differences of the float64 GroupNorm along the same
    direction (within 1e-5 of the largest entry); and <w, J v> from forward mode equals <J^T w, v> from reverse mode
    (the probability-flow likelihood takes the network's divergence in forward mode, the training step in reverse)."""
    shape, groups = (2, 3, 4, 8), 4
    x, scale, bias, w = data(shape, groups, offset)
    rng = np.random.default_rng(1)
    dx = rng.standard_normal(shape) * np.abs(x).max() / 100  # as large as the spread where the mean is 100x it
    ds, db = rng.standard_normal(scale.shape), rng.standard_normal(bias.shape)
    fn = lambda x, s, b: group_norm(x, s, b, groups, EPS)
    primals = tuple(jnp.asarray(a, jnp.float32) for a in (x, scale, bias))
    tangents = tuple(jnp.asarray(a, jnp.float32) for a in (dx, ds, db))
    out, jv = jax.jvp(fn, primals, tangents)
    np.testing.assert_allclose(out, fn(*primals), rtol=1e-6, atol=1e-6)  # the rule's primal is the function's
    h = 1e-6
    x64, s64, b64 = (np.asarray(a, np.float64) for a in (x, scale, bias))
    want = (
        group_norm64(x64 + h * dx, s64 + h * ds, b64 + h * db, groups)
        - group_norm64(x64 - h * dx, s64 - h * ds, b64 - h * db, groups)
    ) / (2 * h)
    assert jv.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(jv, np.float64), want, atol=1e-5 * np.abs(want).max())
    cotangents = jax.vjp(fn, *primals)[1](jnp.asarray(w, jnp.float32))
    forward = float(jnp.vdot(jnp.asarray(w, jnp.float32), jv))
    reverse = sum(float(jnp.vdot(c, t)) for c, t in zip(cotangents, tangents, strict=True))
    assert abs(forward - reverse) < 1e-5 * np.abs(w).sum() * np.abs(want).max()


def test_bfloat16_inputs_take_float32_statistics_and_give_bfloat16():
    """A bfloat16 x: the output is float32's GroupNorm of the same (rounded) x, rounded once to bfloat16; the
    gradient of x is bfloat16 and that of the float32 parameters float32."""
    x, scale, bias, w = data((2, 8, 8, 32), 8, offset=3.0)
    xb = jnp.asarray(x, jnp.bfloat16)
    out = group_norm(xb, jnp.asarray(scale), jnp.asarray(bias), 8, EPS)
    want = group_norm64(np.asarray(xb, np.float32), scale, bias, 8)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=2**-8 * np.abs(want).max())
    grads = jax.grad(
        lambda x, s: jnp.sum(jnp.asarray(w) * group_norm(x, s, jnp.asarray(bias), 8, EPS).astype(jnp.float32)),
        argnums=(0, 1),
    )(xb, jnp.asarray(scale))
    assert (grads[0].dtype, grads[1].dtype) == (jnp.bfloat16, jnp.float32)
    assert group_norm(xb, jnp.asarray(scale), jnp.asarray(bias), 8, dtype=jnp.float32).dtype == jnp.float32


def test_bad_shapes_say_what_to_change():
    x = jnp.zeros((2, 4, 4, 12))
    with pytest.raises(ConfigError, match="divisible by num_groups=8"):
        group_norm(x, jnp.ones(12), jnp.zeros(12), 8)
    with pytest.raises(ConfigError, match=r"scale and bias must be \[C\] = \[12\]"):
        group_norm(x, jnp.ones(6), jnp.zeros(6), 4)


# ---------------------------------------------------------------------------------------------------------------------
# The UNet with the fused GroupNorm against the UNet with flax's GroupNorm (the network before issue #35).


class FlaxShiftedGroupNorm(nn.GroupNorm):
    """The UNet's GroupNorm before issue #35: flax's one-pass GroupNorm of x - k (k per example and group the mean
    of its first row); autodiff for the gradient."""

    use_fast_variance: bool = True

    def __call__(self, x, *, mask=None):
        x = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
        batch, channels = x.shape[0], x.shape[-1]
        size = channels // self.num_groups
        row = x[:, 0] if x.ndim > 2 else x
        k = jax.lax.stop_gradient(row.reshape(batch, -1, self.num_groups, size).mean(axis=(1, 3)))
        shift = jnp.repeat(k, size, axis=-1).reshape(batch, *(1,) * (x.ndim - 2), channels)
        return super().__call__(x - shift, mask=mask)


def _digits_network():
    return run_config(importlib.import_module("jaxdiff.configs.digits").get_config()).network(1, None)


def _cifar10_network():
    return UNetConfig(dropout=0.0)


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize(
    "network", [_digits_network, pytest.param(_cifar10_network, marks=pytest.mark.slow)], ids=["digits", "cifar10"]
)
def test_the_unet_equals_the_unet_with_flax_groupnorm(network, remat, monkeypatch):
    """Outputs, every parameter's gradient of a squared error and the forward-mode derivative along an input
    direction, with and without remat, on the shipped networks:
    equal up to float32 rounding (1e-5 of the largest entry; the two differ only in the order of float operations)."""
    cfg = dataclasses.replace(network(), remat=remat)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32), params)  # no zero layers
    x = jnp.asarray(rng.standard_normal((2, cfg.image_size, cfg.image_size, cfg.in_channels)), jnp.float32)
    t, target = jnp.asarray([10, 900], jnp.int32), jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def run():
        net = UNet(cfg)
        loss = lambda p: jnp.mean((net.apply(p, x, t) - target) ** 2)
        # The network's derivative along `target` in forward mode, as the likelihood's divergence takes it.
        jvp = lambda p: jax.jvp(lambda y: net.apply(p, y, t), (x,), (target,))[1]
        return jax.jit(lambda p: (net.apply(p, x, t), jax.grad(loss)(p), jvp(p)))(params)

    out, grads, jv = run()
    monkeypatch.setattr(unet, "GroupNorm", FlaxShiftedGroupNorm)
    ref_out, ref_grads, ref_jv = run()
    np.testing.assert_allclose(out, ref_out, atol=1e-5 * float(jnp.abs(ref_out).max()))
    np.testing.assert_allclose(jv, ref_jv, atol=1e-5 * float(jnp.abs(ref_jv).max()))
    # A bias right before a GroupNorm has a zero gradient in exact arithmetic: compare each leaf at the global scale.
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = ref_grads
        for key in path:
            ref = ref[key.key]
        np.testing.assert_allclose(g, ref, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_the_module_keeps_flax_groupnorm_parameters():
    """The same parameter tree as flax's nn.GroupNorm (scale and bias, [C], float32), so checkpoints and weight
    import read it unchanged."""
    x = jnp.zeros((1, 4, 4, 16))
    ours = GroupNorm(num_groups=4).init(jax.random.key(0), x)
    theirs = nn.GroupNorm(num_groups=4).init(jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(lambda a: (a.shape, a.dtype), theirs)
