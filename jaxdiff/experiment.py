"""A run from an ml_collections config: typed settings at the boundary, then ``train_and_evaluate(config, workdir)``.

This is the only module that reads a ConfigDict. :func:`run_config` maps each section onto its dataclass field for
field (``DataConfig(**config.data)``, ``DiffusionConfig(**config.diffusion)``, ...); below it every function takes
typed arguments. The training loop is a few lines: a step, then the named periodic actions of
:mod:`jaxdiff.actions` (report, bits/dim, FID, sample grid, checkpoint; SIGTERM saves and stops).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental.multihost_utils import sync_global_devices

from jaxdiff import actions, checkpoints, diffusion, flops, logs, parallel, pipeline, samplers
from jaxdiff.data.batches import make_batches
from jaxdiff.data.config import DataConfig
from jaxdiff.data.prepare import num_classes
from jaxdiff.data.readers import InMemory, Streamed, open_split
from jaxdiff.errors import ConfigError
from jaxdiff.logs import log
from jaxdiff.models.unet import UNetConfig, abstract_params, init_params, make_apply
from jaxdiff.spec import DiffusionConfig, ModelSpec
from jaxdiff.training import (
    OptimConfig,
    TrainState,
    init_train_state,
    make_optimizer,
    make_train_step,
    run_keys,
    shard_train_step,
)

__all__ = [
    "DERIVED_NETWORK_FIELDS",
    "DERIVED_OPTIM_FIELDS",
    "EvaluationConfig",
    "RunConfig",
    "SamplingConfig",
    "TrainingConfig",
    "run_config",
    "train_and_evaluate",
]

#: UNetConfig's fields that a run derives (from the data and the diffusion) instead of reading from config.model.
DERIVED_NETWORK_FIELDS = ("image_size", "in_channels", "learn_sigma", "num_classes")
#: OptimConfig's fields that a run derives: the schedule's length is config.training.num_steps.
DERIVED_OPTIM_FIELDS = ("total_steps",)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """``config.training``: the global batch, the length of the run, and how often each periodic action runs.

    Every ``*_every`` counts steps; 0 turns that action off; each also runs after the last step.
    """

    batch_size: int = 128
    num_steps: int = 800_000
    log_every: int = 100
    sample_every: int = 10_000
    num_samples: int = 64
    eval_every: int = 10_000
    eval_batch_size: int = 16
    checkpoint_every: int = 5_000
    keep_checkpoints: int = 3

    def __post_init__(self):
        if self.num_steps < 1 or self.num_samples < 1 or self.eval_batch_size < 1 or self.keep_checkpoints < 1:
            raise ConfigError(
                "training.num_steps, num_samples, eval_batch_size and keep_checkpoints must be >= 1; got "
                f"{self.num_steps}, {self.num_samples}, {self.eval_batch_size}, {self.keep_checkpoints}."
            )


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``config.sampling``: how the run's model is sampled (by default, and by ``sample.py --workdir``).

    ``guidance``: the classifier-free guidance scale w of a class-conditional model (train it with
    ``diffusion.label_dropout > 0``): the run's own sample grids and FID use it, and so does ``sample.py`` unless
    ``--guidance`` says otherwise.

    ``autoguidance``: the scale w of autoguidance (:func:`jaxdiff.pipeline.autoguided`), the model guided away from
    its own EMA parameters at an earlier step of the run, the guide's, for the samplers in ``autoguided_samplers`` (by
    default the deterministic ones: on the digits default, guiding ancestral DDPM as well moved its samples away from
    the data). The run saves and keeps a checkpoint at the guide's step. Its grids (DDPM) and FID
    (``evaluation.sampler``) after that step are autoguided when their sampler is one of those, and so is
    ``sample.py`` unless ``--autoguidance`` says otherwise.

    ``guide_fraction``: the guide's step as a share f of the run, in (0, 1): step round(f * num_steps), at least 1
    and before the last, so that an override of ``training.num_steps`` moves the guide with the run's end.
    ``guide_step``: an absolute step instead (configs written before ``guide_fraction``), used when it is before the
    run's end; set with ``autoguidance = 0``, the run still keeps that checkpoint (for ``sample.py --autoguidance``).
    :meth:`for_run` resolves them: in a :class:`RunConfig`, ``guide_step`` is the guide's step (None: no guide), the
    step that the run's :class:`~jaxdiff.spec.ModelSpec` records.
    """

    clip_x0: bool = True
    guidance: float = 0.0
    autoguidance: float = 0.0
    guide_fraction: float = 1 / 3
    guide_step: int | None = None
    autoguided_samplers: tuple[str, ...] = samplers.DETERMINISTIC_SAMPLERS

    def __post_init__(self):
        f = self.guide_fraction
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f < 1:
            raise ConfigError(
                f"config.sampling.guide_fraction must lie in (0, 1), the guide's step as a share of the run's steps "
                f"(e.g. 1/3); got {f!r}."
            )
        if self.guide_step is not None and (isinstance(self.guide_step, bool) or self.guide_step < 1):
            raise ConfigError(f"config.sampling.guide_step must be a step >= 1 (or None), got {self.guide_step!r}.")
        object.__setattr__(self, "autoguided_samplers", tuple(self.autoguided_samplers))
        for name in self.autoguided_samplers:
            diffusion.check_choice("sampler in config.sampling.autoguided_samplers", name, samplers.SAMPLERS)

    def for_run(self, num_steps: int) -> tuple[SamplingConfig, str | None]:
        """These settings with the guide's step resolved for a run of ``num_steps`` steps, and a line for the log
        where the config's own could not be followed (None where it was).

        A guide is wanted when ``autoguidance != 0`` or ``guide_step`` is set. Its step is ``guide_step`` when that
        is below ``num_steps``, else ``clip(round(guide_fraction * num_steps), 1, num_steps - 1)`` (a ``guide_step``
        at or past the end, as an override that shortens the run leaves it, is replaced by the fraction's: the step
        just before the end would guide the model by itself). A run of one step has no earlier step: the guide is off
        (``autoguidance = 0``, ``guide_step = None``).
        """
        w, g = self.autoguidance, self.guide_step
        if w == 0 and g is None:
            return self, None
        if num_steps < 2:
            note = (
                f"A run of {num_steps} step has no earlier step to be autoguided by: autoguidance is off "
                f"(config.sampling.autoguidance = {w:g}, guide_step = {g}); train for 2 steps or more to have a guide."
            )
            return dataclasses.replace(self, autoguidance=0.0, guide_step=None), note
        share = min(max(math.floor(self.guide_fraction * num_steps + 0.5), 1), num_steps - 1)
        if g is None:
            return dataclasses.replace(self, guide_step=share), None
        if g < num_steps:
            return self, None
        note = (
            f"config.sampling.guide_step = {g} is not before the run's end (config.training.num_steps = {num_steps}): "
            f"the guide is the EMA at step {share} instead, config.sampling.guide_fraction = {self.guide_fraction:.4g} "
            "of the run. Set guide_step below num_steps to choose another."
        )
        return dataclasses.replace(self, guide_step=share), note

    @property
    def guide_steps(self) -> tuple[int, ...]:
        """The steps whose checkpoints the run saves (on the period or not) and keeps for good: the guide's."""
        return () if self.guide_step is None else (self.guide_step,)


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """``config.evaluation``: FID of EMA samples during training (off when ``fid_every`` is 0).

    ``sampler``/``steps`` (0: all T) draw ``fid_num_samples`` images in batches of ``fid_batch_size``; ``features``
    (``auto``: the digits classifier for digits, else the FID Inception, read from ``inception_weights``) judges them.
    """

    fid_every: int = 0
    fid_num_samples: int = 10_000
    fid_batch_size: int = 256
    sampler: str = "ddim"
    steps: int = 100
    features: str = "auto"
    inception_weights: str | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of a run, typed: one field per section of the config."""

    seed: int
    data: DataConfig
    model: dict[str, Any]  # UNetConfig's fields set by the config; the others come from the data (see network())
    diffusion: DiffusionConfig
    optim: OptimConfig
    training: TrainingConfig
    sampling: SamplingConfig
    evaluation: EvaluationConfig

    def network(self, in_channels: int, num_classes: int | None) -> UNetConfig:
        """The UNet: config.model, the data's size and channels, a learned variance's doubled output, the classes."""
        return UNetConfig(
            **self.model,
            image_size=self.data.image_size,
            in_channels=in_channels,
            learn_sigma=self.diffusion.variance in diffusion.LEARNED_VARIANCES,
            num_classes=num_classes if self.data.class_conditional else None,
        )


def run_config(config: ml_collections.ConfigDict) -> RunConfig:
    """The typed settings of ``config``, each section mapped onto its dataclass by name (a key without a field, or a
    wrong value, fails here with the dataclass's own message).

    Any ``training.num_steps >= 1`` gives a run: the guide's step is resolved for it (:meth:`SamplingConfig.for_run`,
    with a log line where the config's own cannot be followed), and a warmup as long as the run is logged. The
    periodic actions need nothing: each also runs after the last step (:func:`jaxdiff.actions.every`), so a period
    longer than the run means once, at its end.
    """
    c = config.to_dict()
    if c["sampling"].get("guidance", 0.0) != 0 and not (
        c["data"].get("class_conditional") and c["diffusion"].get("label_dropout", 0.0) > 0
    ):
        raise ConfigError(
            "config.sampling.guidance needs a class-conditional model that also learned the unconditional one: set "
            "config.data.class_conditional=True and config.diffusion.label_dropout > 0 (e.g. 0.1), or guidance=0."
        )
    accum, batch = c["optim"].get("grad_accum_steps", 1), c["training"]["batch_size"]
    if isinstance(accum, int) and accum >= 1 and batch % accum:
        raise ConfigError(
            f"config.training.batch_size = {batch} (the batch of one optimizer update) does not split into "
            f"config.optim.grad_accum_steps = {accum} micro-batches; make the batch a multiple of it."
        )
    training = TrainingConfig(**c["training"])
    optim = OptimConfig(**c["optim"], total_steps=training.num_steps)
    sampling, note = SamplingConfig(**c["sampling"]).for_run(training.num_steps)
    if note:
        log(note)
    n, warmup = training.num_steps, optim.warmup_steps
    if n <= warmup:
        log(
            f"config.optim.warmup_steps = {warmup} is not shorter than the run (config.training.num_steps = {n}): the "
            f"learning rate rises all run (to under {n}/{warmup} of config.optim.lr) and no decay starts. Fine for a "
            "smoke run; to learn, set warmup_steps below num_steps."
        )
    return RunConfig(
        seed=c["seed"],
        data=DataConfig(**c["data"]),
        model=dict(c["model"]),
        diffusion=DiffusionConfig(**c["diffusion"]),
        optim=optim,
        training=training,
        sampling=sampling,
        evaluation=EvaluationConfig(**c["evaluation"]),
    )


def _guide_step_of(stored: dict | None) -> int | None:
    """The guide's step that a stored config records (a run records the step it resolved); None if it has none."""
    had = (stored or {}).get("sampling", {}).get("guide_step")
    return had if isinstance(had, int) else None


def _stored_guide_step(workdir: pathlib.Path) -> int | None:
    """The guide's step recorded by the newest checkpoint's config in ``workdir`` (None: a fresh run, or none
    recorded), as process 0 reads it: every host resumes the same guide."""
    try:
        stored = checkpoints.restore_config(workdir)
    except FileNotFoundError:
        stored = None  # a fresh run
    except (OSError, ValueError, KeyError, AttributeError) as e:  # the restore below sets a damaged one aside
        log(f"Cannot read the newest checkpoint's config for its guide ({e}); resolving the guide afresh.")
        stored = None
    had = _guide_step_of(stored)
    had = parallel.from_process_0(-1 if had is None else had)
    return None if had < 0 else had


def _resumed_guide(run: RunConfig, had: int | None, asked: int | None) -> tuple[RunConfig, str | None]:
    """``run`` resuming a run whose checkpoint recorded the guide's step ``had`` (None: a fresh run, or no guide),
    and a line for the log where its guide changes; ``asked``: the config's own ``sampling.guide_step``.

    A resumed run keeps the guide it has: the recorded step stays, rather than the one that ``guide_fraction`` of a
    new ``num_steps`` gives, whose checkpoint was never kept. A ``guide_step`` asked for and followed as given is the
    user's choice, and kept; so is the new guide where the recorded step is at or past the new end.
    """
    now = run.sampling.guide_step
    if now in (None, asked) or had is None or had == now or had >= run.training.num_steps:
        return run, None
    note = (
        f"Resuming an autoguided run: its guide stays the EMA at step {had}, the checkpoint it kept (guide_fraction of "
        f"the new num_steps would be step {now}). Set config.sampling.guide_step to choose another."
    )
    return dataclasses.replace(run, sampling=dataclasses.replace(run.sampling, guide_step=had)), note


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> TrainState:
    """Train the model that ``config`` describes, logging, sampling, evaluating and checkpointing into ``workdir``.

    Resumes from the latest checkpoint in ``workdir`` if there is one. Returns the final state.
    """
    began = time.perf_counter()
    run = run_config(config)
    workdir = _writable(pathlib.Path(workdir))
    checkpoints.check_posthoc_resume(workdir, run.optim.posthoc_ema)  # the tracked EMAs cannot change midway
    if run.sampling.guide_step is not None:
        run, note = _resumed_guide(run, _stored_guide_step(workdir), config.sampling.guide_step)
        if note:
            log(note)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(run.training.batch_size, mesh)
    batches = make_batches(
        run.data,
        global_batch=run.training.batch_size,
        seed=run.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    log(f"Data: {run.data.dataset} {run.data.split}, {batches.data.describe()}.")
    classes = _classes(run.data, batches.data)
    network = run.network(batches.data.channels, classes)
    s = run.sampling
    spec = ModelSpec(
        network, run.diffusion, s.clip_x0, run.data, s.guidance, s.autoguidance, s.guide_step, s.autoguided_samplers
    )
    optimizer = make_optimizer(run.optim)
    fresh, target = _state_builder(run, network, optimizer, mesh)
    pipe = pipeline.from_spec(spec, None, f"{workdir} (training)")  # its parameters: the state's EMA, below
    train_step = make_train_step(
        make_apply(network), pipe.schedule, run.diffusion, optimizer, run.optim, run.seed, pipe.null_class
    )
    step_fn = shard_train_step(train_step, mesh)
    setup = time.perf_counter() - began

    def prepare():  # here, while the step compiles (or loads from the compilation cache) on a thread
        state, manager = _initial_state(workdir, run, network, mesh, fresh, target)
        config_json = json.loads(config.to_json_best_effort())
        config_json["sampling"]["guide_step"] = s.guide_step  # the step resolved: a resumed run keeps this guide
        if logs.is_main_process():
            (workdir / "config.json").write_text(json.dumps(config_json, indent=1))
        writer = logs.metric_writer(workdir)
        snapshots = _posthoc_snapshots(run, workdir, int(state.step))
        checkpointer = actions.Checkpointer(manager, config_json, spec, snapshots=snapshots)
        training_pipe = dataclasses.replace(pipe, params=state.ema_params)
        return state, manager, writer, _actions(run, training_pipe, workdir, checkpointer, writer, mesh, state, began)

    def compile_step():  # the step's model FLOPs per device, for the log line's utilisation
        lowered = step_fn.lower(target, _batch_spec(run, network, mesh))
        lowered.compile()
        step_flops = flops.flops_of(lowered)
        # XLA counts a loop's body once: the k micro-batches' scan holds the step's network work (the update, a
        # percent of it, is counted k times too).
        return None if step_flops is None else step_flops * run.optim.grad_accum_steps / mesh.devices.size

    (state, manager, writer, after_step), prepared, (flops_per_device, compiled) = _side_by_side(prepare, compile_step)
    after_step.report.flops_per_device = flops_per_device
    log(
        f"Start-up: {setup:.1f} s for the data and the network, then side by side: the state in {prepared:.1f} s, "
        f"the train step traced and compiled (or loaded from the cache) in {compiled:.1f} s."
    )
    first, last = int(state.step), run.training.num_steps
    on_devices = batches.iterate(first, transfer=lambda local: parallel.global_batch(local, mesh))
    try:
        for step, batch in zip(range(first, last), on_devices, strict=False):
            state, metrics = step_fn(state, batch)
            if after_step(step + 1, state, metrics):
                break
    finally:
        on_devices.close()  # the reading thread stops before the process may exit (it may be in a device transfer)
        after_step.close()  # a save in flight finishes even when the run stops with an error
        manager.close()
        writer.close()
    return state


def _posthoc_snapshots(run: RunConfig, workdir: pathlib.Path, first_step: int) -> actions.PosthocSnapshots | None:
    """The run's post-hoc EMA snapshots (``config.optim.posthoc_ema``), on the checkpoint period and at the end; None
    when it tracks none."""
    o, t = run.optim, run.training
    return actions.posthoc_snapshots(
        workdir, o.posthoc_ema, o.posthoc_gammas, t.checkpoint_every, t.num_steps, first_step
    )


def _state_builder(run: RunConfig, network: UNetConfig, optimizer, mesh):
    """``fresh(params) -> TrainState`` on the mesh, one jitted program for the EMA copy and the optimizer's zeros
    (eagerly, each leaf's shape compiled its own), and the state's shapes on the mesh (the restore's target)."""
    T = run.diffusion.num_timesteps
    gammas = run.optim.posthoc_gammas
    fresh = jax.jit(lambda p: init_train_state(p, optimizer, T, gammas), out_shardings=parallel.replicated(mesh))
    return fresh, checkpoints.abstract(jax.eval_shape(fresh, abstract_params(network)), parallel.replicated(mesh))


def _side_by_side(here, on_thread):
    """Run ``on_thread()`` on a thread while ``here()`` runs in this one: ``here``'s result and its wall time in
    seconds, then ``on_thread``'s result and wall time as a pair. An error of either is raised once both have
    ended."""

    def timed(fn):
        start = time.perf_counter()
        return fn(), time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxdiff-compile") as pool:
        other = pool.submit(timed, on_thread)
        result, seconds = timed(here)
    return result, seconds, other.result()


def _batch_spec(run: RunConfig, network: UNetConfig, mesh) -> dict:
    """The shapes of the global batch that the train step gets: ``Batches.at``'s arrays as ``parallel.global_batch``
    places them on the mesh."""
    sharding = parallel.batch_sharding(mesh)
    b, size, channels = run.training.batch_size, network.image_size, network.in_channels
    return {
        "image": jax.ShapeDtypeStruct((b, size, size, channels), np.float32, sharding=sharding),
        "label": jax.ShapeDtypeStruct((b,), np.int32, sharding=sharding),
    }


def _classes(data: DataConfig, split: InMemory | Streamed) -> int | None:
    """A class-conditional run's number of classes: the dataset's ClassLabel metadata (the null class is one more);
    the largest label + 1 only for a label feature that declares no classes (read in memory). None for an
    unconditional run."""
    if not data.class_conditional:
        return None
    if not split.has_labels:
        raise ConfigError(
            f"config.data.class_conditional=True but {data.dataset!r} has no {data.label_key!r} feature: set "
            "config.data.label_key to its label feature, or train unconditionally."
        )
    declared = num_classes(data)
    labels = split.labels if isinstance(split, InMemory) else None
    if declared is None:
        if labels is None:
            raise ConfigError(
                f"{data.dataset}'s {data.label_key!r} declares no classes, and a streamed split cannot be scanned "
                "for its largest label: set config.data.reader='memory'."
            )
        declared = int(labels.max()) + 1
        log(f"{data.dataset}'s {data.label_key!r} declares no classes; taking {declared} (the largest label + 1).")
    if labels is not None and (labels.min() < 0 or labels.max() >= declared):
        raise ConfigError(f"{data.dataset}'s labels must lie in [0, {declared}), found {labels.min()}..{labels.max()}.")
    return declared


def _actions(run: RunConfig, pipe, workdir, checkpointer, writer, mesh, state, began: float) -> actions.Actions:
    """The run's periodic actions, in the order they run after a step."""
    t, last, seed = run.training, run.training.num_steps, run.seed
    dtype = run.model.get("dtype", "float32")
    report = actions.Report(writer, checkpointer.guard, last, t.batch_size, began, dtype=dtype)
    held_out = _held_out(run)
    evaluate = None if held_out is None else actions.evaluate_bound(pipe, writer, held_out, _eval_key(run), mesh)
    guide_step = run.sampling.guide_step
    autoguide = None
    if run.sampling.autoguidance != 0:
        autoguide = actions.Autoguide(run.sampling.autoguidance, guide_step, checkpointer.manager, pipeline.params_like)
    guided = lambda sampler: autoguide if sampler in run.sampling.autoguided_samplers else None
    fid = actions.make_fid(run.evaluation, run.data, pipe, mesh, guided(run.evaluation.sampler))
    judge = None if fid is None else actions.fid_action(fid, writer, seed)
    grid = actions.sample_grid(pipe, workdir, t.num_samples, seed, mesh, guided("ddpm"))
    named = {
        "report": actions.every(t.log_every, last, report),
        "bits/dim": None if evaluate is None else actions.every(t.eval_every, last, evaluate),
        "fid": None if judge is None else actions.every(run.evaluation.fid_every, last, judge),
        "samples": actions.every(t.sample_every, last, grid),
        "checkpoint": actions.every(t.checkpoint_every, last, checkpointer, run.sampling.guide_steps),
    }
    return actions.Actions(named, report, checkpointer, int(state.step), last)


def _eval_key(run: RunConfig) -> jax.Array:
    """The key of the held-out bound: the same at every evaluation (image i uses ``fold_in(key, i)``), and the key
    of ``sample.py --eval=bpd --seed=<seed>``."""
    return jax.random.key(run.seed)


def _held_out(run: RunConfig):
    """The first ``eval_batch_size`` images (uint8) of the eval split and, for a conditional run, their labels; None
    when the dataset has no such split."""
    data = dataclasses.replace(run.data, split=run.data.eval_split, random_flip=False)
    try:
        split = open_split(data)
    except (ValueError, FileNotFoundError) as e:
        log(f"No held-out batch for bits/dim ({e}); skipping that evaluation.")
        return None
    images, labels = split.read(np.arange(min(run.training.eval_batch_size, len(split))))
    return images, (labels if run.data.class_conditional else None)


def _writable(workdir: pathlib.Path) -> pathlib.Path:
    """``workdir``, made if need be, once a file of this process's own was written and removed there (on a shared
    file system one host's removal must not fail another's check)."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test.{jax.process_index()}.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"The workdir {workdir} cannot be written ({e.strerror}); choose a writable --workdir."
        ) from e
    return workdir


def _initial_state(workdir: pathlib.Path, run: RunConfig, network: UNetConfig, mesh, fresh, target):
    """The state to start from (the newest readable checkpoint, else a fresh one) on the mesh, and the manager."""
    manager = checkpoints.manager(workdir, keep=run.training.keep_checkpoints, preserve=run.sampling.guide_steps)
    state, skipped = checkpoints.restore_latest(manager, target)
    if state is None:
        return fresh(parallel.replicate(init_params(network, run_keys(run.seed)[0]), mesh)), manager
    if skipped:
        # Set the unreadable newer checkpoints aside (kept), so that this run can save at those steps again.
        steps = [s for s, _ in skipped]
        if logs.is_main_process():
            where = checkpoints.set_aside(workdir, steps)
            log(f"Moved the unreadable checkpoint(s) at step(s) {steps} to {where}.")
        sync_global_devices("jaxdiff: unreadable checkpoints set aside")
        manager.reload()
    log(f"Resuming from the checkpoint at step {int(state.step)} in {manager.directory}.")
    return state, manager
