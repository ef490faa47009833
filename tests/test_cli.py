"""The commands as a user meets them: installed from a wheel, quiet, and one line for each mistake.

- The installed tool: a wheel built from the checkout, installed into a fresh venv (its dependencies are this
  environment's, seen through a .pth line), runs ``jaxdiff-train --config=tiny`` and ``jaxdiff-sample`` from a folder
  outside the checkout. The same run is the console check: the digits are built afresh (a new data directory), and
  nothing that :data:`FOREIGN` lists may appear in what the commands print.
- Errors: each documented mistake prints one line, ``<command>: <what to do>``, exits with 2, and shows no traceback.
- The console's parts: TensorFlow's start-up lines dropped and its warnings kept; configs by name.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest

from jaxdiff.cli import console
from jaxdiff.errors import ConfigError
from tests.helpers import ROOT

#: What other libraries print that the commands must not show (the issue's list, and what was seen before #33).
FOREIGN = {
    "an absl log line (W/I/E prefix)": re.compile(r"^[WIE]\d{4} "),
    "absl's uninitialised-log notice": re.compile(r"All log messages before absl::InitializeLog"),
    "TensorFlow's oneDNN banner": re.compile(r"oneDNN"),
    "TFDS's variant-folder warning": re.compile(r"Variant folder"),
    "TFDS's build messages": re.compile(r"Downloading and preparing|downloaded and prepared|Generating splits"),
    "Orbax's read-only warnings": re.compile(r"read only|read_only"),
    "TFDS's OpenCV notice": re.compile(r"OpenCV"),
    "a Python warning": re.compile(r"\w+Warning: "),
    "a traceback": re.compile(r"^Traceback "),
}


def foreign_lines(output: str) -> list[str]:
    return [f"{what}: {line}" for line in output.splitlines() for what, p in FOREIGN.items() if p.search(line)]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv holding the wheel of the checkout; the rest of the stack is this environment's. Returns its bin/."""
    where = tmp_path_factory.mktemp("installed")
    # Built from a copy of what the wheel holds: setuptools leaves a build/ folder where it builds.
    source = where / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("jaxdiff", "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = where / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            f"--wheel-dir={wheels}",
            source,
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("jaxdiff-*.whl")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # This environment's packages, after the venv's own (a plain path line: its .pth files, among them the editable
    # install's finder, are not read, so `jaxdiff` can only come from the wheel).
    pathlib.Path(own, "stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return wheel, venv / "bin"


def test_the_wheel_carries_every_package_and_config(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("jaxdiff", "jaxdiff/cli", "jaxdiff/configs", "jaxdiff/data", "jaxdiff/models", "jaxdiff/samplers"):
        assert f"{package}/__init__.py" in names, package
    shipped = {p.name for p in (ROOT / "configs").glob("*.py")}
    assert {n.removeprefix("jaxdiff/configs/") for n in names if n.startswith("jaxdiff/configs/")} == shipped
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "jaxdiff-train = jaxdiff.cli.train:main" in text and "jaxdiff-sample = jaxdiff.cli.sample:main" in text


def test_the_installed_commands_train_and_sample_quietly_outside_the_checkout(installed, tmp_path, subprocess_env):
    _, bin_dir = installed
    env = {k: v for k, v in subprocess_env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import jaxdiff.configs as c, jaxdiff as j; print(j.__file__, c.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(ROOT) not in where and str(bin_dir.parent) in where, where

    run = lambda *argv: subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    data_dir = tmp_path / "tfds"  # empty: the run builds the digits, the noisiest step before #33
    trained = run(
        "jaxdiff-train",
        "--config=tiny",
        "--workdir=run",
        "--config.training.num_steps=2",
        f"--config.data.data_dir={data_dir}",
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert "Building the digits dataset" in trained.stdout and (data_dir / "digits").is_dir()
    sampled = run("jaxdiff-sample", "--workdir=run", "--num_samples=3", "--sampler=ddim", "--steps=3")
    assert sampled.returncode == 0, sampled.stdout[-3000:] + sampled.stderr[-3000:]
    with np.load(tmp_path / "run" / "samples" / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 8, 8, 1) and f["arr_0"].dtype == np.uint8
    for result in (trained, sampled):
        assert foreign_lines(result.stdout + result.stderr) == [], result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------- one-line errors

TRAIN = [sys.executable, str(ROOT / "train.py"), "--config=tiny"]
SAMPLE = [sys.executable, str(ROOT / "sample.py")]

ERRORS = {
    "a misspelled key": (
        [*TRAIN, "--workdir={w}", "--config.training.num_stepz=3"],
        r"no setting 'num_stepz' in the config .*Did you mean \"num_steps\"",
    ),
    "a value of the wrong type": ([*TRAIN, "--workdir={w}", "--config.optim.lr=fast"], r"could not convert .*'fast'"),
    "a bad value": ([*TRAIN, "--workdir={w}", "--config.optim.lr=-1"], r"Need lr > 0"),
    "an unknown dataset": ([*TRAIN, "--workdir={w}", "--config.data.dataset=nosuch"], r"Unknown dataset 'nosuch'"),
    "a dataset not prepared": (
        [*TRAIN, "--workdir={w}", "--config.data.dataset=cifar10", "--config.data.data_dir={w}/tfds"],
        r"'cifar10' is not prepared in .*`tfds build cifar10",
    ),
    "an impossible network": ([*TRAIN, "--workdir={w}", "--config.model.ch=30"], r"not divisible by num_groups=32"),
    "an unknown config": ([*TRAIN[:2], "--config=tinyy", "--workdir={w}"], r"No shipped config named 'tinyy'.*tiny"),
    "a missing workdir flag": (TRAIN, r"--workdir must have a value"),
    "a missing checkpoint": ([*SAMPLE, "--workdir={w}/none"], r"No checkpoint in .*: train first \(jaxdiff-train"),
    "an unknown flag": ([*SAMPLE, "--workdir={w}", "--stepz=3"], r"Unknown command line flag 'stepz'"),
    "both model flags": ([*SAMPLE, "--workdir={w}", "--pretrained={w}"], r"exactly one of --workdir .* --pretrained"),
}


@pytest.mark.parametrize("mistake", list(ERRORS))
def test_a_mistake_is_one_line_and_exit_status_2(mistake, tmp_path, subprocess_env):
    argv, message = ERRORS[mistake]
    argv = [a.replace("{w}", str(tmp_path)) for a in argv]
    result = subprocess.run(argv, env=subprocess_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(rf"(train|sample)\.py: .*{message}", lines[0]), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert foreign_lines(result.stdout) == []


def test_verbose_gives_the_traceback(tmp_path, subprocess_env):
    argv = [*TRAIN, f"--workdir={tmp_path}", "--config.optim.lr=-1", "--verbose"]
    result = subprocess.run(argv, env=subprocess_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError: Need lr > 0" in result.stderr


# ---------------------------------------------------------------------------------------------------- the console


def test_tensorflow_start_up_lines_are_dropped_and_its_warnings_kept():
    startup = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796599060.644656    9647 port.cc:153] oneDNN custom operations are on. You may see ...",
        "I1206 23:10:41.620168 140203583265664 cpu_feature_guard.cc:227] This TensorFlow binary is optimized ...",
        "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
        "appropriate compiler flags.",
    ]
    kept = [
        "W0000 00:00:1796599060.644656    9647 gpu_device.cc:2344] Cannot dlopen some GPU libraries.",
        "E1206 23:10:41.620168 1402 cuda_dnn.cc:8579] Unable to register cuDNN factory",
        "Some line of a library's own",
    ]
    dropped = lambda line: any(p.search(line) for p in console.TENSORFLOW_STARTUP)
    assert all(dropped(line) for line in startup) and not any(dropped(line) for line in kept)


def test_the_first_tensorflow_import_filters_stderr_at_the_file_descriptor(tmp_path):
    """A stand-in ``tensorflow`` package that writes TensorFlow's start-up lines and a warning to file descriptor 2
    on import: after quiet(), only the warning reaches stderr; a lookup (find_spec) does not use up the filter."""
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os\n"
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')\n"
        "os.write(2, b'I0000 00:00:1796599060.644656    9647 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "os.write(2, b'W0000 00:00:1796599060.644656    9647 port.cc:9] a real warning\\n')\n"
    )
    script = (
        "import importlib.util, sys\n"
        "from jaxdiff.cli import console\n"
        "console.quiet(False)\n"
        "assert importlib.util.find_spec('tensorflow') is not None\n"
        "import tensorflow\n"
        "print('imported', file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["W0000 00:00:1796599060.644656    9647 port.cc:9] a real warning", "imported"]


def test_configs_by_name_and_by_path(tmp_path):
    named = console.resolve_config("digits")
    assert pathlib.Path(named).is_file() and named.endswith("digits.py")
    assert console.resolve_config("tiny:arg").endswith("tiny.py:arg")
    assert console.resolve_config(str(ROOT / "configs" / "cifar10.py")) == str(ROOT / "configs" / "cifar10.py")
    assert set(console.config_names()) == {p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__"}
    with pytest.raises(ConfigError, match="No shipped config named 'digit'"):
        console.resolve_config("digit")
    with pytest.raises(ConfigError, match=r"No config file 'configs/nope\.py'"):
        console.resolve_config("configs/nope.py")


def test_eval_fid_samples_with_the_runs_training_time_fid_sampler(tmp_path):
    from jaxdiff import commands

    (tmp_path / "config.json").write_text(json.dumps({"evaluation": {"sampler": "ddim", "steps": 50}}))
    request = commands.SampleRequest(workdir=str(tmp_path), eval="fid")
    assert (request.sampler, request.sampling_steps) == ("ddim", 50)
    assert commands.SampleRequest(pretrained="x", eval="fid").sampler == commands.FID_SAMPLER[0]
    assert commands.SampleRequest(workdir=str(tmp_path)).sampler == "ddpm"  # drawing: ancestral over all T
    chosen = commands.SampleRequest(workdir=str(tmp_path), eval="fid", sampler="dpm++2m", steps=20)
    assert (chosen.sampler, chosen.sampling_steps) == ("dpm++2m", 20)
