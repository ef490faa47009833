"""Run a few sharded train steps in a fresh process and save the parameters: the tests compare 1 device, 8 devices
and 2 processes. Usage: python tests/train_worker.py OUT.npz [--devices N] [--process I --processes P --port PORT]"""

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
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

if args.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.processes, args.process)

from jaxdiff import training  # noqa: E402
from jaxdiff.data import Batches  # noqa: E402
from jaxdiff.models import UNet, UNetConfig  # noqa: E402
from jaxdiff.schedules import make_schedule  # noqa: E402

GLOBAL_BATCH = 16
cfg = UNetConfig(
    image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1
)
schedule = make_schedule("linear", 100)
opt = training.OptimConfig(lr=1e-3, warmup_steps=2, total_steps=args.steps)
optimizer = training.make_optimizer(opt)
images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1)).astype(np.uint8)
batches = Batches(
    images,
    None,
    global_batch=GLOBAL_BATCH,
    seed=0,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
)

mesh = training.make_mesh()
state = training.replicate(training.init_train_state(cfg, optimizer, 100, seed=0), mesh)
step = training.shard_train_step(
    training.make_train_step(UNet(cfg), schedule, training.Objective(), optimizer, opt, seed=0), mesh
)
losses = []
for s in range(args.steps):
    state, metrics = step(state, training.global_batch(batches.at(s), mesh))
    losses.append(float(metrics["loss"]))
# The state is replicated: every process holds all of it, in its first local shard.
leaves = [np.asarray(leaf.addressable_data(0)) for leaf in jax.tree_util.tree_leaves(state.params)]
if jax.process_index() == 0:
    named = {f"param_{i}": leaf for i, leaf in enumerate(leaves)}
    np.savez(args.out, losses=np.asarray(losses), devices=len(jax.devices()), **named)
