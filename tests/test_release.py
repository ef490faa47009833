"""Import of the DDPM authors' own weights: TF1 checkpoints written here with Ho et al.'s variable names, and the
PyTorch port's state dicts.

The reference is a forward pass written in TensorFlow ops in this file, reading the variables by name (``tf.nn.conv2d``
with TF's ``SAME`` padding, matmuls on ``[in, out]``, a group norm from ``tf.nn.moments``): it checks the name
mapping and the padding semantics independently of jaxdiff's import code.
"""

import math
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import commands, diffusion, pipeline
from jaxdiff.errors import JaxdiffError
from jaxdiff.models import UNet, release
from tests.helpers import ROOT

# A small configuration of Ho's UNet: 8x8 RGB, two levels (32, 64 channels), one block per level, attention at 4x4.
SMALL = dict(image_size=8, in_ch=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,))
GROUPS, EPS = 32, 1e-6
# Ho's learned variance (diffusion_utils_2.py, model_var_type 'learned'): 2C outputs, eps then the log-variance. One
# level, no attention: the smallest network that has every kind of variable the output layer needs.
LEARNED = dict(image_size=8, in_ch=3, ch=32, ch_mult=(1,), num_res_blocks=1, attn_levels=(), out_ch=6)


# ---------------------------------------------------------------------------------------------------------------------
# Ho's variables, written as his code lays them out (not from jaxdiff's mapping)


def release_shapes(in_ch, ch, ch_mult, num_res_blocks, attn_levels, out_ch=None, **_):
    """``{name: shape}`` of Ho's UNet variables (diffusion_tf/models/unet.py's scopes and layouts)."""
    shapes = {}

    def dense(scope, i, o):
        shapes[f"{scope}/W"], shapes[f"{scope}/b"] = (i, o), (o,)

    def conv(scope, i, o):
        shapes[f"{scope}/W"], shapes[f"{scope}/b"] = (3, 3, i, o), (o,)

    def norm(scope, c):
        shapes[f"{scope}/gamma"], shapes[f"{scope}/beta"] = (c,), (c,)

    def block(scope, i, o):
        norm(f"{scope}/norm1", i)
        conv(f"{scope}/conv1", i, o)
        dense(f"{scope}/temb_proj", 4 * ch, o)
        norm(f"{scope}/norm2", o)
        conv(f"{scope}/conv2", o, o)
        if i != o:
            dense(f"{scope}/nin_shortcut", i, o)

    def attn(scope, c):
        norm(f"{scope}/norm", c)
        for name in ("q", "k", "v", "proj_out"):
            dense(f"{scope}/{name}", c, c)

    dense("model/temb/dense0", ch, 4 * ch)
    dense("model/temb/dense1", 4 * ch, 4 * ch)
    conv("model/conv_in", in_ch, ch)
    skips, c = [ch], ch
    for i, mult in enumerate(ch_mult):
        for j in range(num_res_blocks):
            block(f"model/down_{i}/block_{j}", c, ch * mult)
            c = ch * mult
            if i in attn_levels:
                attn(f"model/down_{i}/attn_{j}", c)
            skips.append(c)
        if i != len(ch_mult) - 1:
            conv(f"model/down_{i}/downsample/conv", c, c)
            skips.append(c)
    block("model/mid/block_1", c, c)
    attn("model/mid/attn_1", c)
    block("model/mid/block_2", c, c)
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            block(f"model/up_{i}/block_{j}", c + skips.pop(), ch * ch_mult[i])
            c = ch * ch_mult[i]
            if i in attn_levels:
                attn(f"model/up_{i}/attn_{j}", c)
        if i != 0:
            conv(f"model/up_{i}/upsample/conv", c, c)
    norm("model/norm_out", c)
    conv("model/conv_out", c, out_ch or in_ch)
    return shapes


def random_weights(shapes, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("gamma"):
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif name.endswith("/W"):
            fan_in = math.prod(shape[:-1])
            out[name] = (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)
        else:
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def write_tf1_checkpoint(prefix, variables):
    """A TF1 checkpoint (graph mode, ``tf.compat.v1.train.Saver``) holding ``variables`` under their names."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        var_list = {
            name: tf.compat.v1.Variable(value, name=re.sub(r"[^A-Za-z0-9_./-]", "_", name))
            for name, value in variables.items()
        }
        saver = tf.compat.v1.train.Saver(var_list=var_list)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(prefix))
    return str(prefix)


def training_checkpoint(prefix, raw, ema):
    """Ho's checkpoint layout: raw weights, their EMA shadows, Adam's two slots, and the counters."""
    variables = dict(raw)
    variables.update({f"{n}/ExponentialMovingAverage": v for n, v in ema.items()})
    variables.update({f"{n}/Adam": np.zeros_like(v) for n, v in raw.items()})
    variables.update({f"{n}/Adam_1": np.ones_like(v) for n, v in raw.items()})
    variables.update(global_step=np.int64(790_000), beta1_power=np.float32(0.9), beta2_power=np.float32(0.99))
    return write_tf1_checkpoint(prefix, variables)


# ---------------------------------------------------------------------------------------------------------------------
# The reference: Ho's forward pass in TensorFlow ops, reading the variables by name


def tf_forward(w, x, t, ch, ch_mult, num_res_blocks, attn_levels, **_):
    import tensorflow as tf

    def dense(h, scope):
        return tf.matmul(h, w[f"{scope}/W"]) + w[f"{scope}/b"]

    def nin(h, scope):
        B, H, W, C = h.shape
        return tf.reshape(dense(tf.reshape(h, [B * H * W, C]), scope), [B, H, W, -1])

    def conv(h, scope, stride=1):
        return tf.nn.conv2d(h, w[f"{scope}/W"], strides=stride, padding="SAME") + w[f"{scope}/b"]

    def norm(h, scope):
        B, H, W, C = h.shape
        g = tf.reshape(h, [B, H, W, GROUPS, C // GROUPS])
        mean, var = tf.nn.moments(g, axes=[1, 2, 4], keepdims=True)
        g = (g - mean) / tf.sqrt(var + EPS)
        return tf.reshape(g, [B, H, W, C]) * w[f"{scope}/gamma"] + w[f"{scope}/beta"]

    def block(h, temb, scope):
        out = tf.nn.silu(norm(h, f"{scope}/norm1"))
        out = conv(out, f"{scope}/conv1")
        out += dense(tf.nn.silu(temb), f"{scope}/temb_proj")[:, None, None, :]
        out = conv(tf.nn.silu(norm(out, f"{scope}/norm2")), f"{scope}/conv2")
        if f"{scope}/nin_shortcut/W" in w:
            h = nin(h, f"{scope}/nin_shortcut")
        return h + out

    def attn(h, scope):
        B, H, W, C = h.shape
        n = norm(h, f"{scope}/norm")
        q, k, v = (nin(n, f"{scope}/{name}") for name in ("q", "k", "v"))
        logits = tf.einsum("bhwc,bHWc->bhwHW", q, k) * (int(C) ** -0.5)
        weights = tf.reshape(tf.nn.softmax(tf.reshape(logits, [B, H, W, H * W])), [B, H, W, H, W])
        return h + nin(tf.einsum("bhwHW,bHWc->bhwc", weights, v), f"{scope}/proj_out")

    half = ch // 2
    freqs = tf.exp(tf.range(half, dtype=tf.float32) * -(math.log(10000) / (half - 1)))
    args = tf.cast(t, tf.float32)[:, None] * freqs[None, :]
    temb = dense(tf.concat([tf.sin(args), tf.cos(args)], axis=1), "model/temb/dense0")
    temb = dense(tf.nn.silu(temb), "model/temb/dense1")
    hs = [conv(tf.constant(x), "model/conv_in")]
    for i in range(len(ch_mult)):
        for j in range(num_res_blocks):
            h = block(hs[-1], temb, f"model/down_{i}/block_{j}")
            if i in attn_levels:
                h = attn(h, f"model/down_{i}/attn_{j}")
            hs.append(h)
        if i != len(ch_mult) - 1:
            hs.append(conv(hs[-1], f"model/down_{i}/downsample/conv", stride=2))
    h = block(hs[-1], temb, "model/mid/block_1")
    h = block(attn(h, "model/mid/attn_1"), temb, "model/mid/block_2")
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            h = block(tf.concat([h, hs.pop()], axis=-1), temb, f"model/up_{i}/block_{j}")
            if i in attn_levels:
                h = attn(h, f"model/up_{i}/attn_{j}")
        if i != 0:
            size = 2 * h.shape[1]
            h = tf.image.resize(h, [size, size], method="nearest")
            h = conv(h, f"model/up_{i}/upsample/conv")
    h = conv(tf.nn.silu(norm(h, "model/norm_out")), "model/conv_out")
    return h.numpy()


# ---------------------------------------------------------------------------------------------------------------------
# The PyTorch port's layout, from Ho's (written here, independently of release.port_to_release_names)


def to_port_state_dict(weights):
    out = {}
    for name, value in weights.items():
        *scope, leaf = name.removeprefix("model/").split("/")
        path = ".".join(scope)
        path = re.sub(r"^temb\.dense(\d)", r"temb.dense.\1", path)
        path = re.sub(r"^(down|up)_(\d+)\.(block|attn)_(\d+)", r"\1.\2.\3.\4", path)
        path = re.sub(r"^(down|up)_(\d+)\.", r"\1.\2.", path)
        if leaf in ("gamma", "beta"):
            out[f"{path}.{'weight' if leaf == 'gamma' else 'bias'}"] = value
        elif leaf == "b":
            out[f"{path}.bias"] = value
        elif value.ndim == 4:  # HWIO -> OIHW
            out[f"{path}.weight"] = np.ascontiguousarray(value.transpose(3, 2, 0, 1))
        elif scope[0] == "temb" or scope[-1] == "temb_proj":  # nn.Linear: [out, in]
            out[f"{path}.weight"] = np.ascontiguousarray(value.T)
        else:  # a 1x1 conv: [out, in, 1, 1]
            out[f"{path}.weight"] = np.ascontiguousarray(value.T[:, :, None, None])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def small_release(tmp_path_factory):
    """A training checkpoint of the small configuration: raw and EMA weights that differ, Adam slots, counters."""
    shapes = release_shapes(**SMALL)
    raw, ema = random_weights(shapes, seed=1), random_weights(shapes, seed=2)
    prefix = training_checkpoint(tmp_path_factory.mktemp("release") / "model.ckpt-790000", raw, ema)
    return prefix, raw, ema


def inputs(batch=3, size=8, channels=3):
    x = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, channels)).astype(np.float32)
    return x, np.array([0, 417, 999], np.int32)[:batch]


def relative_error(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "raw"])
def test_the_imported_network_is_hos_forward_pass_in_tensorflow(small_release, ema):
    prefix, raw, shadows = small_release
    pipe = pipeline.from_release(prefix, ema=ema, image_size=8)
    x, t = inputs()
    out = pipe.apply_fn(pipe.params, jnp.asarray(x), jnp.asarray(t), None)
    want = tf_forward(shadows if ema else raw, x, t, **SMALL)
    other = tf_forward(raw if ema else shadows, x, t, **SMALL)
    assert relative_error(out, want) < 1e-5
    assert relative_error(out, other) > 0.1  # it read the set it was asked for, not the other one
    assert ("EMA" if ema else "raw") in pipe.source
    # DDPM's chain and the variance of an unpublished architecture (fixed_large, as the CIFAR-10 model)
    assert pipe.num_timesteps == 1000 and pipe.prediction == "eps" and pipe.clip_x0
    np.testing.assert_allclose(pipe.betas[[0, -1]], [1e-4, 0.02])
    assert pipe.variance == "fixed_large" and pipe.data is None


def test_the_pytorch_ports_state_dict_gives_the_same_network_as_the_tf1_checkpoint(small_release):
    prefix, _, shadows = small_release
    tf1 = pipeline.from_release(prefix, image_size=8)
    weights = release.port_to_release_names(to_port_state_dict(shadows))
    config, _, name = release.infer_config(weights, image_size=8)
    params = release.convert_release_weights(weights, config)
    x, t = inputs()
    a = tf1.apply_fn(tf1.params, jnp.asarray(x), jnp.asarray(t), None)
    b = UNet(config).apply(params, jnp.asarray(x), jnp.asarray(t))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert name == "custom"


@pytest.mark.torch
def test_a_state_dict_file_of_the_port_loads_through_sample_py(small_release, tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="needs torch: pip install torch==2.13.0")
    prefix, _, shadows = small_release
    path = tmp_path / "model-790000.ckpt"
    torch.save({k: torch.from_numpy(v) for k, v in to_port_state_dict(shadows).items()}, path)
    port = pipeline.from_checkpoint(path, image_size=8)
    tf1 = pipeline.from_checkpoint(prefix, image_size=8)
    x, t = inputs()
    np.testing.assert_array_equal(
        np.asarray(port.apply_fn(port.params, jnp.asarray(x), jnp.asarray(t), None)),
        np.asarray(tf1.apply_fn(tf1.params, jnp.asarray(x), jnp.asarray(t), None)),
    )
    assert "PyTorch port" in port.source
    legacy = tmp_path / "legacy.ckpt"  # the format of torch.save before 1.6
    torch.save({"conv_in.weight": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"legacy \(pre-1.6\) format.*torch.save\(torch.load\(old\), new\)"):
        pipeline.from_checkpoint(legacy, image_size=8)
    request = commands.SampleRequest(
        pretrained=str(path),
        image_size=8,
        num_samples=4,
        batch_size=4,
        sampler="ddim",
        steps=3,
        out=str(tmp_path / "s"),
    )
    assert commands.sample(request) == 0
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["arr_0"].shape == (4, 8, 8, 3) and f["arr_0"].dtype == np.uint8


def test_sample_py_draws_from_a_tf1_checkpoint_with_either_weights(small_release, tmp_path):
    prefix, _, _ = small_release
    drawn = {}
    for ema in (True, False):
        out = tmp_path / str(ema)
        request = commands.SampleRequest(
            pretrained=prefix, ema=ema, image_size=8, num_samples=4, batch_size=4, sampler="ddim", steps=3, out=str(out)
        )
        assert commands.sample(request) == 0
        with np.load(out / "samples.npz") as f:
            drawn[ema] = f["arr_0"]
    assert drawn[True].shape == (4, 8, 8, 3)
    assert np.any(drawn[True] != drawn[False])  # same seed, other weights


@pytest.fixture(scope="module")
def learned_release(tmp_path_factory):
    """A training checkpoint of a network with Ho's learned variance: 6 output channels (eps, then log sigma^2)."""
    weights = random_weights(release_shapes(**LEARNED), seed=3)
    prefix = training_checkpoint(tmp_path_factory.mktemp("learned") / "model.ckpt-1000", weights, weights)
    return prefix, weights


def hos_learned_p(out, x, t, betas):
    """Ho's p(x_{t-1} | x_t) for eps prediction, a learned variance and clipping, in float64 NumPy from the network's
    output ``out`` [B, H, W, 2C]: (mean, variance), the variance exp(out[..., C:])."""
    eps, log_var = np.split(np.asarray(out, np.float64), 2, axis=-1)
    alphas_cumprod = np.cumprod(1 - betas)
    prev = np.append(1.0, alphas_cumprod[:-1])
    a, a_prev, beta = (v[t][:, None, None, None] for v in (alphas_cumprod, prev, betas))
    x0 = np.clip(np.sqrt(1 / a) * x - np.sqrt(1 / a - 1) * eps, -1, 1)
    mean = beta * np.sqrt(a_prev) / (1 - a) * x0 + (1 - a_prev) * np.sqrt(1 - beta) / (1 - a) * x
    return mean, np.exp(log_var)


def test_a_learned_variance_checkpoint_reads_its_log_variance_as_hos_code_does(learned_release):
    prefix, weights = learned_release
    pipe = pipeline.from_checkpoint(prefix, image_size=8)
    assert pipe.variance == "learned" and "custom architecture" in pipe.source
    x, t = inputs()
    out = pipe.apply_fn(pipe.params, jnp.asarray(x), jnp.asarray(t), None)
    reference = tf_forward(weights, x, t, **LEARNED)  # Ho's network in TF ops: [B, 8, 8, 6]
    assert out.shape == (3, 8, 8, 6) and relative_error(out, reference) < 1e-5
    p = diffusion.p_mean_variance(
        pipe.schedule, out, jnp.asarray(x), jnp.asarray(t), prediction="eps", variance=pipe.variance, clip_x0=True
    )
    mean, variance = hos_learned_p(reference, x, t, np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(np.asarray(p.variance), variance, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(p.log_variance), np.log(variance), atol=1e-5)
    np.testing.assert_allclose(np.asarray(p.mean), mean, atol=1e-4)
    assert np.ptp(np.log(variance)) > 1  # the variance is the network's, per pixel, not a schedule's constant
    # improved DDPM's interpolation fits the same 6 channels when asked for; a fixed variance does not.
    assert pipeline.from_checkpoint(prefix, image_size=8, variance="learned_range").variance == "learned_range"
    with pytest.raises(ValueError, match=r"^variance 'fixed_large' does not fit.*6 output channels.*learned or "):
        pipeline.from_checkpoint(prefix, image_size=8, variance="fixed_large")
    three = {**weights, "model/conv_out/W": weights["model/conv_out/W"][..., :3], "model/conv_out/b": np.zeros(3)}
    with pytest.raises(ValueError, match=r"'learned' does not fit.*3 output channels are eps only.*fixed_small or "):
        release.infer_config(three, image_size=8, variance="learned")
    four = {**weights, "model/conv_out/W": weights["model/conv_out/W"][..., :4]}
    with pytest.raises(ValueError, match=r"conv_out has 4 output channels for 3 image channels"):
        release.infer_config(four, image_size=8)
    with pytest.raises(ValueError, match="--variance applies to --pretrained"):
        commands.SampleRequest(workdir="run", variance="learned")
    with pytest.raises(ValueError, match=r"a diffusers model samples with its scheduler_config\.json's variance_type"):
        pipeline.from_checkpoint("google/ddpm-cifar10-32", variance="learned")  # refused before any download


def test_sample_py_samples_a_learned_variance_checkpoint_and_refuses_a_variance_that_does_not_fit(
    learned_release, tmp_path, subprocess_env
):
    prefix, _ = learned_release
    command = [sys.executable, str(ROOT / "sample.py"), f"--pretrained={prefix}", "--image_size=8", "--num_samples=2"]
    run = lambda *extra: subprocess.run(
        [*command, *extra], env=subprocess_env, capture_output=True, text=True, timeout=600
    )
    drawn = run("--batch_size=2", "--sampler=ddpm", "--steps=4", f"--out={tmp_path / 'out'}")
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    with np.load(tmp_path / "out" / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 8, 8, 3) and f["arr_0"].dtype == np.uint8
    refused = run("--variance=fixed_large", f"--out={tmp_path / 'refused'}")
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert lines[-1].startswith("sample.py: variance 'fixed_large' does not fit this network")
    assert "Traceback" not in refused.stderr and not (tmp_path / "refused").exists()


def test_the_published_architectures_map_every_parameter_to_one_release_variable():
    for name, (config, variance) in release.PUBLISHED.items():
        levels = tuple(i for i, r in enumerate(config.resolutions) if r in config.attn_resolutions)
        shapes = release_shapes(3, config.ch, config.ch_mult, config.num_res_blocks, levels)
        stand_ins = {n: np.broadcast_to(np.float32(0), s) for n, s in shapes.items()}
        inferred, inferred_variance, inferred_name = release.infer_config(stand_ins)
        assert (inferred, inferred_variance, inferred_name) == (config, variance, name)
        x = jnp.zeros((1, config.image_size, config.image_size, 3))
        import jax
        from flax import traverse_util

        target = jax.eval_shape(UNet(config).init, jax.random.key(0), x, jnp.zeros((1,), jnp.int32))["params"]
        mapped = [release.release_name(p, len(config.ch_mult)) for p in traverse_util.flatten_dict(target)]
        assert sorted(mapped) == sorted(shapes)  # each variable exactly once
    assert release.PUBLISHED["cifar10"][0].image_size == 32 and release.PUBLISHED["cifar10"][1] == "fixed_large"


def test_errors_name_the_missing_unexpected_and_mis_shaped_variables(small_release, tmp_path):
    _, raw, _ = small_release
    config, _, _ = release.infer_config(raw, image_size=8)
    broken = dict(raw)
    del broken["model/mid/attn_1/q/W"]
    broken["model/mid/block_9/conv1/W"] = np.zeros((3, 3, 64, 64), np.float32)
    broken["model/conv_in/b"] = np.zeros((31,), np.float32)
    with pytest.raises(ValueError) as e:
        release.convert_release_weights(broken, config)
    message = str(e.value)
    assert "missing: model/mid/attn_1/q/W" in message
    assert "unexpected: model/mid/block_9/conv1/W" in message
    assert "model/conv_in/b: checkpoint (31,) vs model (32,)" in message
    with pytest.raises(ValueError, match=r"none of the published ones.*Pass image_size"):
        release.infer_config(raw)
    with pytest.raises(ValueError, match=r"published cifar10 architecture.*image_size=64"):
        shapes = release_shapes(3, 128, (1, 2, 2, 2), 2, (1,))
        release.infer_config({n: np.broadcast_to(np.float32(0), s) for n, s in shapes.items()}, image_size=64)


def test_a_checkpoint_without_shadows_says_to_load_the_raw_weights(small_release, tmp_path):
    _, raw, _ = small_release
    prefix = write_tf1_checkpoint(tmp_path / "model.ckpt-1", {**raw, "model/extra_thing": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match=r"no ExponentialMovingAverage shadow.*ema=False \(jaxdiff-sample --noema\)"):
        pipeline.from_release(prefix, image_size=8)
    with pytest.raises(ValueError, match="unexpected: model/extra_thing"):
        pipeline.from_release(prefix, ema=False, image_size=8)
    with pytest.raises(FileNotFoundError, match="neither a TF1 checkpoint"):
        pipeline.from_release(tmp_path / "model.ckpt-2")
    request = commands.SampleRequest(pretrained=str(tmp_path / "model.ckpt-1"), num_samples=2, out=str(tmp_path / "o"))
    with pytest.raises(JaxdiffError, match="no ExponentialMovingAverage shadow"):  # before anything compiles
        commands.sample(request)
    with pytest.raises(ValueError, match="--noema and --image_size apply to --pretrained"):
        commands.SampleRequest(workdir=str(tmp_path), ema=False)


def test_the_cifar10_reproduction_runs_end_to_end_on_a_tiny_model(small_release, tmp_path):
    """benchmarks/reproduce_cifar10.py's smoke run: the small TF1 checkpoint (8x8: the mock CIFAR-10 test images are
    resized to its size), a precomputed reference, 4 samples."""
    import importlib.util
    import json

    import tensorflow_datasets as tfds

    from tests.helpers import ROOT, fid_helper_weights

    weights_file = fid_helper_weights()
    prefix = small_release[0]
    rng = np.random.default_rng(0)
    features = rng.standard_normal((4096, 2048))
    np.savez(tmp_path / "ref.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    spec = importlib.util.spec_from_file_location("reproduce_cifar10", ROOT / "benchmarks" / "reproduce_cifar10.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out_json, out_table = tmp_path / "r.json", tmp_path / "r.md"
    argv = [f"--checkpoint={prefix}", "--image_size=8", "--num_samples=4", "--batch_size=4", "--ddim_steps=10"]
    argv += ["--bpd_images=2", "--bpd_batch=2", f"--reference_stats={tmp_path / 'ref.npz'}"]
    argv += [f"--inception_weights={weights_file}", f"--json={out_json}", f"--table={out_table}"]
    # Under mock_data, TFDS's download_and_prepare does nothing: --download only lets the mock split be "prepared".
    with tfds.testing.mock_data(num_examples=4, data_dir=str(tmp_path / "data")):
        assert script.main([*argv, f"--data_dir={tmp_path / 'data'}", "--download"]) == 0
    result = json.loads(out_json.read_text())
    assert result["ddpm"]["steps"] == 1000 and result["ddpm"]["num_samples"] == 4
    assert [row["steps"] for row in result["ddim"]] == [10] and result["ddim"][0]["spacing"] == "quadratic"
    assert result["reference"] == str(tmp_path / "ref.npz") and "EMA weights" in result["model"]
    assert result["bits_per_dim"]["num_examples"] == 2
    terms = result["bits_per_dim"]["bits_per_dim"]
    assert terms["total"] == pytest.approx(terms["prior"] + terms["denoising"] + terms["reconstruction"], rel=1e-6)
    assert np.isfinite(result["ddpm"]["fid"])
    assert result["ddpm"]["inception_score"] is None  # fid-helper's weights end at the pool features: no classifier
    table = out_table.read_text()
    assert "| DDPM 1000 steps, FID | 4 |" in table and "| 3.17 |" in table and "| 13.36 |" in table


def test_the_ema_weights_on_disk_are_found_where_the_release_unpacks_them(small_release, tmp_path, monkeypatch):
    prefix, _, _ = small_release
    monkeypatch.setenv("JAXDIFF_CACHE", str(tmp_path / "cache"))
    assert release.local_release("cifar10") is None
    port = tmp_path / "cache" / "ddpm" / "ema_diffusion_cifar10_model" / "model-790000.ckpt"
    port.parent.mkdir(parents=True)
    port.write_bytes(b"")
    assert release.local_release("cifar10") == port
    folder = tmp_path / "cache" / "ddpm" / "diffusion_cifar10_model"
    folder.mkdir()
    for path in pathlib.Path(prefix).parent.glob("model.ckpt-790000*"):
        (folder / path.name).write_bytes(path.read_bytes())
    found = release.local_release("cifar10")  # the TF1 release first (its EMA shadows); no 'checkpoint' file: newest
    assert found == folder / "model.ckpt-790000"
    assert "EMA weights" in pipeline.from_checkpoint(found, image_size=8).source


def test_a_tensor_that_reads_past_its_storage_is_refused(tmp_path):
    """A crafted .pth: its pickle asks for 64 floats of a 4-float storage (as_strided would read past the buffer)."""
    import pickle
    import zipfile

    from jaxdiff.models import torch_files

    storage = np.arange(4, dtype=np.float32)
    with pytest.raises(pickle.UnpicklingError, match=r"reads element 63 of a storage of 4"):
        torch_files._rebuild_tensor(storage, 0, (64,), (1,))
    with pytest.raises(pickle.UnpicklingError, match="not a valid view"):
        torch_files._rebuild_tensor(storage, 0, (2,), (-1,))
    np.testing.assert_array_equal(torch_files._rebuild_tensor(storage, 1, (2, 1), (2, 1)), [[1.0], [3.0]])

    # The pickle torch.save would write for {"w": a tensor of 64 floats at storage "0"}, by its opcodes; the storage
    # holds 4 floats.
    text = lambda s: b"X" + len(s).to_bytes(4, "little") + s.encode()
    pid = b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu") + b"K\x04tQ"
    args = b"(" + pid + b"K\x00" + b"K@\x85" + b"K\x01\x85" + b"\x89N" + b"t"
    data = b"\x80\x02}" + text("w") + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"Rs."
    path = tmp_path / "crafted.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/data/0", storage.tobytes())
    with pytest.raises(ValueError, match="reads element 63 of a storage of 4"):
        torch_files.read_tensors(path)
