"""The core install's promise, checked where only the core is importable: ``python tests/core_check.py``.

Run two ways:
- by tests/test_install.py, under ``python -S`` with a ``sys.path`` that holds jaxdiff and the distributions that
  the core's requirements resolve to in this environment (nothing else): the pure math imports nothing beyond them;
- by .ci/run's floor step, in a fresh venv holding the core at the lowest versions pyproject.toml allows.

It asserts closed forms, not that something ran: q_sample's moments, the bound's prior term and the sum of its
terms, DDIM's end point on Gaussian data against the probability-flow map; then that the training stack is absent
(``flax``, ``tensorflow``) and that a module needing it names the extra. Prints one line per check; exit status 1 on
the first failure.
"""

import math
import sys


def main() -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxdiff
    from jaxdiff import samplers

    for heavy in ("flax", "tensorflow", "optax", "orbax"):
        assert heavy not in sys.modules, f"import jaxdiff loaded {heavy}"
    print(f"jaxdiff {jaxdiff.__version__} on jax {jax.__version__}, numpy {np.__version__}: imported the core")

    schedule = jaxdiff.make_schedule("linear", 100)
    abar = np.asarray(schedule.alphas_cumprod, np.float64)

    # q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): the sample moments of 2^16 draws within 6 standard errors.
    n, t = 2**16, 30
    x0 = jnp.full((n, 1), 0.7)
    xt = np.asarray(jaxdiff.q_sample(schedule, x0, jnp.full((n,), t), jax.random.normal(jax.random.key(0), (n, 1))))
    mean, var = math.sqrt(abar[t]) * 0.7, 1.0 - abar[t]
    assert abs(xt.mean() - mean) < 6 * math.sqrt(var / n), (xt.mean(), mean)
    assert abs(xt.var() - var) < 6 * var * math.sqrt(2.0 / n), (xt.var(), var)
    print("q_sample: mean and variance of q(x_t | x_0) within 6 standard errors")

    # Gaussian data N(0, s^2) per dimension: the exact eps-predictor is eps* = sqrt(1 - abar_t) x_t / v_t with
    # v_t = abar_t s^2 + 1 - abar_t.
    s = 0.5
    sqrt_1m = jnp.asarray(np.sqrt(1.0 - abar), jnp.float32)
    v = jnp.asarray(abar * s**2 + 1.0 - abar, jnp.float32)

    def exact_eps(x, t, *_):
        return sqrt_1m[t][:, None, None, None] * x / v[t][:, None, None, None]

    # The bound: its prior term is KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) per dimension, in bits; the terms
    # add up to the total.
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
    bound = jaxdiff.variational_bound(schedule, exact_eps, images, jax.random.key(1))
    a_T = abar[-1]
    x = np.asarray(images, np.float64).reshape(2, -1)
    kl = 0.5 * (a_T * x**2 + (1.0 - a_T) - 1.0 - math.log(1.0 - a_T))
    prior = kl.mean(axis=1) / math.log(2.0)
    np.testing.assert_allclose(np.asarray(bound.prior), prior, rtol=1e-4, atol=1e-9)
    parts = np.asarray(bound.prior + bound.denoising + bound.reconstruction)
    np.testing.assert_allclose(np.asarray(bound.total), parts, rtol=1e-5)
    print(f"variational_bound: the prior term equals its closed form ({prior[0]:.3e} bits/dim); the terms add up")

    # DDIM (eta = 0) over 100 of DDPM's 1,000 steps with the exact eps: the probability-flow map of Gaussian data
    # takes x_T to x_T * s / sqrt(v_T) (the ratio of the two marginals' standard deviations); DDIM, a first-order
    # solver, lands within 5% of s (measured: 3.6% of s).
    betas = jaxdiff.beta_schedule("linear", 1000)
    few = jaxdiff.respace(betas, jaxdiff.space_timesteps(1000, 100))
    sqrt_1m = jnp.asarray(np.sqrt(1.0 - np.asarray(few.alphas_cumprod, np.float64)), jnp.float32)
    v = jnp.asarray(np.asarray(few.alphas_cumprod) * s**2 + 1.0 - np.asarray(few.alphas_cumprod), jnp.float32)
    x_T = jax.random.normal(jax.random.key(2), (8, 4, 4, 1))
    out = samplers.ddim_sample(few, exact_eps, x_T.shape, jax.random.key(3), clip_x0=False, x_T=x_T)
    expected = np.asarray(x_T) * s / math.sqrt(float(v[-1]))
    error = float(np.max(np.abs(np.asarray(out) - expected)))
    assert error < 0.05 * s, error
    print(f"ddim_sample: the probability-flow end point of Gaussian data, max error {error:.1e}")

    for heavy in ("flax", "tensorflow"):
        try:
            __import__(heavy)
        except ImportError:
            continue
        raise AssertionError(f"{heavy} is importable: this is not a core-only environment")
    try:
        import jaxdiff.experiment
    except ImportError as e:
        assert "jaxdiff[train]" in str(e), str(e)
        print(f"import jaxdiff.experiment: {e}")
    else:
        raise AssertionError("jaxdiff.experiment imported without the training stack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
