"""What XLA compiles the UNet's gradient (or the whole train step) to on this machine's CPU: the count of top-level
operations by kind, the transposes and copies among them and the bytes they write (issue #35).

    python benchmarks/hlo_ops.py                               # CIFAR-10 UNet forward+backward, batch 8
    python benchmarks/hlo_ops.py --network=digits --batch=32
    python benchmarks/hlo_ops.py --roots=/tmp/before,.        # two trees side by side
    python benchmarks/hlo_ops.py --dump=/tmp/grad.hlo          # also write the optimised HLO

Counts the instructions of the compiled program's entry computation (after XLA's fusion and layout passes, with the
CPU flags ``train.py`` sets), by opcode, and fusions by their name (``transpose_copy_fusion``, ``ynn_fusion``,
...): an operation on the CPU is one of these. "Layout copies" are the fusions and instructions whose name or opcode
is a transpose or a copy; their bytes are the sizes of their outputs. Nothing is timed: compare with
``versus.py`` and ``profile_ops.py`` for time. Each root is compiled in its own process.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import pathlib
import re
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent

CHILD = r"""
import json, sys
root, network, batch, dtype, dump = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
sys.path[:0] = [root + "/benchmarks", root]
from jaxdiff.xla_flags import use_fast_cpu_convolutions
use_fast_cpu_convolutions()
import dataclasses
import versus
cfg = versus._cifar10() if network == "cifar10" else versus._digits()
cfg = dataclasses.replace(cfg, dtype=dtype, dropout=0.0)
import jax, jax.numpy as jnp, numpy as np
from jaxdiff.models import UNet, init_params
params = init_params(cfg, jax.random.key(0))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.in_channels)), jnp.float32)
t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
net = UNet(cfg)
grad = jax.jit(jax.grad(lambda p: jnp.mean((net.apply(p, x, t) - x) ** 2)))
text = grad.lower(params).compile().as_text()
if dump:
    open(dump, "w").write(text)
print("HLO " + json.dumps(text[text.index("\nENTRY"):]))
"""

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8, "s64": 8, "u8": 1}
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\(")


def count(entry: str) -> dict:
    """Operation counts of an entry computation's text; the transposes and copies and their output bytes."""
    kinds, layout = collections.Counter(), collections.Counter()
    layout_bytes = 0
    for line in entry.splitlines():
        m = INSTRUCTION.match(line)
        if not m:
            continue
        name, dtype, shape, opcode = m.groups()
        if opcode in ("parameter", "constant", "bitcast", "get-tuple-element", "tuple"):
            continue  # no work
        kind = re.sub(r"\.\d+$", "", name) if opcode == "fusion" else opcode
        kinds[kind] += 1
        if "transpose" in kind or "copy" in kind:
            layout[kind] += 1
            size = math.prod(int(s) for s in shape.split(",") if s)
            layout_bytes += size * DTYPE_BYTES.get(dtype, 4)
    return {
        "operations": sum(kinds.values()),
        "by_kind": dict(kinds.most_common()),
        "layout_copies": sum(layout.values()),
        "layout_copies_by_kind": dict(layout.most_common()),
        "layout_copy_megabytes": layout_bytes / 2**20,
        "convolutions": kinds["convolution"],
    }


def compile_in(root: str, network: str, batch: int, dtype: str, dump: str = "") -> dict:
    cmd = [sys.executable, "-c", CHILD, str(pathlib.Path(root).resolve()), network, str(batch), dtype, dump]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        raise SystemExit(f"compiling in {root} failed:\n{done.stderr[-3000:]}")
    return count(json.loads(done.stdout.split("HLO ", 1)[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roots", default=".", help="comma-separated jaxdiff trees")
    parser.add_argument("--network", choices=("cifar10", "digits"), default="cifar10")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--dump", default="", help="write the (last root's) optimised HLO here")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = {"network": args.network, "batch": args.batch, "dtype": args.dtype, "roots": {}}
    for root in args.roots.split(","):
        r = compile_in(root, args.network, args.batch, args.dtype, args.dump)
        results["roots"][root] = r
        print(
            f"{root}: {r['operations']} operations, {r['convolutions']} convolutions, {r['layout_copies']} transposes/"
            f"copies writing {r['layout_copy_megabytes']:.0f} MiB",
            flush=True,
        )
        for kind, n in list(r["by_kind"].items())[: args.top]:
            print(f"  {n:5d}  {kind}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
