"""The built-in digits default against the real-data floor, over training seeds (issue #15).

    python benchmarks/digits_default.py --json benchmarks/results/digits_default.json

For each seed in ``--seeds``: trains ``python train.py --config=configs/digits.py --config.seed=S`` into
``--workdir/seedS`` (the quickstart's command, timed; a finished run is reused and not timed again), then draws
``max(--counts)`` images of its EMA model with each sampler (DDIM-50, and DDPM over all T steps; sampling seed 0) and
judges the first N of them for each N in ``--counts``: the digits classifier's Fréchet distance and score against the
training split, as ``sample.py --eval=fid`` does. A sampler that the run autoguides by default
(``config.sampling.autoguidance`` and ``autoguided_samplers``) is judged twice: as the run samples with it
(autoguided by its own EMA at ``guide_step``; the ``+AG`` rows), and unguided.

The floor is what real held-out digits score. At 297 it is the test split itself. No 900 held-out digits exist, so
the floor at a larger N is extrapolated: the Fréchet distance of N samples from a fixed distribution is, in
expectation, its limit plus a bias that falls as 1/N. :func:`floor_fit` fits ``a + b / N`` to the mean distance of
random subsets of the test split (N = 75 ... 297) and evaluates it at N. The score's floor is the test split's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from sampler_quality import cpu_model  # beside this script

from jaxdiff import metrics, pipeline
from jaxdiff.data import load_split
from jaxdiff.metrics import features
from jaxdiff.xla_flags import use_fast_cpu_convolutions

use_fast_cpu_convolutions()  # before the first computation, as sample.py

SAMPLERS = {"ddim-50": ("ddim", 50), "ddpm": ("ddpm", None)}  # name: (sampler, steps; None = all T)


def floor_fit(extractor, reference, test_images: np.ndarray, sizes=(75, 100, 150, 200, 250), draws: int = 60):
    """``(a, b)`` of the fit ``FD(N) = a + b / N`` to the mean Fréchet distance of random subsets of ``test_images``
    (``draws`` subsets of each size in ``sizes``, and the whole split) against ``reference``."""
    feats, _ = extractor(test_images)
    rng = np.random.default_rng(0)
    n_all = len(test_images)
    fd = lambda idx: metrics.frechet_distance(metrics.feature_stats(feats[idx]), reference)
    sizes = [n for n in sizes if n < n_all]
    means = [np.mean([fd(rng.choice(n_all, n, replace=False)) for _ in range(draws)]) for n in sizes]
    sizes, means = np.array([*sizes, n_all], float), np.array([*means, fd(np.arange(n_all))])
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(sizes), 1.0 / sizes], 1), means, rcond=None)
    return float(a), float(b)


def train(config: str, workdir: str, seed: int, overrides: list[str]) -> float | None:
    """Run the quickstart's training command for ``seed``; its wall time in seconds (None: the run was complete)."""
    marker = os.path.join(workdir, "train_seconds.txt")
    if os.path.exists(marker):
        return None
    cmd = [sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}", f"--config.seed={seed}"]
    cmd += overrides
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    with open(marker, "w") as f:
        f.write(f"{seconds:.1f}\n")
    return seconds


def judge(ways: dict, sampler: str, steps, seed: int, counts: list[int], extractor, reference, rows: list) -> None:
    """Draw ``max(counts)`` images (sampling seed 0) of each pipeline in ``ways`` (row name: pipeline) and append the
    first N's Fréchet distance and score for each N in ``counts`` to ``rows``."""
    for name, model in ways.items():
        run = pipeline.make_sampler(model, sampler, steps)
        start = time.perf_counter()
        images = pipeline.generate(model, run, counts[-1], counts[-1], seed=0)
        seconds = time.perf_counter() - start
        for n in counts:
            quality = metrics.sample_quality(extractor, images[:n], reference)
            rows.append(dict(seed=seed, sampler=name, n=n, fd=quality["fid"], score=quality["score"]))
            print(f"seed {seed}  {name:11s} N={n:4d}  FD {quality['fid']:6.2f}  score {quality['score']:.3f}")
        print(f"  ({counts[-1]} images in {seconds:.0f} s, compile included)", flush=True)


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/digits.py")
    parser.add_argument("--workdir", default="runs/digits_seeds", help="the runs go in WORKDIR/seedS")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--counts", default="297,900", help="comma-separated sample counts")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma-separated, of {list(SAMPLERS)}")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="--config.x=y overrides for train.py (after --)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    counts = sorted(int(n) for n in args.counts.split(","))

    rows, walls = [], {}
    extractor = reference = None
    for seed in seeds:
        workdir = os.path.join(args.workdir, f"seed{seed}")
        walls[seed] = train(args.config, workdir, seed, args.overrides)
        pipe = pipeline.from_workdir(workdir)
        if extractor is None:
            extractor = features.make_extractor("digits", pipe.data)
            reference = metrics.reference_stats(extractor, pipe.data)
        for name in args.samplers.split(","):
            sampler, steps = SAMPLERS[name]
            ways = {name: pipe}
            if pipe.autoguidance_for(sampler) != 0:  # as the run samples by default: autoguided
                ways[name + "+AG"] = pipeline.from_workdir(workdir, autoguidance=None, sampler=sampler)
            judge(ways, sampler, steps, seed, counts, extractor, reference, rows)

    test_images, _ = load_split(dataclasses.replace(pipe.data, split=pipe.data.eval_split, random_flip=False))
    real = metrics.sample_quality(extractor, test_images, reference)
    a, b = floor_fit(extractor, reference, test_images)
    floors = {n: (real["fid"] if n == len(test_images) else a + b / n) for n in counts}
    print(
        f"\nfloor: the test split's {len(test_images)} digits FD {real['fid']:.2f}, score {real['score']:.3f}; "
        f"fit over its subsets FD(N) = {a:.2f} + {b:.0f} / N"
    )
    print(f"trained in {', '.join('reused' if w is None else f'{w:.0f} s' for w in walls.values())}\n")
    print("| sampler | N | floor FD | FD (mean ± sd) | FD / floor | score (mean ± sd) |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["sampler"] for r in rows):
        for n in counts:
            fd = [r["fd"] for r in rows if r["sampler"] == name and r["n"] == n]
            score = [r["score"] for r in rows if r["sampler"] == name and r["n"] == n]
            print(
                f"| {name} | {n} | {floors[n]:.2f} | {mean_sd(fd)} | {statistics.mean(fd) / floors[n]:.2f} | "
                f"{mean_sd(score)} |"
            )
    if args.json:
        meta = dict(cpu=cpu_model(), devices=jax.device_count(), jax=jax.__version__, config=args.config)
        meta.update(overrides=args.overrides, seeds=seeds, date=time.strftime("%Y-%m-%d"))
        floor = dict(test_fd=real["fid"], test_score=real["score"], fit_a=a, fit_b=b, by_count=floors)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "train_seconds": walls, "floor": floor, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
