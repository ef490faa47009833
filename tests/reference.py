"""Independent float64 numpy references for the tests: written from the formulas, sharing no code with jaxdiff."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def cumulative_product(values: np.ndarray) -> np.ndarray:
    out, acc = np.empty_like(values), 1.0
    for i, v in enumerate(values):
        acc *= v
        out[i] = acc
    return out


def posterior_by_completing_the_square(beta_t: float, abar_prev: float, x0: np.ndarray, x_t: np.ndarray):
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0): add the precisions, precision-weight the means."""
    alpha_t = 1.0 - beta_t
    # q(x_t | x_{t-1}) as a function of x_{t-1}: N(x_t / sqrt(alpha), beta / alpha), precision alpha / beta.
    precision = alpha_t / beta_t + 1.0 / (1.0 - abar_prev)
    mean = (np.sqrt(alpha_t) * x_t / beta_t + np.sqrt(abar_prev) * x0 / (1.0 - abar_prev)) / precision
    return mean, 1.0 / precision


def posterior_by_quadratic_fit(beta_t: float, abar_prev: float, x0: float, x_t: float):
    """The same posterior found numerically: fit a parabola to the log of the product of the two densities."""
    alpha_t = 1.0 - beta_t
    sd_guess = math.sqrt(beta_t)
    centre = x_t / math.sqrt(alpha_t)
    grid = np.linspace(centre - 5 * sd_guess, centre + 5 * sd_guess, 201)
    log_density = stats.norm.logpdf(x_t, math.sqrt(alpha_t) * grid, math.sqrt(beta_t)) + stats.norm.logpdf(
        grid, math.sqrt(abar_prev) * x0, math.sqrt(1.0 - abar_prev)
    )
    a, b, _ = np.polyfit(grid - centre, log_density, 2)
    return centre - b / (2 * a), -1.0 / (2 * a)


def kl_by_quadrature(m1: float, s1: float, m2: float, s2: float) -> float:
    grid = np.linspace(m1 - 12 * s1, m1 + 12 * s1, 200_001)
    p = stats.norm.pdf(grid, m1, s1)
    integrand = p * (stats.norm.logpdf(grid, m1, s1) - stats.norm.logpdf(grid, m2, s2))
    return float(np.trapezoid(integrand, grid))


def discretized_log_prob(x: np.ndarray, mean: float, std: float, num_bins: int = 256) -> np.ndarray:
    """log P(bin of x) for a Gaussian, edge bins open to +-inf, from scipy's float64 CDFs."""
    half = 1.0 / (num_bins - 1)
    lo = np.where(x <= -1 + half / 2, -np.inf, x - half)
    hi = np.where(x >= 1 - half / 2, np.inf, x + half)
    # P(lo < X < hi), computed from whichever tail keeps it accurate.
    upper_tail = stats.norm.sf(lo, mean, std) - stats.norm.sf(hi, mean, std)
    lower_tail = stats.norm.cdf(hi, mean, std) - stats.norm.cdf(lo, mean, std)
    with np.errstate(divide="ignore"):  # a mass that underflows float64 is -inf; the tests skip those levels
        return np.log(np.where(x > mean, upper_tail, lower_tail))


def gaussian_model_marginal(betas: np.ndarray, data_mean: np.ndarray, data_var: np.ndarray):
    """The exact marginal p_theta(x_0) = N(m, v) of the DDPM chain whose eps-model is the optimal (posterior-mean)
    denoiser for data N(data_mean, diag(data_var)), with fixed_small variances (beta~, clipped at t = 1 to beta~_2)
    and a continuous Gaussian decoder. For Gaussian data the optimal x0 prediction is linear in x_t, so every reverse
    step is a linear-Gaussian map and the marginal follows by recursion from x_T ~ N(0, I)."""
    alphas = 1.0 - betas
    abar = cumulative_product(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    step_var = np.concatenate([[post_var[1]], post_var[1:]])
    m, v = np.zeros_like(data_mean), np.ones_like(data_var)
    for i in range(len(betas) - 1, -1, -1):
        a = math.sqrt(abar[i])
        gain = a * data_var / (abar[i] * data_var + 1 - abar[i])  # E[x0|x_t] = data_mean + gain (x_t - a data_mean)
        c1 = math.sqrt(abar_prev[i]) * betas[i] / (1 - abar[i])
        c2 = math.sqrt(alphas[i]) * (1 - abar_prev[i]) / (1 - abar[i])
        slope = c1 * gain + c2
        offset = c1 * (data_mean - gain * a * data_mean)
        m, v = slope * m + offset, slope**2 * v + step_var[i]
    return m, v
