"""Judging a :class:`~jaxdiff.pipeline.Pipeline` by likelihood: the variational bound (:func:`make_bound_fn`) and the
probability-flow ODE's bits/dim (:func:`make_ode_bpd_fn`), each one jitted program with the batch split over a mesh.
:func:`jaxdiff.evaluation.bound_over_split` and :func:`jaxdiff.evaluation.ode_bpd_over_split` run them over a split.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import bound, images, parallel
from jaxdiff.pipeline.base import Pipeline

__all__ = ["make_bound_fn", "make_ode_bpd_fn"]


def make_bound_fn(
    pipe: Pipeline, chunk_size: int = 32, clip_x0: bool = False, mesh: jax.sharding.Mesh | None = None
) -> Callable:
    """A jitted ``(params, images uint8 [B, H, W, C], keys [B], labels [B] or None) -> VariationalBound`` (bits/dim)
    with the batch split over ``mesh``'s ``data`` axis. A class-conditional network is given each image's own label.

    Image b's noise comes from ``keys[b]`` alone (see :func:`jaxdiff.bound.variational_bound`). The bound reads
    the network's x_0 unclipped by default (``clip_x0``), whatever the pipeline samples with.
    """
    mesh = mesh or parallel.make_mesh()

    def terms(params, batch, keys, labels):
        def model_fn(x, t):  # called on B * chunk rows, example-major: each label repeated for its example's rows
            y = None if labels is None else jnp.repeat(labels, x.shape[0] // labels.shape[0])
            return pipe.apply_fn(params, x, t, y)

        x0 = images.from_uint8(batch)
        return bound.variational_bound(
            pipe.schedule,
            model_fn,
            x0,
            keys,
            prediction=pipe.prediction,
            variance=pipe.variance,
            clip_x0=clip_x0,
            chunk_size=chunk_size,
        )

    return parallel.jit_batched(terms, mesh, (False, True, True, True))


def make_ode_bpd_fn(
    pipe: Pipeline, divergence: str = "auto", tolerance: float = 1e-5, mesh: jax.sharding.Mesh | None = None
) -> Callable:
    """A jitted ``(params, images uint8 [B, H, W, C], keys [B], labels [B] or None) -> (bits/dim [B], solver steps)``:
    the probability-flow ODE's bits/dim (:func:`jaxdiff.likelihood.ode_bits_per_dim`, rtol = atol = ``tolerance``)
    with the batch split over ``mesh``. A class-conditional network is given each image's own label."""
    from jaxdiff import likelihood  # diffrax is loaded only for this

    mesh = mesh or parallel.make_mesh()

    def bpd(params, batch, keys, labels):
        model_fn = lambda x, t: pipe.apply_fn(params, x, t, labels)
        bits, result = likelihood.ode_bits_per_dim(
            pipe.schedule,
            model_fn,
            images.from_uint8(batch),
            keys,
            prediction=pipe.prediction,
            variance=pipe.variance,
            divergence=divergence,
            rtol=tolerance,
            atol=tolerance,
        )
        return bits, jnp.broadcast_to(result.num_steps, bits.shape)

    return parallel.jit_batched(bpd, mesh, (False, True, True, True))
