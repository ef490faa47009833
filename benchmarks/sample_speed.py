"""Sampling speed: the scan sampler's per-step overhead, and its compile time.

    python benchmarks/sample_speed.py --json benchmarks/results/sample_speed.json

For the digits network (ch 32, 8x8, batch 64) and the DDPM CIFAR-10 network (batch 4 on a CPU), median of --repeats,
alternating:
1. overhead: one step of ``ddpm_sample`` (a respaced chain of S steps, one jitted lax.scan, divided by S) against one
   jitted UNet forward at the same batch (goal: <= 3% more);
2. compile time of the whole sampler for T = 1000 against T = 10 (one scan body: nearly equal).

Against diffusers' DDPMScheduler loop: benchmarks/versus.py (sample_digits, sample_cifar10), each side in its own
process. Sets XLA_FLAGS as sample.py does.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from train_speed import alternate

from jaxdiff import samplers
from jaxdiff.models import UNet, UNetConfig, init_params
from jaxdiff.xla_flags import use_fast_cpu_convolutions

use_fast_cpu_convolutions()  # before the first computation: 1.3x faster CPU gradients (docs/benchmarks.md)

MODELS = {
    "digits": (UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), attn_resolutions=(4,), dropout=0.0), 64),
    "cifar10": (UNetConfig(dropout=0.0), 4),
}


def figures(name: str, steps: int, repeats: int) -> dict:
    cfg, batch = MODELS[name]
    params = init_params(cfg, jax.random.key(0))
    net = UNet(cfg)
    shape = (batch, cfg.image_size, cfg.image_size, cfg.in_channels)
    schedule = samplers.sampling_schedule("linear", 1000, steps)
    x = jax.random.normal(jax.random.key(0), shape)
    t = jnp.full((batch,), 500, jnp.int32)

    forward = jax.jit(lambda p, x, t: net.apply(p, x, t))
    sample = jax.jit(
        lambda p, key: samplers.ddpm_sample(schedule, lambda x, t: net.apply(p, x, t), shape, key, clip_x0=True)
    )
    med = alternate(
        {
            "jax_forward": lambda: jax.block_until_ready(forward(params, x, t)),
            "jax_sampler": lambda: jax.block_until_ready(sample(params, jax.random.key(1))),
        },
        repeats,
    )
    return {
        "model": name,
        "batch": batch,
        "steps": steps,
        "seconds_per_step": {"jax_forward": med["jax_forward"], "jax_sampler": med["jax_sampler"] / steps},
        "sampler_step_over_forward": med["jax_sampler"] / steps / med["jax_forward"],
    }


def compile_seconds(num_timesteps: int) -> float:
    cfg, batch = MODELS["digits"]
    net = UNet(cfg)
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)))
    schedule = samplers.sampling_schedule("linear", num_timesteps)
    fn = jax.jit(lambda p, key: samplers.ddpm_sample(schedule, lambda x, t: net.apply(p, x, t), (batch, 8, 8, 1), key))
    start = time.perf_counter()
    fn.lower(params, jax.random.key(0)).compile()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="digits,cifar10")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {"runs": [], "devices": str(jax.devices())}
    for name in args.models.split(","):
        steps = 50 if name == "digits" else 5
        r = figures(name, steps, args.repeats if name == "digits" else max(2, args.repeats // 2))
        results["runs"].append(r)
        s = r["seconds_per_step"]
        print(
            f"{name} batch {r['batch']}, {steps} steps: forward {s['jax_forward'] * 1e3:.1f} ms, sampler step "
            f"{s['jax_sampler'] * 1e3:.1f} ms ({r['sampler_step_over_forward']:.3f}x the forward)",
            flush=True,
        )
    compile_times = {T: compile_seconds(T) for T in (10, 1000, 10, 1000)}  # second of each: warm tracing caches
    results["compile_seconds"] = {"T=10": compile_times[10], "T=1000": compile_times[1000]}
    results["compile_1000_over_10"] = compile_times[1000] / compile_times[10]
    print(f"compile: T=10 {compile_times[10]:.2f} s, T=1000 {compile_times[1000]:.2f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
