import importlib
import math
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.pipeline import DiffusionConfig
from jaxdiff.schedules import (
    BETA_SCHEDULES,
    MAX_FINAL_ALPHA_BAR,
    Schedule,
    beta_schedule,
    log_sigma_at,
    log_sigmas,
    make_schedule,
    respace,
    respaced,
    space_timesteps,
    timestep_at,
    truncated,
)
from tests.reference import cumulative_product

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", BETA_SCHEDULES)
@pytest.mark.parametrize("T", [1, 2, 10, 21, 1000])
def test_every_schedule_gives_T_betas_in_the_open_unit_interval(name, T):
    if name == "linear" and T <= 20:  # the default range scaled by 1000 / T would reach beta = 1
        with pytest.raises(ValueError, match=r"needs T > 20.*num_timesteps > 20, the cosine schedule"):
            beta_schedule(name, T)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The .* does not reach noise", UserWarning)  # short chains: tested below
        betas = beta_schedule(name, T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert np.all((betas > 0) & (betas < 1))
    Schedule.from_betas(betas)  # accepted


def test_linear_quadratic_constant_sigmoid_and_warmup_follow_their_definitions():
    T = 1000
    lin = beta_schedule("linear", T)
    assert lin[0] == 1e-4 and math.isclose(lin[-1], 0.02) and np.allclose(np.diff(lin), (0.02 - 1e-4) / (T - 1))
    quad = beta_schedule("quadratic", T)
    assert np.allclose(np.diff(np.sqrt(quad)), (math.sqrt(0.02) - math.sqrt(1e-4)) / (T - 1))
    assert np.all(beta_schedule("constant", T) == 0.02)
    sig = beta_schedule("sigmoid", T)
    logistic = (sig - 1e-4) / (0.02 - 1e-4)  # back to the logistic function on [-6, 6]
    assert np.allclose(np.log(logistic / (1 - logistic)), np.linspace(-6, 6, T))
    for name, frac in [("warmup10", 0.1), ("warmup50", 0.5)]:
        betas, n = beta_schedule(name, T), int(T * frac)
        assert np.allclose(betas[:n], np.linspace(1e-4, 0.02, n)) and np.all(betas[n:] == 0.02)


@pytest.mark.parametrize("T", [10, 1000, 4000])
def test_cosine_schedule_matches_its_formula(T):
    s = 0.008
    betas = beta_schedule("cosine", T)
    abar = cumulative_product(1.0 - betas)
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    expected = np.array([f(t / T) / f(0.0) for t in range(1, T + 1)])
    unclipped = betas < 0.999
    assert not unclipped[-1] and betas[-1] == 0.999  # the last beta is the clip
    np.testing.assert_allclose(abar[unclipped], expected[unclipped], rtol=1e-10)
    assert np.all(np.diff(betas) > 0)


def test_schedule_coefficients_against_float64_reference():
    betas = beta_schedule("linear", 1000)
    sched = Schedule.from_betas(betas)
    abar = cumulative_product(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    expected = {
        "betas": betas,
        "alphas": 1 - betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "alphas_cumprod_next": np.concatenate([abar[1:], [0.0]]),
        "sqrt_alphas_cumprod": abar**0.5,
        "sqrt_alphas_cumprod_prev": abar_prev**0.5,
        "sqrt_one_minus_alphas_cumprod": (1 - abar) ** 0.5,
        "log_one_minus_alphas_cumprod": np.log(1 - abar),
        "sqrt_recip_alphas_cumprod": abar**-0.5,
        "sqrt_recipm1_alphas_cumprod": (1 / abar - 1) ** 0.5,
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.concatenate([[post_var[1]], post_var[1:]])),
        "posterior_mean_coef1": abar_prev**0.5 * betas / (1 - abar),
        "posterior_mean_coef2": (1 - betas) ** 0.5 * (1 - abar_prev) / (1 - abar),
        "snr": abar / (1 - abar),
        "log_betas": np.log(betas),
    }
    for name, ref in expected.items():
        got = getattr(sched, name)
        assert got.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2e-6, atol=1e-30, err_msg=name)
    np.testing.assert_array_equal(sched.timestep_map, np.arange(1000))
    assert sched.num_timesteps == 1000
    assert sched.posterior_variance[0] == 0.0  # q(x_0 | x_1, x_0) is a point mass


def test_schedule_is_a_pytree_that_jit_accepts():
    sched = make_schedule("cosine", 50)
    leaves, treedef = jax.tree_util.tree_flatten(sched)
    assert len(leaves) == 19 and all(leaf.shape == (50,) for leaf in leaves)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.num_timesteps == 50
    got = jax.jit(lambda s, t: s.alphas_cumprod[t] * s.num_timesteps)(sched, 7)
    assert np.isclose(got, sched.alphas_cumprod[7] * 50)
    doubled = jax.tree_util.tree_map(lambda x: x * 2, sched)
    assert isinstance(doubled, Schedule) and np.allclose(doubled.betas, 2 * sched.betas)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("num_steps,spacing", [(1, "even"), (10, "even"), (50, "quadratic"), (250, "even")])
def test_respacing_keeps_abar_at_the_kept_steps(name, num_steps, spacing):
    betas = beta_schedule(name, 1000)
    kept = space_timesteps(1000, num_steps, spacing)
    sched = respace(betas, kept)
    assert sched.num_timesteps == num_steps
    np.testing.assert_array_equal(sched.timestep_map, kept)
    abar = cumulative_product(1 - betas)
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod, np.float64), abar[kept], rtol=2e-6)
    assert np.all((sched.betas > 0) & (sched.betas < 1))


def test_respacing_with_every_step_is_the_original_schedule():
    betas = beta_schedule("linear", 1000)
    full, same = Schedule.from_betas(betas), respace(betas, range(1000))
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(same), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("spacing", ["even", "quadratic"])
@pytest.mark.parametrize("num_steps", [1, 2, 25, 50, 100, 999, 1000])
def test_space_timesteps_gives_distinct_sorted_steps(spacing, num_steps):
    kept = space_timesteps(1000, num_steps, spacing)
    assert kept.shape == (num_steps,) and kept[0] == 0
    assert np.all(np.diff(kept) > 0) and kept[-1] <= 999
    if num_steps > 1:
        assert kept[-1] == 999 or spacing == "quadratic"
    if spacing == "quadratic" and 2 < num_steps < 100:
        assert np.all(np.diff(np.diff(kept)) >= -1)  # gaps grow (up to rounding): denser near t = 0


def test_bad_schedule_input_raises_clear_errors():
    with pytest.raises(ValueError, match=r"Unknown beta schedule 'cosin'.*linear, cosine"):
        beta_schedule("cosin", 10)
    for T in [0, -3, 2.5, True]:
        with pytest.raises(ValueError, match="num_timesteps"):
            beta_schedule("linear", T)
    for betas in [[0.1, 0.0], [1.0, 0.5], [0.5, 1.0, 0.5], [0.1, float("nan")], [-0.1], [1.2], []]:
        with pytest.raises(ValueError, match=r"betas must"):
            Schedule.from_betas(betas)
    # a beta of 1 only as the last: a chain with zero terminal SNR (abar_T = 0, issue #34)
    assert float(Schedule.from_betas([0.5, 1.0]).alphas_cumprod[-1]) == 0.0
    with pytest.raises(ValueError, match="1-D"):
        Schedule.from_betas(np.full((2, 2), 0.1))
    with pytest.raises(ValueError, match="timestep_map"):
        Schedule.from_betas([0.1, 0.2], timestep_map=[0])
    with pytest.raises(ValueError, match="distinct"):
        respace(beta_schedule("cosine", 10), [0, 3, 3])
    with pytest.raises(ValueError, match="distinct"):
        respace(beta_schedule("cosine", 10), [0, 10])
    with pytest.raises(ValueError, match="num_steps"):
        space_timesteps(10, 11)
    with pytest.raises(ValueError, match="num_steps"):
        space_timesteps(10, 0)
    with pytest.raises(ValueError, match="Unknown spacing"):
        space_timesteps(10, 5, "log")


# ---------------------------------------------------------------------------- the linear schedule at any T (issue #31)


def test_the_linear_schedule_at_T_1000_is_ddpm_s_bit_for_bit():
    """The paper's weights and diffusers' configs rest on DDPM's 1e-4 .. 0.02 over 1000 steps: the 1000 / T rule must
    leave it unchanged to the last bit, by default and with the range given."""
    ddpm = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # the formula before the rule
    np.testing.assert_array_equal(beta_schedule("linear", 1000), ddpm)
    np.testing.assert_array_equal(beta_schedule("linear", 1000, beta_start=1e-4, beta_end=0.02), ddpm)
    for a, b in zip(
        jax.tree_util.tree_leaves(make_schedule("linear", 1000)),
        jax.tree_util.tree_leaves(Schedule.from_betas(ddpm)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("T", [50, 100, 250, 4000])
def test_the_linear_schedule_follows_improved_ddpm_s_1000_over_T_rule(T):
    """abar_T of the default linear schedule against improved DDPM's closed form, prod(1 - beta_t) with beta_t evenly
    spaced from 1e-4 * 1000 / T to 0.02 * 1000 / T, in float64 here; the chain reaches noise at every T."""
    scale = 1000.0 / T
    closed = math.exp(math.fsum(np.log1p(-np.linspace(1e-4 * scale, 0.02 * scale, T))))
    betas = beta_schedule("linear", T)
    assert betas[0] == pytest.approx(0.1 / T, rel=1e-12) and betas[-1] == pytest.approx(20.0 / T, rel=1e-12)
    assert float(np.prod(1.0 - betas)) == pytest.approx(closed, rel=1e-3)
    assert float(make_schedule("linear", T).alphas_cumprod[-1]) == pytest.approx(closed, rel=1e-3)  # stored float32
    assert closed < 1e-4  # sum(beta) ~ 10 at any T: abar_T ~ e^-10


def test_a_range_given_is_used_as_given_and_a_chain_short_of_noise_warns():
    """A diffusers scheduler config or a checkpoint states its range: it is not rescaled. DDPM's range unscaled at
    T = 250 ends at abar_T = 0.08 (28% of the image's amplitude left): a warning that says what to do."""
    with pytest.warns(UserWarning, match=r"linear schedule with T = 250 does not reach noise.*abar_T = 0\.0797.*Raise"):
        betas = beta_schedule("linear", 250, beta_start=1e-4, beta_end=0.02)
    np.testing.assert_array_equal(betas, np.linspace(1e-4, 0.02, 250))
    with pytest.warns(UserWarning, match="constant schedule with T = 100 does not reach noise"):
        make_schedule("constant", 100)  # the other schedules keep DDPM's range at any T
    with pytest.warns(UserWarning, match="does not reach noise"):
        DiffusionConfig(num_timesteps=100, beta_start=1e-4, beta_end=0.02).betas()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        beta_schedule("linear", 500, beta_start=1e-4, beta_end=0.04)  # abar_T = 4e-5: no warning
        beta_schedule("cosine", 20)
    assert (
        np.prod(1.0 - np.linspace(1e-4, 0.02, 250)) > MAX_FINAL_ALPHA_BAR > np.prod(1.0 - beta_schedule("linear", 250))
    )
    with pytest.raises(ValueError, match=r"ends at beta = 1 >= 1 .*T = 20"):
        beta_schedule("linear", 20)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem != "__init__"))
def test_every_shipped_config_s_chain_reaches_noise_without_a_warning(name):
    """The chain each config trains and samples on, built as training builds it (its DiffusionConfig's betas)."""
    config = importlib.import_module(f"jaxdiff.configs.{name}").get_config()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        betas = DiffusionConfig(**config.diffusion.to_dict()).betas()
    assert np.prod(1.0 - betas) <= MAX_FINAL_ALPHA_BAR


# -------------------------------------------------------------- the original chain of a respaced schedule (issue #31)


def test_a_respaced_schedule_reads_levels_between_its_steps_along_its_whole_chain():
    """Issue #31's case: Karras et al.'s grid of 10 steps keeps 102 and 301; 1.2 times step 102's sigma lies at the
    whole chain's timestep 121.9 (interpolating between the kept steps gave 130.5)."""
    betas = beta_schedule("linear", 1000)
    full, short = make_schedule("linear", 1000), respaced(betas, 10, "karras")
    kept = np.asarray(short.timestep_map)
    assert 102 in kept and 301 in kept
    np.testing.assert_array_equal(short.chain_log_sigmas, full.chain_log_sigmas)
    np.testing.assert_array_equal(truncated(short, 4).chain_log_sigmas, full.chain_log_sigmas)  # kept whole
    np.testing.assert_allclose(full.chain_log_sigmas, log_sigmas(full), rtol=1e-6, atol=1e-6)
    abar = cumulative_product(1.0 - betas)
    level = math.log(1.2) + 0.5 * math.log((1.0 - abar[102]) / abar[102])
    assert float(timestep_at(short, level)) == pytest.approx(121.93, abs=0.01)
    levels = jnp.linspace(float(log_sigmas(full)[0]), float(log_sigmas(full)[-1]), 501)
    np.testing.assert_array_equal(jax.jit(timestep_at)(short, levels), timestep_at(full, levels))
    times = jnp.linspace(0.0, 999.0, 333)
    np.testing.assert_array_equal(jax.jit(log_sigma_at)(short, times), log_sigma_at(full, times))
    # Without its chain (timestep_map alone), a schedule knows only its kept steps: the old interpolation, 130.5.
    alone = Schedule.from_betas(np.asarray(short.betas, np.float64), timestep_map=kept)
    assert float(timestep_at(alone, level)) == pytest.approx(130.5, abs=0.1)
    with pytest.raises(ValueError, match="chain_betas do not give the schedule's abar"):
        Schedule.from_betas(1.0 - abar[kept] / np.r_[1.0, abar[kept][:-1]], kept, beta_schedule("cosine", 1000))
    with pytest.raises(ValueError, match="must index the chain's 500 steps"):
        Schedule.from_betas([0.1, 0.2], [0, 700], beta_schedule("cosine", 500))
