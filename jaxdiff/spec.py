"""The types that training, checkpoints and the Pipeline share: :class:`DiffusionConfig` (the forward process and
what the network learns) and :class:`ModelSpec` (what a trained network is, as a checkpoint stores it).

``config.diffusion`` maps onto :class:`DiffusionConfig` field for field; a run's checkpoint stores its
:class:`ModelSpec` as JSON, so that a workdir alone gives a :class:`~jaxdiff.pipeline.Pipeline`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxdiff import diffusion, losses
from jaxdiff.data.config import DataConfig
from jaxdiff.errors import ConfigError
from jaxdiff.models.unet import UNetConfig
from jaxdiff.samplers import DETERMINISTIC_SAMPLERS
from jaxdiff.schedules import beta_schedule

#: How training draws t: uniformly, or by importance (for training on the bound).
T_SAMPLINGS = ("uniform", "importance")
#: What a stored spec meant by a field it lacks, where the dataclass's default has changed since: the former defaults
#: (DataConfig was digits at 8x8, unflipped; DiffusionConfig's variance fixed_small). A spec stores every field of its
#: time (``to_json`` is ``dataclasses.asdict``), so only one from before a field existed (or a jaxdiff 0.1
#: checkpoint's config, which stands for its spec) reads these.
_FORMER_DEFAULTS = {
    "data": {"dataset": "digits", "image_size": 8, "random_flip": False},
    "diffusion": {"variance": "fixed_small"},
}

__all__ = ["T_SAMPLINGS", "DiffusionConfig", "ModelSpec"]


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The forward process a network is trained on and what it learns (``config.diffusion``, field for field).

    ``beta_schedule``/``num_timesteps``/``beta_start``/``beta_end`` give the betas (the cosine schedule ignores the
    range). A range of None is DDPM's, 1e-4 to 0.02, scaled by 1000/T for the linear schedule (improved DDPM's rule:
    :func:`jaxdiff.schedules.beta_schedule`); a range given is used as given (a checkpoint of an earlier jaxdiff
    stores DDPM's unscaled range, and samples on the chain it trained on).
    ``loss_type``/``prediction``/``variance``/``weighting``/``snr_gamma``/``vb_weight`` are those of
    :func:`jaxdiff.losses.training_losses`. ``t_sampling='importance'`` draws t with probability proportional to
    sqrt(E[L_t^2]) over the last 10 losses at each t (Nichol & Dhariwal 2021, for training on the bound).
    ``label_dropout`` replaces a label by the null class with that probability (for classifier-free guidance).

    The defaults are configs/default.py's, DDPM's CIFAR-10 process (``variance='fixed_large'``, sigma^2 = beta), as
    every other section's dataclass has that file's values (tests/test_config.py checks the two agree).
    """

    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float | None = None
    beta_end: float | None = None
    loss_type: str = "simple"
    prediction: str = "eps"
    variance: str = "fixed_large"
    weighting: str = "none"
    snr_gamma: float = 5.0
    vb_weight: float = 0.001
    t_sampling: str = "uniform"
    label_dropout: float = 0.0

    def __post_init__(self):
        losses.check_objective(self.loss_type, self.prediction, self.variance, self.weighting)
        diffusion.check_choice("t_sampling", self.t_sampling, T_SAMPLINGS)
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"label_dropout must lie in [0, 1), got {self.label_dropout}.")

    def betas(self) -> np.ndarray:
        """float64 ``[T]``."""
        return beta_schedule(self.beta_schedule, self.num_timesteps, beta_start=self.beta_start, beta_end=self.beta_end)

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`jaxdiff.losses.diffusion_loss` for this objective."""
        names = ("loss_type", "prediction", "variance", "weighting", "snr_gamma", "vb_weight")
        return {name: getattr(self, name) for name in names}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a trained network is: its architecture, the diffusion it learned, the sampling clip, the data it saw.

    A checkpoint stores it (as JSON), so that a workdir alone gives a :class:`~jaxdiff.pipeline.Pipeline`.
    """

    network: UNetConfig
    diffusion: DiffusionConfig
    clip_x0: bool = True
    data: DataConfig | None = None
    guidance: float = 0.0  # the default classifier-free guidance of a class-conditional network
    autoguidance: float = 0.0  # the default autoguidance scale, by the EMA parameters at guide_step (see autoguided)
    guide_step: int | None = None  # the step of the run's checkpoint that guides it (kept by its checkpoint manager)
    autoguided_samplers: tuple[str, ...] = DETERMINISTIC_SAMPLERS  # those autoguided by default

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, spec: dict) -> ModelSpec:
        """The spec that :meth:`to_json` wrote; a field the JSON lacks (a spec from before it existed) means what it
        meant then: the dataclass's default, or its former one where that has changed (``_FORMER_DEFAULTS``)."""
        data = spec.get("data")
        return cls(
            network=UNetConfig(**spec["network"]),
            diffusion=DiffusionConfig(**{**_FORMER_DEFAULTS["diffusion"], **spec["diffusion"]}),
            clip_x0=bool(spec.get("clip_x0", True)),
            data=DataConfig(**{**_FORMER_DEFAULTS["data"], **data}) if data is not None else None,
            guidance=float(spec.get("guidance", 0.0)),
            autoguidance=float(spec.get("autoguidance", 0.0)),
            guide_step=spec.get("guide_step"),
            autoguided_samplers=tuple(spec.get("autoguided_samplers", DETERMINISTIC_SAMPLERS)),
        )
