"""DDPM's CIFAR-10 figures from a loaded model, in one command (issue #19).

    python benchmarks/reproduce_cifar10.py --checkpoint=diffusion_cifar10_model/model.ckpt-790000 \\
        --json=benchmarks/results/reproduce_cifar10.json --table=benchmarks/results/reproduce_cifar10.md

What it measures, each against the paper's figure:
1. FID and Inception Score of ``--num_samples`` (50,000) DDPM samples over all 1,000 steps (Ho et al. 2020, Table 1:
   FID 3.17, IS 9.46 with the EMA weights);
2. the variational bound over the CIFAR-10 test split in bits/dim (Table 2: NLL <= 3.75, the same bound);
3. DDIM's row, eta = 0 on the quadratic grid at ``--ddim_steps`` (DDIM paper, Table 1: FID 13.36 / 6.84 / 4.67 / 4.16
   at 10 / 20 / 50 / 100 steps).

The model is whatever ``sample.py --pretrained`` takes: Ho et al.'s TF1 checkpoint (EMA weights by default,
``--noema`` for the raw ones), the PyTorch port's EMA file, or a diffusers folder (``google/ddpm-cifar10-32`` holds the
raw weights). FID is against the CIFAR-10 training split's statistics under the Flax FID Inception, computed once and
cached, or against a precomputed ``--reference_stats`` .npz (``mu``, ``sigma``); the JSON says which.

On an accelerator the full run is hours of a GPU (50,000 x 1,000 forward passes); on a CPU it is a smoke run with a
handful of samples (``--num_samples=8 --bpd_images=2``), which the test suite runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import jax

from jaxdiff import evaluation, metrics, parallel, pipeline
from jaxdiff.data import DataConfig, load_split
from jaxdiff.metrics import features
from jaxdiff.xla_flags import use_fast_cpu_convolutions

use_fast_cpu_convolutions()  # before the first computation, as sample.py

PAPER = {"fid": 3.17, "inception_score": 9.46, "bits_per_dim": 3.75}  # DDPM, Tables 1 and 2 (EMA model)
DDIM_PAPER = {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16}  # DDIM, Table 1, CIFAR-10, eta = 0, quadratic grid


def judge(pipe, sampler, steps, spacing, num_samples, batch, extractor, reference, seed, log) -> dict:
    """``num_samples`` images of ``sampler`` at ``steps`` (None: all T), their FID and Inception Score."""
    mesh = parallel.make_mesh()
    run = pipeline.make_sampler(pipe, sampler, steps, spacing=spacing, mesh=mesh)
    start = time.perf_counter()
    drawn = pipeline.generate(pipe, run, num_samples, parallel.round_up_batch(min(batch, num_samples), mesh), seed)
    seconds = time.perf_counter() - start
    quality = metrics.sample_quality(extractor, drawn, reference)
    row = dict(sampler=sampler, steps=steps or pipe.num_timesteps, spacing=spacing, num_samples=num_samples)
    row.update(fid=quality["fid"], inception_score=quality.get("score"), sampling_seconds=seconds)
    score = "n/a (the Inception weights have no classifier)" if row["inception_score"] is None else None
    score = score or f"{row['inception_score']:.3f}"
    log(f"{sampler} {row['steps']} steps: FID {row['fid']:.3f}, IS {score} (sampled in {seconds:.0f} s)")
    return row


def reproduce(pipe, extractor, reference, test_images, args, log=print) -> dict:
    """The three measurements of the module docstring, as a JSON-ready dict."""
    result = {"model": pipe.source, "paper": PAPER, "ddim_paper": DDIM_PAPER}
    result["ddpm"] = judge(
        pipe, "ddpm", None, "even", args.num_samples, args.batch_size, extractor, reference, args.seed, log
    )
    result["ddim"] = [
        judge(pipe, "ddim", s, "quadratic", args.ddim_samples or args.num_samples, args.batch_size, extractor,
              reference, args.seed, log)
        for s in args.ddim_steps
    ]  # fmt: skip
    mesh = parallel.make_mesh()
    bound_fn = pipeline.make_bound_fn(pipe, mesh=mesh)
    batch = parallel.round_up_batch(min(args.bpd_batch, len(test_images)), mesh)
    start = time.perf_counter()
    bound = evaluation.bound_over_split(
        bound_fn, pipe.params, test_images, jax.random.key(args.seed), batch, None, mesh
    )
    result["bits_per_dim"] = bound.to_json(seconds=time.perf_counter() - start)
    result["bits_per_dim"].pop("per_timestep_bits_per_dim")
    log(f"bits/dim {bound.total:.4f} +- {bound.total_stderr:.4f} over {bound.num_examples} test images")
    return result


def _figure(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def table(result: dict) -> str:
    """The table of docs/results.md (CIFAR-10): each figure beside the paper's."""
    ddpm, bpd = result["ddpm"], result["bits_per_dim"]["bits_per_dim"]
    lines = [
        f"Model: {result['model']}; FID reference: {result['reference']}; {result['device']}.",
        "",
        "| | samples | measured | paper |",
        "|---|---|---|---|",
        f"| DDPM {ddpm['steps']} steps, FID | {ddpm['num_samples']} | {ddpm['fid']:.2f} | {PAPER['fid']} |",
        f"| DDPM {ddpm['steps']} steps, IS | {ddpm['num_samples']} | {_figure(ddpm['inception_score'])} | "
        f"{PAPER['inception_score']} |",
        f"| bits/dim (test split) | {result['bits_per_dim']['num_examples']} images | {bpd['total']:.3f} | "
        f"<= {PAPER['bits_per_dim']} |",
    ]
    for row in result["ddim"]:
        paper = DDIM_PAPER.get(row["steps"], "")
        lines.append(
            f"| DDIM {row['steps']} steps (quadratic), FID | {row['num_samples']} | {row['fid']:.2f} | {paper} |"
        )
    return "\n".join(lines) + "\n"


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", required=True, help="a TF1 checkpoint prefix, a PyTorch port file, or a diffusers folder"
    )
    p.add_argument("--noema", action="store_true", help="a TF1 checkpoint's raw weights instead of its EMA shadows")
    p.add_argument("--image_size", type=int, default=None, help="only for an unpublished architecture")
    p.add_argument("--num_samples", type=int, default=50_000)
    p.add_argument("--ddim_steps", default="10,20,50,100", help="comma-separated; '' for none")
    p.add_argument("--ddim_samples", type=int, default=None, help="samples per DDIM row (default: --num_samples)")
    p.add_argument("--batch_size", type=int, default=500, help="images per sampling batch")
    p.add_argument("--bpd_images", type=int, default=None, help="the test split's first N images (default: all)")
    p.add_argument("--bpd_batch", type=int, default=64)
    p.add_argument("--reference_stats", default=None, help="a precomputed .npz (mu, sigma) of the reference features")
    p.add_argument("--inception_weights", default=None, help="the FID Inception weights (default: ~/.cache/jaxdiff)")
    p.add_argument("--data_dir", default=None, help="the TFDS data directory of cifar10")
    p.add_argument("--download", action="store_true", help="allow fetching the Inception weights, CIFAR-10, a hub id")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/reproduce_cifar10.json")
    p.add_argument("--table", default="benchmarks/results/reproduce_cifar10.md")
    args = p.parse_args(argv)
    args.ddim_steps = [int(s) for s in args.ddim_steps.split(",") if s]
    return args


def main(argv=None) -> int:
    args = parse(argv)
    try:
        pipe = pipeline.from_checkpoint(args.checkpoint, args.download, not args.noema, args.image_size)
        data = DataConfig(dataset="cifar10", image_size=pipe.image_shape[0], data_dir=args.data_dir,
                          download=args.download)  # fmt: skip
        extractor = features.make_extractor("inception", data, args.inception_weights, args.download)
        if args.reference_stats:
            reference = metrics.load_precomputed_stats(args.reference_stats, extractor.dim)
            reference_name = args.reference_stats
        else:
            reference = metrics.reference_stats(extractor, dataclasses.replace(data, split="train"))
            reference_name = f"{extractor.name} statistics of the cifar10 train split ({reference.num} images)"
        test_images, _ = load_split(dataclasses.replace(data, split="test"))
        pipeline.check_images_fit(pipe, test_images, "cifar10 test")
    except (OSError, ValueError, RuntimeError) as e:
        print(f"reproduce_cifar10.py: {e}", file=sys.stderr)
        return 2
    test_images = test_images[: args.bpd_images]
    result = reproduce(pipe, extractor, reference, test_images, args)
    devices = jax.devices()
    result.update(
        reference=reference_name,
        device=f"{len(devices)} x {devices[0].device_kind}",
        jax=jax.__version__,
        date=time.strftime("%Y-%m-%d"),
        args={k: v for k, v in vars(args).items() if k not in ("json", "table")},
    )
    for path, text in ((args.json, json.dumps(result, indent=1)), (args.table, table(result))):
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(path).write_text(text)
    print(table(result), end="")
    print(f"Written to {args.json} and {args.table}.")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
