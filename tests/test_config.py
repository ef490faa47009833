"""The config boundary (issue #33): configs/default.py and the dataclasses are one set of defaults, a stored spec reads
back as it was written, and every shipped config gives a run at any ``training.num_steps``, however short."""

import dataclasses
import json
import math

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdiff import actions, experiment, pipeline, training
from jaxdiff.data import DataConfig
from jaxdiff.errors import ConfigError
from jaxdiff.models.unet import UNetConfig
from jaxdiff.spec import DiffusionConfig, ModelSpec
from tests.helpers import NET, ROOT, load_config

CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
#: Each section of a config: its dataclass and the fields a run derives instead of reading them from the config.
SECTIONS = {
    "data": (DataConfig, ()),
    "model": (UNetConfig, experiment.DERIVED_NETWORK_FIELDS),
    "diffusion": (DiffusionConfig, ()),
    "optim": (training.OptimConfig, experiment.DERIVED_OPTIM_FIELDS),
    "training": (experiment.TrainingConfig, ()),
    "sampling": (experiment.SamplingConfig, ()),
    "evaluation": (experiment.EvaluationConfig, ()),
}
#: The settings that count steps of the run, each a period of a periodic action (0: never).
PERIODS = (
    "training.log_every",
    "training.sample_every",
    "training.eval_every",
    "training.checkpoint_every",
    "evaluation.fid_every",
)


def short(name: str, num_steps: int, **sampling):
    """``configs/<name>.py`` with ``--config.training.num_steps=<num_steps>`` and ``config.sampling`` overrides."""
    config = load_config(name)
    config.training.num_steps = num_steps
    for key, value in sampling.items():
        setattr(config.sampling, key, value)
    return config


# ---------------------------------------------------------------------------------------------------------------------
# One set of defaults


def test_every_config_key_is_a_dataclass_field_and_every_field_a_key():
    """The config boundary is mechanical: each section of configs/default.py is one dataclass, key for key (the
    fields a run derives from the data are named), and every shipped config maps onto them."""
    config = load_config("default").to_dict()
    assert set(config) == {f.name for f in dataclasses.fields(experiment.RunConfig)} == {*SECTIONS, "seed"}
    for name, (cls, derived) in SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(derived) <= fields, name
        assert set(config[name]) == fields - set(derived), name
    for name in CONFIGS:  # a stray key would fail here
        experiment.run_config(load_config(name))


def test_the_dataclasses_defaults_are_configs_default_py_field_for_field():
    """Each field's default is default.py's value (a sequence compared as a tuple), and the dataclasses built with
    no arguments are what the default config resolves to."""
    config = load_config("default").to_dict()
    for section, (cls, derived) in SECTIONS.items():
        for field in dataclasses.fields(cls):
            if field.name in derived:
                continue
            default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
            value = config[section][field.name]
            value = tuple(value) if isinstance(value, list | tuple) else value
            assert value == default and type(value) is type(default), f"config.{section}.{field.name}"
    run = experiment.run_config(load_config("default"))
    assert run.data == DataConfig() and (run.data.dataset, run.data.image_size) == ("cifar10", 32)
    assert run.diffusion == DiffusionConfig() and run.diffusion.variance == "fixed_large"
    assert run.optim == training.OptimConfig(total_steps=run.training.num_steps)
    assert run.training == experiment.TrainingConfig()
    assert run.sampling == experiment.SamplingConfig()
    assert run.evaluation == experiment.EvaluationConfig()
    assert run.network(3, None) == UNetConfig()


def test_an_image_size_of_none_is_the_datasets_own():
    sizes = {d: DataConfig(dataset=d).image_size for d in ("digits", "mnist", "fashion_mnist", "cifar10")}
    assert sizes == {"digits": 8, "mnist": 28, "fashion_mnist": 28, "cifar10": 32}
    assert DataConfig(dataset="digits", image_size=16).image_size == 16
    with pytest.raises(ConfigError, match=r"knows only for digits 8, .*image_size for 'lsun/church_outdoor'"):
        DataConfig(dataset="lsun/church_outdoor")


def test_a_stored_spec_reads_back_as_written_and_a_missing_field_as_it_meant_then():
    """A spec stores every field (so a changed default cannot change a run's model); one from before a field existed
    reads it as the default of its time: the data digits at 8x8 unflipped, the variance fixed_small."""
    spec = ModelSpec(NET, DiffusionConfig(num_timesteps=100), data=DataConfig())
    assert ModelSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert spec.diffusion.variance == "fixed_large" and spec.data.dataset == "cifar10"
    older = spec.to_json()
    older["diffusion"] = {k: v for k, v in older["diffusion"].items() if k != "variance"}
    older["data"] = {k: v for k, v in older["data"].items() if k not in ("dataset", "image_size", "random_flip")}
    read = ModelSpec.from_json(older)
    assert read.diffusion == DiffusionConfig(num_timesteps=100, variance="fixed_small")
    assert read.data == DataConfig(dataset="digits", image_size=8, random_flip=False)


# ---------------------------------------------------------------------------------------------------------------------
# Short runs: what each setting that counts steps becomes


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_resolves_at_one_two_and_three_steps(name, capsys):
    """``--config.training.num_steps=N`` for N = 1, 2, 3: no guide (no shipped config is autoguided), a learning rate
    in [0, lr] at every step (a warmup as long as the run is said in the log), and each periodic action after step N
    (a period longer than the run: once, at its end)."""
    for n in (1, 2, 3):
        run = experiment.run_config(short(name, n))
        out = capsys.readouterr().out
        assert run.training.num_steps == run.optim.total_steps == n
        assert run.sampling.guide_step is None and run.sampling.guide_steps == ()
        rates = np.asarray([training.learning_rate(run.optim)(step) for step in range(n + 1)])
        assert np.all(np.isfinite(rates)) and np.all(rates >= 0) and np.all(rates <= run.optim.lr * (1 + 1e-6))
        assert ("is not shorter than the run" in out) == (run.optim.warmup_steps >= n), out
        for setting in PERIODS:
            section, key = setting.split(".")
            period = getattr(getattr(run, section), key)
            fired = []
            action = actions.every(period, n, lambda step, fired=fired, **_: fired.append(step))
            if period <= 0:
                assert action is None, setting
                continue
            for step in range(1, n + 1):
                action(step)
            assert fired and fired[-1] == n, (setting, period, fired)


@pytest.mark.parametrize("name", CONFIGS)
def test_an_autoguided_config_has_its_guide_strictly_before_the_end(name, capsys):
    """With autoguidance on, the guide is ``guide_fraction`` (a third) of the run: step 1 of 2 or 3, 80 of 240; a run
    of one step has no earlier step, so the guide is off, and the log says so."""
    for n, guide in ((2, 1), (3, 1), (240, 80)):
        run = experiment.run_config(short(name, n, autoguidance=1.5))
        assert run.sampling.guide_step == guide and run.sampling.guide_steps == (guide,) and guide < n
        assert run.sampling.autoguidance == 1.5
    assert capsys.readouterr().out.count("autoguid") == 0
    run = experiment.run_config(short(name, 1, autoguidance=1.5))
    assert run.sampling.guide_step is None and run.sampling.autoguidance == 0
    out = capsys.readouterr().out
    assert "A run of 1 step has no earlier step to be autoguided by: autoguidance is off" in out, out


def test_an_absolute_guide_step_is_kept_before_the_end_and_replaced_by_the_fraction_at_or_past_it(capsys):
    """configs written before guide_fraction: guide_step 1000 (the digits' former guide) on the 3,000-step run is
    kept; on a run shortened to 240 or 1000 steps it is the fraction's step instead, with a log line; at one step the
    guide is off. Set without autoguidance, the run still keeps that checkpoint."""
    run = experiment.run_config(short("digits", 3000, autoguidance=1.5, guide_step=1000))
    assert run.sampling.guide_step == 1000 and capsys.readouterr().out == ""
    for n, guide in ((240, 80), (1000, 333)):
        run = experiment.run_config(short("digits", n, autoguidance=1.5, guide_step=1000))
        assert run.sampling.guide_step == guide
        out = capsys.readouterr().out
        assert f"guide_step = 1000 is not before the run's end (config.training.num_steps = {n})" in out
        assert f"the guide is the EMA at step {guide} instead" in out
    run = experiment.run_config(short("digits", 1, autoguidance=1.5, guide_step=1000))
    assert (run.sampling.guide_step, run.sampling.autoguidance) == (None, 0.0)
    assert "no earlier step" in capsys.readouterr().out
    assert experiment.run_config(short("digits", 3000, guide_step=1000)).sampling.guide_steps == (1000,)
    assert experiment.run_config(short("digits", 240, guide_step=1000)).sampling.guide_steps == (80,)


def test_the_guide_fraction_gives_a_step_from_1_to_the_one_before_the_end():
    for fraction in (1e-6, 0.01, 1 / 3, 0.5, 0.99, 1 - 1e-9):
        sampling = experiment.SamplingConfig(autoguidance=1.0, guide_fraction=fraction)
        for n in range(2, 400):
            step = sampling.for_run(n)[0].guide_step
            clipped = not 1 <= fraction * n <= n - 1
            assert 1 <= step <= n - 1 and (clipped or abs(step - fraction * n) <= 0.5), (fraction, n, step)
    assert experiment.SamplingConfig(autoguidance=1.0).for_run(3000)[0].guide_step == 1000
    assert experiment.SamplingConfig(autoguidance=1.0, guide_fraction=0.3333).for_run(3000)[0].guide_step == 1000
    for bad in (0, 1, 1.5, -0.1, True, None, math.nan):
        with pytest.raises(ConfigError, match=r"guide_fraction must lie in \(0, 1\)"):
            experiment.SamplingConfig(guide_fraction=bad)


def test_a_resumed_run_keeps_the_guide_its_checkpoints_record():
    """Asked for more steps, an autoguided run keeps the guide it kept (step 1000 of its first 3,000), not the third
    of the new 6,000, whose checkpoint was never saved; a guide_step asked for and followed, or a fresh run, is as
    resolved; one not followed (past the new end) is not the user's choice either."""
    run = experiment.run_config(short("digits", 6000, autoguidance=1.5))
    assert run.sampling.guide_step == 2000
    first = {"sampling": {"guide_step": 1000, "guide_fraction": 1 / 3}}
    kept, note = experiment._resumed_guide(run, experiment._guide_step_of(first), None)
    assert kept.sampling.guide_step == 1000 and kept.sampling.guide_steps == (1000,)
    assert "its guide stays the EMA at step 1000" in note and "would be step 2000" in note
    assert kept.training == run.training and kept.sampling.autoguidance == 1.5
    for stored in (None, {"sampling": {"guide_step": None}}):
        assert experiment._resumed_guide(run, experiment._guide_step_of(stored), None) == (run, None)
    asked = experiment.run_config(short("digits", 6000, autoguidance=1.5, guide_step=3000))
    assert experiment._resumed_guide(asked, 1000, 3000) == (asked, None)
    shorter = experiment.run_config(short("digits", 900, autoguidance=1.5))  # the stored guide is past the new end
    assert experiment._resumed_guide(shorter, 1000, None) == (shorter, None)
    # guide_step 5000 of a 6,000-step run, resumed for 4,000: 5000 is past the end, so the guide that was kept stays.
    past = experiment.run_config(short("digits", 4000, autoguidance=1.5, guide_step=5000))
    assert experiment._resumed_guide(past, 5000, 5000) == (past, None)
    assert experiment._resumed_guide(past, 1000, 5000)[0].sampling.guide_step == 1000


# ---------------------------------------------------------------------------------------------------------------------
# Short runs, trained


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data directory that the digits are built into (offline, once) by the first run that reads them."""
    return tmp_path_factory.mktemp("data")


def two_steps(name: str, data_dir, workdir, **overrides):
    """``configs/<name>.py`` trained for 2 steps into ``workdir`` (``section.key`` overrides), and its final state."""
    config = load_config(name)
    config.data.data_dir = str(data_dir)
    config.training.num_steps = 2
    for setting, value in overrides.items():
        section, key = setting.split(".")
        setattr(getattr(config, section), key, value)
    return experiment.train_and_evaluate(config, workdir)


def assert_ran_two_steps(state, workdir, out: str, bound: bool = True) -> None:
    """Step 2 was reached, checkpointed, reported and sampled (every period is longer than the run: each action ran
    once, after the last step), and the bound evaluated where the dataset has a held-out split."""
    assert int(state.step) == 2
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2]
    assert (workdir / "samples_0000002.png").is_file()
    assert "step 2/2  loss" in out and "wrote" in out
    assert ("step 2  eval bits/dim" in out) == bound, out


# digits, and its EDM and flow-matching variants (their train step, their bound and their DDPM grid go through the
# Pipeline's VP view of the network: jaxdiff.pipeline.loaders.path_apply) in the fast set; the conditional and DDPM
# variants (their 2-step runs: ~30 s each) with the slow tests, their resolution at 1-3 steps above is fast, and
# tests/test_training.py trains both kinds of network.
@pytest.mark.parametrize(
    "name",
    [
        "digits",
        "digits_edm",
        "digits_flow",
        pytest.param("digits_cond", marks=pytest.mark.slow),
        pytest.param("digits_ddpm", marks=pytest.mark.slow),
    ],
)
def test_a_digits_config_trains_for_two_steps(name, data_dir, tmp_path, capsys):
    """The config as shipped, but for 2 steps, and small where the cost is not the point, to keep it under ~40 s on 2
    cores: no FID at the end (``evaluation.fid_every = 0``: setting up the held-out judge, the digits classifier and
    features of both splits, takes a minute whatever the run's length; it fires after the last step as the grid and
    the checkpoint do, and the slow test below runs it), 8 grid samples and 4 held-out images for the bound (each a
    chain of T network calls: T = 1000 on digits_ddpm)."""
    small = {"evaluation.fid_every": 0, "training.num_samples": 8, "training.eval_batch_size": 4}
    state = two_steps(name, data_dir, tmp_path / "run", **small)
    out = capsys.readouterr().out
    assert_ran_two_steps(state, tmp_path / "run", out)
    assert "warmup_steps = 100 is not shorter than the run" in out
    assert pipeline.from_workdir(tmp_path / "run").guide_step is None


@pytest.mark.slow
def test_the_digits_default_as_shipped_trains_for_two_steps_and_judges_its_samples(data_dir, tmp_path, capsys):
    """configs/digits.py, nothing changed but the 2 steps: the FID (``fid_every`` 3000) runs after the last step."""
    state = two_steps("digits", data_dir, tmp_path / "run")
    out = capsys.readouterr().out
    assert_ran_two_steps(state, tmp_path / "run", out)
    assert "step 2  FD " in out and "(297 EMA samples, digits-classifier-seed0 features)" in out


def test_an_autoguided_run_of_two_steps_keeps_its_guide_and_keeps_it_when_resumed_for_more(data_dir, tmp_path, capsys):
    """configs/tiny.py autoguided by the fraction: at 2 steps the guide is step 1 (saved off the period, kept); resumed
    for 6 steps, the run keeps that guide (a third of 6 would be step 2, never kept as a guide), and so does the
    spec that sample.py reads."""
    workdir = tmp_path / "run"
    config = {"sampling.autoguidance": 1.5, "training.keep_checkpoints": 1, "training.checkpoint_every": 2}
    two_steps("tiny", data_dir, workdir, **config)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [1, 2]
    assert pipeline.from_workdir(workdir).guide_step == 1
    assert json.loads((workdir / "config.json").read_text())["sampling"]["guide_step"] == 1
    capsys.readouterr()
    state = two_steps("tiny", data_dir, workdir, **config, **{"training.num_steps": 6})
    assert int(state.step) == 6
    assert "Resuming an autoguided run: its guide stays the EMA at step 1" in capsys.readouterr().out
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [1, 6]
    assert pipeline.from_workdir(workdir).guide_step == 1


#: The configs whose data must be downloaded.
MOCKED = ["cifar10", "mnist", "fashion_mnist", "celeba_hq", "lsun_bedroom", "lsun_church"]


@pytest.mark.parametrize("name", MOCKED)
def test_a_config_of_downloaded_data_trains_for_two_steps_on_mock_data(name, tmp_path, capsys):
    """The config's steps, periods and guide logic survive ``num_steps = 2``, on TFDS's mock data (random images of
    the dataset's features; ``download=True`` only lets the mock splits count as prepared): 2 steps, the report and a
    checkpoint after the last. What is not the point is made small, to take ~10 s on 2 cores: batch 2, one residual
    block of 32 base channels per level (the levels and attention as configured), the 256x256 configs' images at
    32x32 (their six levels still fit), and no grid or bound (each a chain of T = 1000 network calls at 32x32; the
    digits runs above check that both fire after the last step)."""
    config = load_config(name)
    config.data.data_dir, config.data.download = str(tmp_path / "data"), True
    config.training.num_steps = 2
    config.training.batch_size, config.training.sample_every, config.training.eval_every = 2, 0, 0
    config.model.ch, config.model.num_res_blocks = 32, 1
    if config.data.image_size is not None and config.data.image_size > 32:
        config.data.image_size = 32
    with tfds.testing.mock_data(num_examples=4, data_dir=str(tmp_path / "data")):  # two batches of 2
        state = experiment.train_and_evaluate(config, tmp_path / "run")
    out = capsys.readouterr().out
    assert int(state.step) == 2 and "step 2/2  loss" in out
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [2]
    assert f"warmup_steps = {config.optim.warmup_steps} is not shorter than the run" in out
