"""What the batch costs each device: the collectives and the FLOPs of the bound, of a guided sampling step and of the
train step, compiled for one device and for all of them (8 simulated CPU devices).

Usage: python tests/sharding_worker.py OUT.json [--devices 8]
Writes {program: {"1": {"flops": ..., "collectives": [...]}, "8": {...}}}: XLA's cost analysis of the compiled
(per-device) program, and each all-gather, all-to-all or collective-permute of its text with its result's shape;
``gathers_its_batch`` is a control that gathers a batch onto every device.
"""

import argparse
import json
import os
import re
import sys

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--devices", type=int, default=8)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxdiff import parallel, pipeline, training  # noqa: E402
from jaxdiff.flops import flops_of  # noqa: E402
from jaxdiff.models import UNetConfig, init_params, make_apply  # noqa: E402

BATCH = 16
MOVES = ("all-gather", "all-to-all", "collective-permute")
# One level, conditional, with attention: small to compile, and every kind of layer the batch passes through.
NET = UNetConfig(
    image_size=8, in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), num_classes=10
)
spec = pipeline.ModelSpec(NET, pipeline.DiffusionConfig(num_timesteps=20, beta_schedule="cosine"), guidance=2.0)
params = init_params(NET, jax.random.key(0))
pipe = pipeline.from_spec(spec, params, "sharding probe")


def collectives(text: str) -> list[str]:
    """Each batch-moving collective of an HLO module's text, as ``"op result-type"`` (a tuple for combined or async
    ops)."""
    found = []
    for line in text.splitlines():
        match = re.search(r"\b(" + "|".join(MOVES) + r")(-start)?\(", line)
        if match:
            head = line[: match.start()]
            found.append(f"{match.group(1)} {head.split('=', 1)[1].strip() if '=' in head else ''}")
    return found


def figures(lowered) -> dict:
    compiled = lowered.compile()
    return {"flops": flops_of(compiled), "collectives": collectives(compiled.as_text())}


def programs(mesh) -> dict:
    batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    on_mesh = parallel.replicate(params, mesh)
    keys = jax.device_put(parallel.example_keys(jax.random.key(1), jnp.arange(BATCH)), batch)
    labels = jax.device_put(jnp.arange(BATCH, dtype=jnp.int32) % 10, batch)
    images = jax.device_put(jnp.zeros((BATCH, 8, 8, 1), jnp.uint8), batch)
    out = {}
    bound = pipeline.make_bound_fn(pipe, chunk_size=10, mesh=mesh)
    out["bound"] = figures(bound.lower(on_mesh, images, keys, labels))
    guided = pipeline.make_sampler(pipe, "ddim", 1, guidance=2.0, mesh=mesh)  # one DDIM step, guided: 2 branches
    out["guided_ddim_step"] = figures(guided.lower(on_mesh, keys, labels, None))
    auto = pipeline.autoguided(pipe, params, 1.5)
    autoguided = pipeline.make_sampler(auto, "ddim", 1, guidance=0.0, mesh=mesh)
    out["autoguided_ddim_step"] = figures(autoguided.lower(parallel.replicate(auto.params, mesh), keys, labels, None))
    opt = training.OptimConfig(lr=1e-3, warmup_steps=2)
    optimizer = training.make_optimizer(opt)
    step = training.make_train_step(
        make_apply(NET), pipe.schedule, spec.diffusion, optimizer, opt, seed=0, null_class=pipe.null_class
    )
    state = jax.device_put(training.init_train_state(params, optimizer, 20), replicated)
    data = {"image": jnp.zeros((BATCH, 8, 8, 1)), "label": jnp.zeros((BATCH,), jnp.int32)}
    out["train_step"] = figures(training.shard_train_step(step, mesh).lower(state, jax.device_put(data, batch)))
    # A control: a program that gathers its batch onto every device, which the probe must see.
    gather = jax.jit(lambda x: x * 2.0, in_shardings=batch, out_shardings=replicated)
    out["gathers_its_batch"] = figures(gather.lower(jax.device_put(jnp.zeros((BATCH, 8)), batch)))
    return out


one, every = programs(parallel.make_mesh(jax.devices()[:1])), programs(parallel.make_mesh())
result = {name: {"1": one[name], str(jax.device_count()): every[name]} for name in one}
with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
