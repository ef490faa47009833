"""The CIFAR-10 model on whatever JAX sees (a GPU, a TPU slice, a CPU), in one command (issue #18).

    python benchmarks/accelerator.py --json benchmarks/results/accelerator.json
    python benchmarks/accelerator.py --trace_dir=/tmp/jaxdiff-trace     # also a jax.profiler trace of 5 train steps
    python benchmarks/accelerator.py --smoke --config=configs/tiny.py   # a CPU smoke run (the test suite runs it)

It reports, for each of ``--dtypes`` (float32 and bfloat16 compute; parameters stay float32):
1. train steps/s and images/s of the config's network at ``--batch`` (128: the paper's), the step sharded over all
   devices as ``train.py`` runs it (random data, 3 channels, unconditional);
2. model FLOP utilisation: XLA's FLOP count of the step as lowered (before XLA's rewrites) over its time, against
   the devices' peak (``jaxdiff.flops.PEAKS``, dense tensor-core / MXU figures from the vendors' datasheets; float32
   against TF32 on NVIDIA GPUs, which XLA uses for float32 convolutions and matmuls at the default precision); none
   for a device not in the table;
3. compile time of the step, and memory: XLA's analysis of the compiled step, and the device's own peak where it
   keeps one (``peak_bytes_in_use``, process-wide: ``--dtypes=bfloat16`` alone for bfloat16's own);
4. sampling images/s at ``--sample_batch`` (256): DDPM over all T steps, and ``--fast_sampler`` (DPM-Solver++ 2M,
   one network call a step) at ``--fast_steps`` (20), with ``--sample_dtype`` compute.

The goal on one H200-class GPU: >= 50 steps/s at batch 128 in bfloat16 (the paper's TPU v3-8 did 21 in float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the configs package

from jaxdiff.xla_flags import use_fast_cpu_convolutions  # noqa: E402

use_fast_cpu_convolutions()  # before the first computation, as train.py (a CPU-only flag)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxdiff import parallel, pipeline, training  # noqa: E402
from jaxdiff.experiment import run_config  # noqa: E402
from jaxdiff.flops import flops_of, peak_flops  # noqa: E402
from jaxdiff.models.unet import UNet, abstract_params, init_params, make_apply  # noqa: E402


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("benchmark_config", ROOT / path if not os.path.isabs(path) else path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def machine() -> dict:
    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def memory_figures(compiled) -> dict:
    """XLA's memory analysis of the compiled step (arguments + outputs + temporaries - donated, per device), and the
    device's own peak where it keeps one (``peak_bytes_in_use``: since the process started, so a later row is at
    least the earlier ones'; run one dtype per process for each one's own peak)."""
    mem = compiled.memory_analysis()
    xla = None
    if mem is not None:
        xla = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "xla_memory_bytes": None if xla is None else float(xla),
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
    }


def train_figures(run, dtype: str, batch: int, steps: int, warmup: int, trace_dir: str | None) -> dict:
    """Steps/s, FLOP utilisation, compile time and memory of the sharded train step at ``batch``."""
    network = dataclasses.replace(run.network(3, None), dtype=dtype)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(batch, mesh)
    optimizer = training.make_optimizer(run.optim)
    state = parallel.replicate(
        training.init_train_state(init_params(network, jax.random.key(0)), optimizer, run.diffusion.num_timesteps),
        mesh,
    )
    pipe = pipeline.from_spec(pipeline.ModelSpec(network, run.diffusion), state.params, "random weights")
    step = training.make_train_step(make_apply(network), pipe.schedule, run.diffusion, optimizer, run.optim, 0)
    step_fn = training.shard_train_step(step, mesh)
    size = network.image_size
    data = {
        "image": jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1, maxval=1),
        "label": jnp.zeros((batch,), jnp.int32),
    }
    data = jax.device_put(data, parallel.batch_sharding(mesh))

    start = time.perf_counter()
    lowered = step_fn.lower(state, data)
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start
    for _ in range(warmup):
        state, metrics = compiled(state, data)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, data)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    if trace_dir:
        with jax.profiler.trace(os.path.join(trace_dir, f"train_{dtype}")):
            for _ in range(5):
                state, metrics = compiled(state, data)
            jax.block_until_ready(state)

    # The forward pass alone at the same batch, for the train step's FLOPs per forward (about 3: forward, backward).
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    forward = jax.jit(UNet(network).apply).lower(abstract_params(network), x, t)  # counted, not compiled
    flops, forward_flops = flops_of(lowered), flops_of(forward)  # the program's FLOPs, before XLA's rewrites
    steps_per_sec = steps / seconds
    peak = peak_flops(jax.devices()[0].device_kind, dtype)
    return {
        "dtype": dtype,
        "batch": batch,
        "timed_steps": steps,
        "seconds": seconds,
        "steps_per_sec": steps_per_sec,
        "images_per_sec": steps_per_sec * batch,
        "loss_finite": bool(metrics["finite"]),
        "compile_seconds": compile_seconds,
        "flops_per_step": flops,
        "forward_flops": forward_flops,
        "achieved_flops_per_sec": None if flops is None else flops * steps_per_sec,
        "peak_flops_per_sec": None if peak is None else peak * jax.device_count(),
        "mfu": None if flops is None or peak is None else flops * steps_per_sec / (peak * jax.device_count()),
        **memory_figures(compiled),
    }


def sampling_figures(run, dtype: str, sampler: str, steps: int | None, batch: int) -> dict:
    """Images/s of ``sampler`` at ``steps`` (None: all T) at ``batch``, after a first call that compiles."""
    network = dataclasses.replace(run.network(3, None), dtype=dtype)
    spec = pipeline.ModelSpec(network, run.diffusion, run.sampling.clip_x0)
    pipe = pipeline.from_spec(spec, init_params(network, jax.random.key(0)), "random weights")
    mesh = parallel.make_mesh()
    batch = parallel.round_up_batch(batch, mesh)
    sample = pipeline.make_sampler(pipe, sampler, steps, mesh=mesh)
    start = time.perf_counter()
    keys = lambda seed: parallel.example_keys(jax.random.key(seed), jnp.arange(batch))  # image i: fold_in(key, i)
    jax.block_until_ready(sample(pipe.params, keys(0)))
    first = time.perf_counter() - start
    start = time.perf_counter()
    images = jax.block_until_ready(sample(pipe.params, keys(1)))
    seconds = time.perf_counter() - start
    return {
        "sampler": sampler,
        "steps": steps or pipe.num_timesteps,
        "dtype": dtype,
        "batch": batch,
        "seconds": seconds,
        "images_per_sec": batch / seconds,
        "first_call_seconds": first,  # compile + one run
        "finite": bool(jnp.isfinite(images).all()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cifar10.py")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="timed train steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sample_batch", type=int, default=256)
    parser.add_argument("--sample_dtype", default="bfloat16")
    parser.add_argument("--ddpm_steps", type=int, default=None, help="DDPM's chain length (default: all T)")
    parser.add_argument("--fast_sampler", default="dpm++2m")
    parser.add_argument("--fast_steps", type=int, default=20)
    parser.add_argument("--trace_dir", default=None, help="write a jax.profiler trace of 5 train steps per dtype")
    parser.add_argument("--smoke", action="store_true", help="a CPU smoke run: batches of 2 per device, few steps")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        per = 2 * jax.device_count()
        args.batch, args.sample_batch, args.steps, args.warmup = per, per, 2, 1
        args.ddpm_steps, args.fast_steps = args.ddpm_steps or 4, min(args.fast_steps, 3)

    run = run_config(load_config(args.config))
    results = {"machine": machine(), "config": args.config, "train": [], "sampling": []}
    info = results["machine"]
    print(f"{info['device_count']} x {info['device_kind']} ({info['platform']}), jax {info['jax']}")
    for dtype in args.dtypes.split(","):
        row = train_figures(run, dtype, args.batch, args.steps, args.warmup, args.trace_dir)
        results["train"].append(row)
        mfu = "n/a (device not in PEAKS)" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        peak = row["device_peak_bytes"] or row["xla_memory_bytes"]
        memory = "n/a" if peak is None else f"{peak / 2**30:.2f} GiB"
        print(
            f"train {dtype:8s} batch {args.batch}: {row['steps_per_sec']:.2f} steps/s "
            f"({row['images_per_sec']:.0f} images/s), MFU {mfu}, compile {row['compile_seconds']:.1f} s, "
            f"peak memory {memory}"
        )
    for sampler, steps in (("ddpm", args.ddpm_steps), (args.fast_sampler, args.fast_steps)):
        row = sampling_figures(run, args.sample_dtype, sampler, steps, args.sample_batch)
        results["sampling"].append(row)
        print(
            f"sample {sampler:8s} {row['steps']:4d} steps, batch {row['batch']}, {row['dtype']}: "
            f"{row['images_per_sec']:.1f} images/s (first call {row['first_call_seconds']:.1f} s)"
        )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
