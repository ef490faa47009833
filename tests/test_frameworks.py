"""docs/frameworks.md's recipes run as written, and what they show holds.

Each recipe (a Flax NNX network, jaxdiff's Linen UNet bridged to NNX, an Equinox network) is the page's code block,
run in a fresh namespace: the page cannot drift from what is tested. The tests then check the results: training
lowers the loss, the loss is the hand-written DDPM objective, sampling is a deterministic function of the key, and
the bridged UNet computes exactly what the Linen UNet does.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.samplers import ddim_sample

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "frameworks.md"
NNX_SECTION = "## A Flax NNX network"
BRIDGE_SECTION = "## jaxdiff's UNet in NNX code"
EQX_SECTION = "## An Equinox network"
STEPS, K = 100, 10  # the recipes' training steps; the losses averaged at each end


def code_block(section: str) -> str:
    """The one ```python block under the ``## section`` heading of the page."""
    body = PAGE.read_text().split(section + "\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", body, flags=re.M | re.S)
    assert len(blocks) == 1, f"{section!r} should hold one python block, found {len(blocks)}"
    return blocks[0]


def run_recipe(section: str) -> dict:
    namespace = {"__name__": "frameworks_recipe"}
    exec(compile(code_block(section), f"{PAGE.name}: {section}", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def nnx_recipe():
    return run_recipe(NNX_SECTION)


@pytest.fixture(scope="module")
def bridge_recipe():
    return run_recipe(BRIDGE_SECTION)


@pytest.fixture(scope="module")
def eqx_recipe():
    pytest.importorskip("equinox")
    return run_recipe(EQX_SECTION)


def hand_loss(schedule, model, x0, t, noise) -> float:
    """mean ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2, written from the DDPM paper (eq. 14)."""
    abar = np.asarray(schedule.alphas_cumprod)[np.asarray(t)].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(abar) * np.asarray(x0) + np.sqrt(1.0 - abar) * np.asarray(noise)
    eps_theta = np.asarray(model(jnp.asarray(x_t, jnp.float32), t), np.float64)
    return float(np.mean(np.square(np.asarray(noise, np.float64) - eps_theta)))


def assert_loss_goes_down(losses):
    losses = np.asarray(losses)
    assert losses.shape == (STEPS,) and np.isfinite(losses).all()
    first, last = losses[:K].mean(), losses[-K:].mean()
    assert last < 0.5 * first, f"mean of the last {K} losses {last:.3f} is not under half the first {K}'s {first:.3f}"


def test_the_page_is_one_titled_page_with_a_block_per_recipe():
    text = PAGE.read_text()
    assert re.findall(r"^# .*$", text, flags=re.M) == ["# Using your own network"]
    for section in (NNX_SECTION, BRIDGE_SECTION, EQX_SECTION):
        assert "import jaxdiff" in code_block(section)  # each block is a whole script


# --------------------------------------------------------------------------------------------------------------------
# Flax NNX


def test_nnx_training_lowers_the_loss(nnx_recipe):
    assert_loss_goes_down(nnx_recipe["losses"])


def test_nnx_first_loss_is_the_eps_mse_of_the_initial_network(nnx_recipe):
    nnx = nnx_recipe["nnx"]
    initial = nnx_recipe["EpsNet"](rngs=nnx.Rngs(0))  # the recipe's model before its first update
    expected = hand_loss(nnx_recipe["schedule"], initial, *nnx_recipe["batch_at"](0))
    np.testing.assert_allclose(nnx_recipe["losses"][0], expected, rtol=1e-5)
    assert expected > 0.5  # the untrained network is far from the noise: the comparison is not of two zeros


def test_nnx_samples_are_images_and_a_function_of_the_key(nnx_recipe):
    model, sample, samples = nnx_recipe["model"], nnx_recipe["sample"], np.asarray(nnx_recipe["samples"])
    assert samples.shape == (16, 8, 8, 1) and samples.dtype == np.float32
    assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0
    np.testing.assert_array_equal(np.asarray(sample(model, jax.random.key(1))), samples)
    eager = ddim_sample(nnx_recipe["sampling"], model, samples.shape, jax.random.key(1))  # no nnx.jit around it
    np.testing.assert_allclose(np.asarray(eager), samples, atol=1e-5)
    other = np.asarray(sample(model, jax.random.key(2)))
    assert np.abs(other - samples).max() > 0.1


# --------------------------------------------------------------------------------------------------------------------
# jaxdiff's Linen UNet through nnx.bridge.ToNNX


def test_bridged_unet_equals_the_linen_unet_at_the_loaded_parameters(bridge_recipe):
    np.testing.assert_array_equal(np.asarray(bridge_recipe["out_nnx"]), np.asarray(bridge_recipe["out_linen"]))
    loaded, back = bridge_recipe["params"], bridge_recipe["params_back"]
    assert jax.tree.structure(back) == jax.tree.structure(loaded)
    jax.tree.map(np.testing.assert_array_equal, back, loaded)
    nnx = bridge_recipe["nnx"]
    assert not jax.tree.leaves(nnx.state(bridge_recipe["unet"], nnx.Not(nnx.Param)))  # no random state kept


def test_bridged_unet_equals_the_linen_unet_at_random_parameters(bridge_recipe):
    # init_params makes the output layer near zero, so the recipe's outputs are ~1e-5: load parameters that are not.
    unet, linen_unet, x, t = (bridge_recipe[name] for name in ("unet", "linen_unet", "x", "t"))
    rng = np.random.default_rng(7)  # numpy: jax.random would compile a kernel for each parameter shape
    params = jax.tree.map(
        lambda p: p + np.float32(0.3) * rng.standard_normal(p.shape, np.float32), bridge_recipe["params"]
    )
    bridge_recipe["load_params"](unet, params)
    out_linen = np.asarray(linen_unet.apply(params, x, t))
    assert np.abs(out_linen).max() > 0.1
    np.testing.assert_array_equal(np.asarray(unet(x, t)), out_linen)


def test_bridged_unet_runs_dropout_from_an_nnx_rngs(bridge_recipe):
    unet, linen_unet, x, t = (bridge_recipe[name] for name in ("unet", "linen_unet", "x", "t"))
    nnx = bridge_recipe["nnx"]
    key = jax.random.key(3)
    params = {"params": nnx.to_pure_dict(nnx.state(unet, nnx.Param))}
    train = np.asarray(unet(x, t, rngs=nnx.Rngs(dropout=key), train=True))
    expected = linen_unet.apply(params, x, t, train=True, rngs={"dropout": jax.random.fold_in(key, 0)})
    np.testing.assert_array_equal(train, np.asarray(expected))  # nnx.Rngs' first draw is fold_in(key, 0)
    assert not np.array_equal(train, np.asarray(unet(x, t)))


@pytest.mark.slow
def test_bridge_lazy_init_draws_linen_parameters_that_give_linen_outputs():
    # The recipe's other route: lazy_init outside eval_shape runs Linen's init op by op (~10 s even for this UNet).
    from flax import nnx

    config = jaxdiff.UNetConfig(
        image_size=8, in_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), num_groups=4
    )
    linen_unet = jaxdiff.UNet(config)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([3, 700])
    unet = nnx.bridge.ToNNX(linen_unet, rngs=nnx.Rngs(0)).lazy_init(x, t)
    params = {"params": nnx.to_pure_dict(nnx.state(unet, nnx.Param))}
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(params) == shapes(jaxdiff.init_params(config, jax.random.key(0)))
    np.testing.assert_array_equal(np.asarray(unet(x, t)), np.asarray(linen_unet.apply(params, x, t)))


# --------------------------------------------------------------------------------------------------------------------
# Equinox


def test_equinox_training_lowers_the_loss(eqx_recipe):
    assert_loss_goes_down(eqx_recipe["losses"])


def test_equinox_first_loss_is_the_eps_mse_of_the_initial_network(eqx_recipe):
    initial = eqx_recipe["EpsNet"](jax.random.key(0))  # the recipe's model before its first update
    expected = hand_loss(eqx_recipe["schedule"], initial, *eqx_recipe["batch_at"](0))
    np.testing.assert_allclose(eqx_recipe["losses"][0], expected, rtol=1e-5)
    assert expected > 0.5


def test_equinox_model_samples_with_ddim(eqx_recipe):
    eqx = eqx_recipe["eqx"]
    sampling = jaxdiff.samplers.sampling_schedule("linear", 1000, steps=20)
    sample = eqx.filter_jit(lambda model, key: ddim_sample(sampling, model, (4, 8, 8, 1), key))
    samples = np.asarray(sample(eqx_recipe["model"], jax.random.key(1)))
    assert samples.shape == (4, 8, 8, 1) and np.isfinite(samples).all() and np.abs(samples).max() <= 1.0
    np.testing.assert_array_equal(np.asarray(sample(eqx_recipe["model"], jax.random.key(1))), samples)
