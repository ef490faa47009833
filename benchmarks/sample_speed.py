"""Sampling speed: the scan sampler's per-step overhead, against diffusers' DDPMScheduler loop, and compile time.

    python benchmarks/sample_speed.py --json benchmarks/results/sample_speed.json

For the digits network (ch 32, 8x8, batch 64) and the DDPM CIFAR-10 network (batch 4 on a CPU), same weights in
JAX and PyTorch, median of --repeats, JAX and PyTorch alternating:
1. overhead: one step of ``ddpm_sample`` (a respaced chain of S steps, one jitted lax.scan, divided by S) against one
   jitted UNet forward at the same batch (goal: <= 3% more);
2. against diffusers: ``DDPMScheduler.step`` + ``UNet2DModel`` in a Python loop over the same S timesteps, under
   ``torch.no_grad`` (goal: faster);
3. compile time of the whole sampler for T = 1000 against T = 10 (one scan body: nearly equal).

Needs the torch extra. Sets XLA_FLAGS as sample.py does.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from train_speed import alternate, diffusers_unet

from jaxdiff import samplers
from jaxdiff.models import UNet, UNetConfig
from jaxdiff.xla_flags import use_fast_cpu_convolutions

use_fast_cpu_convolutions()  # before the first computation: 1.7x faster CPU training (benchmarks/README.md)

MODELS = {
    "digits": (UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), attn_resolutions=(4,), dropout=0.0), 64),
    "cifar10": (UNetConfig(dropout=0.0), 4),
}


def figures(name: str, steps: int, repeats: int) -> dict:
    import torch
    from diffusers import DDPMScheduler

    cfg, batch = MODELS[name]
    torch_model, params = diffusers_unet(cfg)
    torch_model.eval()
    net = UNet(cfg)
    shape = (batch, cfg.image_size, cfg.image_size, cfg.in_channels)
    schedule = samplers.sampling_schedule("linear", 1000, steps)
    x = jax.random.normal(jax.random.key(0), shape)
    t = jnp.full((batch,), 500, jnp.int32)

    forward = jax.jit(lambda p, x, t: net.apply(p, x, t))
    sample = jax.jit(
        lambda p, key: samplers.ddpm_sample(schedule, lambda x, t: net.apply(p, x, t), shape, key, clip_x0=True)
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small")
    scheduler.set_timesteps(steps)

    def torch_loop():
        generator = torch.Generator().manual_seed(0)
        image = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=generator)
        with torch.no_grad():
            for timestep in scheduler.timesteps:
                eps = torch_model(image, timestep).sample
                image = scheduler.step(eps, timestep, image, generator=generator).prev_sample
        return image

    med = alternate(
        {
            "jax_forward": lambda: jax.block_until_ready(forward(params, x, t)),
            "jax_sampler": lambda: jax.block_until_ready(sample(params, jax.random.key(1))),
            "diffusers_loop": torch_loop,
        },
        repeats,
    )
    per_step = {"jax_sampler": med["jax_sampler"] / steps, "diffusers_loop": med["diffusers_loop"] / steps}
    return {
        "model": name,
        "batch": batch,
        "steps": steps,
        "seconds_per_step": {"jax_forward": med["jax_forward"], **per_step},
        "sampler_step_over_forward": per_step["jax_sampler"] / med["jax_forward"],
        "jax_over_diffusers_per_step": per_step["jax_sampler"] / per_step["diffusers_loop"],
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
            f"{s['jax_sampler'] * 1e3:.1f} ms ({r['sampler_step_over_forward']:.3f}x the forward), diffusers loop "
            f"step {s['diffusers_loop'] * 1e3:.1f} ms (jax/diffusers {r['jax_over_diffusers_per_step']:.3f})",
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
