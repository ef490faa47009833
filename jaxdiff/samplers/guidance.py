"""Guidance: a ``model_fn`` extrapolated away from a weaker prediction. Classifier-free guidance (away from the
unconditional model) and autoguidance (away from a weaker version of the same network)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import diffusion
from jaxdiff.diffusion import ModelFn

__all__ = ["autoguided", "guided"]


def guided(
    apply_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    labels: jax.Array,
    null_label: int,
    scale: float,
    *,
    variance: str = "fixed_small",
) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022): ``(1 + w) f(x, t, y) - w f(x, t, null)`` as a ``model_fn``.

    Args:
      apply_fn: the conditional network, ``apply_fn(x_t, timesteps, labels) -> output``.
      labels: ``[B]`` int class labels.
      null_label: the label of the unconditional model (``num_classes`` for jaxdiff's UNet).
      scale: w; 0 is the plain conditional model. Both branches run in one batched call of ``2B`` rows, image-major
        (rows 2b and 2b + 1 are image b with its label and with the null label), so that a batch split over devices
        stays where it is: each device runs both branches of its own images.
      variance: with a learned variance only the prediction half is guided; the variance half is the conditional one.

    The combination is affine with weights summing to 1, so guiding the raw output is the same as guiding eps for
    eps, x0 and v predictions alike.
    """

    def model_fn(x_t, timesteps):
        pair = lambda a, b: jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])
        both = apply_fn(pair(x_t, x_t), pair(timesteps, timesteps), pair(labels, jnp.full_like(labels, null_label)))
        both = both.reshape(x_t.shape[0], 2, *both.shape[1:])
        return _extrapolate(both[:, 0], both[:, 1], scale, variance)

    return model_fn


def autoguided(main_fn: ModelFn, guide_fn: ModelFn, scale: float, *, variance: str = "fixed_small") -> ModelFn:
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): a network guided
    away from a weaker version of itself, ``(1 + w) main(x, t) - w guide(x, t)``, as a ``model_fn``.

    Args:
      main_fn: the network, ``model_fn(x_t, timesteps) -> output``.
      guide_fn: a weaker network of the same task, trained on the same data and making the same kind of errors more
        strongly (e.g. the same run's EMA parameters at an earlier step). Its errors point away from the data, so
        stepping away from them pulls samples into the data's well-learned regions; unlike classifier-free guidance it
        needs no labels and keeps the variety.
      scale: w; 0 is the main network alone (the guide is then not called).
      variance: with a learned variance only the prediction half is guided; the variance half is the main one's.

    As for :func:`guided`, the weights sum to 1, so guiding the raw output guides eps, x0 and v alike.
    """
    if scale == 0:
        return main_fn
    return lambda x_t, timesteps: _extrapolate(main_fn(x_t, timesteps), guide_fn(x_t, timesteps), scale, variance)


def _extrapolate(strong: jax.Array, weak: jax.Array, scale: float, variance: str) -> jax.Array:
    """``(1 + scale) strong - scale weak``; for a learned variance the prediction half only, the variance strong's."""
    if variance in diffusion.LEARNED_VARIANCES:
        (s_pred, s_var), (w_pred, _) = jnp.split(strong, 2, axis=-1), jnp.split(weak, 2, axis=-1)
        return jnp.concatenate([(1.0 + scale) * s_pred - scale * w_pred, s_var], axis=-1)
    return (1.0 + scale) * strong - scale * weak
