"""Drawing images with a :class:`~jaxdiff.pipeline.Pipeline`: one compiled sampler per request (:func:`make_sampler`,
any sampler, guided, or editing given images) and :func:`generate`, which runs it over many images.

Image i is drawn with the key ``fold_in(key(seed), i)``, so a seed gives the same images at any batch size, device
count or process count; the batches go through :func:`jaxdiff.parallel.map_batches` (each process feeds its rows,
and every process gets the images).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import diffusion, edm, flow, images, parallel, samplers
from jaxdiff.errors import ConfigError
from jaxdiff.pipeline.base import Pipeline

__all__ = ["Edit", "check_images_fit", "check_request", "generate", "labels_for", "make_sampler", "path_sample"]


def check_images_fit(pipe: Pipeline, images: np.ndarray, what: str) -> None:
    """A clear error when images (a split to evaluate on, images to edit) are not the size the network takes."""
    want = pipe.image_shape
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ConfigError(
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
            raise ConfigError("An edit is either SDEdit (--strength) or inpainting (--mask), not both and not neither.")
        if self.strength is not None:
            samplers.check_strength(self.strength)
        if self.jump_length < 1 or self.resamplings < 1:
            raise ConfigError(f"jump_length and resamplings must be >= 1, got {self.jump_length}, {self.resamplings}.")


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
        raise ConfigError(f"eta is a DDIM setting; use --sampler=ddim with --eta, or drop --eta for {sampler}.")
    if churn != 0 and (sampler not in ("heun", "edm") or not churn > 0):
        raise ConfigError(
            f"churn is Karras et al.'s stochastic churn, >= 0 with --sampler=heun or edm; got {churn} with {sampler}."
        )
    if edit is not None and sampler in samplers.PATH_SAMPLERS:
        raise ConfigError(
            f"Editing runs on the chain's samplers (SDEdit: any of {', '.join(samplers.SAMPLERS[:-3])}; inpainting: "
            f"ddpm), not on {sampler}."
        )
    classes = pipe.num_classes
    if classes is None and (label is not None or guidance != 0):
        raise ConfigError(
            f"The model from {pipe.source} is unconditional: it takes no --label and no --guidance. Train with "
            "config.data.class_conditional=True (and label_dropout > 0 for guidance) for a class-conditional model."
        )
    if label is not None and not 0 <= label < classes:
        raise ConfigError(f"label must lie in [0, {classes - 1}] for this model with {classes} classes, got {label}.")
    if edit is not None and edit.hole is not None:
        if sampler != "ddpm":
            raise ConfigError(
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

    ``sampler``: ``ddpm``, ``ddim`` (with ``eta``), ``dpm++2m``, ``dpm++3m``, ``dpm++3m-ref`` (3M as the reference
    codes have it: :func:`jaxdiff.samplers.dpm_solver_sample`'s ``third_order``) or ``heun`` (with Karras et al.'s
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
        if sampler in samplers.PATH_SAMPLERS:
            return path_sample(pipe, sampler, steps, model_fn, key, shape, churn, x_T)
        if sampler == "ddim":
            return samplers.ddim_sample(schedule, model_fn, shape, key, eta=eta, x_T=x_T, **kwargs)
        if sampler.startswith("dpm++"):
            order, form = {"dpm++2m": (2, "exact"), "dpm++3m": (3, "exact"), "dpm++3m-ref": (3, "reference")}[sampler]
            return samplers.dpm_solver_sample(
                schedule, model_fn, shape, key, order=order, third_order=form, x_T=x_T, **kwargs
            )
        if sampler == "heun":
            return samplers.heun_sample(schedule, model_fn, shape, key, x_T=x_T, s_churn=churn, **kwargs)
        return samplers.ddpm_sample(schedule, model_fn, shape, key, x_T=x_T, **kwargs)

    def sample(params, key, labels, init):
        shape = (key.shape[0], *pipe.image_shape)
        model_fn = pipe.model_fn(params, labels, guidance)
        if edit is None:
            return from_noise(schedule, model_fn, key, shape)
        if edit.hole is not None:
            return samplers.repaint_sample(
                schedule,
                model_fn,
                init,
                key,
                mask=jnp.asarray(edit.hole, jnp.float32),
                jump_length=edit.jump_length,
                resamplings=edit.resamplings,
                **kwargs,
            )
        start = lambda schedule, key, x_T: from_noise(schedule, model_fn, key, shape, x_T)
        return samplers.sdedit(start, schedule, init, edit.strength, key)

    compiled = parallel.jit_batched(sample, mesh, (False, True, conditional, edit is not None))

    def run(params, keys, labels=None, init=None):
        if not diffusion.key_per_example(keys):
            raise ConfigError(
                "The sampler takes one key per image, [B] typed keys: parallel.example_keys(jax.random.key(seed), "
                "jnp.arange(B)) gives image i the key fold_in(key, i) (what pipeline.generate does)."
            )
        if (init is None) != (edit is None):
            raise ConfigError("Pass init (the images to edit) exactly when the sampler was made with an edit.")
        if conditional and labels is None:
            raise ConfigError("A class-conditional model samples with labels: pass each image's class.")
        return compiled(params, keys, labels if conditional else None, init)

    run.mesh, run.lower = mesh, compiled.lower  # its mesh (for generate), and its program (for XLA's analyses)
    return run


def path_sample(pipe: Pipeline, sampler: str, steps: int | None, model_fn, key, shape, churn: float = 0.0, x_T=None):
    """``edm`` (Karras et al.'s sampler on the rho grid between the chain's lowest and highest finite levels) or
    ``flow-euler``/``flow-heun`` (the flow ODE on an even grid in t from the chain's top, t = 1 for a chain that ends
    at pure noise), over ``steps`` intervals (None: T), on any pipeline: the network through its denoiser or
    velocity (:func:`jaxdiff.edm.denoiser`, :func:`jaxdiff.flow.velocity`)."""
    steps = pipe.num_timesteps if steps is None else steps
    kinds = {"prediction": pipe.prediction, "variance": pipe.variance}
    abar = np.cumprod(1.0 - pipe.betas)
    with np.errstate(divide="ignore"):
        sigmas = np.sqrt((1.0 - abar) / abar)
    if sampler == "edm":
        grid = edm.sigma_grid(steps, float(sigmas[0]), float(sigmas[np.isfinite(sigmas)].max()))
        return edm.edm_sample(edm.denoiser(pipe.schedule, model_fn, **kinds), shape, key, grid, s_churn=churn, x_T=x_T)
    top = np.sqrt(1.0 - abar[-1]) / (np.sqrt(abar[-1]) + np.sqrt(1.0 - abar[-1]))  # t = sigma / (1 + sigma)
    method = sampler.removeprefix("flow-")
    velocity = flow.velocity(pipe.schedule, model_fn, **kinds)
    return flow.flow_sample(velocity, shape, key, flow.time_grid(steps, float(top)), method=method, x_T=x_T)


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
