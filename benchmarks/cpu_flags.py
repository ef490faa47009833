"""XLA's CPU flags, measured (issue #35): JAX's side of a ``versus.py`` workload under several ``XLA_FLAGS``, each in
its own process, alternating.

    python benchmarks/cpu_flags.py --workloads=fwd_bwd_cifar10,train_digits_32 --pairs=3 \\
        --flags='ours=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution;xla=' \\
        --json benchmarks/results/cpu_flags.json

``--flags`` is ``name=XLA_FLAGS`` entries separated by ``;``; the first is the reference. In each round every entry
runs once, in the order given (A B C A B C ...); each process builds the workload alone, compiles it, times
``--repeats`` runs and reports their median. The ratio of an entry to the reference is taken round by round and
reported as the median and range over the rounds. A flag that the installed jaxlib does not know aborts its process,
and the entry is reported as failed with XLA's message, not timed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from versus import WORKLOADS, machine, parse_workloads, run_worker  # noqa: E402


def parse_flags(text: str) -> dict[str, str]:
    """``"a=--f=1 --g;b="`` -> ``{"a": "--f=1 --g", "b": ""}``."""
    entries = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, _, flags = item.partition("=")
        if not name or name in entries:
            raise SystemExit(f"--flags entry {item!r}: give each entry a new name, as name=XLA_FLAGS.")
        entries[name] = flags.strip()
    if len(entries) < 2:
        raise SystemExit("--flags needs at least two entries (the first is the reference).")
    return entries


def sweep(workload: str, entries: dict[str, str], rounds: int, repeats: int, log=print) -> dict:
    """``rounds`` rounds of one process per entry; each entry's time over the first entry's, round by round."""
    runs: dict[str, list] = {name: [] for name in entries}
    failed: dict[str, str] = {}
    for i in range(rounds):
        for name, flags in entries.items():
            if name in failed:
                continue
            try:
                runs[name].append(run_worker(workload, "jax", repeats, xla_flags=flags)["seconds"])
            except SystemExit as error:
                failed[name] = str(error)[-400:]
                log(f"  {name}: failed ({failed[name].strip().splitlines()[-1]})")
        log(f"  round {i + 1}: " + ", ".join(f"{n} {t[-1]:.4f} s" for n, t in runs.items() if n not in failed))
    reference = next(iter(entries))
    if reference in failed:
        raise SystemExit(f"The reference entry {reference!r} failed: {failed[reference]}")
    result = {"workload": workload, "what": WORKLOADS[workload].what, "entries": {}}
    for name, times in runs.items():
        if name in failed:
            result["entries"][name] = {"xla_flags": entries[name], "failed": failed[name]}
            continue
        ratios = [t / r for t, r in zip(times, runs[reference], strict=True)]
        result["entries"][name] = {
            "xla_flags": entries[name],
            "seconds": statistics.median(times),
            "over_reference": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "rounds": times,
        }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="fwd_bwd_cifar10,train_digits_32")
    parser.add_argument("--flags", required=True, help="name=XLA_FLAGS entries separated by ';', the reference first")
    parser.add_argument("--pairs", type=int, default=3, help="rounds: one process per entry in each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    entries = parse_flags(args.flags)
    results = {"machine": machine(), "rounds": args.pairs, "repeats": args.repeats, "workloads": []}
    m = results["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, {' '.join(m['isa'])}; jax {m['versions']['jax']}", flush=True)
    for name in parse_workloads(args.workloads):
        print(f"{name}: {WORKLOADS[name].what}", flush=True)
        r = sweep(name, entries, args.pairs, args.repeats, log=lambda s: print(s, flush=True))
        results["workloads"].append(r)
        for entry, e in r["entries"].items():
            if "failed" in e:
                print(f"  => {entry}: failed", flush=True)
            else:
                q = e["over_reference"]
                print(
                    f"  => {entry}: {e['seconds']:.4f} s, {q['median']:.3f}x ({q['min']:.3f}-{q['max']:.3f})",
                    flush=True,
                )
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
