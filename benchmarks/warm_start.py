"""Cold start against warm start: how much of a run's start the persistent compilation cache saves (issue #18).

    python benchmarks/warm_start.py --json benchmarks/results/warm_start.json
    # the CIFAR-10 network (35.7M parameters) on the digits resized to 32x32, batch 8 (no CIFAR-10 offline):
    python benchmarks/warm_start.py --config=configs/cifar10.py --sample_steps=2 --num_samples=4 \
        --overrides="--config.data.dataset=digits --config.training.batch_size=8"

Each run is a fresh process of the real entry point, timed from its start to a line it prints:
1. ``train.py``: a new run of one step with an empty compilation cache (cold) writes a checkpoint; the same command
   with two steps resumes it with the cache now filled (warm). Timed to the "First step ... done" line: imports,
   data, parameters or the restored checkpoint, and the train step's compile or its cache load.
2. ``sample.py --workdir``: the run's samples (``--sample_steps`` DDPM steps), the first time with no sampler in the
   cache (cold), then again (warm). Timed to the process's end.

The goal: warm <= 30% of cold. The run's periodic sampling and evaluations are off, so that the train runs compile
nothing but the step. The dataset must be prepared already (the quickstart does it); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIRST_STEP = "First step (step "


def timed_run(cmd: list[str], until: str | None = None) -> tuple[float, str]:
    """Run ``cmd`` in the project root; seconds from its start to the first output line containing ``until`` (None:
    to its end), and its output. Fails on a non-zero exit."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if until is not None and seen is None and until in line:
            seen = time.perf_counter() - start
    proc.wait()
    total = time.perf_counter() - start
    output = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    if until is not None and seen is None:
        raise SystemExit(f"{' '.join(cmd)} never printed {until!r}:\n{output[-3000:]}")
    return (seen if until is not None else total), output


def measure(
    config: str, overrides: list[str], sample_steps: int, num_samples: int, workdir: pathlib.Path, cache: pathlib.Path
) -> dict:
    train = [
        sys.executable,
        "train.py",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--compilation_cache={cache}",
        "--config.training.checkpoint_every=1",
        "--config.training.sample_every=0",
        "--config.training.eval_every=0",
        "--config.evaluation.fid_every=0",
        "--config.sampling.autoguidance=0",  # runs of 1 and 2 steps: no earlier step to guide them
        *overrides,
    ]
    cold_train, _ = timed_run([*train, "--config.training.num_steps=1"], FIRST_STEP)
    warm_train, out = timed_run([*train, "--config.training.num_steps=2"], FIRST_STEP)
    if "Resuming from the checkpoint at step 1" not in out:
        raise SystemExit(f"The second train run did not resume:\n{out[-3000:]}")
    sample = [
        sys.executable,
        "sample.py",
        f"--workdir={workdir}",
        f"--compilation_cache={cache}",
        f"--num_samples={num_samples}",
        f"--steps={sample_steps}",
        f"--out={workdir / 'samples'}",
    ]
    cold_sample, _ = timed_run(sample)
    warm_sample, _ = timed_run(sample)
    return {
        "train_to_first_step_seconds": {
            "cold": cold_train,
            "warm": warm_train,
            "warm_over_cold": warm_train / cold_train,
        },
        "sample_seconds": {"cold": cold_sample, "warm": warm_sample, "warm_over_cold": warm_sample / cold_sample},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits.py")
    parser.add_argument("--sample_steps", type=int, default=20)
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--overrides", default="", help="more train.py flags, e.g. '--config.training.batch_size=8'")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        result = measure(
            args.config, args.overrides.split(), args.sample_steps, args.num_samples, tmp / "run", tmp / "xla-cache"
        )
    result["config"], result["overrides"] = args.config, args.overrides
    for name, r in result.items():
        if isinstance(r, dict):
            print(f"{name}: cold {r['cold']:.1f} s, warm {r['warm']:.1f} s, warm/cold {r['warm_over_cold']:.2f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
