"""The Pipeline: a trained (or imported) model ready to sample and to judge, and the one way to do each.

A :class:`Pipeline` bundles what sampling and evaluation need, and nothing of Flax: a plain
``apply_fn(params, x_t, timesteps, labels) -> output``, the parameters, the betas of the chain it was trained on (its
:class:`~jaxdiff.schedules.Schedule` and any respaced one follow from them), the prediction, the variance, ``clip_x0``,
the image shape, the classes and the null class, and where it came from.

This package's face re-exports its modules' names, one concept each:

* :mod:`~jaxdiff.pipeline.base`: the :class:`Pipeline` value;
* :mod:`~jaxdiff.pipeline.loaders`: one builder per source: :func:`from_spec` (a
  :class:`~jaxdiff.spec.ModelSpec` and parameters, in memory), :func:`from_workdir` (the newest readable checkpoint
  of a run, autoguided by its own earlier checkpoint when asked: :func:`autoguided`), :func:`from_diffusers`,
  :func:`from_release` (the DDPM authors' TF1 checkpoints and the PyTorch port's files), and
  :func:`from_checkpoint`, which picks between the imports by what the path holds;
* :mod:`~jaxdiff.pipeline.drawing`: :func:`make_sampler` + :func:`generate` for images (image i drawn with the key
  ``fold_in(key(seed), i)``, so a seed gives the same images at any batch size, device count or process count);
* :mod:`~jaxdiff.pipeline.likelihoods`: :func:`make_bound_fn` for the variational bound (with each image's own label
  for a conditional model) and :func:`make_ode_bpd_fn` for the ODE's bits/dim.

Training-time grids, bits/dim and FID, ``sample.py`` and the notebooks all go through these functions, and they run
over many images through :func:`jaxdiff.parallel.map_batches`: each process feeds its rows of each batch, and every
process gets the results. :class:`~jaxdiff.spec.DiffusionConfig` and :class:`~jaxdiff.spec.ModelSpec` (re-exported
here) live in :mod:`jaxdiff.spec`, which training shares.
"""

from jaxdiff.pipeline.base import ApplyFn, Pipeline
from jaxdiff.pipeline.drawing import Edit, check_images_fit, check_request, generate, labels_for, make_sampler
from jaxdiff.pipeline.likelihoods import make_bound_fn, make_ode_bpd_fn
from jaxdiff.pipeline.loaders import (
    DDPM_PROCESS,
    autoguided,
    from_checkpoint,
    from_diffusers,
    from_release,
    from_spec,
    from_workdir,
    params_like,
)
from jaxdiff.spec import T_SAMPLINGS, DiffusionConfig, ModelSpec

__all__ = [
    "DDPM_PROCESS",
    "T_SAMPLINGS",
    "ApplyFn",
    "DiffusionConfig",
    "Edit",
    "ModelSpec",
    "Pipeline",
    "autoguided",
    "check_images_fit",
    "check_request",
    "from_checkpoint",
    "from_diffusers",
    "from_release",
    "from_spec",
    "from_workdir",
    "generate",
    "labels_for",
    "make_bound_fn",
    "make_ode_bpd_fn",
    "make_sampler",
    "params_like",
]
