"""Where the CIFAR-10 UNet's gradient spends its time, by kind of XLA operation (issue #18).

    python benchmarks/profile_ops.py                    # forward+backward at batch 8, the CPU flag as train.py sets it
    python benchmarks/profile_ops.py --forward          # the forward pass alone

Traces ``--steps`` calls of the compiled gradient of a squared error with ``jax.profiler`` (a Perfetto trace), then
sums the trace's events by operation kind (the op name without its number: ``ynn_fusion``, ``transpose_copy_fusion``,
``convolution``, ...): milliseconds per step and share of the traced op time, and how much of the step's wall time
the traced ops cover on each thread (the rest runs inside the libraries' own threads, which the trace does not
break down).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from jaxdiff.xla_flags import use_fast_cpu_convolutions  # noqa: E402

use_fast_cpu_convolutions()

import jax  # noqa: E402
from versus import jax_network  # noqa: E402

from jaxdiff.models import UNetConfig  # noqa: E402

OP_NAME = re.compile(r"^[a-z_\-]+(\.\d+)?$")  # XLA's instruction names: fusion.12, convolution, ...


def op_times(trace_dir: pathlib.Path) -> tuple[collections.Counter, dict]:
    """Microseconds by op kind over the whole trace, and the traced op time per thread."""
    path = next(trace_dir.glob("**/*.trace.json.gz"))
    trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_kind, by_thread = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X" and "dur" in event and OP_NAME.match(event["name"]):
            by_kind[re.sub(r"\.\d+$", "", event["name"])] += event["dur"]
            by_thread[event["tid"]] += event["dur"]
    return by_kind, dict(by_thread)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forward", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    run, _ = jax_network(UNetConfig(dropout=0.0), args.batch, with_grad=not args.forward)
    run()
    run()  # warm
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(args.steps):
                run()
        wall = (time.perf_counter() - start) / args.steps  # includes the profiler's own stop (an upper bound)
        by_kind, by_thread = op_times(pathlib.Path(tmp))
    total = sum(by_kind.values())
    print(f"{'forward' if args.forward else 'forward+backward'}, batch {args.batch}: <= {wall * 1e3:.0f} ms a step")
    for kind, micros in by_kind.most_common(args.top):
        print(f"  {micros / args.steps / 1e3:8.1f} ms  {100 * micros / total:5.1f}%  {kind}")
    busy = sorted((v / args.steps / 1e3 for v in by_thread.values()), reverse=True)
    print(f"  traced op time per thread: {', '.join(f'{b:.0f} ms' for b in busy[:4])} a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
