"""The Pipeline: a trained (or imported) model ready to sample and to judge, and the one way to do each.

A :class:`Pipeline` bundles what sampling and evaluation need, and nothing of Flax: a plain
``apply_fn(params, x_t, timesteps, labels) -> output``, the parameters, the betas of the chain it was trained on (its
:class:`~jaxdiff.schedules.Schedule` and any respaced one follow from them), the prediction, the variance, ``clip_x0``,
the image shape, the classes and the null class, and where it came from.

It is built in one place from each source:

* :func:`from_spec` -- a :class:`ModelSpec` (network, diffusion, clip, data) and parameters: a training run's, in
  memory;
* :func:`from_workdir` -- the newest readable checkpoint of a run (its stored spec and EMA parameters), autoguided by
  the run's own earlier checkpoint when asked (:func:`autoguided`: a pipeline whose network is two);
* :func:`from_diffusers` -- a diffusers UNet2DModel folder or hub id with its scheduler config;
* :func:`from_release` -- the DDPM authors' TF1 checkpoints (EMA or raw weights) and the PyTorch port's files;
  :func:`from_checkpoint` picks between the imports by what the path holds.

Training-time grids, bits/dim and FID, ``sample.py`` and the notebooks all go through the same functions:
:func:`make_sampler` + :func:`generate` for images (image i drawn with the key ``fold_in(key(seed), i)``, so a seed
gives the same images at any batch size, device count or process count), and :func:`make_bound_fn` for the
variational bound (with each image's own label for a conditional model). Both run over many images through
:func:`jaxdiff.parallel.map_batches`: each process feeds its rows of each batch, and every process gets the results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checkpoints, diffusion, images, parallel, samplers
from jaxdiff.data import DataConfig
from jaxdiff.diffusion import ModelFn
from jaxdiff.models.unet import UNetConfig, abstract_params, make_apply
from jaxdiff.schedules import Schedule, beta_schedule

ApplyFn = Callable[[Any, jax.Array, jax.Array, "jax.Array | None"], jax.Array]
T_SAMPLINGS = ("uniform", "importance")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The forward process a network is trained on and what it learns (``config.diffusion``, field for field).

    ``beta_schedule``/``num_timesteps``/``beta_start``/``beta_end`` give the betas (the cosine schedule ignores the
    range). ``loss_type``/``prediction``/``variance``/``weighting``/``snr_gamma``/``vb_weight`` are those of
    :func:`jaxdiff.diffusion.training_losses`. ``t_sampling='importance'`` draws t with probability proportional to
    sqrt(E[L_t^2]) over the last 10 losses at each t (Nichol & Dhariwal 2021, for training on the bound).
    ``label_dropout`` replaces a label by the null class with that probability (for classifier-free guidance).
    """

    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    loss_type: str = "simple"
    prediction: str = "eps"
    variance: str = "fixed_small"
    weighting: str = "none"
    snr_gamma: float = 5.0
    vb_weight: float = 0.001
    t_sampling: str = "uniform"
    label_dropout: float = 0.0

    def __post_init__(self):
        diffusion.check_objective(self.loss_type, self.prediction, self.variance, self.weighting)
        diffusion.check_choice("t_sampling", self.t_sampling, T_SAMPLINGS)
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}.")

    def betas(self) -> np.ndarray:
        """float64 ``[T]``."""
        return beta_schedule(self.beta_schedule, self.num_timesteps, beta_start=self.beta_start, beta_end=self.beta_end)

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`jaxdiff.diffusion.diffusion_loss` for this objective."""
        names = ("loss_type", "prediction", "variance", "weighting", "snr_gamma", "vb_weight")
        return {name: getattr(self, name) for name in names}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a trained network is: its architecture, the diffusion it learned, the sampling clip, the data it saw.

    A checkpoint stores it (as JSON), so that a workdir alone gives a :class:`Pipeline`.
    """

    network: UNetConfig
    diffusion: DiffusionConfig
    clip_x0: bool = True
    data: DataConfig | None = None
    guidance: float = 0.0  # the default classifier-free guidance of a class-conditional network
    autoguidance: float = 0.0  # the default autoguidance scale, by the EMA parameters at guide_step (see autoguided)
    guide_step: int | None = None  # the step of the run's checkpoint that guides it (kept by its checkpoint manager)
    autoguided_samplers: tuple[str, ...] = samplers.DETERMINISTIC_SAMPLERS  # those autoguided by default

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, spec: dict) -> ModelSpec:
        data = spec.get("data")
        return cls(
            network=UNetConfig(**spec["network"]),
            diffusion=DiffusionConfig(**spec["diffusion"]),
            clip_x0=bool(spec.get("clip_x0", True)),
            data=DataConfig(**data) if data is not None else None,
            guidance=float(spec.get("guidance", 0.0)),
            autoguidance=float(spec.get("autoguidance", 0.0)),
            guide_step=spec.get("guide_step"),
            autoguided_samplers=tuple(spec.get("autoguided_samplers", samplers.DETERMINISTIC_SAMPLERS)),
        )


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
        the scale of :func:`autoguided` that :func:`from_workdir` applies when asked for the run's own, the step of
        the checkpoint whose EMA parameters guide, and the samplers it applies to by default (0 and None for others).
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
        (:func:`jaxdiff.samplers.respaced`).

        Raises:
          ValueError: ``steps`` outside [1, T], or an unknown spacing.
        """
        return samplers.respaced(self.betas, steps, spacing)

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


# ---------------------------------------------------------------------------------------------------------------------
# Building one: from a spec, a workdir, a diffusers folder


def from_spec(spec: ModelSpec, params, source: str) -> Pipeline:
    """The pipeline of jaxdiff's UNet described by ``spec``, at ``params``: the one place a UNet becomes one."""
    net = spec.network
    return Pipeline(
        apply_fn=make_apply(net),
        params=params,
        betas=spec.diffusion.betas(),
        prediction=spec.diffusion.prediction,
        variance=spec.diffusion.variance,
        clip_x0=spec.clip_x0,
        image_shape=(net.image_size, net.image_size, net.in_channels),
        num_classes=net.num_classes,
        source=source,
        data=spec.data,
        guidance=spec.guidance,
        autoguidance=spec.autoguidance,
        guide_step=spec.guide_step,
        autoguided_samplers=spec.autoguided_samplers,
    )


def params_like(spec: dict):
    """The shapes of the parameters of the network that a checkpoint's stored spec (JSON) describes."""
    return abstract_params(ModelSpec.from_json(spec).network)


def from_workdir(
    workdir: str | os.PathLike, step: int | None = None, autoguidance: float | None = 0.0, sampler: str | None = None
) -> Pipeline:
    """The EMA parameters and the spec of the newest readable checkpoint of a training run (or of ``step``).

    ``autoguidance``: 0 gives the network itself (what the bound and any other use of the network want); None the run
    as ``sampler`` samples it by default (its ``config.sampling.autoguidance`` if the sampler is one of its
    ``autoguided_samplers``, guided by its checkpoint at ``guide_step``: :func:`autoguided`; unguided at or before
    that step, as the run itself sampled then); another value that scale, by the same guide, whatever the sampler.

    Raises:
      FileNotFoundError: the workdir has no checkpoint (or not ``step``, or not the guide's).
      RuntimeError: no checkpoint can be read.
      ValueError: autoguidance asked of a run that keeps no guide, or of a checkpoint not later than its guide.
    """
    ckpt = checkpoints.load_for_sampling(workdir, step, params_like)
    pipe = from_spec(ModelSpec.from_json(ckpt.spec), ckpt.ema_params, f"{workdir} (step {ckpt.step}, EMA)")
    scale = pipe.autoguidance_for(sampler) if autoguidance is None else autoguidance
    if autoguidance is None and pipe.guide_step is not None and pipe.guide_step >= ckpt.step:
        scale = 0.0  # the run's own default: no guide yet at this step
    if scale == 0:
        return pipe
    if pipe.guide_step is None:
        raise ValueError(
            f"{workdir} was trained without a guide checkpoint, so it cannot be autoguided: train with "
            "config.sampling.guide_step (e.g. a third of the steps), or sample with --autoguidance=0."
        )
    if pipe.guide_step >= ckpt.step:
        raise ValueError(
            f"The checkpoint at step {ckpt.step} of {workdir} is not later than its guide (step {pipe.guide_step}): "
            "sample a later --step, or with --autoguidance=0."
        )
    guide = checkpoints.load_for_sampling(workdir, pipe.guide_step, params_like)
    return autoguided(pipe, guide.ema_params, scale, f"its EMA at step {guide.step}")


def autoguided(pipe: Pipeline, guide_params, scale: float, guide: str = "a weaker version") -> Pipeline:
    """``pipe`` guided away from its own network at ``guide_params`` (autoguidance, Karras et al. 2024): the network
    of the result is ``(1 + scale) f(main) - scale f(guide)`` (:func:`jaxdiff.samplers.autoguided`), its parameters
    ``{"main": pipe.params, "guide": guide_params}``. Every sampler, the bound and classifier-free guidance work on it
    as on any pipeline; each of its network calls costs two. ``guide`` names the guide in ``source``. ``scale`` 0:
    ``pipe`` itself.

    The guide should make the main network's errors more strongly: the same architecture and data, trained less (the
    same run's EMA parameters at an earlier step). Unlike classifier-free guidance it needs no labels.
    """
    if scale == 0:
        return pipe
    apply, variance = pipe.apply_fn, pipe.variance

    def apply_fn(params, x_t, timesteps, labels):
        main = lambda x, t: apply(params["main"], x, t, labels)
        weak = lambda x, t: apply(params["guide"], x, t, labels)
        return samplers.autoguided(main, weak, scale, variance=variance)(x_t, timesteps)

    return dataclasses.replace(
        pipe,
        apply_fn=apply_fn,
        params={"main": pipe.params, "guide": guide_params},
        source=f"{pipe.source}, autoguided (w = {scale:g}) by {guide}",
        autoguidance=0.0,
        guide_step=None,
    )


# diffusers' scheduler names -> jaxdiff's
_DIFFUSERS_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
_DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_DIFFUSERS_VARIANCES = {"fixed_small": "fixed_small", "fixed_large": "fixed_large", "learned_range": "learned_range"}


def from_diffusers(path: str | os.PathLike, download: bool = False) -> Pipeline:
    """An imported DDPM model (a diffusers UNet2DModel folder or pipeline folder) and its scheduler settings.

    ``path`` is a local folder or, with ``download=True``, a Hugging Face repo id such as ``google/ddpm-cifar10-32``
    (its UNet and scheduler config are fetched once and cached by ``huggingface_hub``).

    The diffusion settings come from ``scheduler_config.json`` (beside the weights or in ``scheduler/``); without
    one, DDPM's: linear betas 1e-4 .. 0.02 over 1000 steps, eps prediction, fixed_large variance, clipping.
    """
    from jaxdiff.models.convert import diffusers_folder, load_diffusers_unet

    folder = diffusers_folder(path, download)  # a download brings the scheduler config too
    settings = {}
    for candidate in (folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            settings = json.loads(candidate.read_text())
            break
    chosen = {}  # checked before any weight is read: a setting jaxdiff does not have is an error, never a default
    for key, default, table in (
        ("beta_schedule", "linear", _DIFFUSERS_SCHEDULES),
        ("prediction_type", "epsilon", _DIFFUSERS_PREDICTIONS),
        ("variance_type", "fixed_large", _DIFFUSERS_VARIANCES),
    ):
        value = settings.get(key, default)
        if value not in table:
            raise ValueError(
                f"The scheduler's {key} {value!r} is not supported; supported: {sorted(table)}. Edit "
                "scheduler_config.json only if the model was trained with one of them."
            )
        chosen[key] = table[value]
    process = DiffusionConfig(
        num_timesteps=int(settings.get("num_train_timesteps", 1000)),
        beta_schedule=chosen["beta_schedule"],
        beta_start=settings.get("beta_start", 1e-4),
        beta_end=settings.get("beta_end", 0.02),
        prediction=chosen["prediction_type"],
        variance=chosen["variance_type"],
    )
    params, network = load_diffusers_unet(folder)
    spec = ModelSpec(network, process, clip_x0=bool(settings.get("clip_sample", True)))
    return from_spec(spec, params, str(path))


# DDPM's forward process (Ho et al. 2020, section 4): linear betas 1e-4 .. 0.02 over T = 1000 steps, eps prediction.
DDPM_PROCESS = dict(num_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction="eps")


def from_release(path: str | os.PathLike, ema: bool = True, image_size: int | None = None) -> Pipeline:
    """A model of the DDPM authors' release: a TF1 checkpoint (``.../model.ckpt-790000``; its EMA shadows, or with
    ``ema=False`` the raw weights) or the PyTorch port's state dict file (:func:`jaxdiff.models.release.load_release`).

    DDPM's chain (linear betas 1e-4 .. 0.02, T = 1000, eps prediction, clipping); the published CIFAR-10 model
    samples with ``fixed_large``, the 256x256 ones with ``fixed_small``. The CIFAR-10 model's data is CIFAR-10 (so
    ``--eval`` needs no ``--dataset``).
    """
    from jaxdiff.models.release import load_release

    params, network, variance, name, weights = load_release(path, ema, image_size)
    data = DataConfig(dataset="cifar10", image_size=32) if name == "cifar10" else None
    spec = ModelSpec(network, DiffusionConfig(**DDPM_PROCESS, variance=variance), clip_x0=True, data=data)
    return from_spec(spec, params, f"{path} ({weights} weights, {name} architecture)")


def from_checkpoint(
    path: str | os.PathLike, download: bool = False, ema: bool = True, image_size: int | None = None
) -> Pipeline:
    """An imported model, whatever its format: Ho et al.'s TF1 checkpoint or the PyTorch port's file
    (:func:`from_release`), else a diffusers folder or hub id (:func:`from_diffusers`)."""
    from jaxdiff.models.release import is_tf1_checkpoint

    local = pathlib.Path(path).expanduser()
    if is_tf1_checkpoint(local) or local.is_file():
        return from_release(local, ema, image_size)
    if not ema:
        raise ValueError(f"{path}: only a TF1 checkpoint holds raw and EMA weights side by side; drop --noema.")
    return from_diffusers(path, download)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling


def check_images_fit(pipe: Pipeline, images: np.ndarray, what: str) -> None:
    """A clear error when images (a split to evaluate on, images to edit) are not the size the network takes."""
    want = pipe.image_shape
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(
            f"The model takes {want[0]}x{want[1]}x{want[2]} images but {what} has "
            f"{'x'.join(map(str, images.shape[1:]))}: use images of the size and channels the model was trained on."
        )


@dataclasses.dataclass(frozen=True)
class Edit:
    """What a sampler does with given images (``sample.py --init_images``) instead of drawing from noise.

    Attributes:
      strength: SDEdit: noise the images this far down the chain (in [0, 1]) and sample back from there
        (:func:`jaxdiff.samplers.sdedit`). Any sampler.
      hole: RePaint: ``[H, W, 1]`` or ``[H, W, C]``, 1 where pixels are filled in and 0 where the given image is kept
        (:func:`jaxdiff.samplers.repaint_sample`, ancestral steps: ``ddpm`` only). ``images.named_mask`` makes the
        usual ones.
      jump_length, resamplings: RePaint's resampling jumps (1 resampling: none).
    """

    strength: float | None = None
    hole: np.ndarray | None = None
    jump_length: int = 10
    resamplings: int = 1

    def __post_init__(self):
        if (self.strength is None) == (self.hole is None):
            raise ValueError("An edit is either SDEdit (--strength) or inpainting (--mask), not both and not neither.")
        if self.strength is not None:
            samplers.check_strength(self.strength)
        if self.jump_length < 1 or self.resamplings < 1:
            raise ValueError(f"jump_length and resamplings must be >= 1, got {self.jump_length}, {self.resamplings}.")


def check_request(
    pipe: Pipeline,
    sampler: str,
    steps: int | None,
    eta: float,
    label: int | None,
    guidance: float | None,
    edit: Edit | None = None,
    churn: float = 0.0,
):
    """Clear errors for what cannot be sampled, before anything compiles (``guidance`` None: the pipeline's)."""
    guidance = pipe.guidance if guidance is None else guidance
    diffusion.check_choice("sampler", sampler, samplers.SAMPLERS)
    pipe.sampling_schedule(steps)  # steps in [1, T]
    samplers.check_eta(eta)
    if sampler != "ddim" and eta != 0:
        raise ValueError(f"eta is a DDIM setting; use --sampler=ddim with --eta, or drop --eta for {sampler}.")
    if churn != 0 and (sampler != "heun" or not churn > 0):
        raise ValueError(f"churn is Heun's stochastic churn, >= 0 with --sampler=heun; got {churn} with {sampler}.")
    classes = pipe.num_classes
    if classes is None and (label is not None or guidance != 0):
        raise ValueError(
            f"The model from {pipe.source} is unconditional: it takes no --label and no --guidance. Train with "
            "config.data.class_conditional=True (and label_dropout > 0 for guidance) for a class-conditional model."
        )
    if label is not None and not 0 <= label < classes:
        raise ValueError(f"label must lie in [0, {classes - 1}] for this model with {classes} classes, got {label}.")
    if edit is not None and edit.hole is not None:
        if sampler != "ddpm":
            raise ValueError(
                f"Inpainting (RePaint) re-noises the known pixels between ancestral steps: use --sampler=ddpm (with "
                f"--steps for a shorter chain), not {sampler}."
            )
        samplers.check_mask(edit.hole, (1, *pipe.image_shape))


def make_sampler(
    pipe: Pipeline,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    spacing: str | None = None,
    guidance: float | None = None,
    mesh: jax.sharding.Mesh | None = None,
    *,
    edit: Edit | None = None,
    churn: float = 0.0,
) -> Callable[..., jax.Array]:
    """A compiled ``(params, keys [B], labels=None, init=None) -> images [B, H, W, C] in [-1, 1]``, the batch split
    over ``mesh`` (its ``mesh`` attribute; ``lower`` lowers the program): image b's noise comes from ``keys[b]`` alone
    (:func:`jaxdiff.parallel.example_keys` gives image i the key ``fold_in(key, i)``; :func:`generate` does that).

    ``sampler``: ``ddpm``, ``ddim`` (with ``eta``), ``dpm++2m``, ``dpm++3m`` or ``heun`` (with Karras et al.'s
    ``churn``). ``labels`` is ``[B]`` int32 for a class-conditional model, or None. ``steps``: the respaced
    schedule's length (None: all T), spread by ``spacing`` (None: the sampler's own grid,
    ``samplers.DEFAULT_SPACINGS``). ``guidance``: classifier-free guidance w (None: ``pipe.guidance``). With an
    ``edit``, ``init`` is the ``[B, H, W, C]`` images in [-1, 1] to edit. Each batch size compiles once.
    """
    diffusion.check_choice("sampler", sampler, samplers.SAMPLERS)
    guidance = pipe.guidance if guidance is None else guidance
    schedule = pipe.sampling_schedule(steps, spacing or samplers.DEFAULT_SPACINGS[sampler])
    conditional = pipe.num_classes is not None
    mesh = mesh or parallel.make_mesh()
    kwargs = {"prediction": pipe.prediction, "variance": pipe.variance, "clip_x0": pipe.clip_x0}

    def from_noise(schedule, model_fn, key, shape, x_T=None):
        if sampler == "ddim":
            return samplers.ddim_sample(schedule, model_fn, shape, key, eta=eta, x_T=x_T, **kwargs)
        if sampler in ("dpm++2m", "dpm++3m"):
            order = {"dpm++2m": 2, "dpm++3m": 3}[sampler]
            return samplers.dpm_solver_sample(schedule, model_fn, shape, key, order=order, x_T=x_T, **kwargs)
        if sampler == "heun":
            return samplers.heun_sample(schedule, model_fn, shape, key, x_T=x_T, s_churn=churn, **kwargs)
        return samplers.ddpm_sample(schedule, model_fn, shape, key, x_T=x_T, **kwargs)

    def sample(params, key, labels, init):
        shape = (key.shape[0], *pipe.image_shape)
        model_fn = pipe.model_fn(params, labels, guidance)
        if edit is None:
            return from_noise(schedule, model_fn, key, shape)
        if edit.hole is not None:
            known = 1.0 - jnp.asarray(edit.hole, jnp.float32)
            return samplers.repaint_sample(
                schedule,
                model_fn,
                init,
                known,
                key,
                jump_length=edit.jump_length,
                resamplings=edit.resamplings,
                **kwargs,
            )
        start = lambda schedule, key, x_T: from_noise(schedule, model_fn, key, shape, x_T)
        return samplers.sdedit(start, schedule, init, edit.strength, key)

    compiled = parallel.jit_batched(sample, mesh, (False, True, conditional, edit is not None))

    def run(params, keys, labels=None, init=None):
        if not diffusion.key_per_example(keys):
            raise ValueError(
                "The sampler takes one key per image, [B] typed keys: parallel.example_keys(jax.random.key(seed), "
                "jnp.arange(B)) gives image i the key fold_in(key, i) (what pipeline.generate does)."
            )
        if (init is None) != (edit is None):
            raise ValueError("Pass init (the images to edit) exactly when the sampler was made with an edit.")
        if conditional and labels is None:
            raise ValueError("A class-conditional model samples with labels: pass each image's class.")
        return compiled(params, keys, labels if conditional else None, init)

    run.mesh, run.lower = mesh, compiled.lower  # its mesh (for generate), and its program (for XLA's analyses)
    return run


def labels_for(num_samples: int, num_classes: int | None, label: int | None) -> np.ndarray | None:
    """Every sample's label: ``label`` for all, or the classes in turn (0, 1, ..., C-1, 0, ...); None if no classes."""
    if num_classes is None:
        return None
    if label is not None:
        return np.full((num_samples,), label, np.int32)
    return (np.arange(num_samples) % num_classes).astype(np.int32)


def generate(
    pipe: Pipeline,
    run: Callable,
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    label: int | None = None,
    progress: Callable[[int], None] | None = None,
    init_images: np.ndarray | None = None,
) -> np.ndarray:
    """``num_samples`` uint8 images ``[N, H, W, C]`` of ``pipe.params`` with ``run`` (:func:`make_sampler`'s), in
    batches of ``batch_size`` over ``run``'s mesh; the same on every process.

    Image i is drawn with the key ``fold_in(key(seed), i)``: a seed gives the same images whatever the batch size, the
    device count or the process count. A class-conditional model draws ``label``, or the classes in turn. Each process
    feeds only its rows of each batch, and the last batch is padded (one compile: :func:`jaxdiff.parallel.map_batches`).
    With ``init_images`` (uint8 ``[M, H, W, C]``, for a sampler made with an edit) image i is an edit of
    ``init_images[i % M]``.
    """
    mesh = getattr(run, "mesh", None) or parallel.make_mesh()
    inputs = {"label": labels_for(num_samples, pipe.num_classes, label)}
    if init_images is not None:
        check_images_fit(pipe, init_images, "the images to edit")
        inputs["init"] = images.from_uint8(init_images[np.arange(num_samples) % len(init_images)])
    params = parallel.replicate(pipe.params, mesh)

    def draw(batch):
        return images.to_uint8(run(params, batch["key"], batch.get("label"), batch.get("init")))

    key = jax.random.key(seed)
    return parallel.map_batches(draw, inputs, num_samples, batch_size, mesh, key=key, progress=progress)


# ---------------------------------------------------------------------------------------------------------------------
# The variational bound


def make_bound_fn(
    pipe: Pipeline, chunk_size: int = 32, clip_x0: bool = False, mesh: jax.sharding.Mesh | None = None
) -> Callable:
    """A jitted ``(params, images uint8 [B, H, W, C], keys [B], labels [B] or None) -> VariationalBound`` (bits/dim)
    with the batch split over ``mesh``'s ``data`` axis. A class-conditional network is given each image's own label.

    Image b's noise comes from ``keys[b]`` alone (see :func:`jaxdiff.diffusion.variational_bound`). The bound reads
    the network's x_0 unclipped by default (``clip_x0``), whatever the pipeline samples with.
    """
    mesh = mesh or parallel.make_mesh()

    def bound(params, batch, keys, labels):
        def model_fn(x, t):  # called on B * chunk rows, example-major: each label repeated for its example's rows
            y = None if labels is None else jnp.repeat(labels, x.shape[0] // labels.shape[0])
            return pipe.apply_fn(params, x, t, y)

        x0 = images.from_uint8(batch)
        return diffusion.variational_bound(
            pipe.schedule,
            model_fn,
            x0,
            keys,
            prediction=pipe.prediction,
            variance=pipe.variance,
            clip_x0=clip_x0,
            chunk_size=chunk_size,
        )

    return parallel.jit_batched(bound, mesh, (False, True, True, True))


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
