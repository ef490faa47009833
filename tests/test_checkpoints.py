"""Training that survives: exact resume after SIGKILL, SIGTERM saves and exits 0, corrupt or leftover checkpoints,
non-finite values never saved, restoring for sampling from a workdir. (Checkpoints moved between 1 and 8 devices:
test_training.py, with the multi-device workers.)"""

import dataclasses
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxdiff import actions, checkpoints, experiment, parallel, pipeline, training
from jaxdiff.data import DataConfig, load_split
from jaxdiff.errors import CheckpointError
from jaxdiff.models.unet import abstract_params, init_params
from tests.helpers import NET, ROOT, free_port, load_config, tiny_config

SPEC = pipeline.ModelSpec(NET, pipeline.DiffusionConfig(num_timesteps=100), clip_x0=False, data=DataConfig())
NUM_STEPS = 12


# ----------------------------------------------------------------------------------------------- the module alone


def small_state(step: int) -> training.TrainState:
    """A TrainState of the real structure with cheap made-up values (no network init, no compile)."""
    value = float(step)
    noise = np.random.default_rng(step).standard_normal((256, 256)).astype(np.float32)  # incompressible on disk
    params = {"w": jnp.asarray(noise), "b": {"x": jnp.arange(10.0) * value}}
    return training.TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        ema_params=jax.tree_util.tree_map(lambda x: x + 0.5, params),
        opt_state=(jnp.zeros((3,)),),
        loss_history=jnp.zeros((4, 2)),
        history_count=jnp.zeros((4,), jnp.int32),
    )


def save_steps(workdir, steps):
    mngr = checkpoints.manager(workdir)
    for step in steps:
        checkpoints.save(mngr, step, small_state(step), {"seed": 0}, SPEC.to_json())
    checkpoints.wait(mngr)
    mngr.close()


def restore(workdir):
    mngr = checkpoints.manager(workdir)
    try:
        return checkpoints.restore_latest(mngr, checkpoints.abstract(small_state(0)))
    finally:
        mngr.close()


def data_files(step_dir: pathlib.Path):
    """The array data files of a checkpoint's state, largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def listing(root: pathlib.Path):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    save_steps(tmp_path, (2, 4, 6))
    big = data_files(tmp_path / "checkpoints" / "6")[0]
    os.truncate(big, big.stat().st_size // 2)  # a data file truncated (a crash or a full disk mid-copy)
    with pytest.warns(UserWarning, match="Cannot read the checkpoint at step 6"):
        state, skipped = restore(tmp_path)
    assert int(state.step) == 4 and [s for s, _ in skipped] == [6]
    np.testing.assert_array_equal(state.params["w"], small_state(4).params["w"])
    # A file deleted from step 4 as well: back to step 2.
    for f in data_files(tmp_path / "checkpoints" / "4"):
        f.unlink()
    with pytest.warns(UserWarning, match="step 4"):
        state, skipped = restore(tmp_path)
    assert int(state.step) == 2 and [s for s, _ in skipped] == [6, 4]
    # Unreadable ones are moved aside, never deleted; a step set aside twice keeps both copies.
    where = checkpoints.set_aside(tmp_path, [6, 4])
    assert sorted(p.name for p in where.iterdir()) == ["4", "6"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_when_no_checkpoint_can_be_read_the_run_stops_and_nothing_is_touched(tmp_path):
    save_steps(tmp_path, (2, 4))
    for step in (2, 4):
        data_files(tmp_path / "checkpoints" / str(step))[0].unlink()
    before = listing(tmp_path)
    with pytest.warns(UserWarning):
        with pytest.raises(CheckpointError, match=r"None of the 2 checkpoints .* nothing was moved"):
            restore(tmp_path)
    assert listing(tmp_path) == before


def test_non_finite_values_on_disk_count_as_unreadable(tmp_path):
    mngr = checkpoints.manager(tmp_path)
    checkpoints.save(mngr, 2, small_state(2), {}, SPEC.to_json())
    bad = small_state(4)
    bad = dataclasses.replace(bad, params={**bad.params, "w": bad.params["w"].at[0, 0].set(jnp.nan)})
    checkpoints.save(mngr, 4, bad, {}, SPEC.to_json())  # only by calling this directly: a run refuses to save it
    checkpoints.wait(mngr)
    mngr.close()
    with pytest.warns(UserWarning, match="step 4 .*non-finite"):
        state, _ = restore(tmp_path)
    assert int(state.step) == 2


def test_the_finiteness_check_finds_one_bad_element_in_any_kind_of_leaf():
    mesh = parallel.make_mesh()
    tree = {
        "f32": jnp.ones((5, 3)),
        "bf16": jnp.ones((4,), jnp.bfloat16),
        "int": jnp.arange(3),
        "host": np.zeros((2, 2), np.float32),
        "sharded": jax.device_put(jnp.ones((8, 2)), parallel.batch_sharding(mesh)),
        "replicated": parallel.replicate(jnp.ones((3,)), mesh),
    }
    assert parallel.all_finite(tree) is True
    bad_values = {"f32": jnp.nan, "bf16": jnp.inf, "host": -np.inf, "sharded": jnp.nan, "replicated": -jnp.inf}
    for name, value in bad_values.items():
        leaf = tree[name]
        if isinstance(leaf, np.ndarray):
            bad = leaf.copy()
            bad.flat[-1] = value
        else:
            bad = jax.device_put(leaf.reshape(-1).at[-1].set(value).reshape(leaf.shape), leaf.sharding)
        assert parallel.all_finite({**tree, name: bad}) is False, name


def test_a_leftover_temporary_directory_is_ignored(tmp_path):
    save_steps(tmp_path, (2,))
    leftover = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1732800000000000"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "half_written").write_bytes(b"\0" * 100)
    state, skipped = restore(tmp_path)
    assert int(state.step) == 2 and skipped == []
    save_steps(tmp_path, (4,))  # the next save of that step is not blocked by the leftover
    assert int(restore(tmp_path)[0].step) == 4


def made_up_state(step: int) -> training.TrainState:
    """NET's parameters with random values (no init compile) and EMA parameters = them + 1."""
    shapes = jax.eval_shape(lambda: init_params(NET, jax.random.key(1)))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)
    ema = jax.tree_util.tree_map(lambda x: x + 1.0, params)
    return training.TrainState(jnp.int32(step), params, ema, (), jnp.zeros(2), jnp.zeros(2))


def assert_ema_read(params, state):
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state.ema_params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sampling_reads_the_config_the_spec_and_only_the_ema_parameters(tmp_path):
    state = made_up_state(7)
    mngr = checkpoints.manager(tmp_path)
    checkpoints.save(mngr, 7, state, {"seed": 3, "data": {"image_size": 8}}, SPEC.to_json())
    checkpoints.wait(mngr)
    mngr.close()
    like = lambda spec: abstract_params(pipeline.ModelSpec.from_json(spec).network)
    loaded = checkpoints.load_for_sampling(tmp_path, None, like)
    assert loaded.step == 7 and pipeline.ModelSpec.from_json(loaded.spec) == SPEC and loaded.config["seed"] == 3
    assert_ema_read(loaded.ema_params, state)
    assert checkpoints.restore_config(tmp_path)["seed"] == 3
    # The Pipeline of the workdir: the spec's network, diffusion and clip, at the EMA parameters.
    pipe = pipeline.from_workdir(tmp_path)
    assert pipe.image_shape == (8, 8, 1) and pipe.num_timesteps == 100 and pipe.clip_x0 is False
    assert pipe.data == DataConfig() and "step 7, EMA" in pipe.source
    with pytest.raises(FileNotFoundError, match=r"No checkpoint at step 5 .* \[7\]"):
        checkpoints.load_for_sampling(tmp_path, 5, like)
    with pytest.raises(FileNotFoundError, match=r"No checkpoint in .*train first"):
        pipeline.from_workdir(tmp_path / "elsewhere")


def test_a_checkpoint_of_jaxdiff_0_1_still_samples(tmp_path):
    """jaxdiff 0.1 saved the network's config (item ``model``) beside the run's config, and no spec."""
    import dataclasses as dc

    config = load_config("tiny")
    config.diffusion.variance = "fixed_large"
    state = made_up_state(4)
    mngr = checkpoints.manager(tmp_path)
    items = dict(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict()),
        model=ocp.args.JsonSave(dc.asdict(NET)),
    )
    mngr.save(4, args=ocp.args.Composite(**items))
    checkpoints.wait(mngr)
    mngr.close()
    pipe = pipeline.from_workdir(tmp_path)
    assert pipe.variance == "fixed_large" and pipe.num_timesteps == 100 and pipe.image_shape == (8, 8, 1)
    assert pipe.data.dataset == "digits" and pipe.data.eval_split == "test"
    assert_ema_read(pipe.params, state)


# ------------------------------------------------------------------------------------ train.py as a user runs it


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("digits")
    load_split(DataConfig(dataset="digits", data_dir=str(data_dir)))  # built once, offline
    return data_dir


def train_command(workdir, data_dir, **overrides):
    settings = {
        "num_steps": NUM_STEPS,
        "checkpoint_every": 2,
        "log_every": 1,
        "eval_every": 0,
        "sample_every": 0,
        **overrides,
    }
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *(f"--config.training.{k}={v}" for k, v in settings.items()),
    ]


def run_train(workdir, data_dir, env, **overrides) -> str:
    """train.py to the end; its output."""
    result = subprocess.run(
        train_command(workdir, data_dir, **overrides),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def interrupt_train(workdir, data_dir, env, after_step: int, sig: int) -> tuple[int, str]:
    """Start train.py, send ``sig`` as soon as it reports ``after_step``; its exit code and output."""
    proc = subprocess.Popen(
        train_command(workdir, data_dir),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step {after_step}/{NUM_STEPS} "):
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=600)
    return proc.returncode, "".join(lines) + (rest or "")


def final_state(workdir, step=NUM_STEPS):
    """The TrainState saved at ``step`` as a dict of numpy arrays, read without a target."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "state")


def assert_bit_identical(a, b):
    paths_a, leaves_a = zip(*jax.tree_util.tree_flatten_with_path(a)[0], strict=True)
    paths_b, leaves_b = zip(*jax.tree_util.tree_flatten_with_path(b)[0], strict=True)
    assert paths_a == paths_b
    assert len(leaves_a) > 100  # params, EMA, both Adam moments, step, loss history
    for path, x, y in zip(paths_a, leaves_a, leaves_b, strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)


def resumed_from(output: str) -> int:
    match = re.search(r"Resuming from the checkpoint at step (\d+)", output)
    assert match, output[-3000:]
    return int(match.group(1))


def test_killed_or_preempted_runs_resume_to_bit_identical_parameters(tmp_path, digits_dir, subprocess_env):
    """One test, so that the uninterrupted reference run is made once (train.py processes are the slow part)."""
    env = subprocess_env
    run_train(tmp_path / "uninterrupted", digits_dir, env)
    uninterrupted = final_state(tmp_path / "uninterrupted")

    # SIGKILL at an arbitrary step (no warning, maybe mid-save), then the same command again.
    killed = tmp_path / "killed"
    code, out = interrupt_train(killed, digits_dir, env, after_step=5, sig=signal.SIGKILL)
    assert code == -signal.SIGKILL, out[-3000:]
    # A save cut short by a crash leaves a temporary directory: the restart ignores it.
    (killed / "checkpoints" / "11.orbax-checkpoint-tmp-1732800000000000" / "state").mkdir(parents=True)
    out = run_train(killed, digits_dir, env)
    assert 2 <= resumed_from(out) <= 5
    assert f"step {NUM_STEPS}/{NUM_STEPS}" in out
    assert_bit_identical(final_state(killed), uninterrupted)

    # SIGTERM (a TPU VM's preemption notice): a checkpoint at the current step, exit code 0.
    preempted = tmp_path / "preempted"
    code, out = interrupt_train(preempted, digits_dir, env, after_step=7, sig=signal.SIGTERM)
    assert code == 0, out[-3000:]
    match = re.search(r"Preempted \(SIGTERM\) after step (\d+): saved the checkpoint at step \1", out)
    assert match, out[-3000:]
    saved = int(match.group(1))
    assert 7 <= saved < NUM_STEPS and (preempted / "checkpoints" / str(saved)).is_dir()
    assert f"step {NUM_STEPS}/{NUM_STEPS}" not in out
    # The restarted run continues from the SIGTERM checkpoint ...
    code, out = interrupt_train(preempted, digits_dir, env, after_step=saved + 1, sig=signal.SIGTERM)
    assert code == 0 and resumed_from(out) == saved, out[-3000:]
    latest = int(re.search(r"Preempted \(SIGTERM\) after step (\d+)", out).group(1))
    # ... and when that newest checkpoint is damaged, the next restart warns, sets it aside and resumes from the
    # one before; the run still ends bit-identical to one that was never interrupted.
    big = data_files(preempted / "checkpoints" / str(latest))[0]
    os.truncate(big, big.stat().st_size // 2)
    out = run_train(preempted, digits_dir, env)
    assert f"Cannot read the checkpoint at step {latest}" in out
    assert resumed_from(out) < latest
    assert (preempted / "checkpoints_unreadable" / str(latest)).is_dir()
    assert_bit_identical(final_state(preempted), uninterrupted)


def test_on_two_hosts_a_sigterm_to_one_makes_both_save_the_same_step(tmp_path, digits_dir, subprocess_env):
    """Two processes under jax.distributed (gloo), each streaming its rows of the digits: JAX's preemption service
    spreads the notice and the hosts agree on the step they save."""
    port = free_port()
    env = {**subprocess_env, "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    hosts = [
        subprocess.Popen(
            [
                *train_command(tmp_path, digits_dir, num_steps=400, checkpoint_every=0),
                "--config.data.reader=stream",
                f"--coordinator=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    lines = []
    for line in hosts[0].stdout:  # process 0 logs; the notice goes to process 1
        lines.append(line)
        if line.startswith("step 3/400 "):
            hosts[1].send_signal(signal.SIGTERM)
            break
    outputs = ["".join(lines) + hosts[0].communicate(timeout=600)[0], hosts[1].communicate(timeout=600)[0]]
    assert [h.returncode for h in hosts] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    saved = int(re.search(r"Preempted \(SIGTERM\) after step (\d+)", outputs[0]).group(1))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [saved] and 3 <= saved < 400
    assert "Data: digits train, streamed from ArrayRecord (1,500 images" in outputs[0]


# ------------------------------------------------------------------------------------------- non-finite losses


def test_an_injected_nan_stops_the_run_and_the_newest_checkpoint_is_finite(tmp_path, monkeypatch, digits_dir):
    calls = {"n": 0}
    real_global_batch = parallel.global_batch

    def poisoned(local, mesh):  # the 5th batch (step 5) carries a NaN pixel
        calls["n"] += 1
        batch = dict(local)
        if calls["n"] == 5:
            batch["image"] = np.array(batch["image"], np.float32)
            batch["image"][0, 0, 0, 0] = np.nan
        return real_global_batch(batch, mesh)

    monkeypatch.setattr(parallel, "global_batch", poisoned)
    config = tiny_config(digits_dir, num_steps=8, checkpoint_every=2, log_every=8, eval_every=0, sample_every=0)
    with pytest.raises(actions.NonFiniteLossError, match="at step 5"):
        experiment.train_and_evaluate(config, tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4]
    saved = final_state(tmp_path, 4)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(saved))
