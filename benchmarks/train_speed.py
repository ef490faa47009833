"""Training throughput on this machine: the input pipeline against the train step, and the memory of the CIFAR-10
step with and without remat. (The train step against PyTorch: benchmarks/versus.py, each side in its own process.)

    python benchmarks/train_speed.py --json benchmarks/results/train_speed.json

1. Input pipeline images/s (jaxdiff.data.Batches, uint8 arrays of the datasets' shapes in memory) against what the
   digits train step (batch 64) consumes, median of --repeats.
2. XLA's memory analysis of the compiled CIFAR-10 train step (batch 8) with remat off and on: temporaries.

Also the two sides of versus.py's train-step workloads: ``jax_step`` and ``torch_step`` (diffusers' UNet2DModel of the
same architecture: noise and t drawn, the eps MSE, backward, global-norm clipping, Adam, and an EMA update).
Sets the CPU convolution flag as train.py does, if absent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from jaxdiff.xla_flags import use_fast_cpu_convolutions

use_fast_cpu_convolutions()  # before the first computation: 1.3x faster CPU gradients (docs/benchmarks.md)


def diffusers_model(model_cfg, seed=0):
    """diffusers' UNet2DModel of ``model_cfg``'s architecture, random init from ``seed`` (PyTorch only)."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    down = tuple("AttnDownBlock2D" if r in model_cfg.attn_resolutions else "DownBlock2D" for r in model_cfg.resolutions)
    return UNet2DModel(
        sample_size=model_cfg.image_size,
        in_channels=model_cfg.in_channels,
        out_channels=model_cfg.out_channels,
        block_out_channels=tuple(model_cfg.ch * m for m in model_cfg.ch_mult),
        layers_per_block=model_cfg.num_res_blocks,
        down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        attention_head_dim=None,
        norm_eps=1e-6,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        dropout=model_cfg.dropout,
    )


def diffusers_unet(model_cfg, seed=0):
    """diffusers' UNet2DModel of ``model_cfg``'s architecture (random init from ``seed``) and its converted params."""
    from jaxdiff.models import convert_diffusers_state_dict

    model = diffusers_model(model_cfg, seed)
    params = convert_diffusers_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, model_cfg)
    return model, params


def torch_step(model_cfg, batch, seed=0, model=None, autocast=None):
    """The train step in PyTorch on diffusers' UNet2DModel of ``model_cfg``'s architecture: noise and t drawn, the eps
    MSE, backward, global-norm clipping, Adam, and an EMA update; returns the loss. ``autocast``: a context for the
    forward pass (``torch.autocast``), or None."""
    import contextlib

    import torch

    autocast = autocast or contextlib.nullcontext

    model = model if model is not None else diffusers_model(model_cfg, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    ema = [p.detach().clone() for p in model.parameters()]
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float()
    x0 = torch.rand(batch, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size) * 2 - 1

    def step():
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast():
            out = model(x_t, t).sample
        loss = ((out.float() - noise) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema, model.parameters(), strict=True):
                e.mul_(0.9999).add_(p, alpha=1e-4)
        return loss.item()

    return step


def jax_step(model_cfg, params, batch):
    """jaxdiff's train step as ``train.py`` runs it (``training.shard_train_step`` on every device, the state
    replicated and donated): noise and t drawn, the eps MSE, backward, clipping, Adam, EMA; returns the loss."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff import parallel, pipeline, training
    from jaxdiff.models import make_apply
    from jaxdiff.schedules import make_schedule

    opt = training.OptimConfig(warmup_steps=0, total_steps=10**6)
    optimizer = training.make_optimizer(opt)
    state = training.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=optimizer.init(params),
        loss_history=jnp.zeros((1000, training.HISTORY)),
        history_count=jnp.zeros((1000,), jnp.int32),
    )
    mesh = parallel.make_mesh()
    state = parallel.replicate(jax.tree_util.tree_map(jnp.copy, state), mesh)  # distinct buffers: the step donates
    fn = training.shard_train_step(
        training.make_train_step(
            make_apply(model_cfg), make_schedule("linear", 1000), pipeline.DiffusionConfig(), optimizer, opt, seed=0
        ),
        mesh,
    )
    size, ch = model_cfg.image_size, model_cfg.in_channels
    data = {
        "image": np.random.default_rng(1).uniform(-1, 1, (batch, size, size, ch)).astype(np.float32),
        "label": np.zeros((batch,), np.int32),
    }
    data = parallel.global_batch(data, mesh)
    holder = {"state": state}

    def step():
        holder["state"], metrics = fn(holder["state"], data)
        return float(metrics["loss"])

    return step


def alternate(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()  # compile / warm up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def step_images_per_sec(model_cfg, batch: int, repeats: int) -> float:
    """What jaxdiff's train step consumes, images/s (median of ``repeats`` steps after the compile)."""
    import jax

    from jaxdiff.models import init_params

    med = alternate({"jax": jax_step(model_cfg, init_params(model_cfg, jax.random.key(0)), batch)}, repeats)
    return batch / med["jax"]


def pipeline_figures(repeats):
    import numpy as np

    from jaxdiff.data import Batches, InMemory

    out = {}
    for name, shape, batch in [("digits", (1500, 8, 8, 1), 64), ("cifar10", (50_000, 32, 32, 3), 128)]:
        images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        batches = Batches(InMemory(images, np.zeros(shape[0], np.int32)), global_batch=batch, seed=0, random_flip=True)
        start = time.perf_counter()
        for step in range(repeats * 20):
            batches.at(step)
        out[name] = {"batch": batch, "images_per_sec": repeats * 20 * batch / (time.perf_counter() - start)}
    return out


def memory_figures():
    import jax
    import jax.numpy as jnp

    from jaxdiff import pipeline, training
    from jaxdiff.models.unet import UNetConfig, abstract_params, make_apply
    from jaxdiff.schedules import make_schedule

    out = {}
    for remat in (False, True):
        cfg = UNetConfig(remat=remat)
        opt = training.OptimConfig()
        optimizer = training.make_optimizer(opt)
        params = abstract_params(cfg)
        state = jax.eval_shape(lambda p, o=optimizer: training.init_train_state(p, o, 1000), params)
        batch = {
            "image": jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((8,), jnp.int32),
        }
        step = training.make_train_step(
            make_apply(cfg), make_schedule("linear", 1000), pipeline.DiffusionConfig(), optimizer, opt, 0
        )
        compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
        mem = compiled.memory_analysis()
        out["remat" if remat else "no_remat"] = {
            "temp_MiB": mem.temp_size_in_bytes / 2**20,
            "argument_MiB": mem.argument_size_in_bytes / 2**20,
            "gflop": compiled.cost_analysis()["flops"] / 1e9,
        }
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    import importlib
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jaxdiff.experiment import run_config

    digits = run_config(importlib.import_module("jaxdiff.configs.digits").get_config()).network(1, None)
    results = {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "digits_step_images_per_sec": step_images_per_sec(digits, 64, args.repeats),
        "pipeline": pipeline_figures(args.repeats),
        "memory_cifar10_batch8": memory_figures(),
    }
    print(f"train step digits   batch  64: {results['digits_step_images_per_sec']:.0f} img/s")
    for name, p in results["pipeline"].items():
        print(f"pipeline   {name:8s} batch {p['batch']:3d}: {p['images_per_sec']:.0f} img/s")
    for name, m in results["memory_cifar10_batch8"].items():
        print(f"memory     {name:8s}: temporaries {m['temp_MiB']:.0f} MiB, {m['gflop']:.0f} GFLOP per step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
