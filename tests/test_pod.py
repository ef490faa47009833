"""Many hosts on one machine: two processes (``jax.distributed`` on 127.0.0.1) against one, for a whole run with every
periodic action, for sample.py, and for what each device computes.

Every figure that runs over data (bits/dim, FID, sample grids, sample.py's images and evaluations) must be the same
on 2 processes of 1 device each as on 1 process of 2 devices (the same SPMD program; a sum of two partial gradients is
the same in either order), and a seed's images the same at any batch size, device count or process count.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdiff import logs, pipeline
from jaxdiff.models import UNetConfig
from tests.helpers import NET, ROOT, fake_run, free_port

# configs/tiny.py with every periodic action every 2 steps. No learning-rate decay: its schedule would depend on
# num_steps, which the resumed run changes.
EVERY_ACTION = {
    "training.log_every": 2,
    "training.eval_every": 2,
    "training.sample_every": 2,
    "training.checkpoint_every": 2,
    "evaluation.fid_every": 2,
    "evaluation.fid_num_samples": 20,
    "evaluation.fid_batch_size": 8,
    "evaluation.steps": 5,
    "optim.decay": "none",
}
BOUND_TERMS = ("total", "prior", "denoising", "reconstruction")


def start(argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen]) -> list[str]:
    """Each process's output, once all have exited 0."""
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    return outs


def on_devices(env: dict, devices: int) -> dict:
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def train_py(workdir, data_dir, num_steps: int, process: int | None = None, port: int | None = None) -> list[str]:
    argv = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}", f"--workdir={workdir}"]
    argv += [f"--config.{k}={v}" for k, v in {**EVERY_ACTION, "training.num_steps": num_steps}.items()]
    argv.append(f"--config.data.data_dir={data_dir}")
    if process is not None:
        argv += [f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={process}"]
    return argv


def pod_worker(tmp_path, name: str, tasks: list[dict], env: dict, devices: int = 1, processes: int = 1):
    """tests/pod_worker.py on ``processes`` processes of ``devices`` devices each, started (not awaited)."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(tasks))
    argv = [sys.executable, str(ROOT / "tests" / "pod_worker.py"), str(path), "--devices", str(devices)]
    if processes == 1:
        return [start(argv, env)]
    port = free_port()
    return [
        start([*argv, "--process", str(i), "--processes", str(processes), "--port", str(port)], env)
        for i in range(processes)
    ]


def test_the_batch_runner_feeds_each_row_once_pads_the_last_batch_and_keys_rows_by_their_index():
    """On one process: 10 items in batches of 4 (the last padded with the last item, its results dropped), the read
    function asked for each batch's item numbers, and row i's key ``fold_in(key, i)`` whatever the batch size."""
    import jax.numpy as jnp

    from jaxdiff import parallel

    mesh = parallel.make_mesh(jax.devices()[:1])  # batches of 3 below
    asked = []

    def read(index):
        asked.append(index.tolist())
        return {"value": index.astype(np.float32) * 10}

    def fn(batch):
        noise = jax.vmap(lambda k: jax.random.normal(k, ()))(batch["key"])
        return {"value": batch["value"] + 1, "index": batch["index"], "noise": noise}

    key = jax.random.key(3)
    out = parallel.map_batches(fn, read, 10, 4, mesh, key=key)
    assert asked == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]
    np.testing.assert_array_equal(out["index"], np.arange(10))
    np.testing.assert_array_equal(out["value"], np.arange(10) * 10 + 1)
    expected = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), ()))(jnp.arange(10))
    np.testing.assert_array_equal(out["noise"], expected)
    given = {"value": np.arange(10, dtype=np.float32) * 10, "unused": None}
    again = parallel.map_batches(fn, given, 10, 3, mesh, key=key)
    np.testing.assert_array_equal(again["noise"], out["noise"])  # batches of 3: the same keys
    assert parallel.process_rows(mesh, 4) == slice(0, 4)
    with pytest.raises(ValueError, match="No items"):
        parallel.map_batches(fn, read, 0, 4, mesh)


def grids(workdir) -> dict[str, np.ndarray]:
    from PIL import Image

    return {p.name: np.asarray(Image.open(p)) for p in sorted(workdir.glob("samples_*.png"))}


def test_a_two_process_run_with_every_action_equals_one_process_and_resumes_where_both_hosts_can_read(
    tmp_path, subprocess_env
):
    """train.py on 2 processes (tiny config, digits; bits/dim, FID, grids and checkpoints every 2 steps) to step 6,
    then resumed to 8 with the step-6 checkpoint unreadable on process 1 alone (injected): both hosts resume at
    step 4, and the run's logged bits/dim and FID, its grids and its parameters equal those of 1 process (2 devices)
    that went to 8 at once."""
    pod, one = tmp_path / "pod", tmp_path / "one"
    env = lambda name: {**subprocess_env, "JAXDIFF_CACHE": str(tmp_path / f"cache_{name}")}  # FID statistics anew
    port = free_port()
    first = [start(train_py(pod, tmp_path / "data_pod", 6, i, port), env("pod")) for i in range(2)]
    reference = start(train_py(one, tmp_path / "data_one", 8), on_devices(env("one"), 2))
    finish(first)
    assert sorted(p.name for p in (pod / "checkpoints").iterdir()) == ["2", "4", "6"]
    resume = {**EVERY_ACTION, "training.num_steps": 8, "data.data_dir": str(tmp_path / "data_pod")}
    task = {"kind": "train", "config": resume, "workdir": str(pod), "unreadable": [1, 6]}
    main, other = finish(pod_worker(tmp_path, "resume", [task], env("pod"), processes=2))
    reference_out = finish([reference])[0]

    assert "injected: the checkpoint at step 6 cannot be read on process 1" in other
    assert "Cannot read the checkpoint at step 6 (it cannot be read on process(es) [1])" in main
    assert "Resuming from the checkpoint at step 4" in main
    assert (pod / "checkpoints_unreadable" / "6").is_dir()  # set aside by process 0, where it was readable
    assert "FID" in reference_out and "eval bits/dim" in reference_out

    logged, expected = logs.read_metrics(pod), logs.read_metrics(one)
    names = [f"eval/{term}_bpd" for term in BOUND_TERMS] + ["eval/fid", "eval/score"]
    for name in names:
        assert expected[name][0].tolist() == [2, 4, 6, 8], name
        np.testing.assert_array_equal(logged[name][0], expected[name][0], err_msg=name)
        np.testing.assert_allclose(logged[name][1], expected[name][1], rtol=1e-5, atol=1e-7, err_msg=name)
    pictures = grids(pod)
    assert list(pictures) == [f"samples_{s:07d}.png" for s in (2, 4, 6, 8)]
    for name, picture in grids(one).items():
        np.testing.assert_array_equal(pictures[name], picture, err_msg=name)
    # The parameters agree to float rounding: Adam turns the rounding of a gradient that is ~0 (a bias the loss
    # barely sees) into steps of ~lr on that parameter, so ~1e-7 differences appear there; a step more or less, or
    # another batch, moves every parameter by ~1e-3.
    ours, theirs = pipeline.from_workdir(pod), pipeline.from_workdir(one)
    for a, b in zip(jax.tree_util.tree_leaves(ours.params), jax.tree_util.tree_leaves(theirs.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


CONDITIONAL = UNetConfig(**{**NET.__dict__, "num_classes": 10})


def requests(tmp_path, name: str, data_dir) -> list[dict]:
    """sample.py's requests of the 2-process test, their outputs under ``tmp_path/name``."""
    out = lambda what: str(tmp_path / name / what)
    unconditional, conditional = str(tmp_path / "uncond"), str(tmp_path / "cond")
    draws = [
        dict(workdir=unconditional, num_samples=6, batch_size=4, sampler="ddpm", out=out("ddpm")),
        dict(workdir=unconditional, num_samples=6, batch_size=4, sampler="ddim", steps=5, out=out("ddim")),
        dict(workdir=conditional, num_samples=6, batch_size=4, sampler="ddpm", guidance=2.0, out=out("ddpm_cond")),
        dict(workdir=conditional, num_samples=6, sampler="ddim", steps=5, guidance=2.0, seed=3, out=out("ddim_cond")),
    ]
    evals = [
        dict(workdir=unconditional, eval="bpd", split="test[:6]", batch_size=4, data_dir=data_dir, out=out("bpd")),
        dict(workdir=conditional, eval="bpd", split="test[:6]", batch_size=4, data_dir=data_dir, out=out("bpd_cond")),
        dict(
            workdir=unconditional,
            eval="ode_bpd",
            eval_images=4,
            divergence="hutchinson",
            tolerance=1e-3,
            data_dir=data_dir,
            out=out("ode"),
        ),
        dict(
            workdir=conditional,
            eval="fid",
            num_samples=12,
            batch_size=8,
            sampler="ddim",
            steps=3,
            data_dir=data_dir,
            out=out("fid"),
        ),
    ]
    return [{"kind": "sample", "request": r} for r in draws + evals]


def draw(tmp_path, name: str, batch_size: int) -> dict:
    """16 images of the unconditional run with seed 5 (DDPM, 4 steps), before they become uint8."""
    out = str(tmp_path / f"draw_{name}.npy")
    run = dict(workdir=str(tmp_path / "uncond"), sampler="ddpm", steps=4, seed=5, out=out)
    return dict(kind="draw", num_samples=16, batch_size=batch_size, **run)


def test_sample_py_on_two_processes_equals_one_process_and_a_seed_gives_the_same_images_at_any_batch(
    tmp_path, subprocess_env
):
    """sample.py's draws (DDPM and DDIM, unconditional and conditional with guidance) are the same on 2 processes as on
    1, bit for bit, and its evaluations (bits/dim, ODE bits/dim, FID) agree to rel 1e-5; a seed's images are the same
    at batch 16 on 1 device, batch 8 on 8 devices and batch 4 on 2 processes."""
    fake_run(tmp_path / "uncond")
    fake_run(tmp_path / "cond", CONDITIONAL, label_dropout=0.1)
    from jaxdiff.data import DataConfig, load_split

    data_dir = str(tmp_path / "data")
    load_split(DataConfig(dataset="digits", split="test[:1]", data_dir=data_dir))  # built once, before the processes
    # Each group its own cache of reference statistics: each computes them (a collective on 2 processes).
    env = lambda name: {**subprocess_env, "JAXDIFF_CACHE": str(tmp_path / f"cache_{name}")}
    port = free_port()
    cli = [sys.executable, str(ROOT / "sample.py"), f"--workdir={tmp_path / 'uncond'}", "--num_samples=6"]
    cli += ["--batch_size=4", "--sampler=ddim", "--steps=5", "--seed=7", "--coordinator=127.0.0.1:" + str(port)]
    argv = lambda i: [*cli, "--num_processes=2", f"--process_id={i}", f"--out={tmp_path / 'cli'}"]
    procs = [start(argv(i), env("cli")) for i in (0, 1)]
    two = [*requests(tmp_path, "pod", data_dir), draw(tmp_path, "pod", 4)]
    procs += pod_worker(tmp_path, "pod", two, env("pod"), 1, 2)
    cli_request = dict(workdir=str(tmp_path / "uncond"), num_samples=6, batch_size=4, sampler="ddim", steps=5, seed=7)
    one = [
        *requests(tmp_path, "one", data_dir),
        {"kind": "sample", "request": {**cli_request, "out": str(tmp_path / "one" / "cli")}},
    ]
    procs += pod_worker(tmp_path, "one", one, on_devices(env("one"), 2), 2)
    procs += pod_worker(tmp_path, "single", [draw(tmp_path, "single", 16)], env("single"), 1)
    procs += pod_worker(tmp_path, "eight", [draw(tmp_path, "eight", 8)], env("eight"), 8)
    outs = finish(procs)
    assert "Wrote 6 images 8x8x1" in outs[0] and "Wrote" not in outs[1]  # process 0 writes the files

    for name in ("ddpm", "ddim", "ddpm_cond", "ddim_cond"):
        two = np.load(tmp_path / "pod" / name / "samples.npz")["arr_0"]
        np.testing.assert_array_equal(two, np.load(tmp_path / "one" / name / "samples.npz")["arr_0"], err_msg=name)
        assert two.shape == (6, 8, 8, 1) and len({im.tobytes() for im in two}) == 6, name  # six different images
    cli_images = np.load(tmp_path / "cli" / "samples.npz")["arr_0"]  # sample.py itself on 2 processes
    np.testing.assert_array_equal(cli_images, np.load(tmp_path / "one" / "cli" / "samples.npz")["arr_0"])
    assert not np.array_equal(cli_images, np.load(tmp_path / "pod" / "ddim" / "samples.npz")["arr_0"])  # seed 7
    for name in ("bpd", "bpd_cond"):
        two, one = (json.loads((tmp_path / run / name / "bpd.json").read_text()) for run in ("pod", "one"))
        assert two["num_examples"] == one["num_examples"] == 6
        for term in BOUND_TERMS:
            assert two["bits_per_dim"][term] == pytest.approx(one["bits_per_dim"][term], rel=1e-5), (name, term)
        np.testing.assert_allclose(two["per_timestep_bits_per_dim"], one["per_timestep_bits_per_dim"], rtol=1e-5)
    two, one = (json.loads((tmp_path / run / "ode" / "ode_bpd.json").read_text()) for run in ("pod", "one"))
    np.testing.assert_allclose(two["per_image"], one["per_image"], rtol=1e-5)
    two, one = (json.loads((tmp_path / run / "fid" / "fid.json").read_text()) for run in ("pod", "one"))
    # The digits' held-out judge: the distance to the test split, its floor, the near-copies, the per-class figures.
    for key in ("fid", "score", "cond_accuracy", "floor", "fid_train", "copy_share", "copy_median_ratio"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    for k, value in one["fid_per_class"].items():
        assert two["fid_per_class"][k] == pytest.approx(value, rel=1e-5), k

    images = {name: np.load(tmp_path / f"draw_{name}.npy") for name in ("single", "eight", "pod")}
    assert images["single"].shape == (16, 8, 8, 1) and images["single"].std() > 0.1
    assert len({im.tobytes() for im in images["single"]}) == 16
    for name in ("eight", "pod"):
        np.testing.assert_allclose(images[name], images["single"], rtol=1e-5, atol=1e-5, err_msg=name)


def test_each_device_runs_only_its_share_of_the_batch(tmp_path, subprocess_env):
    """On 8 devices the bound, a guided (and an autoguided) DDIM step and the train step move no batch between
    devices (no all-gather, all-to-all or collective-permute), and each device does at most 1.1/8 of the work of the
    1-device program (XLA's cost analysis of the compiled, partitioned program)."""
    out = tmp_path / "costs.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharding_worker.py"), str(out), "--devices", "8"],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    costs = json.loads(out.read_text())
    control = costs.pop("gathers_its_batch")["8"]["collectives"]
    assert control and control[0].startswith("all-gather"), control  # the probe sees a gathered batch
    assert set(costs) == {"bound", "guided_ddim_step", "autoguided_ddim_step", "train_step"}
    for name, by_devices in costs.items():
        one, eight = by_devices["1"], by_devices["8"]
        assert eight["collectives"] == [], (name, eight["collectives"])
        assert one["flops"] > 0 and eight["flops"] <= 1.1 * one["flops"] / 8, (name, eight["flops"] / one["flops"])
