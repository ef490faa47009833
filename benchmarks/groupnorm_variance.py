"""The train step's time with each GroupNorm variance, each in its own process, alternating: what a safe variance costs.

    python benchmarks/groupnorm_variance.py --pairs=3 --json benchmarks/results/groupnorm_variance.json

The variants (``--variants``, the first is the baseline of the ratios):

* ``fast``: flax's default, one pass, Var = E[x^2] - E[x]^2 (``use_fast_variance=True``);
* ``two_pass``: flax's Var = E[(x - E[x])^2] (``use_fast_variance=False``), as Ho's code and PyTorch;
* ``shifted``: the UNet's own GroupNorm (``jaxdiff.models.unet._group_norm``, :mod:`jaxdiff.models.norm` since issue
  #35): one pass on x - k, k per (example, group) the mean of its first row, a shifted one-pass variance.

Each process patches ``jaxdiff.models.unet._group_norm`` (nothing else changes), then builds, compiles and times the
train step of a config as ``benchmarks/step_time.py`` does (its child program). The configs (``--configs``,
``name:batch``) are configs/digits.py at its batch of 32 and configs/cifar10.py at a batch of 8. The variants run in
turn (A B A B ...) and each is divided by the baseline of its own round: the machine is shared and noisy, so the
ratios say more than the times.
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

VARIANTS = ("fast", "two_pass", "shifted")

# Runs before step_time's child program: takes the variant off argv (the child reads argv[1:7]) and patches the UNet.
PATCH = r"""
import sys
variant = sys.argv.pop(7)
sys.path.insert(0, sys.argv[1])
from jaxdiff.xla_flags import use_fast_cpu_convolutions
use_fast_cpu_convolutions()  # as the child program does, before anything could start the backend
import flax.linen as nn
from jaxdiff.models import unet

def plain_group_norm(cfg, name):
    return nn.GroupNorm(
        num_groups=cfg.num_groups,
        epsilon=cfg.norm_eps,
        dtype=cfg.compute_dtype,
        use_fast_variance=variant == "fast",
        scale_init=unet.ONES,
        bias_init=unet.ZEROS,
        name=name,
    )

if variant != "shifted":
    unet._group_norm = plain_group_norm
"""


def time_variant(variant: str, config: str, batch: int, args) -> float:
    """Seconds per train step of ``config`` at ``batch`` with the ``variant`` GroupNorm, in a fresh process."""
    import step_time

    overrides = json.dumps({"training.batch_size": batch})
    argv = [str(ROOT), str(ROOT / "configs" / f"{config}.py"), overrides, str(args.steps), str(args.warmup)]
    command = [sys.executable, "-c", PATCH + step_time.CHILD, *argv, str(args.repeats), variant]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds_per_step"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="fast,two_pass,shifted", help=f"comma-separated, of {VARIANTS}")
    parser.add_argument("--configs", default="digits:32,cifar10:8", help="comma-separated config:batch")
    parser.add_argument("--pairs", type=int, default=3, help="rounds of every variant")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        parser.error(f"unknown variants {unknown}: choose among {', '.join(VARIANTS)}")
    from versus import machine  # the CPU model (lscpu's "Model name"), cores, ISA flags, versions (imports no jax)

    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores; {args.pairs} rounds of {', '.join(variants)}")
    result = {"machine": info, "steps": args.steps, "repeats": args.repeats, "configs": {}}
    for item in args.configs.split(","):
        config, batch = item.split(":")
        times = {v: [] for v in variants}
        for _ in range(args.pairs):
            for variant in variants:
                times[variant].append(time_variant(variant, config, int(batch), args))
        rows = result["configs"][f"{config} (batch {batch})"] = {}
        for variant in variants:
            ratios = [t / b for t, b in zip(times[variant], times[variants[0]], strict=True)]
            rows[variant] = {"seconds_per_step": times[variant], "ratio_to_first": ratios}
            print(
                f"  {config} batch {batch}, {variant}: {1e3 * statistics.median(times[variant]):.1f} ms/step (rounds: "
                f"{', '.join(f'{1e3 * t:.1f}' for t in times[variant])}); / {variants[0]}: median "
                f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})",
                flush=True,
            )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
