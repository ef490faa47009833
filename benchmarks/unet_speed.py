"""The DDPM CIFAR-10 UNet on this machine: jaxdiff (Flax) against diffusers' UNet2DModel (PyTorch), same weights.

Times a forward pass and a forward+backward pass (the gradient of a squared error, as in training) at batch 8, in one
process, alternating JAX and PyTorch runs so that both see the same machine load; reports medians, the JAX/PyTorch
ratio, JAX's achieved FLOP/s (from XLA's cost analysis) and a 2048x2048 f32 matmul timed in the same process.

    python benchmarks/unet_speed.py                   # default XLA flags, then with the YNN convolution flag
    python benchmarks/unet_speed.py --single          # this process's XLA_FLAGS only

Needs the torch extra (`pip install torch==2.13.0 && pip install -e '.[torch]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def timed(fn, repeats):
    fn()  # warm up (compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(batch: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import UNet2DModel

    from jaxdiff.models import UNet, convert_diffusers_state_dict, unet_config_from_diffusers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    reference = UNet2DModel(
        sample_size=32,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_eps=1e-6,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        dropout=0.0,
    )
    cfg = unet_config_from_diffusers(dict(reference.config))
    params = convert_diffusers_state_dict({k: v.numpy() for k, v in reference.state_dict().items()}, cfg)
    model = UNet(cfg)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)
    target = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    xj, tj, targetj = jnp.asarray(x), jnp.asarray(t), jnp.asarray(target)
    xt, tt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t)
    targett = torch.from_numpy(target.transpose(0, 3, 1, 2).copy())

    forward = jax.jit(model.apply)
    grad = jax.jit(jax.grad(lambda p: jnp.mean((model.apply(p, xj, tj) - targetj) ** 2)))
    fwd_flops = forward.lower(params, xj, tj).compile().cost_analysis()["flops"]
    bwd_flops = grad.lower(params).compile().cost_analysis()["flops"]

    def jax_forward():
        forward(params, xj, tj).block_until_ready()

    def jax_backward():
        jax.block_until_ready(grad(params))

    def torch_forward():
        with torch.no_grad():
            reference(xt, tt).sample.sum().item()

    def torch_backward():
        reference.zero_grad(set_to_none=True)
        ((reference(xt, tt).sample - targett) ** 2).mean().backward()

    a = jnp.asarray(rng.standard_normal((2048, 2048)), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul_s = statistics.median(timed(lambda: matmul(a).block_until_ready(), repeats))

    results = {name: [] for name in ("jax_forward", "torch_forward", "jax_train", "torch_train")}
    for fn in (jax_forward, torch_forward, jax_backward, torch_backward):
        fn()  # compile / warm up
    for _ in range(repeats):  # alternate, so that both frameworks see the same machine load
        for name, fn in (
            ("jax_forward", jax_forward),
            ("torch_forward", torch_forward),
            ("jax_train", jax_backward),
            ("torch_train", torch_backward),
        ):
            start = time.perf_counter()
            fn()
            results[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in results.items()}
    return {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "batch": batch,
        "repeats": repeats,
        "params": sum(p.numel() for p in reference.parameters()),
        "seconds": med,
        "jax_over_torch": {
            "forward": med["jax_forward"] / med["torch_forward"],
            "train": med["jax_train"] / med["torch_train"],
        },
        "jax_gflop": {"forward": fwd_flops / 1e9, "train": bwd_flops / 1e9},
        "jax_gflops_per_s": {
            "forward": fwd_flops / med["jax_forward"] / 1e9,
            "train": bwd_flops / med["jax_train"] / 1e9,
        },
        "matmul_2048_gflops_per_s": 2 * 2048**3 / matmul_s / 1e9,
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
    }


def report(r: dict) -> None:
    s, ratio, rate = r["seconds"], r["jax_over_torch"], r["jax_gflops_per_s"]
    print(f"XLA_FLAGS={r['xla_flags']!r}  batch {r['batch']}, median of {r['repeats']}, {r['params']:,} params")
    for label, key in (("forward", "forward"), ("fwd+bwd", "train")):
        jax_s, torch_s = s[f"jax_{key}"], s[f"torch_{key}"]
        print(f"  {label:<9} jax {jax_s:.3f} s   torch {torch_s:.3f} s   jax/torch {ratio[key]:.2f}")
    print(
        f"  jax GFLOP/s    forward {rate['forward']:.0f}, fwd+bwd {rate['train']:.0f}  "
        f"(XLA: {r['jax_gflop']['forward']:.1f} / {r['jax_gflop']['train']:.1f} GFLOP);  "
        f"2048^2 matmul {r['matmul_2048_gflops_per_s']:.0f} GFLOP/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--single", action="store_true", help="measure with this process's XLA_FLAGS only")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.single:
        result = measure(args.batch, args.repeats)
        report(result)
        print("RESULT " + json.dumps(result))
        return
    results = []
    for flags in ("", YNN_FLAG):
        env = {**os.environ, "XLA_FLAGS": flags}
        cmd = [sys.executable, __file__, "--single", f"--batch={args.batch}", f"--repeats={args.repeats}"]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.split("RESULT ", 1)[1]))
        report(results[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
