"""What ``sample.py`` runs: draw images from a Pipeline and write them, or judge it (bits/dim, FID).

:func:`sample` takes a typed :class:`SampleRequest` (``sample.py``'s flags, one field each), builds the
:class:`~jaxdiff.pipeline.Pipeline` from a workdir or a diffusers model, checks the request before anything
compiles, then draws (:func:`jaxdiff.pipeline.generate`), evaluates the bound over a split
(:func:`jaxdiff.evaluation.bound_over_split`) or judges samples (:func:`jaxdiff.metrics.fid.sample_quality`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time

import jax
import numpy as np

from jaxdiff import checkpoints, ema, evaluation, images, parallel, pipeline
from jaxdiff.data.config import DataConfig
from jaxdiff.data.readers import load_split
from jaxdiff.errors import ConfigError
from jaxdiff.logs import Progress, is_main_process, log
from jaxdiff.metrics import features
from jaxdiff.metrics.fid import load_precomputed_stats, sample_quality
from jaxdiff.metrics.heldout import HELDOUT_SPLITS, HeldoutJudge, heldout_judge, uses_heldout_judge
from jaxdiff.metrics.reference import class_reference_stats, reference_stats
from jaxdiff.pipeline import Pipeline

__all__ = [
    "BOUND_EVALS",
    "EVALS",
    "EVAL_BATCH",
    "FID_SAMPLER",
    "SAMPLE_PIXELS",
    "SampleRequest",
    "batch_for",
    "data_for",
    "draw",
    "evaluate_bpd",
    "evaluate_ode_bpd",
    "fid_reference",
    "fid_sampler",
    "load_samples",
    "report_fid",
    "resolved",
    "sample",
]

BOUND_EVALS = ("bpd", "ode_bpd")  #: the network's own likelihood: never guided
#: What ``sample.py --eval`` computes: the bound's bits/dim, the ODE's bits/dim, or FID.
EVALS = (*BOUND_EVALS, "fid")
EVAL_BATCH = 64  #: images per batch of --eval=bpd/ode_bpd unless --batch_size says otherwise
SAMPLE_PIXELS = 2**18  #: the default drawing batch holds about this many pixel values (batch_for)


def batch_for(image_shape: tuple[int, int, int]) -> int:
    """The default drawing batch: as many images as hold ~2^18 values (4096 8x8 digits, 85 CIFAR-10 images, 1 at
    256x256). Small images go in few large batches (900 digits in one: 1.24x the images/s of batch 64 on a 2-core CPU,
    docs/benchmarks.md), large ones are big enough per image, and the batch stays within a CPU's memory."""
    return max(1, SAMPLE_PIXELS // math.prod(image_shape))


#: ``--eval=fid``'s sampler and steps for an imported model: EvaluationConfig's defaults (the training-time FID's).
FID_SAMPLER = ("ddim", 100)


def fid_sampler(workdir: str | None) -> tuple[str, int]:
    """The sampler and steps of ``--eval=fid`` when ``--sampler`` is not given: the run's own training-time FID's
    (``config.evaluation.sampler`` and ``steps`` of the config its newest checkpoint stores, which every host reads
    alike; steps 0 is all T, as there), else :data:`FID_SAMPLER`. Never all T steps of ancestral DDPM by default: 50,000
    CIFAR-10 samples would be 50M network calls."""
    if workdir is not None:
        try:
            evaluation = checkpoints.restore_config(workdir)["evaluation"]
            return evaluation["sampler"], int(evaluation["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an older run's config without these: the default below
    return FID_SAMPLER


def resolved(request: SampleRequest) -> SampleRequest:
    """``request`` with its sampler chosen where ``--sampler`` was not given: ``ddpm``, or with ``--eval=fid`` the
    run's training-time FID sampler and steps (:func:`fid_sampler`; ``--steps`` still wins)."""
    if request.sampler is not None:
        return request
    sampler, steps = fid_sampler(request.workdir) if request.eval == "fid" else ("ddpm", request.steps)
    return dataclasses.replace(request, sampler=sampler, steps=request.steps if request.steps is not None else steps)


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """One run of ``sample.py``: which model, what to draw, and what to evaluate (see its flags)."""

    workdir: str | None = None
    checkpoint_step: int | None = None  # --workdir: which checkpoint (None: the newest readable)
    pretrained: str | None = None  # an imported model (TF1 release, its PyTorch port, diffusers)
    ema: bool = True  # --pretrained of the TF1 release: its EMA shadows, or the raw weights
    image_size: int | None = None  # --pretrained of the release with an unpublished architecture
    variance: str | None = None  # --pretrained of the release: the reverse variance (None: read off the channels)
    num_samples: int = 64
    batch_size: int | None = None  # None: batch_for(), by image size
    sampler: str | None = None  # None: ddpm; with eval="fid", the training-time FID's (resolved, fid_sampler)
    steps: int | None = None  # None: all T for ddpm, 50 for ddim, 20 for the ODE solvers; fid: the FID sampler's
    spacing: str | None = None  # None: the sampler's own grid
    eta: float = 0.0
    seed: int = 0
    label: int | None = None
    guidance: float | None = None  # None: the run's config.sampling.guidance
    autoguidance: float | None = None  # --workdir: None is the run's default for the sampler
    ema_length: float | None = None  # --workdir: a post-hoc EMA's sigma_rel, rebuilt from the run's snapshots
    churn: float = 0.0
    init_images: str | None = None
    strength: float | None = None
    mask: str | None = None
    jump_length: int = 10
    resamplings: int = 1
    out: str | None = None
    individual: bool = True
    download: bool = False
    eval: str | None = None
    dataset: str | None = None
    split: str | None = None
    data_dir: str | None = None
    features: str = "auto"
    inception_weights: str | None = None
    resize: str = "tf1"
    samples: str | None = None
    reference_stats: str | None = None  # --eval=fid: a precomputed .npz (mu, sigma) instead of the cached split's
    eval_images: int | None = None
    divergence: str = "auto"
    tolerance: float = 1e-5

    def __post_init__(self):
        if (self.workdir is None) == (self.pretrained is None):
            raise ConfigError("Pass exactly one of --workdir (a training run) or --pretrained (an imported model).")
        if self.workdir is None and self.checkpoint_step is not None:
            raise ConfigError("--checkpoint_step picks a checkpoint of a run's --workdir; --pretrained has none.")
        if self.workdir is not None and (not self.ema or self.image_size is not None):
            raise ConfigError("--noema and --image_size apply to --pretrained; a --workdir samples its EMA parameters.")
        if self.workdir is not None and self.variance is not None:
            raise ConfigError("--variance applies to --pretrained; a --workdir samples with the variance it trained.")
        if self.num_samples < 1:
            raise ConfigError(f"--num_samples must be >= 1, got {self.num_samples}.")
        if (self.samples is not None or self.reference_stats is not None) and self.eval != "fid":
            raise ConfigError("--samples and --reference_stats are for --eval=fid; add --eval=fid.")
        if self.eval is not None and self.eval not in EVALS:
            raise ConfigError(f"--eval must be one of {EVALS}, got {self.eval!r}.")
        if (self.init_images is None) != (self.strength is None and self.mask is None):
            raise ConfigError(
                "--init_images are edited: add --strength (SDEdit) or --mask (inpainting); both need --init_images."
            )
        if self.init_images is not None and self.eval is not None:
            raise ConfigError("--init_images edits images; it does not combine with --eval.")
        if self.autoguidance not in (None, 0.0) and self.workdir is None:
            raise ConfigError(
                "--autoguidance guides a training run's model by its own earlier checkpoint: it needs --workdir."
            )
        if self.autoguidance not in (None, 0.0) and self.eval in BOUND_EVALS:
            raise ConfigError(f"--eval={self.eval} measures the network itself; drop --autoguidance.")
        if self.eval_images is not None and self.eval_images < 1:
            raise ConfigError(f"--eval_images must be >= 1, got {self.eval_images}.")
        if self.ema_length is not None and self.workdir is None:
            raise ConfigError("--ema_length rebuilds an EMA from a training run's snapshots: it needs --workdir.")
        if self.ema_length is not None and not 0 < self.ema_length <= ema.SIGMA_REL_MAX:
            raise ConfigError(
                f"--ema_length is a post-hoc EMA's width sigma_rel, in (0, {ema.SIGMA_REL_MAX:.4f}] (EDM2 tracks "
                f"0.05 and 0.10); got {self.ema_length}."
            )

    @property
    def sampling_steps(self) -> int | None:
        """The sampling steps: ``steps`` (0 or None given with a resolved FID sampler: all T), else the sampler's
        default (all T for ddpm, 50 for ddim, 20 for the ODE solvers); None is all T."""
        if self.steps is not None:
            return self.steps or None
        return {"ddpm": None, "ddim": 50}.get(self.sampler, 20)

    def edit(self, pipe: Pipeline) -> pipeline.Edit | None:
        """The edit asked for, with a named or .npz mask made for the model's image size."""
        if self.init_images is None:
            return None
        height, width, _ = pipe.image_shape
        hole = None if self.mask is None else images.load_mask(self.mask, height, width)
        return pipeline.Edit(self.strength, hole, self.jump_length, self.resamplings)

    @property
    def out_dir(self) -> pathlib.Path:
        return pathlib.Path(self.out or os.path.join(self.workdir or ".", "samples"))


def sample(request: SampleRequest) -> int:
    """Run ``request``; returns the exit status (0). A request that cannot be met raises a
    :class:`~jaxdiff.errors.JaxdiffError` before anything compiles (``jaxdiff-sample`` prints it as one line and exits
    with 2). A sampler not given is chosen first (:func:`resolved`)."""
    request = resolved(request)
    if request.workdir is not None:
        # The bound is the network's own; the images are drawn as the run samples (autoguided if it is).
        guided = 0.0 if request.eval in BOUND_EVALS else request.autoguidance
        pipe = pipeline.from_workdir(
            request.workdir, request.checkpoint_step, guided, request.sampler, ema_length=request.ema_length
        )
    else:
        pipe = pipeline.from_checkpoint(
            request.pretrained, request.download, request.ema, request.image_size, request.variance
        )
    r = request
    edit = r.edit(pipe)
    pipeline.check_request(pipe, r.sampler, r.sampling_steps, r.eta, r.label, r.guidance, edit, r.churn)
    if request.eval in BOUND_EVALS:
        (evaluate_bpd if request.eval == "bpd" else evaluate_ode_bpd)(pipe, request)
        return 0
    given = load_samples(request.samples) if request.samples is not None else None
    init = load_samples(request.init_images) if request.init_images is not None else None
    if init is not None:
        pipeline.check_images_fit(pipe, init, request.init_images)
    if request.eval == "fid":
        extractor, reference, reference_name, per_class = fid_reference(pipe, request)
    drawn = given if given is not None else draw(pipe, request, edit, init)
    if request.eval == "fid":
        # Drawn by a class-conditional model: each image's requested class (--label, or the classes in turn).
        labels = pipeline.labels_for(len(drawn), pipe.num_classes, request.label) if given is None else None
        report_fid(extractor, reference, drawn, request.out_dir, labels, per_class, reference_name)
    return 0


def draw(
    pipe: Pipeline, request: SampleRequest, edit: pipeline.Edit | None = None, init: np.ndarray | None = None
) -> np.ndarray:
    """``num_samples`` images with a progress bar and a summary line; written under ``out`` unless evaluating. With an
    ``edit``, image i edits ``init[i % len(init)]``."""
    mesh = parallel.make_mesh()
    batch = parallel.round_up_batch(min(request.batch_size or batch_for(pipe.image_shape), request.num_samples), mesh)
    r = request
    run = pipeline.make_sampler(
        pipe, r.sampler, r.sampling_steps, r.eta, r.spacing, r.guidance, mesh=mesh, edit=edit, churn=r.churn
    )
    what = "Sampling"
    if edit is not None:
        what = f"SDEdit at strength {edit.strength} of" if edit.hole is None else f"Inpainting ({r.mask}) of"
        what += f" {len(init)} images from {r.init_images}:"
    log(
        f"{what} {r.num_samples} images from {pipe.source}: {r.sampler}, {r.sampling_steps or pipe.num_timesteps} "
        f"steps, batch {batch} over {mesh.devices.size} device(s)."
    )
    progress = Progress(r.num_samples, "image")
    start = time.perf_counter()
    drawn = pipeline.generate(pipe, run, r.num_samples, batch, r.seed, r.label, progress, init)
    total = time.perf_counter() - start
    progress.close()
    rate = f"{len(drawn) / total:.2f} images/s overall"
    after_first = progress.rate_after_first(batch)  # the first batch includes the compile
    if after_first is not None:
        rate += f", {after_first:.2f} images/s after the first batch"
    if r.eval is None and is_main_process():
        paths = images.write_samples(drawn, r.out_dir, individual=r.individual)
        size = "x".join(map(str, drawn.shape[1:]))
        log(
            f"Wrote {len(drawn)} images {size} to {r.out_dir} ({paths['grid']}, {paths['npz']}) in {total:.1f} s "
            f"(the first batch includes the compile): {rate}."
        )
    else:
        log(f"Sampled {len(drawn)} images in {total:.1f} s: {rate}.")
    return drawn


def data_for(pipe: Pipeline, request: SampleRequest, split: str) -> DataConfig:
    """The dataset to evaluate on: the one the model was trained on, or ``--dataset/--split/--data_dir``."""
    if pipe.data is None and request.dataset is None:
        raise ConfigError(f"{pipe.source} does not say what it was trained on: pass --dataset (e.g. cifar10).")
    data = pipe.data or DataConfig(dataset=request.dataset, image_size=pipe.image_shape[0])
    return dataclasses.replace(
        data,
        dataset=request.dataset or data.dataset,
        split=split,
        data_dir=request.data_dir or data.data_dir,
        download=request.download or data.download,
        random_flip=False,
    )


def evaluate_bpd(pipe: Pipeline, request: SampleRequest) -> None:
    """The variational bound over a whole split in bits/dim: printed, and written to ``<out>/bpd.json``."""
    data = data_for(pipe, request, request.split or (pipe.data.eval_split if pipe.data else "test"))
    split_images, labels = load_split(data)
    pipeline.check_images_fit(pipe, split_images, f"{data.dataset} {data.split}")
    labels = labels if pipe.num_classes is not None else None
    mesh = parallel.make_mesh()
    batch = parallel.round_up_batch(min(request.batch_size or EVAL_BATCH, len(split_images)), mesh)
    log(
        f"Bits/dim of {pipe.source} over {data.dataset} {data.split}: {len(split_images)} images x "
        f"{pipe.num_timesteps} timesteps, batch {batch} over {mesh.devices.size} device(s)."
    )
    progress = Progress(len(split_images), "image")
    start = time.perf_counter()
    bound_fn = pipeline.make_bound_fn(pipe, mesh=mesh)
    key = jax.random.key(request.seed)
    result = evaluation.bound_over_split(bound_fn, pipe.params, split_images, key, batch, labels, mesh, progress)
    seconds = time.perf_counter() - start
    progress.close()
    if is_main_process():
        path = result.write_json(
            request.out_dir / "bpd.json",
            model=pipe.source,
            dataset=data.dataset,
            split=data.split,
            seed=request.seed,
            seconds=seconds,
        )
        log(
            f"bits/dim {result.total:.4f} +- {result.total_stderr:.4f} (prior {result.prior:.2e}, denoising "
            f"{result.denoising:.4f}, reconstruction {result.reconstruction:.4f}) over {result.num_examples} images "
            f"in {seconds:.0f} s ({result.num_examples / seconds:.2f} images/s); per-t curve in {path}."
        )


def evaluate_ode_bpd(pipe: Pipeline, request: SampleRequest) -> None:
    """Bits/dim of the probability-flow ODE over a split (or its first ``eval_images``): printed, and written to
    ``<out>/ode_bpd.json`` with each image's figure."""
    data = data_for(pipe, request, request.split or (pipe.data.eval_split if pipe.data else "test"))
    split_images, labels = load_split(data)
    split_images = split_images[: request.eval_images]
    pipeline.check_images_fit(pipe, split_images, f"{data.dataset} {data.split}")
    labels = labels[: request.eval_images].astype(np.int32) if pipe.num_classes is not None else None
    mesh = parallel.make_mesh()
    batch = parallel.round_up_batch(min(request.batch_size or EVAL_BATCH, len(split_images)), mesh)
    log(
        f"ODE bits/dim of {pipe.source} over {len(split_images)} images of {data.dataset} {data.split} "
        f"(divergence {request.divergence}, tolerance {request.tolerance}), batch {batch}."
    )
    bpd_fn = pipeline.make_ode_bpd_fn(pipe, request.divergence, request.tolerance, mesh)
    key = jax.random.key(request.seed)
    progress = Progress(len(split_images), "image")
    start = time.perf_counter()
    bits, steps = evaluation.ode_bpd_over_split(bpd_fn, pipe.params, split_images, key, batch, labels, mesh, progress)
    seconds = time.perf_counter() - start
    progress.close()
    mean, stderr = float(bits.mean()), float(bits.std(ddof=1) / np.sqrt(len(bits))) if len(bits) > 1 else 0.0
    if is_main_process():
        path = request.out_dir / "ode_bpd.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = dict(model=pipe.source, dataset=data.dataset, split=data.split, seed=request.seed)
        summary.update(divergence=request.divergence, tolerance=request.tolerance, num_examples=len(bits))
        summary.update(bpd=mean, bpd_stderr=stderr, solver_steps=steps, seconds=seconds, per_image=bits.tolist())
        path.write_text(json.dumps(summary, indent=1))
        log(
            f"ODE bits/dim {mean:.4f} +- {stderr:.4f} over {len(bits)} images in {seconds:.0f} s (solver steps per "
            f"batch {min(steps)}-{max(steps)}); written to {path}."
        )


def fid_reference(pipe: Pipeline, request: SampleRequest):
    """The feature extractor, the reference and what it is, and for a conditional model judged by a classifier of
    the dataset's classes, each class's statistics (else None).

    The reference is a :class:`~jaxdiff.metrics.heldout.HeldoutJudge` for the digits (judged by the digits
    classifier, unless ``--split`` names another split): the test split, with the real-data floor and the
    near-copies. Otherwise it is the statistics of ``--reference_stats``, or of the split (by default train's,
    computed once and cached).
    """
    precomputed = request.reference_stats is not None  # a precomputed .npz: the dataset is not read
    if precomputed and pipe.data is None and request.dataset is None:  # an imported model: the FID Inception
        data = DataConfig(dataset="(precomputed statistics)", image_size=pipe.image_shape[0])
    else:
        data = data_for(pipe, request, request.split or "train")
    extractor = features.make_extractor(
        request.features, data, request.inception_weights, request.download, request.resize, request.batch_size or 100
    )
    if precomputed:
        stats = load_precomputed_stats(request.reference_stats, extractor.dim)
        return extractor, stats, request.reference_stats, None
    heldout = HELDOUT_SPLITS.get(data.dataset)
    if request.split in (None, heldout) and uses_heldout_judge(data, extractor):
        judge = heldout_judge(extractor, dataclasses.replace(data, split="train"), heldout)
        return extractor, judge, f"the {judge.name} split (held out; {judge.num_heldout} images)", None
    per_class = None
    if pipe.num_classes is not None and extractor.classifies and request.samples is None:
        per_class = class_reference_stats(extractor, data, log=log)
    name = f"{extractor.name} statistics of the {data.split} split"
    return extractor, reference_stats(extractor, data, log=log), name, per_class


def load_samples(path: str | os.PathLike) -> np.ndarray:
    """The uint8 images ``arr_0`` of an .npz file (what sample.py writes, and what FID tools read)."""
    try:
        with np.load(path) as f:
            loaded = f["arr_0"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path} is not an .npz file with uint8 images under arr_0 ({e}).") from e
    if loaded.dtype != np.uint8 or loaded.ndim != 4:
        raise ConfigError(f"{path}: arr_0 must be uint8 [N, H, W, C], got {loaded.dtype} {loaded.shape}.")
    return loaded


def report_fid(
    extractor, reference, judged: np.ndarray, out: pathlib.Path, labels=None, per_class=None, reference_name=""
) -> None:
    """FID (and the Inception Score, or the digits classifier score) of ``judged``: printed and in ``out/fid.json``,
    with which reference was used; for class-conditional samples (``labels``) also the conditional accuracy and the
    distance per class. ``reference``: feature statistics, or a :class:`~jaxdiff.metrics.heldout.HeldoutJudge`
    (then also the real-data floor, the near-copies and the train-referenced distance)."""
    if isinstance(reference, HeldoutJudge):
        result = reference(judged, labels)
        result.update(features=extractor.name, reference=reference_name, reference_num=reference.num_heldout)
        line = f"{reference.summary(result)} ({extractor.name} features, {len(judged)} samples)"
    else:
        result = sample_quality(extractor, judged, reference, labels=labels, class_reference=per_class)
        result.update(features=extractor.name, reference=reference_name, reference_num=reference.num)
        score = f", score {result['score']:.3f}" if "score" in result else ""
        if "cond_accuracy" in result:
            score += f", conditional accuracy {result['cond_accuracy']:.3f}"
        line = (
            f"FID {result['fid']:.4f}{score} ({extractor.name} features, {len(judged)} samples against "
            f"{reference_name or 'the reference'}, {reference.num or 'an unknown number of'} images)"
        )
    if is_main_process():
        path = out / "fid.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        log(f"{line}; written to {path}.")
