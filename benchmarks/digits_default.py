"""The built-in digits default by the held-out judge, over training seeds (issues #15, #31).

    python benchmarks/digits_default.py --json benchmarks/results/digits_default.json

For each seed in ``--seeds``: trains ``python train.py --config=configs/digits.py --config.seed=S`` into
``--workdir/seedS`` (the quickstart's command, timed; a finished run is reused and not timed again), then draws
``--num_samples`` images of its EMA model each way in ``--ways`` (sampling seed ``--sample_seed``, 0) and judges
them with :class:`jaxdiff.metrics.HeldoutJudge`: the digits classifier's Fréchet distance to the 297 test digits,
which no run trains on, against the real-data floor at the same N (N real training digits, 30 draws, with their
spread); the share of near-copies of training digits; the classifier score; and the train-referenced distance, for
comparison.

A way is ``name=sampler[:steps[:eta[:autoguidance[:spacing[:variance]]]]]``: steps 0 is all T, autoguidance ``run``
is the run's own default for that sampler (``config.sampling``), a number that scale by the run's guide; spacing and
variance (DDPM's sigma_t^2) empty for the sampler's and the run's own. The default ways are the
three default samplers as ``sample.py`` runs them: DDPM over all T, DDIM-50 and DPM-Solver++ 2M at 20 steps.

A class-conditional config (``configs/digits_cond.py``) draws the classes in turn and adds the conditional accuracy
and each class's distance to the held-out digits of that class, against that class's floor.
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
from sampler_quality import cpu_model  # beside this script

from jaxdiff import metrics, pipeline
from jaxdiff.metrics import features
from jaxdiff.xla_flags import use_fast_cpu_convolutions

use_fast_cpu_convolutions()  # before the first computation, as sample.py

DEFAULT_WAYS = "ddpm=ddpm:0:0:run,ddim-50=ddim:50:0:run,dpm++2m-20=dpm++2m:20:0:run"


def parse_way(text: str) -> tuple[str, dict]:
    """``name=sampler[:steps[:eta[:autoguidance[:spacing[:variance]]]]]`` -> ``(name, {sampler, steps, ...})``."""
    name, _, spec = text.partition("=")
    parts = (spec or name).split(":") + [""] * 5
    steps = int(parts[1] or 0) or None
    guide = None if parts[3] == "run" else float(parts[3] or 0)
    way = dict(sampler=parts[0], steps=steps, eta=float(parts[2] or 0), autoguidance=guide)
    return name, dict(way, spacing=parts[4] or None, variance=parts[5] or None)


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


def judge_way(workdir: str, way: dict, num_samples: int, judge, seed: int = 0) -> dict:
    """Draw ``num_samples`` images (sampling seed ``seed``) of the run in ``workdir`` one way and judge them."""
    pipe = pipeline.from_workdir(workdir, autoguidance=way["autoguidance"], sampler=way["sampler"])
    if way["variance"]:
        pipe = dataclasses.replace(pipe, variance=way["variance"])
    run = pipeline.make_sampler(pipe, way["sampler"], way["steps"], way["eta"], way["spacing"])
    labels = pipeline.labels_for(num_samples, pipe.num_classes, None)  # what generate draws: the classes in turn
    start = time.perf_counter()
    images = pipeline.generate(pipe, run, num_samples, num_samples, seed=seed)  # the classes in turn, if conditional
    seconds = time.perf_counter() - start
    result = judge(images, labels)
    result["seconds"] = seconds
    result["guided"] = pipe.source
    return result


def mean_sd(values: list[float], digits: int = 2) -> str:
    if len(values) > 1:
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    return f"{values[0]:.{digits}f}"


def table(rows: list[dict]) -> str:
    """The markdown table: each way's means (± sd over seeds) of the judge's figures."""
    lines = [
        "| way | FD to test | floor (N real train) | FD / floor | near-copies | NN ratio | score | train-ref FD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["way"] for r in rows):
        mine = [r for r in rows if r["way"] == name]
        col = lambda k, mine=mine: [r[k] for r in mine]
        ratio = statistics.mean(col("fid")) / statistics.mean(col("floor"))
        line = (
            f"| {name} | {mean_sd(col('fid'))} | {mean_sd(col('floor'))} | {ratio:.2f} | "
            f"{100 * statistics.mean(col('copy_share')):.1f}% | {statistics.mean(col('copy_median_ratio')):.2f} | "
            f"{mean_sd(col('score'), 3)} | {mean_sd(col('fid_train'))} |"
        )
        if "cond_accuracy" in mine[0]:
            per_class = statistics.mean(
                r["fid_per_class"][k] / r["floor_per_class"][k] for r in mine for k in r["fid_per_class"]
            )
            line += f" accuracy {statistics.mean(col('cond_accuracy')):.3f}, per-class FD / floor {per_class:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/digits.py")
    parser.add_argument("--workdir", default="runs/digits_seeds", help="the runs go in WORKDIR/seedS")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--num_samples", type=int, default=900)
    parser.add_argument("--sample_seed", type=int, default=0, help="the sampling seed (image i: fold_in(key(seed), i))")
    parser.add_argument("--ways", default=DEFAULT_WAYS, help="comma-separated name=sampler:steps:eta:autoguidance")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="--config.x=y overrides for train.py (after --)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    ways = dict(parse_way(w) for w in args.ways.split(","))

    rows, walls, judge = [], {}, None
    for seed in seeds:
        workdir = os.path.join(args.workdir, f"seed{seed}")
        walls[seed] = train(args.config, workdir, seed, args.overrides)
        if judge is None:
            data = pipeline.from_workdir(workdir).data
            judge = metrics.heldout_judge(features.make_extractor("digits", data), data)
        for name, way in ways.items():
            result = judge_way(workdir, way, args.num_samples, judge, args.sample_seed)
            rows.append(dict(seed=seed, way=name, **way, **result))
            print(f"seed {seed}  {name:14s} {judge.summary(result)} ({result['seconds']:.0f} s)", flush=True)

    print(f"\ntrained in {', '.join('reused' if w is None else f'{w:.0f} s' for w in walls.values())}")
    print(f"{args.num_samples} samples a way, seeds {seeds}, {args.config} {' '.join(args.overrides)}\n")
    print(table(rows))
    if args.json:
        meta = dict(cpu=cpu_model(), devices=jax.device_count(), jax=jax.__version__, config=args.config)
        meta.update(overrides=args.overrides, seeds=seeds, date=time.strftime("%Y-%m-%d"), ways=args.ways)
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "train_seconds": walls, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
