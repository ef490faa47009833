"""Training: the step learns, is the same on 1 device, 8 devices and 2 processes; configs; the input pipeline."""

import dataclasses
import functools
import json
import logging
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdiff import actions, experiment, logs, parallel, pipeline, training
from jaxdiff.data import Batches, DataConfig, InMemory, global_indices, load_split, num_classes
from jaxdiff.models.unet import UNetConfig, abstract_params, init_params, make_apply
from jaxdiff.schedules import Schedule, make_schedule
from tests.helpers import ROOT, fake_run, free_port, load_config, tiny_config


def unscaled_linear(num_timesteps: int) -> Schedule:
    """DDPM's 1e-4..0.02 over ``num_timesteps``, unscaled (a short chain short of noise, as these tests measured
    their figures on; what they check does not need noise at T)."""
    return Schedule.from_betas(np.linspace(1e-4, 0.02, num_timesteps))


CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
TINY = UNetConfig(
    image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0
)


@functools.cache
def tiny_run():
    """One small network, optimizer and compiled step shared by the tests (init and compile dominate their time)."""
    opt = training.OptimConfig(lr=2e-3, warmup_steps=0, total_steps=100, ema_decay=0.9)
    optimizer = training.make_optimizer(opt)
    state = training.init_train_state(init_params(TINY, training.run_keys(0)[0]), optimizer, 100)
    schedule = unscaled_linear(100)
    objective = pipeline.DiffusionConfig(num_timesteps=100)
    step = jax.jit(training.make_train_step(make_apply(TINY), schedule, objective, optimizer, opt, seed=0))
    return state, step


def test_the_train_step_lowers_the_loss_on_a_fixed_batch():
    state, step = tiny_run()
    images = np.random.default_rng(0).integers(0, 2, (16, 8, 8, 1)) * 2.0 - 1.0  # a fixed batch of binary images
    batch = {"image": jnp.asarray(images, jnp.float32), "label": jnp.zeros((16,), jnp.int32)}
    losses, first = [], state
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert metrics["finite"] == 1.0
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses
    assert int(state.step) == 40
    # The EMA trails the parameters: it moved, but less than they did.
    leaf = lambda s, k: jax.tree_util.tree_leaves(getattr(s, k))[-1]
    moved = float(jnp.abs(leaf(state, "params") - leaf(first, "params")).max())
    ema_moved = float(jnp.abs(leaf(state, "ema_params") - leaf(first, "params")).max())
    assert 0 < ema_moved < moved
    quarters = [float(metrics[f"loss_q{q}"]) for q in range(4)]
    assert quarters[0] > quarters[3]  # predicting eps is hardest at small t


def test_a_non_finite_step_leaves_the_state_unchanged():
    state, step = tiny_run()
    bad = {"image": jnp.full((16, 8, 8, 1), jnp.nan, jnp.float32), "label": jnp.zeros((16,), jnp.int32)}
    new, metrics = step(state, bad)
    assert metrics["finite"] == 0.0
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_learning_rate_schedule():
    lr = training.learning_rate(training.OptimConfig(lr=1e-3, warmup_steps=10, total_steps=110, decay="cosine"))
    assert float(lr(0)) == 0.0 and np.isclose(float(lr(5)), 5e-4) and np.isclose(float(lr(10)), 1e-3)
    assert float(lr(110)) < 1e-9
    constant = training.learning_rate(training.OptimConfig(lr=2e-4, warmup_steps=5000))
    assert np.isclose(float(constant(2500)), 1e-4) and np.isclose(float(constant(10**6)), 2e-4)


def test_importance_sampling_prefers_high_loss_timesteps():
    state, _ = tiny_run()
    history = jnp.ones((100, training.HISTORY)).at[90:].set(30.0)
    state = training.TrainState(
        state.step, state.params, state.ema_params, state.opt_state, history, jnp.full((100,), training.HISTORY)
    )
    t, weights = training._draw_timesteps(jax.random.key(0), state, 4000, 100, importance=True)
    share = float(jnp.mean(t >= 90))
    assert share > 0.7  # 10 timesteps hold 300 of the 390 units of sqrt(E[L^2])
    # The weights 1/(T p_t) keep the estimate unbiased: E_p[w L] = mean_t L.
    losses = jnp.where(t >= 90, 30.0, 1.0)
    np.testing.assert_allclose(float(jnp.mean(weights * losses)), (90 * 1 + 10 * 30) / 100, rtol=0.1)
    _, uniform_w = training._draw_timesteps(jax.random.key(0), state, 100, 100, importance=False)
    assert np.all(uniform_w == 1.0)


def test_the_loss_history_is_written_only_when_it_is_read():
    """Importance sampling of t keeps each timestep's recent losses; a run that draws t uniformly skips that loop over
    the batch and leaves the history empty."""
    schedule = unscaled_linear(10)
    params = {"w": jnp.ones(())}
    apply = lambda p, x, t, y, key: p["w"] * x
    opt = training.OptimConfig(lr=1e-3, warmup_steps=0)
    optimizer = training.make_optimizer(opt)
    batch = {"image": jnp.linspace(-1, 1, 8 * 4).reshape(8, 2, 2, 1), "label": jnp.zeros((8,), jnp.int32)}
    for sampling in ("uniform", "importance"):
        objective = pipeline.DiffusionConfig(num_timesteps=10, t_sampling=sampling)
        step = jax.jit(training.make_train_step(apply, schedule, objective, optimizer, opt, seed=0))
        state, _ = step(training.init_train_state(params, optimizer, 10), batch)
        if sampling == "uniform":
            assert int(state.history_count.sum()) == 0 and float(jnp.abs(state.loss_history).sum()) == 0
        else:
            assert int(state.history_count.sum()) == 8  # one loss per example, at its timestep
            assert float(state.loss_history[:, -1].sum()) > 0


def run_workers(tmp_path, env, runs):
    """Start every worker command of ``runs`` ({name: [argv tail, ...]}) at once; their saved results by name."""
    worker = str(ROOT / "tests" / "train_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(tmp_path / f"{name}.npz"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for name, commands in runs.items()
        for args in commands
    ]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    return {name: np.load(tmp_path / f"{name}.npz") for name in runs}


def assert_params_close(a, b, what, prefix="param_"):
    keys = [k for k in b.files if k.startswith(prefix)]
    assert len(keys) > 10
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-5, err_msg=f"{what} {k}")


def test_one_device_eight_devices_and_two_processes_train_alike_and_share_checkpoints(tmp_path, subprocess_env):
    port = free_port()
    w1, w8 = tmp_path / "ckpt_one", tmp_path / "ckpt_eight"
    two = [["--devices", "2", "--process", str(i), "--processes", "2", "--port", str(port)] for i in range(2)]
    results = run_workers(
        tmp_path,
        subprocess_env,
        {
            "one": [["--devices", "1", "--workdir", str(w1)]],
            "eight": [["--devices", "8", "--workdir", str(w8)]],
            "two_processes": two,
        },
    )
    one = results["one"]
    assert int(results["eight"]["devices"]) == 8 and int(results["two_processes"]["devices"]) == 4
    for name in ("eight", "two_processes"):
        np.testing.assert_allclose(results[name]["losses"], one["losses"], rtol=1e-4)
        assert_params_close(results[name], one, name)
    # A checkpoint saved on 1 device resumes on 8, and one saved on 8 resumes on 1: the state arrives unchanged and
    # the next step agrees.
    moved = run_workers(
        tmp_path,
        subprocess_env,
        {
            "eight_from_one": [["--devices", "8", "--workdir", str(w1), "--steps", "4"]],
            "one_from_eight": [["--devices", "1", "--workdir", str(w8), "--steps", "4"]],
        },
    )
    for name, source in (("eight_from_one", one), ("one_from_eight", results["eight"])):
        assert int(moved[name]["start"]) == 3 and len(moved[name]["losses"]) == 1
        for k in (k for k in source.files if k.startswith("param_")):
            np.testing.assert_array_equal(moved[name][k.replace("param_", "start_")], source[k], err_msg=name)
    assert int(moved["eight_from_one"]["devices"]) == 8 and int(moved["one_from_eight"]["devices"]) == 1
    np.testing.assert_allclose(moved["eight_from_one"]["losses"], moved["one_from_eight"]["losses"], rtol=1e-4)
    assert_params_close(moved["eight_from_one"], moved["one_from_eight"], "after the move")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_and_traces_one_step(name):
    config = load_config(name)
    run = experiment.run_config(config)
    channels = 1 if config.data.dataset in ("digits", "mnist", "fashion_mnist") else 3
    model_cfg = run.network(channels, 10)
    schedule = make_schedule(run.diffusion.beta_schedule, run.diffusion.num_timesteps)
    optimizer = training.make_optimizer(run.optim)
    apply = make_apply(model_cfg)
    step = training.make_train_step(apply, schedule, run.diffusion, optimizer, run.optim, 0, model_cfg.num_classes)
    params = abstract_params(model_cfg)
    state = jax.eval_shape(lambda p: training.init_train_state(p, optimizer, schedule.num_timesteps), params)
    size = run.data.image_size
    batch = {
        "image": jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32),
        "label": jax.ShapeDtypeStruct((2,), jnp.int32),
    }
    new_state, metrics = jax.eval_shape(step, state, batch)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert set(metrics) >= {"loss", "grad_norm", "lr", "finite", "loss_q0", "loss_q3"}
    with pytest.raises(AttributeError):  # locked: a misspelled key cannot be set
        config.training.bach_size = 64


def test_the_cifar10_config_is_the_papers_setting():
    c = load_config("cifar10")
    assert (c.diffusion.num_timesteps, c.diffusion.beta_schedule, c.diffusion.beta_start, c.diffusion.beta_end) == (
        1000,
        "linear",
        1e-4,
        0.02,
    )
    assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks, tuple(c.model.attn_resolutions)) == (
        128,
        (1, 2, 2, 2),
        2,
        (16,),
    )
    assert (c.model.dropout, c.optim.lr, c.training.batch_size, c.optim.warmup_steps) == (0.1, 2e-4, 128, 5000)
    assert (c.optim.grad_clip, c.optim.ema_decay, c.data.random_flip, c.training.num_steps) == (
        1.0,
        0.9999,
        True,
        800_000,
    )


def test_misspelled_override_fails():
    config = load_config("digits")
    with pytest.raises(AttributeError):
        config.optim.learning_rate = 1.0


def test_batch_order_is_a_function_of_seed_and_step():
    images = np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1)
    a = Batches(InMemory(images), global_batch=8, seed=3)
    b = Batches(InMemory(images), global_batch=8, seed=3)
    for step in (0, 6, 7, 100):
        np.testing.assert_array_equal(a.at(step)["image"], b.at(step)["image"])
    resumed = a.iterate(start_step=7)
    for step in range(7, 12):
        np.testing.assert_array_equal(next(resumed)["image"], a.at(step)["image"])
    # Each epoch visits every example once; the next epoch in another order; another seed, another order.
    first_epoch = np.concatenate([global_indices(50, 10, 3, s) for s in range(5)])
    second_epoch = np.concatenate([global_indices(50, 10, 3, s) for s in range(5, 10)])
    assert sorted(first_epoch) == list(range(50)) and sorted(second_epoch) == list(range(50))
    assert not np.array_equal(first_epoch, second_epoch)
    assert not np.array_equal(global_indices(50, 10, 4, 0), global_indices(50, 10, 3, 0))


def test_process_shards_are_disjoint_and_make_the_global_batch():
    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1)
    data = InMemory(images)
    full = Batches(data, global_batch=8, seed=0, random_flip=True).at(5)["image"]
    shards = [
        Batches(data, global_batch=8, seed=0, random_flip=True, process_index=p, process_count=4).at(5)["image"]
        for p in range(4)
    ]
    np.testing.assert_array_equal(np.concatenate(shards), full)
    assert len({float(v) for s in shards for v in s.ravel()}) == 8
    with pytest.raises(ValueError, match="not divisible"):
        Batches(InMemory(images), global_batch=10, seed=0, process_count=4)


def test_flips_are_deterministic_and_about_half():
    images = np.tile(np.arange(4, dtype=np.uint8).reshape(1, 1, 4, 1), (1000, 1, 1, 1))
    batch = Batches(InMemory(images), global_batch=1000, seed=0, random_flip=True).at(0)["image"]
    flipped = batch[:, 0, 0, 0] > batch[:, 0, -1, 0]
    assert 0.45 < flipped.mean() < 0.55
    again = Batches(InMemory(images), global_batch=1000, seed=0, random_flip=True).at(0)["image"]
    np.testing.assert_array_equal(batch, again)


def test_the_digits_dataset_is_built_offline(tmp_path):
    train, train_labels = load_split(DataConfig(dataset="digits", split="train", data_dir=str(tmp_path)))
    test, _ = load_split(DataConfig(dataset="digits", split="test", data_dir=str(tmp_path)))
    assert train.shape == (1500, 8, 8, 1) and test.shape == (297, 8, 8, 1) and train.dtype == np.uint8
    assert train.max() == 255 and train.min() == 0 and sorted(set(train_labels.tolist())) == list(range(10))
    from sklearn.datasets import load_digits

    expected = np.round(load_digits().images * 255 / 16).astype(np.uint8)[..., None]
    expected_set = {e.tobytes() for e in expected}
    assert all(image.tobytes() in expected_set for image in train[:50])


def test_the_digits_are_read_without_tensorflow(tmp_path):
    """The built-in digits are stored as ArrayRecord and read through TFDS's data source: a fresh process that loads
    them never imports TensorFlow (~3.5 s of every train.py start)."""
    import subprocess
    import sys

    load_split(DataConfig(dataset="digits", data_dir=str(tmp_path)))  # built (that step does use TensorFlow)
    probe = (
        "import sys; from jaxdiff.data import DataConfig, load_split; "
        f"images, labels = load_split(DataConfig(dataset='digits', split='test', data_dir={str(tmp_path)!r})); "
        "print(images.shape, labels.shape, 'tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "(297, 8, 8, 1) (297,) False", out.stdout + out.stderr[-2000:]


def test_images_of_varying_sizes_are_cropped_and_resized_one_by_one(tmp_path):
    """LSUN's images differ in size: each is centre-cropped to a square and resized (area filter to shrink, bilinear
    to grow) before batching, exactly as resize_square does to one image."""
    import tensorflow_datasets as tfds

    from jaxdiff.data import resize_square

    with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
        raw = [e["image"] for e in tfds.as_numpy(tfds.builder("lsun/church_outdoor").as_dataset(split="train"))]
        # (Under mock_data, download=True only lets the mock split count as prepared: nothing is fetched.)
        data = DataConfig(dataset="lsun/church_outdoor", image_size=16, data_dir=str(tmp_path), download=True)
        images, labels = load_split(data)
    assert len({r.shape for r in raw}) > 1  # the mock's images do differ in size
    assert any(min(r.shape[:2]) < 16 for r in raw) and any(min(r.shape[:2]) > 16 for r in raw)  # both filters
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8 and labels is None
    for image, original in zip(images, raw, strict=True):
        np.testing.assert_array_equal(image, resize_square(original[None], 16)[0])


class _CountedReads:
    """A data source that records which rows were read."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        self.read.append(i)
        return self.source[i]


@pytest.mark.parametrize("image_size", [8, 6, 12])  # as stored, shrunk (area filter), grown (bilinear)
def test_a_streamed_split_gives_the_in_memory_batches_and_each_process_reads_only_its_rows(tmp_path, image_size):
    """Two processes, batches of 512 out of 1,500 digits (step 2 crosses into the second epoch), flips on: the rows
    each process reads at random are its own rows of the global batch, and its batches equal those cut from the
    whole split in memory, resized at once (the tf.data path's way; the stream resizes image by image)."""
    from jaxdiff.data import Streamed, open_split, resize_square

    data = DataConfig(dataset="digits", image_size=image_size, data_dir=str(tmp_path), random_flip=True)
    streamed = open_split(dataclasses.replace(data, reader="stream"))
    assert isinstance(streamed, Streamed) and isinstance(open_split(data), InMemory)
    assert len(streamed) == 1500 and streamed.channels == 1 and streamed.has_labels
    raw = [streamed.source[i] for i in range(1500)]
    memory = InMemory(
        resize_square(np.stack([e["image"] for e in raw]), image_size), np.asarray([e["label"] for e in raw])
    )
    for process in range(2):
        counted = _CountedReads(streamed.source)
        streamed.source = counted
        kwargs = dict(global_batch=512, seed=3, random_flip=True, process_index=process, process_count=2)
        reference, batches = Batches(memory, **kwargs), Batches(streamed, **kwargs)
        for step in range(4):
            del counted.read[:]
            batch, expected = batches.at(step), reference.at(step)
            rows = global_indices(1500, 512, 3, step)[process * 256 : (process + 1) * 256]
            assert sorted(counted.read) == sorted(rows.tolist())  # its own rows, each once, nothing else
            for key in ("image", "label"):
                np.testing.assert_array_equal(batch[key], expected[key])
        streamed.source = counted.source


def test_closing_the_iterator_stops_its_reading_thread_and_waits_for_it():
    """A run stops its batches before it exits: a reading thread cut off inside a device transfer at the process's
    exit aborts the interpreter. Closing waits for the batch in flight."""
    import threading
    import time

    def slow_transfer(batch):
        time.sleep(0.3)
        return batch

    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    batches = Batches(InMemory(images), global_batch=2, seed=0).iterate(0, transfer=slow_transfer)
    next(batches)  # the thread is now reading (and transferring) the batches after it
    assert any(t.name == "jaxdiff-batches" for t in threading.enumerate())
    batches.close()
    assert not any(t.name == "jaxdiff-batches" for t in threading.enumerate())


class SquaresForTests(tfds.core.GeneratorBasedBuilder):
    """Four 5x5 images (the test prepares them as TFRecord, which has no random access)."""

    name = "jaxdiff_test_squares"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(5, 5, 1))})
        return self.dataset_info_from_configs(features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(4):
            yield i, {"image": np.full((5, 5, 1), 60 * i, np.uint8)}


def test_the_reader_is_chosen_by_the_split_size_and_a_tfrecord_split_cannot_be_streamed(tmp_path):
    from jaxdiff.data import Streamed, open_split

    digits = DataConfig(dataset="digits", data_dir=str(tmp_path))
    assert isinstance(open_split(digits), InMemory)  # 1,500 x 64 bytes: in memory
    assert open_split(digits).describe() == "held in memory (1,500 images, 0.1 MB)"
    # Over the limit (1,500 x 64 bytes > 0.00005 GiB), auto streams.
    assert isinstance(open_split(dataclasses.replace(digits, memory_limit_gb=5e-5)), Streamed)
    assert isinstance(open_split(dataclasses.replace(digits, memory_limit_gb=1e-4)), InMemory)
    with pytest.raises(ValueError, match="reader must be one of"):
        DataConfig(reader="disk")
    tfds.builder("jaxdiff_test_squares", data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare()
    squares = DataConfig(dataset="jaxdiff_test_squares", image_size=5, data_dir=str(tmp_path))
    images, _ = open_split(squares).read(np.arange(4))  # a TFRecord split reads in memory ...
    assert sorted(images[:, 0, 0, 0].tolist()) == [0, 60, 120, 180]
    # ... and streaming it, asked for or chosen by size, says how to rebuild it as ArrayRecord.
    with pytest.raises(ValueError, match=r"reader='stream'.*stored as tfrecord.*--file_format=array_record"):
        open_split(dataclasses.replace(squares, reader="stream"))
    with pytest.raises(ValueError, match=r"over config.data.memory_limit_gb=0.*tfds build jaxdiff_test_squares"):
        open_split(dataclasses.replace(squares, memory_limit_gb=0))


def test_a_batch_that_cannot_be_read_is_raised_by_the_iterator_and_transfer_runs_ahead():
    class Broken(InMemory):
        def read(self, indices):
            if 7 in indices:
                raise OSError("bad row 7")
            return super().read(indices)

    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    batches = Batches(Broken(images), global_batch=1, seed=0)
    order = [int(global_indices(10, 1, 0, s)[0]) for s in range(10)]
    seen = []
    with pytest.raises(OSError, match="bad row 7"):
        for batch in batches.iterate(0, transfer=lambda b: ("moved", b)):
            assert batch[0] == "moved"
            seen.append(round(float(batch[1]["image"][0, 0, 0, 0] * 127.5 + 127.5)))
    assert seen == order[: order.index(7)]


def test_bad_input_fails_before_any_compile(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset 'cifar11'"):
        load_split(DataConfig(dataset="cifar11", image_size=32))
    with pytest.raises(FileNotFoundError, match=r"not prepared.*tfds build mnist"):
        load_split(DataConfig(dataset="mnist", data_dir=str(tmp_path)))

    class FakeMesh:
        devices = np.empty(8)

    with pytest.raises(ValueError, match="batch size 12 is not a positive multiple of the 8 devices"):
        parallel.check_batch_size(12, FakeMesh())
    config = load_config("digits")
    with config.unlocked():
        config.data.image_size = 7
    with pytest.raises(ValueError, match="image_size 7 is not divisible"):
        experiment.run_config(config).network(1, None)
    config = load_config("digits")
    config.diffusion.prediction = "score"
    with pytest.raises(ValueError, match="Unknown prediction"):
        experiment.run_config(config)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot be written"):
        experiment.train_and_evaluate(load_config("tiny"), blocker / "run")


def assert_run_outputs(workdir: pathlib.Path, step: int, image_px: int = 8):
    from PIL import Image

    assert (workdir / "checkpoints" / str(step)).is_dir()
    assert (workdir / "config.json").is_file()
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    grid = Image.open(workdir / f"samples_{step:07d}.png")
    assert min(grid.size) >= 256  # small images are enlarged to stay legible
    return grid


def lsun_tiny_config(data_dir, **training_overrides):
    """configs/lsun_church.py's data (LSUN church, images of varying sizes, the validation split held out) on the
    tiny network at 8x8, streamed as the real split would be. Under mock_data, download=True only lets the mock splits
    count as prepared, and the mock's data source serves random access."""
    config = tiny_config(data_dir, **training_overrides)
    lsun = load_config("lsun_church").data
    config.data.update(
        dataset=lsun.dataset, eval_split=lsun.eval_split, random_flip=lsun.random_flip, download=True, reader="stream"
    )
    return config


def test_an_lsun_run_streams_trains_samples_and_resumes_bit_identically_on_mock_data(tmp_path, capsys):
    """An LSUN-config run (tiny network, mock LSUN church: images of varying sizes, streamed) end to end: stopped at
    step 4 and resumed to 6, its parameters equal those of a run that went to 6 at once, bit for bit."""
    workdir = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=32, data_dir=str(tmp_path / "data")):
        state = experiment.train_and_evaluate(lsun_tiny_config(tmp_path / "data"), workdir)
        assert int(state.step) == 4
        assert_run_outputs(workdir, 4)
        out = capsys.readouterr().out
        assert "Data: lsun/church_outdoor train, streamed from ArrayRecord (32 images" in out
        assert "step 4/4" in out and "eval bits/dim" in out and "wrote" in out
        # Asked for two more steps, the run resumes from its checkpoint instead of starting over.
        resumed = experiment.train_and_evaluate(lsun_tiny_config(tmp_path / "data", num_steps=6), workdir)
        resumed_out = capsys.readouterr().out
        assert "Resuming from the checkpoint at step 4" in resumed_out
        assert int(resumed.step) == 6
        assert_run_outputs(workdir, 6)
        uninterrupted = experiment.train_and_evaluate(lsun_tiny_config(tmp_path / "data", num_steps=6), tmp_path / "b")
        for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(uninterrupted), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # The logged scalars of both sessions read back as one series, equal to the printed lines.
        metrics = logs.read_metrics(workdir)
        steps, losses = metrics["loss"]
        assert steps.tolist() == [2, 4, 6]
        assert f"step 4/4  loss {losses[1]:.4f}" in out and f"step 6/6  loss {losses[2]:.4f}" in resumed_out
        bpd_steps, bpd = metrics["eval/total_bpd"]
        assert bpd_steps.tolist() == [4, 6]
        assert f"step 4  eval bits/dim {bpd[0]:.3f}" in out and f"step 6  eval bits/dim {bpd[1]:.3f}" in resumed_out
    with pytest.raises(FileNotFoundError, match="No TensorBoard logs"):
        logs.read_metrics(tmp_path / "data")


def test_a_tiny_run_on_the_real_digits(tmp_path, capsys, caplog):
    workdir = tmp_path / "run"
    config = tiny_config(tmp_path / "data", num_steps=2, eval_every=0, sample_every=2, checkpoint_every=2)
    caplog.set_level(logging.DEBUG, logger="jax._src.interpreters.pxla")  # JAX logs each lowering there
    state = experiment.train_and_evaluate(config, workdir)
    assert int(state.step) == 2
    # The step is lowered once, on the compiling thread, from the batch's and the state's shapes: the steps reuse it.
    lowered = [r for r in caplog.records if re.match(r"Compiling jit\(train_step\) ", r.getMessage())]
    assert len(lowered) == 1 and lowered[0].threadName.startswith("jaxdiff-compile"), [r.threadName for r in lowered]
    grid = assert_run_outputs(workdir, 2)
    assert np.asarray(grid).std() > 0  # not a blank picture
    out = capsys.readouterr().out
    assert "step 2/2" in out
    assert re.search(r"Start-up: [\d.]+ s .* the state in [\d.]+ s, the train step .* in [\d.]+ s\.", out), out
    leaves = jax.tree_util.tree_leaves(state.params)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)


def test_the_start_up_runs_both_sides_to_their_end_and_raises_the_error_of_either():
    ended = []

    def here():
        ended.append("here")
        return 7

    def fails(what):
        def fn():
            ended.append(what)
            raise ValueError(what)

        return fn

    result, here_seconds, (thread_result, thread_seconds) = experiment._side_by_side(here, lambda: ended.append(3))
    assert result == 7 and thread_result is None and here_seconds >= 0 and thread_seconds >= 0
    assert sorted(ended, key=str) == [3, "here"]
    for here_fn, thread_fn, message in ((here, fails("compile"), "compile"), (fails("restore"), here, "restore")):
        ended.clear()
        with pytest.raises(ValueError, match=message):
            experiment._side_by_side(here_fn, thread_fn)
        assert len(ended) == 2  # the other side ran to its end before the error was raised


def test_a_diverging_run_stops_at_the_first_non_finite_step(tmp_path):
    import tensorflow_datasets as tfds

    config = tiny_config(tmp_path / "data", num_steps=4, log_every=4, checkpoint_every=2, eval_every=0, sample_every=0)
    config.optim.lr = 1e30  # the first update sends the weights to ~1e30: the second forward pass overflows
    config.optim.warmup_steps = 0
    with tfds.testing.mock_data(num_examples=32, data_dir=str(tmp_path / "data")):
        with pytest.raises(actions.NonFiniteLossError, match="at step 2"):
            experiment.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "2").exists()


def test_a_conditional_run_logs_what_sample_py_computes(tmp_path):
    """A class-conditional run's last logged bits/dim equals ``sample.py --eval=bpd`` on the same images and keys,
    and its last sample grid (the classes in turn) equals ``sample.py``'s with the same seed."""
    from PIL import Image

    from jaxdiff import commands

    workdir = tmp_path / "run"
    config = tiny_config(tmp_path / "data", num_steps=2, eval_every=2, sample_every=2, checkpoint_every=2)
    config.data.class_conditional = True
    config.diffusion.label_dropout = 0.2
    config.optim.lr, config.optim.warmup_steps = 1e-2, 0  # two steps that move the (zero-initialised) output layer
    config.training.num_samples = 4
    experiment.train_and_evaluate(config, workdir)
    pipe = pipeline.from_workdir(workdir)
    assert pipe.num_classes == 10 and pipe.null_class == 10

    n = config.training.eval_batch_size
    request = dict(workdir=str(workdir), seed=config.seed, out=str(tmp_path / "out"))
    assert commands.sample(commands.SampleRequest(eval="bpd", split=f"test[:{n}]", **request)) == 0
    from_sample_py = json.loads((tmp_path / "out" / "bpd.json").read_text())["bits_per_dim"]
    logged = logs.read_metrics(workdir)
    for term in ("total", "prior", "denoising", "reconstruction"):
        steps, values = logged[f"eval/{term}_bpd"]
        assert steps.tolist() == [2]
        assert values[-1] == pytest.approx(from_sample_py[term], rel=1e-5, abs=1e-6), term

    assert commands.sample(commands.SampleRequest(num_samples=4, **request)) == 0
    grid = np.asarray(Image.open(workdir / "samples_0000002.png"))
    np.testing.assert_array_equal(grid, np.asarray(Image.open(tmp_path / "out" / "grid.png")))
    # The grid drew the classes in turn: with the first image's class for all four, only the first image is the same.
    drawn = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert (
        commands.sample(commands.SampleRequest(num_samples=4, label=0, **{**request, "out": str(tmp_path / "o")})) == 0
    )
    zeros = np.load(tmp_path / "o" / "samples.npz")["arr_0"]
    np.testing.assert_array_equal(zeros[0], drawn[0])
    assert all(np.any(zeros[i] != drawn[i]) for i in (1, 2, 3))


class FourOfFiveDigits(tfds.core.GeneratorBasedBuilder):
    """A test dataset that declares 5 classes while its train split holds labels 0..3 only (built offline)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {"image": tfds.features.Image(shape=(8, 8, 1)), "label": tfds.features.ClassLabel(num_classes=5)}
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(4), "test": self._generate_examples(5)}

    def _generate_examples(self, classes):
        rng = np.random.default_rng(classes)
        for i in range(40):
            yield i, {"image": rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), "label": i % classes}


def test_the_number_of_classes_comes_from_the_dataset_metadata_not_the_labels_seen(tmp_path):
    config = tiny_config(tmp_path / "data", num_steps=1, eval_every=0, sample_every=0, checkpoint_every=1)
    config.data.update(dataset="four_of_five_digits", download=True, class_conditional=True)
    data = experiment.run_config(config).data
    _, labels = load_split(data)
    assert labels.max() + 1 == 4 and num_classes(data) == 5  # the train split lacks class 4
    experiment.train_and_evaluate(config, tmp_path / "run")
    pipe = pipeline.from_workdir(tmp_path / "run")
    assert pipe.num_classes == 5 and pipe.null_class == 5  # the null class is one past the declared classes
    assert num_classes(dataclasses.replace(data, label_key="nothing")) is None


def test_label_dropout_replaces_the_configured_share_of_labels_by_the_null_class():
    seen = []

    def apply(params, x, t, labels, key):
        jax.debug.callback(lambda y: seen.append(np.asarray(y)), labels)
        return params["w"] * x

    n, rate = 20_000, 0.1
    objective = pipeline.DiffusionConfig(num_timesteps=10, label_dropout=rate)
    opt = training.OptimConfig(total_steps=1, warmup_steps=0)
    optimizer = training.make_optimizer(opt)
    schedule = unscaled_linear(10)
    step = training.make_train_step(apply, schedule, objective, optimizer, opt, seed=0, null_class=10)
    state = training.init_train_state({"w": jnp.ones(())}, optimizer, 10)
    labels = jnp.arange(n, dtype=jnp.int32) % 10
    jax.jit(step)(state, {"image": jnp.zeros((n, 1, 1, 1)), "label": labels})
    dropped = seen[-1] == 10
    assert abs(dropped.sum() - n * rate) < 4 * np.sqrt(n * rate * (1 - rate))  # binomial: 4 standard deviations
    np.testing.assert_array_equal(seen[-1][~dropped], np.asarray(labels)[~dropped])  # the others are untouched


def test_guidance_needs_a_conditional_model_and_is_the_run_s_sampling_default(tmp_path):
    config = load_config("digits")
    config.sampling.guidance = 2.0
    with pytest.raises(ValueError, match=r"class_conditional=True and config\.diffusion\.label_dropout > 0"):
        experiment.run_config(config)
    run = experiment.run_config(load_config("digits_cond"))
    assert run.sampling.guidance == 0.5 and run.data.class_conditional and run.diffusion.label_dropout > 0
    spec = pipeline.ModelSpec(run.network(1, 10), run.diffusion, True, run.data, run.sampling.guidance)
    assert pipeline.ModelSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    older = {k: v for k, v in spec.to_json().items() if k != "guidance"}  # a checkpoint from before the field
    assert pipeline.ModelSpec.from_json(older).guidance == 0.0


def test_an_autoguided_run_keeps_its_guide_and_samples_as_sample_py_does(tmp_path):
    """A run with autoguidance saves and keeps the guide's checkpoint (off the checkpoint period, past keep=1), its
    last grid is the autoguided one that ``sample.py`` draws by default, its bound is the network's own, and
    ``from_workdir``'s network is (1 + w) main - w guide."""
    from PIL import Image

    from jaxdiff import commands

    workdir, w = tmp_path / "run", 1.5
    config = tiny_config(tmp_path / "data", num_steps=3, eval_every=3, sample_every=3, checkpoint_every=2)
    config.training.keep_checkpoints, config.training.num_samples = 1, 4
    config.sampling.autoguidance, config.sampling.guide_step = w, 1
    config.sampling.autoguided_samplers = ("ddpm", "ddim")  # the grid's DDPM too (by default the ODE samplers only)
    config.optim.lr, config.optim.warmup_steps = 1e-2, 0  # steps that move the (zero-initialised) output layer
    experiment.train_and_evaluate(config, workdir)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [1, 3]  # the guide, the last

    guided, plain = pipeline.from_workdir(workdir, autoguidance=None), pipeline.from_workdir(workdir)
    guide = pipeline.from_workdir(workdir, step=1)
    assert "autoguided (w = 1.5) by its EMA at step 1" in guided.source and plain.guide_step == 1
    assert pipeline.from_workdir(workdir, autoguidance=None, sampler="heun").source == plain.source  # not listed
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([5, 90], jnp.int32)
    main_out, guide_out = plain.apply_fn(plain.params, x, t, None), guide.apply_fn(guide.params, x, t, None)
    assert float(jnp.abs(main_out - guide_out).max()) > 1e-4  # two steps apart: the guide differs
    np.testing.assert_allclose(
        guided.apply_fn(guided.params, x, t, None), (1 + w) * main_out - w * guide_out, rtol=1e-5, atol=1e-5
    )

    request = dict(workdir=str(workdir), seed=config.seed, num_samples=4)
    assert commands.sample(commands.SampleRequest(out=str(tmp_path / "guided"), **request)) == 0
    assert commands.sample(commands.SampleRequest(out=str(tmp_path / "plain"), autoguidance=0.0, **request)) == 0
    grid = np.asarray(Image.open(workdir / "samples_0000003.png"))
    np.testing.assert_array_equal(grid, np.asarray(Image.open(tmp_path / "guided" / "grid.png")))
    assert np.any(grid != np.asarray(Image.open(tmp_path / "plain" / "grid.png")))

    n = config.training.eval_batch_size
    bpd = dict(eval="bpd", split=f"test[:{n}]", out=str(tmp_path / "bpd"))
    assert commands.sample(commands.SampleRequest(**{**request, **bpd})) == 0  # the network's bound, unguided
    from_sample_py = json.loads((tmp_path / "bpd" / "bpd.json").read_text())["bits_per_dim"]
    assert logs.read_metrics(workdir)["eval/total_bpd"][1][-1] == pytest.approx(from_sample_py["total"], rel=1e-5)

    assert pipeline.from_workdir(workdir, step=1, autoguidance=None).source == guide.source  # no guide yet: unguided
    with pytest.raises(ValueError, match="not later than its guide"):
        pipeline.from_workdir(workdir, step=1, autoguidance=w)
    with pytest.raises(ValueError, match="needs --workdir"):
        commands.SampleRequest(pretrained="x", autoguidance=1.0)
    with pytest.raises(ValueError, match="measures the network itself"):
        commands.SampleRequest(**{**request, **bpd, "autoguidance": 1.0})


def test_a_run_that_kept_no_guide_samples_unguided_and_refuses_autoguidance(tmp_path):
    fake_run(tmp_path / "run")  # saved without a guide
    assert pipeline.from_workdir(tmp_path / "run", autoguidance=None).source.endswith("EMA)")  # the run's own: none
    with pytest.raises(ValueError, match="trained without a guide checkpoint"):
        pipeline.from_workdir(tmp_path / "run", autoguidance=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# The optimizer's schedule, gradient accumulation, the EMA and weight decay, each against its formula


def test_k_micro_batches_give_the_update_of_the_whole_batch_and_the_schedule_counts_updates():
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (16, 8, 8, 1)), jnp.float32)
    batch = {"image": images, "label": jnp.zeros((16,), jnp.int32)}
    schedule = unscaled_linear(100)
    objective = pipeline.DiffusionConfig(num_timesteps=100)
    params = tiny_run()[0].params
    runs = {}
    for k in (1, 4):
        opt = training.OptimConfig(lr=1e-3, warmup_steps=2, total_steps=6, decay="linear", grad_accum_steps=k)
        optimizer = training.make_optimizer(opt)
        step = jax.jit(training.make_train_step(make_apply(TINY), schedule, objective, optimizer, opt, seed=0))
        state, lrs, losses = training.init_train_state(params, optimizer, 100), [], []
        for _ in range(6):
            state, metrics = step(state, batch)
            lrs.append(float(metrics["lr"]))
            losses.append(float(metrics["loss"]))
        runs[k] = state, lrs, losses
    (one, lrs_one, losses_one), (four, lrs_four, losses_four) = runs[1], runs[4]
    assert int(four.step) == 6  # six optimizer updates, each over 4 micro-batches of 4
    np.testing.assert_allclose(losses_four, losses_one, rtol=1e-5)
    # Float summation order differs; Adam divides by sqrt(v), which magnifies it where a gradient is near 0. Adam moves
    # a weight by at most ~lr = 1e-3 an update: 1e-5 is 1% of one update. (Measured: 1 of 36,864 weights beyond 1e-6.)
    for a, b in zip(jax.tree_util.tree_leaves(four.params), jax.tree_util.tree_leaves(one.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The learning rate of update s: linear warmup to 1e-3 over 2 updates, then a linear decay that reaches 0 at 6.
    expected = [1e-3 * s / 2 if s < 2 else 1e-3 * (1 - (s - 2) / 4) for s in range(6)]
    np.testing.assert_allclose(lrs_four, expected, rtol=1e-6)
    assert lrs_four == lrs_one
    assert float(training.learning_rate(opt)(6)) == 0.0  # the decay ends at 0 after total_steps updates
    config = load_config("digits")
    config.optim.grad_accum_steps = 5
    with pytest.raises(ValueError, match=r"batch_size = 32 .* does not split into config\.optim\.grad_accum_steps = 5"):
        experiment.run_config(config)


def toy_step(opt, apply):
    """A one-scalar 'network' ``{'w': w}`` trained by make_train_step, for checking the optimizer and EMA formulas."""
    optimizer = training.make_optimizer(opt)
    objective = pipeline.DiffusionConfig(num_timesteps=10)
    step = jax.jit(training.make_train_step(apply, unscaled_linear(10), objective, optimizer, opt, seed=0))
    return step, training.init_train_state({"w": jnp.asarray(2.0)}, optimizer, 10)


def test_the_ema_follows_its_warmup_formula_once_per_update():
    opt = training.OptimConfig(lr=0.1, warmup_steps=0, total_steps=20, ema_decay=0.9, ema_warmup=True)
    step, state = toy_step(opt, lambda p, x, t, y, key: p["w"] * x)
    batch = {"image": jnp.ones((4, 1, 1, 1)), "label": jnp.zeros((4,), jnp.int32)}
    ema = 2.0
    for n in range(20):
        state, _ = step(state, batch)
        decay = min(0.9, (1 + n) / (10 + n))  # 0.1 at the first update; the cap 0.9 binds from update 80 on
        ema = decay * ema + (1 - decay) * float(state.params["w"])
        assert float(training.ema_decay_at(jnp.asarray(n), opt)) == pytest.approx(decay, rel=1e-6)
    assert float(state.ema_params["w"]) == pytest.approx(ema, rel=1e-5)
    assert float(state.ema_params["w"]) != pytest.approx(float(state.params["w"]), rel=1e-3)  # it lags


def test_weight_decay_shrinks_the_weights_by_lr_times_decay_at_every_update():
    # The loss does not depend on w, so Adam's part of the update is 0 and only the decoupled decay acts:
    # w <- w - lr_s * weight_decay * w, with lr_s the schedule's (a linear warmup over 3 updates).
    opt = training.OptimConfig(lr=0.05, warmup_steps=3, total_steps=10, weight_decay=0.5)
    step, state = toy_step(opt, lambda p, x, t, y, key: 0.0 * p["w"] + x)
    batch = {"image": jnp.ones((4, 1, 1, 1)), "label": jnp.zeros((4,), jnp.int32)}
    w = 2.0
    for s in range(8):
        state, metrics = step(state, batch)
        lr = 0.05 * min(s / 3, 1.0)
        assert float(metrics["lr"]) == pytest.approx(lr, rel=1e-6)
        w -= lr * 0.5 * w
    assert float(state.params["w"]) == pytest.approx(w, rel=1e-5)
    assert w < 0.9 * 2.0  # it did shrink


def test_bf16_training_keeps_float32_state_and_tracks_the_float32_run():
    """50 steps of the tiny UNet (attention included) in bfloat16 compute against float32, from the same start."""
    state32, step32 = tiny_run()
    opt = training.OptimConfig(lr=2e-3, warmup_steps=0, total_steps=100, ema_decay=0.9)  # tiny_run's
    net16 = dataclasses.replace(TINY, dtype="bfloat16")
    objective = pipeline.DiffusionConfig(num_timesteps=100)
    optimizer = training.make_optimizer(opt)
    step16 = jax.jit(training.make_train_step(make_apply(net16), unscaled_linear(100), objective, optimizer, opt, 0))
    images = np.random.default_rng(0).integers(0, 2, (16, 8, 8, 1)) * 2.0 - 1.0
    batch = {"image": jnp.asarray(images, jnp.float32), "label": jnp.zeros((16,), jnp.int32)}
    curves, state16 = {32: [], 16: []}, state32
    for _ in range(50):
        state32, m32 = step32(state32, batch)
        state16, m16 = step16(state16, batch)
        curves[32].append(float(m32["loss"]))
        curves[16].append(float(m16["loss"]))
        assert m16["finite"] == 1.0
    # Parameters, EMA and Adam's moments stay float32 (only the compute is bfloat16).
    floats = [x for x in jax.tree_util.tree_leaves((state16.params, state16.ema_params, state16.opt_state))]
    assert {x.dtype for x in floats if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype("float32")}
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in floats)
    # Measured: the per-step loss differs by 0.16% on average and 0.83% at most (2026-11-29), 0.14% and 0.65% (AMD
    # EPYC). Allowed: 3x the larger figures, for other CPU kinds' float32 sums under the bf16 roundings.
    rel = np.abs(np.array(curves[16]) - curves[32]) / np.array(curves[32])
    assert rel.mean() < 0.005 and rel.max() < 0.025, (rel.mean(), rel.max())
    assert np.mean(curves[16][-10:]) < 0.75 * np.mean(curves[16][:5])  # and it trains


def test_bf16_networks_reduce_in_float32():
    """Every reduction of the bf16 forward (GroupNorm's mean and variance, the attention softmax's max and sum) runs
    in float32: bfloat16's 8-bit mantissa would lose the small differences they are made of."""
    net16 = dataclasses.replace(TINY, dtype="bfloat16")
    params = tiny_run()[0].params
    jaxpr = jax.make_jaxpr(make_apply(net16))(params, jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32))

    def eqns(jaxpr):  # every equation, inside called and custom-differentiated sub-programs too
        for e in jaxpr.eqns:
            yield e
            for value in e.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    yield from eqns(inner)

    everything = list(eqns(jaxpr.jaxpr))
    reductions = [e for e in everything if e.primitive.name in ("reduce_sum", "reduce_max")]
    assert len(reductions) >= 2 * 11  # 11 GroupNorms (mean, mean of squares) and the softmaxes
    assert {str(v.aval.dtype) for e in reductions for v in e.invars} == {"float32"}
    convs = [e for e in everything if e.primitive.name == "conv_general_dilated"]
    assert convs and {str(e.outvars[0].aval.dtype) for e in convs} == {"bfloat16"}  # the compute is bf16
