"""The :class:`Pipeline` value: a network (any ``apply_fn``), its parameters and the diffusion it was trained with:
everything to sample and to judge it, and nothing of Flax."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxdiff import diffusion, samplers
from jaxdiff.data.config import DataConfig
from jaxdiff.diffusion import ModelFn
from jaxdiff.schedules import Schedule, respaced

#: A network as a Pipeline holds it: ``apply_fn(params, x_t, timesteps, labels or None) -> output``.
ApplyFn = Callable[[Any, jax.Array, jax.Array, "jax.Array | None"], jax.Array]

__all__ = ["ApplyFn", "Pipeline"]


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """A network with its parameters and the diffusion it was trained with: everything to sample and to judge it.

    Attributes:
      apply_fn: ``apply_fn(params, x_t [B, H, W, C], timesteps [B] int32, labels [B] int32 or None) -> output``
        (``[B, H, W, C]``, or ``2C`` channels for a learned variance). Any network: Flax, Equinox, a closed form.
      params: its parameters (the EMA ones for a training run).
      betas: float64 ``[T]``, the chain it was trained on.
      prediction, variance, clip_x0: how its output is read (see :func:`jaxdiff.diffusion.p_mean_variance`).
      image_shape: ``(H, W, C)``.
      num_classes: for a class-conditional network (labels in ``[0, num_classes)``), else None.
      null_class: the label that means "no class" (unconditional; classifier-free guidance's second branch); jaxdiff's
        UNet uses ``num_classes``, the default.
      source: where it came from, for messages.
      data: the dataset it was trained on (None for an imported model): the default for evaluation.
      guidance: the classifier-free guidance scale to sample with unless told otherwise (a conditional run's
        ``config.sampling.guidance``; 0 for others).
      autoguidance, guide_step, autoguided_samplers: a training run's ``config.sampling`` settings of the same names:
        the scale of :func:`~jaxdiff.pipeline.loaders.autoguided` that :func:`~jaxdiff.pipeline.loaders.from_workdir`
        applies when asked for the run's own, the step of the checkpoint whose EMA parameters guide, and the samplers
        it applies to by default (0 and None for others).
      schedule: the full chain (T steps), computed from ``betas``: what training and the bound use.
    """

    apply_fn: ApplyFn
    params: Any
    betas: np.ndarray
    prediction: str = "eps"
    variance: str = "fixed_small"
    clip_x0: bool = True
    image_shape: tuple[int, int, int] = (32, 32, 3)
    num_classes: int | None = None
    null_class: int | None = None
    source: str = ""
    data: DataConfig | None = None
    guidance: float = 0.0
    autoguidance: float = 0.0
    guide_step: int | None = None
    autoguided_samplers: tuple[str, ...] = samplers.DETERMINISTIC_SAMPLERS
    schedule: Schedule = dataclasses.field(init=False, repr=False)  # the full chain (T steps), from the betas

    def __post_init__(self):
        diffusion.check_choice("prediction", self.prediction, diffusion.PREDICTIONS)
        diffusion.check_choice("variance", self.variance, diffusion.VARIANCES)
        object.__setattr__(self, "betas", np.asarray(self.betas, np.float64))
        object.__setattr__(self, "image_shape", tuple(self.image_shape))
        object.__setattr__(self, "autoguided_samplers", tuple(self.autoguided_samplers))
        if self.num_classes is not None and self.null_class is None:
            object.__setattr__(self, "null_class", self.num_classes)
        # Built here, outside any trace, so that jitted functions closing over the pipeline see concrete arrays.
        object.__setattr__(self, "schedule", Schedule.from_betas(self.betas))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def sampling_schedule(self, steps: int | None = None, spacing: str = "even") -> Schedule:
        """The chain respaced to ``steps`` (None: all T), abar kept at the kept steps
        (:func:`jaxdiff.schedules.respaced`).

        Raises:
          ValueError: ``steps`` outside [1, T], or an unknown spacing.
        """
        return respaced(self.betas, steps, spacing)

    def autoguidance_for(self, sampler: str | None) -> float:
        """The run's default autoguidance scale for ``sampler`` (None: any): 0 for a sampler it does not apply to."""
        return self.autoguidance if sampler is None or sampler in self.autoguided_samplers else 0.0

    def with_params(self, params) -> Pipeline:
        """The same pipeline with other parameters (e.g. the EMA parameters at a later step)."""
        return dataclasses.replace(self, params=params)

    def model_fn(self, params, labels: jax.Array | None = None, guidance: float = 0.0) -> ModelFn:
        """``model_fn(x_t, timesteps)`` for the samplers and the bound: the network at ``params`` with ``labels``,
        guided with scale ``guidance`` (classifier-free guidance; 0 is the plain conditional model)."""
        if self.num_classes is not None and guidance != 0:
            apply = lambda x, t, y: self.apply_fn(params, x, t, y)
            return samplers.guided(apply, labels, self.null_class, guidance, variance=self.variance)
        return lambda x, t: self.apply_fn(params, x, t, labels)
