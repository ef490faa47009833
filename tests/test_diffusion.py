"""Properties of the pure diffusion math, each against an independent float64 reference, with and without jit."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jaxdiff as jd
from jaxdiff import diffusion
from jaxdiff.schedules import Schedule, beta_schedule, make_schedule, respace, space_timesteps
from tests import reference

T = 1000
LINEAR = make_schedule("linear", T)
COSINE = make_schedule("cosine", T)
ALL_T = jnp.arange(T)


def images(seed, shape=(4, 8, 8, 3)):
    """Random 8-bit images scaled to [-1, 1]."""
    levels = np.random.default_rng(seed).integers(0, 256, shape)
    return jnp.asarray(levels / 127.5 - 1.0, jnp.float32)


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def spread_t(batch):
    return jnp.linspace(0, T - 1, batch).astype(jnp.int32)


class ForwardProcessTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("linear", "cosine")
    def test_composing_one_step_transitions_gives_the_closed_form(self, name):
        sched = make_schedule(name, T)
        ones = jnp.ones((T, 1))
        # The one-step kernel's coefficients at every t, composed in float64: a linear-Gaussian chain.
        step_coef, step_var = self.variant(lambda x, t: diffusion.q_step_mean_variance(sched, x, t))(ones, ALL_T)
        coef, var, composed_coef, composed_var = 1.0, 0.0, [], []
        for a, b in zip(np.asarray(step_coef, np.float64)[:, 0], np.asarray(step_var, np.float64)[:, 0], strict=True):
            coef, var = coef * a, a * a * var + b
            composed_coef.append(coef)
            composed_var.append(var)
        mean, variance, log_variance = self.variant(lambda x, t: diffusion.q_mean_variance(sched, x, t))(ones, ALL_T)
        np.testing.assert_allclose(mean[:, 0], composed_coef, rtol=1e-4)
        np.testing.assert_allclose(variance[:, 0], composed_var, rtol=1e-5)
        np.testing.assert_allclose(log_variance[:, 0], np.log(composed_var), rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_q_sample_is_the_reparametrised_closed_form(self):
        x0, eps, t = images(0), normal(1, (4, 8, 8, 3)), jnp.array([0, 5, 500, 999])
        got = self.variant(lambda *a: diffusion.q_sample(LINEAR, *a))(x0, t, eps)
        abar = reference.cumulative_product(1 - beta_schedule("linear", T))[np.asarray(t)][:, None, None, None]
        np.testing.assert_allclose(got, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps, rtol=1e-5, atol=1e-6)

    def test_q_sample_has_the_closed_form_moments(self):
        x0 = jnp.full((20_000, 1), 0.7)
        t = jnp.full((20_000,), 300)
        x_t = diffusion.q_sample(COSINE, x0, t, normal(2, x0.shape))
        abar = float(COSINE.alphas_cumprod[300])
        assert abs(float(x_t.mean()) - math.sqrt(abar) * 0.7) < 4 * math.sqrt((1 - abar) / 20_000)
        assert abs(float(x_t.var()) / (1 - abar) - 1) < 0.05


class PosteriorTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("linear", "cosine", "quadratic")
    def test_posterior_is_the_product_of_the_gaussians(self, name):
        betas = beta_schedule(name, T)
        sched = make_schedule(name, T)
        abar = reference.cumulative_product(1 - betas)
        x0, x_t = normal(3, (T, 2)), normal(4, (T, 2))
        mean, var, log_var = self.variant(lambda *a: diffusion.q_posterior_mean_variance(sched, *a))(x0, x_t, ALL_T)
        ref_mean, ref_var = reference.posterior_by_completing_the_square(
            betas[1:, None], abar[:-1, None], np.asarray(x0[1:], np.float64), np.asarray(x_t[1:], np.float64)
        )
        np.testing.assert_allclose(mean[1:], ref_mean, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(var[1:, 0], ref_var[:, 0], rtol=1e-5)
        np.testing.assert_allclose(log_var[1:, 0], np.log(ref_var[:, 0]), rtol=1e-5)
        # At t = 1 the posterior is the point mass at x_0; its log-variance is clipped to beta~_2 as in DDPM.
        np.testing.assert_allclose(mean[0], x0[0], atol=1e-6)
        assert var[0, 0] == 0.0 and np.isclose(log_var[0, 0], np.log(ref_var[0, 0]), rtol=1e-5)

    @parameterized.parameters(1, 2, 10, 200, 999)
    def test_posterior_matches_a_numerical_fit_of_the_product(self, t):
        betas = beta_schedule("linear", T)
        abar = reference.cumulative_product(1 - betas)
        x0, x_t = 0.4, -0.3
        fit_mean, fit_var = reference.posterior_by_quadratic_fit(betas[t], abar[t - 1], x0, x_t)
        mean, var, _ = diffusion.q_posterior_mean_variance(
            LINEAR, jnp.full((1, 1), x0), jnp.full((1, 1), x_t), jnp.array([t])
        )
        np.testing.assert_allclose(float(mean[0, 0]), fit_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(var[0, 0]), fit_var, rtol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("linear", "cosine")
    def test_the_two_forms_of_the_posterior_mean_agree(self, name):
        sched = make_schedule(name, T)
        x0, eps = normal(5, (T, 3)), normal(6, (T, 3))

        def both(x0, eps):
            x_t = diffusion.q_sample(sched, x0, ALL_T, eps)
            mean_x0, _, _ = diffusion.q_posterior_mean_variance(sched, x0, x_t, ALL_T)
            return mean_x0, diffusion.posterior_mean_from_eps(sched, x_t, ALL_T, eps)

        mean_x0, mean_eps = self.variant(both)(x0, eps)
        # The eps form divides by sqrt(1 - abar_t), so float32 rounding grows where abar_t is near 1.
        np.testing.assert_allclose(mean_eps, mean_x0, rtol=1e-3, atol=2e-4)

    @parameterized.parameters("linear", "cosine", "quadratic", "sigmoid", "constant", "warmup10", "warmup50")
    def test_posterior_variance_never_exceeds_beta(self, name):
        sched = make_schedule(name, T)
        assert np.all(sched.posterior_variance <= sched.betas)
        assert np.all(sched.posterior_variance[1:] > 0)


class ParametrisationTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("eps", "x0", "v")
    def test_conversions_invert_each_other(self, prediction):
        x0, eps, t = images(7, (8, 4, 4, 3)), normal(8, (8, 4, 4, 3)), spread_t(8)

        def roundtrip(x0, eps):
            x_t = diffusion.q_sample(COSINE, x0, t, eps)
            target = diffusion.prediction_target(COSINE, x0, eps, t, prediction)
            return diffusion.x0_and_eps(COSINE, x_t, t, target, prediction)

        got_x0, got_eps = self.variant(roundtrip)(x0, eps)
        # x0 from eps (or eps from x0) divides by sqrt(abar_t) (or sqrt(1 - abar_t)), amplifying float32 rounding.
        np.testing.assert_allclose(got_x0, x0, atol=5e-3 if prediction == "eps" else 1e-5)
        np.testing.assert_allclose(got_eps, eps, atol=1e-3 if prediction == "x0" else 1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_v_is_the_rotation_of_x0_and_eps(self):
        x0, eps, t = images(9, (8, 4, 4, 3)), normal(10, (8, 4, 4, 3)), spread_t(8)
        v = self.variant(lambda *a: diffusion.v_from_x0_eps(LINEAR, *a))(x0, eps, t)
        x_t = diffusion.q_sample(LINEAR, x0, t, eps)
        # (x_t, v) is (x0, eps) rotated by the angle phi with cos(phi) = sqrt(abar): norms are preserved.
        np.testing.assert_allclose(
            jnp.square(x_t) + jnp.square(v), jnp.square(x0) + jnp.square(eps), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(diffusion.predict_x0_from_v(LINEAR, x_t, t, v), x0, atol=1e-5)
        np.testing.assert_allclose(diffusion.predict_eps_from_v(LINEAR, x_t, t, v), eps, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("eps", "x0", "v")
    def test_p_mean_is_the_eps_form_mean_for_every_prediction(self, prediction):
        x0, eps, t = images(11, (8, 4, 4, 1)), normal(12, (8, 4, 4, 1)), spread_t(8)
        x_t = diffusion.q_sample(LINEAR, x0, t, eps)
        out = diffusion.prediction_target(LINEAR, x0, eps, t, prediction)
        p = self.variant(lambda o, x: diffusion.p_mean_variance(LINEAR, o, x, t, prediction=prediction))(out, x_t)
        np.testing.assert_allclose(p.mean, diffusion.posterior_mean_from_eps(LINEAR, x_t, t, eps), atol=2e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_variance_types(self):
        x_t, t = normal(13, (T, 2)), ALL_T
        fn = self.variant(
            lambda out, variance: diffusion.p_mean_variance(LINEAR, out, x_t, t, variance=variance),
            static_argnums=1,
        )
        small = fn(jnp.zeros((T, 2)), "fixed_small")
        np.testing.assert_allclose(small.variance[:, 0], LINEAR.posterior_variance)
        large = fn(jnp.zeros((T, 2)), "fixed_large")
        np.testing.assert_allclose(large.variance[1:, 0], LINEAR.betas[1:], rtol=1e-6)
        np.testing.assert_allclose(large.variance[0, 0], LINEAR.posterior_variance[1], rtol=1e-6)
        np.testing.assert_allclose(large.log_variance, jnp.log(large.variance), rtol=1e-6)
        learned = fn(jnp.concatenate([jnp.zeros((T, 2)), jnp.full((T, 2), -3.0)], -1), "learned")
        np.testing.assert_allclose(learned.variance, np.exp(-3.0), rtol=1e-6)
        for v, expected in [(1.0, LINEAR.log_betas), (-1.0, LINEAR.posterior_log_variance_clipped)]:
            ranged = fn(jnp.concatenate([jnp.zeros((T, 2)), jnp.full((T, 2), v)], -1), "learned_range")
            np.testing.assert_allclose(ranged.log_variance[:, 0], expected, rtol=1e-6)
        mid = fn(jnp.zeros((T, 4)), "learned_range")  # v = 0: the geometric mean of beta and beta~
        np.testing.assert_allclose(
            mid.log_variance[:, 0], (LINEAR.log_betas + LINEAR.posterior_log_variance_clipped) / 2, rtol=1e-5
        )

    def test_clipping_the_predicted_x0(self):
        x_t, t = normal(14, (4, 8)), jnp.full((4,), 900)
        out = jnp.full((4, 8), 10.0)  # an x0 prediction far outside [-1, 1]
        p = diffusion.p_mean_variance(COSINE, out, x_t, t, prediction="x0", clip_x0=True)
        np.testing.assert_array_equal(p.pred_x0, jnp.ones((4, 8)))
        mean, _, _ = diffusion.q_posterior_mean_variance(COSINE, jnp.ones((4, 8)), x_t, t)
        np.testing.assert_allclose(p.mean, mean, rtol=1e-6)
        np.testing.assert_allclose(diffusion.predict_x0_from_eps(COSINE, x_t, t, p.pred_eps), 1.0, atol=1e-4)


class LikelihoodTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_normal_kl_against_quadrature(self):
        cases = [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 1.3), (1.0, 2.0, 0.0, 0.1), (-2.0, 0.05, -1.9, 0.07)]
        m1, s1, m2, s2 = (jnp.array(c) for c in zip(*cases, strict=True))
        got = self.variant(jd.normal_kl)(m1, 2 * jnp.log(s1), m2, 2 * jnp.log(s2))
        expected = [reference.kl_by_quadrature(*c) for c in cases]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert got[0] == 0.0  # identical Gaussians

    def test_normal_kl_is_nonnegative_and_zero_only_at_equality(self):
        m1, m2, lv1, lv2 = (normal(s, (10_000,)) for s in range(20, 24))
        kl = jd.normal_kl(m1, lv1, m2, lv2)
        assert np.all(kl >= -1e-6)
        np.testing.assert_allclose(jd.normal_kl(m1, lv1, m1, lv1), 0.0, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((0.0, 0.5), (0.3, 1e-3), (0.99, 0.02), (-1.0, 0.01), (3.0, 0.2), (0.1, 30.0))
    def test_discretized_likelihood_is_a_distribution_over_the_256_levels(self, mean, std):
        levels = jnp.linspace(-1.0, 1.0, 256)
        log_p = self.variant(jd.discretized_gaussian_log_likelihood)(levels, mean, jnp.log(std))
        np.testing.assert_allclose(np.exp(np.asarray(log_p, np.float64)).sum(), 1.0, atol=2e-5)
        ref = reference.discretized_log_prob(np.linspace(-1, 1, 256), mean, std)
        reliable = ref > -60  # past that, float64 scipy itself loses the difference of two tails
        np.testing.assert_allclose(log_p[reliable], ref[reliable], rtol=1e-4, atol=2e-5)

    def test_discretized_likelihood_is_finite_far_in_the_tails(self):
        log_p = jd.discretized_gaussian_log_likelihood(jnp.array([0.9]), jnp.array([-0.9]), jnp.log(0.01))
        grad = jax.grad(lambda m: jd.discretized_gaussian_log_likelihood(jnp.array([0.5]), m, -4.0).sum())(
            jnp.array([-0.9])
        )
        assert np.isfinite(log_p).all() and np.isfinite(grad).all()
        assert log_p[0] < -1000  # 180 standard deviations away


def optimal_gaussian_eps_model(sched, data_mean, data_var):
    """The exact E[eps | x_t] for data N(data_mean, diag(data_var)): the best possible eps-network."""

    def model_fn(x_t, timesteps):
        a = jnp.take(sched.sqrt_alphas_cumprod, timesteps)[:, None]
        s = jnp.take(sched.sqrt_one_minus_alphas_cumprod, timesteps)[:, None]  # not 1 - abar: it cancels near t = 0
        x0_hat = data_mean + a * data_var / (a * a * data_var + s * s) * (x_t - a * data_mean)
        return (x_t - a * x0_hat) / s

    return model_fn


def log_snr_schedule(num_timesteps, log_snr_max=9.21, log_snr_min=-10.0):
    """A chain whose steps are evenly spaced in log-SNR between fixed ends: doubling T (2T - 1 points) refines it."""
    abar = 1 / (1 + np.exp(-np.linspace(log_snr_max, log_snr_min, num_timesteps)))
    return Schedule.from_betas(1 - abar / np.concatenate([[1.0], abar[:-1]]))


class VariationalBoundTest(chex.TestCase):
    DATA_MEAN = np.array([0.3, -0.2, 0.0])
    DATA_VAR = np.array([0.25, 0.04, 0.5])

    def gaussian_data(self, n, seed):
        x0 = self.DATA_MEAN + np.sqrt(self.DATA_VAR) * np.random.default_rng(seed).standard_normal((n, 3))
        data_nll = -np.sum(
            -0.5 * np.log(2 * np.pi * self.DATA_VAR) - (x0 - self.DATA_MEAN) ** 2 / (2 * self.DATA_VAR), 1
        )
        return x0, data_nll

    def bound_nats(self, sched, model_fn, x0, seed, **kwargs):
        run = jax.jit(
            lambda x, k: jd.variational_bound(sched, model_fn, x, k, decoder="gaussian", chunk_size=64, **kwargs)
        )
        return np.asarray(run(jnp.asarray(x0, jnp.float32), jax.random.key(seed)).to_nats(3).total, np.float64)

    def test_bound_is_above_the_exact_model_nll(self):
        # With the optimal denoiser for Gaussian data every reverse step is linear-Gaussian, so the model's own
        # -log p_theta(x0) is exact (reference.gaussian_model_marginal): the bound must lie above it, and above the
        # data's own NLL (cross-entropy >= entropy), up to Monte Carlo error.
        x0, data_nll = self.gaussian_data(4096, seed=0)
        for num_timesteps in (10, 100, 1000):
            sched = make_schedule("cosine", num_timesteps)
            model_fn = optimal_gaussian_eps_model(sched, jnp.asarray(self.DATA_MEAN), jnp.asarray(self.DATA_VAR))
            nats = self.bound_nats(sched, model_fn, x0, seed=num_timesteps)
            m, v = reference.gaussian_model_marginal(
                beta_schedule("cosine", num_timesteps), self.DATA_MEAN, self.DATA_VAR
            )
            model_nll = -np.sum(-0.5 * np.log(2 * np.pi * v) - (x0 - m) ** 2 / (2 * v), axis=1)
            for nll in (model_nll, data_nll):
                gap = nats - nll  # its sample mean estimates a KL divergence >= 0
                assert gap.mean() > -3 * gap.std() / math.sqrt(len(gap)), (num_timesteps, gap.mean())
            assert model_nll.mean() >= data_nll.mean() - 3 * (model_nll - data_nll).std() / 64

    def test_bound_tightens_as_the_chain_is_refined(self):
        # Steps evenly spaced in log-SNR with fixed ends; the reverse step is q(x_{t-1} | x_t, x0 = optimal x0_hat)
        # (variance beta~), and the decoder's variance is fixed, so refining the grid can only lower the bound
        # (Kingma et al. 2021, appendix): the gap to the true NLL must fall towards 0.
        x0, data_nll = self.gaussian_data(8192, seed=1)
        gaps = []
        for num_timesteps in (9, 33, 129, 513):
            sched = log_snr_schedule(num_timesteps)
            eps_fn = optimal_gaussian_eps_model(sched, jnp.asarray(self.DATA_MEAN), jnp.asarray(self.DATA_VAR))

            def model_fn(x_t, ts, sched=sched, eps_fn=eps_fn):
                log_var = jnp.where(ts == 0, math.log(1e-4), jnp.log(jnp.take(sched.posterior_variance, ts)))
                return jnp.concatenate([eps_fn(x_t, ts), jnp.broadcast_to(log_var[:, None], x_t.shape)], -1)

            gap = self.bound_nats(sched, model_fn, x0, seed=num_timesteps, variance="learned") - data_nll
            assert gap.mean() > 3 * gap.std() / math.sqrt(len(gap))
            gaps.append(gap.mean())
        assert all(a > 1.5 * b for a, b in itertools.pairwise(gaps)), gaps
        assert gaps[-1] < 0.3, gaps

    def test_oracle_denoiser_leaves_only_prior_and_decoder(self):
        # A model that knows x0 has p_theta(x_{t-1} | x_t) = q(x_{t-1} | x_t, x_0): every KL term vanishes. The oracle
        # reads coefficients of the ORIGINAL chain at the timesteps it is given, so on a respaced chain it is exact
        # only if timestep_map sends each index to its original step.
        betas = beta_schedule("linear", T)
        full = make_schedule("linear", T)
        x0 = images(15, (2, 4, 4, 3))
        # The network is called example-major: row b * chunk + j is example b.
        oracle = lambda x_t, ts: diffusion.predict_eps_from_x0(full, x_t, ts, jnp.repeat(x0, x_t.shape[0] // 2, axis=0))
        for sched in (full, respace(betas, space_timesteps(T, 50))):
            bound = jd.variational_bound(sched, oracle, x0, jax.random.key(1), chunk_size=25)
            assert bound.per_timestep.shape == (2, sched.num_timesteps)
            np.testing.assert_allclose(bound.denoising, 0.0, atol=1e-3 * sched.num_timesteps / T + 1e-4)
            std = math.sqrt(float(sched.posterior_variance[1]))  # beta~ of the second step, at the first
            decoder = -reference.discretized_log_prob(np.asarray(x0, np.float64), np.asarray(x0, np.float64), std)
            np.testing.assert_allclose(bound.reconstruction, decoder.mean((1, 2, 3)) / math.log(2), rtol=1e-4)

    def test_bound_does_not_depend_on_the_chunk_size(self):
        sched = make_schedule("linear", 100)
        x0 = images(16, (3, 4, 4, 1))
        model_fn = lambda x, ts: 0.1 * x + 0.001 * ts[:, None, None, None]
        run = lambda c: jax.jit(lambda x: jd.variational_bound(sched, model_fn, x, jax.random.key(2), chunk_size=c))(x0)
        ref = run(100)
        for chunk in (1, 7, 32):
            for a, b in zip(run(chunk), ref, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # only summation order differs

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("fixed_small", "fixed_large")
    def test_bound_terms_equal_a_float64_reference_term_by_term(self, variance):
        # A 20-step chain that stops short of N(0, I) (abar_T = 0.11: a prior term of 0.03 bits/dim), an eps-model
        # linear in x_t, and images with both edge levels: every term against tests/reference.py's float64 bound, which
        # shares no code with jaxdiff (the KL of the completed-square posterior, DDPM's eq. 11 mean, scipy's normal CDF
        # for L_0). T = 20 with the default chunk of 16 also pads the last chunk.
        betas = np.linspace(1e-3, 0.2, 20)
        sched = jd.Schedule.from_betas(betas)
        gain = 0.9 * np.sqrt(1.0 - reference.cumulative_product(1.0 - betas))
        model_fn = lambda x, ts: jnp.asarray(gain, jnp.float32)[ts].reshape(-1, 1, 1, 1) * x + 0.1
        x0 = np.asarray(images(17, (2, 4, 4, 3)), np.float64)
        x0[0, 0, 0], x0[1, 0, 0] = -1.0, 1.0
        key = jax.random.key(3)
        bound = self.variant(lambda x, k: jd.variational_bound(sched, model_fn, x, k, variance=variance))(
            jnp.asarray(x0, jnp.float32), key
        )
        # Timestep t's noise is normal(fold_in(key, t)) (variational_bound's documented draw).
        noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, t), x0.shape)) for t in range(20)])
        prior, per_t = reference.ddpm_bound_bits_per_dim(betas, lambda x, t: gain[t] * x + 0.1, x0, noise, variance)
        assert prior.min() > 0.01 and per_t.min() > 1e-3  # no term too small to be checked
        # Measured (AMD EPYC): 6e-6 at most on a KL term (the smallest, ~0.015 bits/dim, lose most to float32's
        # cancellation in the KL), 5e-7 on the prior and the sums.
        np.testing.assert_allclose(bound.per_timestep, per_t, rtol=3e-5)
        np.testing.assert_allclose(bound.prior, prior, rtol=3e-6)
        np.testing.assert_allclose(bound.reconstruction, per_t[:, 0], rtol=3e-6)
        np.testing.assert_allclose(bound.denoising, per_t[:, 1:].sum(1), rtol=3e-6)
        np.testing.assert_allclose(bound.total, prior + per_t.sum(1), rtol=3e-6)
        nats = bound.to_nats(48)
        np.testing.assert_allclose(nats.total, bound.total * 48 * math.log(2), rtol=1e-6)
        assert isinstance(nats, jd.VariationalBound)

    def test_prior_term_of_the_ddpm_schedule_is_below_1e_5_bits_per_dim(self):
        x0 = jnp.asarray(np.linspace(-1, 1, 256).reshape(1, 256), jnp.float32)  # every 8-bit level once
        prior = float(jd.prior_bpd(LINEAR, x0)[0])
        abar = reference.cumulative_product(1 - beta_schedule("linear", T))[-1]
        x = np.linspace(-1, 1, 256)
        closed_form = np.mean(0.5 * (-np.log(1 - abar) + (1 - abar) + abar * x**2 - 1)) / math.log(2)
        np.testing.assert_allclose(prior, closed_form, rtol=1e-3)
        assert prior < 1e-5


class LossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("eps", "x0", "v")
    def test_simple_loss_is_the_mse_to_the_target(self, prediction):
        x0, eps, t = images(18, (4, 4, 4, 3)), normal(19, (4, 4, 4, 3)), spread_t(4)
        x_t = diffusion.q_sample(LINEAR, x0, t, eps)
        target = diffusion.prediction_target(LINEAR, x0, eps, t, prediction)
        loss = self.variant(lambda out: jd.training_losses(LINEAR, out, x0, x_t, t, eps, prediction=prediction))
        np.testing.assert_allclose(loss(target), 0.0, atol=1e-12)
        np.testing.assert_allclose(loss(target + 0.5), 0.25, rtol=1e-6)

    def test_min_snr_weights(self):
        t = jnp.array([0, 100, 400, 999])
        snr = np.asarray(LINEAR.snr)[np.asarray(t)]
        for prediction, expected in [
            ("eps", np.minimum(snr, 5.0) / snr),
            ("x0", np.minimum(snr, 5.0)),
            ("v", np.minimum(snr, 5.0) / (snr + 1)),
        ]:
            np.testing.assert_allclose(jd.snr_weight(LINEAR, t, prediction, 5.0), expected, rtol=1e-6)
        # Every weighting turns its prediction's error into min(SNR, gamma) times the error in x0.
        x0, eps = images(20, (4, 2, 2, 1)), normal(21, (4, 2, 2, 1))
        x_t = diffusion.q_sample(LINEAR, x0, t, eps)
        x0_err = 0.01
        losses = []
        for prediction in ("eps", "x0", "v"):
            bad_x0 = x0 + x0_err
            out = diffusion.prediction_target(
                LINEAR, bad_x0, diffusion.predict_eps_from_x0(LINEAR, x_t, t, bad_x0), t, prediction
            )
            losses.append(jd.training_losses(LINEAR, out, x0, x_t, t, eps, prediction=prediction, weighting="min_snr"))
        np.testing.assert_allclose(losses[0], losses[1], rtol=2e-2)
        np.testing.assert_allclose(losses[2], losses[1], rtol=2e-2)
        np.testing.assert_allclose(losses[1], np.minimum(snr, 5.0) * x0_err**2, rtol=2e-2)

    def test_bound_loss_is_T_times_the_bound_term(self):
        x0, eps, t = images(22, (4, 4, 4, 3)), normal(23, (4, 4, 4, 3)), jnp.array([0, 1, 500, 999])
        x_t = diffusion.q_sample(LINEAR, x0, t, eps)
        out = 0.9 * eps
        loss = jd.training_losses(LINEAR, out, x0, x_t, t, eps, loss_type="bound")
        np.testing.assert_allclose(loss, T * jd.vb_term_bpd(LINEAR, out, x0, x_t, t), rtol=1e-6)

    def test_hybrid_trains_the_mean_only_through_the_simple_loss(self):
        x0, eps, t = images(24, (4, 4, 4, 3)), normal(25, (4, 4, 4, 3)), jnp.array([0, 1, 500, 999])
        x_t = diffusion.q_sample(LINEAR, x0, t, eps)
        out = jnp.concatenate([0.8 * eps, jnp.full_like(eps, 0.3)], -1)
        kw = dict(variance="learned_range")
        hybrid = lambda o: jd.training_losses(LINEAR, o, x0, x_t, t, eps, loss_type="hybrid", **kw).sum()
        simple = lambda o: jnp.sum(jnp.mean(jnp.square(o[..., :3] - eps), axis=(1, 2, 3)))
        bound = lambda o: jd.training_losses(LINEAR, o, x0, x_t, t, eps, loss_type="bound", **kw).sum()
        g_hybrid, g_simple, g_bound = jax.grad(hybrid)(out), jax.grad(simple)(out), jax.grad(bound)(out)
        np.testing.assert_allclose(g_hybrid[..., :3], g_simple[..., :3], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(g_hybrid[..., 3:], 1e-3 * g_bound[..., 3:], rtol=1e-4, atol=1e-9)
        assert np.abs(g_hybrid[..., 3:]).sum() > 0
        value = hybrid(out)
        np.testing.assert_allclose(value, simple(out) + 1e-3 * bound(out), rtol=1e-5)

    def test_diffusion_loss_runs_the_model_at_the_original_timesteps(self):
        sched = respace(beta_schedule("linear", T), space_timesteps(T, 10))
        seen = []
        model_fn = lambda x, ts: (seen.append(ts), jnp.zeros_like(x))[1]
        t = jnp.array([0, 9])
        jd.diffusion_loss(sched, model_fn, images(26, (2, 2, 2, 1)), t, normal(27, (2, 2, 2, 1)))
        np.testing.assert_array_equal(seen[0], [0, 999])


class TransformsTest(chex.TestCase):
    def test_vmap_over_an_extra_axis_matches_the_batch(self):
        x0, eps, t = images(28, (3, 4, 4, 2)), normal(29, (3, 4, 4, 2)), jnp.array([3, 30, 300])
        batched = diffusion.q_sample(COSINE, x0, t, eps)
        mapped = jax.vmap(lambda a, b, c: diffusion.q_sample(COSINE, a[None], c[None], b[None])[0])(x0, eps, t)
        np.testing.assert_allclose(mapped, batched, rtol=1e-6)
        schedules_stack = jax.tree_util.tree_map(lambda *a: jnp.stack(a), LINEAR, COSINE)
        per_schedule = jax.vmap(lambda s: diffusion.q_sample(s, x0, t, eps))(schedules_stack)
        np.testing.assert_allclose(per_schedule[1], batched, rtol=1e-6)

    def test_grad_of_the_bound_term_is_finite_and_matches_finite_differences(self):
        x0, eps, t = images(30, (2, 2, 2, 1)), normal(31, (2, 2, 2, 1)), jnp.array([0, 200])
        x_t = diffusion.q_sample(LINEAR, x0, t, eps)
        f = lambda s: jd.vb_term_bpd(LINEAR, s * eps, x0, x_t, t).sum()
        g = jax.grad(f)(1.1)
        h = 1e-2
        np.testing.assert_allclose(g, (f(1.1 + h) - f(1.1 - h)) / (2 * h), rtol=2e-2)


def test_bad_input_raises_clear_errors():
    x0, eps, t = images(32, (2, 4, 4, 3)), normal(33, (2, 4, 4, 3)), jnp.array([1, 2])
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        diffusion.q_sample(LINEAR, x0, jnp.array([1, 2, 3]), eps)
    with pytest.raises(ValueError, match="integer"):
        diffusion.q_sample(LINEAR, x0, jnp.array([1.0, 2.0]), eps)
    with pytest.raises(ValueError, match="Shapes must match"):
        diffusion.q_sample(LINEAR, x0, t, eps[..., :2])
    with pytest.raises(ValueError, match="Unknown prediction 'score'; choose one of eps, x0, v"):
        diffusion.p_mean_variance(LINEAR, eps, x0, t, prediction="score")
    with pytest.raises(ValueError, match="Unknown variance 'fixed'"):
        diffusion.p_mean_variance(LINEAR, eps, x0, t, variance="fixed")
    with pytest.raises(ValueError, match="twice the channels"):
        diffusion.p_mean_variance(LINEAR, eps, x0, t, variance="learned")
    with pytest.raises(ValueError, match="Unknown loss type"):
        jd.training_losses(LINEAR, eps, x0, x0, t, eps, loss_type="l1")
    with pytest.raises(ValueError, match="hybrid"):
        jd.training_losses(LINEAR, jnp.concatenate([eps, eps], -1), x0, x0, t, eps, variance="learned")
    with pytest.raises(ValueError, match="needs variance 'learned'"):
        jd.training_losses(LINEAR, eps, x0, x0, t, eps, loss_type="hybrid")
    with pytest.raises(ValueError, match="Unknown decoder"):
        jd.vb_term_bpd(LINEAR, eps, x0, x0, t, decoder="logistic")
    with pytest.raises(ValueError, match="chunk_size"):
        jd.variational_bound(LINEAR, lambda x, s: x, x0, jax.random.key(0), chunk_size=0)


def test_public_names_are_reexported():
    for name in ["q_sample", "q_posterior_mean_variance", "p_mean_variance", "variational_bound", "Schedule"]:
        assert hasattr(jd, name) and name in jd.__all__
