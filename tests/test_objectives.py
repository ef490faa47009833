"""Beyond DDPM's objective (issue #34): zero terminal SNR, offset noise, EDM and flow matching, each against a closed
form (Gaussian data, where every denoiser, velocity and probability-flow end point is known exactly), not against
jaxdiff's own code."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import diffusion, edm, flow, parallel, pipeline, samplers, schedules
from jaxdiff.errors import ConfigError
from jaxdiff.models.unet import UNetConfig, init_params
from jaxdiff.spec import DiffusionConfig, ModelSpec

S = 0.5  # the data's std: x_0 ~ N(0, S^2 I)


def slope(steps, errors):
    """The fitted order: -d log(error) / d log(steps)."""
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Zero terminal SNR (Lin et al. 2024)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_rescaled_chain_ends_at_pure_noise_with_its_first_level_kept(name):
    betas = schedules.beta_schedule(name, 1000)
    rescaled = schedules.rescale_zero_terminal_snr(betas)
    root, new_root = np.sqrt(np.cumprod(1 - betas)), np.sqrt(np.cumprod(1 - rescaled))
    assert new_root[-1] == 0.0 and rescaled[-1] == 1.0
    assert new_root[0] == root[0]
    # Lin et al.'s Algorithm 1: sqrt(abar') = (sqrt(abar) - sqrt(abar_T)) sqrt(abar_1) / (sqrt(abar_1) - sqrt(abar_T))
    affine = (root - root[-1]) * root[0] / (root[0] - root[-1])
    np.testing.assert_allclose(new_root, affine, rtol=1e-12, atol=1e-15)
    schedule = schedules.Schedule.from_betas(rescaled)
    assert float(schedule.alphas_cumprod[-1]) == 0.0 and float(schedule.snr[-1]) == 0.0


def test_trailing_spacing_is_lin_et_al_table_2():
    # Lin et al. 2024, Table 2: trailing, 10 of 1000 steps (0-indexed).
    assert schedules.space_timesteps(1000, 10, "trailing").tolist() == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    for spacing in ("even", "quadratic", "trailing", "logsnr", "karras"):  # every grid starts at pure noise
        grid = schedules.respaced(
            schedules.rescale_zero_terminal_snr(schedules.beta_schedule("linear", 1000)), 20, spacing
        )
        assert int(grid.timestep_map[-1]) == 999 and float(grid.alphas_cumprod[-1]) == 0.0


def test_eps_prediction_is_refused_with_zero_terminal_snr():
    with pytest.raises(ConfigError, match="prediction='v'"):
        DiffusionConfig(zero_terminal_snr=True, prediction="eps")
    assert DiffusionConfig(zero_terminal_snr=True, prediction="v").betas()[-1] == 1.0


def exact_v_model(schedule):
    """The exact v of Gaussian data at the schedule's (original) timesteps: E[v | x_t]."""
    abar_of = lambda t: jnp.take(schedule.alphas_cumprod, t)[:, None]

    def model_fn(x, timesteps):
        abar = abar_of(timesteps)
        var = abar * S**2 + 1 - abar
        x0 = jnp.sqrt(abar) * S**2 / var * x
        eps = jnp.sqrt(1 - abar) / var * x
        return jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0

    return model_fn


@pytest.mark.parametrize("sampler, order", [("ddim", 1.0), ("dpm++2m", 2.0), ("heun", 2.0)])
def test_samplers_from_pure_noise_land_on_the_probability_flow_end_point(sampler, order):
    """On the rescaled chain x_T = eps exactly; the ODE keeps each point's quantile, so it ends at S eps. Each solver
    gets there at its order although its first step starts from an infinite noise level (measured: DDIM 0.12, 0.061,
    0.031; DPM-Solver++ 2M 0.022, 0.0056, 0.0012; Heun 0.20, 0.041, 0.0092 at 25, 50, 100 steps)."""
    betas = schedules.rescale_zero_terminal_snr(schedules.beta_schedule("linear", 1000))
    model_fn = exact_v_model(schedules.Schedule.from_betas(betas))
    z = jax.random.normal(jax.random.key(0), (16, 4))
    errors = []
    for steps in (25, 50, 100):
        schedule = schedules.respaced(betas, steps, samplers.DEFAULT_SPACINGS[sampler])
        kwargs = dict(prediction="v", clip_x0=False, x_T=z)
        if sampler == "ddim":
            x = samplers.ddim_sample(schedule, model_fn, z.shape, jax.random.key(1), **kwargs)
        elif sampler == "heun":
            x = samplers.heun_sample(schedule, model_fn, z.shape, jax.random.key(1), **kwargs)
        else:
            x = samplers.dpm_solver_sample(schedule, model_fn, z.shape, jax.random.key(1), **kwargs)
        assert bool(jnp.all(jnp.isfinite(x)))
        errors.append(float(jnp.abs(x - S * z).max()))
    assert abs(slope([25, 50, 100], errors) - order) < 0.35, errors


def test_ancestral_sampling_of_the_rescaled_chain_has_the_data_variance():
    betas = schedules.rescale_zero_terminal_snr(schedules.beta_schedule("cosine", 100))
    schedule = schedules.Schedule.from_betas(betas)
    x = samplers.ddpm_sample(
        schedule, exact_v_model(schedule), (20000, 2), jax.random.key(3), prediction="v", clip_x0=False
    )
    assert abs(float(jnp.std(x)) - S) < 0.02  # sd of the estimate ~0.003


# ---------------------------------------------------------------------------------------------------------------------
# Offset noise


def test_offset_noise_adds_its_variance_to_each_channel_mean():
    strength, shape = 0.1, (4000, 8, 8, 3)
    noise = jax.random.normal(jax.random.key(0), shape)
    shifted = diffusion.offset_noise(noise, jax.random.key(1), strength)
    means = jnp.mean(shifted, axis=(1, 2)).ravel()  # 12,000 per-image, per-channel means
    expected = 1 / 64 + strength**2
    # The variance of a variance estimate from n normal draws has relative sd sqrt(2 / n) = 1.3%: 5 sd.
    assert abs(float(jnp.var(means)) / expected - 1) < 5 * np.sqrt(2 / means.size)
    # each pixel's noise stays unit-variance up to the strength: var = 1 + strength^2
    assert abs(float(jnp.var(shifted)) - (1 + strength**2)) < 0.01


# ---------------------------------------------------------------------------------------------------------------------
# EDM (Karras et al. 2022)


def test_edm_target_has_unit_variance_at_every_sigma():
    """For data of std sigma_data the preconditioned target (x_0 - c_skip x) / c_out has variance 1 at any sigma
    (Karras et al., appendix B.6)."""
    key0, key1 = jax.random.split(jax.random.key(0))
    x0 = S * jax.random.normal(key0, (200_000,))
    noise = jax.random.normal(key1, (200_000,))
    for sigma in (0.002, 0.05, 0.5, 3.0, 80.0):
        target = edm.training_target(x0[:, None], noise[:, None], jnp.full((200_000,), sigma), sigma_data=S)
        assert abs(float(jnp.var(target)) - 1.0) < 0.015  # relative sd of the estimate 0.3%


def test_preconditioning_turns_the_exact_network_into_the_ideal_denoiser():
    """For Gaussian data of std sigma_data the ideal denoiser is sigma_data^2 / (sigma^2 + sigma_data^2) x, which is
    c_skip x: the exact F is 0, and D built around it is the ideal one, at every sigma."""
    x = jax.random.normal(jax.random.key(2), (5, 3))
    sigma = jnp.array([0.01, 0.3, 1.0, 7.0, 80.0])
    zero_net = lambda x_in, label: jnp.zeros_like(x_in)
    ideal = S**2 / (sigma[:, None] ** 2 + S**2) * x
    np.testing.assert_allclose(edm.denoise(zero_net, x, sigma, S), ideal, rtol=1e-6)
    # lambda(sigma) c_out^2 = 1: the F-space loss is the weighted D-space loss
    c = edm.preconditioning(sigma, S)
    np.testing.assert_allclose(edm.loss_weight(sigma, S) * c.c_out**2, 1.0, rtol=1e-6)


def test_edm_loss_is_the_weighted_denoising_error():
    keys = jax.random.split(jax.random.key(4), 3)
    x0, noise = jax.random.normal(keys[0], (6, 4, 4, 1)), jax.random.normal(keys[1], (6, 4, 4, 1))
    sigma = edm.draw_sigmas(keys[2], 6)
    net = lambda x_in, label: jnp.tanh(x_in) * (1 + label[:, None, None, None] / 1000)
    d = edm.denoise(net, x0 + sigma[:, None, None, None] * noise, sigma, S)
    direct = edm.loss_weight(sigma, S) * diffusion.mean_flat(jnp.square(d - x0))
    np.testing.assert_allclose(edm.edm_loss(net, x0, noise, sigma, S), direct, rtol=2e-4)


def test_edm_sampler_reaches_the_closed_form_at_second_order():
    ideal = lambda x, sigma: S**2 / (S**2 + sigma[:, None] ** 2) * x
    z = jax.random.normal(jax.random.key(0), (32, 3))
    end = 80.0 * z * S / np.sqrt(S**2 + 80.0**2)  # the ODE keeps the quantile: x_0 = x_T S / sqrt(S^2 + sigma_max^2)
    steps = np.array([10, 20, 40, 80])
    errors = [float(jnp.abs(edm.edm_sample(ideal, z.shape, None, edm.sigma_grid(n), x_T=z) - end).max()) for n in steps]
    assert 1.8 < slope(steps, errors) < 2.6, errors


def test_edm_churn_keeps_the_data_distribution():
    ideal = lambda x, sigma: S**2 / (S**2 + sigma[:, None] ** 2) * x
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(20000))
    x = edm.edm_sample(ideal, (20000, 2), keys, edm.sigma_grid(40), s_churn=40.0)
    assert abs(float(jnp.std(x)) - S) < 0.02


def test_edm_model_is_its_own_denoiser_through_the_chain():
    """An EDM network presented on its VP chain (edm.vp_model), read back as a denoiser at any sigma between the
    chain's levels (edm.denoiser), is the network's D at that sigma."""
    T, lo, hi = 50, 0.002, 80.0
    net = lambda x_in, label: jnp.sin(x_in) + label[:, None] / 300
    chain = schedules.Schedule.from_betas(edm.vp_betas(T, lo, hi))
    denoise_fn = edm.denoiser(chain, edm.vp_model(net, T, lo, hi, S), prediction="x0")
    x = jax.random.normal(jax.random.key(1), (4, 3))
    for sigma in (0.0031, 0.7, 12.5):
        s = jnp.full((4,), sigma)
        np.testing.assert_allclose(denoise_fn(x, s), edm.denoise(net, x, s, S), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Flow matching (Lipman et al. 2023; Liu et al. 2023)


def exact_velocity(x, t):
    """E[eps - x_0 | x_t] for x_0 ~ N(0, S^2): x_t ~ N(0, (1 - t)^2 S^2 + t^2)."""
    t = t[:, None]
    var = (1 - t) ** 2 * S**2 + t**2
    return (t - (1 - t) * S**2) / var * x


@pytest.mark.parametrize("method, order", [("euler", 1.0), ("heun", 2.0)])
def test_flow_solvers_reach_the_closed_form_at_their_order(method, order):
    z = jax.random.normal(jax.random.key(0), (32, 3))
    steps = np.array([10, 20, 40, 80])
    errors = [
        float(
            jnp.abs(
                flow.flow_sample(exact_velocity, z.shape, None, flow.time_grid(n), method=method, x_T=z) - S * z
            ).max()
        )
        for n in steps
    ]
    assert abs(slope(steps, errors) - order) < 0.25, errors


def test_velocity_is_v_prediction_on_the_vp_path():
    """u = eps - x_0 = (sin phi - cos phi) x^VP + (cos phi + sin phi) v, with x^VP = x_t / n."""
    keys = jax.random.split(jax.random.key(3), 3)
    x0, eps = jax.random.normal(keys[0], (7, 5)), jax.random.normal(keys[1], (7, 5))
    t = jax.random.uniform(keys[2], (7,))
    cos, sin = (a[:, None] for a in flow.vp_angles(t))
    np.testing.assert_allclose(cos**2 + sin**2, 1.0, rtol=1e-6)
    x_vp, v = cos * x0 + sin * eps, cos * eps - sin * x0
    np.testing.assert_allclose(flow.flow_path(x0, eps, t) / np.sqrt((1 - t) ** 2 + t**2)[:, None], x_vp, atol=1e-6)
    np.testing.assert_allclose(flow.velocity_from_v(x_vp, v, t), eps - x0, atol=2e-6)
    np.testing.assert_allclose(flow.v_from_velocity(x_vp, eps - x0, t), v, atol=2e-6)


def test_flow_model_is_its_own_velocity_through_the_chain():
    T = 40
    net = lambda x_t, label: jnp.cos(x_t) * label[:, None] / 1000
    chain = schedules.Schedule.from_betas(flow.vp_betas(T))
    assert float(chain.alphas_cumprod[-1]) == 0.0  # the path ends at pure noise
    velocity = flow.velocity(chain, flow.vp_model(net, T), prediction="v")
    x = jax.random.normal(jax.random.key(1), (4, 3))
    for t in (0.026, 0.4, 0.9, 0.975, 1.0):  # from the chain's first level, 1 / T, to its last finite one, and 1
        tt = jnp.full((4,), t)
        np.testing.assert_allclose(velocity(x, tt), net(x, 1000 * tt), rtol=1e-4, atol=1e-5)


def test_flow_loss_is_the_velocity_error():
    keys = jax.random.split(jax.random.key(6), 3)
    x0, eps = jax.random.normal(keys[0], (5, 4, 4, 1)), jax.random.normal(keys[1], (5, 4, 4, 1))
    t = flow.draw_times(keys[2], 5, "logit_normal")
    assert bool(jnp.all((t > 0) & (t < 1)))
    perfect = lambda x_t, label: eps - x0  # the conditional velocity itself
    np.testing.assert_allclose(flow.flow_loss(perfect, x0, eps, t), 0.0, atol=1e-12)


def test_path_configs_are_checked():
    with pytest.raises(ConfigError, match="own loss"):
        DiffusionConfig(process="edm", loss_type="hybrid", variance="learned")
    with pytest.raises(ConfigError, match="logit_normal"):
        DiffusionConfig(process="edm", t_sampling="logit_normal")
    with pytest.raises(ConfigError, match="zero_terminal_snr"):
        DiffusionConfig(process="flow", zero_terminal_snr=True)
    with pytest.raises(ConfigError, match="sigma_min"):
        DiffusionConfig(process="edm", sigma_min=1.0, sigma_max=0.5)
    assert DiffusionConfig(process="flow").sampled_prediction == "v"
    assert DiffusionConfig(process="edm").sampled_prediction == "x0"


def test_flow_euler_is_ddim_on_a_flow_models_chain():
    """Through the Pipeline, end to end: a flow model's Euler step in t from x_t lands on (1 - t') x0^ + t' eps^, and
    DDIM's from the same level on sqrt(abar') x0^ + sqrt(1 - abar') eps^, the same point (x_t = n(t) x^VP). On the
    trailing grid (t = 1, 0.9, ..., 0.1 of T = 100 levels) the two samplers agree image for image, for any network:
    here an untrained UNet with random weights."""
    network = UNetConfig(
        image_size=8, in_channels=1, ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4
    )
    spec = ModelSpec(network, DiffusionConfig(process="flow", num_timesteps=100), clip_x0=False)
    params = init_params(network, jax.random.key(0))  # its last layer starts at 0 (DDPM's init): move every weight
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    pipe = pipeline.from_spec(spec, params, "an untrained flow model")
    assert pipe.prediction == "v" and float(pipe.schedule.alphas_cumprod[-1]) == 0.0
    keys = parallel.example_keys(jax.random.key(1), jnp.arange(4))
    euler = pipeline.make_sampler(pipe, "flow-euler", 10)(pipe.params, keys)
    ddim = pipeline.make_sampler(pipe, "ddim", 10, spacing="trailing")(pipe.params, keys)
    assert float(jnp.std(euler)) > 0.1  # not a constant image
    np.testing.assert_allclose(euler, ddim, atol=2e-5)
    heun = pipeline.make_sampler(pipe, "flow-heun", 10)(pipe.params, keys)
    assert float(jnp.abs(heun - euler).max()) > 1e-3, float(jnp.abs(heun - euler).max())  # a different solver
    edm_spec = dataclasses.replace(spec, diffusion=DiffusionConfig(process="edm", num_timesteps=100))
    edm_pipe = pipeline.from_spec(edm_spec, pipe.params, "an untrained EDM model")
    assert edm_pipe.prediction == "x0" and float(edm_pipe.schedule.alphas_cumprod[-1]) > 0
