"""Making many images from a trained or imported model, sharded over every device: what ``sample.py`` runs.

``load_workdir`` (EMA parameters and config of a run) or ``load_diffusers`` (an imported DDPM model) give a
:class:`Model`; :func:`make_sampler` compiles one batch of a sampler, sharded over the devices; :func:`generate`
draws the batches (batch i from ``fold_in(key(seed), i)``, so the images depend on the seed and the batch size, never
on the device count); :func:`write_outputs` writes a PNG grid, the individual PNGs and ``samples.npz`` (uint8
``[N, H, W, C]`` under ``arr_0``, the format FID tools read).
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
from jax.experimental import multihost_utils

from jaxdiff import checkpoints, diffusion, samplers
from jaxdiff.data import DataConfig
from jaxdiff.images import save_grid
from jaxdiff.models.unet import UNet, UNetConfig
from jaxdiff.schedules import Schedule
from jaxdiff.training import make_mesh

# diffusers' scheduler names -> jaxdiff's
_DIFFUSERS_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
_DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_DIFFUSERS_VARIANCES = {"fixed_small": "fixed_small", "fixed_large": "fixed_large", "learned_range": "learned_range"}


@dataclasses.dataclass(frozen=True)
class Model:
    """A network with its parameters and the diffusion it was trained with."""

    network: UNetConfig
    params: Any
    beta_schedule: str
    num_timesteps: int
    schedule_kwargs: dict
    prediction: str
    variance: str
    clip_x0: bool
    source: str
    data: DataConfig | None = None  # what it was trained on (a training run's); None for an imported model
    eval_split: str | None = None  # its held-out split, for the bound in bits/dim

    def schedule(self, steps: int | None = None, spacing: str = "even") -> Schedule:
        return samplers.sampling_schedule(
            self.beta_schedule, self.num_timesteps, steps, spacing, **self.schedule_kwargs
        )


def model_from_config(config, network: UNetConfig, params: Any, source: str) -> Model:
    """A :class:`Model` from a training run's ConfigDict (its diffusion, sampling and data settings)."""
    from jaxdiff.experiment import data_config  # the one ConfigDict -> DataConfig mapping (imports this module)

    d = config.diffusion
    return Model(
        network=network,
        params=params,
        beta_schedule=d.beta_schedule,
        num_timesteps=d.num_timesteps,
        schedule_kwargs={"beta_start": d.beta_start, "beta_end": d.beta_end},  # ignored by the cosine schedule
        prediction=d.prediction,
        variance=d.variance,
        clip_x0=config.sampling.clip_x0,
        source=source,
        data=data_config(config),
        eval_split=config.data.eval_split,
    )


def load_workdir(workdir: str | os.PathLike, step: int | None = None) -> Model:
    """The EMA parameters and settings of the newest readable checkpoint of a training run (or of ``step``)."""
    ckpt = checkpoints.load_for_sampling(workdir, step)
    return model_from_config(ckpt.config, ckpt.model, ckpt.ema_params, f"{workdir} (step {ckpt.step}, EMA)")


def load_diffusers(path: str | os.PathLike, download: bool = False) -> Model:
    """An imported DDPM model (a diffusers UNet2DModel folder or pipeline folder) and its scheduler settings.

    ``path`` is a local folder or, with ``download=True``, a Hugging Face repo id such as ``google/ddpm-cifar10-32``
    (its UNet and scheduler config are fetched once and cached by ``huggingface_hub``).

    The diffusion settings come from ``scheduler_config.json`` (beside the weights or in ``scheduler/``); without
    one, DDPM's: linear betas 1e-4 .. 0.02 over 1000 steps, eps prediction, fixed_large variance, clipping.
    """
    from jaxdiff.models.convert import diffusers_folder, load_diffusers_unet

    folder = diffusers_folder(path, download)  # a download brings the scheduler config too
    params, network = load_diffusers_unet(folder)
    settings = {}
    for candidate in (folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            settings = json.loads(candidate.read_text())
            break
    name = settings.get("beta_schedule", "linear")
    if name not in _DIFFUSERS_SCHEDULES:
        raise ValueError(f"The scheduler's beta_schedule {name!r} is not supported; supported: {_DIFFUSERS_SCHEDULES}.")
    kwargs = {"beta_start": settings.get("beta_start", 1e-4), "beta_end": settings.get("beta_end", 0.02)}
    return Model(
        network=network,
        params=params,
        beta_schedule=_DIFFUSERS_SCHEDULES[name],
        num_timesteps=int(settings.get("num_train_timesteps", 1000)),
        schedule_kwargs=kwargs,
        prediction=_DIFFUSERS_PREDICTIONS[settings.get("prediction_type", "epsilon")],
        variance=_DIFFUSERS_VARIANCES.get(settings.get("variance_type", "fixed_large"), "fixed_large"),
        clip_x0=bool(settings.get("clip_sample", True)),
        source=str(path),
    )


def check_request(model: Model, sampler: str, steps: int | None, eta: float, label: int | None, guidance: float):
    """Clear errors for what cannot be sampled, before anything compiles."""
    diffusion.check_choice("sampler", sampler, samplers.SAMPLERS)
    model.schedule(steps)  # steps in [1, T]
    samplers.check_eta(eta)
    if sampler == "ddpm" and eta != 0:
        raise ValueError("eta is a DDIM setting; use --sampler=ddim with --eta, or drop --eta for DDPM.")
    classes = model.network.num_classes
    if classes is None and (label is not None or guidance != 0):
        raise ValueError(
            f"The model from {model.source} is unconditional: it takes no --label and no --guidance. Train with "
            "config.data.class_conditional=True (and label_dropout > 0 for guidance) for a class-conditional model."
        )
    if label is not None and not 0 <= label < classes:
        raise ValueError(f"label must lie in [0, {classes - 1}] for this model with {classes} classes, got {label}.")


def make_sampler(
    model: Model,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    spacing: str = "even",
    guidance: float = 0.0,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[Any, jax.Array, jax.Array | None, int], jax.Array]:
    """A compiled ``(params, key, labels, batch) -> images in [-1, 1]`` with the batch split over ``mesh``'s devices.

    ``labels`` is ``[batch]`` int32 for a class-conditional model (with ``guidance`` = w for classifier-free
    guidance), or None. ``steps``: the respaced schedule's length (None: all T).
    """
    schedule = model.schedule(steps, spacing)
    net = UNet(model.network)
    size, channels = model.network.image_size, model.network.in_channels
    conditional = model.network.num_classes is not None
    mesh = mesh or make_mesh()

    def sample(params, key, labels, shape):
        if conditional and guidance != 0:
            apply = lambda x, t, y: net.apply(params, x, t, y)
            model_fn = samplers.guided(apply, labels, model.network.num_classes, guidance, variance=model.variance)
        else:
            model_fn = lambda x, t: net.apply(params, x, t, labels)
        kwargs = {"prediction": model.prediction, "variance": model.variance, "clip_x0": model.clip_x0}
        if sampler == "ddim":
            return samplers.ddim_sample(schedule, model_fn, shape, key, eta=eta, **kwargs)
        return samplers.ddpm_sample(schedule, model_fn, shape, key, **kwargs)

    compiled = {}

    def run(params, key, labels, batch):
        if batch not in compiled:
            shape = (batch, size, size, channels)
            fn = lambda p, k, y: sample(p, k, y, shape)
            compiled[batch] = samplers.shard_sampler(fn, mesh, (False, False, conditional))
        return compiled[batch](params, key, labels if conditional else None)

    return run


def labels_for(num_samples: int, num_classes: int | None, label: int | None) -> np.ndarray | None:
    """Every sample's label: ``label`` for all, or the classes in turn (0, 1, ..., C-1, 0, ...); None if no classes."""
    if num_classes is None:
        return None
    if label is not None:
        return np.full((num_samples,), label, np.int32)
    return (np.arange(num_samples) % num_classes).astype(np.int32)


def generate(
    model: Model,
    run: Callable,
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    label: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """``num_samples`` uint8 images ``[N, H, W, C]``: batch i drawn with ``fold_in(key(seed), i)``.

    The last batch is drawn whole and cut, so every batch has the same shape (one compile).
    """
    devices = jax.device_count()
    if batch_size < 1 or batch_size % devices:
        raise ValueError(f"batch_size must be a positive multiple of the {devices} devices, got {batch_size}.")
    labels = labels_for(-(-num_samples // batch_size) * batch_size, model.network.num_classes, label)
    key = jax.random.key(seed)
    params = model.params
    out = []
    for i, start in enumerate(range(0, num_samples, batch_size)):
        batch_labels = None if labels is None else jnp.asarray(labels[start : start + batch_size])
        images = samplers.to_uint8(run(params, jax.random.fold_in(key, i), batch_labels, batch_size))
        out.append(np.asarray(multihost_utils.process_allgather(images, tiled=True)))
        if progress is not None:
            progress(min(batch_size, num_samples - start))
    return np.concatenate(out)[:num_samples]


def write_outputs(images: np.ndarray, out: str | os.PathLike, individual: bool = True) -> dict[str, str]:
    """Write ``grid.png`` (up to 256 images), ``images/000000.png``... and ``samples.npz`` (``arr_0``) under ``out``."""
    from PIL import Image

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"npz": str(out / "samples.npz"), "grid": save_grid(images[:256], out / "grid.png")}
    np.savez(out / "samples.npz", arr_0=images)
    if individual:
        folder = out / "images"
        folder.mkdir(exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f"{i:06d}.png")
        paths["images"] = str(folder)
    return paths
