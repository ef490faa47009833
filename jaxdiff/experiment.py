"""A run from an ml_collections config: typed settings at the boundary, then ``train_and_evaluate(config, workdir)``.

This is the only module that reads a ConfigDict; below it every function takes typed arguments.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental.multihost_utils import sync_global_devices

from jaxdiff import checkpoints, diffusion, evaluation, features, generate, samplers
from jaxdiff.data import DataConfig, load_split, make_batches
from jaxdiff.images import save_grid
from jaxdiff.models.unet import UNet, UNetConfig
from jaxdiff.schedules import Schedule, make_schedule
from jaxdiff.training import (
    Objective,
    OptimConfig,
    TrainState,
    all_finite,
    check_batch_size,
    global_batch,
    init_train_state,
    make_mesh,
    make_optimizer,
    make_train_step,
    replicate,
    replicated,
    shard_train_step,
)


def data_config(config: ml_collections.ConfigDict, split: str | None = None) -> DataConfig:
    d = config.data
    return DataConfig(
        dataset=d.dataset,
        split=split or d.split,
        image_size=d.image_size,
        random_flip=d.random_flip,
        data_dir=d.data_dir,
        download=d.download,
    )


def unet_config(config: ml_collections.ConfigDict, in_channels: int, num_classes: int | None) -> UNetConfig:
    m = config.model
    return UNetConfig(
        image_size=config.data.image_size,
        in_channels=in_channels,
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        resample_with_conv=m.resample_with_conv,
        learn_sigma=config.diffusion.variance in diffusion.LEARNED_VARIANCES,
        num_classes=num_classes if config.data.class_conditional else None,
        num_groups=m.num_groups,
        head_dim=m.head_dim,
        dtype=m.dtype,
        remat=m.remat,
    )


def schedule_from(config: ml_collections.ConfigDict) -> Schedule:
    d = config.diffusion  # beta_start/beta_end are ignored by the cosine schedule
    return make_schedule(d.beta_schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end)


def objective(config: ml_collections.ConfigDict) -> Objective:
    d = config.diffusion
    return Objective(
        loss_type=d.loss_type,
        prediction=d.prediction,
        variance=d.variance,
        weighting=d.weighting,
        snr_gamma=d.snr_gamma,
        vb_weight=d.vb_weight,
        t_sampling=d.t_sampling,
        label_dropout=d.label_dropout,
    )


def optim_config(config: ml_collections.ConfigDict) -> OptimConfig:
    o = config.optim
    return OptimConfig(
        lr=o.lr,
        warmup_steps=o.warmup_steps,
        grad_clip=o.grad_clip,
        decay=o.decay,
        total_steps=config.training.num_steps,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        grad_accum_steps=o.grad_accum_steps,
        ema_decay=o.ema_decay,
        ema_warmup=o.ema_warmup,
    )


def itstime(step: int, every: int, last_step: int) -> bool:
    """Whether to act after ``step`` finished steps: every ``every`` steps and at the last one; never if every <= 0."""
    return every > 0 and (step % every == 0 or step == last_step)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN/inf: the run stops; the state kept is the last finite one."""


def _raise_if_non_finite(unchecked: list, state: TrainState) -> None:
    """Stop the run at the first step whose loss or gradient was not finite (such a step left the state as it was)."""
    flags = jax.device_get([flag for _, flag in unchecked])
    for (step, _), finite in zip(unchecked, flags, strict=True):
        if finite < 1:
            raise NonFiniteLossError(
                f"Non-finite loss or gradient at step {step}. The run stops; the state in memory is the last finite "
                f"one (step {int(state.step)}) and no checkpoint of a later state was written. Lower the learning "
                "rate, check the data, or resume from the last checkpoint."
            )
    unchecked.clear()


def _check_workdir(workdir: pathlib.Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"The workdir {workdir} cannot be written ({e.strerror}); choose a writable --workdir.") from e


def sample_fn(model: UNet, schedule: Schedule, config: ml_collections.ConfigDict):
    """A jitted ``(params, key, labels, shape) -> images`` drawing from the model by ancestral sampling."""
    d = config.diffusion

    def sample(params, key, labels, shape):
        model_fn = lambda x, t: model.apply(params, x, t, labels)
        return samplers.ddpm_sample(
            schedule,
            model_fn,
            shape,
            key,
            prediction=d.prediction,
            variance=d.variance,
            clip_x0=config.sampling.clip_x0,
        )

    return jax.jit(sample, static_argnums=3)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> TrainState:
    """Train the model that ``config`` describes, logging, sampling, evaluating and checkpointing into ``workdir``.

    Resumes from the latest checkpoint in ``workdir`` if there is one. Returns the final state.
    """
    workdir = pathlib.Path(workdir)
    _check_workdir(workdir)
    mesh = make_mesh()
    tcfg = config.training
    check_batch_size(tcfg.batch_size, mesh)
    objective_ = objective(config)
    opt = optim_config(config)
    schedule = schedule_from(config)
    batches = make_batches(
        data_config(config),
        global_batch=tcfg.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    eval_images = _eval_images(config)
    channels = batches.images.shape[-1]
    num_classes = int(batches.labels.max()) + 1 if batches.labels is not None else None
    model_cfg = unet_config(config, channels, num_classes)
    model = UNet(model_cfg)
    optimizer = make_optimizer(opt)
    is_main = jax.process_index() == 0

    state, manager = _initial_state(workdir, config, model_cfg, optimizer, schedule.num_timesteps, mesh, is_main)
    step_fn = shard_train_step(make_train_step(model, schedule, objective_, optimizer, opt, config.seed), mesh)
    draw = sample_fn(model, schedule, config)
    evaluate_bound = bound_fn(model, schedule, config)
    fid = fid_fn(config, model_cfg, mesh, lambda line: _log(is_main, line))
    writer = _summary_writer(workdir) if is_main else None
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

    first = int(state.step)
    last = tcfg.num_steps
    progress = _progress(first, last, is_main)
    start_time, start_step = time.perf_counter(), first
    unchecked = []  # (step, finite flag) not yet read: read in one go at log/checkpoint time, not synced every step
    preemption = checkpoints.PreemptionWatch()
    try:
        for step, local in zip(range(first, last), batches.iterate(first), strict=False):
            state, metrics = step_fn(state, global_batch(local, mesh))
            done = step + 1
            if done == first + 1:  # time from the end of the first step, which includes the compile
                jax.block_until_ready(metrics)
                start_time, start_step = time.perf_counter(), done
            unchecked.append((done, metrics["finite"]))
            preempted = preemption.reached(done)
            save_now = preempted or itstime(done, tcfg.checkpoint_every, last)
            if itstime(done, tcfg.log_every, last) or save_now:
                _raise_if_non_finite(unchecked, state)
            if preempted:
                _save(manager, done, state, config, model_cfg)
                checkpoints.wait(manager)
                _log(
                    is_main,
                    f"Preempted (SIGTERM) after step {done}: saved the checkpoint at step {done} in "
                    f"{manager.directory}. Run the same command again to resume.",
                    progress,
                )
                break
            if itstime(done, tcfg.log_every, last):
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - start_time
                rate = (done - start_step) / elapsed if done > start_step else math.nan
                _write(writer, done, {**metrics, "steps_per_sec": rate, "images_per_sec": rate * tcfg.batch_size})
                eta = (last - done) / rate if rate > 0 else math.nan
                _log(
                    is_main,
                    f"step {done}/{last}  loss {metrics['loss']:.4f}  grad_norm {metrics['grad_norm']:.3f}  "
                    f"{rate:.2f} steps/s  {rate * tcfg.batch_size:.0f} images/s  ETA {eta / 60:.1f} min",
                    progress,
                )
            if progress is not None:
                progress.update(1)
            if itstime(done, tcfg.eval_every, last):
                eval_key = jax.random.fold_in(jax.random.key(config.seed + 1), done)
                bpd = _evaluate_bpd(evaluate_bound, state.ema_params, eval_images, eval_key)
                _write(writer, done, {f"eval/{k}_bpd": v for k, v in bpd.items()})
                _log(
                    is_main,
                    f"step {done}  eval bits/dim {bpd['total']:.3f} (prior {bpd['prior']:.2e}, denoising "
                    f"{bpd['denoising']:.3f}, reconstruction {bpd['reconstruction']:.3f})",
                    progress,
                )
            if fid is not None and itstime(done, config.evaluation.fid_every, last):
                quality = fid(state.ema_params, done)
                _write(writer, done, {f"eval/{k}": v for k, v in quality.items() if k in ("fid", "score")})
                _log(
                    is_main,
                    f"step {done}  FID {quality['fid']:.3f}, score {quality.get('score', math.nan):.3f} "
                    f"({quality['num_samples']} EMA samples, {quality['features']} features)",
                    progress,
                )
            if itstime(done, tcfg.sample_every, last):
                shape = (tcfg.num_samples, config.data.image_size, config.data.image_size, channels)
                images = draw(state.ema_params, jax.random.fold_in(jax.random.key(config.seed), done), None, shape)
                if is_main:
                    path = save_grid(np.asarray(samplers.to_uint8(images)), workdir / f"samples_{done:07d}.png")
                    _log(is_main, f"step {done}  wrote {path}", progress)
            if save_now:
                _save(manager, done, state, config, model_cfg)
    finally:
        preemption.close()
        checkpoints.wait(manager)  # a save in flight finishes even when the run stops with an error
        manager.close()
        if progress is not None:
            progress.close()
    return state


def _save(manager, step, state, config, model_cfg):
    """Checkpoint ``state`` as step ``step``, unless a value in it is not finite: then stop, keeping the last one."""
    if not bool(all_finite(state)):
        raise NonFiniteLossError(
            f"The state after step {step} holds non-finite parameters (the updates overflowed); it is not saved, "
            f"and the newest checkpoint in {manager.directory} stays the last good one. Lower the learning rate."
        )
    checkpoints.save(manager, step, state, config, model_cfg)


def _initial_state(workdir, config, model_cfg, optimizer, num_timesteps, mesh, is_main):
    """The state to start from (the newest readable checkpoint, else a fresh one) on the mesh, and the manager."""
    manager = checkpoints.manager(workdir, keep=config.training.keep_checkpoints)
    fresh = lambda: init_train_state(model_cfg, optimizer, num_timesteps, config.seed)
    target = checkpoints.abstract(jax.eval_shape(fresh), replicated(mesh))
    state, skipped = checkpoints.restore_latest(manager, target)
    if state is None:
        return replicate(fresh(), mesh), manager
    if skipped:
        # Set the unreadable newer checkpoints aside (kept), so that this run can save at those steps again.
        steps = [s for s, _ in skipped]
        if is_main:
            where = checkpoints.set_aside(workdir, steps)
            _log(is_main, f"Moved the unreadable checkpoint(s) at step(s) {steps} to {where}.")
        sync_global_devices("jaxdiff: unreadable checkpoints set aside")
        manager.reload()
    _log(is_main, f"Resuming from the checkpoint at step {int(state.step)} in {manager.directory}.")
    return state, manager


def _eval_images(config) -> np.ndarray | None:
    """A fixed held-out batch for the bound in bits/dim; None when the dataset has no such split."""
    try:
        images, _ = load_split(data_config(config, config.data.eval_split))
    except (ValueError, FileNotFoundError) as e:
        print(f"No held-out batch for bits/dim ({e}); skipping that evaluation.", flush=True)
        return None
    return images[: config.training.eval_batch_size].astype(np.float32) / 127.5 - 1.0


def bound_fn(model: UNet, schedule: Schedule, config: ml_collections.ConfigDict):
    """A jitted ``(params, images, key) -> VariationalBound`` in bits/dim, compiled once per run."""
    d = config.diffusion

    def bound(params, images, key):
        model_fn = lambda x, t: model.apply(params, x, t)
        return diffusion.variational_bound(
            schedule, model_fn, images, key, prediction=d.prediction, variance=d.variance, chunk_size=32
        )

    return jax.jit(bound)


def fid_fn(config: ml_collections.ConfigDict, model_cfg: UNetConfig, mesh, log):
    """``(ema_params, step) -> {"fid", "score", ...}`` on fresh samples, or None when config.evaluation.fid_every <= 0.

    The reference statistics (the training split under the extractor) are computed once and cached; samples at step s
    are drawn with seed ``config.seed + s``.
    """
    e = config.evaluation
    if e.fid_every <= 0:
        return None
    diffusion.check_choice("evaluation.sampler", e.sampler, samplers.SAMPLERS)
    data = data_config(config, "train")
    extractor = features.make_extractor(e.features, data, e.inception_weights, batch_size=e.fid_batch_size, mesh=mesh)
    reference = evaluation.reference_stats(extractor, data, log=log)
    model = generate.model_from_config(config, model_cfg, None, "EMA")
    steps = e.steps if e.steps > 0 else None
    run = generate.make_sampler(model, e.sampler, steps, mesh=mesh)
    batch = min(e.fid_batch_size, e.fid_num_samples)
    batch += -batch % mesh.devices.size

    def fid(params, step):
        model_now = dataclasses.replace(model, params=params)
        images = generate.generate(model_now, run, e.fid_num_samples, batch, seed=config.seed + step)
        result = evaluation.sample_quality(extractor, images, reference)
        return {**result, "features": extractor.name}

    return fid


def _evaluate_bpd(bound, params, images, key) -> dict[str, float]:
    if images is None:
        return {"total": math.nan, "prior": math.nan, "denoising": math.nan, "reconstruction": math.nan}
    result = bound(params, jnp.asarray(images), key)
    return {k: float(np.mean(getattr(result, k))) for k in ("total", "prior", "denoising", "reconstruction")}


def _summary_writer(workdir):
    import tensorflow as tf

    return tf.summary.create_file_writer(str(workdir / "tensorboard"))


def read_metrics(workdir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The scalars a run logged to ``workdir/tensorboard``, as ``{name: (steps int64 [n], values float64 [n])}``.

    Sorted by step. The event files of a run resumed several times are read in the order they were created (the
    timestamp in their names, which survives copying), and a step logged twice keeps its latest value. For plotting a
    run in a notebook without TensorBoard.

    Raises:
      FileNotFoundError: ``workdir`` holds no TensorBoard logs.
    """
    import tensorflow as tf

    files = sorted(pathlib.Path(workdir, "tensorboard").glob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"No TensorBoard logs in {pathlib.Path(workdir, 'tensorboard')}: is {workdir} a run?")
    logged: dict[str, dict[int, float]] = {}
    for path in files:
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                logged.setdefault(value.tag, {})[int(event.step)] = float(tf.make_ndarray(value.tensor))
    return {
        tag: (np.array(sorted(by_step), np.int64), np.array([by_step[s] for s in sorted(by_step)], np.float64))
        for tag, by_step in logged.items()
    }


def _write(writer, step, scalars):
    if writer is None:
        return
    import tensorflow as tf

    with writer.as_default(step=step):
        for k, v in scalars.items():
            tf.summary.scalar(k, float(v))
    writer.flush()


def _progress(first, last, is_main):
    if not (is_main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=last, initial=first, unit="step", dynamic_ncols=True)


def _log(is_main, line, progress=None):
    if not is_main:
        return
    if progress is not None:
        progress.write(line)
    else:
        print(line, flush=True)
