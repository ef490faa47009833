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


def normal_kl(mean1: np.ndarray, var1: np.ndarray, mean2: np.ndarray, var2: np.ndarray) -> np.ndarray:
    """KL(N(mean1, var1) || N(mean2, var2)) in nats, elementwise: E_1[log p_1 - log p_2] of the two densities."""
    return 0.5 * (np.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


def ddpm_bound_bits_per_dim(
    betas: np.ndarray, eps_fn, x0: np.ndarray, noise: np.ndarray, variance: str = "fixed_small"
) -> tuple[np.ndarray, np.ndarray]:
    """The DDPM variational bound of the images ``x0`` ``[B, ...]`` (on the 256 levels), term by term, in bits/dim.

    The chain has ``betas`` ``[T]``; timestep t (0-indexed) is noised with ``noise[t]``: x_t = sqrt(abar_t) x0 +
    sqrt(1 - abar_t) noise[t]. The model ``eps_fn(x_t, t)`` predicts eps; its reverse step has DDPM's eq. 11 mean,
    (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t), and the variance beta~_t (``fixed_small``) or beta_t
    (``fixed_large``), beta~ at the first step either way (beta~ of the second, as beta~_1 = 0). Column 0 of the
    result is L_0 = -log P(x0's 8-bit bin) under that Gaussian; column t > 0 is KL(q(x_{t-1} | x_t, x0) || p(x_{t-1}
    | x_t)), the posterior by :func:`posterior_by_completing_the_square`.

    Returns:
      (prior ``[B]``, per-timestep ``[B, T]``): KL(q(x_T | x0) || N(0, I)) and the L_t, each averaged over the
      dimensions and divided by ln 2.
    """
    alphas = 1.0 - betas
    abar = cumulative_product(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    small = betas * (1.0 - abar_prev) / (1.0 - abar)
    small[0] = small[1]
    model_var = small if variance == "fixed_small" else np.concatenate([[small[0]], betas[1:]])
    per_dim = lambda nats: nats.reshape(len(x0), -1).mean(1) / math.log(2.0)
    per_t = []
    for t in range(len(betas)):
        x_t = math.sqrt(abar[t]) * x0 + math.sqrt(1.0 - abar[t]) * noise[t]
        mean = (x_t - betas[t] / math.sqrt(1.0 - abar[t]) * eps_fn(x_t, t)) / math.sqrt(alphas[t])
        if t == 0:
            per_t.append(per_dim(-discretized_log_prob(x0, mean, math.sqrt(model_var[0]))))
        else:
            q_mean, q_var = posterior_by_completing_the_square(betas[t], abar_prev[t], x0, x_t)
            per_t.append(per_dim(normal_kl(q_mean, q_var, mean, model_var[t])))
    prior = per_dim(normal_kl(math.sqrt(abar[-1]) * x0, 1.0 - abar[-1], 0.0, 1.0))
    return prior, np.stack(per_t, axis=1)


def ancestral_sample(abar: np.ndarray, model_fn, variance: str, x_T: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """DDPM's Algorithm 2 on the chain with cumulative products ``abar`` ``[S]``: from x_T, for i = S-1, ..., 0,
    x_{i-1} = (x_i - beta_i / sqrt(1 - abar_i) eps) / sqrt(alpha_i) + sigma_i noise[i], no noise at i = 0.

    ``model_fn(x, i) -> (eps, v)``; the variance output v gives log sigma_i^2 = v (``learned``), or (``learned_range``,
    improved DDPM eq. 15) frac log beta_i + (1 - frac) log beta~_i with frac = (v + 1) / 2, beta~_0 := beta~_1.
    """
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    betas = 1.0 - abar / abar_prev
    small = betas * (1.0 - abar_prev) / (1.0 - abar)
    small[0] = small[1]
    x = x_T
    for i in range(len(abar) - 1, -1, -1):
        eps, v = model_fn(x, i)
        mean = (x - betas[i] / math.sqrt(1.0 - abar[i]) * eps) / math.sqrt(1.0 - betas[i])
        if variance == "learned":
            log_var = v
        else:
            frac = (v + 1.0) / 2.0
            log_var = frac * math.log(betas[i]) + (1.0 - frac) * math.log(small[i])
        x = mean + np.exp(0.5 * log_var) * noise[i] if i > 0 else mean
    return x


def noise_level_grid(abar: np.ndarray, num_steps: int, spacing: str) -> np.ndarray:
    """The timesteps nearest (in log sigma, sigma = sqrt((1 - abar) / abar)) to ``num_steps`` levels from the first to
    the last: evenly spaced in log sigma (``logsnr``, DPM-Solver's grid) or in sigma^(1/7) (``karras``)."""
    log_sigma = 0.5 * np.log((1.0 - abar) / abar)
    if spacing == "logsnr":
        targets = np.linspace(log_sigma[0], log_sigma[-1], num_steps)
    else:
        targets = 7.0 * np.log(np.linspace(np.exp(log_sigma[0] / 7.0), np.exp(log_sigma[-1] / 7.0), num_steps))
    grid = np.array([int(np.argmin(np.abs(log_sigma - target))) for target in targets])
    assert np.all(np.diff(grid) > 0), grid  # the tests ask for few enough steps that no two levels merge
    return grid


def ddim_deterministic_sample(abar: np.ndarray, denoise, x_T: np.ndarray) -> np.ndarray:
    """DDIM (Song et al. 2021, eq. 12) at eta = 0 on the chain ``abar`` ``[S]``: with x0 = ``denoise(x, i)`` and the
    eps that x0 implies, x_{i-1} = sqrt(abar_{i-1}) x0 + sqrt(1 - abar_{i-1}) eps (abar_{-1} = 1: the last step gives
    x0)."""
    x = x_T
    for i in range(len(abar) - 1, -1, -1):
        x0 = denoise(x, i)
        eps = (x - math.sqrt(abar[i]) * x0) / math.sqrt(1.0 - abar[i])
        abar_next = abar[i - 1] if i > 0 else 1.0
        x = math.sqrt(abar_next) * x0 + math.sqrt(1.0 - abar_next) * eps
    return x


def dpm_solver_pp_3m_sample(abar: np.ndarray, denoise, x_T: np.ndarray, nodes: int = 16) -> np.ndarray:
    """DPM-Solver++ (Lu et al. 2022) 3M on the chain ``abar`` ``[S]``, in lambda = log(alpha / sigma): the exact
    solution x_next = (sigma_next / sigma) x + sigma_next * int e^lambda D(lambda) d lambda over the step, with D the
    quadratic through the last three x0 predictions ``denoise(x, i)`` (integrated by Gauss-Legendre quadrature). The
    first step takes D constant (DDIM), the second is DPM-Solver++(2M), D = (1 + 1/(2r)) D_0 - 1/(2r) D_1 with
    r = h_prev / h; the last (to abar = 1) returns D."""
    lam = 0.5 * np.log(abar / (1.0 - abar))
    u, w = np.polynomial.legendre.leggauss(nodes)
    x, history = x_T, []  # (lambda, D) of the steps so far, newest first
    for i in range(len(abar) - 1, -1, -1):
        d = denoise(x, i)
        history.insert(0, (lam[i], d))
        if i == 0:
            return d
        alpha_next, sigma_next, sigma = math.sqrt(abar[i - 1]), math.sqrt(1 - abar[i - 1]), math.sqrt(1 - abar[i])
        h = lam[i - 1] - lam[i]
        if len(history) <= 2:  # DDIM, then 2M: one D held constant over the step
            d_step = d
            if len(history) == 2:
                r = (lam[i] - history[1][0]) / h
                d_step = (1 + 1 / (2 * r)) * d - history[1][1] / (2 * r)
            x = sigma_next / sigma * x + alpha_next * (1.0 - math.exp(-h)) * d_step
        else:
            points = history[:3]
            s = lam[i] + (u + 1.0) / 2.0 * h  # the quadrature nodes on [lambda_i, lambda_{i-1}]
            integral = 0.0
            for j, (lam_j, d_j) in enumerate(points):
                others = [p[0] for k, p in enumerate(points) if k != j]
                basis = (s - others[0]) * (s - others[1]) / ((lam_j - others[0]) * (lam_j - others[1]))
                integral = integral + (h / 2.0) * np.sum(w * np.exp(s) * basis) * d_j
            x = sigma_next / sigma * x + sigma_next * integral
    return x


def heun_sample(abar: np.ndarray, denoise, x_T: np.ndarray) -> np.ndarray:
    """Heun's method (Karras et al. 2022, Algorithm 1) on dx~/dsigma = (x~ - D) / sigma, x~ = x / sqrt(abar),
    sigma = sqrt((1 - abar) / abar), over the chain ``abar`` ``[S]`` down to sigma = 0 (an Euler step there, which
    gives D); D at (x~, i) is ``denoise(x~ sqrt(abar_i), i)``."""
    sigmas = np.sqrt((1.0 - abar) / abar)
    x_tilde = x_T / math.sqrt(abar[-1])
    for i in range(len(abar) - 1, -1, -1):
        sigma, sigma_next = sigmas[i], sigmas[i - 1] if i > 0 else 0.0
        slope = (x_tilde - denoise(x_tilde * math.sqrt(abar[i]), i)) / sigma
        euler = x_tilde + (sigma_next - sigma) * slope
        if i == 0:
            x_tilde = euler
        else:
            slope_next = (euler - denoise(euler * math.sqrt(abar[i - 1]), i - 1)) / sigma_next
            x_tilde = x_tilde + (sigma_next - sigma) * (slope + slope_next) / 2.0
    return x_tilde
