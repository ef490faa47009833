"""Evaluation of a :class:`~jaxdiff.pipeline.Pipeline` by likelihood over a whole split.

* :func:`bound_over_split` -- DDPM's NLL (Table 2) with :func:`jaxdiff.pipeline.make_bound_fn`: the bound's total,
  its prior, denoising and reconstruction terms and the per-t curve, averaged over every image of a split, with one
  PRNG key per image (``fold_in(key, index)``) so the figure depends neither on the batch size nor on the device
  count;
* :func:`ode_bpd_over_split` -- the probability-flow ODE's bits/dim over a split
  (:func:`jaxdiff.pipeline.make_ode_bpd_fn`).

Sample quality (FID, the Inception Score, the reference statistics) lives in :mod:`jaxdiff.metrics`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable

import jax
import numpy as np

from jaxdiff import parallel
from jaxdiff.errors import ConfigError

#: The bound's terms that :class:`SplitBound` averages over a split.
TERMS = ("total", "prior", "denoising", "reconstruction")

__all__ = ["TERMS", "SplitBound", "bound_over_split", "ode_bpd_over_split"]


def __getattr__(name: str):
    # FID, the Inception Score and the reference statistics moved to jaxdiff.metrics (0.2); their old paths work.
    from jaxdiff._moved import moved

    return moved(__name__, name)


# ---------------------------------------------------------------------------------------------------------------------
# The bound over a split


@dataclasses.dataclass(frozen=True)
class SplitBound:
    """The bound averaged over ``num_examples`` images, in bits/dim: the terms, their standard errors, the per-t curve.

    ``per_timestep[0]`` is L_0 (reconstruction) and ``per_timestep[i]`` the KL term L_i at the paper's t = i + 1.
    """

    total: float
    prior: float
    denoising: float
    reconstruction: float
    total_stderr: float
    per_timestep: np.ndarray
    num_examples: int

    def to_json(self, **extra) -> dict:
        terms = {k: getattr(self, k) for k in TERMS}
        return {
            **extra,
            "num_examples": self.num_examples,
            "bits_per_dim": terms,
            "total_stderr": self.total_stderr,
            "per_timestep_bits_per_dim": [float(x) for x in self.per_timestep],
        }

    def write_json(self, path: str | os.PathLike, **extra) -> str:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(**extra), indent=1))
        return str(path)


def bound_over_split(
    bound_fn: Callable,
    params,
    images: np.ndarray,
    key: jax.Array,
    batch_size: int,
    labels: np.ndarray | None = None,
    mesh=None,
    progress: Callable[[int], None] | None = None,
) -> SplitBound:
    """The bound of every image of ``images`` (uint8 ``[N, H, W, C]``), averaged; image i uses ``fold_in(key, i)``.

    ``bound_fn`` is :func:`jaxdiff.pipeline.make_bound_fn`'s, compiled over ``mesh``. ``labels`` (int ``[N]``) are
    given to a conditional network. The batches run through :func:`jaxdiff.parallel.map_batches` (each process feeds
    its rows, the last batch padded), so the figure depends neither on the batch size nor on the device or process
    count; every process gets it.
    """
    result = _over_split(bound_fn, params, images, key, batch_size, labels, mesh, progress)
    result = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), result)
    n = len(images)
    means = {k: float(getattr(result, k).mean()) for k in TERMS}
    stderr = float(result.total.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return SplitBound(**means, total_stderr=stderr, per_timestep=result.per_timestep.mean(axis=0), num_examples=n)


def ode_bpd_over_split(
    bpd_fn: Callable,
    params,
    images: np.ndarray,
    key: jax.Array,
    batch_size: int,
    labels: np.ndarray | None = None,
    mesh=None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """The probability-flow ODE's bits/dim of every image of ``images`` (uint8 ``[N, H, W, C]``), float64 ``[N]``, and
    the solver's steps of each batch; image i's dequantisation and probe from ``fold_in(key, i)``.

    ``bpd_fn`` is :func:`jaxdiff.pipeline.make_ode_bpd_fn`'s, compiled over ``mesh``; the batches run as in
    :func:`bound_over_split`. The solver's steps are shared by a batch, so an image's figure moves with its batch
    within the tolerances.
    """
    bits, steps = _over_split(bpd_fn, params, images, key, batch_size, labels, mesh, progress)
    return bits.astype(np.float64), [int(s) for s in steps[::batch_size]]


def _over_split(fn: Callable, params, images, key, batch_size: int, labels, mesh, progress):
    """``fn(params, images, keys, labels)`` (a function jitted over ``mesh``) over every image of a split, image i
    keyed ``fold_in(key, i)``, through :func:`jaxdiff.parallel.map_batches`."""
    mesh = mesh or parallel.make_mesh()
    if len(images) == 0:
        raise ConfigError("No images to evaluate.")
    params = parallel.replicate(params, mesh)
    inputs = {"image": images, "label": None if labels is None else np.asarray(labels, np.int32)}
    run = lambda batch: fn(params, batch["image"], batch["key"], batch.get("label"))
    return parallel.map_batches(run, inputs, len(images), batch_size, mesh, key=key, progress=progress)
