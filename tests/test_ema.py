"""Post-hoc EMA (Karras et al. 2024, EDM2 section 3): the widths and exponents, the tracked EMAs against their closed
forms, the reconstruction of one profile from others, and a run that saves snapshots, resumes bit for bit and samples
with ``--ema_length``."""

import dataclasses
import shutil
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxdiff import actions, checkpoints, commands, ema, experiment, pipeline, training
from jaxdiff.errors import CheckpointError, ConfigError
from jaxdiff.schedules import Schedule
from tests.helpers import ROOT, fake_run, tiny_config

EPS32 = float(np.finfo(np.float32).eps)
GAMMA_05, GAMMA_07, GAMMA_10 = ema.sigma_rel_to_gamma([0.05, 0.07, 0.10])


def track(theta: np.ndarray, gammas) -> tuple[tuple, tuple]:
    """The power-function EMAs of the trajectory ``theta`` ``[T, ...]`` (theta[s - 1] the parameters after update s),
    tracked in float32 by :func:`jaxdiff.ema.update_power_emas` in a jitted scan: (the EMAs after update T, each
    EMA after every update ``[T, ...]``)."""

    def body(emas, inputs):
        step, params = inputs
        emas = ema.update_power_emas(emas, params, step, gammas)
        return emas, emas

    theta = jnp.asarray(theta, jnp.float32)
    start = tuple(jnp.full_like(theta[0], 7.0) for _ in gammas)  # any start: the first update takes the parameters
    final, history = jax.jit(lambda t: jax.lax.scan(body, start, (jnp.arange(1, len(t) + 1), t)))(theta)
    return tuple(np.asarray(e) for e in final), tuple(np.asarray(h) for h in history)


def discrete_weights(t: int, gamma: float) -> np.ndarray:
    """The weight of theta_s (s = 1..t) in the EMA after t updates: beta_t = (1 - 1/t)^(gamma+1) makes
    prod_{r=s+1}^{t} beta_r = (s/t)^(gamma+1) (the product telescopes), so w_s = (1 - beta_s) (s/t)^(gamma+1) =
    (s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1), the continuous profile's integral over (s - 1, s]. Float64."""
    s = np.arange(1, t + 1, dtype=np.float64)
    return (s ** (gamma + 1) - (s - 1) ** (gamma + 1)) / float(t) ** (gamma + 1)


# ---------------------------------------------------------------------------------------------------------------------
# Widths and exponents


def test_sigma_rel_and_gamma_round_trip_and_give_edm2s_figures():
    """EDM2 eq. 3 both ways: gamma 6.94 is sigma_rel 0.10 and 16.97 is 0.05 (its figures, to their 3 digits), and
    the inverse (the cubic's largest real root) gives back any gamma at or above the peak GAMMA_MIN."""
    assert round(ema.sigma_rel_to_gamma(0.10), 2) == 6.94 and round(ema.sigma_rel_to_gamma(0.05), 2) == 16.97
    assert round(ema.gamma_to_sigma_rel(6.94), 4) == 0.1000 and round(ema.gamma_to_sigma_rel(16.97), 4) == 0.0500
    gammas = np.array([ema.GAMMA_MIN, -0.3, 0.0, 1.0, 6.94, 16.97, 100.0, 1e4])
    np.testing.assert_allclose(ema.sigma_rel_to_gamma(ema.gamma_to_sigma_rel(gammas)), gammas, rtol=1e-9, atol=1e-9)
    widths = np.array([1e-3, 0.05, 0.07, 0.10, 0.2, 0.3])
    np.testing.assert_allclose(ema.gamma_to_sigma_rel(ema.sigma_rel_to_gamma(widths)), widths, rtol=1e-12)
    # sigma_rel peaks at GAMMA_MIN (gamma^2 + 3 gamma + 1 = 0): the widest EMA of all, SIGMA_REL_MAX = 0.3003
    assert ema.GAMMA_MIN**2 + 3 * ema.GAMMA_MIN + 1 == pytest.approx(0, abs=1e-15)
    assert ema.SIGMA_REL_MAX == pytest.approx(0.30028, abs=1e-5)
    near = ema.gamma_to_sigma_rel(ema.GAMMA_MIN + np.array([-1e-3, 1e-3]))
    assert (near < ema.SIGMA_REL_MAX).all()
    assert ema.sigma_rel_to_gamma(ema.SIGMA_REL_MAX) == pytest.approx(ema.GAMMA_MIN, abs=1e-6)


@pytest.mark.parametrize("bad", [0.0, -0.05, 0.31, 1.0])
def test_a_width_out_of_range_is_a_config_error_everywhere(bad):
    with pytest.raises(ConfigError, match=r"sigma_rel must lie in \(0, 0\.3003\]"):
        ema.sigma_rel_to_gamma(bad)
    with pytest.raises(ConfigError, match=r"posthoc_ema must be a tuple of EMA widths"):
        training.OptimConfig(posthoc_ema=(0.05, bad))
    with pytest.raises(ConfigError, match=r"--ema_length is a post-hoc EMA's width"):
        commands.SampleRequest(workdir="run", ema_length=bad)
    with pytest.raises(ConfigError, match="gamma > -1"):
        ema.gamma_to_sigma_rel(-1.0)
    with pytest.raises(ConfigError, match="No EMA snapshots"):
        ema.synthesize([], 0.07)


# ---------------------------------------------------------------------------------------------------------------------
# The tracked EMA against its closed forms


@pytest.mark.parametrize("gamma", [GAMMA_05, GAMMA_10], ids=["sigma_rel=0.05", "sigma_rel=0.10"])
def test_the_tracked_ema_weighs_each_update_as_the_discrete_profile_says(gamma):
    """The EMA of the one-hot trajectory theta_s = e_s holds, after t updates, the weight w_s of every theta_s:
    tracked in float32 it equals the closed form ``discrete_weights`` to 20 float32 epsilons of the largest weight
    (measured: 2.6e-7 of it, about 2 epsilons), and the weights sum to 1."""
    t = 400
    (final,), _ = track(np.eye(t, dtype=np.float32), (gamma,))
    w = discrete_weights(t, gamma)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(final, w, rtol=0, atol=20 * EPS32 * w.max())
    # beta_1 = 0: the EMA after the first update is that update's parameters exactly, whatever it started from
    assert float(ema.power_ema_beta(1, gamma)) == 0.0


def test_the_decay_keeps_its_digits_in_long_runs():
    """1 - beta_t = -expm1((gamma + 1) log1p(-1/t)) in float32 keeps its relative precision at t = 10^6, where
    (1 - 1/t)^(gamma + 1) rounded in float32 would lose most of it (1/t is 17 epsilons). Checked under jit."""
    t = np.array([2, 10, 1000, 10**6, 10**7])
    log_beta = (GAMMA_05 + 1) * np.log1p(-1.0 / t)
    beta = np.asarray(jax.jit(lambda s: ema.power_ema_beta(s, GAMMA_05))(jnp.asarray(t, jnp.int32)), np.float64)
    np.testing.assert_allclose(beta, np.exp(log_beta), rtol=4 * EPS32)
    # the weight of the new parameters, as update_power_emas uses it: to its own precision, not to 1's
    _, rest = jax.jit(lambda s: ema._coefficients(s, GAMMA_05))(jnp.asarray(t, jnp.int32))
    np.testing.assert_allclose(np.asarray(rest, np.float64), -np.expm1(log_beta), rtol=8 * EPS32)
    naive = 1 - (1 - 1 / np.float32(t[3])) ** np.float32(GAMMA_05 + 1)  # float32 (1 - 1/t)^(gamma + 1), for contrast
    assert abs(naive / -np.expm1(log_beta[3]) - 1) > 1e-3


def test_a_polynomial_trajectory_averages_to_the_profiles_integral():
    """theta(tau) = 1 + 0.5 u - 2 u^2, u = tau / 5000, held over each update (theta_s = theta(s)). The float32 EMA at
    t = 5000 equals sum_s w_s theta_s in float64 to 2e-6 (measured 2e-7), and the continuous profile's average,
    int p_t(tau) theta(tau) dtau = sum_k c_k (gamma + 1) / (gamma + k + 1) t^k in closed form, to within
    max |theta'| = 7e-4 (theta_s is theta at the end of its step: |theta(s) - theta(tau)| <= max |theta'| on (s - 1,
    s]; measured 3.3e-4 and 3.1e-4, about half of it, as a linear theta gives)."""
    t = 5000
    c = (1.0, 0.5 / t, -2.0 / t**2)
    tau = np.arange(1, t + 1, dtype=np.float64)
    theta = c[0] + c[1] * tau + c[2] * tau**2
    final, _ = track(theta[:, None], (GAMMA_05, GAMMA_10))
    slope = max(abs(c[1] + 2 * c[2] * x) for x in (0.0, t))
    for gamma, tracked in zip((GAMMA_05, GAMMA_10), final, strict=True):
        discrete = float(discrete_weights(t, gamma) @ theta)
        continuous = sum(ck * (gamma + 1) / (gamma + k + 1) * t**k for k, ck in enumerate(c))
        assert float(tracked[0]) == pytest.approx(discrete, abs=2e-6)
        assert abs(discrete - continuous) <= slope
        assert abs(discrete - continuous) > 0.25 * slope  # the bound is tight, not vacuous


def test_the_profiles_integrate_to_one_and_their_inner_products_are_the_closed_form():
    """p_t integrates to 1 over [0, t] and vanishes after; <p_a, p_b> by quadrature equals profile_inner's closed
    form to 1e-6 relative (the midpoint rule on 2e6 points)."""
    n = 2_000_000
    tau = (np.arange(n) + 0.5) * (1000.0 / n)
    dtau = 1000.0 / n
    for t, g in ((1000, GAMMA_05), (600, GAMMA_10), (250, 0.5)):
        assert ema.profile(t, g, tau).sum() * dtau == pytest.approx(1.0, rel=1e-6)
        assert ema.profile(t, g, np.array([t + 1.0, 2.0 * t])).tolist() == [0.0, 0.0]
    for (ta, ga), (tb, gb) in [((1000, GAMMA_05), (600, GAMMA_10)), ((400, GAMMA_10), (1000, 0.5))]:
        quadrature = (ema.profile(ta, ga, tau) * ema.profile(tb, gb, tau)).sum() * dtau
        assert ema.profile_inner(ta, ga, tb, gb) == pytest.approx(quadrature, rel=1e-6)
        assert ema.profile_inner(ta, ga, tb, gb) == pytest.approx(ema.profile_inner(tb, gb, ta, ga), rel=1e-14)


# ---------------------------------------------------------------------------------------------------------------------
# Reconstruction


def synthetic_run(every: int = 100, length: int = 2000):
    """theta_t = sin(t / 50) + 0.1 N(0, 1) (64 values, seed 0) over ``length`` updates; the 0.05, 0.07 and 0.10
    profiles tracked in float32; snapshots of 0.05 and 0.10 every ``every`` updates."""
    rng = np.random.default_rng(0)
    t = np.arange(1, length + 1)
    theta = np.sin(t / 50)[:, None] + 0.1 * rng.standard_normal((length, 64))
    final, history = track(theta, (GAMMA_05, GAMMA_07, GAMMA_10))
    snapshots = [
        ema.Snapshot(s, g, history[i][s - 1])
        for s in range(every, length + 1, every)
        for i, g in ((0, GAMMA_05), (2, GAMMA_10))
    ]
    return final, history, snapshots


def test_a_third_profile_is_reconstructed_from_two_tracked_ones():
    """sigma_rel 0.07 rebuilt from the snapshots of 0.05 and 0.10 (every 100 of 2,000 updates) matches the 0.07 EMA
    tracked directly to 1e-3 (measured: 1.4e-4 at step 2,000; 3.3e-4 at step 1,500 and 1.0e-3 at step 1,000 from the
    snapshots up to there, so the earlier checks allow 2e-3), against 0.13 between the tracked 0.05 and the direct
    0.07: the reconstruction is over 100 times nearer. The profiles themselves: sum_i x_i p_i is within 1% (L2,
    relative; measured 0.25%) of the target's."""
    final, history, snapshots = synthetic_run()
    rebuilt = ema.synthesize(snapshots, 0.07)
    assert rebuilt.dtype == np.float32 and rebuilt.shape == (64,)
    gap = np.abs(final[1] - final[0]).max()
    assert gap > 0.1
    assert np.abs(rebuilt - final[1]).max() < 1e-3
    assert np.abs(rebuilt - final[1]).max() < gap / 100
    for at in (1000, 1500):
        earlier = ema.synthesize([s for s in snapshots if s.step <= at], 0.07, at_step=at)
        assert np.abs(earlier - history[1][at - 1]).max() < 2e-3
    steps, gammas = [s.step for s in snapshots], [s.gamma for s in snapshots]
    x = ema.synthesis_weights(steps, gammas, 0.07, 2000)
    tau = (np.arange(400_000) + 0.5) * (2000 / 400_000)
    approx = sum(xi * ema.profile(s, g, tau) for xi, s, g in zip(x, steps, gammas, strict=True))
    target = ema.profile(2000, GAMMA_07, tau)
    assert np.sqrt(((approx - target) ** 2).sum() / (target**2).sum()) < 0.01


@pytest.mark.parametrize(("sigma_rel", "index"), [(0.05, -2), (0.10, -1)])
def test_a_tracked_profile_is_its_own_snapshot_with_one_hot_weights(sigma_rel, index):
    """Asked for a tracked width at the last snapshot's step, the weights are one-hot on that snapshot (to 1e-9;
    measured 2e-14) and the reconstruction is that snapshot, to float32 rounding."""
    _, _, snapshots = synthetic_run()
    x = ema.synthesis_weights([s.step for s in snapshots], [s.gamma for s in snapshots], sigma_rel, 2000)
    one_hot = np.zeros(len(snapshots))
    one_hot[index] = 1.0
    np.testing.assert_allclose(x, one_hot, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ema.synthesize(snapshots, sigma_rel), snapshots[index].params, rtol=2 * EPS32)


def test_the_pure_math_loads_neither_flax_optax_orbax_nor_tensorflow():
    probe = "import sys, jaxdiff.ema; print(' '.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    heavy = {"flax", "optax", "orbax", "tensorflow", "jaxdiff.models", "jaxdiff.training"}
    assert not set(loaded.stdout.split()) & heavy


# ---------------------------------------------------------------------------------------------------------------------
# In the train step


def toy_step(opt):
    """A one-scalar 'network' trained by make_train_step (compiles in a second)."""
    optimizer = training.make_optimizer(opt)
    objective = pipeline.DiffusionConfig(num_timesteps=10)
    schedule = Schedule.from_betas(np.linspace(1e-4, 0.02, 10))
    apply = lambda p, x, t, y, key: p["w"] * x
    step = jax.jit(training.make_train_step(apply, schedule, objective, optimizer, opt, seed=0))
    return step, training.init_train_state({"w": jnp.asarray(2.0)}, optimizer, 10, opt.posthoc_gammas)


def test_the_train_step_tracks_the_power_emas_and_leaves_the_rest_bit_identical():
    """With posthoc_ema the step also updates one EMA per width with beta of the (state.step + 1)-th update; params,
    the training EMA and the optimizer state stay bit for bit those of a run without it (whose state has no field
    to carry: None). The EMAs follow the recurrence written out in float64 (to 1e-6) and start as the first update's
    parameters exactly."""
    off = training.OptimConfig(lr=0.1, warmup_steps=0, total_steps=20, ema_decay=0.9)
    on = dataclasses.replace(off, posthoc_ema=(0.05, 0.10))
    step_off, state_off = toy_step(off)
    step_on, state_on = toy_step(on)
    assert state_off.posthoc_emas is None and len(state_on.posthoc_emas) == 2
    batch = {"image": jnp.ones((4, 1, 1, 1)), "label": jnp.zeros((4,), jnp.int32)}
    expected = [0.0, 0.0]
    for n in range(1, 13):
        state_off, _ = step_off(state_off, batch)
        state_on, _ = step_on(state_on, batch)
        w = float(state_on.params["w"])
        for i, gamma in enumerate(on.posthoc_gammas):
            beta = (1 - 1 / n) ** (gamma + 1)
            expected[i] = beta * expected[i] + (1 - beta) * w
        if n == 1:
            assert [float(e["w"]) for e in state_on.posthoc_emas] == [w, w]
    for a, b in zip(jax.tree_util.tree_leaves(state_off), jax.tree_util.tree_leaves(state_on), strict=False):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(jax.tree_util.tree_leaves(state_on)) == len(jax.tree_util.tree_leaves(state_off)) + 2
    np.testing.assert_allclose([float(e["w"]) for e in state_on.posthoc_emas], expected, rtol=1e-6)
    # a state built without the EMAs cannot take a step that tracks them: said when the step is traced
    with pytest.raises(ConfigError, match=r"tracks 0 post-hoc EMA\(s\) but posthoc_ema = \(0.05, 0.1\)"):
        step_on(toy_step(off)[1], batch)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and snapshots on their own (no network)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StateBeforePosthoc:
    """TrainState as jaxdiff saved it before ``posthoc_emas``: the same six fields, so the same checkpoint layout."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    loss_history: jax.Array
    history_count: jax.Array


def test_an_older_checkpoint_restores_without_the_field_and_a_changed_setting_is_refused(tmp_path):
    """A checkpoint saved before the field restores onto a TrainState that tracks nothing (posthoc_emas None), bit
    for bit. Resuming a run with other widths than its checkpoint's config records is refused in one sentence that
    names the setting to pass; a fresh workdir and the same widths pass."""
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    old = StateBeforePosthoc(jnp.int32(3), params, params, (jnp.zeros(2),), jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32))
    mngr = checkpoints.manager(tmp_path / "run", async_save=False)
    checkpoints.save(mngr, 3, old, {"optim": {"lr": 1e-3}}, {})
    target = training.TrainState(*(getattr(old, f.name) for f in dataclasses.fields(old)))
    restored, skipped = checkpoints.restore_latest(mngr, checkpoints.abstract(target))
    mngr.close()
    assert skipped == [] and restored.posthoc_emas is None
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(old), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    checkpoints.check_posthoc_resume(tmp_path / "run", ())
    checkpoints.check_posthoc_resume(tmp_path / "fresh", (0.05, 0.1))
    with pytest.raises(
        ConfigError, match=r"tracked post-hoc EMAs of widths \(none\) .* --config\.optim\.posthoc_ema=\(\)"
    ):
        checkpoints.check_posthoc_resume(tmp_path / "run", (0.05, 0.1))
    mngr = checkpoints.manager(tmp_path / "run", async_save=False)
    checkpoints.save(mngr, 4, old, {"optim": {"posthoc_ema": [0.05, 0.1]}}, {})
    mngr.close()
    checkpoints.check_posthoc_resume(tmp_path / "run", (0.05, 0.10))
    with pytest.raises(ConfigError, match=r"--config\.optim\.posthoc_ema=0\.05,0\.1, or train a new run"):
        checkpoints.check_posthoc_resume(tmp_path / "run", (0.05, 0.2))


def test_a_snapshot_that_differs_from_its_fingerprint_is_refused_by_name(tmp_path):
    """Snapshots round-trip (trees, step, widths, gammas); one whose arrays do not give the fingerprint saved with
    them is refused with a CheckpointError naming its folder."""
    like = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    trees = ({"w": jnp.full((2, 3), 1.5), "b": jnp.arange(3.0)}, {"w": jnp.full((2, 3), 2.5), "b": -jnp.arange(3.0)})
    mngr = checkpoints.snapshot_manager(tmp_path / "run", async_save=False)
    checkpoints.save_snapshot(mngr, 10, trees, (0.05, 0.1), (GAMMA_05, GAMMA_10))
    wrong = {**checkpoints.fingerprint(trees), "1/b": 12345}
    emas = ocp.args.StandardSave(trees)
    meta = ocp.args.JsonSave({"step": 20, "sigma_rels": [0.05, 0.1], "gammas": [GAMMA_05, GAMMA_10]})
    mngr.save(20, args=ocp.args.Composite(emas=emas, meta=meta, fingerprint=ocp.args.JsonSave(wrong)))
    mngr.wait_until_finished()
    mngr.close()
    assert [m["step"] for m in checkpoints.snapshot_index(tmp_path / "run")] == [10, 20]
    first = checkpoints.load_snapshot(tmp_path / "run", 10, like)
    assert [(s.step, s.gamma) for s in first] == [(10, GAMMA_05), (10, GAMMA_10)]
    for snap, tree in zip(first, trees, strict=True):
        for a, b in zip(jax.tree_util.tree_leaves(snap.params), jax.tree_util.tree_leaves(tree), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    where = checkpoints.snapshot_dir(tmp_path / "run") / "20"
    with pytest.raises(CheckpointError, match=rf"{where} cannot be used: its array 1/b differs from the fingerprint"):
        checkpoints.load_snapshots(tmp_path / "run", like)


# ---------------------------------------------------------------------------------------------------------------------
# A run: snapshots, resume, sampling


def run_config(data_dir, num_steps: int):
    """configs/tiny.py on one level without attention or dropout (its step compiles in ~11 s instead of ~22 s),
    EDM2's two widths tracked, a checkpoint and a snapshot every 2 steps, one checkpoint kept, no grids or bits/dim."""
    config = tiny_config(data_dir, num_steps=num_steps, eval_every=0, sample_every=0, checkpoint_every=2)
    config.training.keep_checkpoints = 1
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = ()
    config.model.dropout = 0.0
    config.optim.posthoc_ema = (0.05, 0.10)
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run stopped at step 4 and resumed to 6, and one that went to 6 at once: (their final states, workdirs)."""
    root = tmp_path_factory.mktemp("posthoc")
    resumed_dir, straight_dir = root / "resumed", root / "straight"
    assert int(experiment.train_and_evaluate(run_config(root / "data", 4), resumed_dir).step) == 4
    resumed = experiment.train_and_evaluate(run_config(root / "data", 6), resumed_dir)
    straight = experiment.train_and_evaluate(run_config(root / "data", 6), straight_dir)
    return (resumed, resumed_dir), (straight, straight_dir)


def test_a_resumed_run_ends_bit_identical_power_emas_and_snapshots_included(runs):
    """The interrupted run (4 steps, then resumed to 6) and the uninterrupted one end with equal TrainStates, the
    power EMAs included, and equal snapshots (steps 2, 4, 6: the period and the end), bit for bit. The checkpoints
    keep the newest one alone; the snapshots are all kept."""
    (resumed, resumed_dir), (straight, straight_dir) = runs
    assert int(resumed.step) == int(straight.step) == 6 and len(resumed.posthoc_emas) == 2
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(straight), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(int(p.name) for p in checkpoints.checkpoint_dir(straight_dir).iterdir() if p.name.isdigit()) == [6]
    index = checkpoints.snapshot_index(straight_dir)
    assert index == checkpoints.snapshot_index(resumed_dir)
    assert [m["step"] for m in index] == [2, 4, 6] and all(m["sigma_rels"] == [0.05, 0.1] for m in index)
    like = resumed.params
    a, b = checkpoints.load_snapshots(resumed_dir, like), checkpoints.load_snapshots(straight_dir, like)
    assert [(s.step, s.gamma) for s in a] == [(s.step, s.gamma) for s in b]
    for x, y in zip(a, b, strict=True):
        for u, v in zip(jax.tree_util.tree_leaves(x.params), jax.tree_util.tree_leaves(y.params), strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # the last snapshot is the state's own power EMAs
    for snap, tracked in zip(b[-2:], straight.posthoc_emas, strict=True):
        for u, v in zip(jax.tree_util.tree_leaves(snap.params), jax.tree_util.tree_leaves(tracked), strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_a_run_resumed_from_an_older_checkpoint_sets_the_later_snapshots_aside(runs, tmp_path):
    """Snapshots after the step a run starts from (a newer checkpoint was unreadable, or removed) are moved to
    ema_snapshots_superseded, kept, so that the run writes its own at those steps."""
    (_, resumed_dir), _ = runs
    workdir = tmp_path / "copy"
    shutil.copytree(resumed_dir, workdir)
    snapshots = actions.posthoc_snapshots(workdir, (0.05, 0.1), (GAMMA_05, GAMMA_10), 2, 6, first_step=2)
    snapshots.close()
    assert [m["step"] for m in checkpoints.snapshot_index(workdir)] == [2]
    assert sorted(p.name for p in (workdir / checkpoints.SUPERSEDED_SNAPSHOTS).iterdir()) == ["4", "6"]
    assert actions.posthoc_snapshots(workdir, (), (), 2, 6, first_step=0) is None  # nothing tracked: nothing made


def test_sample_with_ema_length_end_to_end_and_its_one_line_error(runs, tmp_path, subprocess_env):
    """``sample.py --ema_length=0.07`` samples the EMA rebuilt from the run's snapshots and logs their weights; the
    parameters it samples are ``ema.synthesize`` of the snapshots, and at 0.05 the tracked EMA itself. A run without
    snapshots gets one line that says how to train for them, and exit status 2."""
    _, (straight, workdir) = runs
    fake_run(tmp_path / "plain")
    sample = [sys.executable, str(ROOT / "sample.py"), "--num_samples=2", "--sampler=ddim", "--steps=2"]
    start = lambda *argv: subprocess.Popen(
        [*sample, *argv], env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    drawn = start(f"--workdir={workdir}", "--ema_length=0.07", f"--out={tmp_path / 'out'}")
    refused = start(f"--workdir={tmp_path / 'plain'}", "--ema_length=0.07")
    # meanwhile, in this process: the parameters from_workdir builds
    pipe = pipeline.from_workdir(workdir, ema_length=0.07)
    direct = ema.synthesize(checkpoints.load_snapshots(workdir, straight.params), 0.07)
    for a, b in zip(jax.tree_util.tree_leaves(pipe.params), jax.tree_util.tree_leaves(direct), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-6)
    tracked = pipeline.from_workdir(workdir, ema_length=0.05).params
    for a, b in zip(
        jax.tree_util.tree_leaves(tracked), jax.tree_util.tree_leaves(straight.posthoc_emas[0]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2 * EPS32, atol=1e-9)
    out, err = drawn.communicate(timeout=600)
    assert drawn.returncode == 0, out[-3000:] + err[-3000:]
    assert "Post-hoc EMA of width sigma_rel 0.07 (gamma 11.245) at step 6, from 3 snapshots (6 profiles" in out
    assert "weight per step/sigma_rel: 2/0.05: " in out and "6/0.1: +" in out
    assert "post-hoc EMA sigma_rel 0.07 at step 6" in out  # the source in the sampling line
    with np.load(tmp_path / "out" / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 8, 8, 1)
    out, err = refused.communicate(timeout=600)
    lines = err.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, err
    assert "has no EMA snapshot at or before step 3 (it tracked no post-hoc EMA): train with " in lines[0]
    assert "--config.optim.posthoc_ema=0.05,0.10" in lines[0] and lines[0].startswith("sample.py: ")
