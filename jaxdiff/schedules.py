"""Noise schedules of the forward process and their precomputed coefficients.

Timesteps are 0-indexed: array index ``i`` holds the paper's step ``t = i + 1``, so a schedule of length ``T`` covers
the paper's ``t = 1..T`` (the convention of the original DDPM code). Every coefficient is computed in float64 on the
host and stored as a float32 device array, so the error of a long cumulative product never enters the model.

Notation: ``alpha_t = 1 - beta_t`` and ``abar_t = prod_{s <= t} alpha_s``.

The step grids live here too: :func:`respace` keeps any subset of a chain's timesteps with abar unchanged there;
:func:`respaced` spreads ``steps`` of them evenly or quadratically in t (:func:`space_timesteps`) or by noise level
(:func:`snr_spaced_timesteps`: DPM-Solver's log-SNR grid, Karras et al.'s sigma grid), and
:func:`sampling_schedule` does both from a schedule's name. Solvers that leave the grid read the noise level of a
fractional timestep (:func:`log_sigmas`, :func:`timestep_at`, :func:`log_sigma_at`), and SDEdit starts part of the way
down (:func:`truncated`). Samplers ask this module for a grid and never build one themselves.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import ConfigError

#: The beta schedules :func:`beta_schedule` makes by name.
BETA_SCHEDULES = (
    "linear",
    "cosine",
    "quadratic",
    "sigmoid",
    "constant",
    "warmup10",
    "warmup50",
)

#: Step grids spread in t (:func:`space_timesteps`).
SPACINGS = ("even", "quadratic", "trailing")
SNR_SPACINGS = ("logsnr", "karras")  #: spacings that need the betas (see snr_spaced_timesteps)
#: Karras et al.'s rho of the ``karras`` grid: sigma_i^(1/rho) evenly spaced.
KARRAS_RHO = 7.0
#: DDPM's range of the linear schedule at T = 1000 (Ho et al. 2020); :func:`beta_schedule` scales it by 1000 / T.
DDPM_BETA_RANGE = (1e-4, 0.02)
#: The largest abar_T of a chain that reaches noise: above it :func:`beta_schedule` warns. At abar_T = 1e-2,
#: x_T = sqrt(abar_T) x_0 + sqrt(1 - abar_T) eps keeps 10% of the image's amplitude, so a sampler started from N(0, I)
#: starts visibly off the chain's own x_T, and the prior term KL(q(x_T | x_0) || N(0, I)) =
#: (abar_T x_0^2 - abar_T - log(1 - abar_T)) / 2 is ~5e-3 nats a dimension for x_0 = +-1, no longer negligible. The
#: shipped configs' chains end 2 to 5 orders of magnitude below it (linear: 4.0e-5 at T = 1000, 2.0e-5 at T = 100 with
#: the default range; cosine at T = 250: 3.9e-8).
MAX_FINAL_ALPHA_BAR = 1e-2

__all__ = [
    "BETA_SCHEDULES",
    "DDPM_BETA_RANGE",
    "KARRAS_RHO",
    "MAX_FINAL_ALPHA_BAR",
    "SNR_SPACINGS",
    "SPACINGS",
    "Schedule",
    "beta_schedule",
    "cosine_alpha_bar",
    "log_sigma_at",
    "log_sigmas",
    "make_schedule",
    "rescale_zero_terminal_snr",
    "respace",
    "respaced",
    "sampling_schedule",
    "snr_spaced_timesteps",
    "space_timesteps",
    "timestep_at",
    "truncated",
]


def _check_num_timesteps(num_timesteps: int) -> None:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
        raise ConfigError(f"num_timesteps must be an int, got {num_timesteps!r}.")
    if num_timesteps < 1:
        raise ConfigError(f"num_timesteps must be >= 1, got {num_timesteps}.")


def cosine_alpha_bar(u: np.ndarray, s: float = 0.008) -> np.ndarray:
    r"""The cosine schedule's abar as a function of continuous time u in [0, 1], normalised so abar(0) = 1.

    .. math:: \bar\alpha(u) = f(u) / f(0), \quad f(u) = \cos^2\left(\frac{u + s}{1 + s} \frac{\pi}{2}\right)

    (Nichol & Dhariwal 2021, eq. 17.)
    """
    f = lambda v: np.cos((np.asarray(v, np.float64) + s) / (1 + s) * math.pi / 2) ** 2
    return f(u) / f(0.0)


def beta_schedule(
    name: str,
    num_timesteps: int,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> np.ndarray:
    """The betas of a named schedule, as a float64 numpy array of shape ``[num_timesteps]``.

    Args:
      name: one of ``BETA_SCHEDULES``:
        ``linear`` (DDPM: evenly spaced from ``beta_start`` to ``beta_end``; by default from 1e-4 * 1000 / T to
        0.02 * 1000 / T, improved DDPM's rule: DDPM's 1e-4 .. 0.02 at T = 1000, bit for bit, and at any T the same
        sum of betas, ~10, so abar_T lies between 8e-6 and 4e-5 for T in [50, 4000]),
        ``quadratic`` (evenly spaced in sqrt(beta)),
        ``sigmoid`` (a sigmoid over [-6, 6] rescaled to [beta_start, beta_end]),
        ``constant`` (``beta_end`` everywhere),
        ``warmup10`` / ``warmup50`` (``beta_end`` everywhere after a linear warmup over the first 10% / 50%),
        ``cosine`` (Nichol & Dhariwal 2021: ``beta_t = 1 - abar(t/T) / abar((t-1)/T)`` with the offset ``cosine_s``,
        clipped at ``max_beta``). The non-cosine schedules follow the original DDPM code.
      num_timesteps: T >= 1 (T > 20 for the default linear range, whose last beta 0.02 * 1000 / T reaches 1 at 20).
      beta_start, beta_end: the range of the non-cosine schedules, used as given (as a diffusers scheduler config or a
        checkpoint states them). Left out (None): DDPM's 1e-4 and 0.02, scaled by 1000 / T for ``linear`` only.
      cosine_s: the offset s of the cosine schedule.
      max_beta: the clip of the cosine schedule's betas.

    Returns:
      betas, float64, shape ``[T]``, each in (0, 1).

    Raises:
      ValueError: an unknown name, T < 1, or T <= 20 with the default linear range.

    Warns:
      UserWarning: if the chain does not reach noise, abar_T > ``MAX_FINAL_ALPHA_BAR`` (e.g. ``linear`` with DDPM's
        unscaled 1e-4 .. 0.02 at T = 250 ends at abar_T = 0.08).
    """
    _check_num_timesteps(num_timesteps)
    T = int(num_timesteps)
    scale = 1000 / T if name == "linear" else 1.0  # 1.0 exactly at T = 1000: DDPM's betas, bit for bit
    scaled_end = name == "linear" and beta_end is None
    beta_start = DDPM_BETA_RANGE[0] * scale if beta_start is None else beta_start
    beta_end = DDPM_BETA_RANGE[1] * scale if beta_end is None else beta_end
    if scaled_end and not beta_end < 1.0:  # (a range given that leaves (0, 1) is refused by Schedule.from_betas)
        raise ConfigError(
            f"The linear schedule ends at beta = {beta_end:.4g} >= 1 (with T = {T}, the default range is "
            f"1e-4 .. 0.02 scaled by 1000 / T, which needs T > 20). Use num_timesteps > 20, the cosine schedule, or "
            "pass beta_start and beta_end below 1 explicitly."
        )
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "quadratic":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif name == "sigmoid":
        sig = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T, dtype=np.float64)))
        betas = sig * (beta_end - beta_start) + beta_start
    elif name == "constant":
        betas = np.full(T, beta_end, dtype=np.float64)
    elif name in ("warmup10", "warmup50"):
        frac = 0.1 if name == "warmup10" else 0.5
        betas = np.full(T, beta_end, dtype=np.float64)
        warmup = int(T * frac)
        betas[:warmup] = np.linspace(beta_start, beta_end, warmup, dtype=np.float64)
    elif name == "cosine":
        u = np.arange(T + 1, dtype=np.float64) / T
        abar = cosine_alpha_bar(u, cosine_s)
        betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
    else:
        raise ConfigError(f"Unknown beta schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}.")
    _warn_unless_noise_is_reached(betas, f"The {name} schedule with T = {T}")
    return betas


def _warn_unless_noise_is_reached(betas: np.ndarray, what: str) -> None:
    """Warn (from the caller of the caller) if abar_T = prod(1 - beta_t) exceeds ``MAX_FINAL_ALPHA_BAR``."""
    final = float(np.prod(1.0 - np.asarray(betas, np.float64)))
    if final > MAX_FINAL_ALPHA_BAR:
        warnings.warn(
            f"{what} does not reach noise: it ends at abar_T = {final:.3g}, so x_T keeps {math.sqrt(final):.0%} of "
            "the image's amplitude, and sampling from N(0, I) starts off the chain. Raise num_timesteps, use the "
            "linear schedule's default range (scaled by 1000 / T: leave beta_start and beta_end unset) or the cosine "
            f"schedule (a chain is taken to reach noise when abar_T <= {MAX_FINAL_ALPHA_BAR:g}).",
            UserWarning,
            stacklevel=3,
        )


def _register_dataclass(cls):
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@_register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Precomputed per-timestep coefficients of a diffusion process; a pytree of float32 arrays of shape ``[T]``, and
    the noise levels of the original chain it was respaced from, ``[T_chain]``.

    Build one with :func:`make_schedule`, :meth:`Schedule.from_betas` or :func:`respace`; pass it into jitted functions
    as an ordinary argument. Index ``i`` is the paper's ``t = i + 1``; ``*_prev`` is ``t - 1`` (with ``abar_0 = 1``) and
    ``*_next`` is ``t + 1`` (with ``abar_{T+1} = 0``).

    Attributes:
      betas: beta_t.
      alphas: alpha_t = 1 - beta_t.
      log_betas: log beta_t.
      alphas_cumprod, alphas_cumprod_prev, alphas_cumprod_next: abar_t, abar_{t-1}, abar_{t+1}.
      sqrt_alphas_cumprod, sqrt_alphas_cumprod_prev: their square roots.
      sqrt_one_minus_alphas_cumprod: sqrt(1 - abar_t).
      log_one_minus_alphas_cumprod: log(1 - abar_t).
      sqrt_recip_alphas_cumprod: sqrt(1 / abar_t).
      sqrt_recipm1_alphas_cumprod: sqrt(1 / abar_t - 1).
      posterior_variance: beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (0 at t = 1).
      posterior_log_variance_clipped: log beta~_t with the first entry replaced by log beta~_2, as in DDPM (with T = 1,
        where no beta~_2 exists, log beta_1).
      posterior_mean_coef1: sqrt(abar_{t-1}) beta_t / (1 - abar_t), the coefficient of x_0 in mu~_t.
      posterior_mean_coef2: sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t), the coefficient of x_t in mu~_t.
      snr: abar_t / (1 - abar_t).
      timestep_map: int32, the original timestep that each index stands for (``arange(T)`` unless respaced); the
        network is always called with ``timestep_map[t]``.
      chain_log_sigmas: ``[T_chain]``, log sigma_s = 0.5 log((1 - abar_s) / abar_s) at every step s = 0 .. T_chain - 1
        of the original chain that ``timestep_map`` indexes (T_chain = T and the schedule's own levels unless
        respaced): where :func:`timestep_at` and :func:`log_sigma_at` read the levels between the kept steps. It is
        not a per-step field: :func:`truncated` keeps it whole.
    """

    betas: jax.Array
    alphas: jax.Array
    log_betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    alphas_cumprod_next: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_alphas_cumprod_prev: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    snr: jax.Array
    timestep_map: jax.Array
    chain_log_sigmas: jax.Array

    @property
    def num_timesteps(self) -> int:
        """T, the number of steps of this chain (static: known from the array shape)."""
        return self.betas.shape[0]

    @classmethod
    def from_betas(
        cls,
        betas: Sequence[float] | np.ndarray,
        timestep_map: Sequence[int] | None = None,
        chain_betas: Sequence[float] | np.ndarray | None = None,
    ) -> Schedule:
        """The schedule of the given betas, every coefficient computed in float64 and stored as float32.

        Args:
          betas: shape ``[T]``, each in (0, 1) (a beta of 1 would make abar 0 and x_0 unrecoverable). Pass float64
            for full precision.
          timestep_map: the original timestep of each index (for respaced schedules); default ``arange(T)``.
          chain_betas: the betas of the original chain that ``timestep_map`` indexes, ``[T_chain]`` (:func:`respace`
            passes them); its levels give ``chain_log_sigmas``. Default: ``betas`` itself without a
            ``timestep_map``; with one, the kept steps' levels interpolated linearly in log sigma between them (all
            that the kept steps tell of the chain).

        Raises:
          ValueError: if betas is empty, not 1-D, not finite, or outside (0, 1); or timestep_map does not fit; or
            chain_betas does not give the kept steps' abar at ``timestep_map``.
        """
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise ConfigError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
        ok = _betas_ok(betas)
        if not np.all(ok):
            raise ConfigError(
                "betas must all lie in the open interval (0, 1), but for the last, which may be 1 (a chain with zero "
                f"terminal SNR: rescale_zero_terminal_snr); found {betas[~ok][:5].tolist()}."
            )
        T = betas.shape[0]
        given_map = timestep_map is not None
        timestep_map = np.asarray(timestep_map if given_map else np.arange(T))
        if timestep_map.shape != (T,) or not np.issubdtype(timestep_map.dtype, np.integer) or timestep_map.min() < 0:
            raise ConfigError(
                f"timestep_map must be {T} integers >= 0, got {timestep_map.dtype} of shape {timestep_map.shape}."
            )

        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        log_sigma = _log_sigma(abar)
        if chain_betas is not None:
            chain_log_sigmas = _chain_log_sigmas(np.asarray(chain_betas, np.float64), timestep_map, abar)
        elif given_map:
            order = np.argsort(timestep_map)
            steps = np.arange(int(timestep_map.max()) + 1)
            chain_log_sigmas = np.interp(steps, timestep_map[order], log_sigma[order])
        else:
            chain_log_sigmas = log_sigma
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        abar_next = np.concatenate([abar[1:], [0.0]])
        one_minus_abar = 1.0 - abar
        posterior_variance = betas * (1.0 - abar_prev) / one_minus_abar
        first = posterior_variance[1] if T > 1 else betas[0]
        posterior_log_variance_clipped = np.log(np.concatenate([[first], posterior_variance[1:]]))
        coeffs = dict(
            betas=betas,
            alphas=alphas,
            log_betas=np.log(betas),
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            alphas_cumprod_next=abar_next,
            sqrt_alphas_cumprod=np.sqrt(abar),
            sqrt_alphas_cumprod_prev=np.sqrt(abar_prev),
            sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus_abar),
            log_one_minus_alphas_cumprod=np.log(one_minus_abar),
            sqrt_recip_alphas_cumprod=_sqrt_recip(abar),
            sqrt_recipm1_alphas_cumprod=np.sqrt(_sqrt_recip(abar) ** 2 - 1.0),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=np.sqrt(abar_prev) * betas / one_minus_abar,
            posterior_mean_coef2=np.sqrt(alphas) * (1.0 - abar_prev) / one_minus_abar,
            snr=abar / one_minus_abar,
            chain_log_sigmas=chain_log_sigmas,
        )
        arrays = {k: jnp.asarray(v.astype(np.float32)) for k, v in coeffs.items()}
        return cls(**arrays, timestep_map=jnp.asarray(timestep_map.astype(np.int32)))


def _betas_ok(betas: np.ndarray) -> np.ndarray:
    """Which betas a chain may have: each in (0, 1), the last also 1 (abar_T = 0: zero terminal SNR)."""
    ok = np.isfinite(betas) & (betas > 0.0) & (betas < 1.0)
    ok[-1:] |= betas[-1:] == 1.0
    return ok


def _log_sigma(abar: np.ndarray) -> np.ndarray:
    """log sigma = 0.5 log((1 - abar) / abar), float64; +inf where abar = 0 (the last step of a zero-SNR chain)."""
    with np.errstate(divide="ignore"):
        return 0.5 * (np.log1p(-abar) - np.log(abar))


def _sqrt_recip(abar: np.ndarray) -> np.ndarray:
    """sqrt(1 / abar); +inf where abar = 0 (eps prediction cannot give x_0 there: see rescale_zero_terminal_snr)."""
    with np.errstate(divide="ignore"):
        return np.sqrt(1.0 / abar)


def _chain_log_sigmas(chain_betas: np.ndarray, timestep_map: np.ndarray, abar: np.ndarray) -> np.ndarray:
    """log sigma at every step of the chain of ``chain_betas``, float64 ``[T_chain]``, once its abar is checked to be
    the kept steps' ``abar`` at ``timestep_map``."""
    if chain_betas.ndim != 1 or not np.all(_betas_ok(chain_betas)):
        raise ConfigError("chain_betas must be a 1-D array of betas in (0, 1), those of the chain respaced from.")
    if timestep_map.min() < 0 or timestep_map.max() >= chain_betas.shape[0]:
        raise ConfigError(
            f"timestep_map must index the chain's {chain_betas.shape[0]} steps, got values in "
            f"[{timestep_map.min()}, {timestep_map.max()}]."
        )
    chain_abar = np.cumprod(1.0 - chain_betas)
    if not np.allclose(chain_abar[timestep_map], abar, rtol=1e-6, atol=0.0):
        raise ConfigError(
            "chain_betas do not give the schedule's abar at timestep_map: pass the betas of the chain that the "
            "schedule was respaced from (respace does)."
        )
    return _log_sigma(chain_abar)


def make_schedule(name: str, num_timesteps: int, **kwargs) -> Schedule:
    """``Schedule.from_betas(beta_schedule(name, num_timesteps, **kwargs))``: the usual way to get a schedule."""
    return Schedule.from_betas(beta_schedule(name, num_timesteps, **kwargs))


def space_timesteps(num_timesteps: int, num_steps: int, spacing: str = "even") -> np.ndarray:
    """Choose ``num_steps`` of ``num_timesteps`` original timesteps (sorted, distinct, 0-indexed).

    Args:
      num_timesteps: T of the original chain.
      num_steps: how many to keep, 1 <= num_steps <= T.
      spacing: ``even`` (evenly spaced from 0 to T - 1, as in improved DDPM's respacing), ``quadratic`` (denser near
        t = 0, as in DDIM's CIFAR-10 setting; keeps 0) or ``trailing`` (Lin et al. 2024, Table 2: every (T / n)-th
        step counted down from T - 1, ``round(T - k T / n) - 1`` for k = 0 .. n - 1; always keeps T - 1, the chain's
        noisiest step, which a sampler of a zero-terminal-SNR chain must start from, and ends at or above step 0).

    Returns:
      int64 array of shape ``[num_steps]``.
    """
    _check_num_timesteps(num_timesteps)
    if (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, (int, np.integer))
        or not 1 <= num_steps <= num_timesteps
    ):
        raise ConfigError(
            f"num_steps must be an int in [1, {num_timesteps}] (the chain has T = {num_timesteps}), got {num_steps!r}."
        )
    if spacing == "even":
        return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)
    if spacing == "quadratic":
        return _distinct(np.round(np.linspace(0, np.sqrt(num_timesteps - 1), num_steps) ** 2), num_timesteps)
    if spacing == "trailing":
        counted_down = np.round(num_timesteps - np.arange(num_steps) * (num_timesteps / num_steps)) - 1
        return _distinct(counted_down, num_timesteps)
    raise ConfigError(f"Unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS + SNR_SPACINGS)}.")


def _distinct(kept: np.ndarray, num_timesteps: int) -> np.ndarray:
    """Sorted timesteps made distinct: rounding can merge neighbours near 0, so duplicates are shifted up (and, only
    when nearly every step is kept, the tail is kept contiguous)."""
    kept = np.sort(kept.astype(np.int64))
    for i in range(1, len(kept)):
        kept[i] = max(kept[i], kept[i - 1] + 1)
    if kept[-1] > num_timesteps - 1:
        kept = np.minimum(kept, np.arange(num_timesteps - len(kept), num_timesteps))
    return kept


def snr_spaced_timesteps(betas: np.ndarray, num_steps: int, spacing: str = "logsnr") -> np.ndarray:
    """``num_steps`` distinct timesteps (sorted, 0 and T - 1 kept) spread by the noise level rather than by t.

    Args:
      betas: the chain's betas, float64 ``[T]``.
      spacing: ``logsnr`` (evenly spaced in lambda = log(alpha / sigma), DPM-Solver's default grid) or ``karras``
        (Karras et al. 2022: sigma = sqrt((1 - abar) / abar) spaced as ``sigma_i^(1/rho)`` linear, rho = 7). Each
        target level is rounded to the timestep nearest to it in log sigma; merged neighbours are shifted up.
    """
    betas = np.asarray(betas, np.float64)
    T = len(betas)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
        raise ConfigError(f"num_steps must be an int in [1, {T}] (the chain has T = {T}), got {num_steps!r}.")
    abar = np.cumprod(1.0 - betas)
    if abar[-1] == 0.0 and T > 1:  # zero terminal SNR: its last level is infinite; the grid spans the finite ones
        if spacing not in SNR_SPACINGS:
            raise ConfigError(f"Unknown spacing {spacing!r}; choose one of {', '.join(SNR_SPACINGS)}.")
        if num_steps == 1:
            return np.array([T - 1])
        return np.append(snr_spaced_timesteps(betas[:-1], num_steps - 1, spacing), T - 1)
    log_sigma = _log_sigma(abar)  # -lambda, increasing in t
    if spacing == "logsnr":
        targets = np.linspace(log_sigma[0], log_sigma[-1], num_steps)
    elif spacing == "karras":
        lo, hi = np.exp(log_sigma[0]) ** (1 / KARRAS_RHO), np.exp(log_sigma[-1]) ** (1 / KARRAS_RHO)
        targets = KARRAS_RHO * np.log(np.linspace(lo, hi, num_steps))
    else:
        raise ConfigError(f"Unknown spacing {spacing!r}; choose one of {', '.join(SNR_SPACINGS)}.")
    nearest = np.abs(log_sigma[None, :] - targets[:, None]).argmin(axis=1)
    return _distinct(nearest, T)


def respace(betas: Sequence[float] | np.ndarray, use_timesteps: Sequence[int]) -> Schedule:
    """A shorter chain through a subset of the timesteps, with the same abar at every kept step.

    The new betas are ``1 - abar[k_i] / abar[k_{i-1}]`` (with ``abar[k_{-1}] = 1``), so q(x_t | x_0) is unchanged at the
    kept steps (Nichol & Dhariwal 2021, section 4). The result's ``timestep_map`` maps each new index to its original
    timestep, which the network must be called with, and its ``chain_log_sigmas`` keep every level of the original
    chain, for the solvers that call the network between the kept steps.

    Args:
      betas: the original chain's betas (float64 for full precision), shape ``[T]``.
      use_timesteps: the 0-indexed original timesteps to keep (any order, no duplicates), e.g. from
        :func:`space_timesteps`.
    """
    betas = np.asarray(betas, dtype=np.float64)
    T = betas.shape[0] if betas.ndim == 1 else -1
    kept = np.asarray(sorted(use_timesteps))
    if kept.ndim != 1 or kept.size == 0 or not np.issubdtype(kept.dtype, np.integer):
        raise ConfigError(f"use_timesteps must be a non-empty list of ints, got {use_timesteps!r}.")
    if len(set(kept.tolist())) != kept.size or kept[0] < 0 or kept[-1] >= T:
        raise ConfigError(f"use_timesteps must be distinct timesteps in [0, {T - 1}], got {kept.tolist()[:8]}...")
    abar = np.cumprod(1.0 - betas)[kept]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return Schedule.from_betas(1.0 - abar / abar_prev, timestep_map=kept, chain_betas=betas)


def rescale_zero_terminal_snr(betas: np.ndarray | Schedule) -> np.ndarray | Schedule:
    r"""The chain rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Algorithm 1): sqrt(abar) shifted and scaled so that its last value is 0 and its first unchanged,

    .. math::

        \sqrt{\bar\alpha'_t} = \big(\sqrt{\bar\alpha_t} - \sqrt{\bar\alpha_T}\big)
          \frac{\sqrt{\bar\alpha_1}}{\sqrt{\bar\alpha_1} - \sqrt{\bar\alpha_T}},

    and the betas read back from it, ``beta'_t = 1 - abar'_t / abar'_{t-1}`` (``beta'_T = 1``). A chain such as DDPM's
    linear one ends at abar_T = 4e-5, not at 0, so a model trained on it never sees pure noise, yet sampling starts
    there; on the rescaled chain x_T is exactly eps. There the network cannot predict eps (x_0 = (x_T -
    sqrt(1 - abar_T) eps) / sqrt(abar_T) divides by zero): train it with v (or x_0) prediction, and sample it from
    the last step (``trailing`` spacing, or any grid of :func:`respaced`: all keep step T - 1).

    Args:
      betas: float64 ``[T]`` (:func:`beta_schedule`), or a :class:`Schedule` that is not respaced.

    Returns:
      float64 betas ``[T]`` with ``beta_T = 1`` exactly and ``abar_1`` unchanged, or a :class:`Schedule` of them.

    Raises:
      ValueError: fewer than 2 steps, or a respaced schedule (rescale its chain's betas, then respace).
    """
    if isinstance(betas, Schedule):
        if not np.array_equal(np.asarray(betas.timestep_map), np.arange(betas.num_timesteps)):
            raise ConfigError("Rescale the betas of the full chain, then respace them: this schedule is respaced.")
        return Schedule.from_betas(rescale_zero_terminal_snr(np.asarray(betas.betas, np.float64)))
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ConfigError(f"Zero terminal SNR needs a chain of at least 2 betas, got shape {betas.shape}.")
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    rescaled = (root - last) * (first / (first - last))
    rescaled[0], rescaled[-1] = first, 0.0  # exactly, whatever the rounding of the line above
    abar = rescaled**2
    return 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


def respaced(betas: np.ndarray, steps: int | None = None, spacing: str = "even") -> Schedule:
    """The chain of ``betas`` (float64 ``[T]``) respaced to ``steps`` (None or T: all of them), with abar kept at the
    kept steps. ``spacing``: ``even`` or ``quadratic`` in t (:func:`space_timesteps`), or ``logsnr``
    or ``karras`` by noise level (:func:`snr_spaced_timesteps`).

    Raises:
      ValueError: ``steps`` < 1 or > T, or an unknown spacing.
    """
    num_timesteps = len(betas)
    steps = num_timesteps if steps is None else steps
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"steps must lie in [1, {num_timesteps}] (the model's T), got {steps}.")
    if spacing in SNR_SPACINGS:
        return respace(betas, snr_spaced_timesteps(betas, steps, spacing))
    return respace(betas, space_timesteps(num_timesteps, steps, spacing))


def sampling_schedule(
    name: str, num_timesteps: int, steps: int | None = None, spacing: str = "even", **schedule_kwargs
) -> Schedule:
    """The schedule to sample from: beta schedule ``name`` of ``num_timesteps`` steps, respaced to ``steps``.

    :func:`respaced` of ``beta_schedule(name, num_timesteps, **schedule_kwargs)``.

    Raises:
      ValueError: ``steps`` < 1 or > ``num_timesteps``, an unknown schedule name, or an unknown spacing.
    """
    return respaced(beta_schedule(name, num_timesteps, **schedule_kwargs), steps, spacing)


# ---------------------------------------------------------------------------------------------------------------------
# Between the steps: the noise level of a fractional timestep, for solvers that leave the grid


def log_sigmas(schedule: Schedule) -> jax.Array:
    """log sigma_t = 0.5 log((1 - abar_t) / abar_t) of every step, ``[T]``, increasing (Karras et al.'s sigma of the
    VP model: x_t / sqrt(abar_t) = x_0 + sigma_t eps)."""
    return 0.5 * (schedule.log_one_minus_alphas_cumprod - jnp.log(schedule.alphas_cumprod))


def timestep_at(schedule: Schedule, log_sigma: jax.Array) -> jax.Array:
    """The fractional (original) timestep of noise level ``log_sigma``: piecewise linear in log sigma between the steps
    of the original chain (``schedule.chain_log_sigmas``, every step even of a respaced schedule, not only the kept
    ones), clamped to its first and last step. Float32, the shape of ``log_sigma``.

    The network is called with it as with an integer timestep (its sinusoidal embedding takes any real t), as
    k-diffusion and DPM-Solver do for discrete-time models. :func:`log_sigma_at` is its inverse on the range.
    """
    steps = jnp.arange(schedule.chain_log_sigmas.shape[0], dtype=jnp.float32)
    return jnp.interp(log_sigma, _finite_levels(schedule), steps)


#: Where :func:`timestep_at` and :func:`log_sigma_at` put the infinite last level of a zero-terminal-SNR chain: any
#: finite level above the last finite one maps to just above that one's step, and exp(_TOP) is inf (abar = 0).
_TOP_LOG_SIGMA = 1e30


def _finite_levels(schedule: Schedule) -> jax.Array:
    """The chain's log sigmas with an infinite last level (zero terminal SNR) replaced by ``_TOP_LOG_SIGMA``."""
    return jnp.minimum(schedule.chain_log_sigmas, _TOP_LOG_SIGMA)


def log_sigma_at(schedule: Schedule, timesteps: jax.Array) -> jax.Array:
    """The noise level log sigma of fractional (original) timesteps, piecewise linear between the steps of the
    original chain: the inverse of :func:`timestep_at`. An exact denoiser for a solver that calls it between steps
    reads its level from here."""
    steps = jnp.arange(schedule.chain_log_sigmas.shape[0], dtype=jnp.float32)
    return jnp.interp(jnp.asarray(timesteps, jnp.float32), steps, _finite_levels(schedule))


def truncated(schedule: Schedule, steps: int) -> Schedule:
    """The first ``steps`` steps of ``schedule`` (its lowest noise levels): a sampler run on it starts at step
    ``steps - 1`` (SDEdit starts part-way down the chain this way). The original chain's levels stay whole.

    Raises:
      ValueError: ``steps`` outside [1, T].
    """
    if not 1 <= steps <= schedule.num_timesteps:
        raise ConfigError(f"steps must lie in [1, {schedule.num_timesteps}], got {steps}.")
    per_step = [f.name for f in dataclasses.fields(schedule) if f.name != "chain_log_sigmas"]
    return dataclasses.replace(schedule, **{name: getattr(schedule, name)[:steps] for name in per_step})
