"""The training objectives on the digits by the held-out judge, at equal training time (issue #34).

    python benchmarks/objectives.py --json benchmarks/results/objectives.json

Each objective is the digits default (configs/digits.py: the same network, data, optimizer, 3,000 steps of 32) with
one change: ``eps`` (DDPM's eps prediction), ``v`` (the default itself), ``v+ztsnr`` (v with the chain rescaled to zero
terminal SNR), ``edm`` (configs/digits_edm.py) and ``flow`` (configs/digits_flow.py). The network and the step's
work are the same, so equal steps are equal training time; each run's wall time is recorded beside its figures to
show it. For each training seed in ``--seeds`` and each objective, the run trains into ``--workdir/OBJECTIVE/seedS``
(a finished run is reused), then ``--num_samples`` images are drawn each way and judged by
:class:`jaxdiff.metrics.HeldoutJudge` (benchmarks/digits_default.py): DDPM over all T, DDIM-50, DPM-Solver++ 2M at 20
steps, and the objective's own sampler (EDM's Heun on the rho grid, 10 steps = 19 calls; flow matching's Heun in t,
10 steps = 19 calls). With ``--posthoc`` the default's runs (trained with post-hoc EMA snapshots) are also sampled
with the EMA reconstructed at each sigma_rel of ``--sigma_rels`` (DDIM-50).

Results are kept in ``--json`` as they come (a restart skips what is there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
from digits_default import judge_way, parse_way, train  # beside this script
from sampler_quality import cpu_model

from jaxdiff import metrics, pipeline
from jaxdiff.metrics import features

QUIET = ["--config.evaluation.fid_every=0", "--config.training.eval_every=0", "--config.training.sample_every=0"]
OBJECTIVES = {
    "eps": ("configs/digits.py", ["--config.diffusion.prediction=eps"]),
    "v": ("configs/digits.py", []),
    "v+ztsnr": ("configs/digits.py", ["--config.diffusion.zero_terminal_snr=True"]),
    "edm": ("configs/digits_edm.py", []),
    "flow": ("configs/digits_flow.py", []),
}
COMMON_WAYS = "ddpm=ddpm:0,ddim-50=ddim:50,dpm++2m-20=dpm++2m:20"
OWN_WAYS = {"edm": "edm-10=edm:10", "flow": "flow-heun-10=flow-heun:10"}


def ways_of(objective: str, ways: str | None = None) -> dict:
    """The ways to judge an objective: ``ways`` (``name=sampler:steps,...``) or the common ones and its own."""
    text = ways or COMMON_WAYS + ("," + OWN_WAYS[objective] if objective in OWN_WAYS else "")
    return dict(parse_way(w) for w in text.split(","))


def posthoc_way(workdir: str, sigma_rel: float, num_samples: int, judge, seed: int) -> dict:
    """DDIM-50 samples of the EMA reconstructed at ``sigma_rel`` from the run's snapshots, judged."""
    pipe = pipeline.from_workdir(workdir, ema_length=sigma_rel)
    run = pipeline.make_sampler(pipe, "ddim", 50)
    start = time.perf_counter()
    images = pipeline.generate(pipe, run, num_samples, num_samples, seed=seed)
    result = judge(images, None)
    result["seconds"] = time.perf_counter() - start
    return result


def table(rows: list[dict]) -> str:
    """Markdown: per objective and way, the means (± sd over seeds)."""
    lines = [
        "| objective | way | FD to test | FD / floor | near-copies | score | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r["objective"], r["way"]) for r in rows)
    for objective, way in keys:
        mine = [r for r in rows if r["objective"] == objective and r["way"] == way]
        col = lambda k, mine=mine: [r[k] for r in mine]
        sd = lambda v: f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else ""
        fid = col("fid")
        ratio = statistics.mean(fid) / statistics.mean(col("floor"))
        lines.append(
            f"| {objective} | {way} | {statistics.mean(fid):.2f}{sd(fid)} | {ratio:.2f} | "
            f"{100 * statistics.mean(col('copy_share')):.1f}% | {statistics.mean(col('score')):.3f} | "
            f"{statistics.mean(col('train_seconds')):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/objectives")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--num_samples", type=int, default=297, help="as many as the held-out test digits")
    parser.add_argument("--sample_seed", type=int, default=0)
    parser.add_argument("--ways", default=None, help="name=sampler:steps,... instead of the common and own ways")
    parser.add_argument("--posthoc", action="store_true", help="also the post-hoc EMA sweep of the default (v)")
    parser.add_argument("--sigma_rels", default="0.02,0.035,0.05,0.07,0.10,0.15,0.2")
    parser.add_argument("--json", default="benchmarks/results/objectives.json")
    args = parser.parse_args()

    done = {"rows": [], "train_seconds": {}}
    if os.path.exists(args.json):
        with open(args.json) as f:
            done = json.load(f)
    have = {(r["objective"], r["seed"], r["way"]) for r in done["rows"]}

    def save():
        meta = dict(cpu=cpu_model(), devices=jax.device_count(), jax=jax.__version__, date=time.strftime("%Y-%m-%d"))
        meta.update(num_samples=args.num_samples, sample_seed=args.sample_seed, quiet_overrides=QUIET)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, **{k: v for k, v in done.items() if k != "meta"}}, f, indent=1, default=str)

    judge = None
    for seed in [int(s) for s in args.seeds.split(",")]:
        for objective in args.objectives.split(","):
            config, overrides = OBJECTIVES[objective]
            workdir = os.path.join(args.workdir, objective, f"seed{seed}")
            extra = ["--config.optim.posthoc_ema=0.05,0.10"] if args.posthoc and objective == "v" else []
            wall = train(config, workdir, seed, overrides + QUIET + extra)
            if wall is None:
                with open(os.path.join(workdir, "train_seconds.txt")) as f:
                    wall = float(f.read())
            done["train_seconds"][f"{objective}/seed{seed}"] = wall
            if judge is None:
                data = pipeline.from_workdir(workdir).data
                judge = metrics.heldout_judge(features.make_extractor("digits", data), data)
            todo = dict(ways_of(objective, args.ways))
            if args.posthoc and objective == "v":
                todo.update({f"posthoc-{s}": None for s in args.sigma_rels.split(",")})
            for name, way in todo.items():
                if (objective, seed, name) in have:
                    continue
                if way is None:
                    result = posthoc_way(workdir, float(name.split("-")[1]), args.num_samples, judge, args.sample_seed)
                else:
                    result = judge_way(workdir, way, args.num_samples, judge, args.sample_seed)
                row = dict(objective=objective, seed=seed, way=name, train_seconds=wall, **result)
                done["rows"].append(row)
                save()
                print(f"{objective:8s} seed {seed}  {name:14s} {judge.summary(result)} ({result['seconds']:.0f} s)")
    print(f"\n{args.num_samples} samples a way; {cpu_model()}\n")
    print(table(done["rows"]))


if __name__ == "__main__":
    main()
