"""Run a few sharded train steps in a fresh process and save the parameters: the tests compare 1 device, 8 devices
and 2 processes, and a checkpoint moved between device counts.

Usage: python tests/train_worker.py OUT.npz [--devices N] [--steps S] [--process I --processes P --port PORT]
       [--workdir W]   (resume from W's latest checkpoint if any, train until step S, save checkpoint S in W)"""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--process", type=int, default=0)
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--workdir", default=None)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

if args.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.processes, args.process)

from jaxdiff import checkpoints, parallel, pipeline, training  # noqa: E402
from jaxdiff.data import Batches, InMemory  # noqa: E402
from jaxdiff.models import UNetConfig, init_params, make_apply  # noqa: E402
from jaxdiff.schedules import make_schedule  # noqa: E402

GLOBAL_BATCH = 16
# One level, with attention and dropout: how the batch is split cannot depend on the depth, and each process compiles
# the step (half the compile of two levels, the bulk of this test's time).
cfg = UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1)
schedule = make_schedule("linear", 100)
opt = training.OptimConfig(lr=1e-3, warmup_steps=2)
optimizer = training.make_optimizer(opt)
images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1)).astype(np.uint8)
batches = Batches(
    InMemory(images),
    global_batch=GLOBAL_BATCH,
    seed=0,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
)

mesh = parallel.make_mesh()
fresh = lambda: training.init_train_state(init_params(cfg, training.run_keys(0)[0]), optimizer, 100)
state, mngr = None, None
if args.workdir:
    mngr = checkpoints.manager(args.workdir)
    target = checkpoints.abstract(jax.eval_shape(fresh), parallel.replicated(mesh))
    state, _ = checkpoints.restore_latest(mngr, target)
state = state if state is not None else parallel.replicate(fresh(), mesh)
objective = pipeline.DiffusionConfig(num_timesteps=100)
step = training.shard_train_step(
    training.make_train_step(make_apply(cfg), schedule, objective, optimizer, opt, seed=0), mesh
)
start = int(state.step)
restored = [np.asarray(leaf.addressable_data(0)) for leaf in jax.tree_util.tree_leaves(state.params)]
losses = []
for s in range(start, args.steps):
    state, metrics = step(state, parallel.global_batch(batches.at(s), mesh))
    losses.append(float(metrics["loss"]))
if mngr is not None:
    checkpoints.save(mngr, args.steps, state, {"worker": True}, pipeline.ModelSpec(cfg, objective).to_json())
    checkpoints.wait(mngr)
# The state is replicated: every process holds all of it, in its first local shard.
leaves = [np.asarray(leaf.addressable_data(0)) for leaf in jax.tree_util.tree_leaves(state.params)]
if jax.process_index() == 0:
    named = {f"param_{i}": leaf for i, leaf in enumerate(leaves)}
    named.update({f"start_{i}": leaf for i, leaf in enumerate(restored)})
    np.savez(args.out, losses=np.asarray(losses), devices=len(jax.devices()), start=start, **named)
