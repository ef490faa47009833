"""How long a checkpoint save of the CIFAR-10 train state blocks the training loop: async against sync saving.

    python benchmarks/checkpoint_speed.py --json benchmarks/results/checkpoint_speed.json

The state is the DDPM CIFAR-10 TrainState (35.7M parameters; params, EMA and both Adam moments: 572 MB of float32),
filled with random values (incompressible, like trained weights; no network init or compile is needed). For each
mode, alternating, median of --repeats, in a fresh directory each time:
  - blocked: the time ``jaxdiff.checkpoints.save`` takes to return (the loop waits that long);
  - finished: the time until the checkpoint is finalised on disk;
  - interference (async only): the time of a fixed jitted compute workload while the background save runs,
    against the same workload alone (the cost the background write imposes on training steps, on this CPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checkpoints, pipeline
from jaxdiff.models.unet import UNetConfig, abstract_params
from jaxdiff.training import OptimConfig, init_train_state, make_optimizer


def cifar10_state():
    model = UNetConfig()  # the DDPM CIFAR-10 network
    optimizer = make_optimizer(OptimConfig())
    params = abstract_params(model)
    shapes = jax.eval_shape(lambda p: init_train_state(p, optimizer, 1000), params)
    rng = np.random.default_rng(0)

    def fill(s):
        if jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.asarray(rng.standard_normal(s.shape, np.float32))
        return jnp.zeros(s.shape, s.dtype)

    state = jax.tree_util.tree_map(fill, shapes)
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    return model, state, nbytes


@jax.jit
def workload(x):
    for _ in range(8):
        x = jnp.tanh(x @ x) * 0.5
    return x


def time_workload(x, n=3):
    start = time.perf_counter()
    for _ in range(n):
        x = workload(x)
    jax.block_until_ready(x)
    return time.perf_counter() - start


def one_save(model, state, async_save: bool, x):
    root = tempfile.mkdtemp(prefix="jaxdiff-ckpt-bench-")
    try:
        mngr = checkpoints.manager(root, async_save=async_save)
        start = time.perf_counter()
        spec = pipeline.ModelSpec(model, pipeline.DiffusionConfig()).to_json()
        checkpoints.save(mngr, 1, state, {"benchmark": True}, spec)
        blocked = time.perf_counter() - start
        during = time_workload(x) if async_save else float("nan")
        checkpoints.wait(mngr)
        finished = time.perf_counter() - start
        mngr.close()
        return blocked, finished, during
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model, state, nbytes = cifar10_state()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1024, 1024), np.float32)) * 0.03
    time_workload(x)  # compile
    one_save(model, state, True, x)  # warm Orbax and the file system once
    results = {"async": [], "sync": []}
    alone = []
    for _ in range(args.repeats):
        for mode in ("async", "sync"):
            results[mode].append(one_save(model, state, mode == "async", x))
        alone.append(time_workload(x))
    med = lambda values: statistics.median(values)
    summary = {
        "state_mb": nbytes / 1e6,
        "blocked_async_s": med([r[0] for r in results["async"]]),
        "blocked_sync_s": med([r[0] for r in results["sync"]]),
        "finished_async_s": med([r[1] for r in results["async"]]),
        "finished_sync_s": med([r[1] for r in results["sync"]]),
        "workload_alone_s": med(alone),
        "workload_during_async_save_s": med([r[2] for r in results["async"]]),
        "repeats": args.repeats,
        "devices": str(jax.devices()),
    }
    summary["blocked_async_over_sync"] = summary["blocked_async_s"] / summary["blocked_sync_s"]
    summary["workload_slowdown_during_async_save"] = (
        summary["workload_during_async_save_s"] / summary["workload_alone_s"]
    )
    for k, v in summary.items():
        print(f"{k:40s} {v:.3f}" if isinstance(v, float) else f"{k:40s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
