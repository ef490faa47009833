"""The two input paths on a dataset shaped like LSUN: JPEG images of varying sizes, stored as ArrayRecord.

    python benchmarks/input_speed.py --json benchmarks/results/input_speed.json

A synthetic dataset (``--num_images`` smooth colour fields with noise, short side 256..320, long side up to 1.5x,
JPEG quality 90; built once under ``--data_dir``) is read at ``--image_size`` by each reader in its own process:

- ``memory``: the time to read the whole split before the first batch, then batches/s from memory;
- ``stream``: the first batch's time, then batches/s with ``--threads`` reading (decode, crop, resize);

with each process's peak resident memory (``ru_maxrss``). The figures hold for the CPU they were taken on (recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

DATASET = "jaxdiff_bench_scenes"


def register_dataset(num_images: int):
    """The synthetic TFDS builder (registered on definition, so defined on demand)."""
    import tensorflow_datasets as tfds

    class Scenes(tfds.core.GeneratorBasedBuilder):
        name = DATASET
        VERSION = tfds.core.Version(f"1.0.{num_images}")

        def _info(self):
            image = tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"image": image}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(0)
            for i in range(num_images):
                short = int(rng.integers(256, 321))
                long = int(short * rng.uniform(1.0, 1.5))
                h, w = (short, long) if i % 2 else (long, short)
                yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
                base = np.stack([np.sin(6 * xx + c) + np.cos(4 * yy - c) for c in rng.uniform(0, 6, 3)], -1)
                image = 127.5 + 60 * base + rng.normal(0, 12, (h, w, 3))
                yield i, {"image": np.clip(image, 0, 255).astype(np.uint8)}

    return Scenes


def worker(args) -> dict:
    """One reader's figures, in this process."""
    from jaxdiff.data import Batches, DataConfig, Streamed, open_split

    register_dataset(args.num_images)
    config = DataConfig(dataset=DATASET, image_size=args.image_size, data_dir=args.data_dir, reader=args.reader)
    began = time.perf_counter()
    split = open_split(config)
    if args.reader == "stream":
        split = Streamed(
            split.source,
            image_key="image",
            label_key=None,
            image_size=args.image_size,
            channels=3,
            threads=args.threads,
        )
    batches = Batches(split, global_batch=args.batch, seed=0, random_flip=True)
    batches.at(0)
    first = time.perf_counter() - began
    steps = args.steps
    began = time.perf_counter()
    for step in range(1, steps + 1):
        batches.at(step)
    seconds = time.perf_counter() - began
    return {
        "reader": args.reader,
        "threads": args.threads if args.reader == "stream" else None,
        "described": split.describe(),
        "first_batch_s": first,
        "batches_per_s": steps / seconds,
        "images_per_s": steps * args.batch / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 16])
    parser.add_argument("--data_dir", default="/tmp/jaxdiff-bench-data")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reader", default="memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        print(json.dumps(worker(args)))
        return

    import tensorflow_datasets as tfds

    builder = register_dataset(args.num_images)(data_dir=args.data_dir, file_format="array_record")
    if not builder.is_prepared():
        print(f"Building {args.num_images} synthetic JPEG images in {args.data_dir} (once)...", flush=True)
        builder.download_and_prepare()
    del tfds
    runs = [("memory", 1)] + [("stream", t) for t in args.threads]
    results = []
    for reader, threads in runs:
        command = [sys.executable, __file__, "--worker", f"--reader={reader}", f"--threads={threads}"]
        command += [f"--{k}={getattr(args, k)}" for k in ("num_images", "image_size", "batch", "steps", "data_dir")]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ})
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(result)
        print(
            f"{reader:6s} threads={threads!s:4s} first batch {result['first_batch_s']:6.2f} s  "
            f"{result['images_per_s']:8.0f} images/s  peak RSS {result['peak_rss_mb']:6.0f} MB  "
            f"({result['described']})",
            flush=True,
        )
    report = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "num_images": args.num_images,
        "image_size": args.image_size,
        "batch": args.batch,
        "results": results,
    }
    print(f"CPU: {report['cpu']}, {report['cores']} cores")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
