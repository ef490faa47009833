"""The DDPM UNet: the paper's sizes, shapes and dtypes, the time embedding, bf16, remat, dropout, conditioning."""

import dataclasses
import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxdiff.models import UNet, UNetConfig, count_params, init_params, timestep_embedding
from jaxdiff.models.initializers import host_initializers
from jaxdiff.models.unet import attention

# One small network serves every test that computes: compute dtype, remat, dropout and head count change no parameter,
# so its params fit every variant.
BASE = UNetConfig(
    image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_classes=10
)


def variant(**changes):
    return dataclasses.replace(BASE, **changes)


@functools.cache
def base_init():
    return init_params(BASE, jax.random.key(0))


@functools.cache
def base_params(randomise=True):
    return randomised(base_init()) if randomise else base_init()


@functools.cache
def jitted_apply(cfg, train=False):
    return jax.jit(functools.partial(UNet(cfg).apply, train=train))


def inputs(cfg, batch=2, seed=0):
    x = np.random.default_rng(seed).standard_normal((batch, cfg.image_size, cfg.image_size, cfg.in_channels))
    return jnp.asarray(x, jnp.float32), jnp.arange(batch, dtype=jnp.int32) * 333


def randomised(params, seed=0, scale=0.05):
    """DDPM's init zeroes the last layer of every block; give every weight a value so that outputs depend on them."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda leaf: leaf + scale * rng.standard_normal(leaf.shape, np.float32), params)


@pytest.mark.parametrize(
    "cfg,expected",
    [
        # The exact counts of diffusers' UNet2DModel built with the same architecture (the reference implementation
        # of the released google/ddpm-* checkpoints); the paper quotes 35.7M and 114M.
        (UNetConfig(), 35_746_307),
        (UNetConfig(image_size=256, ch_mult=(1, 1, 2, 2, 4, 4)), 113_673_219),
    ],
    ids=["cifar10", "256x256"],
)
def test_the_papers_models_have_the_papers_sizes(cfg, expected):
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    assert count_params(shapes) == expected


@pytest.mark.parametrize(
    "cfg",
    [
        UNetConfig(image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)),
        UNetConfig(image_size=28, in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(14,)),
        UNetConfig(ch=64, ch_mult=(1, 2, 2), attn_resolutions=(16, 8), learn_sigma=True),
        UNetConfig(image_size=64, ch=32, ch_mult=(1, 1, 2, 2), attn_resolutions=(), resample_with_conv=False),
        UNetConfig(dtype="bfloat16", remat=True),
    ],
    ids=["8px", "28px-mnist", "32px-learned-sigma", "64px-avgpool", "32px-cifar10-bf16-remat"],
)
def test_output_shape_and_dtype(cfg):
    def init_and_apply(key):
        x = jnp.zeros((2, cfg.image_size, cfg.image_size, cfg.in_channels))
        t = jnp.zeros((2,), jnp.int32)
        params = init_params(cfg, key)
        return params, UNet(cfg).apply(params, x, t)

    params, out = jax.eval_shape(init_and_apply, jax.random.key(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))  # params stay f32
    assert out.shape == (2, cfg.image_size, cfg.image_size, cfg.in_channels * (2 if cfg.learn_sigma else 1))
    assert out.dtype == jnp.float32 and cfg.out_channels == out.shape[-1]


def _flat(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


def test_the_host_draw_has_flax_inits_distributions():
    # init_params draws on the host; UNet.init is Flax's own jitted draw with jax's PRNG. Different values, and the
    # same distributions: DDPM's U(-l, l), l = sqrt(3 scale / fan_avg), scale 1e-10 for the last conv of each
    # residual block, each attention output and the output conv; zero biases, unit GroupNorm scales; the class
    # embedding a normal of variance 1 / features truncated at 2 of its own standard deviations.
    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
    flax_init = jax.jit(UNet(BASE).init, compiler_options={"xla_backend_optimization_level": 0})
    host, ref = _flat(base_init()), _flat(flax_init(jax.random.key(0), x, t))
    assert host.keys() == ref.keys()
    pooled = {"host": [], "flax": []}
    for name, value in host.items():
        assert value.shape == ref[name].shape and value.dtype == ref[name].dtype == np.float32, name
        if name.endswith("['bias']") or name.endswith("['scale']"):
            expected = 1.0 if name.endswith("['scale']") else 0.0
            assert np.all(value == expected) and np.all(ref[name] == expected), name
            continue
        if name.endswith("['embedding']"):
            bound = 2 * math.sqrt(1 / value.shape[1]) / 0.87962566103423978
        else:
            zero_init = any(f"['{layer}']" in name for layer in ("conv2", "proj_out", "conv_out"))
            receptive = math.prod(value.shape[:-2])
            fan_avg = (value.shape[-2] + value.shape[-1]) * receptive / 2
            bound = math.sqrt(3 * (1e-10 if zero_init else 1.0) / fan_avg)
        for source, v in (("host", value), ("flax", ref[name])):
            normalised = v.ravel() / bound
            assert np.abs(normalised).max() <= 1 + 1e-6, (source, name)
            assert np.abs(normalised).max() > 0.5, (source, name)  # the scale is right, not merely bounded
            if not name.endswith("['embedding']"):
                pooled[source].append(normalised)
    host_u, flax_u = np.concatenate(pooled["host"]), np.concatenate(pooled["flax"])
    assert scipy.stats.kstest(host_u, scipy.stats.uniform(-1, 2).cdf).pvalue > 1e-3
    assert scipy.stats.kstest(flax_u, scipy.stats.uniform(-1, 2).cdf).pvalue > 1e-3
    emb, emb_ref = host["['params']['class_embed']['embedding']"], ref["['params']['class_embed']['embedding']"]
    np.testing.assert_allclose(emb.std(), emb_ref.std(), rtol=0.1)
    np.testing.assert_allclose(emb.std(), math.sqrt(1 / emb.shape[1]), rtol=0.1)


def test_the_parameters_are_a_function_of_the_key_alone():
    cfg = variant(num_classes=None, attn_resolutions=())
    eager = _flat(init_params(cfg, jax.random.key(3)))
    jitted = _flat(jax.jit(lambda k: init_params(cfg, k))(jax.random.key(3)))
    batched = jax.vmap(lambda k: init_params(cfg, k))(jnp.stack([jax.random.key(3), jax.random.key(4)]))
    other = _flat(init_params(cfg, jax.random.key(4)))
    legacy = _flat(init_params(cfg, jax.random.key_data(jax.random.key(3))))  # a raw uint32 key, same words
    for name, value in eager.items():
        np.testing.assert_array_equal(jitted[name], value)
        np.testing.assert_array_equal(legacy[name], value)
        np.testing.assert_array_equal(_flat(batched)[name][0], value)
        np.testing.assert_array_equal(_flat(batched)[name][1], other[name])
    kernels = [name for name in eager if name.endswith("['kernel']")]
    assert all(not np.array_equal(eager[name], other[name]) for name in kernels)


def test_an_eager_draw_compiles_nothing(caplog):
    key = jax.random.key(5)
    init_params(variant(num_classes=None), key)  # reading the key's words may compile once per process
    caplog.set_level(logging.DEBUG, logger="jax._src.interpreters.pxla")  # JAX logs each lowering there
    params = init_params(variant(ch=48, ch_mult=(1, 3), num_groups=16, num_classes=7), key)  # new leaf shapes
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(params))
    assert not [r.getMessage()[:80] for r in caplog.records if r.getMessage().startswith("Compiling")]


def test_a_layer_without_a_host_initialiser_is_named():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="proj")(x)  # Flax's default lecun_normal kernel has no host draw

    with pytest.raises(ValueError, match=r"params/proj/bias \(Dense.*params/proj/kernel \(Dense.*FanAvgUniform"):
        host_initializers(Plain(), jax.ShapeDtypeStruct((1, 3), jnp.float32))


def test_a_fresh_network_predicts_nearly_zero():
    # DDPM's init scales the last conv of every block and the output conv by 1e-10.
    out = jitted_apply(BASE)(base_params(randomise=False), *inputs(BASE))
    assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32
    assert 0 < float(jnp.abs(out).max()) < 1e-3


def test_output_depends_on_the_whole_image_and_on_t():
    params = base_params()
    x, t = inputs(BASE)
    grad = jax.jit(jax.grad(lambda x: UNet(BASE).apply(params, x, t)[0, 0, 0, 0]))(x)
    assert np.all(np.abs(np.asarray(grad[0])).sum(-1) > 0)  # attention at 4x4: every pixel reaches the corner
    assert np.all(np.asarray(grad[1]) == 0)  # batch elements never mix
    a, b = jitted_apply(BASE)(params, x, t), jitted_apply(BASE)(params, x, t + 1)
    assert float(jnp.abs(a - b).max()) > 1e-4


def test_time_embedding_against_its_formula():
    t = np.array([0, 1, 17, 999])
    emb = np.asarray(timestep_embedding(jnp.asarray(t), 128), np.float64)
    k = np.arange(64)
    w = np.exp(-math.log(10_000) * k / 63)
    np.testing.assert_allclose(emb[:, :64], np.sin(t[:, None] * w), atol=2e-4)
    np.testing.assert_allclose(emb[:, 64:], np.cos(t[:, None] * w), atol=2e-4)
    assert timestep_embedding(jnp.asarray(t), 7).shape == (4, 7)
    assert np.all(timestep_embedding(jnp.asarray(t), 7)[:, -1] == 0)


def test_bf16_compute_is_close_to_f32():
    params, (x, t) = base_params(), inputs(BASE)
    out32 = jitted_apply(BASE)(params, x, t)
    out16 = jitted_apply(variant(dtype="bfloat16"))(params, x, t)
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert 0 < rel < 3e-2, rel  # bf16 has 8 bits of mantissa: errors of ~1e-2 are expected, not more


def test_remat_gives_the_same_outputs_and_gradients():
    params, (x, t) = base_params(), inputs(BASE)
    loss = lambda c: jax.jit(jax.value_and_grad(lambda p: jnp.sum(UNet(c).apply(p, x, t) ** 2)))(params)
    (v1, g1), (v2, g2) = loss(BASE), loss(variant(remat=True))
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g1))
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        # Some gradients are zero in exact arithmetic (a bias right before a GroupNorm): compare at the global scale.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    remat_shapes = jax.eval_shape(lambda k: init_params(variant(remat=True), k), jax.random.key(0))
    assert jax.tree_util.tree_structure(remat_shapes) == jax.tree_util.tree_structure(params)  # same checkpoints


def test_dropout_acts_only_in_training_mode():
    cfg = variant(dropout=0.3)
    params, (x, t) = base_params(), inputs(BASE)  # dropout has no parameters
    evaluate, train = jitted_apply(cfg), jitted_apply(cfg, train=True)
    eval_a, eval_b = evaluate(params, x, t), evaluate(params, x, t)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = train(params, x, t, rngs={"dropout": jax.random.key(0)})
    train_b = train(params, x, t, rngs={"dropout": jax.random.key(1)})
    assert float(jnp.abs(train_a - train_b).max()) > 1e-4
    assert float(jnp.abs(train_a - eval_a).max()) > 1e-4
    without = jitted_apply(BASE, train=True)(params, x, t, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_allclose(without, eval_a, rtol=1e-5, atol=1e-6)


def test_class_conditioning_and_the_null_class():
    params, (x, t) = base_params(), inputs(BASE)
    assert params["params"]["class_embed"]["embedding"].shape == (11, 4 * BASE.ch)  # 10 classes + the null class
    apply = jitted_apply(BASE)
    a, b = apply(params, x, t, jnp.array([1, 1])), apply(params, x, t, jnp.array([2, 2]))
    assert float(jnp.abs(a - b).max()) > 1e-4
    np.testing.assert_array_equal(apply(params, x, t), apply(params, x, t, jnp.array([10, 10])))
    unconditional = variant(num_classes=None)
    with pytest.raises(ValueError, match="unconditional"):
        UNet(unconditional).apply(params, x, t, jnp.array([1, 1]))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_attention_against_its_formula(dtype, tol):
    # jax.nn.dot_product_attention (XLA's here; cuDNN's on a GPU in half precision) against softmax(q k^T / sqrt(d)) v
    # per head, computed in float64.
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 16, 4, 8)) for _ in range(3))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", weights, v)
    out = attention(*(jnp.asarray(a, dtype) for a in (q, k, v)))
    assert out.shape == expected.shape and out.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=tol * np.abs(expected).max())


def test_multi_head_attention_differs_from_one_head():
    params, (x, t) = base_params(), inputs(BASE)
    one, heads = jitted_apply(BASE)(params, x, t), jitted_apply(variant(head_dim=16))(params, x, t)
    assert float(jnp.abs(one - heads).max()) > 1e-5


def test_bad_configs_fail_before_any_compile():
    with pytest.raises(ValueError, match=r"image_size 30 is not divisible by 2\^\(levels - 1\) = 4"):
        UNetConfig(image_size=30, ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="not divisible by num_groups=32"):
        UNetConfig(ch=48)
    with pytest.raises(ValueError, match=r"attn_resolutions \[12\] match no level.*\[32, 16, 8, 4\]"):
        UNetConfig(attn_resolutions=(12,))
    with pytest.raises(ValueError, match="Unknown dtype"):
        UNetConfig(dtype="float16")
    with pytest.raises(ValueError, match="dropout"):
        UNetConfig(dropout=1.0)
    with pytest.raises(ValueError, match="head_dim"):
        UNetConfig(head_dim=48)
    cfg, params = BASE, base_params()
    with pytest.raises(ValueError, match=r"expects images \[B, 8, 8, 3\]"):
        UNet(cfg).apply(params, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="timesteps of shape"):
        UNet(cfg).apply(params, jnp.zeros((2, 8, 8, 3)), jnp.zeros((3,), jnp.int32))


def test_config_is_hashable_and_normalises_lists():
    a = UNetConfig(ch_mult=[1, 2, 2, 2], attn_resolutions=[16])
    assert a == UNetConfig() and hash(a) == hash(UNetConfig())
