"""Checkpoints of a run under ``workdir/checkpoints`` with Orbax, and the SIGTERM (preemption) watch.

Each step's checkpoint holds four items: ``state`` (the TrainState, StandardSave/StandardRestore onto the target's
shardings), ``config`` (the run's config as JSON, for people and tools), ``spec`` (what the trained network is, as
JSON: :class:`jaxdiff.spec.ModelSpec`), so a workdir alone is enough to sample (:func:`load_for_sampling`), and
``fingerprint`` (a checksum of each array of the state: :func:`fingerprint`). This module knows nothing of the
network: the caller says what the parameters look like.

Guarantees:
  - a checkpoint is finalised atomically (Orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it), so a crash
    mid-save leaves a temporary directory that is ignored (and removed when the next run starts);
  - restoring tries the newest checkpoint first; one that cannot be read (files missing or truncated, values not
    finite, arrays that differ from the fingerprint saved with them: bytes changed on disk, which Orbax does not
    detect) is reported with a warning and the one before it is tried; unreadable ones are moved aside to
    ``workdir/checkpoints_unreadable`` (never deleted) once an older one has been read, so the resumed run can save
    its own checkpoints at those steps; if none can be read, nothing is touched and the error lists every reason;
  - on several processes (a pod), the hosts agree on the step: each reads on its own (no Orbax barrier that a host
    which failed would never reach), then they compare verdicts, and a checkpoint unreadable on any host counts as
    unreadable on all. The steps tried are process 0's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as preservation

from jaxdiff.ema import Snapshot
from jaxdiff.errors import CheckpointError, ConfigError, MissingFileError
from jaxdiff.parallel import from_process_0, make_mesh, process_verdicts, replicated, to_host

__all__ = [
    "ITEMS",
    "LEGACY_ITEMS",
    "SNAPSHOTS",
    "SNAPSHOT_ITEMS",
    "SUPERSEDED_SNAPSHOTS",
    "UNREADABLE",
    "PreemptionWatch",
    "SamplingCheckpoint",
    "abstract",
    "check_posthoc_resume",
    "check_restored",
    "checkpoint_dir",
    "fingerprint",
    "load_for_sampling",
    "load_snapshot",
    "load_snapshots",
    "manager",
    "reader",
    "restore_config",
    "restore_latest",
    "save",
    "save_snapshot",
    "set_aside",
    "snapshot_dir",
    "snapshot_index",
    "snapshot_manager",
    "supersede_snapshots",
    "wait",
]

#: The items of a run's checkpoint: the train state, the run's config, the model spec, the arrays' fingerprint.
ITEMS = ("state", "config", "spec", "fingerprint")
LEGACY_ITEMS = ("model",)  #: jaxdiff 0.1 stored the network's config alone; read (never written) for old runs
#: The folder beside ``checkpoints`` that unreadable checkpoints are moved into (never deleted).
UNREADABLE = "checkpoints_unreadable"
#: The folder beside ``checkpoints`` of the post-hoc EMA snapshots (every one kept).
SNAPSHOTS = "ema_snapshots"
#: A snapshot's items: the profiles' trees, ``meta`` (JSON: the step, the sigma_rels, the gammas), the fingerprint.
SNAPSHOT_ITEMS = ("emas", "meta", "fingerprint")
#: Where the snapshots later than the step a run resumes from are moved (never deleted): that run saves its own.
SUPERSEDED_SNAPSHOTS = "ema_snapshots_superseded"


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
    """Where a run keeps its checkpoints: ``<workdir>/checkpoints``, as an absolute path (Orbax needs one)."""
    return pathlib.Path(workdir).absolute() / "checkpoints"


def manager(
    workdir: str | os.PathLike,
    keep: int = 3,
    *,
    preserve: Sequence[int] = (),
    async_save: bool = True,
) -> ocp.CheckpointManager:
    """The run's CheckpointManager: the last ``keep`` checkpoints kept, and those at the steps in ``preserve`` (an
    autoguided run's guide) for good; saved in the background if ``async_save``. (Restores go through
    :func:`reader`.)"""
    policies = [preservation.LatestN(keep)] + ([preservation.CustomSteps(list(preserve))] if preserve else [])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS + LEGACY_ITEMS)


def reader(directory: str | os.PathLike, items: Sequence[str] = ITEMS + LEGACY_ITEMS) -> ocp.CheckpointManager:
    """A read-only manager of the checkpoints in ``directory`` that this process uses alone: Orbax ends each restore
    with a barrier of the manager's processes, and a host that failed to read would never reach the others' (they
    would wait for ever, or pair it with its next restore). Every process reads a replicated state whole anyway.
    ``items``: the checkpoints' items (:data:`SNAPSHOT_ITEMS` for the post-hoc EMA snapshots)."""
    me = jax.process_index()
    # Not read_only=True: Orbax logs two warnings each time such a manager opens ("Given directory is read only", and
    # that save_interval_steps is set to 0). This one never saves, creates or cleans up, so it writes nothing either.
    options = ocp.CheckpointManagerOptions(
        create=False,
        save_interval_steps=0,
        cleanup_tmp_directories=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}),
    )
    return ocp.CheckpointManager(directory, options=options, item_names=tuple(items))


def save(mngr: ocp.CheckpointManager, step: int, state, config: dict, spec: dict) -> None:
    """Start saving checkpoint ``step`` (in the background when the manager is async; see :func:`wait`).

    ``config``: the run's config as a JSON-able dict; ``spec``: the JSON of what the network is (a ModelSpec's).
    """
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(dict(config)),
            spec=ocp.args.JsonSave(dict(spec)),
            fingerprint=ocp.args.JsonSave(fingerprint(state)),
        ),
    )


def fingerprint(tree) -> dict[str, int]:
    """A checksum of each array of ``tree``, by its path (``ema_params/conv_in/kernel``), computed on the host.

    Each array's bits, as unsigned 32-bit words ``w_i`` (narrower types widened, wider ones split), give
    ``sum_i (2 i + 1) w_i mod 2^32``. Any change of a single element changes it (an odd factor times a non-zero
    difference is non-zero mod 2^32); a restore that does not reproduce it read bytes that were changed on disk.
    The arrays must be fully replicated (a run's state is) or addressable from this process.
    """
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): _checksum(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _checksum(x) -> int:
    x = to_host(x)
    x = x.view(np.uint8) if x.dtype == np.bool_ else x
    words = x.reshape(-1).view(f"uint{8 * x.dtype.itemsize}")
    words = (words.view(np.uint32) if x.dtype.itemsize > 4 else words).astype(np.uint32, copy=False)
    # uint32 products and sums wrap around: the sum mod 2^32 directly (4x faster than in uint64, then mod).
    odd = np.arange(1, 2 * words.size, 2, dtype=np.uint32)
    return int(np.sum(words * odd, dtype=np.uint32))


def check_restored(mngr: ocp.CheckpointManager, step: int, tree, prefix: str = "") -> None:
    """Raise ValueError if the arrays of ``tree`` (restored from checkpoint ``step``; their paths under ``prefix``)
    hold a non-finite value, or if one lacks the checksum saved with it (a checkpoint saved before jaxdiff wrote
    fingerprints is checked for finite values only). Each array is read to the host once, for both checks."""
    finite, sums = True, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = to_host(leaf)
        finite = finite and bool(np.isfinite(x).all())
        sums[jax.tree_util.keystr(path, simple=True, separator="/")] = _checksum(x)
    if not finite:
        raise CheckpointError("it holds non-finite values")
    if not (pathlib.Path(mngr.directory) / str(step) / "fingerprint").exists():
        return
    saved = mngr.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))["fingerprint"]
    for path, value in sums.items():
        name = f"{prefix}/{path}" if prefix else path
        if saved.get(name) != value:
            raise CheckpointError(f"its array {name} differs from the fingerprint saved with it (changed on disk)")


def wait(mngr: ocp.CheckpointManager) -> None:
    """Block until every save has been written and finalised (raises if one failed)."""
    mngr.wait_until_finished()


def abstract(tree, sharding: jax.sharding.Sharding | None = None):
    """``tree`` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs, on ``sharding`` if given (else the leaves' own)."""

    def leaf(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None else x.sharding)

    return jax.tree_util.tree_map(leaf, tree)


def _reason(e: Exception) -> str:
    """The first line of an exception, without TensorStore's JSON spec, for a one-line warning."""
    text = (str(e).splitlines() or [""])[0].split(" [tensorstore_spec")[0]
    return f"{type(e).__name__}: {text[:400]}"


def _agreed_steps(mngr: ocp.CheckpointManager | None) -> list[int]:
    """The checkpoint steps, newest first, as process 0 lists them (on one process: its own; None: no checkpoints
    here). Call it on every process."""
    steps = sorted(mngr.all_steps(), reverse=True) if mngr is not None else []
    if jax.process_count() == 1:
        return steps
    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
    mine = np.full((count,), -1, np.int32)
    mine[: min(count, len(steps))] = steps[:count]
    return [int(s) for s in multihost_utils.broadcast_one_to_all(mine)]


def _attempt(read: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(read(), None)``, or ``(None, the reason)`` when it raises (Orbax and TensorStore raise many kinds for a
    damaged checkpoint)."""
    try:
        return read(), None
    except Exception as e:  # every kind is reported, and the caller tries another checkpoint
        return None, _reason(e)


def _read_everywhere(read: Callable[[], Any]) -> tuple[Any, str | None]:
    """``_attempt`` on every process, then their verdicts compared: ``(value, None)`` where all of them read it,
    else ``(None, the reason)``, this process's own, or which processes failed where this one did not."""
    value, reason = _attempt(read)
    verdicts = process_verdicts(reason is None)
    if verdicts.all():
        return value, None
    return None, reason or f"it cannot be read on process(es) {np.flatnonzero(~verdicts).tolist()}"


def restore_latest(mngr: ocp.CheckpointManager, target) -> tuple[Any, list[tuple[int, str]]]:
    """The newest readable checkpoint's state, shaped and sharded like ``target``, and the unreadable ones skipped.

    On several processes every process returns the same step: one that any of them cannot read is skipped by all.
    Call it on every process.

    Args:
      target: the state's structure: arrays or ShapeDtypeStructs with shardings (see :func:`abstract`).

    Returns:
      ``(state or None when the run has no checkpoint, [(step, reason), ...] of the newer ones that failed)``.
      Each failure is also reported with a warning.

    Raises:
      CheckpointError: checkpoints exist but none can be read (nothing is moved or deleted).
    """
    steps = _agreed_steps(mngr)
    target = abstract(target)
    skipped = []
    with contextlib.closing(reader(mngr.directory)) as own:
        for step in steps:
            restored, reason = _read_everywhere(lambda step=step: _restore_state(own, step, target))
            if reason is None:
                return restored, skipped
            skipped.append((step, reason))
            warnings.warn(f"Cannot read the checkpoint at step {step} ({reason}); trying an older one.", stacklevel=2)
    if skipped:
        raise CheckpointError(
            f"None of the {len(steps)} checkpoints in {mngr.directory} can be read, so the run cannot resume; nothing "
            "was moved or deleted. Move the damaged step directories away to start over, or point --workdir "
            "elsewhere.\n" + "\n".join(f"  step {s}: {r}" for s, r in skipped)
        )
    return None, skipped


def _restore_state(mngr: ocp.CheckpointManager, step: int, target):
    """Checkpoint ``step``'s state onto ``target``, checked (:func:`check_restored`). A checkpoint saved before the
    TrainState had ``posthoc_emas`` restores onto a target whose field is None (no post-hoc EMA tracked)."""
    older = _predates_posthoc(mngr, step, target)
    item = target
    if older:  # the six fields it has, by name (the layout a dataclass and a dict of its fields share)
        item = {f.name: getattr(target, f.name) for f in dataclasses.fields(target) if f.name != "posthoc_emas"}
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(item)))["state"]
    restored = dataclasses.replace(target, **restored) if older else restored
    check_restored(mngr, step, restored)
    return restored


def _predates_posthoc(mngr: ocp.CheckpointManager, step: int, target) -> bool:
    """Whether checkpoint ``step`` has no ``posthoc_emas`` in its state (saved before the field) and ``target``'s is
    None, so that it restores without it. (A target that tracks post-hoc EMAs gets the mismatch as its error.)"""
    if not dataclasses.is_dataclass(target) or getattr(target, "posthoc_emas", 0) is not None:
        return False
    try:  # the state's tree metadata (the manager's item_metadata knows it only once a restore has named the handler)
        saved = ocp.StandardCheckpointHandler().metadata(pathlib.Path(mngr.directory) / str(step) / "state")
    except Exception:  # no metadata to go by: the restore itself reports what is wrong
        return False
    return saved is not None and hasattr(saved, "keys") and "posthoc_emas" not in saved.keys()


def set_aside(workdir: str | os.PathLike, steps) -> pathlib.Path:
    """Move the checkpoints of ``steps`` to ``workdir/checkpoints_unreadable/<step>`` (kept for inspection)."""
    dest_root = pathlib.Path(workdir).absolute() / UNREADABLE
    dest_root.mkdir(parents=True, exist_ok=True)
    for step in steps:
        dest = dest_root / str(step)
        n = 1
        while dest.exists():  # a step set aside twice (two broken runs) keeps both copies
            dest = dest_root / f"{step}.{n}"
            n += 1
        shutil.move(str(checkpoint_dir(workdir) / str(step)), str(dest))
    return dest_root


@dataclasses.dataclass(frozen=True)
class SamplingCheckpoint:
    """What sampling needs from a run: its config and spec (as dicts), the EMA parameters, the step."""

    config: dict
    spec: dict
    ema_params: Any
    step: int


def _no_checkpoint(workdir) -> FileNotFoundError:
    return MissingFileError(
        f"No checkpoint in {checkpoint_dir(workdir)}: train first (jaxdiff-train --workdir={workdir}), or pass "
        "the workdir of a run that saved one."
    )


@contextlib.contextmanager
def _reader(workdir):
    """This process's read-only manager of ``workdir``'s checkpoints (None where this host has no folder for them) and
    their steps as process 0 lists them, newest first (closed afterwards). FileNotFoundError, on every process alike,
    where process 0 finds none: a host that raised alone would leave the others waiting in their next collective."""
    directory = checkpoint_dir(workdir)
    mngr = reader(directory) if directory.is_dir() else None
    try:
        steps = _agreed_steps(mngr)
        if not steps:
            raise _no_checkpoint(workdir)
        yield mngr, steps
    finally:
        if mngr is not None:
            mngr.close()


def _read_spec(mngr: ocp.CheckpointManager, step: int) -> tuple[dict, dict]:
    """(config, spec) of checkpoint ``step``; a jaxdiff 0.1 checkpoint's spec is put together from its config."""
    described_by = "spec" if (mngr.directory / str(step) / "spec").exists() else "model"
    items = ocp.args.Composite(**{"config": ocp.args.JsonRestore(), described_by: ocp.args.JsonRestore()})
    meta = mngr.restore(step, args=items)
    config = meta["config"]
    if described_by == "spec":
        return config, meta["spec"]
    spec = {"network": meta["model"], "diffusion": config["diffusion"], "clip_x0": config["sampling"]["clip_x0"]}
    return config, {**spec, "data": config["data"]}


def _read_for_sampling(mngr: ocp.CheckpointManager, step: int, params_like: Callable[[dict], Any]):
    config, spec = _read_spec(mngr, step)
    # Onto every device of every process, as sampling uses them: no copy across hosts later.
    item = {"ema_params": abstract(params_like(spec), replicated(make_mesh()))}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    restore = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    ema = mngr.restore(step, args=ocp.args.Composite(state=restore))["state"]["ema_params"]
    check_restored(mngr, step, ema, prefix="ema_params")
    return SamplingCheckpoint(config, spec, ema, step)


def load_for_sampling(
    workdir: str | os.PathLike, step: int | None, params_like: Callable[[dict], Any]
) -> SamplingCheckpoint:
    """The config, spec and EMA parameters of ``workdir``'s newest readable checkpoint (or of ``step``).

    Only the EMA parameters are read (not the optimizer state or the raw parameters), replicated on every device of
    every process (:func:`jaxdiff.parallel.replicated`). ``params_like(spec)`` gives their shapes (a pytree of arrays
    or ShapeDtypeStructs). An unreadable checkpoint is reported with a warning and the one before it is tried (unless
    ``step`` is given). On several processes all of them read the same step, as :func:`restore_latest`: call it on
    every process.

    Raises:
      FileNotFoundError: the workdir has no checkpoint (or not ``step``).
      CheckpointError: no checkpoint can be read.
    """
    with _reader(workdir) as (mngr, steps):
        if step is not None:
            if step not in steps:
                where = checkpoint_dir(workdir)
                raise MissingFileError(f"No checkpoint at step {step} in {where}; it has {sorted(steps)}.")
            steps = [step]
        failures = []
        for s in steps:
            read, reason = _read_everywhere(lambda s=s: _read_for_sampling(mngr, s, params_like))
            if reason is None:
                return read
            failures.append(f"  step {s}: {reason}")  # as in restore_latest: report, then try the one before
            warnings.warn(f"Cannot read the checkpoint at step {s} ({reason}).", stacklevel=2)
        raise CheckpointError(f"No checkpoint in {checkpoint_dir(workdir)} can be read:\n" + "\n".join(failures))


def restore_config(workdir: str | os.PathLike) -> dict:
    """The run's config (as a dict) from the newest checkpoint of ``workdir``."""
    with _reader(workdir) as (mngr, steps):
        return mngr.restore(steps[0], args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def check_posthoc_resume(workdir: str | os.PathLike, sigma_rels: Sequence[float]) -> None:
    """Refuse to resume ``workdir`` with other post-hoc EMA widths than its newest checkpoint's config records
    (``optim.posthoc_ema``; none recorded: a run from before the setting, which tracked none). The profiles must be
    tracked from step 1 with one gamma each, so the state cannot take another setting midway. Nothing to check for a
    fresh run, or where the config cannot be read (the restore reports that checkpoint). Process 0's verdict holds on
    every process. Call it on every process.

    Raises:
      ConfigError: the run is resumed with another ``config.optim.posthoc_ema``.
    """
    wanted = tuple(float(s) for s in sigma_rels)
    try:
        recorded = tuple(float(s) for s in restore_config(workdir).get("optim", {}).get("posthoc_ema", ()) or ())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        recorded = wanted  # a fresh run (no checkpoint), or a config that cannot be read: nothing to compare
    if not from_process_0(int(recorded != wanted)):
        return
    given = ",".join(f"{s:g}" for s in recorded) or "()"
    raise ConfigError(
        f"{workdir} tracked post-hoc EMAs of widths {recorded or '(none)'} (config.optim.posthoc_ema of its newest "
        f"checkpoint), not {wanted or '(none)'}: they are tracked from step 1, so resume it with "
        f"--config.optim.posthoc_ema={given}, or train a new run in another --workdir."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Post-hoc EMA snapshots (jaxdiff.ema): every one kept, beside the checkpoints.


def snapshot_dir(workdir: str | os.PathLike) -> pathlib.Path:
    """Where a run keeps its post-hoc EMA snapshots: ``<workdir>/ema_snapshots``, absolute."""
    return pathlib.Path(workdir).absolute() / SNAPSHOTS


def snapshot_manager(workdir: str | os.PathLike, *, async_save: bool = True) -> ocp.CheckpointManager:
    """The manager that saves a run's snapshots: no ``max_to_keep`` (every snapshot is kept: reconstruction needs
    the whole history), saved in the background if ``async_save``. All processes save (Orbax writes on process 0)."""
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(snapshot_dir(workdir), options=options, item_names=SNAPSHOT_ITEMS)


def save_snapshot(
    mngr: ocp.CheckpointManager, step: int, emas: Sequence, sigma_rels: Sequence[float], gammas: Sequence[float]
) -> None:
    """Start saving snapshot ``step``: the tracked profiles' trees ``emas`` (one per sigma_rel, in that order), a JSON
    item ``meta`` ``{"step", "sigma_rels", "gammas"}``, and the arrays' :func:`fingerprint` (paths ``0/...``,
    ``1/...``)."""
    emas = tuple(emas)
    if not len(emas) == len(sigma_rels) == len(gammas):
        raise ConfigError(f"{len(emas)} EMA trees, {len(sigma_rels)} sigma_rels, {len(gammas)} gammas: one each.")
    meta = {"step": int(step), "sigma_rels": [float(s) for s in sigma_rels], "gammas": [float(g) for g in gammas]}
    mngr.save(
        step,
        args=ocp.args.Composite(
            emas=ocp.args.StandardSave(emas),
            meta=ocp.args.JsonSave(meta),
            fingerprint=ocp.args.JsonSave(fingerprint(emas)),
        ),
    )


@contextlib.contextmanager
def _snapshot_reader(workdir):
    """This process's reader of ``workdir``'s snapshots (None where there is no folder) and their steps as process 0
    lists them, oldest first."""
    directory = snapshot_dir(workdir)
    mngr = reader(directory, SNAPSHOT_ITEMS) if directory.is_dir() else None
    try:
        yield mngr, sorted(_agreed_steps(mngr))
    finally:
        if mngr is not None:
            mngr.close()


def _snapshot_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    try:
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # Orbax and the JSON reader raise many kinds for a damaged file
        where = pathlib.Path(mngr.directory) / str(step)
        raise CheckpointError(
            f"The EMA snapshot {where} cannot be read ({_reason(e)}); move it out of {mngr.directory} to reconstruct "
            "from the others."
        ) from e


def snapshot_index(workdir: str | os.PathLike, up_to_step: int | None = None) -> list[dict]:
    """What each snapshot of ``workdir`` holds, oldest first (up to ``up_to_step`` if given), from its JSON alone:
    ``[{"step", "sigma_rels", "gammas"}, ...]``; [] for a run without snapshots. Call it on every process."""
    with _snapshot_reader(workdir) as (mngr, steps):
        return [_snapshot_meta(mngr, s) for s in steps if up_to_step is None or s <= up_to_step]


def load_snapshot(workdir: str | os.PathLike, step: int, params_like) -> list[Snapshot]:
    """Snapshot ``step`` of ``workdir``: one :class:`jaxdiff.ema.Snapshot` per tracked profile, its parameters
    replicated on every device of every process (``params_like``: their shapes, a pytree of arrays or
    ShapeDtypeStructs), checked against the fingerprint saved with them.

    Raises:
      CheckpointError: the snapshot cannot be read, holds non-finite values, or its arrays differ from its
        fingerprint (the message names its folder).
    """
    with _snapshot_reader(workdir) as (mngr, steps):
        if step not in steps:
            raise MissingFileError(f"No EMA snapshot at step {step} in {snapshot_dir(workdir)}; it has {steps}.")
        meta = _snapshot_meta(mngr, step)
        like = abstract(params_like, replicated(make_mesh()))
        target = tuple(like for _ in meta["gammas"])
        where = snapshot_dir(workdir) / str(step)
        try:
            emas = mngr.restore(step, args=ocp.args.Composite(emas=ocp.args.StandardRestore(target)))["emas"]
            check_restored(mngr, step, emas)
        except Exception as e:  # a damaged snapshot is refused, named, never used
            raise CheckpointError(
                f"The EMA snapshot {where} cannot be used: {e if isinstance(e, CheckpointError) else _reason(e)}. "
                f"Move it out of {snapshot_dir(workdir)} to reconstruct from the others."
            ) from e
        return [Snapshot(step, float(g), tree) for g, tree in zip(meta["gammas"], emas, strict=True)]


def load_snapshots(workdir: str | os.PathLike, params_like, up_to_step: int | None = None) -> list[Snapshot]:
    """Every snapshot of ``workdir`` (up to ``up_to_step``), oldest first, each profile one
    :class:`jaxdiff.ema.Snapshot` (:func:`load_snapshot`). All of them are held at once: to combine many snapshots of a
    large network, read them one by one (:func:`snapshot_index`, then :func:`load_snapshot`)."""
    index = snapshot_index(workdir, up_to_step)
    return [snap for meta in index for snap in load_snapshot(workdir, meta["step"], params_like)]


def supersede_snapshots(workdir: str | os.PathLike, after_step: int) -> list[int]:
    """Move the snapshots later than ``after_step`` (the step a run starts or resumes from) to
    ``workdir/ema_snapshots_superseded/<step>`` (kept, never deleted), so that the run saves its own at those steps
    (Orbax skips a save at or before its newest step). Process 0 moves them; the others wait. Returns their steps.
    Call it on every process."""
    with _snapshot_reader(workdir) as (_, steps):
        later = [s for s in steps if s > after_step]
    if later and jax.process_index() == 0:
        dest_root = pathlib.Path(workdir).absolute() / SUPERSEDED_SNAPSHOTS
        dest_root.mkdir(parents=True, exist_ok=True)
        for step in later:
            dest, n = dest_root / str(step), 1
            while dest.exists():
                dest, n = dest_root / f"{step}.{n}", n + 1
            shutil.move(str(snapshot_dir(workdir) / str(step)), str(dest))
    if later and jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxdiff: superseded EMA snapshots moved")
    return later


class PreemptionWatch:
    """Whether the run has been asked to stop (SIGTERM, as a TPU VM gets before preemption), agreed by all hosts.

    One process: a SIGTERM handler sets a flag (the previous handler is put back by :meth:`close`). Several processes
    under ``jax.distributed``: JAX's preemption service catches the signal on any host and the hosts agree on one step
    (``multihost_utils.reached_preemption_sync_point``), so all of them save the same checkpoint. Call
    :meth:`reached` after every step, on every host.
    """

    def __init__(self):
        self._multihost = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        self.signalled = False
        self._previous = None
        if not self._multihost:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:  # not the main thread: signals cannot be caught here
                warnings.warn("Training outside the main thread: SIGTERM will not save a checkpoint.", stacklevel=2)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self.signalled = True

    def reached(self, step: int) -> bool:
        """True at the step where every process should save and stop."""
        if self._multihost:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled

    def close(self) -> None:
        """Put the SIGTERM handler that was there before back (one process; a no-op under ``jax.distributed``)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
