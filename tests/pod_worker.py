"""One process of a pod on this machine (or a lone process): runs the tasks of a JSON file in order, as train.py and
sample.py would, so that the tests compare 2 processes with 1.

Usage: python tests/pod_worker.py TASKS.json [--devices N] [--process I --processes P --port PORT]

Each task is {"kind": ..., ...}:
  - "train": {"config": overrides of configs/tiny.py as {"section.key": value}, "workdir": ...,
    "unreadable": [process, step] (optional: that process fails to read that checkpoint, as a transient I/O error
    would)} -> jaxdiff.experiment.train_and_evaluate;
  - "sample": {"request": SampleRequest's fields} -> jaxdiff.commands.sample (must return 0);
  - "draw": {"workdir", "sampler", "steps", "num_samples", "batch_size", "seed", "out"} -> the sampler's images in
    [-1, 1] before they become uint8, through the batch runner, saved by process 0 to "out" (.npy).
"""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("tasks")
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--process", type=int, default=0)
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--port", type=int, default=0)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

if args.processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.processes, args.process)

from jaxdiff.configs import tiny  # noqa: E402

from jaxdiff import checkpoints, commands, experiment, parallel, pipeline  # noqa: E402


def train(task: dict) -> None:
    config = tiny.get_config()
    for name, value in task["config"].items():
        section, key = name.split(".")
        setattr(config[section], key, tuple(value) if isinstance(value, list) else value)
    if task.get("unreadable") is not None:
        process, step = task["unreadable"]
        if jax.process_index() == process:
            original = checkpoints._restore_state

            def flaky(mngr, at, target):
                if at == step:
                    raise OSError(f"injected: the checkpoint at step {step} cannot be read on process {process}")
                return original(mngr, at, target)

            checkpoints._restore_state = flaky
    experiment.train_and_evaluate(config, task["workdir"])


def draw(task: dict) -> None:
    pipe = pipeline.from_workdir(task["workdir"])
    mesh = parallel.make_mesh()
    run = pipeline.make_sampler(pipe, task["sampler"], task["steps"], mesh=mesh)
    params = parallel.replicate(pipe.params, mesh)
    labels = pipeline.labels_for(task["num_samples"], pipe.num_classes, None)
    images = parallel.map_batches(
        lambda batch: run(params, batch["key"], batch.get("label")),
        {"label": labels},
        task["num_samples"],
        task["batch_size"],
        mesh,
        key=jax.random.key(task["seed"]),
    )
    if jax.process_index() == 0:
        np.save(task["out"], images)


with open(args.tasks) as f:
    tasks = json.load(f)
for task in tasks:
    if task["kind"] == "train":
        train(task)
    elif task["kind"] == "sample":
        assert commands.sample(commands.SampleRequest(**task["request"])) == 0, task
    elif task["kind"] == "draw":
        draw(task)
    else:
        raise ValueError(f"Unknown task {task['kind']!r}.")
