"""The UNet's gradient with each GroupNorm, compiled side by side in one process and called in turn (issue #35).

    python benchmarks/groupnorm_speed.py --network=digits --batch=32 --rounds=8
    python benchmarks/groupnorm_speed.py --network=cifar10 --batch=8 --rounds=4 --json results.json
    python benchmarks/groupnorm_speed.py --variants=flax_shifted,fused,before --before=/tmp/before

The variants (``--variants``; the first is the baseline of the ratios):

* ``flax_shifted``: the UNet's GroupNorm before issue #35, flax's one-pass GroupNorm of x - k and autodiff
  (``tests/test_norm.py``'s ``FlaxShiftedGroupNorm``);
* ``fused``: the UNet's GroupNorm now (:mod:`jaxdiff.models.norm`: the same statistics, the output as one
  multiply-add, the derivative in closed form as a custom JVP);
* ``autodiff``: the same forward as ``fused`` with JAX's autodiff for the gradient instead of the closed form;
* ``identity``: no normalisation at all (``x * scale + bias``), the floor of what any GroupNorm could save;
* ``before``: the ``group_norm`` of another jaxdiff tree (``--before=TREE``, a worktree of an older commit), e.g.
  ``git worktree add /tmp/before a8dd2b3`` for the custom-VJP GroupNorm that forward mode could not differentiate.

One process, one framework: every variant's gradient of a squared error is compiled first, then each round calls
every variant ``--repeats`` times (median) in turn, and the ratio to the baseline is taken round by round. Calling
the variants alternately in one process removes most of the drift between processes on this shared machine (the
digits figures agree to 2-3% round to round, against ~20% across processes). Also prints XLA's temporary memory and
the operation count of each compiled gradient.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT), str(ROOT / "tests")]

from jaxdiff.xla_flags import use_fast_cpu_convolutions  # noqa: E402

use_fast_cpu_convolutions()

VARIANTS = ("flax_shifted", "fused", "autodiff", "identity", "before")
_ORIGINAL = {}  # jaxdiff.models.norm.group_norm as shipped, kept at the first patch


def _group_norm_of(tree: str):
    """``jaxdiff/models/norm.py``'s ``group_norm`` from another jaxdiff tree (its imports from this one)."""
    import importlib.util

    path = pathlib.Path(tree) / "jaxdiff" / "models" / "norm.py"
    if not path.is_file():
        raise SystemExit(f"--before={tree} has no {path.relative_to(tree)}: pass a jaxdiff tree (git worktree add).")
    spec = importlib.util.spec_from_file_location("_before_norm", path)
    module = sys.modules["_before_norm"] = importlib.util.module_from_spec(spec)  # (flax's dataclasses look it up)
    spec.loader.exec_module(module)
    return module.group_norm


def patch(variant: str, before: str | None = None) -> None:
    """Make the UNet build its GroupNorms as ``variant`` (``before``: the tree of the ``before`` variant)."""
    import jax.numpy as jnp

    from jaxdiff.models import norm, unet

    unet.GroupNorm, norm.group_norm = norm.GroupNorm, _ORIGINAL.setdefault("group_norm", norm.group_norm)
    if variant == "flax_shifted":
        from test_norm import FlaxShiftedGroupNorm

        unet.GroupNorm = FlaxShiftedGroupNorm
    elif variant == "autodiff":
        norm.group_norm = lambda x, s, b, g, eps=1e-6, dtype=None: norm._group_norm.fun(
            g, float(eps), jnp.dtype(dtype or x.dtype), x, s, b
        )
    elif variant == "identity":
        norm.group_norm = lambda x, s, b, g, eps=1e-6, dtype=None: (x * s + b).astype(dtype or x.dtype)
    elif variant == "before":
        norm.group_norm = _group_norm_of(before)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=("digits", "cifar10"), default="digits")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS[:4]), help=f"comma-separated, of {VARIANTS}")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=None, help="calls per variant per round (20 digits, 3 cifar)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--before", default=None, help="another jaxdiff tree, for the 'before' variant")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"Unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}.")
    if ("before" in variants) != bool(args.before):
        raise SystemExit("The 'before' variant and --before=TREE go together: pass both or neither.")
    repeats = args.repeats or (20 if args.network == "digits" else 3)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from hlo_ops import count
    from versus import _cifar10, _digits, machine

    from jaxdiff.models import UNet, init_params

    cfg = dataclasses.replace(_cifar10() if args.network == "cifar10" else _digits(), dropout=0.0)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, cfg.image_size, cfg.image_size, cfg.in_channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, args.batch), jnp.int32)
    compiled, results = {}, {"machine": machine(), "network": args.network, "batch": args.batch, "variants": {}}
    if args.before:
        results["before"] = args.before
    for variant in variants:
        patch(variant, args.before)
        net = UNet(cfg)
        grad = jax.jit(jax.grad(lambda p, net=net: jnp.mean((net.apply(p, x, t) - x) ** 2)))
        compiled[variant] = grad.lower(params).compile()
        text = compiled[variant].as_text()
        results["variants"][variant] = {
            "temp_mib": compiled[variant].memory_analysis().temp_size_in_bytes / 2**20,
            "operations": count(text[text.index("\nENTRY") :])["operations"],
            "seconds": [],
        }
    patch("fused")

    def timed(fn) -> float:
        jax.block_until_ready(fn(params))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(params))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    for i in range(args.rounds):
        for variant in variants:
            results["variants"][variant]["seconds"].append(timed(compiled[variant]))
        print(
            f"round {i + 1}: "
            + ", ".join(f"{v} {results['variants'][v]['seconds'][-1] * 1e3:.1f} ms" for v in variants),
            flush=True,
        )
    base = results["variants"][variants[0]]["seconds"]
    for variant in variants:
        r = results["variants"][variant]
        ratios = [s / b for s, b in zip(r["seconds"], base, strict=True)]
        r["over_baseline"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        q = r["over_baseline"]
        print(
            f"{variant}: {statistics.median(r['seconds']) * 1e3:.1f} ms, {q['median']:.3f}x ({q['min']:.3f}-"
            f"{q['max']:.3f}); XLA temp {r['temp_mib']:.1f} MiB, {r['operations']} operations"
        )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
