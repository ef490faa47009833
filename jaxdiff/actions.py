"""The periodic work of a training run, as named actions called after every step.

Each action is a :class:`Periodic` callback (as clu's ``PeriodicCallback`` in flax's examples, without clu's import
of TensorFlow): it fires every ``n`` steps and after the last one, never when ``n <= 0``. What they do is in one
function each, taking the step, the state and the step's metrics:

* :class:`Report` -- the loss and the rest of the metrics, steps/s and ETA, to stdout and TensorBoard;
* :func:`evaluate_bound` -- bits/dim of the EMA model on a fixed held-out batch with fixed keys
  (:func:`jaxdiff.evaluation.bound_over_split`, the figure ``sample.py --eval=bpd`` gives on the same images);
* :func:`make_fid` -- FID (and the score) of fresh EMA samples: the digits against their held-out split, with the
  real-data floor and the near-copies (:mod:`jaxdiff.metrics.heldout`), other datasets against their train split;
* :func:`sample_grid` -- a PNG grid of EMA samples with a fixed seed (the classes in turn for a conditional model);
* :class:`Checkpointer` -- checkpoints, with the non-finite check before them, and the post-hoc EMA snapshots
  (:class:`PosthocSnapshots`) on the checkpoint period and at the end;
* :class:`Actions` -- all of them after each step, and SIGTERM (preemption): save at once and stop.

A non-finite loss is looked at only before a report or a checkpoint (no per-step host sync): the step that made it
left the state unchanged (see :func:`jaxdiff.training.make_train_step`), so the state in hand is the last good one.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxdiff import checkpoints, evaluation, flops, parallel, pipeline
from jaxdiff.data.config import DataConfig
from jaxdiff.errors import JaxdiffError
from jaxdiff.images import save_grid
from jaxdiff.logs import Progress, is_main_process, log
from jaxdiff.metrics import features
from jaxdiff.metrics.fid import sample_quality
from jaxdiff.metrics.heldout import heldout_judge, uses_heldout_judge
from jaxdiff.metrics.reference import class_reference_stats, reference_stats
from jaxdiff.pipeline import Pipeline
from jaxdiff.spec import ModelSpec
from jaxdiff.training import TrainState

__all__ = [
    "FID_SCALARS",
    "Actions",
    "Autoguide",
    "Checkpointer",
    "FiniteGuard",
    "NonFiniteLossError",
    "Periodic",
    "PosthocSnapshots",
    "Report",
    "evaluate_bound",
    "every",
    "fid_action",
    "make_fid",
    "posthoc_snapshots",
    "sample_grid",
]


class NonFiniteLossError(JaxdiffError, RuntimeError):
    """The loss or the gradients became NaN/inf: the run stops; the state kept is the last finite one."""


@dataclasses.dataclass
class Periodic:
    """``fn(step=step, **kwargs)`` after every ``n``-th step (none when ``n <= 0``), after ``last_step`` and after each
    step in ``also``."""

    n: int
    last_step: int
    fn: Callable
    also: tuple[int, ...] = ()

    def __call__(self, step: int, **kwargs) -> None:
        if (self.n > 0 and step % self.n == 0) or step == self.last_step or step in self.also:
            self.fn(step=step, **kwargs)


def every(n: int, last_step: int, fn: Callable, also: tuple[int, ...] = ()) -> Periodic | None:
    """``fn(step=, state=, metrics=)`` every ``n`` steps, after ``last_step`` and after the steps in ``also``; None
    (never) when n <= 0 and ``also`` is empty."""
    if n <= 0 and not also:
        return None
    return Periodic(n, last_step, fn, tuple(also))


class Autoguide:
    """Autoguidance of the run's own samples (``config.sampling.autoguidance``): after ``step``, the EMA parameters of
    the run's checkpoint at ``step`` guide those of the step sampled, with scale ``scale``
    (:func:`jaxdiff.pipeline.autoguided`). The guide is read from that checkpoint once, when first needed."""

    def __init__(self, scale: float, step: int, manager, params_like: Callable[[dict], object]):
        self.scale, self.step, self.manager, self.params_like = scale, step, manager, params_like
        self._params = None

    def sampling(self, pipe: Pipeline, make_run: Callable[[Pipeline], Callable]) -> Callable:
        """``choose(step, ema_params) -> (pipeline, run, note)``: what to sample the EMA parameters of ``step`` with,
        ``make_run(pipeline)``'s sampler for it, and a note for the log ("" unguided)."""
        plain, plain_run = pipe, make_run(pipe)
        guided = pipeline.autoguided(pipe, None, self.scale, f"its EMA at step {self.step}")
        guided_run = make_run(guided)

        def choose(step: int, ema_params):
            guide = self.params() if step > self.step else None
            if guide is None:
                return plain.with_params(ema_params), plain_run, ""
            note = f", autoguided (w = {self.scale:g}) by the EMA at step {self.step}"
            return guided.with_params({"main": ema_params, "guide": guide}), guided_run, note

        return choose

    def params(self):
        """The guide's EMA parameters; None (with a warning in the log) when its checkpoint cannot be read."""
        if self._params is None:
            checkpoints.wait(self.manager)  # the guide's own save may still be in flight
            try:
                read = checkpoints.load_for_sampling(self.manager.directory.parent, self.step, self.params_like)
            except (OSError, RuntimeError, ValueError) as e:
                log(f"Cannot read the guide (the checkpoint at step {self.step}: {e}); sampling unguided.")
                return None
            self._params = read.ema_params
        return self._params


def _unguided(pipe: Pipeline, make_run: Callable[[Pipeline], Callable]) -> Callable:
    """:meth:`Autoguide.sampling` for a run without autoguidance."""
    run = make_run(pipe)
    return lambda step, ema_params: (pipe.with_params(ema_params), run, "")


class FiniteGuard:
    """Collects each step's ``finite`` flag (a device scalar) and reads them all in one go when asked."""

    def __init__(self):
        self.unchecked: list[tuple[int, jax.Array]] = []

    def record(self, step: int, finite: jax.Array) -> None:
        self.unchecked.append((step, finite))

    def check(self, state: TrainState) -> None:
        """Raise :class:`NonFiniteLossError` at the first recorded step whose loss or gradient was not finite."""
        flags = jax.device_get([flag for _, flag in self.unchecked])
        for (step, _), finite in zip(self.unchecked, flags, strict=True):
            if finite < 1:
                raise NonFiniteLossError(
                    f"Non-finite loss or gradient at step {step}. The run stops; the state in memory is the last "
                    f"finite one (step {int(state.step)}) and no checkpoint of a later state was written. Lower the "
                    "learning rate, check the data, or resume from the last checkpoint."
                )
        self.unchecked.clear()


class PosthocSnapshots:
    """The post-hoc EMA snapshots of a run (:mod:`jaxdiff.ema`): the tracked profiles of the state, saved under
    ``workdir/ema_snapshots`` after every ``every``-th step and after ``last_step`` (the checkpoint period and the
    run's end, whatever else the checkpointer saves), every one kept.

    Made at the start of a run (or of a resumed one, from ``first_step``): snapshots later than ``first_step``, left
    by a run that went further than the checkpoint it resumes from, are moved aside first
    (:func:`jaxdiff.checkpoints.supersede_snapshots`), so the snapshots always describe one trajectory. A run
    resumed from a checkpoint on the period ends with the snapshots of an uninterrupted one.
    """

    def __init__(self, workdir, sigma_rels, gammas, every: int, last_step: int, first_step: int):
        self.sigma_rels, self.gammas = tuple(sigma_rels), tuple(gammas)
        self.every, self.last_step = every, last_step
        moved = checkpoints.supersede_snapshots(workdir, first_step)
        if moved:
            log(
                f"Moved the EMA snapshots after step {first_step} (steps {moved}), left by a run beyond the checkpoint "
                f"this one resumes from, to {pathlib.Path(workdir) / checkpoints.SUPERSEDED_SNAPSHOTS}."
            )
        self.manager = checkpoints.snapshot_manager(workdir)

    def due(self, step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or step == self.last_step

    def __call__(self, step: int, state: TrainState) -> None:
        """Save the state's profiles at ``step`` if it is due (the caller has checked that the state is finite)."""
        if self.due(step):
            checkpoints.save_snapshot(self.manager, step, state.posthoc_emas, self.sigma_rels, self.gammas)

    def close(self) -> None:
        """Finish a save in flight and close the manager."""
        checkpoints.wait(self.manager)
        self.manager.close()


def posthoc_snapshots(
    workdir, sigma_rels, gammas, every: int, last_step: int, first_step: int
) -> PosthocSnapshots | None:
    """:class:`PosthocSnapshots` of a run that tracks post-hoc EMAs (``sigma_rels``, ``config.optim.posthoc_ema``);
    None for one that tracks none, or that saves no checkpoints (``every <= 0``: none at the end either)."""
    if not sigma_rels or every <= 0:
        return None
    return PosthocSnapshots(workdir, sigma_rels, gammas, every, last_step, first_step)


class Checkpointer:
    """Saves the state (never a non-finite one) with the run's config and spec beside it, and the post-hoc EMA
    snapshots where the run tracks them (``snapshots``)."""

    def __init__(
        self,
        manager,
        config: dict,
        spec: ModelSpec,
        guard: FiniteGuard | None = None,
        snapshots: PosthocSnapshots | None = None,
    ):
        self.manager, self.config, self.spec = manager, config, spec.to_json()
        self.guard = guard or FiniteGuard()
        self.snapshots = snapshots

    def __call__(self, step: int, state: TrainState, **_) -> None:
        self.guard.check(state)
        if not parallel.all_finite(state):
            raise NonFiniteLossError(
                f"The state after step {step} holds non-finite parameters (the updates overflowed); it is not saved, "
                f"and the newest checkpoint in {self.manager.directory} stays the last good one. Lower the learning "
                "rate."
            )
        checkpoints.save(self.manager, step, state, self.config, self.spec)
        if self.snapshots is not None:
            self.snapshots(step, state)

    def wait(self) -> None:
        """Block until the checkpoints' and the snapshots' saves are written."""
        checkpoints.wait(self.manager)
        if self.snapshots is not None:
            checkpoints.wait(self.snapshots.manager)

    def preempted(self, step: int, state: TrainState) -> None:
        """Save at ``step`` now and wait for it: the process is about to be stopped."""
        self(step, state)
        self.wait()
        log(
            f"Preempted (SIGTERM) after step {step}: saved the checkpoint at step {step} in "
            f"{self.manager.directory}. Run the same command again to resume."
        )


class Report:
    """The metrics of the step, steps/s since the end of the first step (which holds the compile), the devices' use
    and the ETA: a stdout line and TensorBoard scalars."""

    def __init__(
        self,
        writer,
        guard: FiniteGuard,
        last_step: int,
        batch_size: int,
        began: float | None = None,
        *,
        dtype: str = "float32",
        flops_per_device: float | None = None,
    ):
        """``began``: when the run began (``time.perf_counter()``), for the time to its first step.
        ``flops_per_device``: one step's model FLOPs on one device (XLA's count of the lowered step over the device
        count; set once the step has compiled), for TFLOP/s per device and, on a device of known peak for the compute
        ``dtype``, the model FLOP utilisation (:func:`jaxdiff.flops.utilisation`)."""
        self.writer, self.guard, self.last_step, self.batch_size = writer, guard, last_step, batch_size
        self.began, self.dtype, self.flops_per_device = began, dtype, flops_per_device
        self.since: tuple[int, float] | None = None

    def start(self, step: int, metrics: dict) -> None:
        """Start the clock once the first step (and its compile) is done."""
        jax.block_until_ready(metrics)
        self.since = (step, time.perf_counter())
        if self.began is not None:
            log(
                f"First step (step {step}) done {self.since[1] - self.began:.1f} s after the run began (data, "
                "parameters or checkpoint, compile or compilation cache)."
            )

    def __call__(self, step: int, state: TrainState, metrics: dict, **_) -> None:
        self.guard.check(state)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        start_step, start_time = self.since or (step, time.perf_counter())
        rate = (step - start_step) / (time.perf_counter() - start_time) if step > start_step else math.nan
        images = rate * self.batch_size
        scalars = {**metrics, "steps_per_sec": rate, "images_per_sec": images}
        use = flops.utilisation(self.flops_per_device, rate, jax.devices()[0].device_kind, self.dtype)
        if use:
            scalars["tflops_per_device"] = self.flops_per_device * rate / 1e12
        self.writer.write_scalars(step, scalars)
        eta = (self.last_step - step) / rate if rate > 0 else math.nan
        log(
            f"step {step}/{self.last_step}  loss {metrics['loss']:.4f}  grad_norm {metrics['grad_norm']:.3f}  "
            f"{rate:.2f} steps/s  {images:.0f} images/s  {use + '  ' if use else ''}ETA {eta / 60:.1f} min"
        )


def evaluate_bound(
    pipe: Pipeline, writer, held_out: tuple[np.ndarray, np.ndarray | None], key: jax.Array, mesh
) -> Callable:
    """The action: bits/dim of the EMA parameters on ``held_out`` (uint8 images, labels), image i with
    ``fold_in(key, i)``, compiled once for the run."""
    images, labels = held_out
    bound_fn = pipeline.make_bound_fn(pipe, mesh=mesh)
    batch = parallel.round_up_batch(len(images), mesh)

    def action(step: int, state: TrainState, **_) -> None:
        result = evaluation.bound_over_split(bound_fn, state.ema_params, images, key, batch, labels, mesh=mesh)
        writer.write_scalars(step, {f"eval/{k}_bpd": getattr(result, k) for k in evaluation.TERMS})
        log(
            f"step {step}  eval bits/dim {result.total:.3f} (prior {result.prior:.2e}, denoising "
            f"{result.denoising:.3f}, reconstruction {result.reconstruction:.3f})"
        )

    return action


def sample_grid(
    pipe: Pipeline, workdir: pathlib.Path, num_samples: int, seed: int, mesh, autoguide: Autoguide | None = None
) -> Callable:
    """The action: ``num_samples`` DDPM samples of the EMA parameters (seed ``seed``, one batch; autoguided after the
    guide's step) as ``workdir/samples_<step>.png``; what ``sample.py --workdir --seed=<seed> --num_samples=<n>``
    draws."""
    make_run = lambda p: pipeline.make_sampler(p, "ddpm", mesh=mesh)
    choose = _unguided(pipe, make_run) if autoguide is None else autoguide.sampling(pipe, make_run)
    batch = parallel.round_up_batch(num_samples, mesh)

    def action(step: int, state: TrainState, **_) -> None:
        sampled, run, note = choose(step, state.ema_params)
        images = pipeline.generate(sampled, run, num_samples, batch, seed=seed)
        if is_main_process():
            log(f"step {step}  wrote {save_grid(images, workdir / f'samples_{step:07d}.png')}{note}")

    return action


def make_fid(
    settings, data: DataConfig, pipe: Pipeline, mesh, autoguide: Autoguide | None = None
) -> Callable[[object, int, int], dict] | None:
    """``(params, seed, step=0) -> {"fid", "score", "num_samples", "features", "note", ...}``: fresh samples of
    ``pipe`` at ``params`` (autoguided after the guide's step; ``note`` says so), judged; None when
    ``settings.fid_every <= 0``.

    The digits (judged by the digits classifier) go to :class:`~jaxdiff.metrics.heldout.HeldoutJudge`: the distance
    to the test split against the real-data floor at the same N, the near-copies of training digits, and the
    train-referenced distance (the result also holds ``judge``, the line to print). Other datasets are judged
    against the cached statistics of their train split, the field's convention.

    ``settings``: the run's evaluation settings (``fid_every``, ``fid_num_samples``, ``fid_batch_size``, ``sampler``,
    ``steps`` (0: all T), ``features``, ``inception_weights``).
    """
    if settings.fid_every <= 0:
        return None
    train = dataclasses.replace(data, split="train", random_flip=False)
    extractor = features.make_extractor(
        settings.features, train, settings.inception_weights, batch_size=settings.fid_batch_size, mesh=mesh
    )
    make_run = lambda p: pipeline.make_sampler(p, settings.sampler, settings.steps or None, mesh=mesh)
    choose = _unguided(pipe, make_run) if autoguide is None else autoguide.sampling(pipe, make_run)
    batch = parallel.round_up_batch(min(settings.fid_batch_size, settings.fid_num_samples), mesh)
    labels = pipeline.labels_for(settings.fid_num_samples, pipe.num_classes, None)  # the classes in turn
    if uses_heldout_judge(data, extractor):
        judge = heldout_judge(extractor, train)
        quality_of = lambda images: {**judge(images, labels), "judge": judge.summary}
    else:
        reference = reference_stats(extractor, train, log=log)
        per_class = None
        if labels is not None and extractor.classifies:
            per_class = class_reference_stats(extractor, train, log=log)
        quality_of = lambda images: sample_quality(
            extractor, images, reference, labels=labels, class_reference=per_class
        )

    def fid(params, seed: int, step: int = 0) -> dict:
        sampled, run, note = choose(step, params)
        images = pipeline.generate(sampled, run, settings.fid_num_samples, batch, seed=seed)
        return {**quality_of(images), "features": extractor.name, "note": note}

    return fid


#: What the FID action writes to TensorBoard (``eval/<name>``), where the result has it.
FID_SCALARS = ("fid", "fid_ratio", "fid_train", "copy_share", "copy_median_ratio", "score", "cond_accuracy")


def fid_action(fid: Callable[[object, int, int], dict], writer, seed: int) -> Callable:
    """The action: :func:`make_fid`'s figure for the EMA parameters, samples drawn with seed ``seed + step``."""

    def action(step: int, state: TrainState, **_) -> None:
        quality = fid(state.ema_params, seed + step, step)
        writer.write_scalars(step, {f"eval/{k}": quality[k] for k in FID_SCALARS if k in quality})
        what = f"({quality['num_samples']} EMA samples, {quality['features']} features{quality['note']})"
        if "judge" in quality:
            log(f"step {step}  {quality['judge'](quality)} {what}")
            return
        accuracy = f", conditional accuracy {quality['cond_accuracy']:.3f}" if "cond_accuracy" in quality else ""
        log(f"step {step}  FID {quality['fid']:.3f}, score {quality.get('score', math.nan):.3f}{accuracy} {what}")

    return action


class Actions:
    """Everything a run does after each step: the named periodic actions in order, and preemption.

    Call it after every step with the step just finished; it returns True when the run must stop (SIGTERM: the
    checkpoint of that step is saved first).
    """

    def __init__(
        self,
        named: dict[str, Periodic | None],
        report: Report,
        checkpointer: Checkpointer,
        first_step: int,
        last_step: int,
    ):
        self.named = {name: action for name, action in named.items() if action is not None}
        self.report, self.checkpointer = report, checkpointer
        self.first_step = first_step
        self.preemption = checkpoints.PreemptionWatch()
        self.progress = Progress(last_step, "step", initial=first_step, lines=False)

    def __call__(self, step: int, state: TrainState, metrics: dict) -> bool:
        self.checkpointer.guard.record(step, metrics["finite"])
        if step == self.first_step + 1:
            self.report.start(step, metrics)
        if self.preemption.reached(step):
            self.checkpointer.preempted(step, state)
            return True
        self.progress(1)
        for action in self.named.values():
            action(step, state=state, metrics=metrics)
        return False

    def close(self) -> None:
        """Put the SIGTERM handler back, finish a save in flight (and close the snapshots' manager), close the bar (also
        when the run failed)."""
        self.preemption.close()
        checkpoints.wait(self.checkpointer.manager)
        if self.checkpointer.snapshots is not None:
            self.checkpointer.snapshots.close()
        self.progress.close()
