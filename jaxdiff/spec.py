"""The types that training, checkpoints and the Pipeline share: :class:`DiffusionConfig` (the forward process and
what the network learns) and :class:`ModelSpec` (what a trained network is, as a checkpoint stores it).

``config.diffusion`` maps onto :class:`DiffusionConfig` field for field; a run's checkpoint stores its
:class:`ModelSpec` as JSON, so that a workdir alone gives a :class:`~jaxdiff.pipeline.Pipeline`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxdiff import diffusion, edm, flow, losses
from jaxdiff.data.config import DataConfig
from jaxdiff.errors import ConfigError
from jaxdiff.models.unet import UNetConfig
from jaxdiff.samplers import DETERMINISTIC_SAMPLERS
from jaxdiff.schedules import beta_schedule, rescale_zero_terminal_snr

#: How training draws t: uniformly, by importance (for training on the bound), or logit-normal (flow matching).
T_SAMPLINGS = ("uniform", "importance", "logit_normal")
#: The Gaussian paths a network can be trained on: DDPM's chain (with eps, x0 or v prediction), EDM's preconditioned
#: variance-exploding process (:mod:`jaxdiff.edm`), flow matching's straight path (:mod:`jaxdiff.flow`).
PROCESSES = ("ddpm", "edm", "flow")
#: What a stored spec meant by a field it lacks, where the dataclass's default has changed since: the former defaults
#: (DataConfig was digits at 8x8, unflipped; DiffusionConfig's variance fixed_small). A spec stores every field of its
#: time (``to_json`` is ``dataclasses.asdict``), so only one from before a field existed (or a jaxdiff 0.1
#: checkpoint's config, which stands for its spec) reads these.
_FORMER_DEFAULTS = {
    "data": {"dataset": "digits", "image_size": 8, "random_flip": False},
    "diffusion": {"variance": "fixed_small"},
}

__all__ = ["PROCESSES", "T_SAMPLINGS", "DiffusionConfig", "ModelSpec"]


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

    ``process`` picks the path: ``ddpm`` (the chain above), ``edm`` (:mod:`jaxdiff.edm`: Karras et al.'s
    preconditioning with ``sigma_data``, ln sigma ~ N(``p_mean``, ``p_std``^2), sampled over [``sigma_min``,
    ``sigma_max``]) or ``flow`` (:mod:`jaxdiff.flow`: the linear path with a velocity target, t uniform or
    ``t_sampling='logit_normal'`` with ``logit_mean``/``logit_std``). For ``edm`` and ``flow`` the network's output
    is F or the velocity (``prediction`` is not read), the loss is theirs (``loss_type='simple'``, no weighting), and
    ``num_timesteps`` is the length of the VP chain the other samplers see them on (:func:`jaxdiff.edm.vp_betas`,
    :func:`jaxdiff.flow.vp_betas`); ``variance`` is DDPM's sampling variance there.

    ``zero_terminal_snr`` rescales a ``ddpm`` chain to abar_T = 0 (:func:`jaxdiff.schedules.rescale_zero_terminal_snr`;
    needs v or x0 prediction). ``offset_noise`` adds that strength times one N(0, 1) draw per image and channel to the
    training noise (offset noise: the network learns to change an image's mean brightness).

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
    process: str = "ddpm"
    zero_terminal_snr: bool = False
    offset_noise: float = 0.0
    sigma_data: float = edm.SIGMA_DATA
    sigma_min: float = edm.SIGMA_MIN
    sigma_max: float = edm.SIGMA_MAX
    p_mean: float = edm.P_MEAN
    p_std: float = edm.P_STD
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        losses.check_objective(self.loss_type, self.prediction, self.variance, self.weighting)
        diffusion.check_choice("t_sampling", self.t_sampling, T_SAMPLINGS)
        diffusion.check_choice("process", self.process, PROCESSES)
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"label_dropout must lie in [0, 1), got {self.label_dropout}.")
        if not self.offset_noise >= 0.0:
            raise ConfigError(f"offset_noise is a strength >= 0 (0.1 is usual), got {self.offset_noise}.")
        if self.zero_terminal_snr and self.process != "ddpm":
            raise ConfigError(
                f"zero_terminal_snr rescales a DDPM chain; the {self.process} process sets its own range (flow's path "
                "ends at pure noise already; EDM's at sigma_max). Drop diffusion.zero_terminal_snr."
            )
        if self.zero_terminal_snr and self.prediction == "eps":
            raise ConfigError(
                "With zero_terminal_snr the last step is pure noise (abar_T = 0), where eps prediction cannot give x_0 "
                "(x_0 = (x_T - sqrt(1 - abar_T) eps) / sqrt(abar_T) divides by zero): use diffusion.prediction='v' "
                "(Lin et al. 2024) or 'x0'."
            )
        logit, importance = self.t_sampling == "logit_normal", self.t_sampling == "importance"
        if (logit and self.process != "flow") or (importance and self.process != "ddpm"):
            raise ConfigError(
                f"t_sampling {self.t_sampling!r} does not fit the {self.process} process: 'logit_normal' is flow "
                "matching's, 'importance' DDPM's (EDM draws its levels log-normally: diffusion.p_mean, p_std)."
            )
        if self.process != "ddpm":
            self._check_path()

    def _check_path(self) -> None:
        """What EDM and flow matching need: their own loss, a fixed sampling variance, a sane range."""
        if self.loss_type != "simple" or self.weighting != "none" or self.variance in diffusion.LEARNED_VARIANCES:
            raise ConfigError(
                f"The {self.process} process trains with its own loss: use loss_type='simple', weighting='none' and a "
                f"fixed variance (got {self.loss_type!r}, {self.weighting!r}, {self.variance!r})."
            )
        if self.process == "edm" and not (
            0 < self.sigma_min < self.sigma_max and self.sigma_data > 0 and self.p_std > 0
        ):
            raise ConfigError(
                "EDM needs 0 < sigma_min < sigma_max, sigma_data > 0 and p_std > 0; got "
                f"{self.sigma_min}, {self.sigma_max}, {self.sigma_data}, {self.p_std}."
            )
        if self.process == "flow" and not self.logit_std > 0:
            raise ConfigError(f"flow matching's logit_std must be > 0, got {self.logit_std}.")

    @property
    def sampled_prediction(self) -> str:
        """How the samplers read the network as the Pipeline presents it: the config's ``prediction`` for ``ddpm``,
        x0 for ``edm`` (:func:`jaxdiff.edm.vp_model`), v for ``flow`` (:func:`jaxdiff.flow.vp_model`)."""
        return {"ddpm": self.prediction, "edm": "x0", "flow": "v"}[self.process]

    def betas(self) -> np.ndarray:
        """float64 ``[T]``: the chain (``ddpm``, rescaled to zero terminal SNR if asked), or the VP chain of an
        ``edm`` or ``flow`` model."""
        if self.process == "edm":
            return edm.vp_betas(self.num_timesteps, self.sigma_min, self.sigma_max)
        if self.process == "flow":
            return flow.vp_betas(self.num_timesteps)
        betas = beta_schedule(
            self.beta_schedule, self.num_timesteps, beta_start=self.beta_start, beta_end=self.beta_end
        )
        return rescale_zero_terminal_snr(betas) if self.zero_terminal_snr else betas

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
