"""The train step's time in two jaxdiff trees (two commits), each in its own process, alternating: what a change did.

    git worktree add /tmp/before <commit>
    python benchmarks/step_time.py --roots=/tmp/before,. --config=configs/digits.py --pairs=3

Or of several variants of one config in one tree (the training objectives of issue #34: equal steps are equal time?):

    python benchmarks/step_time.py --roots=. --variants='{"v": {}, "edm": {"diffusion.process": "edm"}}'

Each process imports jaxdiff from its root, builds a config's train step as ``train.py`` does (the sharded step of
``experiment.run_config``'s network and objective, on every device), compiles it, runs ``--warmup`` steps, then times
``--steps`` steps on a fixed random batch and prints the median over ``--repeats`` such runs. The roots are run in
turn (A B A B ...) and the ratio to the first root is taken pair by pair: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

CHILD = r"""
import json, sys, time
root, config_path, overrides, steps, warmup, repeats = sys.argv[1:7]
sys.path.insert(0, root)
from jaxdiff.xla_flags import use_fast_cpu_convolutions
use_fast_cpu_convolutions()
import importlib.util
import jax, jax.numpy as jnp, numpy as np
from jaxdiff import experiment, parallel, pipeline, training
from jaxdiff.models import init_params, make_apply

spec = importlib.util.spec_from_file_location("config", config_path)
module = importlib.util.module_from_spec(spec)
sys.path.insert(0, str(__import__("pathlib").Path(config_path).resolve().parent.parent))
spec.loader.exec_module(module)
config = module.get_config()
for item in json.loads(overrides).items():
    section, key = item[0].split(".")
    setattr(config[section], key, item[1])
run = experiment.run_config(config)
channels = 1 if run.data.dataset in ("digits", "mnist", "fashion_mnist") else 3
network = run.network(channels, None)
optimizer = training.make_optimizer(run.optim)
schedule = pipeline.from_spec(pipeline.ModelSpec(network, run.diffusion), None, "").schedule
step = training.make_train_step(make_apply(network), schedule, run.diffusion, optimizer, run.optim, run.seed)
mesh = parallel.make_mesh()
step_fn = training.shard_train_step(step, mesh)
state = parallel.replicate(
    training.init_train_state(init_params(network, jax.random.key(0)), optimizer, run.diffusion.num_timesteps), mesh
)
size, b = run.data.image_size, run.training.batch_size
rng = np.random.default_rng(0)
batch = parallel.global_batch(
    {"image": rng.uniform(-1, 1, (b, size, size, channels)).astype(np.float32), "label": np.zeros((b,), np.int32)},
    mesh,
)
for _ in range(int(warmup)):
    state, metrics = step_fn(state, batch)
jax.block_until_ready(state)
times = []
for _ in range(int(repeats)):
    start = time.perf_counter()
    for _ in range(int(steps)):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(state)
    times.append((time.perf_counter() - start) / int(steps))
print(json.dumps({"seconds_per_step": sorted(times)[len(times) // 2]}))
"""


def time_root(root: str, args, overrides: str | None = None) -> float:
    overrides = args.overrides if overrides is None else overrides
    argv = [sys.executable, "-c", CHILD, root, args.config, overrides, str(args.steps), str(args.warmup)]
    out = subprocess.run([*argv, str(args.repeats)], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds_per_step"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roots", required=True, help="comma-separated jaxdiff trees; ratios are to the first")
    parser.add_argument("--config", default=str(ROOT / "configs" / "digits.py"))
    parser.add_argument("--overrides", default="{}", help='JSON {"section.key": value} applied to the config')
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variants", default=None, help='JSON {"name": {"section.key": value}}: time these in turn in the first root'
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    roots = [str(pathlib.Path(r).resolve()) for r in args.roots.split(",")]
    variants = {name: json.dumps(o) for name, o in json.loads(args.variants or "{}").items()}

    def timed(entry: str) -> float:
        """A root, or a variant: the first root with the variant's overrides."""
        return time_root(roots[0], args, variants[entry]) if variants else time_root(entry, args)

    if variants:  # each variant stands in for a root, in turn
        roots = [roots[0], *variants]
    entries = roots[1:] if variants else roots
    times = {entry: [] for entry in entries}
    for _ in range(args.pairs):
        for entry in entries:
            times[entry].append(timed(entry))
    from versus import machine  # the CPU model, cores, ISA flags, versions, XLA_FLAGS (imports no jax)

    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores; {args.config} {args.overrides}; {args.pairs} rounds of each root")
    result = {"machine": info, "config": args.config, "overrides": args.overrides, "roots": {}}
    for root in entries:
        ratios = [t / b for t, b in zip(times[root], times[entries[0]], strict=True)]
        result["roots"][root] = {"seconds_per_step": times[root], "ratio_to_first": ratios}
        print(
            f"  {root}: {1e3 * statistics.median(times[root]):.1f} ms/step (rounds: "
            f"{', '.join(f'{1e3 * t:.1f}' for t in times[root])}); / first: median {statistics.median(ratios):.3f} "
            f"(range {min(ratios):.3f}-{max(ratios):.3f})"
        )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
