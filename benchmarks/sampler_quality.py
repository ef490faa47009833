"""Sample quality against network calls: DDPM, DDIM, DPM-Solver++ 2M/3M and Heun on a trained digits run.

    python benchmarks/sampler_quality.py --workdir=runs/digits --json benchmarks/results/sampler_quality.json

For each sampler and each budget of network calls (10, 20, 50, 100, and T: the model's whole chain; a budget over T
is skipped, and DDPM and DDIM are the only ones run at T), draws ``--num_samples``
images (seed ``--seed``, the same for every row) and reports the digits Fréchet distance and classifier score
(``metrics.sample_quality`` against the training split, as ``sample.py --eval=fid`` does) and the time per image
after the compile. Heun takes two calls a step (one for the last), so a budget of N calls is (N + 1) // 2 steps. The
floor (the real test split, as many images) is in the first row. Each sampler runs on its own default grid
(``samplers.DEFAULT_SPACINGS``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import time

import jax

from jaxdiff import metrics, pipeline
from jaxdiff.data import load_split
from jaxdiff.metrics import features
from jaxdiff.xla_flags import use_fast_cpu_convolutions

use_fast_cpu_convolutions()  # before the first computation, as sample.py

CALLS = ("10", "20", "50", "100", "T")


def steps_for(sampler: str, calls: int) -> int:
    """The steps that spend ``calls`` network calls (Heun: 2 a step, 1 for the last)."""
    return (calls + 1) // 2 if sampler == "heun" else calls


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/digits")
    parser.add_argument("--num_samples", type=int, default=297)
    parser.add_argument("--batch_size", type=int, default=297)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samplers", default="ddpm,ddim,dpm++2m,dpm++3m,heun", help="comma-separated")
    parser.add_argument("--calls", default=",".join(CALLS), help="comma-separated network-call budgets; T: all steps")
    parser.add_argument("--json", default=None, help="write the rows here (merged into the file's rows if it exists)")
    args = parser.parse_args()

    pipe = pipeline.from_workdir(args.workdir)
    extractor = features.make_extractor("digits", pipe.data)
    reference = metrics.reference_stats(extractor, pipe.data)
    test_images, _ = load_split(dataclasses.replace(pipe.data, split=pipe.data.eval_split))
    floor = metrics.sample_quality(extractor, test_images[: args.num_samples], reference)
    rows = [{"sampler": "real test digits (floor)", "calls": 0, "fd": floor["fid"], "score": floor["score"]}]
    print(f"{'sampler':>10s} {'calls':>6s} {'steps':>6s} {'FD':>7s} {'score':>6s} {'ms/image':>9s}", flush=True)
    print(f"{'floor':>10s} {'':>6s} {'':>6s} {floor['fid']:7.2f} {floor['score']:6.2f}", flush=True)
    T = pipe.num_timesteps
    calls = [T if c == "T" else int(c) for c in args.calls.split(",")]
    # At T calls the ODE solvers all converge to the ODE's solution, which DDIM over the whole chain already gives.
    budgets = [(s, c) for s in args.samplers.split(",") for c in calls if c < T or (c == T and s in ("ddpm", "ddim"))]
    for sampler, calls in budgets:
        steps = steps_for(sampler, calls)
        run = pipeline.make_sampler(pipe, sampler, steps)
        batch = min(args.batch_size, args.num_samples)
        jax.block_until_ready(run(pipe.params, jax.random.split(jax.random.key(0), batch)))  # compile
        start = time.perf_counter()
        images = pipeline.generate(pipe, run, args.num_samples, batch, seed=args.seed)
        seconds = time.perf_counter() - start
        quality = metrics.sample_quality(extractor, images, reference)
        used = 2 * steps - 1 if sampler == "heun" else steps
        row = dict(sampler=sampler, calls=used, steps=steps, fd=quality["fid"], score=quality["score"])
        row["ms_per_image"] = 1000 * seconds / args.num_samples
        rows.append(row)
        print(
            f"{sampler:>10s} {used:6d} {steps:6d} {row['fd']:7.2f} {row['score']:6.2f} {row['ms_per_image']:9.2f}",
            flush=True,
        )
    if args.json:
        meta = dict(cpu=cpu_model(), devices=jax.device_count(), jax=jax.__version__, workdir=args.workdir)
        meta.update(num_samples=args.num_samples, seed=args.seed, date=time.strftime("%Y-%m-%d"))
        if os.path.exists(args.json):  # a run of other samplers or budgets: keep its rows, replace repeated ones
            new = {(r["sampler"], r["calls"]) for r in rows}
            with open(args.json) as f:
                rows = [r for r in json.load(f)["rows"] if (r["sampler"], r["calls"]) not in new] + rows
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
