"""Building a :class:`~jaxdiff.pipeline.Pipeline`, one place per source: a spec and parameters in memory, a training
run's workdir (autoguided by its own earlier checkpoint when asked), a diffusers folder or hub id, and the DDPM
authors' release (TF1 checkpoints, or the PyTorch port's files)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax

from jaxdiff import checkpoints, diffusion, edm, ema, flow, parallel, samplers
from jaxdiff.data.config import DataConfig
from jaxdiff.errors import CheckpointError
from jaxdiff.logs import log
from jaxdiff.models.unet import abstract_params, make_apply
from jaxdiff.pipeline.base import Pipeline
from jaxdiff.spec import DiffusionConfig, ModelSpec

__all__ = [
    "DDPM_PROCESS",
    "autoguided",
    "from_checkpoint",
    "from_diffusers",
    "from_release",
    "from_spec",
    "from_workdir",
    "params_like",
    "path_apply",
    "posthoc_ema_params",
]


def from_spec(spec: ModelSpec, params, source: str) -> Pipeline:
    """The pipeline of jaxdiff's UNet described by ``spec``, at ``params``: the one place a UNet becomes one."""
    net = spec.network
    return Pipeline(
        apply_fn=path_apply(make_apply(net), spec.diffusion),
        params=params,
        betas=spec.diffusion.betas(),
        prediction=spec.diffusion.sampled_prediction,
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


def path_apply(apply_fn, diffusion: DiffusionConfig):
    """The network of a run as the Pipeline holds it: itself for ``ddpm``; an ``edm`` or ``flow`` network presented as
    a VP network on its chain, predicting x_0 (:func:`jaxdiff.edm.vp_model`) or v (:func:`jaxdiff.flow.vp_model`), so
    that every sampler, the bound and FID take it as they take any other."""
    if diffusion.process == "ddpm":
        return apply_fn
    T = diffusion.num_timesteps

    def vp_apply(params, x_t, timesteps, labels):
        net = lambda x, label: apply_fn(params, x, label, labels)
        if diffusion.process == "edm":
            d = diffusion
            return edm.vp_model(net, T, d.sigma_min, d.sigma_max, d.sigma_data)(x_t, timesteps)
        return flow.vp_model(net, T)(x_t, timesteps)

    return vp_apply


def params_like(spec: dict):
    """The shapes of the parameters of the network that a checkpoint's stored spec (JSON) describes."""
    return abstract_params(ModelSpec.from_json(spec).network)


def from_workdir(
    workdir: str | os.PathLike,
    step: int | None = None,
    autoguidance: float | None = 0.0,
    sampler: str | None = None,
    *,
    ema_length: float | None = None,
) -> Pipeline:
    """The EMA parameters and the spec of the newest readable checkpoint of a training run (or of ``step``).

    ``autoguidance``: 0 gives the network itself (what the bound and any other use of the network want); None the run
    as ``sampler`` samples it by default (its ``config.sampling.autoguidance`` if the sampler is one of its
    ``autoguided_samplers``, guided by its checkpoint at ``guide_step``: :func:`autoguided`; unguided at or before
    that step, as the run itself sampled then); another value that scale, by the same guide, whatever the sampler.

    ``ema_length``: a sigma_rel (post-hoc EMA, EDM2): the parameters are instead the power-function EMA of that width
    reconstructed from the run's snapshots up to the checkpoint's step (:func:`posthoc_ema_params`); the guide of an
    autoguided run stays its checkpoint's EMA.

    Raises:
      FileNotFoundError: the workdir has no checkpoint (or not ``step``, or not the guide's).
      CheckpointError: no checkpoint can be read; ``ema_length`` of a run without snapshots.
      ValueError: autoguidance asked of a run that keeps no guide, or of a checkpoint not later than its guide.
    """
    ckpt = checkpoints.load_for_sampling(workdir, step, params_like)
    pipe = from_spec(ModelSpec.from_json(ckpt.spec), ckpt.ema_params, f"{workdir} (step {ckpt.step}, EMA)")
    if ema_length is not None:
        params, at = posthoc_ema_params(workdir, ckpt.step, ckpt.spec, ema_length)
        source = f"{workdir} (step {ckpt.step}, post-hoc EMA sigma_rel {ema_length:g} at step {at})"
        pipe = dataclasses.replace(pipe, params=params, source=source)
    scale = pipe.autoguidance_for(sampler) if autoguidance is None else autoguidance
    if autoguidance is None and pipe.guide_step is not None and pipe.guide_step >= ckpt.step:
        scale = 0.0  # the run's own default: no guide yet at this step
    if scale == 0:
        return pipe
    if pipe.guide_step is None:
        raise CheckpointError(
            f"{workdir} was trained without a guide checkpoint, so it cannot be autoguided: train with "
            "config.sampling.autoguidance != 0 (its guide: config.sampling.guide_fraction of the run), or sample with "
            "--autoguidance=0."
        )
    if pipe.guide_step >= ckpt.step:
        raise CheckpointError(
            f"The checkpoint at step {ckpt.step} of {workdir} is not later than its guide (step {pipe.guide_step}): "
            "sample a later --checkpoint_step, or with --autoguidance=0."
        )
    guide = checkpoints.load_for_sampling(workdir, pipe.guide_step, params_like)
    return autoguided(pipe, guide.ema_params, scale, f"its EMA at step {guide.step}")


def posthoc_ema_params(workdir: str | os.PathLike, step: int, spec: dict, sigma_rel: float):
    """The parameters of the power-function EMA of width ``sigma_rel`` (post-hoc EMA, Karras et al. 2024, EDM2
    section 3) reconstructed from ``workdir``'s snapshots up to ``step`` (:func:`jaxdiff.ema.synthesis_weights` at
    the newest snapshot's step, normally ``step`` itself: snapshots are saved on the checkpoint period), replicated
    on every device of every process, and that step. The snapshots are read and added one at a time
    (:func:`jaxdiff.ema.combine`); the log lists each profile's weight. ``spec``: the checkpoint's stored spec.

    Raises:
      CheckpointError: no snapshot at or before ``step`` (the run did not track post-hoc EMAs), or one that cannot
        be read or differs from its fingerprint.
      ConfigError: ``sigma_rel`` out of (0, 0.3003].
    """
    index = checkpoints.snapshot_index(workdir, up_to_step=step)
    if not index:
        later = checkpoints.snapshot_index(workdir)
        why = f"its first is at step {later[0]['step']}" if later else "it tracked no post-hoc EMA"
        raise CheckpointError(
            f"{workdir} has no EMA snapshot at or before step {step} ({why}): train with "
            "--config.optim.posthoc_ema=0.05,0.10 to sample with --ema_length, or pick a later --checkpoint_step."
        )
    steps = [m["step"] for m in index for _ in m["gammas"]]
    gammas = [g for m in index for g in m["gammas"]]
    widths = [s for m in index for s in m["sigma_rels"]]
    at = index[-1]["step"]
    x = ema.synthesis_weights(steps, gammas, sigma_rel, at)
    like = params_like(spec)

    def trees():  # one snapshot on the host at a time
        for meta in index:
            for snap in checkpoints.load_snapshot(workdir, meta["step"], like):
                yield jax.tree_util.tree_map(parallel.to_host, snap.params)

    params = parallel.replicate(ema.combine(x, trees()), parallel.make_mesh())
    weights = ", ".join(f"{s}/{w:g}: {v:+.4g}" for s, w, v in zip(steps, widths, x, strict=True))
    log(
        f"Post-hoc EMA of width sigma_rel {sigma_rel:g} (gamma {ema.sigma_rel_to_gamma(sigma_rel):.3f}) at step {at}, "
        f"from {len(index)} snapshots ({len(x)} profiles, steps {index[0]['step']}..{at}); weight per "
        f"step/sigma_rel: {weights}."
    )
    return params, at


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
            raise CheckpointError(
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
        # what a learned variance is trained by (improved DDPM's hybrid loss); only fine-tuning reads it
        loss_type="hybrid" if chosen["variance_type"] in diffusion.LEARNED_VARIANCES else "simple",
    )
    params, network = load_diffusers_unet(folder)
    spec = ModelSpec(network, process, clip_x0=bool(settings.get("clip_sample", True)))
    return from_spec(spec, params, str(path))


#: DDPM's forward process (Ho et al. 2020, section 4): linear betas 1e-4 .. 0.02 over T = 1000 steps, eps prediction.
DDPM_PROCESS = dict(num_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction="eps")


def from_release(
    path: str | os.PathLike, ema: bool = True, image_size: int | None = None, variance: str | None = None
) -> Pipeline:
    """A model of the DDPM authors' release: a TF1 checkpoint (``.../model.ckpt-790000``; its EMA shadows, or with
    ``ema=False`` the raw weights) or the PyTorch port's state dict file (:func:`jaxdiff.models.release.load_release`).

    DDPM's chain (linear betas 1e-4 .. 0.02, T = 1000, eps prediction, clipping); the published CIFAR-10 model
    samples with ``fixed_large``, the 256x256 ones with ``fixed_small``; a network with twice the image channels out
    with Ho's ``learned`` log-variance; ``variance`` chooses another that fits the channels
    (:func:`jaxdiff.models.release.infer_config`). The CIFAR-10 model's data is CIFAR-10 (so ``--eval`` needs no
    ``--dataset``).
    """
    from jaxdiff.models.release import load_release

    params, network, variance, name, weights = load_release(path, ema, image_size, variance)
    data = DataConfig(dataset="cifar10", image_size=32) if name == "cifar10" else None
    # Ho trains a learned variance on the bound alone (his loss_type 'kl'), eps on the simple loss: for fine-tuning
    loss_type = "bound" if variance in diffusion.LEARNED_VARIANCES else "simple"
    process = DiffusionConfig(**DDPM_PROCESS, variance=variance, loss_type=loss_type)
    spec = ModelSpec(network, process, clip_x0=True, data=data)
    return from_spec(spec, params, f"{path} ({weights} weights, {name} architecture)")


def from_checkpoint(
    path: str | os.PathLike,
    download: bool = False,
    ema: bool = True,
    image_size: int | None = None,
    variance: str | None = None,
) -> Pipeline:
    """An imported model, whatever its format: Ho et al.'s TF1 checkpoint or the PyTorch port's file
    (:func:`from_release`), else a diffusers folder or hub id (:func:`from_diffusers`). ``variance``: a release
    model's, if its output channels fit it (None: read off them); a diffusers model's is its scheduler's."""
    from jaxdiff.models.release import is_tf1_checkpoint

    local = pathlib.Path(path).expanduser()
    if is_tf1_checkpoint(local) or local.is_file():
        return from_release(local, ema, image_size, variance)
    if not ema:
        raise CheckpointError(f"{path}: only a TF1 checkpoint holds raw and EMA weights side by side; drop --noema.")
    if variance is not None:
        raise CheckpointError(
            f"{path}: a diffusers model samples with its scheduler_config.json's variance_type; drop --variance."
        )
    return from_diffusers(path, download)
