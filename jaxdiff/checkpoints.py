"""Checkpoints of a run under ``workdir/checkpoints``: the train state and the run's config, with Orbax.

Each step's checkpoint holds two items: ``state`` (the TrainState, via StandardSave/StandardRestore, restored onto
the shardings of the target) and ``config`` (the run's ConfigDict as JSON), so a workdir alone is enough to sample.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import jax
import orbax.checkpoint as ocp


def manager(workdir: str | os.PathLike, keep: int = 3) -> ocp.CheckpointManager:
    """The run's CheckpointManager (async saves, the last ``keep`` kept)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / "checkpoints", options=options, item_names=("state", "config")
    )


def save(mngr: ocp.CheckpointManager, step: int, state, config) -> None:
    """Start saving ``state`` and ``config`` as checkpoint ``step`` (asynchronously; see :func:`wait`)."""
    config_json = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_json)))


def wait(mngr: ocp.CheckpointManager) -> None:
    mngr.wait_until_finished()


def _abstract(target):
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)


def restore_latest(mngr: ocp.CheckpointManager, target):
    """The newest readable checkpoint's state, shaped and sharded like ``target``; None if the run has none.

    A checkpoint that cannot be read (files missing or truncated) is skipped with a warning naming the reason, and the
    one before it is tried; nothing is deleted.

    Raises:
      RuntimeError: checkpoints exist but none can be read.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    failures = []
    for step in steps:
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target))))
            return restored["state"]
        except Exception as e:  # Orbax raises many kinds for a damaged checkpoint; each is reported
            failures.append(f"step {step}: {type(e).__name__}: {e}")
            warnings.warn(
                f"Cannot read the checkpoint at step {step} ({type(e).__name__}: {e}); trying an older one.",
                stacklevel=2,
            )
    if failures:
        raise RuntimeError(
            f"None of the {len(steps)} checkpoints in {mngr.directory} can be read; nothing was deleted.\n"
            + "\n".join(failures)
        )
    return None


def restore_config(workdir: str | os.PathLike) -> dict:
    """The run's config (as a dict) from the newest checkpoint of ``workdir``."""
    mngr = manager(workdir)
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {pathlib.Path(workdir) / 'checkpoints'}: train first with train.py.")
    return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
